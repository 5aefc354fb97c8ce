"""gridcouple: couple simulation codes across machines.

Application servers run as batch jobs through a pluggable backend (local, jobmanager, slurm,
htcondor, simgrid); a dask.distributed coupler steers them and moves fields through zarr.
:class:`Executor` runs Python calls as batch jobs on any of them (docs/tasks.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gridcouple.errors import BackendError, ConfigError, GridcoupleError, JobNotFoundError
from gridcouple.jobs import Job, JobEvent, JobSpec, JobState, JobStatus, Resources, StagedFile

if TYPE_CHECKING:
    from gridcouple.executor import Executor, TaskDiedError, TaskError, TaskFuture

__version__ = "0.1.0"

# Loaded on first use: every task's job imports this package, and should not pay for them.
_LAZY = {"Executor", "TaskDiedError", "TaskError", "TaskFuture"}

__all__ = [
    "BackendError",
    "ConfigError",
    "Executor",
    "GridcoupleError",
    "Job",
    "JobEvent",
    "JobNotFoundError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Resources",
    "StagedFile",
    "TaskDiedError",
    "TaskError",
    "TaskFuture",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("gridcouple.executor"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
