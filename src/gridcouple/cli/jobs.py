"""Job commands: submit, status, cancel, hold, release, logs, wait, and ``config check``.

The habits of sbatch and condor_q: jobs run in the directory they were submitted from, short
options as sbatch has them, one state directory per user so ``status`` anywhere shows every
job. Exit codes follow the jobs (see :func:`exit_code_for` and :data:`EXIT_CODES`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gridcouple.backends import Backend, backend_class, open_backend
from gridcouple.backends.shared_fs import shares_file_system
from gridcouple.cli import (
    EXIT_USAGE,
    BackendOption,
    ConfigOption,
    StateDirOption,
    app,
    new_app,
    open_config,
    with_overrides,
)
from gridcouple.config import Config, load_config
from gridcouple.errors import ConfigError, GridcoupleError, JobNotFoundError
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
errors = Console(stderr=True)
config_app = new_app(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ARRAY_INDEX_ENV = "GRIDCOUPLE_ARRAY_INDEX"
EXIT_TIMED_OUT = 3  # wait --timeout gave up while jobs still ran
EXIT_NOT_APPLIED = 4  # cancel, hold, release: some jobs were not in a state it applies to
WAITING = (JobState.NEW, JobState.QUEUED, JobState.HELD)
MAX_ARRAY = 100_000


def say(text: str, *, stderr: bool = False) -> None:
    """Print one plain line (no markup: job output and reasons may contain brackets)."""
    (errors if stderr else console).print(text, markup=False, highlight=False, soft_wrap=True)


EXIT_CODES = (
    "Exit codes follow the jobs: 0 when every job completed, else the first unsuccessful "
    "job's exit code, 128+N for a job killed by signal N, 124 for a walltime timeout, 125 for "
    "a canceled job, 1 for any other failure; 2 for usage or configuration errors; 3 when "
    "wait --timeout gives up while jobs still run."
)
NOT_APPLIED = (
    "Exit codes: 0 when it applied to every job; 4 when some job was not in a state it "
    "applies to (it had already ended, say), which it names on stderr; 2 for usage or "
    "configuration errors and unknown jobs."
)
READ_ONLY = "Reads the journal only: creates no directory and no journal."


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


def parse_ids(values: Iterable[str]) -> list[int]:
    """Job ids from ``7``, ``2-11`` (a range, as an array submission prints it) or ``3,5``."""
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
                raise typer.BadParameter(f"{value!r}: a job id is a number (7), a range "
                                         "(2-11) or a list (3,5)", param_hint="ID")
            first = int(match.group(1))
            ids.extend(_span(first, int(match.group(2) or first), value, "ID"))
    return list(dict.fromkeys(ids))


def _span(first: int, last: int, text: str, hint: str) -> range:
    """``first..last``, refused beyond MAX_ARRAY numbers (a typo must not fill the memory) or
    beyond what the journal stores (64-bit ids)."""
    if last >= 2**63:
        raise typer.BadParameter(f"{text!r}: {last} is larger than any id", param_hint=hint)
    if last - first + 1 > MAX_ARRAY:
        raise typer.BadParameter(f"{text!r}: a range of at most {MAX_ARRAY:,} numbers",
                                 param_hint=hint)
    return range(first, last + 1)


IdsArgument = Annotated[list[str], typer.Argument(
    metavar="ID", help="Job ids: 7, a range 2-11, or a list 3,5.", show_default=False)]


class _Session:
    """The journal a command reads (the state directory's, or with ``--backend`` that
    backend's) and the backends its jobs belong to. Nothing is created on disk."""

    def __init__(self, config: Config, only: str | None = None) -> None:
        self.config = config
        self.only = only  # --backend: that backend's journal and jobs only
        state_dir = config.state_dir
        if only:
            state_dir = config.site(only).state_dir or config.state_dir
        self.path = state_dir / "journal.sqlite"
        self.journal = Journal.existing(self.path)
        self._backends: dict[str, Backend] = {}

    def records(self, ids: Sequence[int]) -> list[JobRecord]:
        """The records of these jobs; JobNotFoundError names the journal that was read."""
        if self.journal is None:
            raise JobNotFoundError(f"no job {ids[0]}: there is no journal at {self.path} yet "
                                   "(nothing was submitted with this state directory)")
        records = self.journal.get(ids)
        for record in records:
            if self.only and record.job.backend != self.only:
                raise JobNotFoundError(f"job {record.job.id} in {self.path} belongs to the "
                                       f"{record.job.backend} backend, not {self.only}")
        return records

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            self._backends[name] = open_backend(self.config, name)
        return self._backends[name]

    def refresh(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """Current statuses: one query per backend for the jobs not yet final."""
        statuses = {r.job.id: r.status for r in records}
        for name, jobs in _by_backend(r.job for r in records
                                      if not r.status.state.is_final).items():
            statuses.update(_statuses(self.backend(name), jobs))
        return statuses

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        if self.journal is not None:
            self.journal.close()

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _statuses(backend: Backend, jobs: Sequence[Job]) -> dict[int, JobStatus]:
    """The current status of each job (one query), by job id."""
    return dict(zip((j.id for j in jobs), backend.status(jobs), strict=True))


def _by_backend(jobs: Iterable[Job]) -> dict[str, list[Job]]:
    grouped: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        grouped[job.backend].append(job)
    return grouped


def _parse_pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint=option)
        pairs[key] = rest
    return pairs


def _option(option: str, parse: Callable[[], T]) -> T:
    """The value ``parse`` makes of an option; its ValueError names the option."""
    try:
        return parse()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


DURATION_FORMS = ("a plain number is minutes, as in sbatch (5 = 5 minutes); or MM:SS, "
                  "HH:MM:SS, D-HH[:MM[:SS]], or a number with a unit: 90s, 5m, 2h, 1d")


def _duration(option: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {DURATION_FORMS}", param_hint=option) from None


def parse_array(text: str) -> list[int]:
    """Array indices from ``N`` (N jobs, indices 0..N-1) or sbatch's ``A-B`` / ``A,B,C``."""
    if re.fullmatch(r"\s*\d+\s*", text):
        count = int(text)
        if not 1 <= count <= MAX_ARRAY:
            raise typer.BadParameter(f"{text!r}: from 1 to {MAX_ARRAY:,} jobs",
                                     param_hint="--array")
        return list(range(count))
    indices: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*|\s*(\d+)\s*", part)
        if not match:
            raise typer.BadParameter(f"{text!r}: N (N jobs, indices 0..N-1), a range A-B or "
                                     "a list A,B,C of indices", param_hint="--array")
        if match.group(3) is not None:
            indices.append(int(match.group(3)))
        else:
            indices.extend(_span(int(match.group(1)), int(match.group(2)), text, "--array"))
    indices = sorted(set(indices))
    if not indices or len(indices) > MAX_ARRAY:
        raise typer.BadParameter(f"{text!r}: from 1 to {MAX_ARRAY:,} indices",
                                 param_hint="--array")
    return indices


def output_pattern(pattern: str | None, option: str, index: int | None,
                   name: str) -> str | None:
    """An output file name with sbatch's ``%a`` (array index), ``%x`` (job name) and ``%%``."""
    if pattern is None:
        return None

    def expand(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        if letter == "x":
            return name
        if letter == "a":
            return str(index if index is not None else 0)
        raise typer.BadParameter(f"{pattern!r}: %{letter} is not known before the job is "
                                 "submitted; use %a (array index), %x (job name) or %%",
                                 param_hint=option)

    return re.sub(r"%(.?)", expand, pattern)


INTERPRETER = re.compile(r"(python|pypy|sh|bash|zsh|perl|ruby|node|julia|Rscript)[0-9.]*")


def default_name(command: Sequence[str]) -> str:
    """The job's name when none is given: the script's file name, as sbatch names a job after
    its script (``python sweep.py``: ``sweep.py``), else the program's."""
    if not command:
        return "job"
    program = command[0]
    if INTERPRETER.fullmatch(Path(program).name) and len(command) > 1 \
            and not command[1].startswith("-"):
        program = command[1]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(program).name)[:64] or "job"


SUBMIT_HELP = (
    "Submit COMMAND as one job, or as an array of jobs, to the configured backend.\n\n"
    "The job runs in the current directory (-D chooses another), with this shell's "
    "environment plus --env, like sbatch. Its stdout and stderr are kept in its home below "
    "the state directory (gridcouple logs ID shows them) unless -o/-e name files: relative "
    "to the job's directory, with %a for the array index and %x for the job name. Array "
    f"jobs see ${ARRAY_INDEX_ENV}."
)


@app.command(context_settings={"allow_interspersed_args": False}, help=SUBMIT_HELP,
             epilog=EXIT_CODES)
def submit(
    command: Annotated[list[str], typer.Argument(
        metavar="COMMAND", help="The command and its arguments, after --.",
        show_default=False)],
    name: Annotated[str | None, typer.Option(
        "--name", "--job-name", "-J", metavar="NAME",
        help="Job name (default: the script's or program's file name).",
        show_default=False)] = None,
    array: Annotated[str | None, typer.Option(
        "--array", "-a", metavar="N|A-B",
        help=f"N jobs with ${ARRAY_INDEX_ENV} 0..N-1, or the indices A-B or A,B,C.",
        show_default=False)] = None,
    cpus: Annotated[int, typer.Option(
        "--cpus", "--cpus-per-task", "-c", metavar="N", min=1, help="Processors per job.")] = 1,
    mem: Annotated[str | None, typer.Option(
        "--mem", metavar="SIZE", help="Memory per job, e.g. 512M, 4G.",
        show_default=False)] = None,
    gpus: Annotated[int, typer.Option(
        "--gpus", "-G", metavar="N", min=0, help="GPUs per job.")] = 0,
    nodes: Annotated[int, typer.Option(
        "--nodes", "-N", metavar="N", min=1, help="Nodes per job.")] = 1,
    time_limit: Annotated[str | None, typer.Option(
        "--time", "-t", metavar="TIME",
        help="Walltime: 5 (minutes, as in sbatch), 90s, 2h, 1:30:00, 1-12.",
        show_default=False)] = None,
    estimate: Annotated[str | None, typer.Option(
        "--estimate", metavar="TIME", help="Expected run time, for schedulers (as --time).",
        show_default=False)] = None,
    env: Annotated[list[str], typer.Option(
        "--env", metavar="KEY=VALUE", help="A variable for the job's environment; repeat.",
        show_default=False)] = [],  # noqa: B006  (typer needs a list)
    attr: Annotated[list[str], typer.Option(
        "--attr", metavar="KEY=VALUE", help="Backend attribute, e.g. slurm.partition=debug.",
        show_default=False)] = [],  # noqa: B006
    chdir: Annotated[Path | None, typer.Option(
        "--chdir", "-D", metavar="DIR", help="Run the job there (default: here).",
        show_default=False)] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="FILE", help="Its stdout goes to FILE (%a, %x).",
        show_default=False)] = None,
    error: Annotated[str | None, typer.Option(
        "--error", "-e", metavar="FILE", help="Its stderr goes to FILE (%a, %x).",
        show_default=False)] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", "-W", help="Wait for the jobs, printing each as it ends; exit with their "
        "code.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the submitted jobs (and with --wait their ends) as JSON.")
    ] = False,
    config: ConfigOption = None,
    backend: BackendOption = None,
    state_dir: StateDirOption = None,
) -> None:
    memory_mb = _option("--mem", lambda: Resources(memory_mb=parse_memory(mem)).memory_mb) \
        if mem else None
    walltime = _option("--time", lambda: Resources(
        walltime=_duration("--time", time_limit)).walltime) if time_limit else None
    expected = _duration("--estimate", estimate) if estimate else None
    indices: list[int | None] = list(parse_array(array)) if array else [None]
    job_name = name or default_name(command)
    base_env = _parse_pairs(env, "--env")
    attributes = _parse_pairs(attr, "--attr")
    loaded = open_config(config, backend, state_dir)
    chosen = open_backend(loaded)
    try:
        directory = None
        if chdir is not None:
            directory = os.path.abspath(chdir.expanduser())
            if shares_file_system(chosen) and not os.path.isdir(directory):
                raise typer.BadParameter(f"{chdir}: no such directory", param_hint="--chdir")
        elif shares_file_system(chosen):
            directory = os.getcwd()  # like sbatch: the job runs where it was submitted
        try:
            resources = Resources(cpus=cpus, memory_mb=memory_mb, gpus=gpus, nodes=nodes,
                                  walltime=walltime)
            specs = [JobSpec(argv=tuple(command), name=job_name, resources=resources,
                             environment=base_env if index is None
                             else {**base_env, ARRAY_INDEX_ENV: str(index)},
                             attributes=attributes, directory=directory,
                             stdout=output_pattern(output, "--output", index, job_name),
                             stderr=output_pattern(error, "--error", index, job_name),
                             estimate=expected)
                     for index in indices]
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        jobs = chosen.submit(specs)
        if as_json:
            listing: dict[str, Any] = {"backend": chosen.name,
                                       "journal": str(chosen.journal.path),
                                       "jobs": [_job_json(job) for job in jobs]}
        else:
            say(_submitted(jobs, array is not None))
        if wait:
            statuses = follow(chosen, jobs, stderr=as_json)
            if as_json:
                listing["jobs"] = [_job_json(job, status) for job, status
                                   in zip(jobs, statuses, strict=True)]
                typer.echo(json.dumps(listing, indent=1))
            raise typer.Exit(exit_code_for(statuses))
        if as_json:
            typer.echo(json.dumps(listing, indent=1))
    finally:
        chosen.close()


def _submitted(jobs: Sequence[Job], is_array: bool) -> str:
    """``Submitted job 1 (local 1)``; an array in one line with its first and last ids."""
    first, last = jobs[0], jobs[-1]
    if not is_array or len(jobs) == 1:
        return f"Submitted job {first.id} ({first.backend} {first.native_id})"
    return (f"Submitted jobs {first.id}-{last.id}, an array of {len(jobs)} ({first.backend} "
            f"{first.native_id} to {last.native_id})")


def _job_json(job: Job, status: JobStatus | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": job.id, "name": job.spec.name, "backend": job.backend,
                            "native_id": job.native_id}
    if status is not None:
        data.update(state=status.state.name, native_state=status.native_state,
                    reason=status.reason, exit_code=status.exit_code, signal=status.signal,
                    submit_time=status.submit_time, start_time=status.start_time,
                    end_time=status.end_time, host=status.host)
    return data


def follow(backend: Backend, jobs: Sequence[Job], *, until: Literal["all", "any"] = "all",
           timeout: float | None = None, stderr: bool = False) -> list[JobStatus]:
    """Wait for jobs, printing each as it ends, with an N/M-done progress line on a terminal;
    returns their statuses (not all final when ``timeout`` passed)."""
    out = errors if stderr else console
    latest: dict[int, JobStatus] = {}
    ended = 0
    progress = Progress(TextColumn("[bold]waiting"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("done"), TimeElapsedColumn(), console=out, transient=True,
                        disable=not out.is_terminal)
    with progress:
        task = progress.add_task("jobs", total=len(jobs))
        for event in backend.events(jobs, timeout=timeout):
            latest[event.job.id] = event.status
            if event.status.state.is_final and not (event.previous and
                                                    event.previous.is_final):
                ended += 1
                progress.update(task, completed=ended)
                out.print(f"job {event.job.id}: {event.status.describe()}", markup=False,
                          highlight=False, soft_wrap=True)
                if until == "any":
                    break
    statuses = [latest.get(job.id) or backend.status([job])[0] for job in jobs]
    if len(jobs) > 1:
        counts = Counter(str(s.state) for s in statuses if s.state.is_final)
        out.print(f"{sum(counts.values())}/{len(jobs)} done: "
                  + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())),
                  markup=False, highlight=False, soft_wrap=True)
    return statuses


# --- status --------------------------------------------------------------------------------

STATE_STYLE = {JobState.COMPLETED: "green", JobState.FAILED: "red", JobState.TIMEOUT: "red",
               JobState.CANCELED: "yellow", JobState.ACTIVE: "cyan", JobState.HELD: "magenta"}


def elapsed_text(seconds: float) -> str:
    """squeue's TIME: ``M:SS``, ``H:MM:SS``, ``D-HH:MM:SS``."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


WHERE = "NODE (REASON)"  # squeue's last column: where it runs, or why it waits or ended
COLUMNS = ("ID", "NAME", "BACKEND", "NATIVE ID", "STATE", "SUBMIT", "TIME", "EXIT", WHERE)
# How narrow the columns that give up room may become when a table is wider than the
# terminal (the widest gives first); then these are left out, in this order.
SHRINK = {WHERE: 13, "NAME": 10, "NATIVE ID": 9, "BACKEND": 7}
DROP = (WHERE, "SUBMIT", "BACKEND")


def status_table(records: Sequence[JobRecord], statuses: dict[int, JobStatus],
                 width: int | None = None) -> Table:
    """One line per job, like squeue, in ``width`` columns (the console's by default): long
    cells are cut with an ellipsis, never wrapped."""
    now = time.time()
    rows: list[dict[str, str]] = []
    for record in records:
        status = statuses[record.job.id]
        native = status.native_state if status.native_state.upper() != str(status.state) else ""
        exit_text = "" if status.exit_code is None else str(status.exit_code)
        rows.append({
            "ID": str(record.job.id), "NAME": record.job.spec.name,
            "BACKEND": record.job.backend, "NATIVE ID": record.job.native_id,
            "STATE": str(status.state),
            "SUBMIT": datetime.fromtimestamp(status.submit_time).strftime("%H:%M:%S")
            if status.submit_time else "",
            "TIME": elapsed_text((status.end_time or now) - status.start_time)
            if status.start_time else "",
            "EXIT": f"sig {status.signal}" if status.signal else exit_text,
            WHERE: " ".join(p for p in (status.host, native, f"({status.reason})"
                                        if status.reason else "") if p)})
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in COLUMNS}
    room = (width or console.width) - 2 * (len(COLUMNS) - 1)
    for _ in range(max(sum(widths.values()) - room, 0)):
        column = max(SHRINK, key=lambda c: widths[c] - SHRINK[c])
        if widths[column] <= SHRINK[column]:
            break
        widths[column] -= 1
    for column in DROP:
        if sum(widths.values()) + 2 * (len(widths) - 1) <= (width or console.width):
            break
        del widths[column]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, column_width in widths.items():
        table.add_column(column, width=column_width, no_wrap=True, overflow="ellipsis",
                         justify="right" if column in ("ID", "TIME") else "left")
    for row, record in zip(rows, records, strict=True):
        style = STATE_STYLE.get(statuses[record.job.id].state, "")
        table.add_row(*(Text(row[c], style=style if c == "STATE" else "") for c in widths))
    return table


def counts_line(counts: dict[JobState, int], path: Path, shown: int, total: int) -> str:
    """The watch header: the time, the journal, how many jobs in each state."""
    parts = [f"{n} {state}" for state in JobState if (n := counts.get(state, 0))]
    line = f"{datetime.now():%H:%M:%S}  {', '.join(parts) or 'no jobs'}"
    if shown < total:
        line += f"; the newest {shown} of {total} shown"
    return f"{line}  ({path})"


STATUS_HELP = (
    "A table of jobs, like squeue or condor_q; with --watch it stays live.\n\n"
    "Without ids: the jobs waiting or running (--all: also the ended ones), newest last. The "
    "journal is the state directory's (--state-dir, state_dir in the config, else "
    f"$XDG_STATE_HOME/gridcouple), or with --backend that backend's. {READ_ONLY}"
)


@app.command(help=STATUS_HELP)
def status(
    ids: Annotated[list[str] | None, typer.Argument(
        metavar="ID", help="Job ids: 7, 2-11, 3,5 (default: recent jobs).",
        show_default=False)] = None,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Include ended jobs.")] = False,
    limit: Annotated[int, typer.Option(
        "--limit", "-n", metavar="N", min=0, help="At most the newest N jobs (0: all).")] = 50,
    watch: Annotated[bool, typer.Option(
        "--watch", "-w", help="Refresh live until Ctrl-C (or until the given jobs end).")
    ] = False,
    interval: Annotated[float, typer.Option(
        metavar="SECONDS", min=0.05, help="Seconds between refreshes with --watch.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the jobs as JSON.")] = False,
    config: ConfigOption = None,
    backend: BackendOption = None,
    state_dir: StateDirOption = None,
) -> None:
    if watch and as_json:
        raise typer.BadParameter("--json prints once; leave out --watch", param_hint="--json")
    session = _Session(open_config(config, backend, state_dir), backend)
    wanted = parse_ids(ids) if ids else None

    def snapshot() -> tuple[list[JobRecord], dict[int, JobStatus]]:
        if session.journal is None:
            if wanted:
                session.records(wanted)  # raises, naming the journal it looked for
            return [], {}
        if wanted:
            records = session.records(wanted)
        else:
            records = session.journal.records(session.only, active_only=not show_all,
                                              limit=limit or None)
        return records, session.refresh(records)

    def empty() -> str:
        if session.journal is None:
            return f"no jobs: there is no journal at {session.path} yet"
        if show_all:
            return f"no jobs in {session.path}"
        return f"no jobs waiting or running in {session.path} (--all shows ended ones)"

    def counts(statuses: dict[int, JobStatus]) -> dict[JobState, int]:
        """Jobs per state in what the command shows: the given jobs, else the journal's
        (without the ended ones unless --all)."""
        if session.journal is None or wanted:
            return dict(Counter(s.state for s in statuses.values()))
        found = session.journal.state_counts(session.only)
        return found if show_all else {s: n for s, n in found.items() if not s.is_final}

    def view() -> Any:
        records, statuses = snapshot()
        room = max(console.size.height - 4, 1)
        shown = records[-room:]
        in_state = counts(statuses)
        header = Text(counts_line(in_state, session.path, len(shown), sum(in_state.values())),
                      style="bold", no_wrap=True, overflow="ellipsis")
        body = status_table(shown, statuses) if shown else Text(empty())
        finished = bool(wanted) and all(s.state.is_final for s in statuses.values())
        return Group(header, body), finished

    try:
        if watch:
            renderable, finished = view()
            with Live(renderable, console=console, auto_refresh=False) as live:
                while not finished:
                    time.sleep(interval)
                    renderable, finished = view()
                    live.update(renderable, refresh=True)
            return
        records, statuses = snapshot()
        if as_json:
            typer.echo(json.dumps([_job_json(r.job, statuses[r.job.id]) for r in records],
                                  indent=1))
        elif records:
            console.print(status_table(records, statuses))
            total = sum(counts(statuses).values())
            if total > len(records):
                say(f"(the newest {len(records)} of {total}; --limit 0 shows all)")
        else:
            say(empty())
    except KeyboardInterrupt:
        pass
    finally:
        session.close()


# --- cancel, hold, release -------------------------------------------------------------


def _live_jobs(session: _Session, ids: list[str]) -> tuple[list[Job], bool]:
    """The jobs of ``ids`` not yet ended; those that have are named on stderr (second value:
    whether there were any)."""
    records = session.records(parse_ids(ids))
    statuses = session.refresh(records)
    live, any_ended = [], False
    for record in records:
        status = statuses[record.job.id]
        if status.state.is_final:
            say(f"job {record.job.id} had already ended: {status.describe()}", stderr=True)
            any_ended = True
        else:
            live.append(record.job)
    return live, any_ended


@app.command(help="Cancel jobs: waiting ones leave the queue, running ones are stopped.\n\n"
             "A job that had already ended is named on stderr, and the exit code is 4.",
             epilog=NOT_APPLIED)
def cancel(
    ids: IdsArgument,
    signal: Annotated[str | None, typer.Option(
        "--signal", "-s", metavar="SIGNAL",
        help="Send this signal (e.g. USR1) to running jobs first.", show_default=False)] = None,
    grace: Annotated[float, typer.Option(
        metavar="SECONDS", min=0, help="Seconds to wait after --signal before cancelling.")
    ] = 10.0,
    config: ConfigOption = None,
    backend: BackendOption = None,
    state_dir: StateDirOption = None,
) -> None:
    session = _Session(open_config(config, backend, state_dir), backend)
    try:
        live, any_ended = _live_jobs(session, ids)
        for name, jobs in _by_backend(live).items():
            chosen = session.backend(name)
            if signal:
                chosen.send_signal(jobs, signal)
                chosen.wait(jobs, timeout=grace)
                after = _statuses(chosen, jobs)
                for job in jobs:
                    if after[job.id].state.is_final:
                        name_of = signal.upper().removeprefix("SIG")
                        say(f"job {job.id} ended after SIG{name_of}: "
                            f"{after[job.id].describe()}")
                jobs = [j for j in jobs if not after[j.id].state.is_final]
            chosen.cancel(jobs)
            for job in jobs:
                say(f"Canceled job {job.id} ({name} {job.native_id})")
    finally:
        session.close()
    if any_ended:
        raise typer.Exit(EXIT_NOT_APPLIED)


def _hold_or_release(ids: list[str], session: _Session, release: bool) -> None:
    live, not_applied = _live_jobs(session, ids)
    wanted = JobState.HELD if release else JobState.QUEUED
    for name, jobs in _by_backend(live).items():
        chosen = session.backend(name)
        before = _statuses(chosen, jobs)
        fit = [j for j in jobs if before[j.id].state in (wanted, JobState.NEW)]
        if fit:
            (chosen.release if release else chosen.hold)(fit)
        after = _statuses(chosen, jobs)
        for job in jobs:
            state = after[job.id].state
            if release and state is not JobState.HELD and job in fit:
                say(f"Released job {job.id} ({name} {job.native_id})")
            elif not release and state is JobState.HELD:
                say(f"Held job {job.id} ({name} {job.native_id})")
            else:
                why = ("it is not held" if release else
                       "only waiting jobs can be held" if state.order >= 2 else "")
                say(f"job {job.id} was not {'released' if release else 'held'}: "
                    f"{after[job.id].describe()}" + (f"; {why}" if why else ""), stderr=True)
                not_applied = True
    if not_applied:
        raise typer.Exit(EXIT_NOT_APPLIED)


@app.command(help="Keep waiting jobs from starting until they are released.",
             epilog=NOT_APPLIED)
def hold(ids: IdsArgument, config: ConfigOption = None, backend: BackendOption = None,
         state_dir: StateDirOption = None) -> None:
    with _Session(open_config(config, backend, state_dir), backend) as session:
        _hold_or_release(ids, session, release=False)


@app.command(help="Let held jobs start again.", epilog=NOT_APPLIED)
def release(ids: IdsArgument, config: ConfigOption = None, backend: BackendOption = None,
            state_dir: StateDirOption = None) -> None:
    with _Session(open_config(config, backend, state_dir), backend) as session:
        _hold_or_release(ids, session, release=True)


# --- logs and wait -------------------------------------------------------------------------


@app.command(help="Print what a job wrote to stdout (or stderr).\n\nA job that has not "
             f"started yet is named on stderr (--follow waits for it). {READ_ONLY}")
def logs(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.", show_default=False)],
    stderr: Annotated[bool, typer.Option("--stderr", help="Show stderr instead of stdout.")
                      ] = False,
    tail: Annotated[int | None, typer.Option(
        "--tail", "-n", metavar="N", min=0, help="Only the last N lines.",
        show_default=False)] = None,
    follow_output: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing until the job ends.")] = False,
    config: ConfigOption = None,
    backend: BackendOption = None,
    state_dir: StateDirOption = None,
) -> None:
    session = _Session(open_config(config, backend, state_dir), backend)
    stream: Literal["stdout", "stderr"] = "stderr" if stderr else "stdout"
    try:
        record = session.records([job_id])[0]
        job = record.job
        chosen = session.backend(job.backend)
        current = chosen.status([job])[0]
        if current.state in WAITING:
            say(f"job {job_id} has not started yet: {current.describe()}"
                + ("; waiting for it" if follow_output else "; nothing to show yet"),
                stderr=True)
            if not follow_output:
                return
            while current.state in WAITING:
                time.sleep(0.5)
                current = chosen.status([job])[0]
        text = chosen.read_output(job, stream, tail=tail)
        typer.echo(text, nl=False)
        # where following goes on: the whole output's end (read again only after a tail)
        shown = len(chosen.read_output(job, stream)) if tail and follow_output else len(text)
        while follow_output and not chosen.status([job])[0].state.is_final:
            time.sleep(0.5)
            text = chosen.read_output(job, stream)
            typer.echo(text[shown:], nl=False)
            shown = len(text)
        if follow_output:
            typer.echo(chosen.read_output(job, stream)[shown:], nl=False)
        elif not text and current.state.is_final:
            other: Literal["stdout", "stderr"] = "stdout" if stderr else "stderr"
            lines = len(chosen.read_output(job, other).splitlines())
            hint = (f"; its {other} has {lines} lines: gridcouple logs "
                    f"{'' if stderr else '--stderr '}{job_id}") if lines else ""
            say(f"job {job_id} ({current.describe()}) wrote nothing to {stream}{hint}",
                stderr=True)
    finally:
        session.close()


@app.command(help="Wait for jobs to end, printing each as it ends; the exit code follows "
             f"them. {READ_ONLY}", epilog=EXIT_CODES)
def wait(
    ids: IdsArgument,
    any_job: Annotated[bool, typer.Option("--any", help="Return when the first job ends.")
                       ] = False,
    timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="Give up after this many seconds (then exit 3).",
        show_default=False)] = None,
    config: ConfigOption = None,
    backend: BackendOption = None,
    state_dir: StateDirOption = None,
) -> None:
    session = _Session(open_config(config, backend, state_dir), backend)
    try:
        records = session.records(parse_ids(ids))
        by_backend = _by_backend(r.job for r in records)
        if len(by_backend) > 1:
            raise GridcoupleError(f"wait takes jobs of one backend at a time; these belong to "
                                  f"{', '.join(sorted(by_backend))}")
        (name, jobs), = by_backend.items()
        statuses = follow(session.backend(name), jobs, until="any" if any_job else "all",
                          timeout=timeout)
        ended = [s for s in statuses if s.state.is_final]
        if not ended or (not any_job and len(ended) < len(statuses)):
            say(f"timed out after {timeout:g} s: {len(statuses) - len(ended)} of "
                f"{len(statuses)} jobs still waiting or running")
            raise typer.Exit(EXIT_TIMED_OUT)
        raise typer.Exit(exit_code_for(ended))
    finally:
        session.close()


# --- config check --------------------------------------------------------------------------


def _line_of(error: ConfigError) -> int:
    match = re.match(r"[^:]*:(\d+):", str(error))
    return int(match.group(1)) if match else 0


@config_app.command("check", help="Validate the configuration file and every backend table "
                    "in it, reporting every error (file, line and key). A policy of your own "
                    "(package.module:Class) is imported to check it: its module's top-level "
                    "code runs.",
                    epilog="Exit codes: 0 when valid; 2 when not, after naming every error.")
def config_check(config: ConfigOption = None, backend: BackendOption = None,
                 state_dir: StateDirOption = None) -> None:
    found: list[ConfigError] = []
    loaded = with_overrides(load_config(config, errors=found), backend, state_dir)
    names = sorted({loaded.backend, *loaded.backend_tables})
    for name in names:
        loaded.site(name, found)
        try:
            cls = backend_class(name, loaded)
        except ConfigError as exc:
            found.append(exc)
            continue
        loaded.backend_options(name, cls.Options, found)
    messages = list(dict.fromkeys(str(e) for e in sorted(found, key=_line_of)))
    if messages:
        for message in messages:
            say(f"gridcouple: error: {message}", stderr=True)
        if len(messages) > 1:
            say(f"gridcouple: {len(messages)} errors in {loaded.path or 'the settings'}",
                stderr=True)
        raise typer.Exit(EXIT_USAGE)
    where = loaded.path or "no file (defaults)"
    say(f"{where}: OK; backend {loaded.backend!r}; checked: {', '.join(names)}; "
        f"state dir {loaded.state_dir}")

