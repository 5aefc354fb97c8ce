"""The Backend protocol every batch system implements, and the helpers they share.

A backend is written for real batch systems, not only for processes: ``submit`` takes many
specs in one call, ``status`` answers for many jobs with one native query, and ``wait`` /
``events`` are built here once on top of ``status`` with backoff (one watcher, like submitit).
Every job is in the journal before ``submit`` returns.
"""

from __future__ import annotations

import abc
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from gridcouple.errors import BackendError, QueryUnavailableError
from gridcouple.jobs import Job, JobEvent, JobSpec, JobState, JobStatus
from gridcouple.scheduler.journal import JobRecord, Journal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoOptions:
    """A backend that takes no options."""


@dataclass(frozen=True)
class Backoff:
    """Poll intervals: start at ``first``, grow by ``factor`` while nothing changes, cap at
    ``most``; after ``give_up`` seconds of failed queries in a row, stop retrying."""

    first: float = 0.05
    most: float = 2.0
    factor: float = 1.5
    give_up: float = 120.0


class Backend(abc.ABC):
    """One batch system. Subclasses implement ``submit``, ``query`` and ``cancel``.

    ``Options`` is the dataclass validated from the ``[backend.NAME]`` config table.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    backoff: ClassVar[Backoff] = Backoff()
    single_host: ClassVar[bool] = False  # True: every job runs on the submitting machine

    def __init__(self, options: Any, *, state_dir: Path, journal: Journal | None = None) -> None:
        self.options = options
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._own_journal = journal is None
        self.journal = journal or Journal(self.state_dir / "journal.sqlite")

    # --- what each backend implements ---------------------------------------------------

    @abc.abstractmethod
    def submit(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Submit many jobs in as few native calls as the batch system allows."""

    @abc.abstractmethod
    def query(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """The current status of jobs not yet final, by journal id, in ONE native query.

        Raise QueryUnavailableError when the batch system cannot answer right now.
        """

    @abc.abstractmethod
    def cancel_now(self, jobs: Sequence[Job]) -> None:
        """Cancel jobs at once: waiting jobs leave the queue, running jobs are stopped."""

    def send_signal(self, jobs: Sequence[Job], signal: str) -> None:
        """Send ``signal`` (a name such as ``"USR1"``) to every process of the running jobs."""
        raise BackendError(f"the {self.name} backend cannot signal jobs")

    def hold(self, jobs: Sequence[Job]) -> None:
        """Keep waiting jobs from starting until released."""
        raise BackendError(f"the {self.name} backend cannot hold jobs")

    def release(self, jobs: Sequence[Job]) -> None:
        """Let held jobs start again."""
        raise BackendError(f"the {self.name} backend cannot release jobs")

    def close(self) -> None:
        """Release client resources; submitted jobs go on running."""
        if self._own_journal:
            self.journal.close()

    # --- shared on top of the journal and query -----------------------------------------

    def cancel(self, jobs: Sequence[Job], *, signal: str | None = None,
               grace: float = 10.0) -> None:
        """Cancel jobs. With ``signal`` (e.g. ``"USR1"``, for a code that checkpoints on it),
        running jobs get that signal first and ``grace`` seconds to end on their own."""
        if signal:
            self.send_signal(jobs, signal)
            self.wait(jobs, timeout=grace)
        self.cancel_now(jobs)

    def status(self, jobs: Sequence[Job]) -> list[JobStatus]:
        """Statuses in the order of ``jobs``; final ones come from the journal unqueried."""
        records = self.journal.get(job.id for job in jobs)
        pending = [r for r in records if not r.status.state.is_final]
        fresh = self.query(pending) if pending else {}
        changes = [(r.job.id, fresh[r.job.id]) for r in pending
                   if r.job.id in fresh and _differs(r.status, fresh[r.job.id])]
        if changes:
            self.journal.update(changes)
        return [fresh.get(r.job.id, r.status) for r in records]

    def events(self, jobs: Sequence[Job], *, timeout: float | None = None) -> Iterator[JobEvent]:
        """Yield every observed change of state until all jobs are final or ``timeout`` passes.

        Polls with backoff (reset when something changes); a batch system that cannot answer
        is retried, not taken as a failure, for up to ``backoff.give_up`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        known: dict[int, JobState | None] = {job.id: None for job in jobs}
        interval = self.backoff.first
        failing_since: float | None = None
        while True:
            try:
                statuses = self.status(jobs)
                failing_since = None
            except QueryUnavailableError as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.backoff.give_up:
                    raise
                log.warning("%s: status query failed, retrying: %s", self.name, exc)
                statuses = None
            changed = False
            for job, status in zip(jobs, statuses or (), strict=False):
                if known[job.id] != status.state:
                    yield JobEvent(job=job, status=status, previous=known[job.id])
                    known[job.id] = status.state
                    changed = True
            if statuses is not None and all(s.state.is_final for s in statuses):
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            interval = self.backoff.first if changed else min(interval * self.backoff.factor,
                                                              self.backoff.most)
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(pause, 0.0))

    def wait(self, jobs: Sequence[Job], *, until: Literal["all", "any"] = "all",
             timeout: float | None = None) -> list[JobStatus]:
        """Block until all (or any) jobs are final or ``timeout`` passes; returns statuses."""
        latest: dict[int, JobStatus] = {}
        for event in self.events(jobs, timeout=timeout):
            latest[event.job.id] = event.status
            if until == "any" and event.status.state.is_final:
                break
        return [latest.get(job.id) or self.status([job])[0] for job in jobs]

    def job(self, job_id: int) -> Job:
        """The handle of a job in this backend's journal."""
        record = self.journal.get([job_id])[0]
        if record.job.backend != self.name:
            raise BackendError(f"job {job_id} belongs to the {record.job.backend} backend")
        return record.job

    def reattach(self, native_id: str) -> Job:
        """The handle of a job by its native id (from this or an earlier process)."""
        record = self.journal.find_native(self.name, native_id)
        if record is None:
            raise BackendError(f"the {self.name} backend has no job {native_id!r} in "
                               f"{self.journal.path}")
        return record.job

    # --- files ----------------------------------------------------------------------------

    def job_home(self, job_id: int) -> Path:
        """Where a job's stdout, stderr and bookkeeping live: ``state_dir/jobs/ID``."""
        return job_home(self.state_dir, job_id)

    def output_path(self, job: Job, stream: Literal["stdout", "stderr"]) -> Path:
        """The file a job's stdout or stderr goes to."""
        return output_file(job.spec, self.job_home(job.id), stream)

    def read_output(self, job: Job, stream: Literal["stdout", "stderr"] = "stdout",
                    tail: int | None = None) -> str:
        """The text a job wrote to stdout or stderr so far (the last ``tail`` lines)."""
        path = self.output_path(job, stream)
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "".join(text.splitlines(keepends=True)[-tail:]) if tail else text

    def stage_in(self, spec: JobSpec, home: Path) -> None:
        """Create the job's home and copy its input files into its working directory."""
        home.mkdir(parents=True, exist_ok=True)
        workdir = working_directory(spec, home)
        for staged in spec.stage_in:
            target = workdir / staged.target
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                copy = shutil.copytree if Path(staged.source).is_dir() else shutil.copy2
                copy(staged.source, target)
            except OSError as exc:
                raise BackendError(f"job {spec.name}: cannot stage in {staged.source}: "
                                   f"{exc.strerror or exc}") from exc

    def fetch(self, job: Job, destination: str | Path) -> list[Path]:
        """Copy the job's stage-out files to ``destination``; returns the copied paths."""
        workdir = working_directory(job.spec, self.job_home(job.id))
        destination = Path(destination)
        copied = []
        for staged in job.spec.stage_out:
            source, target = workdir / staged.source, destination / staged.target
            if not source.exists():
                raise BackendError(f"job {job.id}: output {staged.source} was not produced "
                                   f"(looked in {workdir})")
            target.parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if source.is_dir() else shutil.copy2
            copy(source, target)
            copied.append(target)
        return copied

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def job_home(state_dir: Path, job_id: int) -> Path:
    """A job's home below a state directory: ``state_dir/jobs/ID``."""
    return Path(state_dir) / "jobs" / str(job_id)


def working_directory(spec: JobSpec, home: Path) -> Path:
    """Where a job runs: its own ``directory`` or else its home."""
    return Path(spec.directory).expanduser() if spec.directory else home


def output_file(spec: JobSpec, home: Path, stream: Literal["stdout", "stderr"]) -> Path:
    """The file a job's stdout or stderr goes to: as the spec says (relative paths from its
    working directory), else ``home/stdout`` and ``home/stderr``."""
    chosen = getattr(spec, stream)
    if chosen is None:
        return home / stream
    path = Path(chosen)
    return path if path.is_absolute() else working_directory(spec, home) / path


def _differs(old: JobStatus, new: JobStatus) -> bool:
    return (old.state, old.native_state, old.reason, old.exit_code, old.host) != (
        new.state, new.native_state, new.reason, new.exit_code, new.host)
