"""The Backend protocol every batch system and site implements.

A backend is written for real batch systems, not only for processes: ``submit`` takes many
specs in one call, ``status`` answers for many jobs with one native query, and ``wait`` /
``events`` are built here once on top of ``status`` with backoff. Every job is in the journal
before ``submit`` returns. Batch systems driven by commands or bindings (Slurm, HTCondor, PBS)
build on :mod:`gridcouple.backends.batch`, which adds the shared submit skeleton, job script and
status watcher.
"""

from __future__ import annotations

import abc
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from gridcouple.errors import BackendError, QueryUnavailableError
from gridcouple.jobs import Job, JobEvent, JobSpec, JobState, JobStatus
from gridcouple.journal import JobRecord, Journal

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
    """One batch system, or one site. Subclasses implement ``submit``, ``query``,
    ``cancel_now``, ``read_output`` and ``fetch``; everything else is shared here.

    ``kind`` names the implementation (``"slurm"``); ``name`` names this instance, as
    configured (a ``[backend.NAME]`` table, ``kind`` by default): journal records carry it, so
    two sites of one kind keep their jobs apart. ``Options`` is the dataclass validated from the
    instance's config table. Nothing here assumes a job's files are local paths: a backend on a
    file system the jobs share gets its file operations from
    :class:`gridcouple.backends.shared_fs.SharedFileSystem`; a remote one implements them over
    its own protocol.
    """

    kind: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    backoff: Backoff = Backoff()  # a subclass or an instance may set its own
    hosts_applications: ClassVar[bool] = True  # False: nothing really runs (a simulator)

    def __init__(self, options: Any, *, state_dir: Path, journal: Journal | None = None,
                 name: str | None = None, python: str | None = None) -> None:
        self.options = options
        self.name = name or self.kind
        self.python = python or sys.executable  # the interpreter application servers run with
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

    @abc.abstractmethod
    def read_output(self, job: Job, stream: Literal["stdout", "stderr"] = "stdout",
                    tail: int | None = None) -> str:
        """The text a job wrote to stdout or stderr so far (the last ``tail`` lines); "" when
        it has written nothing yet."""

    @abc.abstractmethod
    def fetch(self, job: Job, destination: str | Path) -> list[Path]:
        """Copy the job's stage-out files to ``destination`` (here); returns the copied paths."""

    def send_signal(self, jobs: Sequence[Job], signal: str) -> None:
        """Send ``signal`` (a name such as ``"USR1"``) to every process of the running jobs."""
        raise BackendError(f"the {self.name} backend cannot signal jobs")

    def hold(self, jobs: Sequence[Job]) -> None:
        """Keep waiting jobs from starting until released."""
        raise BackendError(f"the {self.name} backend cannot hold jobs")

    def release(self, jobs: Sequence[Job]) -> None:
        """Let held jobs start again."""
        raise BackendError(f"the {self.name} backend cannot release jobs")

    @property
    def end_grace(self) -> float:
        """Seconds a canceled running job may take to end (its SIGTERM-to-SIGKILL grace plus the
        batch system's own delay); the coupler waits this long after cancelling."""
        return 10.0

    def field_store_base(self) -> str | None:
        """A directory of this machine under which application servers of this backend can
        keep field versions that every other application of a session reads directly; None
        when there is no such place: then each application server keeps its versions in its
        own host's scratch and serves them to the others (gridcouple.appkit.remote)."""
        return None

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
        return self.statuses_of(self.journal.get(job.id for job in jobs))

    def statuses_of(self, records: Sequence[JobRecord]) -> list[JobStatus]:
        """The base :meth:`status`, for jobs whose journal records the caller has read
        already (one native query for those not final; batch backends' ``status`` goes
        through their watcher instead)."""
        pending = [r for r in records if not r.status.state.is_final]
        changed = self.record(pending, self.query(pending) if pending else {})
        return statuses_after(self.journal, records, changed)

    def record(self, records: Sequence[JobRecord], fresh: dict[int, JobStatus]) -> list[int]:
        """Write the statuses of a query that differ from the records into the journal (which
        keeps the state order: a stale status does not overwrite a newer one); returns the ids
        whose record changed."""
        changes = [(r.job.id, fresh[r.job.id]) for r in records
                   if r.job.id in fresh and _differs(r.status, fresh[r.job.id])]
        return self.journal.update(changes) if changes else []

    def stderr_tail(self, job: Job, lines: int = 20) -> str:
        """The last ``lines`` lines of a job's stderr, for error messages."""
        return self.read_output(job, "stderr", tail=lines)

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
            interval = self.next_poll(interval, changed)
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(pause, 0.0))

    def next_poll(self, interval: float, changed: bool) -> float:
        """Seconds until ``events`` looks again, after a look that took ``interval`` and did
        (or did not) see a change: backoff, reset by a change."""
        if changed:
            return self.backoff.first
        return min(interval * self.backoff.factor, self.backoff.most)

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

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def statuses_after(journal: Journal, records: Sequence[JobRecord],
                   changed: Sequence[int]) -> list[JobStatus]:
    """The statuses of ``records`` once the ids in ``changed`` were written: those read again
    (the journal merges what a query did not say), the others as they were."""
    wanted = set(changed)
    again = {r.job.id: r.status for r in journal.get(r.job.id for r in records
                                                     if r.job.id in wanted)}
    return [again.get(r.job.id, r.status) for r in records]


def _differs(old: JobStatus, new: JobStatus) -> bool:
    return (old.state, old.native_state, old.reason, old.exit_code, old.host) != (
        new.state, new.native_state, new.reason, new.exit_code, new.host)
