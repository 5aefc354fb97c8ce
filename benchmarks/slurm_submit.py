"""Submitting and polling 1,000 Slurm jobs: the gridcouple backend against its peer, in one run.

Needs the real cluster of scripts/slurm-up. Jobs go to its DOWN partition "parked", so they stay
pending and the machine only measures submission and queries; every job is canceled at the end.

- submit: ``SlurmBackend.submit`` of 1,000 specs (journal, job scripts, one array) against
  1,000 one-by-one ``sbatch script`` calls (dask-jobqueue's way). Target: <= 0.5 s, >= 10x.
- status: ``SlurmBackend.status`` of the 1,000 jobs (one ``squeue -O`` per poll; between polls
  the status watcher answers from the journal, timed too) against one
  ``squeue -j ID`` per job (the loop the squeue man page warns against); one
  ``squeue --json`` call is timed beside it (why the backend reads ``-O`` text).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
from gridcouple.jobs import JobSpec

JOBS = 1000
ROUNDS = 5
PARKED = {"slurm.partition": "parked"}


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def sbatch_one_by_one(directory: Path) -> tuple[float, list[float], list[str]]:
    """The peer: one script file and one sbatch call per job."""
    ids, per_call = [], []
    start = time.perf_counter()
    for index in range(JOBS):
        script = directory / f"job{index}.sh"
        script.write_text(f"#!/bin/bash\n#SBATCH --job-name=peer{index}\n"
                          f"#SBATCH --partition=parked\n#SBATCH --output={directory}/%j.out\n"
                          f"echo {index}\n")
        call = time.perf_counter()
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                             text=True, check=True).stdout
        per_call.append(time.perf_counter() - call)
        ids.append(out.strip().split(";")[0])
    return time.perf_counter() - start, per_call, ids


def squeue_per_job(native_ids: list[str]) -> float:
    """The peer's poll: one squeue call per job."""
    start = time.perf_counter()
    for native in native_ids:
        subprocess.run(["squeue", "-h", "-j", native, "-o", "%T|%r"], capture_output=True,
                       text=True)
    return time.perf_counter() - start


def polled_status(backend: SlurmBackend, jobs: list) -> list:
    """``status`` with a native query: the watcher answers from the journal between polls, so
    it is told that the queue may have changed."""
    backend.watcher.expect_change()
    return backend.status(jobs)


def squeue_json_poll() -> float:
    """The other one-call poll: ``squeue --json`` (the backend uses ``squeue -O``)."""
    start = time.perf_counter()
    subprocess.run(["squeue", "--json", "--me"], capture_output=True, text=True, check=True)
    return time.perf_counter() - start


def main() -> int:
    if shutil.which("sbatch") is None:
        print("slurm_submit: skipped, sbatch is not on PATH (start scripts/slurm-up as root)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        backend = SlurmBackend(SlurmOptions(), state_dir=root / "state")
        specs = [JobSpec(argv=("echo", str(i)), name="bench", attributes=PARKED)
                 for i in range(JOBS)]
        submits, batches = [], []
        try:
            for _ in range(ROUNDS):
                seconds, jobs = timed(lambda: backend.submit(specs))
                submits.append(seconds)
                batches.append(jobs)
            (root / "peer").mkdir()
            peer_total, peer_calls, peer_ids = sbatch_one_by_one(root / "peer")
            jobs = batches[-1]
            first_poll, _ = timed(lambda: backend.status(jobs))
            polls = [timed(lambda: polled_status(backend, jobs))[0] for _ in range(ROUNDS)]
            cached = [timed(lambda: backend.status(jobs))[0] for _ in range(ROUNDS)]
            json_polls = [squeue_json_poll() for _ in range(ROUNDS)]
            peer_poll = squeue_per_job([j.native_id for j in jobs])
        finally:
            for jobs in batches:
                backend.cancel(jobs)
            if "peer_ids" in locals():
                subprocess.run(["scancel", *peer_ids], capture_output=True)
            backend.close()
    submit = statistics.median(submits)
    poll = statistics.median(polls)
    print(f"submit {JOBS} jobs, gridcouple (one array): median {submit:.3f} s over {ROUNDS} "
          f"rounds (min {min(submits):.3f}, max {max(submits):.3f}); target <= 0.5 s")
    print(f"submit {JOBS} jobs, one sbatch per job:    {peer_total:.2f} s "
          f"(median call {statistics.median(peer_calls) * 1000:.1f} ms)")
    print(f"  ratio: {peer_total / submit:.1f}x faster (target >= 10x)")
    print(f"status of {JOBS} jobs, gridcouple (one squeue per poll): median {poll * 1000:.0f} ms"
          f" per poll over {ROUNDS} polls (first poll, storing {JOBS} changes: "
          f"{first_poll * 1000:.0f} ms)")
    print(f"status of {JOBS} jobs between two polls (the watcher answers from the journal): "
          f"median {statistics.median(cached) * 1000:.0f} ms")
    json_poll = statistics.median(json_polls)
    print(f"one 'squeue --json' call on the same queue: median {json_poll * 1000:.0f} ms "
          f"({json_poll / poll:.1f}x the backend's whole poll)")
    print(f"status of {JOBS} jobs, one squeue per job: {peer_poll:.2f} s per poll")
    print(f"  ratio: {peer_poll / poll:.1f}x faster")
    return 0 if submit <= 0.5 and peer_total / submit >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
