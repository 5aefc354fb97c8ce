"""Durable job records in sqlite, shared by every backend and every process on a state dir.

A job is recorded (state NEW) before the batch system hears of it, so a client killed mid-way
through a submission leaves no job running without a record. Each change of state is appended
to ``events``, which ``wait`` and ``gridcouple status --watch`` follow. WAL mode with
``synchronous=NORMAL``: a commit survives the death of any process; only an operating-system
crash may lose the last transactions.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridcouple.errors import JobNotFoundError
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backend TEXT NOT NULL,
    native_id TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    native_state TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    signal INTEGER,
    submit_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    host TEXT NOT NULL DEFAULT '',
    workdir TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_native ON jobs (backend, native_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (backend, state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    time REAL NOT NULL
);
"""

_STATUS_COLUMNS = (
    "state, native_state, reason, exit_code, signal, submit_time, start_time, end_time, host"
)
_COLUMNS = f"id, backend, native_id, spec, workdir, cancel_requested, extra, {_STATUS_COLUMNS}"


@dataclass(frozen=True)
class JobRecord:
    """One journal row: the job handle, its last known status and backend bookkeeping."""

    job: Job
    status: JobStatus
    workdir: str
    cancel_requested: bool
    extra: dict[str, Any] = field(default_factory=dict)


class Journal:
    """The sqlite journal of one state directory. Safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._specs: dict[int, JobSpec] = {}  # specs never change once recorded
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        # Specs may carry secrets (the coupler's per-application token): owner only. chmod,
        # never open+close: closing any descriptor of the file would drop sqlite's POSIX locks
        # held by other connections of this process, and corrupt the database.
        if self.path.stat().st_mode & 0o077:
            self.path.chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @classmethod
    def existing(cls, path: str | Path) -> Journal | None:
        """The journal at ``path`` when there is one, else None: creates no directory and no
        journal, for commands that only read."""
        return cls(path) if Path(path).is_file() else None

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- writing -------------------------------------------------------------------------

    def add(self, backend: str, specs: Sequence[JobSpec], state: JobState = JobState.NEW,
            extra: Mapping[str, Any] | None = None) -> list[int]:
        """Record new jobs in one transaction; returns their ids in order. ``extra`` is the
        backend's bookkeeping, the same for every job of the call."""
        now = time.time()
        ids: list[int] = []
        extra_json = json.dumps(dict(extra or {}))
        with self.transaction() as db:
            for spec in specs:
                cursor = db.execute(
                    "INSERT INTO jobs (backend, name, spec, state, submit_time, extra) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (backend, spec.name, json.dumps(spec.to_dict()), state.value, now,
                     extra_json),
                )
                assert cursor.lastrowid is not None  # an INSERT sets it
                ids.append(cursor.lastrowid)
            db.executemany("INSERT INTO events (job_id, state, time) VALUES (?, ?, ?)",
                           [(i, state.value, now) for i in ids])
        return ids

    def set_native_ids(self, rows: Iterable[tuple[int, str, str]], state: JobState) -> list[int]:
        """Store (id, native id, work directory) of jobs the batch system accepted, and move
        the ones still NEW to ``state``; a job canceled meanwhile stays canceled. Returns the
        ids whose cancel was requested meanwhile: the batch system has them, so the caller
        cancels them there."""
        rows = list(rows)
        now = time.time()
        ids = [i for i, _, _ in rows]
        with self.transaction() as db:
            found = [row for start in range(0, len(ids), 500) for row in db.execute(
                f"SELECT id, state, cancel_requested FROM jobs WHERE id IN "
                f"({','.join('?' * len(ids[start:start + 500]))})", ids[start:start + 500])]
            new = [(i,) for i, job_state, _ in found if job_state == JobState.NEW.value]
            db.executemany("UPDATE jobs SET native_id = ?, workdir = ? WHERE id = ?",
                           [(native, workdir, i) for i, native, workdir in rows])
            db.executemany(f"UPDATE jobs SET state = '{state.value}' WHERE id = ?", new)
            db.executemany("INSERT INTO events (job_id, state, time) VALUES (?, ?, ?)",
                           [(i, state.value, now) for (i,) in new])
        return [i for i, _, cancel_requested in found if cancel_requested]

    def update(self, changes: Iterable[tuple[int, JobStatus]], *,
               only_if: Sequence[JobState] | None = None) -> list[int]:
        """Store new statuses; appends an event where the state changed. With ``only_if``, a
        job changes only while its state is one of those. A status that would break the state
        order (:meth:`JobState.may_become`: leave a final state, or move back without being a
        requeue) is not stored: it is stale, seen by a poller before a newer one wrote. Returns
        the ids that changed."""
        changed = []
        with self.transaction() as db:
            for job_id, status in changes:
                if self._set_status(db, job_id, status, only_if):
                    changed.append(job_id)
        return changed

    def _set_status(self, db: sqlite3.Connection, job_id: int, status: JobStatus,
                    only_if: Sequence[JobState] | None) -> bool:
        row = db.execute("SELECT state, submit_time, start_time, end_time FROM jobs WHERE id = ?",
                         (job_id,)).fetchone()
        if row is None:
            return False
        current = JobState(row[0])
        if only_if is not None and current not in only_if:
            return False
        if not current.may_become(status.state, requeue=status.requeue):
            if current is not status.state:
                log.debug("job %d: kept %s, not the stale %s", job_id, current, status.state)
            return False
        db.execute(
            "UPDATE jobs SET state = ?, native_state = ?, reason = ?, exit_code = ?, signal = ?,"
            " start_time = ?, end_time = ?, host = ? WHERE id = ?",
            (status.state.value, status.native_state, status.reason, status.exit_code,
             status.signal, _either(status.start_time, row[2]), _either(status.end_time, row[3]),
             status.host, job_id),
        )
        if row[0] != status.state.value:
            db.execute("INSERT INTO events (job_id, state, time) VALUES (?, ?, ?)",
                       (job_id, status.state.value, status.observed))
        return True

    def set_extra(self, values: Mapping[int, Mapping[str, Any]]) -> None:
        """Merge backend bookkeeping (pids, paths ...) into jobs' ``extra``, in one transaction."""
        with self.transaction() as db:
            for job_id, more in values.items():
                row = db.execute("SELECT extra FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise JobNotFoundError(f"no job {job_id} in {self.path}")
                extra = {**json.loads(row[0]), **more}
                db.execute("UPDATE jobs SET extra = ? WHERE id = ?", (json.dumps(extra), job_id))

    def request_cancel(self, ids: Iterable[int]) -> None:
        """Mark jobs for cancellation; the backend acts on the mark."""
        with self.transaction() as db:
            db.executemany("UPDATE jobs SET cancel_requested = 1 WHERE id = ?",
                           [(i,) for i in ids])

    # --- reading -------------------------------------------------------------------------

    def get(self, ids: Iterable[int]) -> list[JobRecord]:
        """Records for these ids, in the same order; raises JobNotFoundError for a missing one."""
        wanted = list(ids)
        found: dict[int, JobRecord] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk):
                record = self._record(row)
                found[record.job.id] = record
        missing = [i for i in wanted if i not in found]
        if missing:
            raise JobNotFoundError(f"no job {missing[0]} in the journal {self.path}")
        return [found[i] for i in wanted]

    def find_native(self, backend: str, native_id: str) -> JobRecord | None:
        """The record of a backend's native job id, if it was submitted through gridcouple."""
        rows = self._query(f"SELECT {_COLUMNS} FROM jobs WHERE backend = ? AND native_id = ?",
                           (backend, native_id))
        return self._record(rows[0]) if rows else None

    def records(self, backend: str | None = None, *, active_only: bool = False,
                limit: int | None = None) -> list[JobRecord]:
        """Records newest last; ``active_only`` keeps jobs whose state is not final."""
        where, params = [], []
        if backend:
            where.append("backend = ?")
            params.append(backend)
        if active_only:
            finals = [s.value for s in JobState if s.is_final]
            where.append(f"state NOT IN ({','.join('?' * len(finals))})")
            params.extend(finals)
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(limit)}) ORDER BY id"
        return [self._record(row) for row in self._query(sql, params)]

    def state_counts(self, backend: str | None = None) -> dict[JobState, int]:
        """How many jobs are in each state (states without jobs are left out)."""
        sql = "SELECT state, COUNT(*) FROM jobs"
        rows = self._query(sql + (" WHERE backend = ? GROUP BY state" if backend else
                                  " GROUP BY state"), (backend,) if backend else ())
        return {JobState(state): count for state, count in rows}

    def live_states(self, backend: str) -> list[tuple[int, JobState, bool]]:
        """(id, state, cancel requested) of a backend's jobs not yet final, oldest first; a
        cheap query for daemons that keep the specs they already know."""
        finals = [s.value for s in JobState if s.is_final]
        rows = self._query(
            f"SELECT id, state, cancel_requested FROM jobs WHERE backend = ? AND state NOT IN "
            f"({','.join('?' * len(finals))}) ORDER BY id", (backend, *finals))
        return [(i, JobState(state), bool(cancel)) for i, state, cancel in rows]

    def last_event(self) -> int:
        """The newest event's sequence number (0 when there is none)."""
        return self._query("SELECT COALESCE(MAX(seq), 0) FROM events", ())[0][0]

    def events_since(self, seq: int, first_id: int = 0, last_id: int = 2**62,
                     ) -> list[tuple[int, int, JobState, float]]:
        """Events after ``seq`` of jobs with ids in [first_id, last_id], as (seq, job id,
        state, time), oldest first."""
        rows = self._query("SELECT seq, job_id, state, time FROM events WHERE seq > ? AND "
                           "job_id BETWEEN ? AND ? ORDER BY seq", (seq, first_id, last_id))
        return [(s, j, JobState(st), t) for s, j, st, t in rows]

    def _record(self, row: tuple[Any, ...]) -> JobRecord:
        (job_id, backend, native_id, spec_json, workdir, cancel_requested, extra,
         state, native_state, reason, exit_code, signal, submit, start, end, host) = row
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = JobSpec.from_dict(json.loads(spec_json))
        status = JobStatus(state=JobState(state), native_state=native_state, reason=reason,
                           exit_code=exit_code, signal=signal, submit_time=submit,
                           start_time=start, end_time=end, host=host)
        return JobRecord(job=Job(id=job_id, backend=backend, native_id=native_id, spec=spec),
                         status=status, workdir=workdir, cancel_requested=bool(cancel_requested),
                         extra=json.loads(extra))

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()


def _either(new: float | None, old: float | None) -> float | None:
    """A time as newly seen, else as known (0 is a time: the simulator's clock starts there)."""
    return old if new is None else new
