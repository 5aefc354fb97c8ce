"""Python calls and dask workers as Slurm jobs: gridcouple against submitit 1.5.4 and
dask-jobqueue 0.9.0, in one run on the real cluster of scripts/slurm-up (needs the bench extra).

- map_array submission of 1,000 trivial calls (to the DOWN partition "parked": submission
  only): ``Executor.map_array`` against submitit's ``map_array``. Target: <= 0.5x.
- one-by-one submission of 200 calls (to "parked"): a loop of ``Executor.submit`` until every
  call has its job, against a loop of submitit's ``submit``. Target: >= 5x faster. The number
  of sbatch calls each made is printed.
- all results back, 200 and 1,000 trivial calls on the "debug" partition (16 slots on 2
  cores: Python's start-up is the cost): map_array to the last result. Target: no slower.
- 8 dask workers: ``BatchCluster.scale(8)`` to 8 workers joined, then ``client.map`` of 1,000
  tiny tasks, against dask-jobqueue's ``SLURMCluster`` (its defaults, without ``--mem``: the
  test node declares no memory); sbatch calls counted by a wrapper on PATH (both go through
  it). Target: joined no slower, with one submission instead of 8.
- worker jobs that cannot start: PENDING (PartitionDown) and a missing interpreter (exit 127),
  the time until BatchCluster shows or raises them (target: within one poll interval, 5 s by
  default), and what dask-jobqueue says after waiting 15 s.

Rounds alternate which side goes first; figures are medians. Every job is canceled at the end.
``benchmarks/tasks.py executor`` or ``... dask`` runs one half (each with its peers).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slurm_submit import timed  # this folder's scripts share their timer

PARKED = "parked"
ROUNDS = 3
POLL = 5.0  # the Slurm backend's default poll_interval


def trivial(x: int) -> int:
    return x + 1


def scancel(ids: list[str]) -> None:
    arrays = sorted({i.split("_")[0] for i in ids})
    if arrays:
        subprocess.run(["scancel", *arrays], capture_output=True)


def counting_path(directory: Path) -> Path:
    """A directory whose sbatch (a shell wrapper: no Python start-up) counts its calls."""
    directory.mkdir()
    real = shutil.which("sbatch")
    wrapper = directory / "sbatch"
    wrapper.write_text(f'#!/bin/sh\necho call >> "{directory}/calls"\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return directory


def count_calls(directory: Path) -> int:
    calls = directory / "calls"
    if not calls.exists():
        return 0
    count = len(calls.read_text().splitlines())
    calls.unlink()
    return count


# --- the Executor against submitit -----------------------------------------------------------


def all_results(executor: Any, n: int) -> tuple[float, float]:
    """``map_array`` of ``n`` trivial calls (both sides have it, and ``result()`` on what it
    returns): seconds until it returned, and until the last result was back."""
    start = time.perf_counter()
    handles = executor.map_array(trivial, range(n))
    returned = time.perf_counter() - start
    values = [h.result() for h in handles]
    assert values == [i + 1 for i in range(n)]
    return returned, time.perf_counter() - start


class Ours:
    def __init__(self, root: Path) -> None:
        from gridcouple import Executor
        from gridcouple.backends.slurm import SlurmBackend, SlurmOptions

        self.backend = SlurmBackend(SlurmOptions(), state_dir=root / "state")
        self.parked = Executor(self.backend, attributes={"slurm.partition": PARKED})
        self.debug = Executor(self.backend)

    def map_array_parked(self, n: int) -> float:
        seconds, futures = timed(lambda: self.parked.map_array(trivial, range(n)))
        self.backend.cancel([f.wait_submitted() for f in futures])
        return seconds

    def submit_parked(self, n: int) -> tuple[float, float, int]:
        before = self.parked.submissions
        start = time.perf_counter()
        futures = [self.parked.submit(trivial, i) for i in range(n)]
        loop = time.perf_counter() - start
        for future in futures:
            future.wait_submitted()
        submitted = time.perf_counter() - start
        self.backend.cancel([f.wait_submitted() for f in futures])
        return loop, submitted, self.parked.submissions - before

    def results(self, n: int) -> tuple[float, float]:
        return all_results(self.debug, n)

    def close(self) -> None:
        self.parked.shutdown(cancel_futures=True)
        self.debug.shutdown(cancel_futures=True)
        self.backend.close()


class Submitit:
    def __init__(self, root: Path) -> None:
        import submitit

        self.parked = submitit.AutoExecutor(folder=root / "submitit-parked", cluster="slurm")
        self.parked.update_parameters(slurm_partition=PARKED, timeout_min=10)
        self.debug = submitit.AutoExecutor(folder=root / "submitit-debug", cluster="slurm")
        self.debug.update_parameters(slurm_partition="debug", timeout_min=10)

    def map_array_parked(self, n: int) -> float:
        seconds, jobs = timed(lambda: self.parked.map_array(trivial, range(n)))
        scancel([j.job_id for j in jobs])
        return seconds

    def submit_parked(self, n: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        jobs = [self.parked.submit(trivial, i) for i in range(n)]
        seconds = time.perf_counter() - start
        scancel([j.job_id for j in jobs])
        return seconds, seconds, len({j.job_id for j in jobs})

    def results(self, n: int) -> tuple[float, float]:
        return all_results(self.debug, n)


# --- BatchCluster against dask-jobqueue ---------------------------------------------------


def joined_and_mapped(cluster: Any, bin_dir: Path) -> tuple[float, float, int]:
    """Seconds from ``scale(8)`` to 8 workers joined, seconds for a ``client.map`` of 1,000
    tiny tasks on them, and the sbatch calls made (either side's cluster)."""
    from distributed import Client

    with Client(cluster) as client:
        joined, _ = timed(lambda: (cluster.scale(8), client.wait_for_workers(8)))
        mapped, values = timed(lambda: client.gather(client.map(trivial, range(1000))))
        assert values == [i + 1 for i in range(1000)]
        calls = count_calls(bin_dir)
    return joined, mapped, calls


def ours_cluster(root: Path, bin_dir: Path) -> tuple[float, float, int]:
    from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
    from gridcouple.dask import BatchCluster

    # the sbatch of PATH: the counting wrapper both sides go through
    backend = SlurmBackend(SlurmOptions(), state_dir=root / "state-dask")
    with backend, BatchCluster(backend) as cluster:
        return joined_and_mapped(cluster, bin_dir)


def jobqueue_cluster(**options: Any) -> Any:
    """dask-jobqueue's SLURMCluster with its defaults (a nanny per worker, plain TCP), one
    core per worker, no --mem directive (the test node declares no memory)."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(cores=1, memory="1GB", processes=1, queue=options.pop("queue", "debug"),
                        walltime="00:10:00", job_directives_skip=["--mem"],
                        log_directory=None, **options)


def peer_cluster(bin_dir: Path) -> tuple[float, float, int]:
    with jobqueue_cluster() as cluster:
        return joined_and_mapped(cluster, bin_dir)


def ours_cannot_start(root: Path) -> tuple[float, str, float, str]:
    """Seconds until the cluster shows PartitionDown, and until it raises the bad
    interpreter's failure (Slurm's default poll interval)."""
    from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
    from gridcouple.dask import BatchCluster, WorkerStartError

    backend = SlurmBackend(SlurmOptions(poll_interval=POLL), state_dir=root / "state-fail")
    with backend:
        with BatchCluster(backend, attributes={"slurm.partition": PARKED}) as parked:
            start = time.perf_counter()
            parked.scale(8)
            while "PartitionDown" not in parked.queue_state():
                time.sleep(0.01)
            shown = time.perf_counter() - start
            state = parked.queue_state()
        with BatchCluster(backend, python="/nonexistent/python3") as broken:
            start = time.perf_counter()
            broken.scale(1)
            try:
                broken.wait_for_workers(1, timeout=60)
                raised, message = math.inf, "no error"
            except WorkerStartError as exc:
                raised, message = time.perf_counter() - start, str(exc).splitlines()[0]
    return shown, state, raised, message


def peer_cannot_start(bin_dir: Path) -> list[str]:
    """What dask-jobqueue says about the same two after 15 s."""
    from distributed import Client

    seen = []
    for what, options in (("PENDING (PartitionDown)", {"queue": PARKED}),
                          ("exit 127", {"python": "/nonexistent/python3"})):
        with jobqueue_cluster(**options) as cluster, Client(cluster) as client:
            cluster.scale(1)
            start = time.perf_counter()
            try:
                client.wait_for_workers(1, timeout=15)
                outcome = "joined?"
            except Exception as exc:
                outcome = f"{type(exc).__name__} after {time.perf_counter() - start:.1f} s"
            seen.append(f"{what}: {outcome}; repr {cluster!r}")
        count_calls(bin_dir)
    return seen


# --- the run --------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(parts: list[str]) -> int:
    """``parts``: ``executor``, ``dask`` or both (the default)."""
    if shutil.which("sbatch") is None:
        print("tasks: skipped, sbatch is not on PATH (start scripts/slurm-up as root)")
        return 0
    logging.getLogger("distributed").setLevel(logging.ERROR)
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        root = Path(tmp)
        os.chdir(root)  # the jobs of both sides run here and import this module's functions
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        if "executor" in parts:
            ok &= executor_figures(root)
        if "dask" in parts:
            ok &= dask_figures(root)
        os.chdir("/")
    return 0 if ok else 1


def executor_figures(root: Path) -> bool:
    """The Executor against submitit; whether every target was met."""
    ok = True
    ours, peer = Ours(root), Submitit(root)
    try:
        ours.map_array_parked(10)  # warm-up: imports, the cluster's first answers
        peer.map_array_parked(10)
        a, b = [], []
        for round_ in range(ROUNDS + 2):
            first, second = (ours, peer) if round_ % 2 == 0 else (peer, ours)
            x, y = first.map_array_parked(1000), second.map_array_parked(1000)
            a.append(x if first is ours else y)
            b.append(y if first is ours else x)
        print(f"map_array of 1,000 calls, submission: gridcouple {median(a):.3f} s, "
              f"submitit {median(b):.3f} s (medians of {ROUNDS + 2}): "
              f"{median(a) / median(b):.2f}x (target <= 0.5x)")
        ok &= median(a) <= 0.5 * median(b)

        ours_submit = [ours.submit_parked(200) for _ in range(ROUNDS)]
        peer_submit = peer.submit_parked(200)
        loop = median([s[0] for s in ours_submit])
        all_in = median([s[1] for s in ours_submit])
        print(f"submit one by one, 200 calls: gridcouple loop {loop:.3f} s, all submitted "
              f"{all_in:.3f} s in {median([s[2] for s in ours_submit]):.0f} sbatch calls; "
              f"submitit {peer_submit[0]:.1f} s in {peer_submit[2]} sbatch calls: "
              f"{peer_submit[0] / all_in:.0f}x faster (target >= 5x)")
        ok &= peer_submit[0] / all_in >= 5

        for n, rounds in ((200, ROUNDS), (1000, 1)):
            mine, theirs = [], []
            for round_ in range(rounds):
                order = (ours, peer) if round_ % 2 == 0 else (peer, ours)
                for side in order:
                    (mine if side is ours else theirs).append(side.results(n))
            m, t = median([r[1] for r in mine]), median([r[1] for r in theirs])
            print(f"all results back, {n} calls: gridcouple {m:.1f} s (returned "
                  f"{median([r[0] for r in mine]):.3f} s), submitit {t:.1f} s (returned "
                  f"{median([r[0] for r in theirs]):.3f} s), median of {rounds}: "
                  f"{m / t:.2f}x (target <= 1)")
            ok &= m <= t
    finally:
        ours.close()
    return ok


def dask_figures(root: Path) -> bool:
    """BatchCluster against dask-jobqueue; whether every target was met."""
    ok = True
    bin_dir = counting_path(root / "bin")
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    mine_c, theirs_c = [], []
    for round_ in range(ROUNDS):
        order = ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours")
        for side in order:
            if side == "ours":
                mine_c.append(ours_cluster(root, bin_dir))
            else:
                theirs_c.append(peer_cluster(bin_dir))
    joined, tjoined = median([r[0] for r in mine_c]), median([r[0] for r in theirs_c])
    print(f"8 dask workers, scale(8) to joined: BatchCluster {joined:.2f} s in "
          f"{median([r[2] for r in mine_c]):.0f} sbatch call(s), dask-jobqueue "
          f"{tjoined:.2f} s in {median([r[2] for r in theirs_c]):.0f} sbatch calls "
          f"(medians of {ROUNDS}): {joined / tjoined:.2f}x (target <= 1)")
    print(f"client.map of 1,000 tiny tasks on them: BatchCluster (mutual TLS) "
          f"{median([r[1] for r in mine_c]):.2f} s, dask-jobqueue (plain TCP) "
          f"{median([r[1] for r in theirs_c]):.2f} s")
    ok &= joined <= tjoined and median([r[2] for r in mine_c]) == 1
    shown, state, raised, message = ours_cannot_start(root)
    print(f"BatchCluster, 8 workers to the DOWN partition: shown {shown:.2f} s after scale "
          f"(poll interval {POLL:g} s): {state}")
    print(f"BatchCluster, a missing interpreter: raised {raised:.2f} s after scale: "
          f"{message}")
    ok &= shown <= POLL and raised <= 2 * POLL
    for line in peer_cannot_start(bin_dir):
        print(f"dask-jobqueue, {line}")
    subprocess.run(["scancel", "--me", "--partition", PARKED], capture_output=True)
    return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["executor", "dask"]))
