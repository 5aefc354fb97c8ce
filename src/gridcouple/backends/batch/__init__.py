"""The shared core of batch systems: see :mod:`gridcouple.backends.batch.core`."""

from gridcouple.backends.batch.core import BatchBackend, Listed, Shape
from gridcouple.backends.batch.tools import ToolRunner, one_line
from gridcouple.backends.batch.watcher import StatusWatcher

__all__ = ["BatchBackend", "Listed", "Shape", "StatusWatcher", "ToolRunner", "one_line"]
