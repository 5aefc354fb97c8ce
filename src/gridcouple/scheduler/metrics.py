"""What a schedule is worth: waits, bounded slowdown, utilization, makespan, queue length.

All functions take plain arrays (one entry per job) so they serve a simulation and a real
trace alike. Jobs that never started (NaN start) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gridcouple.scheduler import DEFAULT_TAU
from gridcouple.scheduler.engine import Simulator


@dataclass(frozen=True)
class Metrics:
    """The figures of one schedule. Times in seconds; utilization in [0, 1]."""

    jobs: int
    mean_wait: float
    median_wait: float
    p95_wait: float
    mean_bounded_slowdown: float
    utilization: float
    makespan: float
    mean_queue: float
    max_queue: int
    tau: float = DEFAULT_TAU

    def rows(self) -> list[tuple[str, str]]:
        """``(label, value)`` pairs for a table."""
        return [
            ("jobs", f"{self.jobs}"),
            ("mean wait (s)", f"{self.mean_wait:,.0f}"),
            ("median wait (s)", f"{self.median_wait:,.0f}"),
            ("p95 wait (s)", f"{self.p95_wait:,.0f}"),
            (f"mean bounded slowdown (tau={self.tau:g} s)", f"{self.mean_bounded_slowdown:,.2f}"),
            ("utilization", f"{self.utilization:.1%}"),
            ("makespan (s)", f"{self.makespan:,.0f}"),
            ("mean queue length", f"{self.mean_queue:,.1f}"),
            ("max queue length", f"{self.max_queue}"),
        ]


def bounded_slowdown(wait: np.ndarray, run: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """max(1, (wait + run) / max(run, tau)) per job: short jobs do not blow it up."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return np.maximum(1.0, (wait + run) / np.maximum(run, tau))


def step_count(up: np.ndarray, down: np.ndarray,
               weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A count over time that rises by ``weight`` at each ``up`` time and falls at ``down``:
    returns the times where it changes and its value from each of them on."""
    weight = np.ones(len(up)) if weight is None else np.asarray(weight, dtype=float)
    if len(up) == 0:  # no jobs: a count that never changes
        return np.empty(0), np.empty(0)
    times = np.concatenate([up, down])
    delta = np.concatenate([weight, -weight])
    order = np.argsort(times, kind="stable")
    times, level = times[order], np.cumsum(delta[order])
    last = np.append(times[1:] != times[:-1], True)  # the value after all changes at a time
    return times[last], level[last]


def queue_length(submit: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The number of waiting jobs over time (a step function)."""
    return step_count(submit, start)


def busy_processors(start: np.ndarray, end: np.ndarray,
                    procs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The number of busy processors over time (a step function)."""
    return step_count(start, end, procs)


def window_average(times: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The time-weighted mean of a step function (``values[k]`` from ``times[k]`` on, 0
    before the first) over each window ``[edges[i], edges[i + 1])``: a curve smoothed over
    the windows, one value per window."""
    times, values = np.asarray(times, dtype=float), np.asarray(values, dtype=float)
    edges = np.asarray(edges, dtype=float)
    if len(times) == 0:
        return np.zeros(max(len(edges) - 1, 0))
    area = np.concatenate([[0.0], np.cumsum(values[:-1] * np.diff(times))])

    def integral(x: np.ndarray) -> np.ndarray:  # of the step function up to each x
        k = np.searchsorted(times, x, side="right") - 1
        inside = k >= 0
        k = np.maximum(k, 0)
        return np.where(inside, area[k] + values[k] * (x - times[k]), 0.0)

    widths = np.diff(edges)
    return np.divide(np.diff(integral(edges)), widths, out=np.zeros(len(widths)),
                     where=widths > 0)


def time_average(times: np.ndarray, values: np.ndarray, until: float) -> float:
    """The time-weighted mean of a step function from its first time to ``until``."""
    if len(times) == 0 or until <= times[0]:
        return 0.0
    widths = np.diff(np.append(times, until))
    return float(np.dot(values, widths) / (until - times[0]))


def schedule_metrics(submit: np.ndarray, start: np.ndarray, end: np.ndarray, procs: np.ndarray,
                     capacity: int, tau: float = DEFAULT_TAU) -> Metrics:
    """The figures of a schedule of jobs on ``capacity`` processors."""
    submit, start, end, procs = (np.asarray(a, dtype=float) for a in (submit, start, end, procs))
    ran = ~np.isnan(start) & ~np.isnan(end)
    submit, start, end, procs = submit[ran], start[ran], end[ran], procs[ran]
    if not len(submit):
        return Metrics(0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0, tau)
    wait, run = start - submit, end - start
    first, last = float(submit.min()), float(end.max())
    makespan = last - first
    times, waiting = queue_length(submit, start)
    return Metrics(
        jobs=len(submit),
        mean_wait=float(wait.mean()),
        median_wait=float(np.median(wait)),
        p95_wait=float(np.percentile(wait, 95)),
        mean_bounded_slowdown=float(bounded_slowdown(wait, run, tau).mean()),
        utilization=float(np.dot(procs, run) / (capacity * makespan)) if makespan > 0 else 0.0,
        makespan=makespan,
        mean_queue=time_average(times, waiting, last),
        max_queue=int(waiting.max()),
        tau=tau,
    )


def simulator_metrics(simulator: Simulator, tau: float = DEFAULT_TAU) -> Metrics:
    """The figures of a simulator's schedule so far (jobs that started and ended)."""
    submit = np.array([job.submit for job in simulator.jobs])
    procs = np.array([job.procs for job in simulator.jobs])
    return schedule_metrics(submit, np.array(simulator.start), np.array(simulator.end), procs,
                            simulator.capacity, tau)
