"""gridcouple.Executor on the real backends: the local one, the Slurm cluster of scripts/slurm-up
and the HTCondor pool of scripts/htcondor-up; the simgrid prediction against a hand
computation; the monte-carlo recipe. The functions the jobs run are in executor_tasks.py."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

import executor_tasks as tasks
from conftest import require_slurm
from gridcouple import Executor, GridcoupleError, TaskDiedError, TaskError
from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
from gridcouple.cli import app, jobs, run, simulate  # noqa: F401  (main registers them so)
from gridcouple.errors import BackendError
from gridcouple.executor import PredictedCall, RemoteTraceback
from gridcouple.executor.runner import CallFileWriter, dumps
from gridcouple.jobs import JobState, Resources
from gridcouple.recipes.monte_carlo import throw_darts
from htcondor_pool import htcondor_pool_fixture  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(180)

TESTS = Path(__file__).resolve().parent
TASKS_FILE = TESTS / "executor_tasks.py"
FAIL_LINE = next(i for i, line in enumerate(TASKS_FILE.read_text().splitlines(), 1)
                 if "the line the remote traceback must show" in line)
PARKED = {"slurm.partition": "parked"}  # a DOWN partition: jobs stay PENDING


def wait_until(predicate, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def check_results_and_exceptions(executor: Executor, count: int = 10) -> None:
    """Values in order from ONE submission; an exception with the job's traceback."""
    before = executor.submissions
    futures = executor.map_array(tasks.square, range(count))
    assert executor.submissions == before + 1
    assert [f.result(timeout=120) for f in futures] == [i * i for i in range(count)]
    assert all(f.job is not None for f in futures)
    assert list(executor.map(tasks.add, [1, 2], [10, 20], timeout=120)) == [11, 22]
    future = executor.submit(tasks.fail, "boom")
    with pytest.raises(tasks.TaskFailed, match="boom") as raised:
        future.result(timeout=120)
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert f'executor_tasks.py", line {FAIL_LINE}, in fail' in cause.text
    assert cause.text.rstrip().endswith("executor_tasks.TaskFailed: boom")
    assert raised.value.remote_traceback == cause.text
    assert "executor_tasks.TaskFailed: boom" in future.stderr()  # the job's stderr says it too
    assert future.job is not None and future.exception() is raised.value


def check_killed(executor: Executor) -> None:
    future = executor.submit(tasks.killed_after, "about to be killed")
    with pytest.raises(TaskDiedError) as died:
        future.result(timeout=120)
    error = died.value
    assert error.status.state is JobState.FAILED
    # the signal itself, or as the job script's shell reports it (Slurm: exit code 128 + 9)
    assert signal.SIGKILL in (error.status.signal, (error.status.exit_code or 0) - 128)
    assert f"job {future.job} was killed (signal 9) without a result" in str(error)
    assert str(error).endswith("last lines of its stderr:\nabout to be killed")
    assert error.stderr == "about to be killed"


# --- the local backend ----------------------------------------------------------------------


def test_results_exceptions_and_tracebacks_on_the_local_backend(local_backend):
    with Executor(local_backend) as executor:
        check_results_and_exceptions(executor)
        by_value = executor.submit(lambda x: [x, "by value"], 7)  # cloudpickle: no module
        assert by_value.result(timeout=60) == [7, "by value"]
        assert by_value.job is not None and by_value.job.backend == "local"
    # the outcome comes as soon as it is written; the job ends just after
    assert local_backend.wait([by_value.job], timeout=30)[0].state is JobState.COMPLETED
    # call files and outcome files are gone once read: nothing is left behind
    assert list((local_backend.state_dir / "tasks").iterdir()) == []
    assert not list((local_backend.state_dir / "jobs").glob("*/result.pickle"))


def test_a_killed_task_and_one_over_its_walltime_fail_with_their_stderr(local_backend):
    with Executor(local_backend) as executor:
        check_killed(executor)
    with Executor(local_backend, resources=Resources(walltime=1)) as limited:
        future = limited.submit(tasks.sleep_then, 60)
        with pytest.raises(TaskDiedError) as died:
            future.result(timeout=60)
    assert died.value.status.state is JobState.TIMEOUT
    assert "reached its walltime without a result" in str(died.value)
    assert "walltime of 1 s reached" in str(died.value)
    assert died.value.stderr == "sleeping"


def test_cancel_before_and_after_start(local_backend):
    with Executor(local_backend) as executor:  # two slots: the third call waits
        running = [executor.submit(tasks.sleep_then, 60) for _ in range(2)]
        waiting = executor.submit(tasks.sleep_then, 60)
        wait_until(lambda: all(f.running() for f in running), what="both calls run")
        wait_until(lambda: waiting.status.state is JobState.QUEUED, what="the third waits")
        assert waiting.cancel() and waiting.cancelled()
        assert waiting.job is not None
        status, = local_backend.status([waiting.job])
        assert (status.state, status.reason) == (JobState.CANCELED, "canceled before it started")
        started = time.monotonic()
        assert running[0].cancel() and running[0].cancelled()
        status, = local_backend.wait([running[0].job], timeout=30)
        assert status.state is JobState.CANCELED and time.monotonic() - started < 10
        assert not running[1].done()
        executor.shutdown(cancel_futures=True)
    assert running[1].cancelled()
    assert local_backend.status([running[1].job])[0].state is JobState.CANCELED
    done = Executor(local_backend)
    finished = done.submit(tasks.square, 3)
    assert finished.result(timeout=60) == 9 and not finished.cancel()  # too late: it has one
    done.shutdown()


SCRIPT = """
import sys
from gridcouple import Executor
from gridcouple.backends.local import LocalBackend, LocalOptions

class Point:
    def __init__(self, x):
        self.x = x

def double(point):
    return Point(2 * point.x)

backend = LocalBackend(LocalOptions(slots=2, idle_exit=2), state_dir=sys.argv[1])
with Executor(backend) as executor:
    print([p.x for p in executor.map(double, [Point(1), Point(2)])])
backend.stop_daemon()
"""


def test_functions_and_classes_of_the_script_itself_travel_by_value(tmp_path):
    script = tmp_path / "script.py"  # its functions live in __main__, unknown to the runner
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "[2, 4]\n"


class FaultForeignOutcome:
    """Fault injection: an outcome file that others may write appears in a job's home before
    the job writes its own (no other user can write there on a real system)."""

    @staticmethod
    def plant(backend, job) -> None:
        home = backend.job_home(job.id)
        home.mkdir(parents=True, exist_ok=True)
        path = home / "result.pickle"
        path.write_bytes(dumps({"ok": True, "value": dumps("planted")}))
        path.chmod(0o666)


def test_an_outcome_others_may_write_is_refused(local_backend):
    with Executor(local_backend) as executor:
        future = executor.submit(tasks.sleep_then, 3, "real")
        job = future.wait_submitted(30)
        FaultForeignOutcome.plant(local_backend, job)
        with pytest.raises(TaskError, match=r"refusing the outcome .*result.pickle: owned by "
                                            r"uid \d+ with mode 666, not written by your own job"):
            future.result(timeout=60)


def test_the_job_refuses_a_call_file_others_may_read(tmp_path):
    path = tmp_path / "open.call"
    writer = CallFileWriter(path)
    function, arguments = writer.add(dumps(tasks.square)), writer.add(dumps(((3,), {})))
    writer.close()
    runner = [sys.executable, "-m", "gridcouple.executor.runner", str(path), function,
              arguments, str(tmp_path / "outcome")]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    assert subprocess.run(runner, env=env, timeout=60).returncode == 0  # owner-only: loaded
    path.chmod(0o644)
    refused = subprocess.run(runner, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert f"refusing the call file {path}: owned by uid {os.getuid()} with mode 644" in \
        refused.stderr


# --- a job manager: no shared file system -------------------------------------------------


def test_a_job_manager_runs_calls_with_their_files_staged_and_fetched(tmp_path):
    """The partner lists this interpreter among its commands; calls travel as uploaded call
    files and come back as downloaded outcomes (functions of modules its Python imports)."""
    from test_jobman_backend import client_config
    from test_jobman_helpers import running_jobman

    with running_jobman(tmp_path / "jm", commands=[sys.executable]) as jm, \
            Executor("partner-a", config=client_config(tmp_path, jm, python=sys.executable),
                     ) as executor:
        futures = executor.map_array(throw_darts, [1, 2], [2000, 2000])
        assert [f.result(timeout=60) for f in futures] == [throw_darts(1, 2000),
                                                           throw_darts(2, 2000)]
        assert executor.submissions == 1
        with pytest.raises(ValueError, match="not defined for negative") as raised:
            executor.submit(math.factorial, -1).result(timeout=60)
        assert raised.value.remote_traceback.endswith(
            "ValueError: factorial() not defined for negative values\n")
    assert list((tmp_path / "client-state" / "tasks").iterdir()) == []


# --- the simulator --------------------------------------------------------------------------


def test_simgrid_predicts_the_makespan_of_a_map_as_computed_by_hand(tmp_path):
    """Two workers: fast (speed 2) and slow (speed 1, at half speed for its first 2 s); FCFS;
    calls costing 4, 4, 2, 2 s on a speed-1 worker, all submitted at 0. By hand: call 0 goes
    to fast (ends 4/2 = 2; on slow it would end at 5), call 1 to slow (1 s of work done by 2,
    the other 3 at full speed: ends 5); at 2 call 2 takes fast (2/2: ends 3), at 3 call 3
    (ends 4). Makespan 5."""
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.grid]\ntype = "simgrid"\npolicy = "fcfs"\n'
                      'workers = { fast = 2.0, slow = 1.0 }\n'
                      'availability = { slow = [[0, 2, 0.5]] }\n')
    with Executor("grid", config=config, cost=lambda seconds: seconds) as predicted:
        futures = predicted.map_array(tasks.square, [4, 4, 2, 2])
        assert predicted.submissions == 1
        assert [f.result() for f in futures] == [
            PredictedCall(0.0, 2.0, "fast", JobState.COMPLETED),
            PredictedCall(0.0, 5.0, "slow", JobState.COMPLETED),
            PredictedCall(2.0, 3.0, "fast", JobState.COMPLETED),
            PredictedCall(3.0, 4.0, "fast", JobState.COMPLETED)]
        assert predicted.makespan == 5.0
    assert not (tmp_path / "state" / "jobs").exists()  # nothing ran


def test_a_simulated_backend_needs_a_cost(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.simgrid]\nprocs = 2\n')
    with pytest.raises(GridcoupleError, match="give Executor\\(cost=...\\)"):
        Executor("simgrid", config=config)


def test_monte_carlo_recipe_on_the_local_backend_and_predicted(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.local]\nslots = 4\nidle_exit = 2\n'
                      '[backend.grid]\ntype = "simgrid"\nprocs = 4\n')
    result = CliRunner().invoke(app, ["run", "monte-carlo", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "Submitted 16 tasks of 200,000 darts to the local backend in 1 submission" in \
        result.output
    assert "monte carlo pi" in result.output and "16/16" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("pi ~ 3.1") and last.endswith(")") and "3,200,000 darts" in last
    predicted = CliRunner().invoke(app, ["run", "monte-carlo", "--config", str(config),
                                         "--backend", "grid"])
    assert predicted.exit_code == 0, predicted.output
    # 16 tasks of 0.2 s on 4 identical processors: 4 rounds
    assert predicted.output.strip().endswith("predicted makespan: 0.80 s (simulated)")


# --- Slurm ----------------------------------------------------------------------------------


def sbatch_counter(path: Path) -> Path:
    """Slurm's real tools, sbatch counting its calls in sbatch.calls beside it."""
    path.mkdir()
    for tool in ("squeue", "scontrol", "scancel", "sacct"):
        (path / tool).symlink_to(shutil.which(tool))
    real = shutil.which("sbatch")
    (path / "sbatch").write_text(f"#!{sys.executable}\nimport os, sys\n"
                                 "open(__file__ + '.calls', 'a').write('call\\n')\n"
                                 f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
    (path / "sbatch").chmod(0o755)
    return path


@pytest.mark.slurm
def test_slurm_results_tracebacks_a_killed_task_and_200_calls_in_one_sbatch(tmp_path):
    require_slurm()
    bin_dir = sbatch_counter(tmp_path / "bin")
    with SlurmBackend(SlurmOptions(bin_dir=bin_dir, poll_interval=0.5),
                      state_dir=tmp_path / "state") as backend, Executor(backend) as executor:
        futures = executor.map_array(tasks.square, range(200))
        assert (bin_dir / "sbatch.calls").read_text() == "call\n"
        assert executor.submissions == 1
        assert len({f.job.native_id.split("_")[0] for f in futures}) == 1
        assert sorted(int(f.job.native_id.split("_")[1]) for f in futures) == list(range(200))
        check_results_and_exceptions(executor)
        check_killed(executor)
        assert [f.result() for f in futures] == [i * i for i in range(200)]


@pytest.mark.slurm
def test_slurm_cancel_before_start_shows_the_pending_reason(tmp_path):
    require_slurm()
    with SlurmBackend(SlurmOptions(poll_interval=0.5), state_dir=tmp_path / "state") as backend, \
            Executor(backend, attributes=PARKED) as parked:
        future = parked.submit(tasks.square, 2)
        wait_until(lambda: future.reason == "PartitionDown", what="the native reason")
        assert (future.state, future.native_state) == (JobState.QUEUED, "PENDING")
        assert future.cancel() and future.cancelled()
        status, = backend.wait([future.job], timeout=30)
        assert status.state is JobState.CANCELED
        with Executor(backend, attributes={"slurm.partition": "nosuch"}) as refused, \
                pytest.raises(BackendError, match="invalid partition"):
            refused.map_array(tasks.square, range(3))  # raised at once, in Slurm's words
    assert list((tmp_path / "state" / "tasks").iterdir()) == []  # no call file left behind


# --- HTCondor -------------------------------------------------------------------------------


@pytest.fixture
def condor_executor(request):
    """An Executor on the real pool: jobs run as its job user (uid 2001) in its chroot, with
    its Python; the state directory in the shared directory, handed to that user at submit."""
    pytest.importorskip("htcondor2")
    pool = request.getfixturevalue("htcondor_pool")
    from gridcouple.backends.htcondor import HTCondorOptions
    from test_htcondor import JobUserBackend

    state_dir = Path(pool.shared_dir) / f"test-executor-{uuid.uuid4().hex[:12]}"
    backend = JobUserBackend(HTCondorOptions(poll_interval=0.3), state_dir=state_dir,
                             python=pool.python)
    executor = Executor(backend, environment={"PYTHONPATH": str(TESTS)})
    yield executor, pool
    executor.shutdown(cancel_futures=True)
    backend.close()
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.mark.htcondor
def test_htcondor_results_tracebacks_killed_and_walltime_as_the_job_user(condor_executor):
    executor, pool = condor_executor
    assert executor.submit(tasks.whoami).result(timeout=60) == (pool.job_uid, pool.python)
    check_results_and_exceptions(executor, count=20)
    futures = executor.map_array(tasks.square, range(20))
    assert len({f.job.native_id.split(".")[0] for f in futures}) == 1  # one cluster
    check_killed(executor)
    with Executor(executor.backend, resources=Resources(walltime=2),
                  environment={"PYTHONPATH": str(TESTS)}) as limited:
        future = limited.submit(tasks.sleep_then, 60)
        with pytest.raises(TaskDiedError) as died:
            future.result(timeout=60)
    assert died.value.status.state is JobState.TIMEOUT
    assert "exceeded allowed job duration" in str(died.value)
