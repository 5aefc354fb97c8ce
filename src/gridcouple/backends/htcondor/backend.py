"""The HTCondor backend: what is HTCondor on top of the batch core
(:mod:`gridcouple.backends.batch`), through the official bindings (``htcondor2``, 24 and later).
Its options and submit commands, its state table (:mod:`gridcouple.backends.htcondor.states`),
and its calls:

- ``Schedd.submit``: one cluster of N procs per submission of same-shape jobs; the proc runs
  the submission's script with its ProcId, and carries the submission's tag
  (``+GridcoupleTag`` and the submit event's notes).
- status from the job event log (``JobEventLog``), resumed from its offset by any process (the
  reader and what it read are kept in ``events.state``); ``Schedd.query`` only to reconcile:
  the first status of a process, a log that is missing or was truncated, and at most once per
  ``reconcile_interval``. ``Schedd.history`` for jobs gone from the queue.
- ``Schedd.act``: remove, hold, release, suspend and continue.
- without a shared file system (``spool = true``): input spooled with the jobs, output
  retrieved once they completed, status from the schedd (the log stays in the spool).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import htcondor2

from gridcouple.backends.base import Backoff
from gridcouple.backends.batch import BatchBackend, one_line
from gridcouple.backends.batch.script import task_ids
from gridcouple.backends.htcondor.events import EventLog, Followed
from gridcouple.backends.htcondor.states import FINAL_HOLDS, CondorRow, row_from_ad
from gridcouple.errors import BackendError, OptionError, QueryUnavailableError
from gridcouple.jobs import JobSpec, JobState, JobStatus
from gridcouple.journal import JobRecord

log = logging.getLogger(__name__)

# Submit commands the backend sets itself; the rest may come from options or htcondor.* attributes.
_RESERVED = frozenset({
    "executable", "arguments", "initialdir", "log", "output", "error", "universe", "batch_name",
    "transfer_executable", "should_transfer_files", "when_to_transfer_output",
    "transfer_input_files", "transfer_output_files", "preserve_relative_paths",
    "+gridcoupletag", "submit_event_user_notes", "periodic_remove", "job_max_vacate_time",
    "max_materialize"})
_ATTRIBUTES = ["ClusterId", "ProcId", "JobStatus", "HoldReason", "HoldReasonCode",
               "LastHoldReason", "LastHoldReasonCode", "RemoveReason", "LastRejMatchReason",
               "ExitCode", "ExitBySignal", "ExitSignal", "QDate", "JobStartDate",
               "CompletionDate", "EnteredCurrentStatus", "RemoteHost", "LastRemoteHost",
               "GridcoupleTag"]
_MATERIALIZE_FROM = 100  # procs from which a cluster is materialized late (a faster submit)


@dataclass(frozen=True)
class HTCondorOptions:
    """``[backend.htcondor]`` options. A job adds or overrides submit commands with
    ``htcondor.COMMAND`` attributes (``htcondor.request_disk``, ``htcondor.requirements``)."""

    condor_config: Path | None = None  # CONDOR_CONFIG for the bindings; else the environment's
    collector: str | None = None  # the central manager, host[:port]; else COLLECTOR_HOST
    schedd: str | None = None  # the schedd's Name when the pool has several; else the local one
    spool: bool = False  # no shared file system: spool the input, retrieve the output
    submit_commands: dict[str, str] = field(default_factory=dict)  # for every job
    poll_interval: float = 1.0  # the longest pause between two reads of the event log
    reconcile_interval: float = 60.0  # the least pause between two schedd queries
    kill_wait: float = 10.0  # seconds from a cancel's TERM to HTCondor's KILL

    def __post_init__(self) -> None:
        for key in ("poll_interval", "reconcile_interval", "kill_wait"):
            if getattr(self, key) <= 0:
                raise OptionError(key, f"must be positive, got {getattr(self, key)}")
        try:
            _check_commands(self.submit_commands)
        except ValueError as exc:
            raise OptionError("submit_commands", str(exc)) from None


def _check_commands(commands: Mapping[str, object]) -> None:
    for key, value in commands.items():
        if key.lower() in _RESERVED:
            raise ValueError(f"{key!r} is set by the backend")
        if "\n" in str(value) or "\n" in key:
            raise ValueError(f"{key!r}: a submit command is one line")


def submit_commands(spec: JobSpec, options: HTCondorOptions) -> tuple[str, ...]:
    """The submit commands a job asks for, ``name=value``: its resources, then the options'
    and its own ``htcondor.*`` commands."""
    resources = spec.resources
    if resources.nodes != 1:
        raise BackendError(f"job {spec.name}: HTCondor runs a job on one machine (vanilla "
                           f"universe); nodes={resources.nodes} is not supported")
    commands = {"request_cpus": str(resources.cpus)}
    if resources.memory_mb is not None:
        commands["request_memory"] = f"{resources.memory_mb}MB"
    if resources.gpus:
        commands["request_gpus"] = str(resources.gpus)
    if resources.walltime is not None:  # enforced by the starter: held, code 46
        commands["allowed_job_duration"] = str(math.ceil(resources.walltime))
    own = {k: str(v) for k, v in spec.attributes_for("htcondor").items()}
    try:
        _check_commands(own)
    except ValueError as exc:
        raise BackendError(f"job {spec.name}: attribute htcondor.{exc}") from None
    commands.update(options.submit_commands, **own)
    return tuple(f"{key}={value}" for key, value in sorted(commands.items()))


def _configure(options: HTCondorOptions) -> None:
    """Point the (process-wide) bindings at the configured pool."""
    if options.condor_config and os.environ.get("CONDOR_CONFIG") != str(options.condor_config):
        os.environ["CONDOR_CONFIG"] = str(options.condor_config)
        htcondor2.reload_config()


def schedd_submit(schedd: Any, description: Any, *, spool: bool = False, **kwargs: Any) -> Any:
    """``Schedd.submit``. The SubmitResult of a submit without spooling drops, when freed, a
    reference to None it never took (htcondor2 25.14): on Python 3.11, where None is not
    immortal, a few thousand submits abort the interpreter. That reference is given back."""
    result = schedd.submit(description, spool=spool, **kwargs)
    if not spool and sys.version_info < (3, 12):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(None))
    return result


def _constraints(native_ids: Sequence[str], clusters: int = 50) -> list[str]:
    """ClassAd constraints for these jobs, each of a few clusters (a constraint of 1,000
    clauses matches nothing, silently)."""
    procs: dict[str, list[str]] = {}
    for native_id in native_ids:
        cluster, _, proc = native_id.partition(".")
        procs.setdefault(cluster, []).append(proc)
    clauses = [f"(ClusterId == {c} && member(ProcId, {{{', '.join(p)}}}))"
               for c, p in procs.items()]
    return [" || ".join(clauses[i:i + clusters]) for i in range(0, len(clauses), clusters)]


def _native_id(ad: Any) -> str:
    return f"{ad['ClusterId']}.{ad['ProcId']}"


class HTCondorBackend(BatchBackend):
    """Jobs in an HTCondor pool (see the module docstring). Without ``spool`` the state
    directory must be on a file system the execute machines share (the only files they need)."""

    kind = "htcondor"
    Options = HTCondorOptions
    TASK_INDEX = "${1:-0}"  # arguments = $(ProcId)
    GONE = "not in the schedd's queue"
    shares_file_system: ClassVar[bool] = False  # at most the state directory is shared

    def __init__(self, options: HTCondorOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options or HTCondorOptions(), **kwargs)
        self.backoff = Backoff(first=min(0.1, self.options.poll_interval),
                               most=self.options.poll_interval)
        self._reconciled_here = False
        self._warned: set[str] = set()
        self.event_log = EventLog(self.batch_dir, self._warn_once)
        self._removed: set[str] = set()
        _configure(self.options)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s: %s", self.name, message)

    @cached_property
    def schedd(self) -> Any:
        """The configured schedd (located once through the collector)."""
        try:
            collector = htcondor2.Collector(self.options.collector or None)
            ad = collector.locate(htcondor2.DaemonType.Schedd, self.options.schedd) \
                if self.options.schedd else collector.locate(htcondor2.DaemonType.Schedd)
        except htcondor2.HTCondorException as exc:
            which = f"the schedd {self.options.schedd}" if self.options.schedd else "a schedd"
            pool = self.options.collector or "the configured collector"
            raise QueryUnavailableError(f"cannot locate {which} through {pool}: "
                                        f"{one_line(str(exc))}") from exc
        return htcondor2.Schedd(ad)

    # --- the batch core's hooks ---------------------------------------------------------------

    def submission_shape(self, spec: JobSpec) -> tuple[str, ...]:
        """The submit commands the job asks for."""
        return submit_commands(spec, self.options)

    def script_header(self, shape: tuple[str, ...]) -> str:
        """HTCondor signals only the script on remove: it passes the TERM to the command."""
        return "forward_term=1"

    def job_path(self, path: Path) -> Path:
        """With spooling, paths relative to the job's scratch directory (the state directory's
        layout is transferred below it)."""
        if not self.options.spool:
            return path
        try:
            return path.relative_to(self.state_dir)
        except ValueError:
            raise BackendError(f"without a shared file system (spool = true) a job's files stay "
                               f"in its home; {path} is outside {self.state_dir}") from None

    def submit_array(self, shape: tuple[str, ...], script: Path, count: int, name: str,
                     tag: str) -> list[str]:
        """One ``Schedd.submit``: a cluster of ``count`` procs running ``script ProcId``."""
        first = script.stem
        commands = {
            "executable": str(script), "arguments": "$(ProcId)", "initialdir": str(self.state_dir),
            "error": f"{self.batch_dir.name}/{first}.$(ProcId).err", "batch_name": name,
            "+GridcoupleTag": '"' + tag + '"', "submit_event_user_notes": tag,
            "periodic_remove": ("JobStatus == 5 && member(HoldReasonCode, {"
                                + ", ".join(map(str, sorted(FINAL_HOLDS))) + "})"),
            "job_max_vacate_time": str(math.ceil(self.options.kill_wait)),
            **dict(command.split("=", 1) for command in shape)}
        script.chmod(0o755)
        items = None
        if self.options.spool:
            commands.update(should_transfer_files="YES", when_to_transfer_output="ON_EXIT",
                            preserve_relative_paths="true", transfer_input_files="$(inputs)",
                            transfer_output_files="$(home)")
            tasks = self.job_path(script.with_suffix(".tasks"))
            items = []
            for job_id in task_ids(script.with_suffix(".tasks").read_text().splitlines()):
                home = self.job_path(self.job_home(job_id))
                inputs = [str(tasks), *([str(home)] if self.job_home(job_id).exists() else [])]
                items.append({"home": str(home), "inputs": ", ".join(inputs)})
        else:
            commands.update(transfer_executable="false", log=str(self.event_log.path))
            # The schedd makes the procs after submit returns; it would ignore hold = true.
            if count >= _MATERIALIZE_FROM and "hold" not in commands:
                commands["max_materialize"] = str(count)
        try:
            with self._calling("Schedd.submit", BackendError):
                if items is None:
                    result = schedd_submit(self.schedd, htcondor2.Submit(commands), count=count)
                else:
                    result = schedd_submit(self.schedd, htcondor2.Submit(commands),
                                           itemdata=iter(items), spool=True)
                    self._spool(result)
        except QueryUnavailableError as exc:  # no schedd located: nothing was submitted
            raise BackendError(str(exc)) from exc
        cluster, start = result.cluster(), result.first_proc()
        return [f"{cluster}.{proc}" for proc in range(start, start + result.num_procs())]

    def _spool(self, result: Any) -> None:
        """Upload the input of spooled jobs (they wait HELD until then); remove them if that
        fails."""
        try:
            self.schedd.spool(result)
        except htcondor2.HTCondorException:
            with contextlib.suppress(htcondor2.HTCondorException):
                self.schedd.act(htcondor2.JobAction.Remove, result.cluster(),
                                ("spooling the input failed", 0))
            raise

    def list_jobs(self, with_tags: bool) -> Mapping[str, CondorRow]:
        """The jobs of this state directory: from the event log, reconciled with the schedd
        when that is due (see the module docstring); with spooling from the schedd."""
        with self.event_log.state() as followed:
            readable = not self.options.spool and self.event_log.read(followed)
            due = time.time() - followed.reconciled >= self.options.reconcile_interval
            if not readable or due or not self._reconciled_here:
                self._reconcile(followed, required=not readable)
            if self.options.spool:
                self._retrieve(followed)
            rows = dict(followed.rows)
        self._remove_ended(rows)
        return rows

    def task_of(self, native_id: str) -> int:
        """``12.4`` is proc 4: task 4 of its submission."""
        return int(native_id.partition(".")[2] or 0)

    def resolve_gone(self, records: Sequence[JobRecord],
                     native: Mapping[int, str]) -> tuple[dict[int, JobStatus], str]:
        """Jobs the log and the last reconcile do not have: the queue (a log that is missing or
        was truncated), then the history. A job submitted lately that neither has yet (its
        proc not materialized yet, its history record late) is still waiting."""
        wanted = {native[r.job.id]: r for r in records if r.job.id in native}
        if not wanted:
            return {}, ""
        with self._calling("Schedd.query and Schedd.history"):
            ads = {_native_id(ad): ad for constraint in _constraints(list(wanted))
                   for ad in self.schedd.query(constraint, _ATTRIBUTES)}
            rest = [n for n in wanted if n not in ads]
            for constraint in _constraints(rest):
                ads.update((_native_id(ad), ad) for ad in self.schedd.history(
                    constraint, _ATTRIBUTES, match=len(rest)))
        found = {wanted[n].job.id: row_from_ad(ad).status(wanted[n].status)
                 for n, ad in ads.items() if n in wanted}
        recent = time.time() - self.unsubmitted_grace
        found.update((r.job.id, JobStatus(JobState.QUEUED, reason="not listed by the schedd yet"))
                     for r in wanted.values()
                     if r.job.id not in found and (r.status.submit_time or 0) > recent)
        return found, "nor in its history"

    def enforced_walltime(self, spec: JobSpec) -> float | None:
        """allowed_job_duration counts whole seconds."""
        walltime = spec.resources.walltime
        return None if walltime is None else float(math.ceil(walltime))

    def cancel_native(self, native_ids: Sequence[str]) -> None:
        """Remove the jobs: TERM to the script (which passes it on), KILL after kill_wait."""
        self._act(htcondor2.JobAction.Remove, native_ids, "canceled by gridcouple")

    def hold_native(self, native_ids: Sequence[str]) -> None:
        """Hold: waiting jobs stay HELD (HoldReasonCode 1); running ones are stopped."""
        self._act(htcondor2.JobAction.Hold, native_ids, "held by gridcouple")

    def release_native(self, native_ids: Sequence[str]) -> None:
        """Release held jobs."""
        self._act(htcondor2.JobAction.Release, native_ids, "released by gridcouple")

    def signal_native(self, native_ids: Sequence[str], signal: str) -> None:
        """STOP and CONT are HTCondor's suspend and continue; HTCondor has no action that sends
        any other signal to a job."""
        actions = {"STOP": htcondor2.JobAction.Suspend, "CONT": htcondor2.JobAction.Continue}
        name = signal.upper().removeprefix("SIG")
        if name not in actions:
            raise BackendError(f"HTCondor cannot send SIG{name} to a job: its schedd sends only "
                               "STOP and CONT (suspend, continue), and TERM on cancel")
        self._act(actions[name], native_ids, f"SIG{name} from gridcouple")

    @property
    def end_grace(self) -> float:
        """kill_wait plus a margin for the shadow to log the end."""
        return self.options.kill_wait + 5.0

    # --- the schedd ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calling(self, what: str,
                 error: type[BackendError] = QueryUnavailableError) -> Iterator[None]:
        """Turn the bindings' failure into ``error``; the schedd is located again next time
        (it may have restarted elsewhere)."""
        try:
            yield
        except htcondor2.HTCondorException as exc:
            self.__dict__.pop("schedd", None)
            raise error(f"{what} failed: {one_line(str(exc))}") from exc

    def _act(self, action: Any, native_ids: Sequence[str], reason: str) -> None:
        """One Schedd.act; jobs already gone are not an error. The reason goes as a tuple (a
        plain string is dropped by the bindings)."""
        if not native_ids:
            return
        with self._calling(f"Schedd.act({action.name})", BackendError):
            result = self.schedd.act(action, list(native_ids), (reason, 0))
        if result is not None and (result["TotalPermissionDenied"] or result["TotalError"]):
            raise BackendError(f"{action.name} of {', '.join(native_ids[:5])}: permission denied "
                               f"for {result['TotalPermissionDenied']}, errors for "
                               f"{result['TotalError']} of {len(native_ids)} jobs")

    def _remove_ended(self, rows: Mapping[str, CondorRow]) -> None:
        """Remove jobs held for good (walltime, cannot run) at once: they are final for us, and
        the submit's periodic_remove, the fallback, waits for the schedd's periodic cycle."""
        ended = [n for n, row in rows.items()
                 if row.job_status == 5 and row.final and n not in self._removed]
        if ended:
            self._removed.update(ended)
            try:
                self._act(htcondor2.JobAction.Remove, ended, "ended by gridcouple")
            except BackendError as exc:
                self._warn_once(f"held jobs stay in the queue: {exc}")

    def _reconcile(self, followed: Followed, *, required: bool) -> None:
        """One Schedd.query for all jobs of this state directory: it overrides what the log
        said; a job the log has not seen end and the queue no longer has is left to history."""
        prefix = f"gridcouple:{self.journal_key}:"
        self._reconciled_here, followed.reconciled, followed.changed = True, time.time(), True
        try:
            with self._calling("Schedd.query"):
                ads = self.schedd.query(f'regexp("^{prefix}", GridcoupleTag)', _ATTRIBUTES)
        except QueryUnavailableError as exc:
            if required:
                raise
            self._warn_once(f"going on from the event log: {exc}")
            return
        queued = {_native_id(ad): row_from_ad(ad) for ad in ads}
        for native_id, row in list(followed.rows.items()):
            if not row.final and native_id not in queued:
                del followed.rows[native_id]
        for native_id, row in queued.items():
            old = followed.rows.get(native_id)
            if old is None or not old.final:
                followed.rows[native_id] = row._replace(tag=row.tag or (old.tag if old else ""))

    def _retrieve(self, followed: Followed) -> None:
        """Bring back the output of spooled jobs that completed (before they are reported)."""
        done = [n for n, row in followed.rows.items()
                if row.job_status == 4 and n not in followed.retrieved]
        if not done:
            return
        try:
            with self._calling("Schedd.retrieve"):
                self.schedd.retrieve(done)
        except QueryUnavailableError:
            for native_id in done:
                del followed.rows[native_id]  # not final until their output is here
            raise
        followed.retrieved.update(done)
        followed.changed = True
