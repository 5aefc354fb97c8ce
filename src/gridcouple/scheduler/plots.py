"""Pictures of a schedule (PNG, matplotlib): a Gantt chart of processors over time, and the
utilization and queue length over time below it."""

from __future__ import annotations

import heapq
from pathlib import Path

import matplotlib
import numpy as np

from gridcouple.errors import GridcoupleError
from gridcouple.scheduler.engine import Simulator
from gridcouple.scheduler.metrics import busy_processors, queue_length


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


def plot_schedule(simulator: Simulator, path: str | Path, title: str = "") -> Path:
    """Draw the simulator's schedule to ``path`` (PNG); returns the path."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    submit = np.array([job.submit for job in simulator.jobs], dtype=float)
    procs = np.array([job.procs for job in simulator.jobs])
    start, end = np.array(simulator.start, dtype=float), np.array(simulator.end, dtype=float)
    if simulator.placement:
        chosen = [list(simulator.placement.get(i, ())) for i in range(len(start))]
    else:
        chosen = assign_processors(start, end, procs, simulator.capacity)
    origin = float(np.nanmin(submit)) if len(submit) else 0.0
    boxes, colours = [], []
    cmap = plt.get_cmap("tab20")
    for i, numbers in enumerate(chosen):
        if np.isnan(end[i]) or not numbers:
            continue
        a, b = start[i] - origin, end[i] - origin
        for first, count in _runs(numbers):
            boxes.append([(a, first), (b, first), (b, first + count), (a, first + count)])
            colours.append(cmap(i % 20))
    figure, (gantt, load) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1]})
    gantt.add_collection(PolyCollection(boxes, facecolors=colours, edgecolors="none"))
    gantt.set_ylim(0, simulator.capacity)
    gantt.set_xlim(0, max(float(np.nanmax(end)) - origin, 1.0) if len(end) else 1.0)
    gantt.set_ylabel("processor")
    gantt.set_title(title or f"schedule of {len(start)} jobs on {simulator.capacity} processors")
    ran = ~np.isnan(start)
    times, busy = busy_processors(start[ran], end[ran], procs[ran])
    load.step(times - origin, busy / simulator.capacity, where="post", color="tab:blue")
    load.set_ylabel("utilization", color="tab:blue")
    load.set_ylim(0, 1.05)
    queue_axis = load.twinx()
    times, waiting = queue_length(submit[ran], start[ran])
    queue_axis.step(times - origin, waiting, where="post", color="tab:orange")
    queue_axis.set_ylabel("waiting jobs", color="tab:orange")
    load.set_xlabel("time since the first submission [s]")
    figure.tight_layout()
    path = Path(path)
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
    return path
