"""A discrete-event engine in simulated time: jobs arrive, a policy starts them, they end.

Nothing runs: a job's run time is a number (its ``work``: seconds on a speed-1 worker, or what
a cost function says for the workers it gets). The machine is P identical processors, or
workers with a speed factor and an availability trace (intervals in which a worker runs at a
fraction of its speed, as PyMW's SimWorker; 0 pauses it). A job holds ``procs`` workers and
runs, at each moment, at the pace of the one that is slowest then (speed x availability).

At each moment the engine first ends the jobs due, then queues the jobs that arrive, then asks
the policy once (not while no processor is free, if the policy is ``idle_when_full``).
Built-in policies are called through their fast :meth:`QueuePolicy.pick` path on containers
kept up to date here; any other :class:`Policy` is called through ``select``.

A job that runs longer than its ``limit`` (its walltime; for a trace, the requested time) is
killed there with ``kill_at_limit`` (what a batch system does) or else runs to its end (what a
trace records). The policy only ever sees ``estimate``.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gridcouple.errors import GridcoupleError
from gridcouple.scheduler.policies import (
    INFINITY,
    Policy,
    QueuePolicy,
    RunningJob,
    WaitingJob,
    expected_end,
)


class SimulationError(GridcoupleError):
    """The simulation cannot go on (a job that never fits, a policy that overfills)."""


class SimState(enum.IntEnum):
    """Where a simulated job is."""

    PENDING = 0  # its submit time is still ahead
    WAITING = 1
    RUNNING = 2
    COMPLETED = 3
    KILLED = 4  # reached its limit with kill_at_limit
    CANCELED = 5

    @property
    def is_final(self) -> bool:
        """True once the job has ended."""
        return self >= SimState.COMPLETED


@dataclass(frozen=True, slots=True)
class Worker:
    """A worker: ``speed`` relative to 1, and ``availability`` intervals ``(start, end,
    fraction)`` during which it runs at ``fraction`` of its speed (1 outside them)."""

    name: str
    speed: float = 1.0
    availability: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"worker {self.name}: speed must be positive, got {self.speed}")
        for start, end, fraction in self.availability:
            if not (end > start and 0 <= fraction <= 1):
                raise ValueError(f"worker {self.name}: availability ({start}, {end}, {fraction})"
                                 " needs end > start and a fraction in [0, 1]")

    def fraction(self, time: float) -> float:
        """The share of its speed the worker has at ``time``."""
        for start, end, fraction in self.availability:
            if start <= time < end:
                return fraction
        return 1.0


@dataclass(frozen=True)
class Machine:
    """What jobs run on: identical processors, or workers of their own speed."""

    workers: tuple[Worker, ...]

    def __post_init__(self) -> None:
        if not self.workers:
            raise ValueError("a machine needs at least one worker")

    @classmethod
    def processors(cls, count: int) -> Machine:
        """``count`` identical processors, always available."""
        if count < 1:
            raise ValueError(f"a machine needs at least one processor, got {count}")
        return cls(tuple(Worker(f"p{i}") for i in range(count)))

    @property
    def capacity(self) -> int:
        """The number of processors (workers)."""
        return len(self.workers)

    @property
    def uniform(self) -> bool:
        """True when every worker has speed 1 and no availability trace."""
        return all(w.speed == 1.0 and not w.availability for w in self.workers)


#: ``duration(job, worker)``: seconds the job needs on that worker at full availability.
CostFunction = Callable[["SimJob", Worker], float]


@dataclass(slots=True)
class SimJob:
    """A job as the engine sees it: ``work`` is its run time on a speed-1 worker, ``estimate``
    what the policy is told (INFINITY: unknown), ``limit`` where it is killed with
    ``kill_at_limit``; ``payload`` is the caller's (a JobSpec, a trace row ...)."""

    submit: float
    procs: int
    estimate: float
    work: float
    limit: float = INFINITY
    payload: Any = None


@dataclass
class Simulator:
    """Simulated time over one machine and one policy. Add jobs with :meth:`submit`, move time
    with :meth:`step` or :meth:`run`; results are in ``start``, ``end`` and ``state``."""

    machine: Machine
    policy: Policy
    kill_at_limit: bool = False
    duration: CostFunction | None = None
    now: float = 0.0
    jobs: list[SimJob] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    state: list[SimState] = field(default_factory=list)
    placement: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.capacity = self.machine.capacity
        self.free = self.capacity
        self._fast = isinstance(self.policy, QueuePolicy)
        self._by_estimate = self._fast and self.policy.by_estimate  # type: ignore[attr-defined]
        self._uniform = self.machine.uniform and self.duration is None
        self._procs: list[int] = []
        self._estimate: list[float] = []
        self._work: list[float] = []
        self._limit: list[float] = []
        self._arrivals: list[tuple[float, int]] = []  # sorted by time, consumed from _next
        self._next = 0
        self._due: list[tuple[float, int]] = []  # heap of (end, job) for running jobs
        self._queue: list[int] = []  # waiting jobs in the policy's order (fast path)
        self._ends: list[tuple[float, int]] = []  # expected ends of running jobs, sorted
        self._known = 0  # queued jobs refused with the current running set
        self._doomed: set[int] = set()  # running jobs that will be killed at their limit
        self._waiting: dict[int, WaitingJob] = {}  # select() path
        self._running: dict[int, RunningJob] = {}
        self._idle = list(range(self.capacity))  # worker indices, fastest first
        speed = [w.speed for w in self.machine.workers]
        self._idle.sort(key=lambda i: -speed[i])

    # --- input --------------------------------------------------------------------------

    def submit(self, job: SimJob) -> int:
        """Add a job (its submit time must not be in the past); returns its number."""
        return self.add([job])[0]

    def add(self, jobs: Sequence[SimJob]) -> range:
        """Add many jobs at once (faster than one by one); returns their numbers."""
        for job in jobs:
            if job.submit < self.now:
                raise SimulationError(f"job submitted at {job.submit}, but the clock is at "
                                      f"{self.now}")
            if not 1 <= job.procs <= self.capacity:
                raise SimulationError(f"a job of {job.procs} processors never fits a machine "
                                      f"of {self.capacity}")
        first = len(self.jobs)
        numbers = range(first, first + len(jobs))
        self.jobs.extend(jobs)
        self._procs.extend([job.procs for job in jobs])
        self._estimate.extend([job.estimate for job in jobs])
        self._work.extend([job.work for job in jobs])
        self._limit.extend([job.limit for job in jobs])
        self.start.extend([math.nan] * len(jobs))
        self.end.extend([math.nan] * len(jobs))
        self.state.extend([SimState.PENDING] * len(jobs))
        pending = self._arrivals[self._next:]
        pending += [(job.submit, number) for job, number in zip(jobs, numbers, strict=True)]
        pending.sort()  # Timsort: linear when the jobs come in submit order
        self._arrivals[self._next:] = pending
        return numbers

    def cancel(self, number: int) -> None:
        """End a job now: it leaves the queue, or stops running."""
        state = self.state[number]
        if state.is_final:
            return
        if state == SimState.PENDING:
            self._arrivals.remove((self.jobs[number].submit, number))
        elif state == SimState.WAITING:
            if self._fast:
                self._queue.remove(number)
            else:
                del self._waiting[number]
            self._known = 0
        else:
            self._release(number)
            self._due.remove((self.end[number], number))
            heapq.heapify(self._due)
        self.end[number] = self.now
        self.state[number] = SimState.CANCELED
        self.wake(self.now)  # the policy may start others now

    def wake(self, at: float) -> None:
        """Ask the policy again at ``at`` even if nothing else happens then."""
        heapq.heappush(self._due, (max(at, self.now), -1))

    def stranded(self) -> int:
        """How many jobs wait while nothing is left to happen (a policy that let an idle
        machine stay idle); 0 while the simulation can go on."""
        if self.next_event() != INFINITY:
            return 0
        return sum(1 for state in self.state if state == SimState.WAITING)

    # --- time ---------------------------------------------------------------------------

    def next_event(self) -> float:
        """When something happens next (INFINITY: nothing will)."""
        arrival = self._arrivals[self._next][0] if self._next < len(self._arrivals) else INFINITY
        due = self._due[0][0] if self._due else INFINITY
        return min(arrival, due)

    def step(self) -> bool:
        """Handle the next moment at which something happens; False when nothing is left."""
        return self._advance(INFINITY, 1) > 0

    def run(self, until: float = INFINITY) -> None:
        """Handle every moment up to ``until`` (all of them by default); the clock ends there."""
        self._advance(until, None)
        if until != INFINITY:
            self.now = max(self.now, until)

    def _advance(self, until: float, steps: int | None) -> int:
        arrivals, due, procs, estimate = self._arrivals, self._due, self._procs, self._estimate
        state, start, end = self.state, self.start, self.end
        queue, ends = self._queue, self._ends
        fast, by_estimate, uniform = self._fast, self._by_estimate, self._uniform
        policy = self.policy
        # the fast path's policy (``fast`` is ``isinstance(policy, QueuePolicy)``), else None
        pick = policy.pick if fast and isinstance(policy, QueuePolicy) else None
        idle_when_full = fast and self.policy.idle_when_full  # type: ignore[attr-defined]
        work, limit, kill = self._work, self._limit, self.kill_at_limit
        jobs = self.jobs
        waiting, running, completed = SimState.WAITING, SimState.RUNNING, SimState.COMPLETED
        killed, doomed = SimState.KILLED, self._doomed
        heappush, heappop, bisect_left = heapq.heappush, heapq.heappop, bisect.bisect_left
        free, known, nxt, count = self.free, self._known, self._next, len(arrivals)
        done = 0
        while steps is None or done < steps:
            now = arrivals[nxt][0] if nxt < count else INFINITY
            if due and due[0][0] < now:
                now = due[0][0]
            if now == INFINITY or now > until:
                break
            self.now = now
            while due and due[0][0] == now:
                number = heappop(due)[1]
                if number < 0:  # a wake-up call (see cancel)
                    continue
                free += procs[number]
                if state[number] == running:
                    state[number] = killed if number in doomed else completed
                if fast:
                    length = estimate[number]
                    expected = start[number] if length == INFINITY else start[number] + length
                    ends.pop(bisect_left(ends, (expected, number)))
                else:
                    del self._running[number]
                if not uniform:
                    self._give_back(number)
                known = 0
            while nxt < count and arrivals[nxt][0] == now:
                number = arrivals[nxt][1]
                nxt += 1
                state[number] = waiting
                if not fast:
                    job = jobs[number]
                    self._waiting[number] = WaitingJob(number, job.procs, job.submit,
                                                       _known_or_none(job.estimate))
                elif by_estimate:
                    bisect.insort(queue, number, key=estimate.__getitem__)
                else:
                    queue.append(number)
            if pick is not None:  # the fast path
                if free == 0 and idle_when_full:
                    done += 1  # nothing can start; the next call comes after a job ended
                    continue
                started = pick(now, queue, procs, estimate, free, ends, known)
            else:
                started = self._select(now, free)
            for number in started:
                free -= procs[number]
                state[number] = running
                start[number] = now
                if uniform:
                    length = work[number]
                    finish = now + length
                else:
                    finish = self._place(number, now)
                    length = finish - now
                if kill and length > limit[number]:
                    finish = now + limit[number]
                    doomed.add(number)
                end[number] = finish
                heappush(due, (finish, number))
            if free < 0:
                raise SimulationError(f"policy {self.policy.name} overfilled the machine at "
                                      f"{now}")
            known = 0 if by_estimate else len(queue)
            done += 1
        self.free, self._known, self._next = free, known, nxt
        return done

    # --- the select() path ----------------------------------------------------------------

    def _select(self, now: float, free: int) -> list[int]:
        waiting = list(self._waiting.values())
        if not waiting:
            return []
        chosen = self.policy.select(now, waiting, list(self._running.values()), self.capacity)
        started = []
        for job in chosen:
            if self._waiting.pop(job.key, None) is None:
                raise SimulationError(f"policy {self.policy.name} started job {job.key}, which "
                                      "is not waiting")
            free -= job.procs
            if free < 0:
                raise SimulationError(f"policy {self.policy.name} overfilled the machine at "
                                      f"{now}")
            self._running[job.key] = RunningJob(job.key, job.procs, now, job.estimate)
            started.append(job.key)
        return started

    # --- workers ------------------------------------------------------------------------

    def _place(self, number: int, now: float) -> float:
        """Give the job the idle workers that would end it first on their own (a paused or
        slow worker last; ties: the fastest first); returns when it ends."""
        job = self.jobs[number]
        workers = self.machine.workers
        seconds = {i: self.duration(job, workers[i]) if self.duration
                   else job.work / workers[i].speed for i in self._idle}

        def end_alone(index: int) -> float:
            try:
                return finish_time(now, [(workers[index], seconds[index])])
            except SimulationError:  # never available again: the last choice
                return INFINITY

        alone = {i: end_alone(i) for i in self._idle}
        chosen = tuple(heapq.nsmallest(job.procs, self._idle, key=alone.__getitem__))
        for index in chosen:
            self._idle.remove(index)
        self.placement[number] = chosen
        return finish_time(now, [(workers[i], seconds[i]) for i in chosen])

    def _give_back(self, number: int) -> None:
        speed = [w.speed for w in self.machine.workers]
        for index in self.placement.get(number, ()):
            bisect.insort(self._idle, index, key=lambda i: -speed[i])

    def _release(self, number: int) -> None:
        """Free a running job's processors now (cancel)."""
        self.free += self._procs[number]
        if self._fast:
            key = (expected_end(self.start[number], self._estimate[number]), number)
            self._ends.pop(bisect.bisect_left(self._ends, key))
        else:
            del self._running[number]
        if not self._uniform:
            self._give_back(number)
        self._known = 0


def finish_time(start: float, needs: Sequence[tuple[Worker, float]]) -> float:
    """When a job started at ``start`` ends on several workers at once, each given with the
    seconds it needs for the job at full availability. At each moment the job goes at the pace
    of the worker that is slowest then (its availability over its seconds); a worker that
    needs no time never holds it back, so a job that needs none anywhere ends at ``start``."""
    longest = max(seconds for _, seconds in needs)
    if longest <= 0:
        return start
    # each worker's pace relative to the slowest one at full availability (which has 1)
    paces = [(worker, longest / seconds) for worker, seconds in needs if seconds > 0]
    edges = sorted({t for worker, _ in paces for a, b, _ in worker.availability
                    for t in (a, b) if t > start})
    now, left = start, longest
    for edge in [*edges, INFINITY]:
        rate = min(worker.fraction(now) * pace for worker, pace in paces)
        if rate > 0 and now + left / rate <= edge:
            return now + left / rate
        if edge == INFINITY:
            break
        left -= rate * (edge - now)
        now = edge
    raise SimulationError("a job never finishes: its workers are never available again")


def _known_or_none(estimate: float) -> float | None:
    return None if estimate == INFINITY else estimate


def simulate(jobs: Sequence[SimJob], policy: Policy, machine: Machine | int, *,
             kill_at_limit: bool = False, duration: CostFunction | None = None) -> Simulator:
    """Run ``jobs`` to the end under ``policy``; returns the finished simulator."""
    if isinstance(machine, int):
        machine = Machine.processors(machine)
    simulator = Simulator(machine, policy, kill_at_limit=kill_at_limit, duration=duration)
    simulator.add(jobs)
    simulator.run()
    if simulator.stranded():
        raise SimulationError(f"policy {simulator.policy.name} left {simulator.stranded()} "
                              "jobs waiting with nothing left to happen")
    return simulator
