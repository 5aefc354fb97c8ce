"""The job event log of a state directory (``htcondor/events.log``), followed by any number of
processes: what was read (the pickled ``JobEventLog`` reader with its offset, and a row per job)
is kept in ``events.state`` beside it, under a file lock, so a process resumes after the last
event any process read. A log that is missing, unreadable, truncated or replaced is reported,
never taken as the jobs' end: the backend then asks the schedd.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import htcondor2

from gridcouple.backends.batch import one_line
from gridcouple.backends.htcondor.states import CondorRow, apply_event

PRUNE_AFTER = 3600.0  # seconds a final job stays in events.state (then the history answers)


@dataclass
class Followed:
    """What was read of the log (and learnt from the schedd), shared between processes."""

    reader: bytes | None = None  # the pickled JobEventLog
    inode: int = 0
    offset: int = 0
    rows: dict[str, CondorRow] = field(default_factory=dict)
    reconciled: float = 0.0  # time.time() of the last schedd query
    retrieved: set[str] = field(default_factory=set)  # spooled jobs whose output came back
    changed: bool = False  # since loaded: to be saved


class EventLog:
    """``directory/events.log`` and the state of its readers (see the module docstring)."""

    def __init__(self, directory: Path, warn: Callable[[str], None]) -> None:
        self.directory = directory
        self.path = directory / "events.log"
        self.warn = warn
        self._lock = threading.Lock()
        self._followed = Followed()
        self._stamp: int | None = None  # mtime of events.state when this process last had it

    @contextlib.contextmanager
    def state(self) -> Iterator[Followed]:
        """The followed state, loaded again when another process saved it since; saved after
        (when it changed), less the jobs that ended more than PRUNE_AFTER ago."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "events.state"
        with self._lock, open(self.directory / "events.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime_ns != self._stamp:
                    try:
                        self._followed = pickle.loads(path.read_bytes())
                    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
                        self._followed = Followed()
            followed = self._followed
            yield followed
            if not followed.changed:
                return
            old = time.time() - PRUNE_AFTER
            for native_id in [n for n, row in followed.rows.items()
                              if row.final and (row.end_time or 0) < old]:
                del followed.rows[native_id]
                followed.retrieved.discard(native_id)
            followed.changed = False
            temporary = path.with_suffix(".part")
            temporary.write_bytes(pickle.dumps(followed))
            temporary.replace(path)
            self._stamp = path.stat().st_mtime_ns

    def read(self, followed: Followed) -> bool:
        """Apply the new events to ``followed``; False when the log is missing or unreadable,
        or was truncated or replaced (then read again from its start): the schedd must say
        what was lost."""
        path = str(self.path)
        try:
            stat = os.stat(path)
            whole = (followed.reader is not None and stat.st_ino == followed.inode
                     and stat.st_size >= followed.offset)
            reader = (pickle.loads(followed.reader) if whole and followed.reader
                      else htcondor2.JobEventLog(path))
            for event in reader.events(stop_after=0):
                apply_event(followed.rows, event)
                followed.changed = True
            offset = reader.__getstate__()[1]  # what pickling keeps
        except (OSError, htcondor2.HTCondorException) as exc:
            self.warn(f"the event log {path} cannot be read; asking the schedd at each poll: "
                      f"{one_line(str(exc))}")
            return False
        broken = followed.reader is not None and not whole
        if broken:
            self.warn(f"the event log {path} was truncated or replaced; read again from its "
                      "start, and the schedd asked")
        if not whole or (stat.st_ino, offset) != (followed.inode, followed.offset):
            followed.reader, followed.inode, followed.offset = (pickle.dumps(reader),
                                                                stat.st_ino, offset)
            followed.changed = True
        return not broken
