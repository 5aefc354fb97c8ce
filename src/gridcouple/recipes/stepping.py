"""Time stepping shared by the coupled recipes: steps of the smallest critical time step,
landing exactly on the target time, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gridcouple.appkit.data import TimeStep


def time_steps(critical_time_step: Callable[[], float], target_time: float,
               start_time: float = 0.0) -> Iterator[TimeStep]:
    """Steps of ``critical_time_step()`` (asked before each step) until ``target_time``; the
    last step is shortened, or a step within rounding of the target stretched, to end there
    exactly."""
    time, number = start_time, 0
    while time < target_time:
        dt = critical_time_step()
        if not dt > 0:
            raise ValueError(f"the critical time step must be positive, got {dt}")
        end = time + dt
        if end >= target_time - 1e-9 * dt:  # 0.1 ten times is 0.9999999999999999
            end = target_time
        number += 1
        yield TimeStep(end, end - time, number, target_time)
        time = end


@contextmanager
def step_progress(console: Console, description: str,
                  target_time: float) -> Iterator[Callable[[TimeStep], None]]:
    """A progress bar over simulated time; yields ``advance(tstep)``."""
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("t = {task.completed:.3g} / {task.total:.3g}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=target_time)
        yield lambda tstep: progress.update(task, completed=tstep.time)
