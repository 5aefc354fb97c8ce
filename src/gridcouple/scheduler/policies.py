"""Scheduling policies: which waiting jobs start now.

One code for the live slot-limited queues (local backend, JobManager) and for the simulator:
a policy sees the waiting jobs in submit order, the running jobs and the capacity, and answers
which waiting jobs to start at ``now``. It keeps no clock of its own, so the same object works in
real time and in simulated time.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from gridcouple.errors import ConfigError


@dataclass(slots=True)
class WaitingJob:
    """A job in the queue. ``estimate`` is its expected run time in seconds (None: unknown)."""

    key: int
    procs: int
    submit_time: float
    estimate: float | None = None


@dataclass(slots=True)
class RunningJob:
    """A job holding ``procs`` processors since ``start_time``."""

    key: int
    procs: int
    start_time: float
    estimate: float | None = None


class Policy(abc.ABC):
    """Decides which waiting jobs start now. Subclass it to plug in a policy of your own."""

    name: ClassVar[str]

    @abc.abstractmethod
    def select(
        self,
        now: float,
        waiting: Sequence[WaitingJob],
        running: Sequence[RunningJob],
        capacity: int,
    ) -> list[WaitingJob]:
        """The waiting jobs to start at ``now``; their procs fit in the free capacity."""


class FCFS(Policy):
    """First come, first served: start jobs in submit order until the head does not fit."""

    name = "fcfs"

    def select(self, now, waiting, running, capacity):
        free = capacity - sum(job.procs for job in running)
        started = []
        for job in waiting:
            if job.procs > free:
                break
            started.append(job)
            free -= job.procs
        return started


POLICIES: dict[str, type[Policy]] = {FCFS.name: FCFS}


def make_policy(name: str) -> Policy:
    """A policy by its name (``fcfs`` ...) or by ``package.module:Class`` for your own."""
    if name in POLICIES:
        return POLICIES[name]()
    if ":" in name:
        import importlib

        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"policy {name!r} cannot be imported: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ConfigError(f"policy {name!r} is not a gridcouple.scheduler.policies.Policy")
        return cls()
    known = ", ".join(sorted(POLICIES))
    raise ConfigError(f"unknown policy {name!r}; known: {known}, or package.module:Class")
