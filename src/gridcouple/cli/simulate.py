"""``gridcouple simulate TRACE``: replay an SWF trace under one or more policies and compare.

Traces and metrics need numpy, pictures matplotlib (the ``simulate`` extra): they are imported
when the command runs, so every other command works without them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridcouple.cli import app
from gridcouple.errors import ConfigError
from gridcouple.scheduler import DEFAULT_TAU
from gridcouple.scheduler.engine import Machine, SimulationError, Simulator
from gridcouple.scheduler.policies import Policy, make_policy

console = Console()
progress_console = Console(stderr=True)
PROGRESS_STEPS = 50  # the simulated time of a policy's run is shown in this many steps


def per_policy(path: Path, policy: str, several: bool) -> Path:
    """``sched.swf`` for one policy, ``sched-easy.swf`` when there are several."""
    if not several:
        return path
    suffixes = "".join(path.suffixes)
    stem = path.name[: -len(suffixes)] if suffixes else path.name
    safe = policy.replace(":", "-").replace(".", "-")
    return path.with_name(f"{stem}-{safe}{suffixes}")


@app.command()
def simulate(
    trace: Annotated[Path, typer.Argument(help="An SWF trace (plain or .gz).")],
    policy: Annotated[list[str], typer.Option(
        "--policy", "-p", help="fcfs, sjf, easy, conservative or package.module:Class; "
        "repeat to compare side by side.")] = ["easy"],  # noqa: B006  (typer needs a list)
    procs: Annotated[int | None, typer.Option(
        help="Machine size (default: the trace's MaxProcs).", show_default=False)] = None,
    tau: Annotated[float, typer.Option(
        help="Bounded slowdown threshold in seconds.")] = DEFAULT_TAU,
    out: Annotated[Path | None, typer.Option(
        help="Write the simulated schedule as SWF (NAME-POLICY.swf for several).",
        show_default=False)] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Draw one PNG comparing the policies: processors over time for each, "
        "utilization and queue length, and their metrics.", show_default=False)] = None,
    kill_at_estimate: Annotated[bool, typer.Option(
        "--kill-at-estimate/--let-run",
        help="Kill a job at its requested time, or let it run as the trace records.")] = False,
    procs_from: Annotated[str, typer.Option(
        help="Job width: 'requested' (else allocated) or 'allocated' (else requested).")
    ] = "requested",
    estimate: Annotated[str, typer.Option(
        help="Estimate: 'requested' time (else run time) or 'runtime' (exact).")] = "requested",
    nonpositive_runtime: Annotated[str, typer.Option(
        help="Jobs with run time <= 0: 'drop' or 'keep' (as zero-length).")] = "drop",
    cancelled: Annotated[str, typer.Option(
        help="Cancelled jobs (status 5) that ran: 'keep' or 'drop'.")] = "keep",
    too_wide: Annotated[str, typer.Option(
        help="Jobs wider than the machine: 'drop', 'clip' or 'error'.")] = "drop",
) -> None:
    """Replay a workload trace in simulated time and print its metrics per policy."""
    try:
        from gridcouple.scheduler.metrics import simulator_metrics
        from gridcouple.scheduler.swf import (
            ReplayOptions,
            read_swf,
            replay_jobs,
            schedule_records,
            write_swf,
        )

        if plot:
            from gridcouple.scheduler.plots import plot_schedules
    except ImportError as exc:
        raise ConfigError(f"gridcouple simulate cannot run: {exc} (install "
                          "gridcouple[simulate])") from None
    options = ReplayOptions(
        procs=_choice("--procs-from", procs_from, ("requested", "allocated")),
        estimate=_choice("--estimate", estimate, ("requested", "runtime")),
        nonpositive_runtime=_choice("--nonpositive-runtime", nonpositive_runtime,
                                    ("drop", "keep")),
        cancelled=_choice("--cancelled", cancelled, ("keep", "drop")),
        too_wide=_choice("--too-wide", too_wide, ("drop", "clip", "error")),
    )
    if procs is not None and procs < 1:
        raise ConfigError(f"--procs must be at least 1, got {procs}")
    if tau <= 0:
        raise ConfigError(f"--tau must be positive, got {tau}")
    for option, path in (("--out", out), ("--plot", plot)):
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"{option} {path}: the folder {path.parent} does not exist")
    policies = [(name, make_policy(name)) for name in policy]  # a bad name before any run
    replay = replay_jobs(read_swf(trace), procs, options)
    report = Table(title=f"{trace.name}: replay rules", show_header=False)
    for rule, count in replay.counts.items():
        report.add_row(rule, f"{count:,}")
    console.print(report)
    table = Table(title=f"{len(replay.jobs):,} jobs on {replay.procs} processors, "
                  f"{'killed' if kill_at_estimate else 'let run'} past their estimate")
    table.add_column("metric")
    columns: list[list[str]] = []
    several = len(policy) > 1
    labels: list[str] = []
    runs: list[tuple[str, Simulator]] = []
    for number, (name, chosen) in enumerate(policies, start=1):
        began = time.perf_counter()
        simulator = _run_policy(replay.jobs, chosen, replay.procs, kill_at_estimate,
                                f"policy {name} ({number}/{len(policies)})")
        seconds = max(time.perf_counter() - began, 1e-9)
        console.print(f"{name}: {len(replay.jobs):,} jobs simulated in {seconds:.2f} s",
                      markup=False, highlight=False)
        runs.append((name, simulator))
        metrics = simulator_metrics(simulator, tau)
        table.add_column(name, justify="right")
        columns.append([value for _, value in metrics.rows()] +
                       [f"{seconds:.2f}", f"{len(replay.jobs) / seconds:,.0f}"])
        labels = [label for label, _ in metrics.rows()] + ["simulation time (s)", "jobs/s"]
        if out:
            header = [("Version", "2.2"), ("Computer", f"gridcouple simulation, policy {name}"),
                      ("MaxProcs", str(replay.procs)), ("MaxJobs", str(len(replay.jobs))),
                      ("MaxRecords", str(len(replay.jobs))),
                      ("Note", f"replay of {trace.name}")]
            records = schedule_records(replay, simulator) if replay.jobs \
                else replay.trace.records[:0]
            target = per_policy(out, name, several)
            write_swf(target, records, header)
            console.print(f"wrote {target}", markup=False, highlight=False)
    if plot:
        with _drawing(plot):
            plot_schedules(runs, plot, f"{trace.name}: {len(replay.jobs):,} jobs on "
                           f"{replay.procs:,} processors", tau)
        console.print(f"wrote {plot}", markup=False, highlight=False)
    for index, label in enumerate(labels):
        table.add_row(label, *(column[index] for column in columns))
    console.print(table)


@contextlib.contextmanager
def _drawing(path: Path) -> Iterator[None]:
    """A spinner on stderr while the picture is drawn, on a terminal only."""
    if not progress_console.is_terminal:
        yield
        return
    with progress_console.status(f"drawing {path}"):
        yield


def _run_policy(jobs: list[Any], policy: Policy, procs: int, kill_at_limit: bool,
                description: str) -> Simulator:
    """Run the jobs under ``policy`` to the end, with a progress bar over simulated time
    (on stderr, while it runs)."""
    simulator = Simulator(Machine.processors(procs), policy, kill_at_limit=kill_at_limit)
    simulator.add(jobs)
    first, last = (jobs[0].submit, jobs[-1].submit) if jobs else (0.0, 0.0)
    with Progress(TextColumn(description), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}% of the submissions"),
                  TimeElapsedColumn(), console=progress_console, transient=True,
                  disable=not progress_console.is_terminal) as progress:
        task = progress.add_task(description, total=PROGRESS_STEPS)
        for step in range(1, PROGRESS_STEPS + 1):
            simulator.run(first + (last - first) * step / PROGRESS_STEPS)
            progress.update(task, completed=step)
        simulator.run()
    if simulator.stranded():
        raise SimulationError(f"policy {simulator.policy.name} left {simulator.stranded()} "
                              "jobs waiting with nothing left to happen")
    return simulator


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise ConfigError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
    return value
