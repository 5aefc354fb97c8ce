"""``gridcouple.Executor``: Python calls as batch jobs on any backend (docs/tasks.md).

The job side (:mod:`gridcouple.executor.runner`) imports this package too, so the names here
load on first use: a task's start-up does not pay for the backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gridcouple.executor.core import (
        Executor,
        PredictedCall,
        RemoteTraceback,
        TaskDiedError,
        TaskError,
        TaskFuture,
    )

__all__ = ["Executor", "PredictedCall", "RemoteTraceback", "TaskDiedError", "TaskError",
           "TaskFuture"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("gridcouple.executor.core"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
