"""Pictures of schedules (PNG, matplotlib): one figure compares policies on the same jobs, a
panel of processors over time for each (a Gantt chart, or the busy processors when the jobs
are too many to tell apart), the utilization and queue length of all of them, and their
summary metrics."""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from gridcouple.errors import GridcoupleError
from gridcouple.scheduler import DEFAULT_TAU
from gridcouple.scheduler.engine import Simulator
from gridcouple.scheduler.metrics import (
    busy_processors,
    queue_length,
    schedule_metrics,
    window_average,
)


class PlotError(GridcoupleError):
    """A picture cannot be written."""


def assign_processors(start: np.ndarray, end: np.ndarray, procs: np.ndarray,
                      capacity: int) -> list[list[int]]:
    """Processor numbers for each job (lowest free first), for drawing; jobs that did not run
    get none. A schedule that overfills the machine raises ValueError."""
    free = list(range(capacity))
    order = sorted((s, 1, i) for i, s in enumerate(start) if not np.isnan(s))
    events = sorted([*order, *((end[i], 0, i) for _, _, i in order)])  # ends first at a time
    chosen: list[list[int]] = [[] for _ in start]
    for _, is_start, i in events:
        if is_start:
            if len(free) < procs[i]:
                raise ValueError(f"job {i} needs {procs[i]} processors, {len(free)} are free")
            chosen[i] = [heapq.heappop(free) for _ in range(int(procs[i]))]
        else:
            for p in chosen[i]:
                heapq.heappush(free, p)
    return chosen


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Consecutive processor numbers as ``(first, count)``."""
    runs: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][0] + runs[-1][1] == n:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


GANTT_LIMIT = 2_000  # above this many jobs a panel shows occupancy, not one box per job
WINDOWS = 200  # utilization and queue length are averaged over this many windows
OCCUPANCY_WINDOWS = 1_000  # and the busy processors of the occupancy view over these


@dataclass(frozen=True)
class TimeUnit:
    """How the time axis is labelled: seconds per unit and its name."""

    seconds: float
    name: str


def time_unit(span: float) -> TimeUnit:
    """Minutes for under two hours, hours for under three days, else days."""
    if span < 2 * 3600:
        return TimeUnit(60.0, "minutes")
    if span < 3 * 86400:
        return TimeUnit(3600.0, "hours")
    return TimeUnit(86400.0, "days")


@dataclass
class _Run:
    """One policy's schedule as arrays."""

    name: str
    simulator: Simulator
    submit: np.ndarray
    procs: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @classmethod
    def of(cls, name: str, simulator: Simulator) -> _Run:
        return cls(name, simulator,
                   np.array([job.submit for job in simulator.jobs], dtype=float),
                   np.array([job.procs for job in simulator.jobs], dtype=int),
                   np.array(simulator.start, dtype=float), np.array(simulator.end, dtype=float))

    @property
    def ran(self) -> np.ndarray:
        return ~np.isnan(self.start) & ~np.isnan(self.end)

    @functools.cached_property
    def busy(self) -> tuple[np.ndarray, np.ndarray]:
        """The busy processors over time (a step function), for every panel that shows them."""
        ran = self.ran
        return busy_processors(self.start[ran], self.end[ran], self.procs[ran])


def plot_schedule(simulator: Simulator, path: str | Path, title: str = "") -> Path:
    """Draw one simulator's schedule to ``path`` (PNG); returns the path."""
    return plot_schedules([(simulator.policy.name, simulator)], path, title)


def plot_schedules(runs: Sequence[tuple[str, Simulator]], path: str | Path, title: str = "",
                   tau: float = DEFAULT_TAU, gantt_limit: int = GANTT_LIMIT) -> Path:
    """One figure comparing the schedules of several policies on the same jobs (PNG at
    ``path``; returns it): a panel per policy (a Gantt chart of processors over time, or
    above ``gantt_limit`` jobs the busy processors over time), then utilization and queue
    length of every policy averaged over windows, with a legend, then a table of each
    policy's summary metrics. Every time panel shares one axis, in minutes, hours or days."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise PlotError("plot_schedules needs at least one schedule")
    arrays = [_Run.of(name, simulator) for name, simulator in runs]
    capacity = max(run.simulator.capacity for run in arrays)
    submits = np.concatenate([run.submit for run in arrays])
    ends = np.concatenate([run.end[run.ran] for run in arrays])
    origin = float(submits.min()) if len(submits) else 0.0
    finish = float(ends.max()) if len(ends) else origin
    span = max(finish - origin, 1.0)
    unit = time_unit(span)
    edges = np.linspace(origin, origin + span, WINDOWS + 1)
    window = span / WINDOWS
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(arrays))]

    heights = [2.2] * len(arrays) + [1.8, 1.8, 0.45 * (len(arrays) + 1) + 0.3]
    figure = plt.figure(figsize=(11, sum(heights) + 0.8))
    grid = figure.add_gridspec(len(heights), 1, height_ratios=heights)
    first = figure.add_subplot(grid[0])
    panels = [first] + [figure.add_subplot(grid[i], sharex=first)
                        for i in range(1, len(arrays) + 2)]
    for panel, run, colour in zip(panels, arrays, colours, strict=False):
        if len(run.submit) > gantt_limit:
            _occupancy(panel, run, origin, origin + span, unit, colour)
            what = f"busy processors, mean over windows of {_duration(span / OCCUPANCY_WINDOWS)}"
        else:
            _gantt(panel, run, origin, unit)
            what = "a box per job"
        panel.set_ylim(0, capacity)
        panel.set_ylabel("processors")
        panel.set_title(f"{run.name}: {what}", loc="left", fontsize="medium")
        if not len(run.submit):
            panel.text(0.5, 0.5, "no jobs", transform=panel.transAxes, ha="center",
                       va="center", color="grey")
    load, queue = panels[len(arrays)], panels[len(arrays) + 1]
    middles = (edges[:-1] + edges[1:]) / 2 - origin
    for run, colour in zip(arrays, colours, strict=True):
        ran = run.ran
        times, busy = run.busy
        load.plot(middles / unit.seconds,
                  window_average(times, busy, edges) / run.simulator.capacity,
                  color=colour, label=run.name)
        times, waiting = queue_length(run.submit[ran], run.start[ran])
        queue.plot(middles / unit.seconds, window_average(times, waiting, edges),
                   color=colour, label=run.name)
    load.set_ylim(0, 1.05)
    load.set_ylabel("utilization")
    load.set_title(f"utilization, mean over windows of {_duration(window)}", loc="left",
                   fontsize="medium")
    queue.set_ylabel("waiting jobs")
    queue.set_title(f"queue length, mean over windows of {_duration(window)}", loc="left",
                    fontsize="medium")
    queue.set_xlabel(f"time since the first submission [{unit.name}]")
    first.set_xlim(0, span / unit.seconds)
    for panel in (load, queue):
        panel.legend(loc="upper right", fontsize="small")
    for panel in panels[:-1]:
        panel.tick_params(labelbottom=False)
    _metrics_table(figure.add_subplot(grid[-1]), arrays, tau, colours)
    jobs = len(arrays[0].submit)
    figure.suptitle(title or f"{jobs:,} jobs on {capacity:,} processors", fontsize="large")
    figure.tight_layout()
    path = Path(path)
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
    return path


def _gantt(panel: Any, run: _Run, origin: float, unit: TimeUnit) -> None:
    """A box per job and processor run, coloured by job."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    simulator = run.simulator
    if simulator.placement:
        chosen = [list(simulator.placement.get(i, ())) for i in range(len(run.start))]
    else:
        chosen = assign_processors(run.start, run.end, run.procs, simulator.capacity)
    boxes, colours = [], []
    cmap = plt.get_cmap("tab20")
    for i, numbers in enumerate(chosen):
        if np.isnan(run.end[i]) or not numbers:
            continue
        a, b = (run.start[i] - origin) / unit.seconds, (run.end[i] - origin) / unit.seconds
        for first, count in _runs(numbers):
            boxes.append([(a, first), (b, first), (b, first + count), (a, first + count)])
            colours.append(cmap(i % 20))
    panel.add_collection(PolyCollection(boxes, facecolors=colours, edgecolors="none"))


def _occupancy(panel: Any, run: _Run, origin: float, finish: float, unit: TimeUnit,
               colour: Any) -> None:
    """Busy processors over time, averaged over short windows and filled: what a Gantt chart
    of many jobs shows as confetti."""
    times, busy = run.busy
    edges = np.linspace(origin, finish, OCCUPANCY_WINDOWS + 1)
    panel.fill_between((edges[:-1] - origin) / unit.seconds, window_average(times, busy, edges),
                       step="post", color=colour, alpha=0.6, linewidth=0)


def _metrics_table(panel: Any, runs: Sequence[_Run], tau: float, colours: list[Any]) -> None:
    """The summary metrics of each policy, one row each."""
    panel.axis("off")
    columns = ["policy", "jobs", "mean wait", "p95 wait", f"slowdown (tau {tau:g} s)",
               "utilization", "makespan"]
    rows = []
    for run in runs:
        m = schedule_metrics(run.submit, run.start, run.end, run.procs, run.simulator.capacity,
                             tau)
        rows.append([run.name, f"{m.jobs:,}", _duration(m.mean_wait), _duration(m.p95_wait),
                     f"{m.mean_bounded_slowdown:,.2f}", f"{m.utilization:.1%}",
                     _duration(m.makespan)])
    table = panel.table(cellText=rows, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for row, colour in enumerate(colours, start=1):
        table[row, 0].get_text().set_color(colour)


def _duration(seconds: float) -> str:
    """A duration for people: ``42 s``, ``3.5 min``, ``2.1 h``, ``4.2 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
