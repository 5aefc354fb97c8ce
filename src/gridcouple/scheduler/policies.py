"""Scheduling policies: which waiting jobs start now.

One code for the live slot-limited queues (local backend, JobManager) and for the simulator:
a policy sees the waiting jobs in submit order, the running jobs and the capacity, and answers
which waiting jobs to start at ``now``. It keeps no clock of its own, so the same object works in
real time and in simulated time.

The built-in policies (:class:`QueuePolicy`) do their work in :meth:`QueuePolicy.pick`, on job
keys and plain containers; ``select`` converts the job objects and calls ``pick``, and the
simulator calls ``pick`` directly on the containers it keeps up to date, so that nothing is
rebuilt per event. A policy of a user's own only needs ``select``; the simulator runs it too.

Unknown run times (``estimate=None``, possible in a live queue): a waiting job with no estimate
is never backfilled into the hole before a reservation (it could run forever), but it may use
processors no reservation needs (EASY's "extra" processors) and it starts normally when its turn
comes. A running job with no estimate, or one that has run past its estimate, "may end at any
moment": reservations count its processors as free from the next instant on. That choice is
the one that never lets a backfilled job delay the job at the head of the queue.
"""

from __future__ import annotations

import abc
import bisect
import importlib
import math
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import ClassVar, Protocol

from gridcouple.errors import ConfigError

INFINITY = math.inf


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


class Lookup(Protocol):
    """``procs[key]`` / ``estimate[key]``: a list indexed by job number or a dict by key."""

    def __getitem__(self, key: int, /) -> float: ...


#: A running job's expected end and key, kept sorted: ``(start + estimate, key)``.
Ends = MutableSequence[tuple[float, int]]


class QueuePolicy(Policy):
    """A policy that works on job keys: the simulator's fast path and ``select`` share it.

    ``by_estimate`` says how the queue is ordered: False by submission, True by estimate
    (then by submission).
    """

    by_estimate: ClassVar[bool] = False

    @abc.abstractmethod
    def pick(self, now: float, queue: list[int], procs: Lookup, estimate: Lookup, free: int,
             ends: Ends, known: int = 0) -> list[int]:
        """Start jobs at ``now``: remove them from ``queue``, add them to ``ends``, return them.

        ``queue`` holds the waiting keys in this policy's order, ``procs`` and ``estimate``
        (``INFINITY`` when unknown) answer for waiting and running keys, ``free`` is the number
        of idle processors, ``ends`` the running jobs' expected ends, sorted. ``known`` is a
        hint from the simulator: the first ``known`` queued jobs were all refused at an earlier
        moment with the same running jobs, and nothing ended since.
        """

    def select(self, now, waiting, running, capacity):
        procs: dict[int, int] = {}
        estimate: dict[int, float] = {}
        for job in (*waiting, *running):
            procs[job.key] = job.procs
            estimate[job.key] = INFINITY if job.estimate is None else job.estimate
        ends = sorted((expected_end(r.start_time, estimate[r.key]), r.key) for r in running)
        queue = [job.key for job in waiting]
        if self.by_estimate:
            order = {key: index for index, key in enumerate(queue)}
            queue.sort(key=lambda key: (estimate[key], order[key]))
        free = capacity - sum(r.procs for r in running)
        chosen = set(self.pick(now, queue, procs, estimate, free, ends))
        return [job for job in waiting if job.key in chosen]


def expected_end(start: float, estimate: float) -> float:
    """When a running job is expected to end; an unknown estimate means "at any moment"."""
    return start if estimate == INFINITY else start + estimate


def start_in_order(now: float, queue: list[int], procs: Lookup, estimate: Lookup, free: int,
                   ends: Ends) -> tuple[list[int], int]:
    """Start queued jobs from the head while they fit; returns them and the free procs left."""
    started = []
    for key in queue:
        need = procs[key]
        if need > free:
            break
        free -= need
        started.append(key)
        bisect.insort(ends, (expected_end(now, estimate[key]), key))
    if started:
        del queue[: len(started)]
    return started, free


class FCFS(QueuePolicy):
    """First come, first served: start jobs in submit order until the head does not fit."""

    name = "fcfs"

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        return start_in_order(now, queue, procs, estimate, free, ends)[0]


class SJF(FCFS):
    """Shortest job first (by estimate; unknown estimates last), no backfilling."""

    name = "sjf"
    by_estimate = True


def shadow_time(now: float, need: int, free: int, procs: Lookup,
                ends: Sequence[tuple[float, int]]) -> tuple[float, int, bool]:
    """When ``need`` processors are expected free (never before ``now``), how many more are
    free then (the "extra" processors), and whether that moment is still ahead of ``now``
    (False: the reservation rests on a job that is overdue)."""
    available = free
    count = len(ends)
    index = 0
    while index < count and available < need:
        available += procs[ends[index][1]]
        index += 1
    if available < need:
        return INFINITY, 0, True
    shadow = max(ends[index - 1][0], now) if index else now
    while index < count and ends[index][0] <= shadow:  # all that ends by then is free then
        available += procs[ends[index][1]]
        index += 1
    return shadow, available - need, shadow > now


class EASY(QueuePolicy):
    """EASY backfilling: the queue head gets a reservation (the shadow time); a later job may
    start now if it ends by the shadow time, or if it only uses processors the head will not
    need then (the "extra" processors)."""

    name = "easy"

    def __init__(self) -> None:
        self.reservation: tuple[int, float, int] | None = None  # (head, shadow, extra) left

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        started, free = start_in_order(now, queue, procs, estimate, free, ends)
        if len(queue) < 2 or free == 0:
            self.reservation = None
            return started
        last = self.reservation
        if known and not started and last is not None and last[0] == queue[0] and last[1] > now:
            shadow, extra, first = last[1], last[2], known  # nothing changed but the clock
        else:
            shadow, extra, ahead = shadow_time(now, procs[queue[0]], free, procs, ends)
            first = max(1, known) if ahead and not started else 1
        limit = shadow - now
        insort = bisect.insort
        count = len(started)
        for key in islice(queue, first, None):
            need = procs[key]
            if need > free:
                continue
            length = estimate[key]
            if length > limit:
                if need > extra:
                    continue
                extra -= need
            free -= need
            started.append(key)
            insort(ends, (expected_end(now, length), key))
            if free == 0:
                break
        for key in started[count:]:
            queue.remove(key)
        self.reservation = (queue[0], shadow, extra) if shadow > now else None
        return started


class Conservative(QueuePolicy):
    """Conservative backfilling: every waiting job holds a reservation, made when it is first
    seen; a job starts now when its reservation can be moved to now. After a job ends, every
    reservation is moved as early as it can go, in queue order (compression); none ever moves
    later, so no job is delayed by a later one."""

    name = "conservative"

    def __init__(self) -> None:
        self.reserved: dict[int, float] = {}
        # what the last pass left: its profile (every reservation in it), free procs, running
        # jobs and queue; when only new jobs came since, the next pass places just those
        self.profile: Profile | None = None
        self.left: tuple[int, list[tuple[float, int]], list[int]] = (0, [], [])

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        profile = self.profile
        left_free, left_ends, left_queue = self.left
        placed = len(left_queue)  # its own test of what the simulator's ``known`` says
        if not (profile is not None and free == left_free and ends == left_ends
                and queue[:placed] == left_queue and profile.advance(now)):
            # something ended (or the clock passed a reservation): build it all, compress all
            profile = Profile(now, free)
            for end, key in ends:
                profile.release(max(end, math.nextafter(now, INFINITY)), procs[key])
            self.reserved = {key: self.reserved[key] for key in queue if key in self.reserved}
            for key, at in self.reserved.items():
                profile.reserve(at, estimate[key], procs[key])
            placed = 0
        reserved = self.reserved
        started = []
        for key in islice(queue, placed, None):
            need, length = procs[key], estimate[key]
            old = reserved.pop(key, None)
            if old is not None:
                profile.reserve(old, length, -need)  # take it out, then place it again
            at = profile.earliest(need, length)
            profile.reserve(at, length, need)
            if at == now:
                started.append(key)
                bisect.insort(ends, (expected_end(now, length), key))
            else:
                reserved[key] = at
        if started:
            chosen = set(started)
            queue[:] = [key for key in queue if key not in chosen]
        self.profile = profile
        self.left = (free - sum(procs[key] for key in started), list(ends), list(queue))
        return started


class Profile:
    """Free processors over time from ``now`` on: a step function kept as two lists."""

    def __init__(self, now: float, free: int) -> None:
        self.times: list[float] = [now]
        self.free: list[int] = [free]

    def advance(self, now: float) -> bool:
        """Move the start to ``now``; False when a step begins in between (then rebuild)."""
        if len(self.times) > 1 and self.times[1] <= now:
            return False
        self.times[0] = now
        return True

    def _point(self, time: float) -> int:
        """The index of the step starting at ``time`` (split a step if needed)."""
        index = bisect.bisect_right(self.times, time) - 1
        if self.times[index] == time:
            return index
        self.times.insert(index + 1, time)
        self.free.insert(index + 1, self.free[index])
        return index + 1

    def release(self, time: float, procs: int) -> None:
        """``procs`` processors become free at ``time`` for good."""
        index = self._point(time)
        free = self.free
        for i in range(index, len(free)):
            free[i] += procs

    def reserve(self, start: float, length: float, procs: int) -> None:
        """Take ``procs`` processors over ``[start, start + length)`` (negative: give back); a
        zero-length job holds them for an instant."""
        start = max(start, self.times[0])
        first = self._point(start)
        end = start + length if length > 0 else math.nextafter(start, INFINITY)
        last = len(self.times) if length == INFINITY else self._point(end)
        free = self.free
        for i in range(first, last):
            free[i] -= procs

    def earliest(self, procs: int, length: float) -> float:
        """The first time from which ``procs`` processors stay free for ``length`` seconds
        (INFINITY: never, the job is wider than the machine)."""
        times, free = self.times, self.free
        count = len(times)
        i = 0
        while i < count:
            if free[i] < procs:
                i += 1
                continue
            start = times[i]
            end = start + length
            j = i + 1
            while j < count and times[j] < end and free[j] >= procs:
                j += 1
            if j == count or times[j] >= end:
                return start
            i = j + 1
        return INFINITY


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (FCFS, SJF, EASY, Conservative)}


def make_policy(name: str) -> Policy:
    """A policy by its name (``fcfs``, ``sjf``, ``easy``, ``conservative``) or by
    ``package.module:Class`` for your own."""
    if name in POLICIES:
        return POLICIES[name]()
    if ":" in name:
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

