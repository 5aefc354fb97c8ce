"""The discrete-event engine: properties on random workloads (hypothesis), workers with speeds
and availability, overruns, cancellation."""

from __future__ import annotations

import bisect
import math
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gridcouple.scheduler.engine import (
    Machine,
    SimJob,
    SimState,
    SimulationError,
    Simulator,
    Worker,
    finish_time,
    simulate,
)
from gridcouple.scheduler.policies import (
    EASY,
    Conservative,
    Policy,
    Profile,
    expected_end,
    make_policy,
)
from test_policies import ViaSelect

# GRIDCOUPLE_EXAMPLES=2000 for a deeper search than CI's
PROPERTY = settings(max_examples=int(os.environ.get("GRIDCOUPLE_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def workloads(draw, max_jobs: int = 25) -> tuple[int, list[SimJob]]:
    """A machine size and jobs whose estimates are never below their run time."""
    capacity = draw(st.integers(1, 8))
    count = draw(st.integers(1, max_jobs))
    jobs = []
    for _ in range(count):
        run = draw(st.integers(0, 30))
        estimate = run + draw(st.sampled_from([0, 0, 1, 5, 40]))
        jobs.append(SimJob(submit=draw(st.integers(0, 60)), procs=draw(st.integers(1, capacity)),
                           estimate=estimate, work=run, limit=estimate))
    return capacity, sorted(jobs, key=lambda j: j.submit)


def busy_peak(sim: Simulator) -> int:
    events = sorted([(e, -j.procs) for j, e in zip(sim.jobs, sim.end, strict=True)]
                    + [(s, j.procs) for j, s in zip(sim.jobs, sim.start, strict=True)])
    busy = peak = 0
    for _, change in events:  # ends sort before starts at the same time
        busy += change
        peak = max(peak, busy)
    return peak


@pytest.mark.parametrize("name", ["fcfs", "sjf", "easy", "conservative"])
@PROPERTY
@given(workload=workloads())
def test_every_policy_respects_capacity_and_submit_times(name, workload):
    capacity, jobs = workload
    sim = simulate(jobs, make_policy(name), capacity, kill_at_limit=True)
    assert all(state == SimState.COMPLETED for state in sim.state)
    assert busy_peak(sim) <= capacity
    for job, start, end in zip(jobs, sim.start, sim.end, strict=True):
        assert start >= job.submit
        assert end == start + job.work
    # the fast path and select() agree: one policy code for the simulator and the live queue
    assert simulate(jobs, ViaSelect(make_policy(name)), capacity, kill_at_limit=True).start \
        == sim.start


@PROPERTY
@given(workload=workloads())
def test_fcfs_starts_in_submit_order(workload):
    capacity, jobs = workload
    sim = simulate(jobs, make_policy("fcfs"), capacity)
    assert sim.start == sorted(sim.start)


def head_reservation(now, queue, procs, estimate, free, ends) -> tuple[int, float] | None:
    """The job EASY must protect at ``now`` and its shadow time, worked out here from the
    running jobs' expected ends before ``pick`` runs: the jobs that fit from the head start
    now, the first that does not is the head, and its shadow time is the first expected end
    (of a running job, or of one just started) by which enough processors are free."""
    releases = [(end, procs[key]) for end, key in ends]
    for head in queue:
        if procs[head] > free:
            break
        free -= procs[head]
        releases.append((now + estimate[head], procs[head]))
    else:
        return None
    for end, released in sorted(releases):
        free += released
        if free >= procs[head]:
            return head, max(end, now)
    return head, math.inf


class WatchedEASY(EASY):
    """EASY, noting before each call the reservation of the head it must not delay."""

    def __init__(self) -> None:
        super().__init__()
        self.promised: dict[int, float] = {}

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        reservation = head_reservation(now, queue, procs, estimate, free, ends)
        if reservation is not None:
            head, shadow = reservation
            self.promised[head] = min(shadow, self.promised.get(head, math.inf))
        return super().pick(now, queue, procs, estimate, free, ends, known)


class WatchedConservative(Conservative):
    """Conservative, checking that a reservation it made only ever moves earlier."""

    def __init__(self) -> None:
        super().__init__()
        self.promised: dict[int, float] = {}

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        started = super().pick(now, queue, procs, estimate, free, ends, known)
        for key, at in self.reserved.items():
            assert at <= self.promised.get(key, math.inf)
            self.promised[key] = at
        return started


# the head starts at 0; the next one (3 procs) is blocked until 10 and the last one (20 s)
# must not be backfilled in front of it in that same call
HEAD_STARTED_IN_THE_SAME_CALL = (3, [SimJob(0, 1, 10, 10, 10), SimJob(0, 3, 5, 5, 5),
                                     SimJob(0, 1, 20, 20, 20)])


@pytest.mark.parametrize("watched", [WatchedEASY, WatchedConservative])
@PROPERTY
@given(workload=workloads())
@example(workload=HEAD_STARTED_IN_THE_SAME_CALL)
def test_no_job_starts_after_a_reservation_it_was_given(watched, workload):
    # EASY: the head never starts after the shadow time it had when it became (or stayed) the
    # head; conservative: no job starts after any reservation it was given
    capacity, jobs = workload
    policy = watched()
    sim = simulate(jobs, policy, capacity, kill_at_limit=True)
    for key, at in policy.promised.items():
        assert sim.start[key] <= at


def test_overrun_is_killed_at_the_limit_or_let_run():
    job = SimJob(submit=0, procs=1, estimate=10, work=25, limit=10)
    killed = simulate([job], make_policy("fcfs"), 1, kill_at_limit=True)
    assert (killed.end, killed.state) == ([10], [SimState.KILLED])
    let_run = simulate([job], make_policy("fcfs"), 1)
    assert (let_run.end, let_run.state) == ([25], [SimState.COMPLETED])


def test_workers_with_speeds_and_availability():
    # the slow worker runs at half speed, and not at all between 10 and 20
    slow = Worker("slow", speed=0.5, availability=((10, 20, 0.0),))
    machine = Machine((Worker("fast", speed=2.0), slow))
    jobs = [SimJob(0, 1, 100, 8), SimJob(0, 1, 100, 8), SimJob(0, 2, 100, 4)]
    sim = simulate(jobs, make_policy("fcfs"), machine)
    assert sim.placement == {0: (0,), 1: (1,), 2: (0, 1)}
    # job 0: 8 s of work at speed 2 = 4 s; job 1: 16 s at speed 0.5, paused over [10, 20) -> 26
    # job 2 waits for both workers and runs at the slow one's pace: 4 / 0.5 = 8 s
    assert sim.start == [0, 0, 26]
    assert sim.end == [4, 26, 34]


def test_cost_function_decides_durations():
    machine = Machine((Worker("a"), Worker("b", speed=3.0)))
    cost = {"a": 7.0, "b": 2.0}
    sim = simulate([SimJob(0, 1, 1, 0, payload="x")], make_policy("fcfs"), machine,
                   duration=lambda job, worker: cost[worker.name])
    assert sim.end == [2.0]  # the fastest idle worker is chosen first


def test_finish_time_needs_an_available_worker():
    never = Worker("never", availability=((0, math.inf, 0.0),))
    with pytest.raises(SimulationError, match="never available"):
        finish_time(0, [(never, 5)])


def test_a_job_on_several_workers_goes_at_the_pace_of_the_slowest_at_each_moment():
    # a speed 1 at 50 % and b speed 0.5 at 100 %: each does 10 s of work in 20 s, so do both
    half = Worker("a", availability=((0, 100, 0.5),))
    slow = Worker("b", speed=0.5)
    for machine in (Machine((half,)), Machine((slow,)), Machine((half, slow))):
        width = machine.capacity
        assert simulate([SimJob(0, width, 100, 10)], make_policy("fcfs"), machine).end == [20]
    # the slowest one changes: a (speed 1) at 25 % over [0, 8) and from 16 on, b (speed 0.5)
    # paused over [20, 22). Work done: 0.25 x 8 = 2 by 8 (a is slower), 0.5 x 8 = 4 more by 16
    # (b is), 0.25 x 4 = 1 more by 20 (a), none by 22, the last 3 at 0.25 by 34
    a = Worker("a", availability=((0, 8, 0.25), (16, 40, 0.25)))
    b = Worker("b", speed=0.5, availability=((20, 22, 0.0),))
    sim = simulate([SimJob(0, 2, 100, 10)], make_policy("fcfs"), Machine((a, b)))
    assert (sim.placement, sim.end) == ({0: (0, 1)}, [34])
    # with a cost function: 8 s on a, at 25 % until 8: a quarter of the job by then (b alone
    # would have done 8 of its 12 s); then b is the slower: 3/4 of its 12 s, 9 s more
    cost = {"a": 8.0, "b": 12.0}
    early = Worker("a", availability=((0, 8, 0.25),))
    sim = simulate([SimJob(0, 2, 100, 0)], make_policy("fcfs"), Machine((early, Worker("b"))),
                   duration=lambda job, worker: cost[worker.name])
    assert sim.end == [17]


def test_cancel_waiting_and_running_jobs_frees_the_machine():
    sim = Simulator(Machine.processors(1), make_policy("fcfs"))
    first, second, third = sim.add([SimJob(0, 1, 50, 50), SimJob(0, 1, 5, 5), SimJob(1, 1, 5, 5)])
    sim.run(until=2)
    assert sim.state[first] == SimState.RUNNING
    sim.cancel(second)
    sim.cancel(first)
    sim.run()
    assert [sim.state[first], sim.state[second], sim.state[third]] == [SimState.CANCELED] * 2 + [
        SimState.COMPLETED]
    assert (sim.start[third], sim.end[third]) == (2, 7)


def test_bad_jobs_and_policies_are_refused():
    sim = Simulator(Machine.processors(2), make_policy("fcfs"))
    with pytest.raises(SimulationError, match="3 processors never fits a machine of 2"):
        sim.submit(SimJob(0, 3, 1, 1))

    class Greedy(Policy):
        name = "greedy"

        def select(self, now, waiting, running, capacity):
            return list(waiting)

    with pytest.raises(SimulationError, match="greedy overfilled the machine"):
        simulate([SimJob(0, 2, 1, 1), SimJob(0, 2, 1, 1)], Greedy(), 2)


class Patient(Policy):
    """Starts nothing before t=5."""

    name = "patient"

    def select(self, now, waiting, running, capacity):
        return list(waiting[:1]) if now >= 5 else []


def test_a_policy_that_idles_is_caught_or_woken():
    with pytest.raises(SimulationError, match="patient left 1 jobs waiting with nothing left"):
        simulate([SimJob(0, 1, 1, 1)], Patient(), 1)
    sim = Simulator(Machine.processors(1), Patient())
    sim.add([SimJob(0, 1, 1, 1)])
    sim.run()
    assert sim.stranded() == 1
    sim.wake(5)
    sim.run()
    assert (sim.stranded(), sim.start, sim.end) == (0, [5], [6])


class PreviousConservative(Conservative):
    """The conservative backfilling this module's faster one replaced, kept as the reference:
    after anything ended it rebuilds the profile reservation by reservation and takes every
    reservation out and searches it again, in queue order."""

    def pick(self, now, queue, procs, estimate, free, ends, known=0):
        profile = self.profile
        left_free, left_ends, left_queue = self.left
        placed = len(left_queue)
        if not (profile is not None and free == left_free and ends == left_ends
                and queue[:placed] == left_queue and profile.advance(now)):
            profile = Profile(now, free)
            for end, key in ends:  # free for good from then on
                profile.reserve(max(end, math.nextafter(now, math.inf)), math.inf, -procs[key])
            self.reserved = {key: self.reserved[key] for key in queue if key in self.reserved}
            for key, at in self.reserved.items():
                profile.reserve(at, estimate[key], procs[key])
            placed = 0
        started = []
        for key in queue[placed:]:
            need, length = procs[key], estimate[key]
            old = self.reserved.pop(key, None)
            if old is not None:
                profile.reserve(old, length, -need)
            at = profile.earliest(need, length)
            profile.reserve(at, length, need)
            if at == now:
                started.append(key)
                bisect.insort(ends, (expected_end(now, length), key))
            else:
                self.reserved[key] = at
        queue[:] = [key for key in queue if key not in started]
        self.profile = profile
        self.left = (free - sum(procs[key] for key in started), list(ends), list(queue))
        return started


@st.composite
def overrunning_workloads(draw) -> tuple[int, list[SimJob]]:
    """Jobs whose run time may exceed their estimate (overdue jobs over-commit the profile),
    zero-length jobs, and busy stretches that make reservations move."""
    capacity = draw(st.integers(1, 8))
    jobs = []
    for _ in range(draw(st.integers(1, 30))):
        run = draw(st.integers(0, 30))
        estimate = max(0, run + draw(st.sampled_from([0, 0, 1, 5, 40, -3, -10])))
        jobs.append(SimJob(submit=draw(st.integers(0, 40)), procs=draw(st.integers(1, capacity)),
                           estimate=estimate, work=run, limit=estimate))
    return capacity, sorted(jobs, key=lambda j: j.submit)


@PROPERTY
@given(workload=overrunning_workloads(), kill=st.booleans())
def test_conservative_gives_the_previous_algorithms_schedule(workload, kill):
    capacity, jobs = workload
    fast = simulate(jobs, Conservative(), capacity, kill_at_limit=kill)
    reference = simulate(jobs, PreviousConservative(), capacity, kill_at_limit=kill)
    assert fast.start == reference.start


def test_placement_prefers_the_worker_that_ends_the_job_first():
    # the fast worker is paused until 100: a 10 s job ends at 20 on the slow one, at 105 on it;
    # the worker never available again is chosen last, and only when nothing else is idle
    paused = Worker("fast-but-paused", speed=2.0, availability=((0, 100, 0.0),))
    gone = Worker("gone", availability=((0, math.inf, 0.0),))
    machine = Machine((paused, Worker("slow", speed=0.5), gone))
    sim = simulate([SimJob(0, 1, 100, 10), SimJob(0, 1, 100, 10)], make_policy("fcfs"), machine)
    assert sim.placement == {0: (1,), 1: (0,)}
    assert sim.end == [20, 105]
