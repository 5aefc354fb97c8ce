"""Functions the Executor and BatchCluster tests run as jobs. No pytest here: HTCondor's jobs
import this module in the pool's chroot, whose Python has gridcouple's dependencies only."""

from __future__ import annotations

import os
import signal
import sys
import time


class TaskFailed(Exception):
    """Raised on purpose by :func:`fail`."""


def square(x: float) -> float:
    return x * x


def add(x: float, y: float = 0.0) -> float:
    return x + y


def fail(message: str) -> None:
    raise TaskFailed(message)  # the line the remote traceback must show


def killed_after(text: str) -> None:
    """Write ``text`` to stderr, then die by SIGKILL: no outcome."""
    print(text, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_then(seconds: float, value: object = None) -> object:
    print("sleeping", file=sys.stderr, flush=True)
    time.sleep(seconds)
    return value


def whoami() -> tuple[int, str]:
    """The job's uid and interpreter (HTCondor's run as the pool's job user)."""
    return os.getuid(), sys.executable
