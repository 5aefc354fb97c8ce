"""The Slurm backend: what is Slurm on top of the batch core (:mod:`gridcouple.backends.batch`),
on Slurm 22.05 and later. Its options and sbatch options, its state table
(:mod:`gridcouple.backends.slurm.states`), and its tools:

- ``sbatch``: one job array per submission of same-shape jobs (split at the cluster's
  MaxArraySize); the array's comment carries the submission's tag.
- ``squeue``: ONE call for all of the user's jobs per poll (``-O`` text, one line per task).
- ``sacct``: jobs squeue no longer lists, when the cluster keeps accounting; the exit-code
  files of the core answer when it does not (or sacct fails, or has no final record yet).
- ``scancel`` and ``scontrol``: cancel, signal, hold, release; ``scontrol show config`` once.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from gridcouple.backends.base import Backoff
from gridcouple.backends.batch import BatchBackend, ToolRunner, one_line
from gridcouple.backends.slurm.states import decode_exit_code, decode_wait_status, slurm_status
from gridcouple.errors import BackendError, OptionError
from gridcouple.jobs import JobSpec, JobStatus
from gridcouple.journal import JobRecord

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
    slurm_conf: Path | None = None  # the cluster's slurm.conf, passed to the tools as SLURM_CONF
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
        if self.slurm_conf is not None and not self.slurm_conf.is_file():
            raise OptionError("slurm_conf", f"{self.slurm_conf} is not a file")


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
    tag: str = ""  # the comment, which carries the submission's tag

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
    tasks: list[int] = []
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
    spans: list[str] = []
    start: int | None = numbers[0]  # None once the sentinel ends the last span
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
                 one_line(str(exc)) or type(exc).__name__)
    else:
        log.info("slurm: pyslurm imports, but this backend drives the Slurm command-line tools")




class SlurmBackend(BatchBackend):
    """Jobs on a Slurm cluster (see the module docstring). The state directory must be on a
    file system the compute nodes share: job homes, task files and exit-code files live there."""

    kind = "slurm"
    Options = SlurmOptions
    TASK_INDEX = "${SLURM_ARRAY_TASK_ID:-0}"
    GONE = _GONE

    def __init__(self, options: SlurmOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options or SlurmOptions(), **kwargs)
        self.backoff = Backoff(first=min(0.2, self.options.poll_interval),
                               most=self.options.poll_interval)
        conf = self.options.slurm_conf
        self.tools = ToolRunner("Slurm", f"backend.{self.name}", self.options.bin_dir,
                                self.options.command_timeout,
                                {"SLURM_CONF": str(conf)} if conf is not None else None)
        _note_driver()

    # --- the batch core's hooks ---------------------------------------------------------------

    def submission_shape(self, spec: JobSpec) -> tuple[str, ...]:
        """The sbatch options the job asks for."""
        return sbatch_options(spec, self.options)

    def submit_array(self, shape: tuple[str, ...], script: Path, count: int, name: str,
                     tag: str) -> list[str]:
        """One sbatch: a plain job (one task) or an array."""
        array = count > 1
        argv = ["--parsable", f"--job-name={name}", f"--chdir={self.batch_dir}",
                f"--comment={tag}",
                f"--output={self.batch_dir}/{'%A_%a' if array else '%j'}.out", *shape]
        if array:
            argv.append(f"--array=0-{count - 1}")
        out = self.tools.run("sbatch", [*argv, str(script)]).stdout.strip()
        array_id = out.split(";")[0]
        if not array_id.isdigit():
            raise BackendError(f"sbatch printed {out!r}, not a job id")
        return [f"{array_id}_{task}" for task in range(count)] if array else [array_id]

    def list_jobs(self, with_tags: bool) -> Mapping[str, SqueueRow]:
        """One squeue for all of the user's jobs (the comment only when tags are wanted)."""
        fields = [*_SQUEUE_FIELDS, *(["Comment"] if with_tags else [])]
        form = ",".join(f"{name}:|" for name in fields[:-1]) + f",{fields[-1]}:"
        out = self.tools.run("squeue", ["-h", "-r", "-t", "all", "--me", "-O", form],
                             unavailable=True).stdout
        return parse_squeue(out, with_tags)

    def task_of(self, native_id: str) -> int:
        """``123_4`` is task 4; a plain job is task 0."""
        return int(native_id.partition("_")[2] or 0)

    def resolve_gone(self, records: Sequence[JobRecord],
                     native: Mapping[int, str]) -> tuple[dict[int, JobStatus], str]:
        """Final statuses from accounting (one sacct call), when the cluster keeps it. A job
        sacct does not know (its record lags ~2 s behind its end) or still shows waiting or
        running (squeue, not sacct, knows the live jobs) is left out."""
        if not self.accounting:
            return {}, ""
        wanted = {native[r.job.id]: r for r in records if r.job.id in native}
        if not wanted:
            return {}, "no final record in sacct"
        arrays = sorted({native_id.split("_")[0] for native_id in wanted})
        try:
            proc = self.tools.run("sacct", ["-P", "-n", "-X", "-o", _SACCT_FIELDS, "-j",
                                            ",".join(arrays)], unavailable=True)
        except BackendError as exc:  # slurmdbd down: the exit-code files still answer
            log.warning("slurm: jobs squeue no longer lists are resolved from their "
                        "exit-code files: %s", exc)
            return {}, "sacct failed"
        found = parse_sacct(proc.stdout, {n: r.status for n, r in wanted.items()})
        return ({wanted[native_id].job.id: status for native_id, status in found.items()
                 if status.state.is_final}, "no final record in sacct")

    def enforced_walltime(self, spec: JobSpec) -> float | None:
        """Slurm counts whole minutes."""
        walltime = spec.resources.walltime
        return None if walltime is None else math.ceil(walltime / 60) * 60

    @property
    def unsubmitted_grace(self) -> float:
        """Twice the time sbatch may take."""
        return 2 * self.options.command_timeout

    def cancel_native(self, native_ids: Sequence[str]) -> None:
        """scancel the jobs."""
        self._job_command("scancel", [], native_ids)

    def signal_native(self, native_ids: Sequence[str], signal: str) -> None:
        """scancel --signal --full: every process of the running jobs, batch shell included."""
        self._job_command("scancel", [f"--signal={signal}", "--full"], native_ids)

    def hold_native(self, native_ids: Sequence[str]) -> None:
        """scontrol hold: waiting jobs stay PENDING (JobHeldAdmin/JobHeldUser) until released."""
        self._job_command("scontrol", ["hold"], native_ids)

    def release_native(self, native_ids: Sequence[str]) -> None:
        """scontrol release: held jobs may start again."""
        self._job_command("scontrol", ["release"], native_ids)

    @property
    def end_grace(self) -> float:
        """KillWait plus a margin for the node to report the end."""
        return float(re.sub(r"\D", "", self.cluster_config.get("KillWait", "30")) or 30) + 10.0

    def _job_command(self, tool: str, args: list[str], native: Sequence[str]) -> None:
        """Run scancel or scontrol on job lists; jobs that already ended are not an error."""
        if not native:
            return
        proc = self.tools.run(tool, [*args, *compact_native_ids(native)], check=False)
        errors = [line for line in proc.stderr.splitlines()
                  if line.strip() and not any(text in line for text in _IGNORED_SCANCEL)]
        if proc.returncode and errors:
            raise BackendError(f"{tool} {' '.join(args)} failed: {one_line(chr(10).join(errors))}")

    # --- the cluster ----------------------------------------------------------------------------

    @cached_property
    def cluster_config(self) -> dict[str, str]:
        """``scontrol show config`` as a dict (read once per backend; a controller that does
        not answer is QueryUnavailableError, so a status poll retries)."""
        out = self.tools.run("scontrol", ["show", "config"], unavailable=True).stdout
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
