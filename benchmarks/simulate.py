"""Trace replay speed, and a cross-check against AccaSim run in the same benchmark.

    .venv/bin/pip install -e '.[bench]'      # AccaSim 1.1.3 (the peer) lives in the bench extra
    GRIDCOUPLE_TRACES=../shared/traces .venv/bin/python benchmarks/simulate.py [--peer-jobs N]
        [--keep-all]   # every record of the trace, the zero-length jobs too

For KTH-SP2 and SDSC-SP2 (default replay rules, jobs let run past their estimate, as AccaSim
does) it prints the median simulation time of every policy and jobs/s, the peak memory of an
EASY run, and checks the target: EASY and FCFS on SDSC-SP2 in <= 0.4 s each (median), with the
default rules and with every record kept (all 59,715 jobs, as the issue counts them). The exit
status is 1 when the target is missed (or the cross-check below finds an unexplained
difference).

Then, for each trace, AccaSim simulates the very same jobs (written to a plain SWF file: our
procs as requested processors, our estimate as requested time, our run time) on as many
one-core nodes as the machine has processors, with its FIFO and its EASY backfilling ("EBF"),
and the schedules are compared job by job:

- FIFO against our FCFS: every start time must agree.
- EBF against our EASY: they differ, because AccaSim 1.1.3's EBF is not EASY. Its allocator is
  called with ``reserved_nodes=[]``, so the reservation protects nothing: any job that fits is
  backfilled, however long. And it computes the head's reservation once, and does not try the
  head again before that time, even when the head fits earlier (when nothing else happens,
  AccaSim's clock ticks by one second until then). :class:`AccaSimEBF` below is a policy of our
  own with exactly those rules; run in our engine through ``select`` (as any user's policy),
  with the one-second tick, it must reproduce AccaSim's schedule job for job, which accounts
  for every difference.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gridcouple.scheduler.engine import Machine, SimJob, Simulator
from gridcouple.scheduler.metrics import simulator_metrics
from gridcouple.scheduler.policies import Policy, make_policy
from gridcouple.scheduler.swf import (
    COLUMN,
    Replay,
    ReplayOptions,
    read_swf,
    replay_jobs,
    write_swf,
)

TRACES = {"KTH-SP2": "KTH-SP2-1996-2.1-cln.swf.gz", "SDSC-SP2": "SDSC-SP2-1998-4.2-cln.swf.gz"}
POLICIES = ("fcfs", "sjf", "easy", "conservative")
TARGET = 0.4  # seconds, SDSC-SP2, EASY and FCFS each
RULES = {"default rules": ReplayOptions(),
         "every record": ReplayOptions(nonpositive_runtime="keep")}  # the zero-length jobs too


class AccaSimEBF(Policy):
    """AccaSim 1.1.3's "EASY backfilling", rule for rule (see the module docstring)."""

    name = "accasim-ebf"

    def __init__(self) -> None:
        self.blocked = False
        self.reserved: float | None = None

    def select(self, now, waiting, running, capacity):
        free = capacity - sum(job.procs for job in running)
        queue = list(waiting)
        chosen = []
        reached = self.reserved is not None and self.reserved <= now
        if reached:  # only now is the blocked head tried again
            head = queue.pop(0)
            if head.procs <= free:
                chosen.append(head)
                free -= head.procs
                self.blocked, self.reserved = False, None
        if not self.blocked and queue:
            fifo = 0
            while fifo < len(queue) and queue[fifo].procs <= free:
                chosen.append(queue[fifo])
                free -= queue[fifo].procs
                fifo += 1
            backfill = queue[fifo + 1:]
            if fifo < len(queue):
                self.blocked = True
                if self.reserved is None:
                    self.reserved = self._slot(now, queue[fifo].procs, free, running, chosen)
        else:
            backfill = queue if reached else queue[1:]
        for job in backfill:  # reserved_nodes=[]: nothing is protected
            if job.procs <= free:
                chosen.append(job)
                free -= job.procs
        return chosen

    def idle(self, now: float) -> float:
        """With nothing to do, AccaSim's clock ticks by one second; nothing changes before
        the blocked head's reservation, so the first tick that matters is at it."""
        return max(now + 1, self.reserved or 0)

    @staticmethod
    def _slot(now, need, free, running, chosen) -> float:
        ends = sorted([(job.start_time + job.estimate, job.procs) for job in running]
                      + [(now + job.estimate, job.procs) for job in chosen])
        for end, procs in ends:
            free += procs
            if free >= need:
                return end
        raise RuntimeError("AccaSim: can't find the slot")


def run(replay: Replay, policy: Policy,
        idle: Callable[[float], float] | None = None) -> tuple[Simulator, float]:
    """One simulation; returns it and its wall time (adding the jobs included). ``idle(now)``
    says when a clock with nothing to do next asks the policy again."""
    began = time.perf_counter()
    simulator = Simulator(Machine.processors(replay.procs), policy)
    simulator.add(replay.jobs)
    simulator.run()
    while idle and simulator.stranded():
        simulator.wake(idle(simulator.now))
        simulator.run()
    return simulator, time.perf_counter() - began


def measure(replay: Replay, name: str, repeats: int) -> tuple[Simulator, float]:
    """The median time of ``repeats`` runs of a built-in policy, and the last run."""
    times = []
    for _ in range(repeats):
        simulator, seconds = run(replay, make_policy(name))
        times.append(seconds)
    return simulator, statistics.median(times)


def peak_memory(replay: Replay, name: str) -> float:
    """Peak Python heap (MiB) while simulating (tracemalloc; the jobs themselves excluded)."""
    tracemalloc.start()
    run(replay, make_policy(name))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def accasim(replay: Replay, jobs: list[SimJob], policy: str, folder: Path) -> tuple[dict, float]:
    """AccaSim's start time per job number, and its simulation wall time."""
    collections.Mapping = collections.abc.Mapping  # AccaSim 1.1.3 predates Python 3.10
    from accasim.base.allocator_class import FirstFit
    from accasim.base.scheduler_class import EASYBackfilling, FirstInFirstOut
    from accasim.base.simulator_class import Simulator as AccaSimulator

    rows = np.full((len(jobs), 18), -1.0)
    for number, job in enumerate(jobs):
        rows[number, [COLUMN[c] for c in ("job_number", "submit_time", "run_time",
                                          "requested_procs", "requested_time", "status",
                                          "user_id", "queue")]] = (
            number + 1, job.submit, job.work, job.procs, job.estimate, 1, 1, 1)
    workload, system = folder / "jobs.swf", folder / "system.json"
    write_swf(workload, rows)
    system.write_text(json.dumps({"groups": {"node": {"core": 1}},
                                  "resources": {"node": replay.procs},
                                  "equivalence": {"processor": {"core": 1}}, "start_time": 0}))
    schedule = {"format": "{job_id};{start_time}",
                "attributes": {"job_id": ("id", "str"), "start_time": ("start_time", "int")}}
    allocator = FirstFit()
    dispatcher = FirstInFirstOut(allocator) if policy == "FIFO" else EASYBackfilling(allocator)
    simulator = AccaSimulator(str(workload), str(system), dispatcher,
                              RESULTS_FOLDER_PATH=str(folder), SCHEDULE_OUTPUT=schedule,
                              show_statistics=False, statistics_output=False)
    began = time.perf_counter()
    simulator.start_simulation()
    seconds = time.perf_counter() - began
    starts = {}
    for line in (folder / "sched-jobs.swf").read_text().splitlines():
        number, start = line.split(";")
        starts[int(number) - 1] = float(start)
    return starts, seconds


def differences(ours: list[float], theirs: dict[int, float]) -> tuple[int, float]:
    """How many jobs start at another time (or are missing from ``theirs``), and the largest
    gap between two start times."""
    missing = sum(1 for n in range(len(ours)) if n not in theirs)
    gaps = [abs(ours[n] - theirs[n]) for n in range(len(ours)) if n in theirs]
    differing = [gap for gap in gaps if gap != 0]
    return len(differing) + missing, max(differing, default=0.0)


def meets_target(rules: str, replay: Replay, seconds: dict[str, float]) -> bool:
    """Print whether EASY and FCFS each took at most TARGET seconds (median) on SDSC-SP2."""
    met = all(seconds[name] <= TARGET for name in ("easy", "fcfs"))
    print(f"target EASY and FCFS on SDSC-SP2, {rules} ({len(replay.jobs):,} jobs), <= {TARGET} s:"
          f" {'met' if met else 'NOT met'} (easy {seconds['easy']:.3f} s, "
          f"fcfs {seconds['fcfs']:.3f} s)")
    return met


def cross_check(label: str, replay: Replay, peer_jobs: int, repeats: int) -> bool:
    """AccaSim's FIFO and EBF against our FCFS and EASY on one trace (the first ``peer_jobs``
    jobs; 0: all); True when every difference is explained."""
    jobs = replay.jobs[:peer_jobs] if peer_jobs else replay.jobs
    peer = Replay(replay.trace, jobs, replay.procs, {})
    agree = True
    for ours_name, theirs_name in (("easy", "EBF"), ("fcfs", "FIFO")):
        simulator, seconds = measure(peer, ours_name, repeats)
        with tempfile.TemporaryDirectory() as scratch:
            starts, peer_seconds = accasim(peer, jobs, theirs_name, Path(scratch))
        count, gap = differences(simulator.start, starts)
        ours_wait = statistics.fmean(s - j.submit for s, j in zip(simulator.start, jobs,
                                                                   strict=True))
        theirs_wait = statistics.fmean(starts[n] - j.submit for n, j in enumerate(jobs)
                                       if n in starts)
        print(f"AccaSim {theirs_name:4} on {len(jobs):,} {label} jobs: {peer_seconds:.1f} s; "
              f"ours ({ours_name}) {seconds:.3f} s: {peer_seconds / seconds:,.0f}x faster; "
              f"{count:,} jobs start at another time (largest gap {gap:,.0f} s); mean wait "
              f"{theirs_wait:,.0f} s there, {ours_wait:,.0f} s here")
        if theirs_name == "EBF":
            compat_policy = AccaSimEBF()
            compat, compat_seconds = run(peer, compat_policy, compat_policy.idle)
            left, left_gap = differences(compat.start, starts)
            print(f"  our engine with AccaSim's EBF rules (a select() policy, "
                  f"{compat_seconds:.2f} s): {left:,} jobs differ (largest gap {left_gap:,.0f} s)")
            agree &= left == 0
        else:
            agree &= count == 0
    return agree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default=os.environ.get("GRIDCOUPLE_TRACES",
                                                           "../shared/traces"))
    parser.add_argument("--repeats", type=int, default=5, help="runs per fast policy")
    parser.add_argument("--peer-jobs", type=int, default=0,
                        help="give AccaSim only the first N jobs of each trace (0: all; FIFO "
                        "takes minutes)")
    parser.add_argument("--no-peer", action="store_true", help="skip AccaSim")
    parser.add_argument("--keep-all", action="store_true",
                        help="replay every record: keep the jobs with run time <= 0 too "
                        "(zero-length jobs; SDSC-SP2: all 59,715)")
    args = parser.parse_args()
    rules = "every record" if args.keep_all else "default rules"
    options = RULES[rules]
    folder = Path(args.traces)
    replays = {}
    print(f"{'trace':9} {'policy':13} {'jobs':>7} {'median s':>9} {'jobs/s':>9} "
          f"{'mean wait s':>12} {'utilization':>11}")
    medians: dict[tuple[str, str], float] = {}
    for label, file in TRACES.items():
        began = time.perf_counter()
        replay = replays[label] = replay_jobs(read_swf(folder / file), options=options)
        print(f"{label:9} {'(read+replay)':13} {len(replay.jobs):>7} "
              f"{time.perf_counter() - began:>9.3f}")
        for name in POLICIES:
            repeats = 1 if name == "conservative" else args.repeats
            simulator, seconds = measure(replay, name, repeats)
            medians[label, name] = seconds
            metrics = simulator_metrics(simulator)
            print(f"{label:9} {name:13} {len(replay.jobs):>7} {seconds:>9.3f} "
                  f"{len(replay.jobs) / seconds:>9,.0f} {metrics.mean_wait:>12,.0f} "
                  f"{metrics.utilization:>11.1%}")
    sdsc = replays["SDSC-SP2"]
    print(f"peak memory, EASY on SDSC-SP2: {peak_memory(sdsc, 'easy'):.1f} MiB traced heap; "
          f"process max RSS so far {_max_rss_mib():.0f} MiB")
    met = True
    for name, rule_options in RULES.items():  # the other rules' replay is measured here
        if name == rules:
            replay, seconds = sdsc, {p: medians["SDSC-SP2", p] for p in ("easy", "fcfs")}
        else:
            replay = replay_jobs(read_swf(folder / TRACES["SDSC-SP2"]), options=rule_options)
            seconds = {p: measure(replay, p, args.repeats)[1] for p in ("easy", "fcfs")}
        met &= meets_target(name, replay, seconds)
    agree = True
    if not args.no_peer:
        for label, replay in replays.items():
            agree &= cross_check(label, replay, args.peer_jobs, args.repeats)
        print("cross-check:", "every difference explained" if agree else
              "UNEXPLAINED differences")
    return 0 if met and agree else 1


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
