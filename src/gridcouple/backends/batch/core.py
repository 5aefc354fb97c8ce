"""What every command- or binding-driven batch system needs, written once.

A batch system (Slurm, HTCondor, PBS ...) subclasses :class:`BatchBackend` and implements the
hooks below; docs/writing-a-backend.md walks through them with Slurm as the example.

- ``submission_shape(spec)``: the native options a job asks for; jobs of one shape go as one
  array (one native submit call per ``max_array_size`` tasks).
- ``submit_array(shape, script, count, name, tag)``: one native submission of ``script`` as
  ``count`` tasks, carrying ``tag``; returns the tasks' native ids.
- ``list_jobs(with_tags)``: ONE native query for all of the user's jobs: native id -> a
  :class:`Listed` row (its status, and its tag when asked).
- ``task_of(native_id)``: the task index within its submission.
- ``cancel_native`` (and optionally ``hold_native``, ``release_native``, ``signal_native``).
- optional: ``resolve_gone`` (jobs the query no longer lists, e.g. from accounting),
  ``enforced_walltime`` (how the system rounds a walltime), ``script_header``, ``job_path``
  (where a job finds its files when the batch system transfers them instead of sharing them).

The core does the rest: journal records before the batch system hears of a job, the task file
and script of each submission (two files whatever the number of jobs), native ids stored with a
cancel that arrived meanwhile carried out, jobs of a submitter that died between the native
submit and storing the ids found again through their tag, jobs the batch system has forgotten
resolved from their exit-code files, and one :class:`StatusWatcher` for all callers.
"""

from __future__ import annotations

import abc
import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from gridcouple.backends.base import Backend
from gridcouple.backends.batch.script import (
    EXIT_CODE_FILE,
    parse_exit_record,
    render_script,
    task_ids,
    task_line,
)
from gridcouple.backends.batch.watcher import StatusWatcher
from gridcouple.backends.shared_fs import SharedFileSystem, output_file, working_directory
from gridcouple.errors import BackendError, QueryUnavailableError
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus
from gridcouple.journal import JobRecord

Shape = tuple[str, ...]


class Listed(Protocol):
    """One job as the batch system's query listed it."""

    @property
    def tag(self) -> str:
        """The submission's tag ("" when not asked for)."""
        ...

    def status(self, previous: JobStatus) -> JobStatus:
        """Our status for this row (``previous`` is kept for what the row does not say)."""
        ...


@dataclass(frozen=True)
class Submission:
    """One native submission: jobs of one shape, their task file and script."""

    shape: Shape
    ids: list[int]
    name: str
    script: Path
    tag: str


class BatchBackend(SharedFileSystem, Backend):
    """The shared core of batch systems (see the module docstring for the hooks)."""

    #: The bash expression of a task's index within its submission.
    TASK_INDEX: ClassVar[str] = "${1:-0}"
    #: How the reason says a job has left the batch system's listing.
    GONE: ClassVar[str] = "no longer listed by the batch system"

    def __init__(self, options: Any, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.batch_dir = self.state_dir / self.kind
        self.journal_key = hashlib.sha1(str(self.journal.path.resolve()).encode()).hexdigest()[:8]
        self.watcher = StatusWatcher(self)

    # --- hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    def submission_shape(self, spec: JobSpec) -> Shape:
        """The native options ``spec`` asks for (raise BackendError for what is wrong)."""

    @abc.abstractmethod
    def submit_array(self, shape: Shape, script: Path, count: int, name: str,
                     tag: str) -> list[str]:
        """Submit ``script`` as ``count`` tasks in one native call; their native ids in task
        order. Raise QueryUnavailableError when the batch system may have taken them."""

    @abc.abstractmethod
    def list_jobs(self, with_tags: bool) -> Mapping[str, Listed]:
        """One native query: the user's jobs by native id (QueryUnavailableError on failure)."""

    @abc.abstractmethod
    def task_of(self, native_id: str) -> int:
        """The index of a native job within its submission."""

    @abc.abstractmethod
    def cancel_native(self, native_ids: Sequence[str]) -> None:
        """Remove the jobs from the batch system; ended ones are not an error."""

    def hold_native(self, native_ids: Sequence[str]) -> None:
        """Hold waiting jobs."""
        raise BackendError(f"the {self.name} backend cannot hold jobs")

    def release_native(self, native_ids: Sequence[str]) -> None:
        """Release held jobs."""
        raise BackendError(f"the {self.name} backend cannot release jobs")

    def signal_native(self, native_ids: Sequence[str], signal: str) -> None:
        """Signal every process of the running jobs."""
        raise BackendError(f"the {self.name} backend cannot signal jobs")

    def resolve_gone(self, records: Sequence[JobRecord],
                     native: Mapping[int, str]) -> tuple[dict[int, JobStatus], str]:
        """Final statuses of jobs the listing no longer has, from another source (accounting,
        history), and a note on that source for the jobs it could not resolve."""
        return {}, ""

    def enforced_walltime(self, spec: JobSpec) -> float | None:
        """The walltime the batch system enforces for ``spec`` (after its rounding)."""
        return spec.resources.walltime

    def script_header(self, shape: Shape) -> str:
        """Directives at the top of a submission's script (default: none)."""
        return ""

    def job_path(self, path: Path) -> Path:
        """Where the job finds ``path``, a submitting-side path below the state directory (the
        task file, a job's home, directory and output files): the same path on a shared file
        system (the default); a relative one, from the directory the job starts in, for a batch
        system that transfers the files."""
        return path

    @property
    def max_array_size(self) -> int:
        """Tasks one native submission may hold."""
        return 100_000

    @property
    def unsubmitted_grace(self) -> float:
        """Seconds a job may stay without a native id before it is taken as never submitted
        (a submit call that did not answer may still queue it)."""
        return 120.0

    # --- submit ---------------------------------------------------------------------------

    def submit(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Record the jobs, write one task file and script per submission, and send each group
        of same-shape specs as arrays."""
        specs = list(specs)
        shapes = [self.submission_shape(spec) for spec in specs]
        if not specs:
            return []
        ids = self.journal.add(self.name, specs)
        try:
            submissions = self._prepare(ids, specs, shapes)
        except (BackendError, OSError) as exc:
            self._mark_unsubmitted(ids, exc)
            if isinstance(exc, OSError):
                raise BackendError(f"cannot write the job files: {exc}") from exc
            raise
        native: dict[int, str] = {}
        current: list[int] = []
        try:
            for submission in submissions:
                current = submission.ids
                natives = self.submit_array(submission.shape, submission.script,
                                            len(submission.ids), submission.name, submission.tag)
                native.update(zip(submission.ids, natives, strict=True))
        except BackendError as exc:
            # A submit that did not answer may have queued the jobs: they stay NEW, and the next
            # status finds them through their tag (or fails them after unsubmitted_grace).
            unsure = set(current) if isinstance(exc, QueryUnavailableError) else set()
            self._mark_unsubmitted([i for i in ids if i not in native and i not in unsure], exc)
            raise
        finally:
            canceled_meanwhile = self._store_native_ids(native)
        self._cancel_some(native, canceled_meanwhile)
        self.watcher.expect_change()
        return [Job(id=i, backend=self.name, native_id=native[i], spec=s)
                for i, s in zip(ids, specs, strict=True)]

    def _prepare(self, ids: list[int], specs: list[JobSpec],
                 shapes: list[Shape]) -> list[Submission]:
        """Stage inputs in and write each submission's task file and script."""
        groups: dict[Shape, list[int]] = defaultdict(list)
        for index, shape in enumerate(shapes):
            groups[shape].append(index)
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        submissions = []
        for shape, members in groups.items():
            for start in range(0, len(members), self.max_array_size):
                chunk = members[start : start + self.max_array_size]
                lines = [self._task_line(ids[i], specs[i]) for i in chunk]
                first = ids[chunk[0]]
                tasks = self.batch_dir / f"{first}.tasks"
                tasks.touch(mode=0o600)  # task lines hold environments: owner only
                tasks.write_text("\n".join(lines) + "\n")
                script = self.batch_dir / f"{first}.sh"
                script.write_text(render_script(tasks=self.job_path(tasks),
                                                task_index=self.TASK_INDEX,
                                                state_dir=self.job_path(self.state_dir),
                                                header=self.script_header(shape)))
                names = {specs[i].name for i in chunk}
                submissions.append(Submission(
                    shape=shape, ids=[ids[i] for i in chunk],
                    name=names.pop() if len(names) == 1 else "gridcouple", script=script,
                    tag=f"gridcouple:{self.journal_key}:{first}"))
        return submissions

    def _task_line(self, job_id: int, spec: JobSpec) -> str:
        home = self.job_home(job_id)
        if spec.stage_in:
            self.stage_in(spec, home)
        job = self.job_path
        return task_line(spec, job_id=job_id, home=job(home),
                         workdir=job(working_directory(spec, home)),
                         stdout=job(output_file(spec, home, "stdout")),
                         stderr=job(output_file(spec, home, "stderr")))

    def _store_native_ids(self, native: dict[int, str]) -> list[int]:
        """Record the native ids; returns the ids whose cancel was requested meanwhile."""
        if not native:
            return []
        return self.journal.set_native_ids(
            ((i, n, str(self.job_home(i))) for i, n in native.items()), state=JobState.QUEUED)

    def _cancel_some(self, native: Mapping[int, str], ids: Sequence[int]) -> None:
        """Cancel the jobs ``ids`` of ``native``: their cancel was asked for (from any process)
        while the batch system had them and their native ids were not known."""
        if ids:
            self.cancel_native([native[i] for i in ids])

    def _mark_unsubmitted(self, ids: Sequence[int], exc: Exception) -> None:
        failed = JobStatus(JobState.FAILED, reason=f"not submitted: {exc}", end_time=time.time())
        self.journal.update([(i, failed) for i in ids], only_if=[JobState.NEW])

    # --- status ---------------------------------------------------------------------------

    def status(self, jobs: Sequence[Job]) -> list[JobStatus]:
        """Through the watcher: at most one native query per poll interval for all callers."""
        return self.watcher.status(jobs)

    def next_poll(self, interval: float, changed: bool) -> float:
        """When the watcher's next query is due."""
        return self.watcher.pause()

    def query(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """One listing for all jobs; jobs it no longer has are resolved by ``resolve_gone``,
        else by their exit-code files."""
        unsubmitted = [r for r in records if not r.job.native_id]
        listing = self.list_jobs(with_tags=bool(unsubmitted))
        native = {r.job.id: r.job.native_id for r in records if r.job.native_id}
        if unsubmitted:
            native.update(self._find_unsubmitted(unsubmitted, listing))
        result: dict[int, JobStatus] = {}
        gone: list[JobRecord] = []
        now = time.time()
        for record in records:
            row = listing.get(native.get(record.job.id, ""))
            if row is not None:
                result[record.job.id] = row.status(record.status)
            elif record.job.id in native or now - (
                    record.status.submit_time or 0) > self.unsubmitted_grace:
                gone.append(record)  # a NEW job without native id may still be in submission
        unknown = self.GONE
        if gone:
            resolved, note = self.resolve_gone(gone, native)
            result.update(resolved)
            gone = [r for r in gone if r.job.id not in resolved]
            unknown = f"{self.GONE}, {note}" if note else self.GONE
        result.update((r.job.id, self._from_exit_file(r, unknown)) for r in gone)
        return result

    def _find_unsubmitted(self, records: Sequence[JobRecord],
                          listing: Mapping[str, Listed]) -> dict[int, str]:
        """Native ids of jobs the batch system accepted but whose submitter died before
        recording them: the tag names the submission, whose task file maps tasks to ids."""
        wanted = {r.job.id for r in records}
        prefix = f"gridcouple:{self.journal_key}:"
        found: dict[int, str] = {}
        submissions: dict[str, list[int]] = {}
        for native_id, row in listing.items():
            if not row.tag.startswith(prefix):
                continue
            first = row.tag[len(prefix):]
            if first not in submissions:
                try:
                    submissions[first] = task_ids(
                        (self.batch_dir / f"{first}.tasks").read_text().splitlines())
                except (OSError, ValueError):
                    submissions[first] = []
            ids, task = submissions[first], self.task_of(native_id)
            if task < len(ids) and ids[task] in wanted:
                found[ids[task]] = native_id
        self._cancel_some(found, self._store_native_ids(found))
        return found

    def _from_exit_file(self, record: JobRecord, unknown: str) -> JobStatus:
        """A job the listing no longer has and ``resolve_gone`` could not resolve: its
        exit-code file decides. ``unknown`` says where else it was looked for."""
        home = Path(record.workdir) if record.workdir else self.job_home(record.job.id)
        try:
            text = (home / EXIT_CODE_FILE).read_text()
        except (FileNotFoundError, NotADirectoryError):
            if record.cancel_requested:
                return JobStatus(JobState.CANCELED, reason=f"canceled; {unknown}",
                                 end_time=time.time())
            return JobStatus(JobState.FAILED, reason=f"{unknown}, and no exit-code file in "
                             f"{home} (killed before it ended, or never started)",
                             end_time=time.time())
        exit_code, signal, start, end = parse_exit_record(text)
        walltime = self.enforced_walltime(record.job.spec)
        if exit_code == 0:
            state = JobState.COMPLETED
        elif signal is not None and record.cancel_requested:
            state = JobState.CANCELED
        elif signal is not None and walltime and end - start >= math.ceil(walltime) - 1:
            state = JobState.TIMEOUT
        else:
            state = JobState.FAILED
        return JobStatus(state, reason=f"from its exit-code file ({unknown})",
                         exit_code=exit_code, signal=signal, start_time=start, end_time=end,
                         host=record.status.host)

    # --- control --------------------------------------------------------------------------

    def cancel_now(self, jobs: Sequence[Job]) -> None:
        """Mark the jobs canceled in the journal and remove them from the batch system."""
        self.journal.request_cancel(job.id for job in jobs)
        native = self._native_ids(jobs)
        if native:
            self.cancel_native(native)
        self.watcher.expect_change()

    def send_signal(self, jobs: Sequence[Job], signal: str) -> None:
        """Signal every process of the running jobs."""
        native = self._native_ids(jobs)
        if native:
            self.signal_native(native, signal)

    def hold(self, jobs: Sequence[Job]) -> None:
        """Keep waiting jobs from starting until released."""
        self.hold_native(self._native_ids(jobs))
        self.watcher.expect_change()

    def release(self, jobs: Sequence[Job]) -> None:
        """Let held jobs start again."""
        self.release_native(self._native_ids(jobs))
        self.watcher.expect_change()

    def _native_ids(self, jobs: Sequence[Job]) -> list[str]:
        """The jobs' native ids from the journal (finding those a dead submitter left out)."""
        records = self.journal.get(job.id for job in jobs)
        if any(not r.job.native_id and not r.status.state.is_final for r in records):
            pending = [r for r in records if not r.status.state.is_final]
            self.record(pending, self.query(pending))
            records = self.journal.get(job.id for job in jobs)
        return [r.job.native_id for r in records
                if r.job.native_id and not r.status.state.is_final]
