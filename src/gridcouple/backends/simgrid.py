"""The ``simgrid`` backend: a grid simulator behind the ordinary Backend API.

Nothing runs. A scenario submits JobSpecs as it would to Slurm; each job's run time comes from
``spec.estimate`` (seconds on a speed-1 worker) or from a cost function of your own,
``duration(spec, worker) -> seconds``; the configured policy (the same object the local queue
uses) decides when jobs start, on identical processors or on workers with speeds and
availability traces. Time is simulated: ``status`` moves the clock to the next moment at which
something happens, ``wait`` runs it until the jobs are done (``timeout`` is in simulated
seconds). Times in statuses are simulated seconds from the backend's start.

A job that outruns its walltime (``resources.walltime``) is killed there and ends TIMEOUT, as on
a real batch system: ``kill_at_walltime = true`` is the default because the point of this
backend is to predict what the deployed system will do. The policy is told ``spec.estimate``,
else the walltime, as the local queue is.

The simulation lives in this process: jobs recorded by an earlier process cannot be followed.

Config::

    [backend.simgrid]
    procs = 8                          # identical processors (used when no workers are given)
    workers = { fast = 2.0, slow = 0.5 }                  # name = speed
    availability = { slow = [[0, 3600, 0.0]] }            # name = [[start, end, fraction]]
    policy = "easy"
    cost = "mypackage.costs:duration"  # optional
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gridcouple.backends.base import Backend
from gridcouple.errors import BackendError, OptionError
from gridcouple.jobs import Job, JobEvent, JobSpec, JobState, JobStatus
from gridcouple.journal import JobRecord
from gridcouple.scheduler.engine import Machine, SimJob, SimState, Simulator, Worker
from gridcouple.scheduler.policies import INFINITY, check_policy, make_policy

STATES = {
    SimState.PENDING: JobState.QUEUED,
    SimState.WAITING: JobState.QUEUED,
    SimState.RUNNING: JobState.ACTIVE,
    SimState.COMPLETED: JobState.COMPLETED,
    SimState.KILLED: JobState.TIMEOUT,
    SimState.CANCELED: JobState.CANCELED,
}


@dataclass(frozen=True)
class SimGridOptions:
    """``[backend.simgrid]``."""

    procs: int = 4
    workers: dict[str, float] = field(default_factory=dict)
    availability: dict[str, list[list[float]]] = field(default_factory=dict)
    policy: str = "fcfs"
    cost: str | None = None
    kill_at_walltime: bool = True

    def __post_init__(self) -> None:
        if self.procs < 1:
            raise OptionError("procs", f"must be at least 1, got {self.procs}")
        unknown = set(self.availability) - set(self.workers)
        if unknown:
            raise OptionError("availability", "names workers that do not exist: "
                              f"{', '.join(sorted(unknown))}")
        for name, intervals in self.availability.items():
            if any(len(interval) != 3 for interval in intervals):
                raise OptionError("availability", f"of {name}: give [start, end, fraction] "
                                  "lists")
        check_policy(self.policy)

    def machine(self) -> Machine:
        """The machine these options describe."""
        if not self.workers:
            return Machine.processors(self.procs)
        return Machine(tuple(
            Worker(name, speed, tuple((start, end, fraction)
                                      for start, end, fraction in self.availability.get(name, ())))
            for name, speed in self.workers.items()))


CostFunction = Callable[[JobSpec, Worker], float]


def load_cost(reference: str) -> CostFunction:
    """The function ``package.module:function``."""
    module_name, _, function_name = reference.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise BackendError(f"cost function {reference!r} cannot be imported: {exc}") from exc
    if not callable(function):
        raise BackendError(f"cost function {reference!r} is not callable")
    return function


class SimGridBackend(Backend):
    """Jobs in simulated time (see the module docstring)."""

    kind = "simgrid"
    Options = SimGridOptions
    hosts_applications = False

    def __init__(self, options: SimGridOptions, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        try:
            machine = options.machine()
        except ValueError as exc:
            raise BackendError(f"[backend.simgrid]: {exc}") from None
        self.cost = load_cost(options.cost) if options.cost else None
        duration = None
        if self.cost is not None:
            cost = self.cost

            def duration(job: SimJob, worker: Worker) -> float:
                return float(cost(job.payload, worker))

        self.simulator = Simulator(machine, make_policy(options.policy),
                                   kill_at_limit=options.kill_at_walltime, duration=duration)
        self.numbers: dict[int, int] = {}  # journal id -> simulator job number
        self._horizon = INFINITY  # status() does not move the clock past this

    @property
    def now(self) -> float:
        """The simulated clock, in seconds from the backend's start."""
        return self.simulator.now

    def submit(self, specs: Sequence[JobSpec]) -> list[Job]:
        sim_jobs = []
        for spec in specs:
            if spec.estimate is None and self.cost is None:
                raise BackendError(f"job {spec.name}: the simgrid backend needs its run time: "
                                   "give JobSpec.estimate or a cost function ([backend.simgrid] "
                                   "cost)")
            if spec.resources.cpus > self.simulator.capacity:
                raise BackendError(f"job {spec.name} asks for {spec.resources.cpus} processors; "
                                   f"the simulated machine has {self.simulator.capacity}")
            told = spec.expected_runtime
            sim_jobs.append(SimJob(
                submit=self.now, procs=spec.resources.cpus,
                estimate=INFINITY if told is None else told, work=spec.estimate or 0.0,
                limit=spec.resources.walltime or INFINITY, payload=spec))
        ids = self.journal.add(self.name, specs, JobState.NEW)
        numbers = self.simulator.add(sim_jobs)
        self.numbers.update(zip(ids, numbers, strict=True))
        self.journal.set_native_ids(
            [(i, f"sim-{n}", "") for i, n in zip(ids, numbers, strict=True)], JobState.QUEUED)
        return [record.job for record in self.journal.get(ids)]

    def query(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        if self.simulator.next_event() <= self._horizon:
            self.simulator.step()
        return {record.job.id: self._status(record.job.id) for record in records}

    def _status(self, job_id: int) -> JobStatus:
        number = self.numbers.get(job_id)
        if number is None:
            return JobStatus(JobState.FAILED, native_state="LOST",
                             reason="its simulation ended with the process that ran it")
        sim = self.simulator
        state = sim.state[number]
        placement = sim.placement.get(number, ())
        return JobStatus(
            STATES[state], native_state=state.name, reason="simulated",
            exit_code=0 if state == SimState.COMPLETED else None,
            submit_time=sim.jobs[number].submit,
            start_time=None if state < SimState.RUNNING else sim.start[number],
            end_time=sim.end[number] if state.is_final else None,
            host=",".join(sim.machine.workers[i].name for i in placement))

    def cancel_now(self, jobs: Sequence[Job]) -> None:
        """End the jobs in the simulation at the current simulated time."""
        for job in jobs:
            number = self.numbers.get(job.id)
            if number is not None:
                self.simulator.cancel(number)
        self.journal.update([(job.id, self._status(job.id)) for job in jobs],
                            only_if=[JobState.NEW, JobState.QUEUED, JobState.ACTIVE])

    def events(self, jobs: Sequence[Job], *, timeout: float | None = None) -> Iterator[JobEvent]:
        """Every change of state until all jobs are final or ``timeout`` simulated seconds
        pass; the clock moves from event to event without sleeping."""
        self._horizon = INFINITY if timeout is None else self.now + timeout
        known: dict[int, JobState | None] = {job.id: None for job in jobs}
        try:
            while True:
                statuses = self.status(jobs)
                for job, status in zip(jobs, statuses, strict=True):
                    if known[job.id] != status.state:
                        yield JobEvent(job=job, status=status, previous=known[job.id])
                        known[job.id] = status.state
                if all(s.state.is_final for s in statuses):
                    return
                if self.simulator.stranded():
                    raise BackendError(f"the simulation stalled: policy "
                                       f"{self.simulator.policy.name} left "
                                       f"{self.simulator.stranded()} jobs waiting with nothing "
                                       "left to happen")
                upcoming = self.simulator.next_event()
                if upcoming > self._horizon:
                    self.simulator.run(until=self._horizon)
                    return
        finally:
            self._horizon = INFINITY

    def read_output(self, job: Job, stream: Literal["stdout", "stderr"] = "stdout",
                    tail: int | None = None) -> str:
        """Nothing runs, so nothing is written."""
        return ""

    def fetch(self, job: Job, destination: str | Path) -> list[Path]:
        """Nothing runs, so nothing is produced."""
        raise BackendError(f"job {job.id}: the simgrid backend runs nothing, so it has no "
                           "output files to fetch")

    def run_until(self, when: float = INFINITY) -> None:
        """Move the clock to ``when`` (simulated seconds; default: until nothing is left)."""
        self.simulator.run(when)
