"""1,000 trivial jobs through the local backend with a slot limit of 2, against a plain
``subprocess.Popen`` loop doing the same work (2 at a time) in the same run.

Prints medians over several rounds and the ratios.
Run: ``.venv/bin/python benchmarks/local_submit.py``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.jobs import JobSpec, JobState


def popen_loop(jobs: int, slots: int, output_dir: Path | None = None) -> float:
    """The peer: start ``true`` jobs keeping ``slots`` running; with ``output_dir``, each job
    gets its own directory with stdout and stderr files, as batch jobs do. Returns seconds."""
    started = time.perf_counter()
    running: dict[int, subprocess.Popen[bytes]] = {}
    launched = 0
    while launched < jobs or running:
        while launched < jobs and len(running) < slots:
            if output_dir is None:
                process = subprocess.Popen(["true"], start_new_session=True)
            else:
                home = output_dir / str(launched)
                home.mkdir()
                with open(home / "stdout", "ab") as out, open(home / "stderr", "ab") as err:
                    process = subprocess.Popen(["true"], start_new_session=True, cwd=home,
                                               stdout=out, stderr=err)
            running[process.pid] = process
            launched += 1
        pid, wait_status = os.wait()
        process = running.pop(pid)
        process.returncode = os.waitstatus_to_exitcode(wait_status)
        assert process.returncode == 0, f"peer job {pid} exited {process.returncode}"
    return time.perf_counter() - started


def through_backend(jobs: int, slots: int) -> tuple[float, float]:
    """Submit ``jobs`` trivial jobs and wait for them; returns (submit s, end-to-end s)."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(LocalOptions(slots=slots, idle_exit=2), state_dir=Path(tmp))
        backend.wake_daemon()  # a daemon already running, as in steady use
        try:
            started = time.perf_counter()
            handles = backend.submit([JobSpec(argv=("true",), name=f"b{i}")
                                      for i in range(jobs)])
            submitted = time.perf_counter() - started
            statuses = backend.wait(handles)
            total = time.perf_counter() - started
            assert all(s.state is JobState.COMPLETED for s in statuses)
        finally:
            backend.stop_daemon()
            backend.close()
    return submitted, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    peer, peer_files, submit, total = [], [], [], []
    for _ in range(args.rounds):
        peer.append(popen_loop(args.jobs, args.slots))
        with tempfile.TemporaryDirectory() as tmp:
            peer_files.append(popen_loop(args.jobs, args.slots, Path(tmp)))
        s, t = through_backend(args.jobs, args.slots)
        submit.append(s)
        total.append(t)
    p, pf, s, t = (statistics.median(v) for v in (peer, peer_files, submit, total))
    print(f"{args.jobs} trivial jobs, slot limit {args.slots}, median of {args.rounds} rounds")
    print(f"  local backend submit:      {s * 1000:8.1f} ms  ({args.jobs / s:,.0f} jobs/s)")
    print(f"  local backend end-to-end:  {t:8.2f} s   ({args.jobs / t:,.0f} jobs/s)")
    print(f"  Popen loop (peer):         {p:8.2f} s   ({args.jobs / p:,.0f} jobs/s)")
    print(f"  Popen loop + output files: {pf:8.2f} s   ({args.jobs / pf:,.0f} jobs/s)")
    print(f"  ratio end-to-end backend / bare Popen:         {t / p:.2f}x")
    print(f"  ratio end-to-end backend / Popen with outputs: {t / pf:.2f}x")


if __name__ == "__main__":
    main()
