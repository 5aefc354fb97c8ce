"""The coupler on the real local backend: application servers as jobs, calls, failures,
teardown."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import require_service
from gridcouple.appkit.data import TimeStep
from gridcouple.appkit.transport import ApplicationProxy, TransportError
from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.config import load_config
from gridcouple.coupler import (
    ApplicationFailedError,
    ApplicationStartError,
    AppRequest,
    Coupler,
)
from gridcouple.errors import ConfigError
from gridcouple.jobs import JobState

TESTS = Path(__file__).parent


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """A local-backend configuration; servers import the test applications from tests/."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS),
                                                      os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "gridcouple.toml"
    path.write_text('state_dir = "state"\n[backend.local]\nslots = 4\nidle_exit = 2\n'
                    '[coupler]\njoin_timeout = 60\n')
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def statuses_after(backend, jobs):
    """The jobs' statuses from a fresh client of the (closed) backend's state directory."""
    with type(backend)(backend.options, state_dir=backend.state_dir) as fresh:
        return fresh.status(jobs)


class CountingLocalBackend(LocalBackend):
    """The real local backend, noting how many jobs each submit call carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.submissions: list[int] = []

    def submit(self, specs):
        self.submissions.append(len(specs))
        return super().submit(specs)


def test_allocate_several_call_remotely_and_leave_nothing_behind(config_file):
    config = load_config(config_file)
    with CountingLocalBackend(config.backend_options("local", LocalOptions),
                              state_dir=config.state_dir) as counting, \
            Coupler(config, backend=counting) as coupler:
        assert coupler.scheduler_address.startswith("tls://127.0.0.1:")  # mutual TLS, always
        first, second = coupler.allocate_many([
            AppRequest("test_appkit_apps:Sleeper", name="one"),
            AppRequest("test_appkit_apps:Sleeper", name="two")])
        jobs = [m.job for m in coupler._members.values()]
        assert counting.submissions == [2]  # both servers in one backend submission
        first.solve_step_in_background(TimeStep(0.5, 0.5, 1))  # each sleeps 0.5 s ...
        second.solve_step_in_background(TimeStep(0.5, 0.5, 1))
        first.wait()
        second.wait()
        (start1, end1), (start2, end2) = first.last_step_times(), second.last_step_times()
        assert start2 < end1 and start1 < end2  # ... at once, by the servers' own clocks
        second.set_field(first.get_field("temperature", 0.5, mode="ref"))
        assert first.get_property("c").value == second.get_property("c").value == 0.5
        assert second.received_mean() == 0.5  # read from first's store by second itself
        pids = [first.pid(), second.pid()]
        deadline = time.monotonic() + 20
        while set(coupler.scheduler_members()) != {"one", "two"}:
            assert time.monotonic() < deadline, coupler.scheduler_members()
            time.sleep(0.05)
        assert coupler.scheduler_members()["one"]["endpoint"] == first.endpoint
        backend = coupler.backend
        store_root = coupler._store_roots[backend.name]
    assert not any(alive(pid) for pid in pids)
    assert all(s.state.is_final for s in statuses_after(backend, jobs))
    assert not os.path.exists(store_root)


def test_a_server_killed_mid_step_fails_the_call_within_5_s_with_its_story(config_file):
    with Coupler.from_config(config_file) as coupler:
        app = coupler.allocate("test_appkit_apps:Sleeper", name="victim")
        pid = app.pid()
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(ApplicationFailedError) as failure:
            app.solve_step(TimeStep(60.0, 60.0, 7))
        assert time.monotonic() - started < 5.5
        message = str(failure.value)
        job = coupler._members["victim"].job
        assert f"application victim (test_appkit_apps:Sleeper), job {job}" in message
        assert "job state FAILED" in message and "native state FAILED" in message
        assert message.endswith("last lines of its stderr:\nsolving step 7")
        with pytest.raises(ApplicationFailedError):  # the proxy stays failed
            app.get_critical_time_step()


def test_a_server_that_fails_to_start_is_reported_with_its_stderr(config_file):
    with Coupler.from_config(config_file) as coupler, \
            pytest.raises(ApplicationStartError) as failure:
        coupler.allocate("test_appkit_apps:BrokenAtStart")
    message = str(failure.value)
    assert "application brokenatstart" in message and "ended before it joined" in message
    assert "no license for the solver found" in message


def test_an_exception_in_the_block_still_ends_every_job(config_file):
    with pytest.raises(RuntimeError, match="scenario bug"), \
            Coupler.from_config(config_file) as coupler:
        app = coupler.allocate("test_appkit_apps:Sleeper")
        pid = app.pid()
        app.solve_step_in_background(TimeStep(60.0, 60.0, 1))  # busy when we leave
        job = coupler._members["sleeper"].job
        backend = coupler.backend
        raise RuntimeError("scenario bug")
    assert not alive(pid)
    assert statuses_after(backend, [job])[0].state in (JobState.COMPLETED, JobState.CANCELED)


def test_listening_beyond_loopback_without_tls_is_a_config_error(tmp_path):
    path = tmp_path / "gridcouple.toml"
    path.write_text('[coupler]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match=r"gridcouple.toml:2: \[coupler\] host: .*needs TLS"):
        Coupler.from_config(path)
    path.write_text('[coupler]\ntls_ca_file = "ca.pem"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    with pytest.raises(ConfigError, match=r"toml:2: \[coupler\] tls_ca_file: .*ca.pem is not a"):
        Coupler.from_config(path)


def test_with_tls_configured_the_scheduler_and_the_direct_channels_use_it(config_file):
    require_service("openssl", shutil.which("openssl") is not None,
                    "the openssl command makes the test certificate")
    directory = config_file.parent
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", "key.pem", "-out", "cert.pem", "-subj", "/CN=gridcouple-test"],
                   cwd=directory, check=True, capture_output=True)
    config_file.write_text(config_file.read_text() + 'tls_ca_file = "cert.pem"\n'
                           'tls_cert = "cert.pem"\ntls_key = "key.pem"\n')
    with Coupler.from_config(config_file) as coupler:
        assert coupler.scheduler_address.startswith("tls://127.0.0.1:")
        app = coupler.allocate("test_appkit_apps:Counter", name="secure")
        assert app.get_critical_time_step() == 0.25
        assert isinstance(app._channel.sock, ssl.SSLSocket)
        anonymous = ssl.create_default_context(cafile=directory / "cert.pem")
        anonymous.check_hostname = False
        with pytest.raises(TransportError):  # the right secret without a certificate: refused
            ApplicationProxy(app.endpoint, coupler._members["secure"].token, tls=anonymous)
        deadline = time.monotonic() + 20
        while "secure" not in coupler.scheduler_members():  # joined the scheduler over TLS
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_call_timeout_ends_a_call_to_a_stuck_server(config_file):
    config_file.write_text(config_file.read_text() + "call_timeout = 1.0\n")
    with Coupler.from_config(config_file) as coupler:
        sleeper = coupler.allocate("test_appkit_apps:Sleeper", name="stuck")
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"stuck.solve_step did not return within 1 s"):
            sleeper.solve_step(TimeStep(30.0, 30.0, 1))
        assert time.monotonic() - started < 5
        with pytest.raises(TransportError):
            sleeper.get_critical_time_step()  # the proxy is closed, not out of step
        pid_job = next(iter(coupler._members.values())).job
        backend = coupler.backend
    [status] = statuses_after(backend, [pid_job])
    assert status.state.is_final  # leaving the block still ended the job


def test_the_scheduler_refuses_peers_without_the_sessions_certificate(config_file):
    """A dask peer may send pickles: another local process (or user) must not get in."""
    from distributed.comm import connect as dask_connect
    from distributed.security import Security

    async def try_to_connect(address: str, security: Security) -> None:
        comm = await dask_connect(address, timeout=3,
                                  **security.get_connection_args("client"))
        await comm.write({"op": "identity", "reply": True})
        await comm.read()

    with Coupler.from_config(config_file) as coupler:
        address = coupler.scheduler_address
        plain = address.replace("tls://", "tcp://")
        for target, security in ((plain, Security()), (address, Security.temporary())):
            with pytest.raises((OSError, TimeoutError)):
                asyncio.run(try_to_connect(target, security))
        # the session's own certificate gets in, as the application servers do
        asyncio.run(try_to_connect(address, coupler.scheduler_security))


def test_with_a_scheduler_port_the_registry_listens_on_the_next_one(config_file):
    """Two known ports for a firewall in front of the coupler: the scheduler's and the
    registry's, the next one."""
    with socket.socket() as probe:  # a free pair of ports, probably
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    port = port if port < 65000 else 40000
    config_file.write_text(config_file.read_text() + f"port = {port}\n")
    with Coupler.from_config(config_file) as coupler:
        assert coupler.scheduler_address == f"tls://127.0.0.1:{port}"
        assert coupler.registry_endpoint == f"127.0.0.1:{port + 1}"
        assert coupler.allocate("test_appkit_apps:Counter").get_critical_time_step() == 0.25
