"""Remote calls and field exchange between two processes on loopback, against the peers in
the same run: Pyro5 (MuPIF's transport), a dask actor, a raw TCP socket, memcpy and the
first touch of new memory.

Measures (medians; the machine is shared and noisy, so read the ratios):

- remote call latency of a trivial method (target: <= 100 us), through a bare proxy and
  through the proxy a real Coupler hands out (allocated on the local backend);
- a 256 MiB float64 field, all of it read by the receiver: ``copy`` through the direct channel
  (target: >= 0.8x raw TCP, received into a buffer written before timing: the loopback
  ceiling) and ``ref`` read by the receiver straight from the zarr store (target: >= 1.5 GB/s;
  into a fresh array and into the receiver's buffer; the producer's write of each version is
  reported beside it). Transfers run in rounds, in reverse order every other round; the
  Pyro5 and dask actor transfers are taken ``--peer-repeats`` times;
- application server start to usable proxy on the local backend (target: <= 0.8 s), against a
  bare dask worker joining the same scheduler, and against our server as a plain subprocess.

Run: ``.venv/bin/python benchmarks/exchange.py`` (needs the bench extra for Pyro5).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        request = sock.recv(1)
        if not request:
            return
        if request == b"p":
            sock.sendall(b"p")
        else:
            sock.sendall(memoryview(payload).cast("B"))


def start(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
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


def seconds(transfer: Callable[[], object]) -> float:
    started = time.perf_counter()
    transfer()
    return time.perf_counter() - started


def throughput(transfer: Callable[[], object], repeats: int) -> float:
    """Median GB/s of moving FIELD_BYTES, over ``repeats`` samples."""
    return FIELD_BYTES / statistics.median(seconds(transfer) for _ in range(repeats)) / 1e9


def interleaved(transfers: dict[str, Callable[[], object]], repeats: int,
                results: dict[str, float], base: str) -> None:
    """Median GB/s of each transfer, run in rounds (one of each per round, every other round
    in reverse order) so that they share the machine's load and none always runs first;
    ``ratio NAME`` is the median over rounds of NAME / ``base``. One untimed round first."""
    times: dict[str, list[float]] = {name: [] for name in transfers}
    for transfer in transfers.values():
        transfer()
    for round_number in range(repeats):
        order = list(transfers.items())
        for name, transfer in order if round_number % 2 == 0 else reversed(order):
            times[name].append(seconds(transfer))
    for name, samples in times.items():
        results[f"field {name}"] = FIELD_BYTES / statistics.median(samples) / 1e9
        results[f"ratio {name}"] = statistics.median(
            base_time / own for base_time, own in zip(times[base], samples, strict=True))


def prefaulted(shape: tuple[int, ...]) -> np.ndarray:
    """An array whose pages are all touched, so receiving into it measures the copy alone."""
    array = np.empty(shape)
    array.fill(1.0)
    return array


def run(args: argparse.Namespace) -> None:
    from gridcouple.appkit.transport import TOKEN_ENV, ApplicationProxy

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    store = tempfile.mkdtemp(prefix="gridcouple-bench-", dir="/dev/shm"
                             if os.path.isdir("/dev/shm") else None)
    results: dict[str, float] = {}
    processes = []
    try:
        ours, line = start([sys.executable, "-m", "gridcouple.appkit.server",
                            "--app", "exchange:BenchApp"],
                           {TOKEN_ENV: SECRET, "GRIDCOUPLE_FIELD_STORE": store})
        processes.append(ours)
        proxy = ApplicationProxy(json.loads(line)["endpoint"], SECRET, name="bench")
        results["latency ours"] = latency_us(proxy.ping, args.calls)

        pyro, uri = start([sys.executable, __file__, "--serve-pyro"])
        processes.append(pyro)
        import Pyro5.api

        pyro_proxy = Pyro5.api.Proxy(uri)
        results["latency Pyro5"] = latency_us(pyro_proxy.ping, args.calls)

        tcp, port = start([sys.executable, __file__, "--serve-tcp"])
        processes.append(tcp)
        raw = socket.create_connection(("127.0.0.1", int(port)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def raw_ping() -> None:
            raw.sendall(b"p")
            raw.recv(1)

        results["latency raw TCP"] = latency_us(raw_ping, args.calls)

        def raw_field(out: np.ndarray) -> np.ndarray:
            view = memoryview(out).cast("B")
            raw.sendall(b"f")
            done = 0
            while done < FIELD_BYTES:
                done += raw.recv_into(view[done:])
            return out

        proxy.make_field()
        refs = []
        times = itertools.count()  # each ref write is the version of another time
        source = np.random.default_rng(0).random(FIELD_SHAPE)
        target, received, read_into = (prefaulted(FIELD_SHAPE) for _ in range(3))
        interleaved({
            "raw TCP": lambda: raw_field(received),
            "raw TCP, fresh buffer": lambda: raw_field(np.empty(FIELD_SHAPE)),
            "copy": lambda: proxy.get_field("big", 0.0),
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
        import shutil

        shutil.rmtree(store, ignore_errors=True)
    report(results)


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


def report(results: dict[str, float]) -> None:
    ours, coupled = results["latency ours"], results["latency coupler proxy"]
    print("remote call latency, median over calls (target <= 100 us):")
    print(f"  ours, bare proxy        {ours:9.1f} us")
    print(f"  ours, Coupler's proxy   {coupled:9.1f} us   (allocated on the local backend, "
          "server joined)")
    print(f"  ... while it starts     {results['latency coupler proxy, starting']:9.1f} us   "
          "(importing dask in the background)")
    for peer in ("Pyro5", "dask actor", "raw TCP"):
        value = results[f"latency {peer}"]
        print(f"  {peer:<23} {value:9.1f} us   ours / {peer} = {ours / value:.2f}, "
              f"Coupler's / {peer} = {coupled / value:.2f}")
    copy = results["field copy"]
    print("256 MiB float64 field, GB/s (medians; 1 GB = 1e9 bytes; ratios: median per round "
          "against raw TCP into a written buffer):")
    print(f"  copy (direct channel)   {copy:6.2f}   copy / raw TCP = "
          f"{results['ratio copy']:.2f} (target >= 0.8)")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per latency figure")
    parser.add_argument("--repeats", type=int, default=7, help="rounds of field transfers")
    parser.add_argument("--starts", type=int, default=5, help="starts per start-time figure")
    parser.add_argument("--peer-repeats", type=int, default=3,
                        help="samples of the Pyro5 and dask actor field transfers")
    parser.add_argument("--serve-pyro", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-tcp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pyro:
        serve_pyro()
    elif args.serve_tcp:
        serve_tcp()
    else:
        run(args)


if __name__ == "__main__":
    main()
