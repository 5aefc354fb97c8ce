"""Job commands: submit, status, cancel, logs, wait, and ``config check``.

Exit codes follow the jobs (see :func:`exit_code_for` and :data:`EXIT_CODES`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gridcouple.backends import Backend, check_config, open_backend
from gridcouple.cli import BackendOption, ConfigOption, app, open_config
from gridcouple.config import Config
from gridcouple.errors import GridcoupleError
from gridcouple.jobs import (
    Job,
    JobSpec,
    JobState,
    JobStatus,
    Resources,
    parse_duration,
    parse_memory,
)
from gridcouple.journal import JobRecord, Journal

T = TypeVar("T")
console = Console()
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ARRAY_INDEX_ENV = "GRIDCOUPLE_ARRAY_INDEX"


def say(text: str) -> None:
    """Print one plain line (no markup: job output and reasons may contain brackets)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


EXIT_CODES = (
    "Exit codes follow the jobs: 0 when every job completed, else the first unsuccessful "
    "job's exit code, 128+N for a job killed by signal N, 124 for a walltime timeout, 125 for "
    "a canceled job, 1 for any other failure; 2 for usage or configuration errors; 3 when "
    "wait --timeout gives up while jobs still run."
)


def exit_code_for(statuses: Sequence[JobStatus]) -> int:
    """The command's exit code for these final statuses (see EXIT_CODES)."""
    for status in statuses:
        if status.state is JobState.COMPLETED:
            continue
        if status.state is JobState.TIMEOUT:
            return 124
        if status.state is JobState.CANCELED:
            return 125
        if status.signal:
            return 128 + status.signal
        return status.exit_code or 1
    return 0


class _Session:
    """The journal of the configured state directory and the backends its jobs belong to."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.journal = Journal(config.state_dir / "journal.sqlite")
        self._backends: dict[str, Backend] = {}

    def backend(self, name: str | None = None) -> Backend:
        name = name or self.config.backend
        if name not in self._backends:
            self._backends[name] = open_backend(self.config, name)
        return self._backends[name]

    def refresh(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """Current statuses: one query per backend for the jobs not yet final."""
        by_backend: dict[str, list[Job]] = defaultdict(list)
        for record in records:
            if not record.status.state.is_final:
                by_backend[record.job.backend].append(record.job)
        statuses = {r.job.id: r.status for r in records}
        for name, jobs in by_backend.items():
            statuses.update(zip((j.id for j in jobs), self.backend(name).status(jobs),
                                strict=True))
        return statuses

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self.journal.close()


def _parse_pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint=option)
        pairs[key] = rest
    return pairs


@app.command(context_settings={"allow_interspersed_args": False}, epilog=EXIT_CODES)
def submit(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    array: Annotated[int, typer.Option(min=1, help=f"Submit N copies; each sees ${ARRAY_INDEX_ENV}.")] = 1,
    cpus: Annotated[int, typer.Option(min=1, help="Processors per job.")] = 1,
    mem: Annotated[str | None, typer.Option(help="Memory per job, e.g. 512M, 4G.")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="Walltime: 90s, 5m, 1:00:00 ...")] = None,
    name: Annotated[str, typer.Option(help="Job name.")] = "job",
    estimate: Annotated[str | None, typer.Option(help="Expected run time, for schedulers.")] = None,
    env: Annotated[list[str], typer.Option("--env", help="KEY=VALUE for the job's environment.")] = [],  # noqa: B006
    attr: Annotated[list[str], typer.Option("--attr", help="Backend attribute, e.g. slurm.partition=debug.")] = [],  # noqa: B006
    chdir: Annotated[Path | None, typer.Option(help="Working directory of the job.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the jobs; exit with their code.")] = False,
    config: ConfigOption = None,
    backend: BackendOption = None,
) -> None:
    """Submit a command as one job, or as --array N jobs, to the configured backend."""
    memory_mb = _option("--mem", lambda: Resources(memory_mb=parse_memory(mem)).memory_mb) \
        if mem else None
    walltime = _option("--time", lambda: Resources(walltime=parse_duration(time_limit)).walltime) \
        if time_limit else None
    try:
        resources = Resources(cpus=cpus, memory_mb=memory_mb, walltime=walltime)
        base_env = _parse_pairs(env, "--env")
        specs = [JobSpec(argv=tuple(command), name=name, resources=resources,
                         environment={**base_env, ARRAY_INDEX_ENV: str(i)} if array > 1 else base_env,
                         attributes=_parse_pairs(attr, "--attr"),
                         directory=str(chdir.resolve()) if chdir else None,
                         estimate=parse_duration(estimate) if estimate else None)
                 for i in range(array)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    session = _Session(open_config(config, backend))
    try:
        chosen = session.backend()
        jobs = chosen.submit(specs)
        for job in jobs:
            say(f"Submitted job {job.id} ({job.backend} {job.native_id})")
        if wait:
            statuses = chosen.wait(jobs)
            for job, job_status in zip(jobs, statuses, strict=True):
                say(f"job {job.id}: {job_status.describe()}")
            raise typer.Exit(exit_code_for(statuses))
    finally:
        session.close()


def _option(option: str, parse: Callable[[], T]) -> T:
    """The value ``parse`` makes of an option; its ValueError names the option."""
    try:
        return parse()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _status_table(records: Sequence[JobRecord], statuses: dict[int, JobStatus]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "BACKEND", "NATIVE ID", "STATE", "DETAIL", "EXIT",
                   "SUBMITTED", "ELAPSED", "HOST"):
        table.add_column(column, no_wrap=column != "DETAIL")
    now = time.time()
    for record in records:
        status = statuses[record.job.id]
        detail = " ".join(p for p in (status.native_state,
                                      f"({status.reason})" if status.reason else "") if p)
        exit_text = "" if status.exit_code is None else str(status.exit_code)
        if status.signal:
            exit_text = f"sig {status.signal}"
        elapsed = ""
        if status.start_time:
            elapsed = f"{(status.end_time or now) - status.start_time:.1f}s"
        submitted = datetime.fromtimestamp(status.submit_time).strftime("%H:%M:%S") \
            if status.submit_time else ""
        style = {JobState.COMPLETED: "green", JobState.FAILED: "red", JobState.TIMEOUT: "red",
                 JobState.CANCELED: "yellow", JobState.ACTIVE: "cyan"}.get(status.state, "")
        table.add_row(str(record.job.id), Text(record.job.spec.name), record.job.backend,
                      Text(record.job.native_id), Text(str(status.state), style=style),
                      Text(detail), exit_text, submitted, elapsed, Text(status.host))
    return table


@app.command()
def status(
    ids: Annotated[list[int] | None, typer.Argument(help="Job ids (default: recent jobs).")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include ended jobs.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many jobs, newest.")] = 50,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh live until Ctrl-C (or until the given jobs end).")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 1.0,
    config: ConfigOption = None,
) -> None:
    """A table of jobs, like squeue or condor_q; with --watch it stays live."""
    session = _Session(open_config(config))

    def snapshot() -> tuple[list[JobRecord], dict[int, JobStatus]]:
        if ids:
            records = session.journal.get(ids)
        else:
            records = session.journal.records(active_only=not show_all, limit=limit)
        return records, session.refresh(records)

    try:
        records, statuses = snapshot()
        if not watch:
            if records:
                console.print(_status_table(records, statuses))
            else:
                say("no jobs" + ("" if show_all else " waiting or running (--all shows ended ones)"))
            return
        with Live(_status_table(records, statuses), console=console, auto_refresh=False) as live:
            while not (ids and all(s.state.is_final for s in statuses.values())):
                time.sleep(interval)
                records, statuses = snapshot()
                live.update(_status_table(records, statuses), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        session.close()


@app.command()
def cancel(
    ids: Annotated[list[int], typer.Argument(help="Job ids.")],
    signal: Annotated[str | None, typer.Option("--signal", "-s", help="Send this signal (e.g. USR1) to running jobs first.")] = None,
    grace: Annotated[float, typer.Option(help="Seconds to wait after --signal before cancelling.")] = 10.0,
    config: ConfigOption = None,
) -> None:
    """Cancel jobs: waiting ones leave the queue, running ones are stopped."""
    session = _Session(open_config(config))
    try:
        by_backend: dict[str, list[Job]] = defaultdict(list)
        for record in session.journal.get(ids):
            by_backend[record.job.backend].append(record.job)
        for name, jobs in by_backend.items():
            session.backend(name).cancel(jobs, signal=signal, grace=grace)
            for job in jobs:
                say(f"Canceled job {job.id} ({name} {job.native_id})")
    finally:
        session.close()


@app.command()
def logs(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    stderr: Annotated[bool, typer.Option("--stderr", help="Show stderr instead of stdout.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print what a job wrote to stdout (or stderr)."""
    session = _Session(open_config(config))
    stream: Literal["stdout", "stderr"] = "stderr" if stderr else "stdout"
    try:
        record = session.journal.get([job_id])[0]
        chosen = session.backend(record.job.backend)
        text = chosen.read_output(record.job, stream, tail=tail)
        typer.echo(text, nl=False)
        shown = len(chosen.read_output(record.job, stream))
        while follow and not chosen.status([record.job])[0].state.is_final:
            time.sleep(0.5)
            text = chosen.read_output(record.job, stream)
            typer.echo(text[shown:], nl=False)
            shown = len(text)
        if follow:
            typer.echo(chosen.read_output(record.job, stream)[shown:], nl=False)
    finally:
        session.close()


@app.command(epilog=EXIT_CODES)
def wait(
    ids: Annotated[list[int], typer.Argument(help="Job ids.")],
    any_job: Annotated[bool, typer.Option("--any", help="Return when the first job ends.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (then exit 3).")] = None,
    config: ConfigOption = None,
) -> None:
    """Wait for jobs to end; the exit code follows them."""
    session = _Session(open_config(config))
    try:
        records = session.journal.get(ids)
        by_backend: dict[str, list[Job]] = defaultdict(list)
        for record in records:
            by_backend[record.job.backend].append(record.job)
        if len(by_backend) > 1:
            raise GridcoupleError("wait takes jobs of one backend at a time")
        (name, jobs), = by_backend.items()
        statuses = session.backend(name).wait(jobs, until="any" if any_job else "all",
                                              timeout=timeout)
        for job, job_status in zip(jobs, statuses, strict=True):
            say(f"job {job.id}: {job_status.describe()}")
        ended = [s for s in statuses if s.state.is_final]
        if not ended or (not any_job and len(ended) < len(statuses)):
            say("timed out while jobs were still waiting or running")
            raise typer.Exit(3)
        raise typer.Exit(exit_code_for(ended))
    finally:
        session.close()


@config_app.command("check")
def config_check(config: ConfigOption = None, backend: BackendOption = None) -> None:
    """Validate the configuration file and every backend table in it."""
    loaded = open_config(config, backend)
    names = check_config(loaded)
    where = loaded.path or "no file (defaults)"
    say(f"{where}: OK; backend {loaded.backend!r}; checked: {', '.join(names)}; "
                  f"state dir {loaded.state_dir}")
