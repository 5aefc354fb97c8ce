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
from typing import ClassVar, Protocol, TypeVar

from gridcouple.errors import ConfigError, OptionError

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


_V_co = TypeVar("_V_co", covariant=True)


class Lookup(Protocol[_V_co]):
    """``procs[key]`` / ``estimate[key]``: a list indexed by job number or a dict by key."""

    def __getitem__(self, key: int, /) -> _V_co: ...


#: A running job's expected end and key, kept sorted: ``(start + estimate, key)``.
Ends = MutableSequence[tuple[float, int]]


class QueuePolicy(Policy):
    """A policy that works on job keys: the simulator's fast path and ``select`` share it.

    ``by_estimate`` says how the queue is ordered: False by submission, True by estimate
    (then by submission).
    """

    by_estimate: ClassVar[bool] = False
    #: True when ``pick`` only ever starts jobs that fit now, and keeps nothing that must see
    #: every arrival: then the simulator does not call it while no processor is free
    idle_when_full: ClassVar[bool] = False

    @abc.abstractmethod
    def pick(self, now: float, queue: list[int], procs: Lookup[int], estimate: Lookup[float],
             free: int, ends: Ends, known: int = 0) -> list[int]:
        """Start jobs at ``now``: remove them from ``queue``, add them to ``ends``, return them.

        ``queue`` holds the waiting keys in this policy's order, ``procs`` and ``estimate``
        (``INFINITY`` when unknown) answer for waiting and running keys, ``free`` is the number
        of idle processors, ``ends`` the running jobs' expected ends, sorted. ``known`` is a
        hint from the simulator: the first ``known`` queued jobs were all refused at an earlier
        moment with the same running jobs, and nothing ended since.
        """

    def select(
        self,
        now: float,
        waiting: Sequence[WaitingJob],
        running: Sequence[RunningJob],
        capacity: int,
    ) -> list[WaitingJob]:
        procs: dict[int, int] = {}
        estimate: dict[int, float] = {}
        jobs: tuple[WaitingJob | RunningJob, ...] = (*waiting, *running)
        for job in jobs:
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


def start_in_order(now: float, queue: list[int], procs: Lookup[int], estimate: Lookup[float],
                   free: int, ends: Ends) -> tuple[list[int], int]:
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
    idle_when_full = True

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        return start_in_order(now, queue, procs, estimate, free, ends)[0]


class SJF(FCFS):
    """Shortest job first (by estimate; unknown estimates last), no backfilling."""

    name = "sjf"
    by_estimate = True


def shadow_time(now: float, need: int, free: int, procs: Lookup[int],
                ends: Sequence[tuple[float, int]]) -> tuple[float, int, bool]:
    """When ``need`` processors are expected free (never before ``now``), how many more are
    free then (the "extra" processors), and whether that moment is still ahead of ``now``
    (False: the reservation rests on a job that is overdue)."""
    available = free
    running = iter(ends)
    shadow = now
    if available < need:
        for end, key in running:
            available += procs[key]
            if available >= need:
                shadow = end if end > now else now
                break
        else:
            return INFINITY, 0, True
    for end, key in running:  # all that ends by then is free then
        if end > shadow:
            break
        available += procs[key]
    return shadow, available - need, shadow > now


class EASY(QueuePolicy):
    """EASY backfilling: the queue head gets a reservation (the shadow time); a later job may
    start now if it ends by the shadow time, or if it only uses processors the head will not
    need then (the "extra" processors)."""

    name = "easy"
    idle_when_full = True

    def __init__(self) -> None:
        self.reservation: tuple[int, float, int] | None = None  # (head, shadow, extra) left

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        if queue and procs[queue[0]] <= free:
            started, free = start_in_order(now, queue, procs, estimate, free, ends)
        else:
            started = []
        if len(queue) < 2 or free == 0:
            self.reservation = None
            return started
        last = self.reservation
        shadow = extra = None  # found at the first job that fits the free processors
        if known and not started and last is not None and last[0] == queue[0] and last[1] > now:
            shadow, extra, first = last[1], last[2], known  # nothing changed but the clock
        elif known and not started:
            shadow, extra, ahead = shadow_time(now, procs[queue[0]], free, procs, ends)
            first = max(1, known) if ahead else 1
        else:
            first = 1
        limit = INFINITY if shadow is None else shadow - now
        insort = bisect.insort
        count = len(started)
        for key in islice(queue, first, None):
            need = procs[key]
            if need > free:
                continue
            if shadow is None:
                shadow, extra, _ = shadow_time(now, procs[queue[0]], free, procs, ends)
                limit = shadow - now
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
        self.reservation = (queue[0], shadow, extra) if shadow is not None and shadow > now \
            else None
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
        self.vacated: list[tuple[float, int]] = []  # what the last compression moved out of

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        profile = self.profile
        left_free, left_ends, left_queue = self.left
        placed = len(left_queue)  # its own test of what the simulator's ``known`` says
        gains: Gains | None = Gains()
        if not (profile is not None and free == left_free and ends == left_ends
                and queue[:placed] == left_queue and profile.advance(now)):
            # something ended (or the clock passed a reservation): build it all, compress all
            self.reserved = {key: self.reserved[key] for key in queue if key in self.reserved}
            built = Profile.build(now, free, [(end, procs[key]) for end, key in ends],
                                  [(at, estimate[key], procs[key])
                                   for key, at in self.reserved.items()])
            # A reservation was the earliest slot when it was last placed, so only a window
            # that reaches processors which came free since can move it: the rebuilt profile
            # has more than the last one (a job ended early, a cancel), or the last compression
            # or this one moved a reservation out. Over-committed (an overdue job): search all.
            if profile is None or min(built.free) >= 0:
                if profile is not None:
                    built.gained(profile, gains)
                for moment, most in self.vacated:
                    gains.add(moment, most)
            else:
                gains = None
            profile, placed, self.vacated = built, 0, []
        reserved = self.reserved
        started = []
        for key in islice(queue, placed, None):
            need, length = procs[key], estimate[key]
            old = reserved.get(key)
            if old is None:
                at = profile.earliest(need, length)
                profile.reserve(at, length, need)
            else:
                at = old if old > now else now
                if gains is None:
                    moved = None
                else:  # it can only move into a window that reaches such a moment before it
                    since = gains.first(need)
                    moved = at if since >= at else profile.earlier(old, need, length, since)
                if moved != at:  # take it out, note what it leaves free, place it again
                    profile.reserve(old, length, -need)
                    vacated = (at, profile.most_free(at, length))
                    self.vacated.append(vacated)
                    if gains is not None:
                        gains.add(*vacated)
                    at = profile.earliest(need, length) if moved is None else moved
                    profile.reserve(at, length, need)
            if at == now:
                started.append(key)
                reserved.pop(key, None)
                bisect.insort(ends, (expected_end(now, length), key))
            else:
                reserved[key] = at
        if started:
            chosen = set(started)
            queue[:] = [key for key in queue if key not in chosen]
        self.profile = profile
        self.left = (free - sum(procs[key] for key in started), list(ends), list(queue))
        return started


class Gains:
    """Moments from which processors came free, with the most free then: ``first(procs)`` is
    the first moment with at least ``procs`` (INFINITY: none). Kept as a staircase: a moment
    with no more free than an earlier one adds nothing."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.most: list[int] = []  # increasing, as the times

    def add(self, moment: float, most: int) -> None:
        """From ``moment`` on, up to ``most`` processors came free."""
        times, mosts = self.times, self.most
        index = bisect.bisect_right(times, moment)
        if index and mosts[index - 1] >= most:
            return
        end = index
        while end < len(mosts) and mosts[end] <= most:
            end += 1
        times[index:end] = [moment]
        mosts[index:end] = [most]

    def first(self, procs: int) -> float:
        """The first moment from which at least ``procs`` processors came free."""
        index = bisect.bisect_left(self.most, procs)
        return self.times[index] if index < len(self.times) else INFINITY


class Profile:
    """Free processors over time from ``now`` on: a step function kept as two lists."""

    def __init__(self, now: float, free: int) -> None:
        self.times: list[float] = [now]
        self.free: list[int] = [free]

    @classmethod
    def build(cls, now: float, free: int, releases: Sequence[tuple[float, int]],
              reservations: Sequence[tuple[float, float, int]]) -> Profile:
        """The profile with running jobs' ``(expected end, procs)`` (overdue ones count free
        from the next instant) and ``(start, length, procs)`` reservations, in one sweep: the
        same steps as :meth:`reserve` one by one would give."""
        after = math.nextafter(now, INFINITY)
        changes: dict[float, int] = {}
        for end, procs in releases:
            time = max(end, after)
            changes[time] = changes.get(time, 0) + procs
        for start, length, procs in reservations:
            start = max(start, now)
            changes[start] = changes.get(start, 0) - procs
            if length != INFINITY:
                end = start + length if length > 0 else math.nextafter(start, INFINITY)
                changes[end] = changes.get(end, 0) + procs
        free += changes.pop(now, 0)
        profile = cls(now, free)
        times, steps = profile.times, profile.free
        for time in sorted(changes):
            free += changes[time]
            times.append(time)
            steps.append(free)
        return profile

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

    def earlier(self, start: float, procs: int, length: float,
                since: float = -INFINITY) -> float:
        """Where a job reserved at ``start`` in this profile goes when it is placed again:
        what :meth:`earliest` gives once it is taken out, found without taking it out (the
        profile must not be over-committed: then its own slot fits it again).

        Taken out, it needs no processors in its own slot, so a window that starts before the
        slot fits if the steps before the slot have ``procs`` free. The last step before the
        slot that has not (the blocker) splits the answer: the first window that ends by the
        blocker, else the step right after it. ``since``: only a window that reaches this
        moment can fit (no earlier one fitted when the job was last placed, and processors
        came free only from then on)."""
        times, free = self.times, self.free
        own = bisect.bisect_left(times, max(start, times[0]))  # the slot is a step of its own
        blocker = own - 1
        while blocker >= 0 and free[blocker] >= procs:
            blocker -= 1
        if blocker < 0:
            return times[0]
        limit = times[blocker]
        if since < limit:
            stop = min(bisect.bisect_right(times, limit - length), blocker)  # windows that
            while stop < blocker and times[stop] + length <= limit:  # end by the blocker
                stop += 1  # start before ``stop`` (settled on the sums themselves)
            while stop > 0 and times[stop - 1] + length > limit:
                stop -= 1
            if length > 0:  # and reach ``since`` from ``i`` on
                i = bisect.bisect_right(times, since - length)
                while i > 0 and times[i - 1] + length > since:
                    i -= 1
            else:
                i = bisect.bisect_left(times, since)
            found = self._window(i, stop, procs, length)
            if found != INFINITY:
                return found
        return times[blocker + 1]

    def most_free(self, start: float, length: float) -> int:
        """The most free processors at a moment of ``[start, start + length)`` (as reserved)."""
        times = self.times
        start = max(start, times[0])
        end = start + length if length > 0 else math.nextafter(start, INFINITY)
        first = bisect.bisect_left(times, start)
        return max(self.free[first:bisect.bisect_left(times, end, first)])

    def gained(self, old: Profile, gains: Gains) -> None:
        """Add to ``gains`` where this profile has more free processors than ``old``."""
        times, free, old_times, old_free = self.times, self.free, old.times, old.free
        count, old_count = len(times), len(old_times)
        i, k = 0, max(bisect.bisect_right(old_times, times[0]) - 1, 0)
        moment = times[0]
        while i < count:
            if free[i] > old_free[k]:
                gains.add(moment, free[i])
            step = times[i + 1] if i + 1 < count else INFINITY
            old_step = old_times[k + 1] if k + 1 < old_count else INFINITY
            moment = min(step, old_step)
            if step <= old_step:
                i += 1
            if old_step <= step:
                k += 1

    def earliest(self, procs: int, length: float) -> float:
        """The first time from which ``procs`` processors stay free for ``length`` seconds
        (INFINITY: never, the job is wider than the machine)."""
        return self._window(0, len(self.times), procs, length)

    def _window(self, i: int, stop: int, procs: int, length: float) -> float:
        """The first step from index ``i`` (before ``stop``) from which ``procs`` processors
        stay free for ``length`` seconds (INFINITY: none)."""
        times, free = self.times, self.free
        count = len(times)
        while i < stop:
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
        try:  # a user's module: any error at its import is theirs to see, in one line
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:
            raise ConfigError(f"policy {name!r} cannot be imported: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ConfigError(f"policy {name!r} is not a gridcouple.scheduler.policies.Policy")
        return cls()
    known = ", ".join(sorted(POLICIES))
    raise ConfigError(f"unknown policy {name!r}; known: {known}, or package.module:Class")


def check_policy(name: str) -> None:
    """Raise OptionError (key ``policy``) unless :func:`make_policy` can make ``name``, so a
    configuration names a bad policy before a queue needs it."""
    try:
        make_policy(name)
    except ConfigError as exc:
        raise OptionError("policy", str(exc)) from None
