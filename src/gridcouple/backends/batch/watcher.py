"""One status watcher per backend instance (submitit's InfoWatcher, made durable by the journal).

Every caller of ``status`` (the coupler's members, ``wait``, ``events``, ``status --watch``)
goes through it. It remembers every job any caller asked about and, when a poll is due, asks
the batch system about ALL of them in one native query; between polls it answers from the
journal. So there is at most one native query per poll interval, whatever the number of jobs or
callers. The interval follows the backend's backoff: short after a change, growing while
nothing changes; a submission, cancel, hold or release through the backend makes the next call
poll. Final states are read from the journal and never asked for again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from gridcouple.backends.base import Backend, statuses_after
from gridcouple.errors import QueryUnavailableError
from gridcouple.jobs import Job, JobStatus
from gridcouple.journal import JobRecord


class StatusWatcher:
    """Shares native status queries among every caller of one backend instance."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.queries = 0  # native queries made, for tests and benchmarks
        self._lock = threading.Lock()
        self._watched: set[int] = set()
        self._interval = backend.backoff.first
        self._due = 0.0  # monotonic time of the next native query
        self._expected = 0  # expect_change calls, to tell whether one came during a query

    def status(self, jobs: Sequence[Job]) -> list[JobStatus]:
        """Statuses in the order of ``jobs``: fresh when a poll was due, else as last seen."""
        journal = self.backend.journal
        with self._lock:
            records = journal.get(job.id for job in jobs)
            self._watched.update(r.job.id for r in records if not r.status.state.is_final)
            changed: list[int] = []
            if self._watched and time.monotonic() >= self._due:
                changed = self._poll(records)
        return statuses_after(journal, records, changed)

    def _poll(self, known: Sequence[JobRecord]) -> list[int]:
        """One native query for every watched job not yet final (``known``: records just
        read); returns the ids whose record changed."""
        backoff = self.backend.backoff
        others = self._watched - {r.job.id for r in known}
        records = [r for r in [*known, *self.backend.journal.get(sorted(others))]
                   if not r.status.state.is_final]  # known ones not final are watched
        self._watched = {r.job.id for r in records}
        if not records:
            return []
        self.queries += 1
        expected = self._expected
        try:
            fresh = self.backend.query(records)
        except QueryUnavailableError:
            self._due = time.monotonic() + self._interval
            raise
        changed = self.backend.record(records, fresh)
        if self._expected != expected:  # a change was announced while the query ran
            self._interval, self._due = backoff.first, 0.0
            return changed
        states = {r.job.id: r.status.state for r in records}
        moved = any(fresh[i].state is not states[i] for i in changed)
        self._interval = backoff.first if moved else min(self._interval * backoff.factor,
                                                         backoff.most)
        self._due = time.monotonic() + self._interval
        return changed

    def expect_change(self) -> None:
        """Jobs were just submitted, canceled, held or released through this backend: what
        was seen before is out of date, so the next caller's status polls (once, for all).
        Without the lock: a submit must not wait for another thread's query under way (which
        then leaves the next poll due at once, as it may have missed the change)."""
        self._expected += 1
        self._interval = self.backend.backoff.first
        self._due = 0.0

    def pause(self) -> float:
        """Seconds until the next native query is due."""
        return max(0.0, self._due - time.monotonic()) + 0.001
