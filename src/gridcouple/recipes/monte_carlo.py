"""``monte-carlo``: PyMW's Monte Carlo pi through :class:`gridcouple.Executor`.

Each task throws darts at the unit square with its own seed and counts those inside the
quarter circle; pi is 4 x inside / thrown. The tasks go to the configured backend as ONE
submission (``map_array``) and a progress bar follows them as their results come back, with
the running estimate. On a simulated backend (``simgrid``) nothing runs: each task costs
``DARTS`` microseconds on a speed-1 worker and the recipe prints the predicted schedule and
makespan instead.
"""

from __future__ import annotations

import concurrent.futures
import math
import random
from typing import cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridcouple.config import Config
from gridcouple.errors import GridcoupleError
from gridcouple.executor import Executor, PredictedCall, TaskFuture

TASKS = 16
DARTS = 200_000
SECONDS_PER_DART = 1e-6  # the cost model of a simulated backend (speed-1 worker)


def throw_darts(seed: int, darts: int) -> int:
    """How many of ``darts`` random points of the unit square fall inside the quarter circle."""
    rng = random.Random(seed)
    inside = 0
    for _ in range(darts):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


def cost(seed: int, darts: int) -> float:
    """Seconds a task takes on a speed-1 worker, for a simulated backend."""
    return darts * SECONDS_PER_DART


def main(config: Config, console: Console) -> None:
    """Throw the darts as ``TASKS`` jobs, follow them with a progress bar, print pi."""
    with Executor(config=config, cost=cost) as executor:
        seeds = range(1, TASKS + 1)
        futures = executor.map_array(throw_darts, seeds, [DARTS] * TASKS)
        first, last = futures[0].job, futures[-1].job
        assert first is not None and last is not None
        console.print(f"Submitted {TASKS} tasks of {DARTS:,} darts to the "
                      f"{executor.backend.name} backend in {executor.submissions} submission "
                      f"(jobs {first.id}..{last.id})")
        if executor.predicting:
            _print_prediction(console, executor, futures)
            return
        progress = Progress(TextColumn("[bold]monte carlo pi"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                            TimeElapsedColumn(), console=console)
        bar = progress.add_task("pi", total=TASKS, detail="")
        inside = thrown = 0
        failures: list[str] = []
        with progress:
            for done in concurrent.futures.as_completed(futures):
                future = cast(TaskFuture, done)
                try:
                    inside += future.result()
                    thrown += DARTS
                except Exception as exc:
                    failures.append(f"{future.label}: {exc}")
                estimate = f"pi ~ {4 * inside / thrown:.5f}" if thrown else ""
                progress.update(bar, advance=1, detail=estimate)
        if failures:
            raise GridcoupleError(f"{len(failures)} of {TASKS} tasks failed; the first: "
                                  f"{failures[0]}")
        pi = 4 * inside / thrown
        console.print(f"pi ~ {pi:.5f} from {thrown:,} darts in {TASKS} jobs "
                      f"(error {abs(pi - math.pi):.1e})")


def _print_prediction(console: Console, executor: Executor, futures: list[TaskFuture]) -> None:
    """A simulated backend ran nothing: the schedule it predicts."""
    table = Table(title=f"Monte Carlo pi, predicted by the {executor.backend.name} backend "
                        "(nothing ran)")
    for column in ("task", "worker", "start (s)", "end (s)"):
        table.add_column(column, justify="right")
    for future in futures:
        predicted: PredictedCall = future.result()
        table.add_row(future.label, predicted.worker, f"{predicted.start:.2f}",
                      f"{predicted.end:.2f}")
    console.print(table)
    console.print(f"predicted makespan: {executor.makespan:.2f} s (simulated)")
