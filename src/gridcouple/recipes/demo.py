"""``demo``: a parameter sweep of real processes through the configured backend.

Each job solves the 1-D heat equation u_t = alpha u_xx on [0, 1] with u(x, 0) = sin(pi x) and
u = 0 at both ends, by explicit finite differences to t = 0.1, for one diffusivity alpha, and
prints u(0.5) beside the exact value exp(-alpha pi^2 t). The sweep shows a live progress display
while the backend's queue runs the jobs, then a summary table.
"""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridcouple.backends import open_backend
from gridcouple.config import Config
from gridcouple.errors import GridcoupleError
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus

ALPHAS = [round(0.1 * k, 1) for k in range(1, 13)]
END_TIME = 0.1
POINTS = 161


def solve(alpha: float, points: int = POINTS, end_time: float = END_TIME) -> dict[str, float]:
    """Explicit finite differences (dt at 0.4 of the stability limit); u(0.5) and the exact."""
    dx = 1.0 / (points - 1)
    steps = math.ceil(end_time / (0.4 * dx * dx / alpha))
    dt = end_time / steps
    ratio = alpha * dt / (dx * dx)
    u = [math.sin(math.pi * i * dx) for i in range(points)]
    for _ in range(steps):
        u = [0.0, *(u[i] + ratio * (u[i - 1] - 2 * u[i] + u[i + 1])
                    for i in range(1, points - 1)), 0.0]
    exact = math.exp(-alpha * math.pi**2 * end_time)
    middle = u[points // 2]
    return {"alpha": alpha, "steps": steps, "u_mid": middle, "exact": exact,
            "rel_error": abs(middle - exact) / exact}


def main(config: Config, console: Console) -> None:
    """Submit the sweep, watch it live, print the summary table."""
    backend = open_backend(config)
    try:
        specs = [JobSpec(argv=(sys.executable, "-m", "gridcouple.recipes.demo", str(alpha)),
                         name=f"heat-alpha-{alpha}", estimate=2.0 * alpha)
                 for alpha in ALPHAS]
        jobs = backend.submit(specs)
        console.print(f"Submitted {len(jobs)} jobs to the {backend.name} backend "
                      f"(jobs {jobs[0].id}..{jobs[-1].id})")
        progress = Progress(TextColumn("[bold]heat sweep"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                            console=console)
        task = progress.add_task("sweep", total=len(jobs), detail="")
        states = {job.id: JobState.NEW for job in jobs}
        with Live(progress, console=console, refresh_per_second=8):
            for event in backend.events(jobs):
                states[event.job.id] = event.status.state
                counts = {s: sum(1 for v in states.values() if v is s) for s in JobState}
                progress.update(task, completed=sum(1 for v in states.values() if v.is_final),
                                detail=f"{counts[JobState.QUEUED]} queued, "
                                       f"{counts[JobState.ACTIVE]} running")
        console.print()
        statuses = backend.status(jobs)
        if not backend.hosts_applications:
            _print_prediction(console, backend.name, jobs, statuses)
            return
        table = Table(title="Heat equation sweep: u(0.5, t=0.1)")
        for column in ("job", "alpha", "state", "run time", "u(0.5)", "exact", "rel. error"):
            table.add_column(column, justify="right")
        failed = 0
        for job, status in zip(jobs, statuses, strict=True):
            elapsed = (f"{status.end_time - status.start_time:.2f} s"
                       if status.start_time and status.end_time is not None else "")
            if status.state is JobState.COMPLETED:
                result = json.loads(backend.read_output(job))
                table.add_row(str(job.id), f"{result['alpha']:.1f}", "COMPLETED", elapsed,
                              f"{result['u_mid']:.6f}", f"{result['exact']:.6f}",
                              f"{result['rel_error']:.1e}")
            else:
                failed += 1
                table.add_row(str(job.id), job.spec.argv[-1], status.describe(), elapsed,
                              "", "", "")
        console.print(table)
        if failed:
            raise GridcoupleError(f"{failed} of {len(jobs)} sweep jobs did not complete; see "
                                  f"`gridcouple logs ID --stderr`")
    finally:
        backend.close()


def _print_prediction(console: Console, name: str, jobs: list[Job],
                      statuses: list[JobStatus]) -> None:
    """A simulated backend ran nothing: show the schedule it predicts instead of results."""
    table = Table(title=f"Heat equation sweep, predicted by the {name} backend (nothing ran)")
    for column in ("job", "alpha", "state", "start (s)", "end (s)"):
        table.add_column(column, justify="right")
    for job, status in zip(jobs, statuses, strict=True):
        table.add_row(str(job.id), job.spec.argv[-1], str(status.state),
                      f"{status.start_time or 0:.1f}", f"{status.end_time or 0:.1f}")
    console.print(table)
    ends = [s.end_time for s in statuses if s.end_time is not None]
    console.print(f"predicted makespan: {max(ends, default=0):.1f} s (simulated)")


if __name__ == "__main__":
    print(json.dumps(solve(float(sys.argv[1]))))
