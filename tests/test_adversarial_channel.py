"""The direct channel and the app server, attacked: floods of idle connections (under a 256
descriptor limit), slow handshakes, frames that claim gigabytes, random bytes before and after
authentication, malformed requests. Each test asserts three things: the server did not crash
(a legitimate client is served afterwards), nothing hung (every wait is bounded), and nothing
the server held before is lost (the Counter's value set before the attack reads back)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridcouple.appkit.data import Field, StructuredMesh, TimeStep
from gridcouple.appkit.transport import (
    TOKEN_ENV,
    Acceptor,
    ApplicationProxy,
    Channel,
    FrameTooLargeError,
    Limits,
    ObjectServer,
    RemoteError,
    TransportError,
    accept_handshake,
    connect,
    tls_contexts,
)

TESTS = Path(__file__).parent
SECRET = "adversarial-secret"
VALUE = 0.5  # the Counter's value before any attack: must read back after each
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- a real app server, attacked from outside ------------------------------------------

def server_environment(**extra: str) -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: SECRET, **extra,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def start_server(tmp_path: Path, name: str, *, nofile: int | None = None,
                 **limits: str) -> tuple[subprocess.Popen[str], str, Path]:
    """A Counter served by a real server process whose limits come from the environment;
    (process, endpoint, its stderr file). Its value is VALUE already."""
    log_path = tmp_path / f"{name}.stderr"
    env = server_environment(**limits)

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gridcouple.appkit.server", "--app", "test_appkit_apps:Counter"],
            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            preexec_fn=limit_descriptors)
    line = process.stdout.readline()
    assert line, log_path.read_text()
    endpoint = json.loads(line)["endpoint"]
    proxy = ApplicationProxy(endpoint, SECRET)
    proxy.solve_step(TimeStep(VALUE, VALUE, 1))
    proxy.close()
    return process, endpoint, log_path


def stop_server(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()


def assert_serves(process: subprocess.Popen[str], endpoint: str, log_path: Path) -> None:
    """Alive, serving a legitimate client promptly, with its state as before the attack, and
    no handler thread died of an exception."""
    assert process.poll() is None, log_path.read_text()
    started = time.monotonic()
    proxy = ApplicationProxy(endpoint, SECRET, call_timeout=5)
    try:
        assert proxy.get_property("c").value == VALUE
    finally:
        proxy.close()
    assert time.monotonic() - started < 5
    text = log_path.read_text()
    assert "Traceback" not in text and "Exception in thread" not in text, text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the quick attacks: frames of at most 1 MiB, 1 s to authenticate."""
    process, endpoint, log_path = start_server(
        tmp_path_factory.mktemp("server"), "server", GRIDCOUPLE_MAX_FRAME=str(1 << 20),
        GRIDCOUPLE_HANDSHAKE_TIMEOUT="1")
    yield process, endpoint, log_path
    stop_server(process)


def open_idle(endpoint: str, count: int, seconds: float = 5.0) -> list[socket.socket]:
    """``count`` connections that never say a word, opened at once; returns when all are
    connected (or after ``seconds``: a server that stopped accepting leaves some hanging)."""
    host, port = endpoint.rsplit(":", 1)
    sockets = []
    poller = select.poll()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, int(port)))
        sockets.append(sock)
        poller.register(sock, select.POLLOUT)
    waiting, deadline = count, time.monotonic() + seconds
    while waiting and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            waiting -= 1
    return sockets


def closes_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer ends the connection within ``seconds`` (what it sends is drained)."""
    sock.setblocking(True)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(1 << 16):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def authenticated_socket(endpoint: str) -> socket.socket:
    channel = connect(endpoint, SECRET)
    assert not channel.has_buffered()
    return channel.sock


def rss(process: subprocess.Popen[str]) -> int:
    """The process's resident memory in bytes."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- the named cases -----------------------------------------------------------------------

def test_a_flood_of_idle_connections_under_256_descriptors_does_not_end_accepting(tmp_path):
    """300 idle connections to a server limited to 256 descriptors: the oldest pending ones
    are dropped for newer ones, so a quick client gets in during the flood and after it."""
    process, endpoint, log_path = start_server(tmp_path, "flood", nofile=256)
    flood = open_idle(endpoint, 300)
    try:
        time.sleep(0.3)
        assert_serves(process, endpoint, log_path)  # during the flood
    finally:
        for sock in flood:
            sock.close()
    assert_serves(process, endpoint, log_path)
    assert "waiting to authenticate" in log_path.read_text()
    stop_server(process)


def test_emfile_is_waited_out_and_accepting_goes_on(tmp_path):
    """With room for more pending connections than descriptors, accept() fails with EMFILE;
    the loop backs off, the idle connections reach their handshake deadline, and accepting
    resumes by itself."""
    process, endpoint, log_path = start_server(
        tmp_path, "emfile", nofile=256, GRIDCOUPLE_MAX_PENDING="1000",
        GRIDCOUPLE_HANDSHAKE_TIMEOUT="1")
    flood = open_idle(endpoint, 300)
    try:
        deadline = time.monotonic() + 5
        while "Too many open files" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert_serves(process, endpoint, log_path)  # the attacker still holds his ends
    finally:
        for sock in flood:
            sock.close()
    assert "accepting again" in log_path.read_text()
    stop_server(process)


def test_silent_and_slow_handshakes_are_closed_at_the_deadline(server):
    """An idle connection, and one sending a byte every 0.25 s (which would keep a per-read
    timeout waiting for ever), both end at the 1 s handshake deadline."""
    process, endpoint, log_path = server
    started = time.monotonic()
    (idle,) = open_idle(endpoint, 1)
    slow = socket.create_connection(endpoint.rsplit(":", 1), timeout=3)
    slow.recv(64)  # the greeting
    slow.sendall(bytes([200]))  # a long name, to be sent slowly
    closed_at = None
    while closed_at is None and time.monotonic() - started < 3:
        try:
            slow.sendall(b"a")
            slow.settimeout(0.25)
            if not slow.recv(1):
                closed_at = time.monotonic()
        except TimeoutError:
            continue
        except OSError:
            closed_at = time.monotonic()
    slow.close()
    assert closed_at is not None and 0.8 < closed_at - started < 2
    assert closes_within(idle, 1)
    assert time.monotonic() - started < 2
    idle.close()
    assert "did not authenticate within 1 s" in log_path.read_text()
    assert_serves(process, endpoint, log_path)


@pytest.mark.parametrize("header_length, lengths", [
    pytest.param(256 << 20, [], id="header-256MiB"),  # the 6 bytes
    pytest.param(0xFFFFFFFF, [], id="header-4GiB"),
    pytest.param(16, [4 << 30], id="buffer-4GiB"),
    pytest.param(16, [(1 << 64) - 1], id="buffer-2**64"),
    pytest.param(16, [1 << 19] * 3, id="buffers-summing-past-the-limit"),
])
def test_a_frame_claiming_more_than_the_limit_closes_that_connection_only(
        server, header_length, lengths):
    process, endpoint, log_path = server
    bystander = ApplicationProxy(endpoint, SECRET, call_timeout=5)  # stays served throughout
    before = rss(process)
    sock = authenticated_socket(endpoint)
    sock.sendall(struct.pack("<IH", header_length, len(lengths))
                 + struct.pack(f"<{len(lengths)}Q", *lengths))
    assert closes_within(sock, 2)
    sock.close()
    assert rss(process) - before < 32 << 20
    assert "more than the limit of 1 MiB ($GRIDCOUPLE_MAX_FRAME)" in log_path.read_text()
    assert bystander.get_property("c").value == VALUE
    bystander.close()
    assert_serves(process, endpoint, log_path)


def send_then_expect_close(process: subprocess.Popen[str], sock: socket.socket,
                           data: bytes) -> None:
    """Send ``data`` and end our side: the server must close within 3 s, and live on."""
    with contextlib.suppress(OSError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    assert closes_within(sock, 3)
    sock.close()
    assert process.poll() is None


@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_end_that_connection_only(server, authenticated, data):
    process, endpoint, _ = server
    sock = (authenticated_socket(endpoint) if authenticated
            else socket.create_connection(endpoint.rsplit(":", 1), timeout=3))
    send_then_expect_close(process, sock, data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=12)
requests = msgpack_values | st.tuples(
    st.sampled_from(["get_property", "set_field", "pid", "terminate", "_secret", "nope"]),
    msgpack_values, msgpack_values).map(list)


@FUZZ
@given(request=requests, buffers=st.lists(st.binary(max_size=16), max_size=3))
def test_well_framed_nonsense_gets_an_error_reply_or_a_close_never_a_dead_thread(
        server, request, buffers):
    """Any msgpack header (with array and object extensions of random bytes) and buffers:
    the server replies with an error or closes the connection; no handler dies."""
    process, endpoint, log_path = server
    if isinstance(request, list) and request[:1] == ["terminate"]:
        request[0] = "nope"  # stopping the server is what an authenticated peer may do
    header = msgpack.packb(request)
    send_then_expect_close(process, authenticated_socket(endpoint), (
        struct.pack("<IH", len(header), len(buffers))
        + struct.pack(f"<{len(buffers)}Q", *map(len, buffers)) + header + b"".join(buffers)))
    text = log_path.read_text()
    assert "Traceback" not in text and "Exception in thread" not in text, text


def test_after_every_attack_the_server_still_serves_with_its_state(server):
    assert_serves(*server)


# --- the shared accept loop, in process --------------------------------------------------

class FlakyListener:
    """A listener whose accept() fails with each of ``errors`` in turn, then hands over a
    real connection, then fails as a closed listener does."""

    def __init__(self, errors, connection):
        self.errors = list(errors)
        self.connection = connection
        self.calls = 0

    def accept(self):
        self.calls += 1
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        if self.connection is not None:
            connection, self.connection = self.connection, None
            return connection, ("127.0.0.1", 1)
        raise OSError(errno.EBADF, "Bad file descriptor")

    def fileno(self):
        return 3


def wait_for(condition, seconds=3.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


TRANSIENT = [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
             errno.EPROTO, errno.EPERM, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT]


def test_the_accept_loop_outlives_every_transient_error_and_ends_with_its_listener(
        monkeypatch):
    monkeypatch.setattr("gridcouple.appkit.transport._BACKOFF_MOST", 0.02)
    ours, theirs = socket.socketpair()
    handled = []
    listener = FlakyListener(TRANSIENT, theirs)
    started = time.monotonic()
    Acceptor(listener, handled.append, name="test").run()  # returns: the listener is gone
    assert 0.05 < time.monotonic() - started < 2  # backed off, briefly
    assert listener.calls == len(TRANSIENT) + 2
    wait_for(lambda: handled == [theirs])
    ours.close()
    theirs.close()


def test_the_coupler_registry_uses_the_same_loop():
    """Coupler._accept_registrations with a registry whose accept() hits EMFILE first."""
    from gridcouple.coupler.session import Coupler

    ours, theirs = socket.socketpair()
    handled = []

    class Registry:
        _registry = FlakyListener([errno.EMFILE, errno.ECONNABORTED], theirs)
        _registration = handled.append

    Coupler._accept_registrations(Registry())
    wait_for(lambda: handled == [theirs])
    ours.close()
    theirs.close()


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that end a thread of the server under test (none may)."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    return errors


class Echo:
    def echo(self, value):
        return value

    def zeros(self, nbytes):
        return np.zeros(nbytes, dtype=np.uint8)

    def total(self, field):
        return float(field.values.sum())


@pytest.fixture
def echo_server():
    def start(limits: Limits) -> ObjectServer:
        server = ObjectServer(Echo(), SECRET, limits=limits)
        server.start()
        servers.append(server)
        return server

    servers: list[ObjectServer] = []
    yield start
    for server in servers:
        server.close()


def test_pending_connections_are_bounded_oldest_dropped_first(echo_server, thread_errors,
                                                              caplog):
    server = echo_server(Limits(max_pending=4, handshake_timeout=5))
    idle = open_idle(server.endpoint, 10)
    deadline = time.monotonic() + 3
    while server.acceptor.pending != 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sum(closes_within(sock, 0.5) for sock in idle[:6]) == 6  # the oldest six
    assert not any(closes_within(sock, 0.05) for sock in idle[6:])
    wait_for(lambda: caplog.text.count("dropped for a newer connection: more than 4 were "
                                       "waiting to authenticate ($GRIDCOUPLE_MAX_PENDING)") == 6)
    proxy = ApplicationProxy(server.endpoint, SECRET)
    assert proxy.echo("in") == "in"
    proxy.close()
    for sock in idle:
        sock.close()
    assert not thread_errors


def test_a_large_field_still_crosses_under_the_default_limit(echo_server, thread_errors):
    server = echo_server(Limits())
    proxy = ApplicationProxy(server.endpoint, SECRET)
    mesh = StructuredMesh((4096, 1024))
    field = Field(mesh, np.ones(mesh.shape), "big")  # 32 MiB in one frame
    assert proxy.total(field) == float(mesh.shape[0] * mesh.shape[1])
    assert proxy.zeros(48 << 20).nbytes == 48 << 20
    proxy.close()
    assert not thread_errors


def test_frames_over_the_limit_are_refused_by_the_sender_and_the_proxy_stays_usable(
        echo_server, thread_errors, monkeypatch):
    monkeypatch.setenv("GRIDCOUPLE_MAX_FRAME", str(1 << 20))  # the proxy's side
    server = echo_server(Limits(max_frame=1 << 20))
    proxy = ApplicationProxy(server.endpoint, SECRET)
    with pytest.raises(FrameTooLargeError, match=r"2 MiB is more than .* mode='ref'"):
        proxy.echo(np.zeros(2 << 20, dtype=np.uint8))
    with pytest.raises(RemoteError, match=r"the result of zeros cannot be sent: .*1 MiB"):
        proxy.zeros(2 << 20)
    assert proxy.zeros(1000).nbytes == 1000
    proxy.close()
    assert not thread_errors


def test_a_tls_handshake_is_bounded_by_the_same_deadline(tmp_path, thread_errors, caplog):
    """A peer that connects and never starts TLS is closed at the handshake deadline; a
    legitimate TLS peer is served meanwhile."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-keyout", "key.pem",
                    "-out", "cert.pem", "-subj", "/CN=gridcouple-test"],
                   cwd=tmp_path, check=True, capture_output=True)
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    server_tls, client_tls = tls_contexts({
        "tls_ca_file": cert, "tls_scheduler_cert": cert, "tls_scheduler_key": key,
        "tls_client_cert": cert, "tls_client_key": key})
    server = ObjectServer(Echo(), SECRET, tls=server_tls,
                          limits=Limits(handshake_timeout=0.5))
    server.start()
    try:
        started = time.monotonic()
        (silent,) = open_idle(server.endpoint, 1)
        proxy = ApplicationProxy(server.endpoint, SECRET, tls=client_tls)
        assert proxy.echo("secure") == "secure"
        assert closes_within(silent, 2) and 0.4 < time.monotonic() - started < 1.5
        silent.close()
        wait_for(lambda: "did not complete TLS within 0.5 s" in caplog.text)
        assert proxy.echo("still") == "still"
        proxy.close()
    finally:
        server.close()
    assert not thread_errors


def test_refused_connections_are_logged_at_most_20_per_10_s(echo_server, caplog):
    """A flood of peers without the secret must not fill the job's stderr."""
    server = echo_server(Limits(handshake_timeout=5))
    for _ in range(40):
        sock = socket.create_connection(server.endpoint.rsplit(":", 1), timeout=3)
        sock.sendall(bytes([1]) + b"x" + bytes(64))
        assert closes_within(sock, 2)
        sock.close()
    proxy = ApplicationProxy(server.endpoint, SECRET)
    assert proxy.echo(1) == 1
    proxy.close()
    assert caplog.text.count("refused a connection from") == 20


def test_a_proxy_refuses_a_reply_that_is_none(thread_errors):
    """A server (with the secret) answering nonsense: a TransportError, not an unpacking
    error; the proxy is closed, being out of step."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve():
            sock, _ = listener.accept()
            channel = Channel(sock)
            accept_handshake(channel, lambda name: SECRET)
            channel.receive()
            channel.send({"status": "nonsense"})
            with contextlib.suppress(TransportError):
                channel.receive()  # until the proxy closes
            channel.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        host, port = listener.getsockname()
        proxy = ApplicationProxy(f"{host}:{port}", SECRET)
        with pytest.raises(TransportError, match="answered echo with no reply"):
            proxy.echo(1)
        with pytest.raises(TransportError):
            proxy.echo(1)
        server.join(5)
        assert not server.is_alive()


def test_a_server_with_a_bad_port_or_tls_setting_says_which_in_one_line(tmp_path):
    env = server_environment()
    command = [sys.executable, "-m", "gridcouple.appkit.server", "--app",
               "test_appkit_apps:Counter"]
    result = subprocess.run([*command, "--port", "99999"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "'99999' is not a port (0-65535)" in result.stderr
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={
        **env, "GRIDCOUPLE_TLS": json.dumps({"tls_ca_file": str(tmp_path / "none.pem")})})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gridcouple app server: error: $GRIDCOUPLE_TLS: ")


def test_limits_from_the_environment_are_checked_naming_the_variable():
    assert Limits.from_env({}) == Limits()
    assert Limits.from_env({"GRIDCOUPLE_MAX_FRAME": "4096",
                            "GRIDCOUPLE_HANDSHAKE_TIMEOUT": "2.5"}) == Limits(4096, 64, 2.5)
    for key, value in [("GRIDCOUPLE_MAX_FRAME", "1GiB"), ("GRIDCOUPLE_MAX_PENDING", "0"),
                       ("GRIDCOUPLE_HANDSHAKE_TIMEOUT", "nan"),
                       ("GRIDCOUPLE_HANDSHAKE_TIMEOUT", "-1")]:
        with pytest.raises(TransportError, match=rf"\${key}={value!r}"):
            Limits.from_env({key: value})


@pytest.mark.parametrize("key", ["GRIDCOUPLE_MAX_FRAME", "GRIDCOUPLE_SPIN_US"])
def test_a_server_with_bad_limits_in_its_environment_says_which(tmp_path, key):
    result = subprocess.run(
        [sys.executable, "-m", "gridcouple.appkit.server", "--app", "test_appkit_apps:Counter"],
        env=server_environment(**{key: "lots"}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"${key}='lots'" in result.stderr and "Traceback" not in result.stderr


def test_a_channel_reads_a_large_header_as_it_arrives_not_as_claimed():
    """A header claim within the limit grows the buffer with what arrives."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    channel = Channel(theirs, max_frame=1 << 30)
    ours.sendall(struct.pack("<IH", 512 << 20, 0) + b"\x90" * 1000)
    ours.shutdown(socket.SHUT_WR)
    with pytest.raises(TransportError, match="closed"):
        channel.receive()
    assert len(channel._buffer) < 1 << 20
    ours.close()
    channel.close()



def test_registrations_without_an_endpoint_are_refused_and_the_registry_goes_on(
        tmp_path, monkeypatch, caplog):
    """An authenticated peer that registers nonsense (not a dict, no endpoint) is refused, a
    flood of them logs a few lines, and a real application server still joins afterwards."""
    import logging

    from gridcouple.appkit.transport import connect
    from gridcouple.config import load_config
    from gridcouple.coupler import AppRequest, Coupler

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "gridcouple.toml"
    path.write_text('state_dir = "state"\n[backend.local]\nidle_exit = 2\n')
    with Coupler(load_config(path)) as coupler, caplog.at_level(logging.WARNING):
        intruder = coupler._new_member(AppRequest("x:Y", name="intruder"), coupler.backend)
        for payload in ["hello", [1, 2], None, {"endpoint": 3}, {}] * 6:
            channel = connect(coupler.registry_endpoint, intruder.token, "intruder", timeout=5)
            channel.send(payload)
            with pytest.raises((TransportError, OSError)):
                channel.receive()  # closed: no "ok"
            channel.close()
        assert not intruder.joined.is_set()
        refusals = [r for r in caplog.records if "registration" in r.getMessage()]
        assert 1 <= len(refusals) <= 20
        app = coupler.allocate("test_appkit_apps:Counter", name="real")
        app.solve_step(TimeStep(0.5, 0.5, 1))
        assert app.get_property("c").value == 0.5
