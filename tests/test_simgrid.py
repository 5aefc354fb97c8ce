"""The simgrid backend: the ordinary Backend API, in simulated time."""

from __future__ import annotations

import pytest

from gridcouple.backends import open_backend
from gridcouple.backends.simgrid import SimGridBackend, SimGridOptions
from gridcouple.config import load_config
from gridcouple.errors import BackendError, ConfigError
from gridcouple.jobs import JobSpec, JobState, Resources
from gridcouple.scheduler.engine import Worker


def cost_by_worker(spec: JobSpec, worker: Worker) -> float:
    """A user's cost function: 100 s of work, done at the worker's speed."""
    return 100.0 / worker.speed


def spec(name: str, estimate: float | None, cpus: int = 1, walltime: float | None = None):
    return JobSpec(argv=("solver",), name=name, estimate=estimate,
                   resources=Resources(cpus=cpus, walltime=walltime))


@pytest.fixture
def backend(state_dir):
    with SimGridBackend(SimGridOptions(procs=2, policy="easy"), state_dir=state_dir) as sim:
        yield sim


def test_a_scenario_runs_in_simulated_time(backend):
    jobs = backend.submit([spec("a", 10, cpus=2), spec("b", 30), spec("c", 5)])
    assert [s.state for s in backend.status(jobs)] == [JobState.ACTIVE, JobState.QUEUED,
                                                       JobState.QUEUED]
    statuses = backend.wait(jobs)
    assert [s.state for s in statuses] == [JobState.COMPLETED] * 3
    assert [(s.start_time, s.end_time) for s in statuses] == [(0, 10), (10, 40), (10, 15)]
    assert backend.now == 40
    # the journal has the final states, like any backend's
    assert [r.status.state for r in backend.journal.get(j.id for j in jobs)] == [
        JobState.COMPLETED] * 3
    assert backend.reattach(jobs[1].native_id) == jobs[1]


def test_each_status_call_moves_to_the_next_event(backend):
    job = backend.submit([spec("a", 10)])[0]
    assert backend.status([job])[0].state is JobState.ACTIVE
    assert backend.now == 0
    assert backend.status([job])[0].state is JobState.COMPLETED
    assert backend.now == 10


def test_walltime_kills_and_timeout_is_simulated(backend):
    long, other = backend.submit([spec("long", 500, walltime=100), spec("other", 1000)])
    assert [s.state for s in backend.wait([long, other], timeout=50)] == [JobState.ACTIVE] * 2
    assert backend.now == 50
    assert backend.wait([long])[0].state is JobState.TIMEOUT
    assert backend.now == 100
    backend.cancel([other])
    assert backend.status([other])[0].state is JobState.CANCELED


def test_workers_and_cost_function_from_the_config(tmp_path):
    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text(
        '[backend]\nname = "simgrid"\n\n[backend.simgrid]\n'
        'workers = { fast = 4.0, slow = 1.0 }\n'
        'availability = { slow = [[0, 50, 0.5]] }\n'
        'cost = "test_simgrid:cost_by_worker"\npolicy = "fcfs"\n')
    with open_backend(load_config(config_file)) as sim:
        first, second = sim.submit([spec("a", None), spec("b", None)])
        statuses = sim.wait([first, second])
    # slow: 25 s of work in [0, 50) at half pace, the other 75 s at full pace
    assert [(s.host, s.end_time) for s in statuses] == [("fast", 25), ("slow", 125)]


def test_bad_options_and_jobs_are_refused(tmp_path, backend):
    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text('[backend]\nname = "simgrid"\n\n[backend.simgrid]\n'
                           'workers = { a = 1.0 }\navailability = { b = [[0, 1, 0.5]] }\n')
    with pytest.raises(ConfigError, match=r"gridcouple.toml:6: \[backend.simgrid\] "
                       "availability: names workers that do not exist: b"):
        open_backend(load_config(config_file))
    with pytest.raises(BackendError, match="job x: the simgrid backend needs its run time"):
        backend.submit([spec("x", None)])
    with pytest.raises(BackendError, match="asks for 3 processors; the simulated machine has 2"):
        backend.submit([spec("y", 1, cpus=3)])
