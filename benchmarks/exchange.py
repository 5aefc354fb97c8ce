"""Remote calls and field exchange between two processes on loopback, against the peers in
the same run: Pyro5 (MuPIF's transport), a dask actor, a raw TCP socket, memcpy and the
first touch of new memory.

Measures (medians; the machine is shared and noisy, so read the ratios):

- remote call latency of a trivial method (target: <= 100 us), through a bare proxy and
  through the proxy a real Coupler hands out (allocated on the local backend), against raw
  TCP as a plain socket does it (sleeping in ``recv``) and as our channel does it (polling
  for the answer for up to ``$GRIDCOUPLE_SPIN_US`` first: the floor of the technique);
- a 256 MiB float64 field, all of it read by the receiver: ``copy`` through the direct channel
  (target: >= 0.8x raw TCP, received into a buffer written before timing: the loopback
  ceiling; and ``copy into buffer``, ``ApplicationProxy.call_into`` a buffer kept between
  transfers) and ``ref`` read by the receiver straight from the zarr store (target: >= 1.5 GB/s;
  into a fresh array and into the receiver's buffer; the producer's write of each version is
  reported beside it). Transfers run in rounds, in reverse order every other round; the
  Pyro5 and dask actor transfers are taken ``--peer-repeats`` times;
- application server start to usable proxy on the local backend (target: <= 0.8 s), against a
  bare dask worker joining the same scheduler, and against our server as a plain subprocess;
- where a call's time goes on loopback: client and server pinned to one vCPU, then to two
  (the cross-CPU wake-up), for our channel and for raw TCP;
- across two test hosts (docs/test-hosts.md; when they run): the producer's server on one, the
  reader on the other, mutual TLS as beyond loopback always: call latency against raw TCP
  (plain and TLS) and Pyro5 between the same hosts; 256 MiB by copy, and by reference read
  through the producer's server (all 64 chunks, and one of them), against raw TCP (plain and
  TLS) between the same hosts in the same run; the bytes the one-chunk read moved; and the
  reader's CPU (cores busy) while raw TCP and raw TLS streams arrive, which shows what bounds
  TLS.

Run: ``.venv/bin/python benchmarks/exchange.py`` (needs the bench extra for Pyro5; the
cross-host section needs root and scripts/testhosts-up; ``--only loopback`` or ``--only
cross-host`` runs one part).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gridcouple.appkit.application import Application
from gridcouple.appkit.data import Field, StructuredMesh

HERE = Path(__file__).resolve().parent
FIELD_SHAPE = (4096, 8192)  # 256 MiB of float64
FIELD_BYTES = FIELD_SHAPE[0] * FIELD_SHAPE[1] * 8
SECRET = "benchmark-secret"


class BenchApp(Application):
    """The application under test: a trivial method and one big field."""

    def __init__(self) -> None:
        self.field: Field | None = None

    def ping(self) -> int:
        return 1

    def make_field(self) -> None:
        values = np.random.default_rng(0).random(FIELD_SHAPE)
        self.field = Field(StructuredMesh(FIELD_SHAPE), values, "big")

    def get_field(self, field_id: str, time: float) -> Field:
        assert self.field is not None
        return self.field  # no time: a ref stores it at the time asked for

    def use_chunks(self, count: int) -> None:
        """Store versions in ``count`` chunks (the store's default: 8 MiB ones)."""
        self.field_store.chunk_bytes = FIELD_BYTES // count

    def served(self) -> dict[str, int]:
        from gridcouple.appkit.remote import served_counts

        return {k: v for k, v in served_counts().items() if k != "chunks"}


class PyroBench:
    """The Pyro5 peer's object (MuPIF serves applications like this)."""

    def __init__(self) -> None:
        self.payload = np.random.default_rng(0).random(FIELD_SHAPE).tobytes()

    def ping(self) -> int:
        return 1

    def array_bytes(self) -> bytes:
        return self.payload


class ActorBench:
    """The dask actor peer."""

    def __init__(self) -> None:
        self.payload = np.random.default_rng(0).random(FIELD_SHAPE)

    def ping(self) -> int:
        return 1

    def array(self) -> np.ndarray:
        return self.payload


# --- peer servers (run as subprocesses of this file) -----------------------------------------

def serve_pyro() -> None:
    import Pyro5.api

    daemon = Pyro5.api.Daemon(host="127.0.0.1")
    uri = daemon.register(Pyro5.api.expose(PyroBench)())
    print(uri, flush=True)
    daemon.requestLoop()


def serve_tcp() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    payload = np.random.default_rng(0).random(FIELD_SHAPE)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_answer, args=(sock, payload), daemon=True).start()


def _answer(sock: socket.socket, payload: np.ndarray) -> None:
    """Raw TCP's side: ``p`` is answered with ``p``, ``c`` with this process's CPU seconds
    (32 bytes of text), anything else with the payload. A
    connection whose first byte is ``P`` polls for each request as our channel does
    (:meth:`Channel.spin_for_frame`) before it waits in ``recv``."""
    from gridcouple.appkit.transport import Channel

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poller = Channel(sock) if sock.recv(1) == b"P" else None
    with sock:
        while True:
            if poller is not None:
                poller.spin_for_frame()
            request = sock.recv(1)
            if not request:
                return
            if request == b"p":
                sock.sendall(b"p")
            elif request == b"c":  # this process's CPU seconds so far
                usage = resource.getrusage(resource.RUSAGE_SELF)
                sock.sendall(f"{usage.ru_utime + usage.ru_stime:31.6f}\n".encode())
            else:
                sock.sendall(memoryview(payload).cast("B"))


def raw_peer(address: tuple[str, int], polling: bool = False,
             tls: Any = None) -> tuple[socket.socket, Callable[[], None]]:
    """A connection to :func:`_answer` and its ping (polling for the answer as our channel
    does when ``polling``)."""
    from gridcouple.appkit.transport import Channel

    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = tls.wrap_socket(sock)
    sock.sendall(b"P" if polling else b"-")
    poller = Channel(sock) if polling else None

    def ping() -> None:
        sock.sendall(b"p")
        if poller is not None:
            poller.spin_for_frame()
        sock.recv(1)

    return sock, ping


def serve_cross(tls_json: str) -> None:
    """On the producer's host: raw TCP (plain, and with the session's TLS) and Pyro5, on every
    address; prints their ports and URI as one JSON line."""
    import Pyro5.api

    from gridcouple.appkit.transport import tls_contexts

    payload = np.random.default_rng(0).random(FIELD_SHAPE)
    contexts = tls_contexts(json.loads(tls_json))
    assert contexts is not None
    ports = {}
    for name, wrap in (("tcp_port", None), ("tls_port", contexts[0])):
        listener = socket.create_server(("0.0.0.0", 0))
        ports[name] = listener.getsockname()[1]

        def accept(listener: socket.socket = listener, wrap: Any = wrap) -> None:
            while True:
                sock, _ = listener.accept()
                if wrap is not None:
                    sock = wrap.wrap_socket(sock, server_side=True)
                threading.Thread(target=_answer, args=(sock, payload), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
    daemon = Pyro5.api.Daemon(host=socket.gethostname())
    uri = daemon.register(Pyro5.api.expose(PyroBench)())
    print(json.dumps({**ports, "pyro": str(uri)}), flush=True)
    daemon.requestLoop()


def start(argv: list[str], env: dict[str, str] | None = None,
          new_session: bool = False) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})}, start_new_session=new_session)
    line = process.stdout.readline().strip()
    if not line:
        raise RuntimeError(f"{argv} did not start")
    return process, line


# --- measuring ---------------------------------------------------------------------------------

def latency_us(call: Callable[[], object], count: int) -> float:
    for _ in range(min(200, count)):
        call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def alternating_latencies(calls: dict[str, Callable[[], object]],
                          count: int) -> dict[str, float]:
    """``latency NAME`` of each call: ``count`` calls each, in three rounds that take turns
    (so they share the machine's moments), the median of the three medians."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):
        for name, call in calls.items():
            samples[name].append(latency_us(call, count // 3))
    return {f"latency {name}": statistics.median(values) for name, values in samples.items()}


def seconds(transfer: Callable[[], object]) -> float:
    started = time.perf_counter()
    transfer()
    return time.perf_counter() - started


def throughput(transfer: Callable[[], object], repeats: int) -> float:
    """Median GB/s of moving FIELD_BYTES, over ``repeats`` samples."""
    return FIELD_BYTES / statistics.median(seconds(transfer) for _ in range(repeats)) / 1e9


def interleaved(transfers: dict[str, Callable[[], object]], repeats: int,
                results: dict[str, float], base: str, prefix: str = "") -> dict[str, list[float]]:
    """Median GB/s of each transfer, run in rounds (one of each per round, every other round
    in reverse order) so that they share the machine's load and none always runs first;
    ``ratio NAME`` is the median over rounds of NAME / ``base``. One untimed round first.
    Returns the seconds of every round, by transfer."""
    times: dict[str, list[float]] = {name: [] for name in transfers}
    for transfer in transfers.values():
        transfer()
    for round_number in range(repeats):
        order = list(transfers.items())
        for name, transfer in order if round_number % 2 == 0 else reversed(order):
            times[name].append(seconds(transfer))
    for name, samples in times.items():
        results[f"{prefix}field {name}"] = FIELD_BYTES / statistics.median(samples) / 1e9
        results[f"{prefix}ratio {name}"] = ratio(times, name, base)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """The median over rounds of the speed of ``name`` over that of ``base``."""
    return statistics.median(b / own for b, own in zip(times[base], times[name], strict=True))


def raw_field(sock: socket.socket, out: np.ndarray) -> np.ndarray:
    """The field from a raw TCP peer (see :func:`_answer`), into ``out``."""
    view = memoryview(out).cast("B")
    sock.sendall(b"f")
    done = 0
    while done < FIELD_BYTES:
        done += sock.recv_into(view[done:])
    return out


def prefaulted(shape: tuple[int, ...]) -> np.ndarray:
    """An array whose pages are all touched, so receiving into it measures the copy alone."""
    array = np.empty(shape)
    array.fill(1.0)
    return array


def run(args: argparse.Namespace, results: dict[str, float]) -> None:
    from gridcouple.appkit.transport import TOKEN_ENV, ApplicationProxy

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    store = tempfile.mkdtemp(prefix="gridcouple-bench-", dir="/dev/shm"
                             if os.path.isdir("/dev/shm") else None)
    processes = []
    try:
        ours, line = start([sys.executable, "-m", "gridcouple.appkit.server",
                            "--app", "exchange:BenchApp"],
                           {TOKEN_ENV: SECRET, "GRIDCOUPLE_FIELD_STORE": store})
        processes.append(ours)
        proxy = ApplicationProxy(json.loads(line)["endpoint"], SECRET, name="bench")
        pyro, uri = start([sys.executable, __file__, "--serve-pyro"])
        processes.append(pyro)
        import Pyro5.api

        pyro_proxy = Pyro5.api.Proxy(uri)
        tcp, port = start([sys.executable, __file__, "--serve-tcp"])
        processes.append(tcp)
        raw, raw_ping = raw_peer(("127.0.0.1", int(port)))
        polled, polled_ping = raw_peer(("127.0.0.1", int(port)), polling=True)
        results.update(alternating_latencies({
            "ours": proxy.ping, "Pyro5": pyro_proxy.ping, "raw TCP": raw_ping,
            "raw TCP, polling": polled_ping}, args.calls))
        polled.close()

        proxy.make_field()
        refs = []
        times = itertools.count()  # each ref write is the version of another time
        source = np.random.default_rng(0).random(FIELD_SHAPE)
        target, received, read_into, copied = (prefaulted(FIELD_SHAPE) for _ in range(4))
        interleaved({
            "raw TCP": lambda: raw_field(raw, received),
            "raw TCP, fresh buffer": lambda: raw_field(raw, np.empty(FIELD_SHAPE)),
            "copy": lambda: proxy.get_field("big", 0.0),
            "copy into buffer": lambda: proxy.call_into(copied, "get_field", "big", 0.0),
            "ref write": lambda: refs.append(
                proxy.get_field("big", float(next(times)), mode="ref")),
            "ref read": lambda: refs[-1].read(),
            "ref read into buffer": lambda: refs[-1].read(out=read_into),
            "memcpy": lambda: np.copyto(target, source),
            "first touch": lambda: prefaulted(FIELD_SHAPE),
        }, args.repeats, results, base="raw TCP")
        import serpent  # Pyro5's serializer sends bytes base64-encoded

        results["field Pyro5"] = throughput(
            lambda: np.frombuffer(serpent.tobytes(pyro_proxy.array_bytes())), args.peer_repeats)
        _dask_actor(args, results)
        _start_times(args, results)
    finally:
        for process in processes:
            process.kill()
            process.wait()
        shutil.rmtree(store, ignore_errors=True)
    _placement(args, results)


# --- where a call's time goes: one vCPU or two ------------------------------------------------

def _set_cpus(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus``."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def _placement(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Call latency of our channel and of raw TCP with client and server pinned to one vCPU,
    then each to its own: the difference is the cost of waking the other vCPU."""
    from gridcouple.appkit.transport import TOKEN_ENV, ApplicationProxy

    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    if len(cpus) < 2:
        return
    try:
        for placement, (client, server) in (("one vCPU", (cpus[0], cpus[0])),
                                            ("two vCPUs", (cpus[0], cpus[1]))):
            ours, line = start([sys.executable, "-m", "gridcouple.appkit.server",
                                "--app", "exchange:BenchApp"], {TOKEN_ENV: SECRET})
            tcp, port = start([sys.executable, __file__, "--serve-tcp"])
            try:
                for process in (ours, tcp):
                    _set_cpus(process.pid, {server})
                _set_cpus(os.getpid(), {client})
                proxy = ApplicationProxy(json.loads(line)["endpoint"], SECRET)
                address = ("127.0.0.1", int(port))
                (raw, raw_ping), (polled, polled_ping) = (raw_peer(address, polling)
                                                          for polling in (False, True))
                latencies = alternating_latencies({
                    "ours": proxy.ping, "raw TCP": raw_ping, "raw TCP, polling": polled_ping},
                    args.calls)
                results.update({f"{k}, {placement}": v for k, v in latencies.items()})
                proxy.close()
                raw.close()
                polled.close()
            finally:
                for process in (ours, tcp):
                    process.kill()
                    process.wait()
    finally:
        _set_cpus(os.getpid(), mine)


def _dask_actor(args: argparse.Namespace, results: dict[str, float]) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        actor = client.submit(ActorBench, actor=True).result()
        results["latency dask actor"] = latency_us(lambda: actor.ping().result(),
                                                   max(50, args.calls // 10))
        results["field dask actor"] = throughput(lambda: actor.array().result(),
                                                 args.peer_repeats)


def _start_times(args: argparse.Namespace, results: dict[str, float]) -> None:
    """Server start to usable proxy: on the local backend, as a plain subprocess, and a bare
    dask worker joining the coupler's scheduler; and the call latency through the proxy the
    coupler handed out."""
    from gridcouple.appkit.transport import TOKEN_ENV, ApplicationProxy
    from gridcouple.coupler import Coupler

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gridcouple.toml"
        config.write_text('state_dir = "state"\n[backend.local]\nslots = 8\nidle_exit = 2\n')
        with Coupler.from_config(config) as coupler:
            coupler.backend.wake_daemon()  # a daemon already running, as in steady use
            samples = []
            for index in range(args.starts):
                started = time.perf_counter()
                app = coupler.allocate("exchange:BenchApp", name=f"start{index}")
                app.ping()
                samples.append(time.perf_counter() - started)
            results["start local backend"] = statistics.median(samples)
            # Right after its start a server imports dask in a background thread (its GIL
            # share slows calls); once it has joined the scheduler it is in steady use.
            results["latency coupler proxy, starting"] = latency_us(app.ping, 200)
            deadline = time.monotonic() + 60
            while len(coupler.scheduler_members()) < args.starts:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"servers joined: {coupler.scheduler_members()}")
                time.sleep(0.01)
            results["latency coupler proxy"] = latency_us(app.ping, args.calls)
            tls = _tls_options(coupler.scheduler_security, Path(tmp))
            log = Path(tmp) / "worker.log"
            samples = []
            for index in range(args.starts):
                started = time.perf_counter()
                with log.open("w") as stderr:
                    worker = subprocess.Popen(
                        [sys.executable, "-m", "distributed.cli.dask_worker",
                         coupler.scheduler_address, "--nthreads", "1", "--no-nanny",
                         "--no-dashboard", "--name", f"bare{index}", *tls],
                        stdout=subprocess.DEVNULL, stderr=stderr)
                while not any(w.name == f"bare{index}"
                              for w in coupler._scheduler.workers.values()):
                    if worker.poll() is not None or time.perf_counter() - started > 60:
                        worker.kill()
                        worker.wait()
                        raise RuntimeError(f"the bare dask worker did not join:\n"
                                           f"{log.read_text()[-2000:]}")
                    time.sleep(0.002)
                samples.append(time.perf_counter() - started)
                worker.terminate()
                worker.wait()
            results["start bare dask worker"] = statistics.median(samples)
    samples = []
    for _ in range(args.starts):
        started = time.perf_counter()
        process, line = start([sys.executable, "-m", "gridcouple.appkit.server",
                               "--app", "exchange:BenchApp"], {TOKEN_ENV: SECRET})
        ApplicationProxy(json.loads(line)["endpoint"], SECRET).ping()
        samples.append(time.perf_counter() - started)
        process.kill()
        process.wait()
    results["start plain subprocess"] = statistics.median(samples)


def _tls_options(security: Any, directory: Path) -> list[str]:
    """dask-worker's TLS options for the coupler's scheduler (mutual TLS, also on loopback):
    the certificates of its ``Security``, written to files when held in memory."""
    options = []
    for key, option in (("tls_ca_file", "--tls-ca-file"), ("tls_client_cert", "--tls-cert"),
                        ("tls_client_key", "--tls-key")):
        value = getattr(security, key)
        if value.lstrip().startswith("-----BEGIN"):
            path = directory / f"{key}.pem"
            path.write_text(value)
            path.chmod(0o600)
            value = str(path)
        options += [option, value]
    return options


# --- across two test hosts ----------------------------------------------------------------------

SERVICES = HERE.parent / ".gridcouple-services" / "testhosts.json"
FIELD_CHUNKS = 64


def _test_hosts() -> tuple[list[dict[str, Any]], Path] | str:
    """The first two test hosts of scripts/testhosts-up and the shared directory, or why not."""
    if os.geteuid() != 0 or shutil.which("nsenter") is None:
        return "entering the test hosts needs root and nsenter"
    try:
        record = json.loads(SERVICES.read_text())
        hosts = record["hosts"][:2]
        for host in hosts:
            os.kill(int(host["pid"]), 0)
    except (OSError, ValueError, KeyError) as exc:
        return f"no test hosts ({SERVICES}: {exc}; scripts/testhosts-up)"
    if len(hosts) < 2:
        return "fewer than two test hosts"
    return hosts, Path(record["shared_dir"])


def _enter(host: dict[str, Any]) -> list[str]:
    return ["nsenter", "-t", str(host["pid"]), "--net", "--uts", "--mount", f"--wd={HERE}",
            "--"]


def cross_hosts(args: argparse.Namespace, results: dict[str, float]) -> None:
    """The producer's server, raw TCP and Pyro5 on the second test host; the reader on the
    first, with mutual TLS from ``gridcouple certs`` (everything beyond loopback has it)."""
    from gridcouple.appkit.remote import FIELD_TOKEN_ENV
    from gridcouple.appkit.transport import TOKEN_ENV
    from gridcouple.cli.certs import make_ca, make_site

    found = _test_hosts()
    if isinstance(found, str):
        print(f"cross-host section skipped: {found}", file=sys.stderr)
        return
    (reader, producer), shared = found
    directory = Path(tempfile.mkdtemp(prefix="gridcouple-bench-", dir=shared))
    processes: list[subprocess.Popen[str]] = []
    try:
        make_ca(directory / "ca")
        site = make_site(directory / "ca", "bench")
        tls = {"tls_ca_file": str(site / "ca.pem"), "tls_scheduler_cert": str(site / "cert.pem"),
               "tls_scheduler_key": str(site / "key.pem"),
               "tls_client_cert": str(site / "cert.pem"),
               "tls_client_key": str(site / "key.pem")}
        environment = {TOKEN_ENV: SECRET, FIELD_TOKEN_ENV: "bench-fields",
                       "GRIDCOUPLE_TLS": json.dumps(tls), "PYTHONPATH": str(HERE)}
        ours, line = start([*_enter(producer), sys.executable, "-m", "gridcouple.appkit.server",
                            "--app", "exchange:BenchApp", "--name", "bench", "--host",
                            "0.0.0.0"], environment, new_session=True)
        processes.append(ours)
        peers, ports = start([*_enter(producer), sys.executable, __file__, "--serve-cross",
                              json.dumps(tls)], new_session=True)
        processes.append(peers)
        spec = {**json.loads(ports), "endpoint": json.loads(line)["endpoint"],
                "address": producer["address"], "host": producer["name"], "tls": tls,
                "fields_token": "bench-fields", "calls": args.calls, "repeats": args.repeats}
        client = subprocess.run([*_enter(reader), sys.executable, __file__, "--cross-client",
                                 json.dumps(spec)], capture_output=True, text=True,
                                timeout=1200, env={**os.environ, "PYTHONPATH": str(HERE)})
        if client.returncode:
            raise RuntimeError(f"the reader on {reader['name']} failed:\n{client.stderr}")
        results.update({f"cross {k}": v for k, v in json.loads(client.stdout).items()})
        results["cross hosts"] = f"{reader['name']} reads from {producer['name']}"  # type: ignore[assignment]
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def cross_client(spec_text: str) -> None:
    """On the reader's host: the measurements, printed as one JSON object."""
    import Pyro5.api

    from gridcouple.appkit import remote
    from gridcouple.appkit.transport import ApplicationProxy, connect, tls_contexts

    spec = json.loads(spec_text)
    contexts = tls_contexts(spec["tls"])
    assert contexts is not None
    tls = contexts[1]
    results: dict[str, float] = {}
    proxy = ApplicationProxy(spec["endpoint"], SECRET, name="bench", tls=tls)
    plain_address, tls_address = ((spec["address"], spec[port]) for port in ("tcp_port",
                                                                            "tls_port"))
    plain, plain_ping = raw_peer(plain_address)
    secure, secure_ping = raw_peer(tls_address, tls=tls)
    pyro = Pyro5.api.Proxy(spec["pyro"])
    calls = {"ours": proxy.ping, "raw TCP": plain_ping, "raw TLS": secure_ping,
             "raw TCP, polling": raw_peer(plain_address, polling=True)[1],
             "raw TLS, polling": raw_peer(tls_address, polling=True, tls=tls)[1],
             "Pyro5": pyro.ping}
    results.update(alternating_latencies(calls, spec["calls"]))

    proxy.make_field()
    proxy.use_chunks(FIELD_CHUNKS)
    ref = proxy.get_field("big", 0.0, mode="ref")
    info = remote.MemberInfo("bench", spec["host"], spec["endpoint"], ref.store_url,
                             ref.store_id)
    remote.install(remote.SessionReader(
        lambda name: info if name == "bench" else None,
        lambda member: connect(member.endpoint, spec["fields_token"], name="fields:reader",
                               tls=tls)))

    received, read_into, copied = (prefaulted(FIELD_SHAPE) for _ in range(3))
    times = interleaved({
        "raw TCP": lambda: raw_field(plain, received),
        "raw TLS": lambda: raw_field(secure, received),
        "copy": lambda: proxy.get_field("big", 0.0),
        "copy into buffer": lambda: proxy.call_into(copied, "get_field", "big", 0.0),
        "ref read": lambda: ref.read(out=read_into),
        "ref read, new array": lambda: ref.read(),
        "raw TCP, fresh buffer": lambda: raw_field(plain, np.empty(FIELD_SHAPE)),
    }, spec["repeats"], results, base="raw TCP")
    for name in CROSS_TRANSFERS:
        results[f"ratio {name} / raw TLS"] = ratio(times, name, "raw TLS")
    for name, sock in (("raw TCP", plain), ("raw TLS", secure)):
        (results[f"reader cores {name}"], results[f"sender cores {name}"],
         results[f"cores GB/s {name}"]) = _cores(sock, received)
    rows = FIELD_SHAPE[0] // FIELD_CHUNKS
    ref.open()  # zarr imported and the array's metadata read: not part of a chunk's cost
    before = proxy.served()["bytes"]
    results["ref one chunk seconds"] = seconds(lambda: ref.open()[rows: 2 * rows])
    results["ref one chunk bytes"] = proxy.served()["bytes"] - before
    results["ref read all bytes"] = FIELD_BYTES
    print(json.dumps(results))


CROSS_TRANSFERS = ("copy", "copy into buffer", "ref read", "ref read, new array")


def _cores(sock: socket.socket, received: np.ndarray) -> tuple[float, float, float]:
    """While a raw stream of the field arrives on ``sock``: the CPU this process and the
    sender spend over the wall time (1.0: one core busy throughout), and the GB/s; medians of
    three."""
    def cpu_seconds() -> tuple[float, float]:
        sock.sendall(b"c")
        text = b""
        while len(text) < 32:
            text += sock.recv(32 - len(text))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, float(text)

    samples = []
    for _ in range(3):
        (mine, sender), started = cpu_seconds(), time.perf_counter()
        raw_field(sock, received)
        wall = time.perf_counter() - started
        mine_after, sender_after = cpu_seconds()
        samples.append(((mine_after - mine) / wall, (sender_after - sender) / wall,
                        FIELD_BYTES / wall / 1e9))
    return tuple(statistics.median(s[i] for s in samples) for i in range(3))  # type: ignore[return-value]


def report(results: dict[str, float]) -> None:
    if "latency ours" in results:
        report_loopback(results)
    if "cross latency ours" in results:
        report_cross(results)


def report_cross(results: dict[str, float]) -> None:
    r = {k.removeprefix("cross "): v for k, v in results.items() if k.startswith("cross ")}
    ours = r["latency ours"]
    print(f"across two test hosts ({r['hosts']}), mutual TLS as always beyond loopback:")
    print("  call latency, median (targets: <= 0.5x Pyro5, <= 2x raw TCP; 'polling': the raw "
          "socket polls for its answer as our channel does, $GRIDCOUPLE_SPIN_US):")
    print(f"    ours (TLS)              {ours:9.1f} us")
    for peer in ("raw TCP", "raw TLS", "raw TCP, polling", "raw TLS, polling", "Pyro5"):
        value = r[f"latency {peer}"]
        print(f"    {peer:<23} {value:9.1f} us   ours / {peer} = {ours / value:.2f}")
    print("  256 MiB float64, GB/s (medians; ratios: median per round against raw TCP between "
          "the same hosts, plain and with TLS, each into a buffer written before):")
    targets = {"copy": "copy >= 0.8x", "ref read": "ref read of all >= 0.7x"}
    for name in CROSS_TRANSFERS:
        target = targets.get(name)
        print(f"    {name:<23} {r['field ' + name]:6.2f}   / raw TCP = "
              f"{r['ratio ' + name]:.2f}, / raw TLS = {r['ratio ' + name + ' / raw TLS']:.2f}"
              + (f"   (target {target} raw TCP)" if target else ""))
    for name in ("raw TCP", "raw TLS", "raw TCP, fresh buffer"):
        print(f"    {name:<23} {r['field ' + name]:6.2f}")
    print(f"  CPU while a raw stream arrives (cores busy; {os.cpu_count()} vCPUs for both "
          "hosts):")
    for name in ("raw TCP", "raw TLS"):
        reader, sender, speed = (r[f"{k} {name}"] for k in ("reader cores", "sender cores",
                                                           "cores GB/s"))
        print(f"    {name:<23} reader {reader:.2f} + sender {sender:.2f} cores at {speed:.2f} "
              f"GB/s: {(reader + sender) / speed:.2f} core-seconds per GB, so at most "
              f"{(os.cpu_count() or 1) * speed / (reader + sender):.2f} GB/s on all vCPUs")
    share = r["ref one chunk bytes"] / r["ref read all bytes"]
    print(f"  ref read of 1 chunk in {FIELD_CHUNKS}: {r['ref one chunk bytes']:.0f} bytes moved, "
          f"{100 * share:.2f} % of the field (target <= 2 %), in "
          f"{1000 * r['ref one chunk seconds']:.1f} ms")


def report_loopback(results: dict[str, float]) -> None:
    ours, coupled = results["latency ours"], results["latency coupler proxy"]
    print("remote call latency, median over calls (target <= 100 us):")
    print(f"  ours, bare proxy        {ours:9.1f} us")
    print(f"  ours, Coupler's proxy   {coupled:9.1f} us   (allocated on the local backend, "
          "server joined)")
    print(f"  ... while it starts     {results['latency coupler proxy, starting']:9.1f} us   "
          "(importing dask in the background)")
    for peer in ("Pyro5", "dask actor", "raw TCP", "raw TCP, polling"):
        value = results[f"latency {peer}"]
        print(f"  {peer:<23} {value:9.1f} us   ours / {peer} = {ours / value:.2f}, "
              f"Coupler's / {peer} = {coupled / value:.2f}")
    copy = results["field copy"]
    print("256 MiB float64 field, GB/s (medians; 1 GB = 1e9 bytes; ratios: median per round "
          "against raw TCP into a written buffer):")
    print(f"  copy (direct channel)   {copy:6.2f}   copy / raw TCP = "
          f"{results['ratio copy']:.2f} (target >= 0.8)")
    print(f"  copy into a buffer      {results['field copy into buffer']:6.2f}   / raw TCP = "
          f"{results['ratio copy into buffer']:.2f}   (ApplicationProxy.call_into: no new "
          "memory each time)")
    for name in ("ref read", "ref read into buffer"):
        print(f"  {name + ', receiver':<23} {results['field ' + name]:6.2f}   (target >= 1.5 "
              f"GB/s); / raw TCP = {results['ratio ' + name]:.2f}")
    print(f"  ref, producer writes    {results['field ref write']:6.2f}   (once per version)")
    for peer in ("raw TCP", "raw TCP, fresh buffer", "memcpy", "first touch", "Pyro5",
                 "dask actor"):
        value = results[f"field {peer}"]
        print(f"  {peer:<23} {value:6.2f}   copy / {peer} = {copy / value:.2f}")
    start = results["start local backend"]
    print(f"application server start to usable proxy (target <= 0.8 s): local backend "
          f"{start:.3f} s")
    for peer in ("bare dask worker", "plain subprocess"):
        value = results[f"start {peer}"]
        print(f"  {peer:<18} {value:.3f} s   ours / {peer} = {start / value:.2f}")
    if "latency ours, one vCPU" in results:
        print("call latency by placement (client and server pinned), median:")
        for placement in ("one vCPU", "two vCPUs"):
            mine, raw, polled = (results[f"latency {n}, {placement}"]
                                 for n in ("ours", "raw TCP", "raw TCP, polling"))
            print(f"  {placement:<10} ours {mine:7.1f} us, raw TCP {raw:7.1f} us, polling "
                  f"{polled:7.1f} us; ours / raw TCP = {mine / raw:.2f}, ours - raw TCP = "
                  f"{mine - raw:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per latency figure")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of field transfers")
    parser.add_argument("--starts", type=int, default=5, help="starts per start-time figure")
    parser.add_argument("--peer-repeats", type=int, default=3,
                        help="samples of the Pyro5 and dask actor field transfers")
    parser.add_argument("--only", choices=("loopback", "cross-host"),
                        help="run one part (default: both; cross-host when the test hosts run)")
    parser.add_argument("--serve-pyro", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-tcp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-cross", metavar="TLS", help=argparse.SUPPRESS)
    parser.add_argument("--cross-client", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pyro:
        serve_pyro()
    elif args.serve_tcp:
        serve_tcp()
    elif args.serve_cross:
        serve_cross(args.serve_cross)
    elif args.cross_client:
        cross_client(args.cross_client)
    else:
        results: dict[str, float] = {}
        if args.only != "cross-host":
            run(args, results)
        if args.only != "loopback":
            cross_hosts(args, results)
        report(results)


if __name__ == "__main__":
    main()
