"""Scheduling policies on small traces computed by hand, through the simulator's fast path and
through ``select`` as the live queue calls it."""

from __future__ import annotations

import pytest

from gridcouple.errors import ConfigError
from gridcouple.scheduler.engine import SimJob, simulate
from gridcouple.scheduler.policies import (
    EASY,
    FCFS,
    POLICIES,
    Conservative,
    Policy,
    RunningJob,
    WaitingJob,
    make_policy,
)


class ViaSelect(Policy):
    """Hides a built-in policy behind ``select`` only, as a user's own policy would be."""

    name = "via-select"

    def __init__(self, inner: Policy) -> None:
        self.inner = inner

    def select(self, now, waiting, running, capacity):
        return self.inner.select(now, waiting, running, capacity)


def jobs(*rows: tuple[float, int, float]) -> list[SimJob]:
    """(submit, procs, run time) with exact estimates."""
    return [SimJob(submit=s, procs=p, estimate=r, work=r, limit=r) for s, p, r in rows]


# A: a wide job blocks the queue head; short jobs can go around it.
TRACE_A = jobs((0, 2, 10), (1, 4, 5), (2, 2, 3), (3, 1, 20), (4, 1, 2))
# B: the head leaves one processor spare at its shadow time: EASY's "extra" processors rule.
TRACE_B = jobs((0, 3, 10), (1, 3, 5), (2, 1, 100), (3, 1, 100), (4, 1, 100))
# C: EASY lets a long job delay the second job in the queue; conservative does not.
TRACE_C = jobs((0, 2, 10), (1, 3, 10), (2, 4, 10), (3, 1, 30))
# D: a short job overtakes a long one under SJF.
TRACE_D = jobs((0, 2, 10), (1, 2, 50), (2, 2, 5))

GOLDEN = [
    ("fcfs", TRACE_A, 4, [0, 10, 15, 15, 15]),
    ("sjf", TRACE_A, 4, [0, 10, 2, 15, 5]),
    ("easy", TRACE_A, 4, [0, 10, 2, 15, 5]),
    ("conservative", TRACE_A, 4, [0, 10, 2, 15, 5]),
    ("fcfs", TRACE_B, 5, [0, 10, 10, 10, 15]),
    ("easy", TRACE_B, 5, [0, 10, 2, 3, 15]),
    ("conservative", TRACE_B, 5, [0, 10, 2, 3, 15]),
    ("fcfs", TRACE_C, 4, [0, 10, 20, 30]),
    ("easy", TRACE_C, 4, [0, 10, 33, 3]),
    ("conservative", TRACE_C, 4, [0, 10, 20, 30]),
    ("fcfs", TRACE_D, 2, [0, 10, 60]),
    ("sjf", TRACE_D, 2, [0, 15, 10]),
]


@pytest.mark.parametrize(("name", "trace", "capacity", "starts"), GOLDEN,
                         ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)])
def test_golden_schedule(name, trace, capacity, starts):
    fast = simulate(trace, make_policy(name), capacity, kill_at_limit=True)
    assert fast.start == starts
    slow = simulate(trace, ViaSelect(make_policy(name)), capacity, kill_at_limit=True)
    assert slow.start == starts


def test_select_as_the_live_queue_calls_it():
    # trace A at t=5: J0 runs (2 procs, ends 10), J1 (4 procs) heads the queue, J4 fits before 10
    running = [RunningJob(key=0, procs=2, start_time=0, estimate=10)]
    waiting = [WaitingJob(1, 4, 1, 5), WaitingJob(3, 1, 3, 20), WaitingJob(4, 1, 4, 2)]
    assert [j.key for j in EASY().select(5, waiting, running, 4)] == [4]
    assert FCFS().select(5, waiting, running, 4) == []
    assert [j.key for j in FCFS().select(5, waiting[1:], running, 4)] == [3, 4]


def test_unknown_estimates_in_a_live_queue():
    running = [RunningJob(key=0, procs=2, start_time=0, estimate=None)]
    head = WaitingJob(1, 4, 1, 5)
    # the running job may end at any moment: nothing with a run time is backfilled before it
    assert EASY().select(100, [head, WaitingJob(2, 1, 2, 1)], running, 4) == []
    # a waiting job with no estimate is not backfilled on the shadow rule, even when it is short
    running = [RunningJob(key=0, procs=2, start_time=0, estimate=1000)]
    assert EASY().select(5, [head, WaitingJob(2, 2, 2, None)], running, 4) == []
    # ... but it may take processors the head does not need (extra), and it starts in its turn
    running = [RunningJob(key=0, procs=2, start_time=0, estimate=1000)]
    wide = WaitingJob(1, 3, 1, 5)  # at 1000 it leaves one of the 4 processors spare
    chosen = EASY().select(5, [wide, WaitingJob(2, 2, 2, None), WaitingJob(3, 1, 3, None)],
                           running, 4)
    assert [j.key for j in chosen] == [3]
    assert [j.key for j in FCFS().select(5, [WaitingJob(2, 1, 2, None)], [], 1)] == [2]


def test_conservative_keeps_reservations_between_calls():
    policy = Conservative()
    running = [RunningJob(key=0, procs=2, start_time=0, estimate=10)]
    waiting = [WaitingJob(1, 4, 1, 10), WaitingJob(2, 2, 2, 5)]
    assert [j.key for j in policy.select(2, waiting, running, 4)] == [2]
    assert policy.reserved == {1: 10}


def test_make_policy_by_name_and_by_reference():
    assert set(POLICIES) == {"fcfs", "sjf", "easy", "conservative"}
    assert isinstance(make_policy("gridcouple.scheduler.policies:EASY"), EASY)


@pytest.mark.parametrize(("name", "message"), [
    ("lottery", "unknown policy 'lottery'; known: conservative, easy, fcfs, sjf"),
    ("gridcouple.nowhere:Policy", "cannot be imported"),
    ("gridcouple.scheduler.policies:make_policy", "is not a gridcouple.scheduler.policies"),
])
def test_make_policy_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        make_policy(name)


def test_a_job_wider_than_the_machine_never_starts_and_blocks_nobody_else_in_conservative():
    waiting = [WaitingJob(1, 9, 0, 5), WaitingJob(2, 1, 1, 5)]
    assert [j.key for j in Conservative().select(2, waiting, [], 4)] == [2]
    assert FCFS().select(2, waiting, [], 4) == []
