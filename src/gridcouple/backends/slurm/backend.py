"""The Slurm backend: drives sbatch, squeue, scontrol and scancel (and sacct when the cluster
keeps accounting), on Slurm 22.05 and later.

- ``submit`` records the jobs (NEW) before sbatch hears of them, writes each job's ``job.sh`` in
  its home, and sends specs that ask for the same sbatch options as ONE job array (split at the
  cluster's MaxArraySize). The array's comment names the journal and the batch script, whose
  ``ids=(...)`` line maps task N to journal id N, so jobs whose submitter died before storing
  the native ids are found again.
- ``query`` asks ``squeue`` ONCE for all of the user's jobs; a job that has left squeue is
  resolved through ``sacct`` when accounting exists, else (no accounting, sacct failing, or no
  final sacct record yet) through the exit-code file its ``job.sh`` wrote. A failing squeue
  raises QueryUnavailableError: nothing is concluded.
- states map through the one table in :mod:`gridcouple.backends.slurm.states`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shlex
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import NamedTuple

from gridcouple.backends.base import Backend, Backoff, output_file, working_directory
from gridcouple.backends.slurm.script import (
    EXIT_CODE_FILE,
    JOB_SCRIPT,
    USER_SCRIPT,
    parse_exit_record,
    render_batch_script,
    render_job_script,
)
from gridcouple.backends.slurm.states import decode_exit_code, decode_wait_status, slurm_status
from gridcouple.errors import BackendError, OptionError, QueryUnavailableError
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus
from gridcouple.scheduler.journal import JobRecord

log = logging.getLogger(__name__)

# squeue -O fields, one line per job (-r: one per array task), '|' between them. The comment
# goes last: it is free text and is only asked for when jobs must be found again.
_SQUEUE_FIELDS = ("JobArrayID", "State", "Reason", "exit_code", "SubmitTime", "StartTime",
                  "EndTime", "NodeList")
_SACCT_FIELDS = "JobID,State,ExitCode,Start,End,NodeList"
_PER_JOB_KEYS = ("partition", "account", "qos", "constraint")
_ATTRIBUTES = (*_PER_JOB_KEYS, "extra_directives")
_IGNORED_SCANCEL = ("already completing or completed", "Invalid job id specified")
_GONE = "no longer listed by squeue"
_FROM_SACCT = f"from sacct ({_GONE})"


@dataclass(frozen=True)
class SlurmOptions:
    """``[backend.slurm]`` options. What is not set emits no sbatch option. A job may override
    partition, account, qos, constraint and extra_directives with ``slurm.*`` attributes."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra_directives: list[str] = field(default_factory=list)  # sbatch options, "--exclusive"
    bin_dir: Path | None = None  # where sbatch, squeue, scontrol, scancel, sacct are; else PATH
    poll_interval: float = 5.0  # the longest pause between two squeue calls while waiting
    command_timeout: float = 60.0  # seconds a Slurm command may take before it is given up

    def __post_init__(self) -> None:
        try:
            check_directives(self.extra_directives)
        except ValueError as exc:
            raise OptionError("extra_directives", str(exc)) from None
        for key in ("poll_interval", "command_timeout"):
            if getattr(self, key) <= 0:
                raise OptionError(key, f"must be positive, got {getattr(self, key)}")


def check_directives(directives: Iterable[object]) -> None:
    """Each extra directive is one sbatch option such as ``--exclusive`` or ``--mail-type=END``."""
    for directive in directives:
        if not isinstance(directive, str) or not directive.startswith("-"):
            raise ValueError(f"{directive!r} is not an sbatch option (like '--exclusive'; leave "
                             "out '#SBATCH')")


def sbatch_options(spec: JobSpec, options: SlurmOptions) -> tuple[str, ...]:
    """The sbatch options a job asks for: nothing the user did not ask for (a default
    Resources emits no option at all)."""
    attributes = spec.attributes_for("slurm")
    unknown = sorted(set(attributes) - set(_ATTRIBUTES))
    if unknown:
        raise BackendError(f"job {spec.name}: unknown attribute 'slurm.{unknown[0]}'; known: "
                           + ", ".join(f"slurm.{k}" for k in _ATTRIBUTES))
    chosen = []
    for key in _PER_JOB_KEYS:
        value = attributes.get(key, getattr(options, key))
        if value is not None:
            chosen.append(f"--{key}={value}")
    resources = spec.resources
    if resources.nodes != 1:
        chosen.append(f"--nodes={resources.nodes}")
    if resources.cpus != 1:
        chosen.append(f"--cpus-per-task={resources.cpus}")
    if resources.memory_mb is not None:
        chosen.append(f"--mem={resources.memory_mb}M")
    if resources.gpus:
        chosen.append(f"--gpus={resources.gpus}")
    if resources.walltime is not None:  # Slurm counts whole minutes
        chosen.append(f"--time={math.ceil(resources.walltime / 60)}")
    extra = attributes.get("extra_directives", [])
    if isinstance(extra, str):  # from the command line: "--exclusive --mail-type=END"
        extra = shlex.split(extra)
    try:
        check_directives(extra)
    except ValueError as exc:
        raise BackendError(f"job {spec.name}: attribute slurm.extra_directives: {exc}") from None
    return (*chosen, *options.extra_directives, *extra)


class SqueueRow(NamedTuple):
    """One line of squeue (a job or one array task), as squeue printed it: rows are parsed
    for every job of the user, values only for the jobs asked about."""

    state: str
    reason: str
    wait_status: str
    submit_time: str
    start_time: str
    end_time: str
    host: str
    comment: str = ""

    def status(self, previous: JobStatus) -> JobStatus:
        """Our status for this row."""
        exit_code, signal = decode_wait_status(int(self.wait_status or 0))
        return slurm_status(self.state, self.reason, previous, exit_code=exit_code,
                            signal=signal, submit_time=_slurm_time(self.submit_time),
                            start_time=_slurm_time(self.start_time),
                            end_time=_slurm_time(self.end_time), host=self.host)


def parse_squeue(text: str, with_comment: bool) -> dict[str, SqueueRow]:
    """Rows by native id (``123`` or ``123_4``) from ``squeue -h -r -O ...`` output; a pending
    array remainder (``123_[5-9]``) is expanded to its tasks."""
    rows: dict[str, SqueueRow] = {}
    width = len(_SQUEUE_FIELDS) + with_comment
    for line in text.splitlines():
        parts = [part.strip() for part in line.split("|", width - 1)]
        if len(parts) != width:
            continue
        row = SqueueRow(*parts[1:])
        if parts[0].endswith("]"):
            rows.update((native_id, row) for native_id in expand_native_ids(parts[0]))
        else:
            rows[parts[0]] = row
    return rows


def parse_sacct(text: str, previous: dict[str, JobStatus]) -> dict[str, JobStatus]:
    """Statuses by native id from ``sacct -P -n -X -o JobID,State,ExitCode,Start,End,NodeList``
    lines, for the native ids in ``previous``. A range of array tasks (``123_[5-9]``, pending or
    canceled while pending) is expanded to its tasks; the reason says the status came from
    sacct."""
    found = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        job_ids, state, exit_text, start, end, host = parts
        exit_code, signal = decode_exit_code(exit_text)
        for native_id in expand_native_ids(job_ids):
            if native_id in previous:
                found[native_id] = slurm_status(
                    state, _FROM_SACCT, previous[native_id], exit_code=exit_code, signal=signal,
                    start_time=_slurm_time(start), end_time=_slurm_time(end),
                    host="" if host == "None assigned" else host)
    return found


def expand_native_ids(text: str) -> list[str]:
    """``["123_5", "123_6", "123_8"]`` from ``123_[5-6,8%4]``; other ids unchanged."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", text)
    if not match:
        return [text]
    tasks = []
    for part in match.group(2).split(","):
        first, _, last = part.partition("-")
        tasks.extend(range(int(first), int(last or first) + 1))
    return [f"{match.group(1)}_{task}" for task in tasks]


def compact_native_ids(native_ids: Iterable[str]) -> list[str]:
    """Slurm job lists: ``["7", "9_[0-3,5]"]`` from ``["7", "9_0", ..., "9_3", "9_5"]``."""
    plain, tasks = [], defaultdict(list)
    for native in native_ids:
        array, _, task = native.partition("_")
        if task:
            tasks[array].append(int(task))
        else:
            plain.append(native)
    for array, numbers in tasks.items():
        plain.append(f"{array}_[{_ranges(sorted(set(numbers)))}]")
    return plain


def _ranges(numbers: Sequence[int]) -> str:
    spans, start = [], numbers[0]
    for previous, number in zip(numbers, [*numbers[1:], None], strict=True):
        if number != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = number
    return ",".join(spans)


@lru_cache(maxsize=4096)
def _slurm_time(text: str) -> float | None:
    """Seconds since the epoch from Slurm's local ``2026-01-02T03:04:05`` (None for N/A ...)."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:  # N/A, NONE, Unknown
        return None


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


_driver_noted = False


def _note_driver() -> None:
    """Say once per process how Slurm is driven (pyslurm is never required)."""
    global _driver_noted
    if _driver_noted:
        return
    _driver_noted = True
    try:
        import pyslurm  # noqa: F401
    except Exception as exc:  # an ImportError, or pyslurm refusing this Slurm's version
        log.info("slurm: pyslurm is not usable (%s); driving the Slurm command-line tools",
                 _one_line(str(exc)) or type(exc).__name__)
    else:
        log.info("slurm: pyslurm imports, but this backend drives the Slurm command-line tools")


class SlurmBackend(Backend):
    """Jobs on a Slurm cluster (see the module docstring). The state directory must be on a
    file system the compute nodes share: job homes, scripts and exit-code files live there."""

    name = "slurm"
    Options = SlurmOptions
    backoff = Backoff(first=0.2, most=5.0)

    def __init__(self, options: SlurmOptions | None = None, **kwargs) -> None:
        super().__init__(options or SlurmOptions(), **kwargs)
        self.backoff = Backoff(first=min(0.2, self.options.poll_interval),
                               most=self.options.poll_interval)
        self.jobs_root = self.state_dir / "jobs"
        self.batch_dir = self.state_dir / "slurm"
        self.journal_key = hashlib.sha1(str(self.journal.path.resolve()).encode()).hexdigest()[:8]
        _note_driver()

    # --- submit -------------------------------------------------------------------------------

    def submit(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Record the jobs, write their scripts, and send each group of same-shape specs as one
        job array (one sbatch call per MaxArraySize tasks)."""
        specs = list(specs)
        shapes = [sbatch_options(spec, self.options) for spec in specs]
        if not specs:
            return []
        ids = self.journal.add(self.name, specs)
        try:
            for job_id, spec in zip(ids, specs, strict=True):
                self._prepare(job_id, spec)
        except (BackendError, OSError) as exc:
            self._mark_unsubmitted(ids, exc)
            if isinstance(exc, OSError):
                raise BackendError(f"cannot write the job scripts: {exc}") from exc
            raise
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            groups[shape].append(index)
        chunks = []
        for shape, members in groups.items():
            size = self.max_array_size if len(members) > 1 else 1
            chunks += [(shape, members[i : i + size]) for i in range(0, len(members), size)]
        native: dict[int, str] = {}
        chunk_ids: list[int] = []
        try:
            for shape, members in chunks:
                chunk_ids = [ids[i] for i in members]
                names = {specs[i].name for i in members}
                array_id = self._sbatch(shape, chunk_ids, names.pop() if len(names) == 1
                                        else "gridcouple")
                if len(chunk_ids) == 1:
                    native[chunk_ids[0]] = array_id
                else:
                    native.update((job_id, f"{array_id}_{task}")
                                  for task, job_id in enumerate(chunk_ids))
        except BackendError as exc:
            # sbatch that did not answer may have queued the chunk: it stays NEW, and the next
            # status finds it through its comment (or fails it after a grace period).
            unsure = set(chunk_ids) if isinstance(exc, QueryUnavailableError) else set()
            self._mark_unsubmitted([i for i in ids if i not in native and i not in unsure], exc)
            raise
        finally:
            canceled_meanwhile = self._store_native_ids(native)
        self._scancel_some(native, canceled_meanwhile)
        return [Job(id=i, backend=self.name, native_id=native[i], spec=s)
                for i, s in zip(ids, specs, strict=True)]

    def _prepare(self, job_id: int, spec: JobSpec) -> None:
        home = self.job_home(job_id)
        self.stage_in(spec, home)
        if spec.script is not None:
            user_script = home / USER_SCRIPT
            user_script.write_text(spec.script)
            user_script.chmod(0o700)
        text = render_job_script(
            spec, job_id=job_id, home=home, workdir=working_directory(spec, home),
            stdout=output_file(spec, home, "stdout"), stderr=output_file(spec, home, "stderr"),
            state_dir=self.state_dir)
        (home / JOB_SCRIPT).write_text(text)

    def _sbatch(self, shape: tuple[str, ...], job_ids: list[int], name: str) -> str:
        """Submit one plain job (one id) or one array; returns Slurm's job id."""
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        batch_script = self.batch_dir / f"{job_ids[0]}.sh"
        batch_script.write_text(render_batch_script(job_ids, self.jobs_root))
        array = len(job_ids) > 1
        argv = ["--parsable", f"--job-name={name}", f"--chdir={self.jobs_root}",
                f"--comment=gridcouple:{self.journal_key}:{job_ids[0]}",
                f"--output={self.batch_dir}/{'%A_%a' if array else '%j'}.out", *shape]
        if array:
            argv.append(f"--array=0-{len(job_ids) - 1}")
        out = self._run("sbatch", [*argv, str(batch_script)]).stdout.strip()
        array_id = out.split(";")[0]
        if not array_id.isdigit():
            raise BackendError(f"sbatch printed {out!r}, not a job id")
        return array_id

    def _scancel_some(self, native: dict[int, str], ids: Sequence[int]) -> None:
        """scancel the jobs ``ids`` of ``native``: those whose cancel was asked for (from any
        process) while sbatch had them and their native ids were not known."""
        if ids:
            self._job_command("scancel", [], [native[i] for i in ids])

    def _store_native_ids(self, native: dict[int, str]) -> list[int]:
        """Record the native ids; returns the ids whose cancel was requested meanwhile."""
        if not native:
            return []
        return self.journal.set_native_ids(
            ((i, n, str(self.job_home(i))) for i, n in native.items()), state=JobState.QUEUED)

    def _mark_unsubmitted(self, ids: Sequence[int], exc: Exception) -> None:
        failed = JobStatus(JobState.FAILED, reason=f"not submitted: {exc}", end_time=time.time())
        self.journal.update([(i, failed) for i in ids], only_if=[JobState.NEW])

    # --- status -------------------------------------------------------------------------------

    def query(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """One squeue for all jobs; jobs it no longer lists are resolved from sacct (with
        accounting) or their exit-code files."""
        unsubmitted = [r for r in records if not r.job.native_id]
        rows = self._squeue(with_comment=bool(unsubmitted))
        native = {r.job.id: r.job.native_id for r in records if r.job.native_id}
        found = self._find_unsubmitted(unsubmitted, rows) if unsubmitted else {}
        native.update(found)
        result: dict[int, JobStatus] = {}
        gone: list[JobRecord] = []
        for record in records:
            row = rows.get(native.get(record.job.id, ""))
            if row is not None:
                result[record.job.id] = row.status(record.status)
            elif record.job.id in native or time.time() - (
                    record.status.submit_time or 0) > 2 * self.options.command_timeout:
                gone.append(record)  # a NEW job without native id may still be in sbatch
        unknown = _GONE
        if gone and self.accounting:
            try:
                result.update(self._sacct(gone, native))
                unknown = f"{_GONE}, no final record in sacct"
            except BackendError as exc:  # slurmdbd down: the exit-code files still answer
                log.warning("slurm: jobs squeue no longer lists are resolved from their "
                            "exit-code files: %s", exc)
                unknown = f"{_GONE}, sacct failed"
            gone = [r for r in gone if r.job.id not in result]
        result.update((r.job.id, self._from_exit_file(r, unknown)) for r in gone)
        return result

    def _squeue(self, with_comment: bool) -> dict[str, SqueueRow]:
        fields = [*_SQUEUE_FIELDS, *(["Comment"] if with_comment else [])]
        form = ",".join(f"{name}:|" for name in fields[:-1]) + f",{fields[-1]}:"
        out = self._run("squeue", ["-h", "-r", "-t", "all", "--me", "-O", form],
                        unavailable=True).stdout
        return parse_squeue(out, with_comment)

    def _find_unsubmitted(self, records: Sequence[JobRecord],
                          rows: dict[str, SqueueRow]) -> dict[int, str]:
        """Native ids of jobs sbatch accepted but whose submitter died before recording them:
        the comment names the batch script, whose ids=(...) line maps tasks to journal ids."""
        wanted = {r.job.id for r in records}
        prefix = f"gridcouple:{self.journal_key}:"
        found: dict[int, str] = {}
        for native_id, row in rows.items():
            if not row.comment.startswith(prefix):
                continue
            script = self.batch_dir / f"{row.comment[len(prefix):]}.sh"
            try:
                ids = re.search(r"^ids=\(([\d ]*)\)", script.read_text(), re.M).group(1).split()
            except (OSError, AttributeError):
                continue
            array_id, _, task = native_id.partition("_")
            job_id = int(ids[int(task or 0)])
            if job_id in wanted:
                found[job_id] = native_id if len(ids) > 1 else array_id
        self._scancel_some(found, self._store_native_ids(found))
        return found

    def _sacct(self, records: Sequence[JobRecord], native: dict[int, str]) -> dict[int, JobStatus]:
        """Final statuses from accounting for jobs squeue no longer lists (one sacct call). A
        job sacct does not know (its record lags ~2 s behind its end) or still shows waiting or
        running (squeue, not sacct, knows the live jobs) is left out."""
        wanted = {native[r.job.id]: r for r in records if r.job.id in native}
        if not wanted:
            return {}
        arrays = sorted({native_id.split("_")[0] for native_id in wanted})
        proc = self._run("sacct", ["-P", "-n", "-X", "-o", _SACCT_FIELDS, "-j", ",".join(arrays)],
                         unavailable=True)
        found = parse_sacct(proc.stdout, {n: r.status for n, r in wanted.items()})
        return {wanted[native_id].job.id: status for native_id, status in found.items()
                if status.state.is_final}

    def _from_exit_file(self, record: JobRecord, unknown: str) -> JobStatus:
        """A job squeue no longer lists and sacct could not resolve: its exit-code file decides.
        ``unknown`` says where else the job was looked for, for the reason."""
        home = Path(record.workdir) if record.workdir else self.job_home(record.job.id)
        try:
            text = (home / EXIT_CODE_FILE).read_text()
        except FileNotFoundError:
            if record.cancel_requested:
                return JobStatus(JobState.CANCELED, reason=f"canceled; {unknown}",
                                 end_time=time.time())
            return JobStatus(JobState.FAILED, reason=f"{unknown}, and no exit-code file in "
                             f"{home} (killed before it ended, or never started)",
                             end_time=time.time())
        exit_code, signal, start, end = parse_exit_record(text)
        walltime = record.job.spec.resources.walltime
        if exit_code == 0:
            state = JobState.COMPLETED
        elif signal is not None and record.cancel_requested:
            state = JobState.CANCELED
        elif signal is not None and walltime and end - start >= math.ceil(walltime / 60) * 60 - 1:
            state = JobState.TIMEOUT
        else:
            state = JobState.FAILED
        return JobStatus(state, reason=f"from its exit-code file ({unknown})",
                         exit_code=exit_code, signal=signal, start_time=start, end_time=end,
                         host=record.status.host)

    # --- control ------------------------------------------------------------------------------

    def cancel_now(self, jobs: Sequence[Job]) -> None:
        """scancel the jobs."""
        self.journal.request_cancel(job.id for job in jobs)
        native = self._native_ids(jobs)
        if native:
            self._job_command("scancel", [], native)

    def send_signal(self, jobs: Sequence[Job], signal: str) -> None:
        """scancel --signal --full: every process of the running jobs, batch shell included."""
        native = self._native_ids(jobs)
        if native:
            self._job_command("scancel", [f"--signal={signal}", "--full"], native)

    def hold(self, jobs: Sequence[Job]) -> None:
        """scontrol hold: waiting jobs stay PENDING (JobHeldAdmin/JobHeldUser) until released."""
        self._job_command("scontrol", ["hold"], self._native_ids(jobs))

    def release(self, jobs: Sequence[Job]) -> None:
        """scontrol release: held jobs may start again."""
        self._job_command("scontrol", ["release"], self._native_ids(jobs))

    def _native_ids(self, jobs: Sequence[Job]) -> list[str]:
        """The jobs' native ids from the journal (finding those a dead submitter left out)."""
        records = self.journal.get(job.id for job in jobs)
        if any(not r.job.native_id and not r.status.state.is_final for r in records):
            self.status(jobs)
            records = self.journal.get(job.id for job in jobs)
        return [r.job.native_id for r in records
                if r.job.native_id and not r.status.state.is_final]

    def _job_command(self, tool: str, args: list[str], native: Sequence[str]) -> None:
        """Run scancel or scontrol on job lists; jobs that already ended are not an error."""
        if not native:
            return
        proc = self._run(tool, [*args, *compact_native_ids(native)], check=False)
        errors = [line for line in proc.stderr.splitlines()
                  if line.strip() and not any(text in line for text in _IGNORED_SCANCEL)]
        if proc.returncode and errors:
            raise BackendError(f"{tool} {' '.join(args)} failed: {_one_line(chr(10).join(errors))}")

    # --- the cluster ----------------------------------------------------------------------------

    @cached_property
    def cluster_config(self) -> dict[str, str]:
        """``scontrol show config`` as a dict (read once per backend; a controller that does
        not answer is QueryUnavailableError, so a status poll retries)."""
        out = self._run("scontrol", ["show", "config"], unavailable=True).stdout
        pairs = (line.split("=", 1) for line in out.splitlines() if " = " in line)
        return {key.strip(): value.strip() for key, value in pairs}

    @property
    def max_array_size(self) -> int:
        """Tasks per array the cluster accepts (task ids 0 .. MaxArraySize-1)."""
        return int(self.cluster_config.get("MaxArraySize", "1001"))

    @property
    def accounting(self) -> bool:
        """True when the cluster keeps accounting, so sacct knows finished jobs."""
        return self.cluster_config.get("AccountingStorageType",
                                       "accounting_storage/none") != "accounting_storage/none"

    def _run(self, tool: str, args: Sequence[str], *, unavailable: bool = False,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one Slurm command. Its failure raises BackendError with Slurm's own message, or
        QueryUnavailableError when it only means "no answer right now": a timeout, or any
        failure of a query (``unavailable``)."""
        command = str(self.options.bin_dir / tool) if self.options.bin_dir else tool
        try:
            proc = subprocess.run([command, *args], capture_output=True, text=True,
                                  timeout=self.options.command_timeout)
        except FileNotFoundError:
            where = f"in {self.options.bin_dir}" if self.options.bin_dir else "on PATH"
            raise BackendError(f"{tool} is not {where}: is Slurm installed? ([backend.slurm] "
                               "bin_dir)") from None
        except subprocess.TimeoutExpired:
            raise QueryUnavailableError(f"{tool} did not answer within "
                                        f"{self.options.command_timeout:g} s ([backend.slurm] "
                                        "command_timeout)") from None
        if check and proc.returncode:
            message = _one_line(proc.stderr) or _one_line(proc.stdout) or "no message"
            error = QueryUnavailableError if unavailable else BackendError
            raise error(f"{tool} failed (exit code {proc.returncode}): {message}")
        return proc
