"""The one job model every backend shares: what to run (JobSpec), with what (Resources),
and where it is (JobState, JobStatus, Job).

Backends translate their native states into :class:`JobState` in one table each and keep the
native state string and reason beside it in :class:`JobStatus`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.Enum):
    """Where a job is in its life. ``order`` grows along the normal path; final states end it.

    A job may move back from ACTIVE to QUEUED when the batch system requeues it (Slurm REQUEUED,
    an HTCondor eviction): such a status says so with ``JobStatus.requeue``. Every other move
    goes forward in ``order`` or stays at the same order (QUEUED <-> HELD, ACTIVE <->
    SUSPENDED), and nothing leaves a final state. The journal enforces this on every write.
    """

    NEW = "new"  # recorded, not yet accepted by the batch system
    QUEUED = "queued"  # waiting for resources
    HELD = "held"  # waiting, and will not start until released
    ACTIVE = "active"  # running
    SUSPENDED = "suspended"  # started, then stopped by the batch system; keeps its resources
    COMPLETED = "completed"  # ended with exit code 0
    FAILED = "failed"  # ended with a non-zero exit code, a signal, or a system failure
    CANCELED = "canceled"  # ended because a user (or a policy) canceled it
    TIMEOUT = "timeout"  # ended because it reached its walltime

    @property
    def order(self) -> int:
        """0 before submission, 1 waiting, 2 started, 3 ended."""
        return _ORDER[self]

    @property
    def is_final(self) -> bool:
        """True once the job has ended and its state can no longer change."""
        return _ORDER[self] == 3

    def may_become(self, new: JobState, *, requeue: bool = False) -> bool:
        """Whether a job in this state may be recorded in ``new``: never out of a final state,
        backwards only as an explicit requeue (to a waiting state)."""
        if self.is_final:
            return new is self
        if new.order < self.order:
            return requeue and new.order == 1
        return True

    def __str__(self) -> str:
        return self.value.upper()


_ORDER = {
    JobState.NEW: 0,
    JobState.QUEUED: 1,
    JobState.HELD: 1,
    JobState.ACTIVE: 2,
    JobState.SUSPENDED: 2,
    JobState.COMPLETED: 3,
    JobState.FAILED: 3,
    JobState.CANCELED: 3,
    JobState.TIMEOUT: 3,
}


@dataclass(frozen=True)
class Resources:
    """What a job asks for. ``None`` means "not asked": backends then emit no directive."""

    cpus: int = 1
    memory_mb: int | None = None
    gpus: int = 0
    walltime: float | None = None  # seconds
    nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("cpus", "nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Resources.{name} must be at least 1, got {getattr(self, name)}")
        if self.gpus < 0:
            raise ValueError(f"Resources.gpus must not be negative, got {self.gpus}")
        if self.memory_mb is not None and self.memory_mb <= 0:
            raise ValueError(f"Resources.memory_mb must be positive, got {self.memory_mb}")
        if self.walltime is not None and self.walltime <= 0:
            raise ValueError(f"Resources.walltime must be positive, got {self.walltime}")


@dataclass(frozen=True)
class StagedFile:
    """A file copied into the job's directory before it starts (``source`` is on the submit side)
    or out of it after it ends (``source`` is relative to the job's directory)."""

    source: str
    target: str


@dataclass(frozen=True)
class JobSpec:
    """What to run. Give ``argv`` (a command) or ``script`` (shell script text), not both.

    ``attributes`` pass through to one backend, keyed ``"<backend>.<name>"``, e.g.
    ``{"slurm.partition": "debug", "htcondor.requirements": "Memory > 1024"}``.
    ``estimate`` is the expected run time in seconds; :attr:`expected_runtime` is what the
    live queues and the simulator both read.
    """

    argv: tuple[str, ...] = ()
    script: str | None = None
    name: str = "job"
    environment: Mapping[str, str] = field(default_factory=dict)
    directory: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    resources: Resources = field(default_factory=Resources)
    stage_in: tuple[StagedFile, ...] = ()
    stage_out: tuple[StagedFile, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    estimate: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        if bool(self.argv) == (self.script is not None):
            raise ValueError("JobSpec needs exactly one of argv or script")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", self.name):
            raise ValueError(
                f"JobSpec.name {self.name!r}: use 1-64 letters, digits, '_', '.', '+' or '-'"
            )
        if self.estimate is not None and self.estimate < 0:
            raise ValueError(f"JobSpec.estimate must not be negative, got {self.estimate}")
        for key in self.attributes:
            if "." not in key:
                raise ValueError(f"JobSpec.attributes key {key!r} must be '<backend>.<name>'")

    @property
    def expected_runtime(self) -> float | None:
        """The run time schedulers plan with, one rule everywhere: the estimate when given (0
        means 0 s), else the walltime, else None (unknown)."""
        return self.estimate if self.estimate is not None else self.resources.walltime

    def attributes_for(self, backend: str) -> dict[str, Any]:
        """The attributes meant for ``backend``, with the prefix removed."""
        prefix = backend + "."
        return {k[len(prefix) :]: v for k, v in self.attributes.items() if k.startswith(prefix)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reverses it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(argv=list(self.argv), environment=dict(self.environment),
                    attributes=dict(self.attributes), resources=vars(self.resources).copy(),
                    stage_in=[vars(f).copy() for f in self.stage_in],
                    stage_out=[vars(f).copy() for f in self.stage_out])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec written by :meth:`to_dict`."""
        values = dict(data)
        values["resources"] = Resources(**values.get("resources", {}))
        for key in ("stage_in", "stage_out"):
            values[key] = tuple(StagedFile(**f) for f in values.get(key, ()))
        values["argv"] = tuple(values.get("argv", ()))
        return cls(**values)


@dataclass(frozen=True)
class JobStatus:
    """A job's state at one moment, with the batch system's own words beside ours."""

    state: JobState
    native_state: str = ""
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    submit_time: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    host: str = ""
    observed: float = field(default_factory=time.time)
    requeue: bool = False  # the batch system put a started job back in the queue

    def describe(self) -> str:
        """One line for people: ``FAILED (exit code 3)``, ``QUEUED: PENDING (Resources)``."""
        text = str(self.state)
        if self.native_state and self.native_state.upper() != text:
            text += f": {self.native_state}"
            if self.reason:
                text += f" ({self.reason})"
        elif self.reason:
            text += f" ({self.reason})"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            text += f" [killed by {name}]"
        elif self.exit_code not in (None, 0):
            text += f" [exit code {self.exit_code}]"
        return text


@dataclass(frozen=True)
class Job:
    """A handle on one submitted job: our journal id, the backend and its native id."""

    id: int
    backend: str
    native_id: str
    spec: JobSpec

    def __str__(self) -> str:
        return f"{self.id} ({self.backend} {self.native_id})"


@dataclass(frozen=True)
class JobEvent:
    """One observed change of state."""

    job: Job
    status: JobStatus
    previous: JobState | None


_MEMORY_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_memory(text: str | int) -> int:
    """Memory in MiB from ``512``, ``"512M"``, ``"4G"``, ``"4GB"``, ``"1T"`` (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"memory {text!r}: use a number with an optional unit K, M, G or T")
    value = float(match.group(1)) * _MEMORY_UNITS[match.group(2).upper()]
    return max(1, round(value))


def parse_duration(text: str | float | int) -> float:
    """Seconds from a number, ``"90s"``, ``"5m"``, ``"2h"``, ``"1d"``, or Slurm's forms
    ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    if isinstance(text, int | float):
        return float(text)
    s = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", s)
    if match:
        return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not match:
        raise ValueError(
            f"duration {text!r}: use seconds, '5m', '2h', or Slurm's [D-]HH:MM:SS forms"
        )
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = [*parts, 0, 0][:3]
        return float(int(days) * 86400 + hours * 3600 + minutes * 60 + seconds)
    if len(parts) == 1:  # MM
        return float(parts[0] * 60)
    if len(parts) == 2:  # MM:SS
        return float(parts[0] * 60 + parts[1])
    return float(parts[0] * 3600 + parts[1] * 60 + parts[2])


def format_duration(seconds: float) -> str:
    """``D-HH:MM:SS`` (Slurm's form), rounding up to whole seconds."""
    total = int(-(-seconds // 1))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{clock}" if days else clock
