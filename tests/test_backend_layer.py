"""The backend layer: the journal's state order, the batch core's watcher and submission files,
named backends (one scenario on several sites) and the refusal of a simulated backend."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require_slurm
from gridcouple.appkit.data import TimeStep
from gridcouple.backends import open_backend
from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
from gridcouple.config import load_config
from gridcouple.coupler import ApplicationError, AppRequest, Coupler
from gridcouple.jobs import JobSpec, JobState, JobStatus
from gridcouple.journal import Journal

TESTS = Path(__file__).parent
PARKED = {"slurm.partition": "parked"}  # a DOWN partition: jobs stay PENDING

# --- the state order ------------------------------------------------------------------------

# One poller: writes ``state`` for the job ``count`` times, as a status query would.
POLLER = """
import sys, time
from gridcouple.journal import Journal
from gridcouple.jobs import JobState, JobStatus
journal = Journal(sys.argv[1])
state = JobState(sys.argv[3])
for _ in range(int(sys.argv[4])):
    journal.update([(int(sys.argv[2]), JobStatus(state, native_state=state.name))])
"""


def test_two_pollers_writing_a_stale_active_over_completed_leave_it_completed(tmp_path):
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    [job_id] = journal.add("slurm", [JobSpec(argv=("true",))])
    journal.set_native_ids([(job_id, "1", "")], JobState.QUEUED)
    journal.update([(job_id, JobStatus(JobState.ACTIVE))])
    stale = subprocess.Popen([sys.executable, "-c", POLLER, str(path), str(job_id), "active",
                              "300"])
    time.sleep(0.2)  # the stale poller is writing ACTIVE over and over
    subprocess.run([sys.executable, "-c", POLLER, str(path), str(job_id), "completed", "1"],
                   check=True, timeout=60)
    assert stale.wait(timeout=60) == 0
    [record] = journal.get([job_id])
    assert record.status.state is JobState.COMPLETED
    events = [state for _, i, state, _ in journal.events_since(0) if i == job_id]
    assert events == [JobState.NEW, JobState.QUEUED, JobState.ACTIVE, JobState.COMPLETED]


def test_backward_moves_only_as_a_requeue(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    ids = journal.add("slurm", [JobSpec(argv=("true",))] * 2)
    journal.set_native_ids([(i, str(i), "") for i in ids], JobState.QUEUED)
    journal.update([(i, JobStatus(JobState.ACTIVE)) for i in ids])
    stale, requeued = ids
    changed = journal.update([(stale, JobStatus(JobState.QUEUED)),
                              (requeued, JobStatus(JobState.QUEUED, native_state="REQUEUED",
                                                   requeue=True))])
    assert changed == [requeued]
    assert [r.status.state for r in journal.get(ids)] == [JobState.ACTIVE, JobState.QUEUED]
    assert journal.update([(stale, JobStatus(JobState.NEW, requeue=True))]) == []  # not NEW
    journal.update([(i, JobStatus(JobState.FAILED)) for i in ids])
    for state in JobState:  # nothing leaves a final state, not even as a requeue
        assert journal.update([(stale, JobStatus(state, requeue=True))]) == (
            [stale] if state is JobState.FAILED else [])
    assert journal.get([stale])[0].status.state is JobState.FAILED


def cost_of_sleep(spec: JobSpec, worker: object) -> float:
    """The simulator's run time of the estimate-rule jobs: the seconds they sleep."""
    return float(spec.argv[-1])


def test_the_live_queue_and_the_simulator_read_estimates_alike(tmp_path):
    """SJF on one slot: an estimate of 0 runs first and a job with only a walltime is planned
    with its walltime, in the local daemon's queue and in the simulator alike."""
    from gridcouple.backends.local import LocalBackend, LocalOptions
    from gridcouple.backends.simgrid import SimGridBackend, SimGridOptions
    from gridcouple.jobs import Resources

    specs = [JobSpec(argv=("sleep", "0.3"), name="walltime-only",
                     resources=Resources(walltime=100)),
             JobSpec(argv=("sleep", "0.3"), name="zero", estimate=0.0),
             JobSpec(argv=("sleep", "0.3"), name="fifty", estimate=50.0)]
    blocker = JobSpec(argv=("sleep", "1"), name="blocker", estimate=1.0)
    orders = []
    with LocalBackend(LocalOptions(slots=1, policy="sjf", idle_exit=2),
                      state_dir=tmp_path / "live") as live:
        first = live.submit([blocker])
        live.wait(first, until="any", timeout=0.5)  # the blocker holds the slot ...
        jobs = live.submit(specs)  # ... while the three wait together
        statuses = live.wait(jobs, timeout=60)
        assert [s.state for s in statuses] == [JobState.COMPLETED] * 3
        orders.append([j.spec.name for _, j in sorted(
            zip((s.start_time for s in statuses), jobs, strict=True))])
        live.stop_daemon()
    with SimGridBackend(SimGridOptions(procs=1, policy="sjf",
                                       cost="test_backend_layer:cost_of_sleep"),
                        state_dir=tmp_path / "sim") as sim:
        sim.submit([blocker])
        jobs = sim.submit(specs)
        statuses = sim.wait(jobs)
        orders.append([j.spec.name for _, j in sorted(
            zip((s.start_time for s in statuses), jobs, strict=True))])
    assert orders == [["zero", "fifty", "walltime-only"]] * 2


# --- a simulated backend cannot host applications -------------------------------------------

def test_the_coupler_refuses_a_simulated_backend_at_once(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend]\nname = "sim"\n'
                      '[backend.sim]\ntype = "simgrid"\nprocs = 2\n')
    started = time.monotonic()
    with pytest.raises(ApplicationError, match="'sim' is simulated .simgrid.: it predicts "
                       "schedules and cannot host application servers"):
        Coupler.from_config(config).__enter__()
    assert time.monotonic() - started < 5


def test_run_demo_on_simgrid_prints_the_predicted_schedule(tmp_path):
    gridcouple = Path(sys.executable).with_name("gridcouple")
    proc = subprocess.run([str(gridcouple), "run", "demo", "--backend", "simgrid"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "GRIDCOUPLE_CONFIG": "", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    words = " ".join(proc.stdout.split())  # the table's title wraps at the table's width
    assert "predicted by the simgrid backend (nothing ran)" in words
    assert "predicted makespan: 4.8 s (simulated)" in words
    assert "Traceback" not in proc.stderr


# --- named backends -----------------------------------------------------------------------------

def test_named_backends_have_their_own_kind_state_dir_and_python(tmp_path):
    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text('state_dir = "state"\n'
                           '[backend.site_a]\ntype = "local"\nstate_dir = "a"\nslots = 1\n'
                           '[backend.site_b]\ntype = "local"\npython = "/opt/py/bin/python"\n')
    config = load_config(config_file)
    with open_backend(config, "site_a") as a, open_backend(config, "site_b") as b:
        assert (a.kind, a.name, a.state_dir, a.options.slots) == (
            "local", "site_a", tmp_path / "a", 1)
        assert (b.name, b.state_dir, b.python) == ("site_b", tmp_path / "state",
                                                   "/opt/py/bin/python")
        assert a.python == sys.executable


@pytest.mark.parametrize(("table", "message"), [
    ('[backend.x]\ntype = "pbs"\n', r"gridcouple.toml:2: \[backend.x\] type: backend 'pbs' is "
                                    "not installed"),
    ('[backend.x]\ntype = 3\n', r"gridcouple.toml:2: \[backend.x\] type: expected a string"),
    ('[backend.x]\ntype = "local"\nslot = 2\n', r"gridcouple.toml:3: \[backend.x\] slot: "
                                                "unknown key 'slot' .did you mean 'slots'"),
    ('[backend."a b"]\n', r"gridcouple.toml:1: \[backend.a b\]: a backend name is"),
])
def test_named_backend_errors_name_file_line_and_key(tmp_path, table, message):
    from gridcouple.backends import check_config
    from gridcouple.errors import ConfigError

    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text(table)
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(config_file))


# --- the batch core on the real Slurm cluster -------------------------------------------------

@pytest.fixture
def slurm(tmp_path):
    require_slurm()
    with SlurmBackend(SlurmOptions(poll_interval=0.5), state_dir=tmp_path / "state") as backend:
        yield backend


@pytest.mark.slurm
def test_a_submission_writes_the_same_number_of_files_for_10_or_500_jobs(slurm):
    counts = []
    for jobs in (10, 500):
        before = sum(len(files) for _, _, files in os.walk(slurm.state_dir))
        submitted = slurm.submit([JobSpec(argv=("echo", str(i)), name="files",
                                          environment={"TASK": str(i)}, attributes=PARKED)
                                  for i in range(jobs)])
        counts.append(sum(len(files) for _, _, files in os.walk(slurm.state_dir)) - before)
        assert len({job.native_id.split("_")[0] for job in submitted}) == 1
        slurm.cancel(submitted)
    assert counts == [2, 2]  # the submission's script and its task file
    assert not (slurm.state_dir / "jobs").exists()  # no job home before a job starts


@pytest.mark.slurm
def test_the_watcher_makes_one_squeue_per_poll_for_every_caller(slurm, tmp_path):
    # A counting squeue: the real one, noting each call in a file beside it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "scontrol", "scancel", "sacct"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    real = subprocess.check_output(["which", "squeue"], text=True).strip()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho >>{bin_dir}/calls\nexec {real} \"$@\"\n")
    (bin_dir / "squeue").chmod(0o755)
    with SlurmBackend(SlurmOptions(bin_dir=bin_dir, poll_interval=0.5),
                      state_dir=slurm.state_dir) as backend:
        jobs = backend.submit([JobSpec(argv=("true",), name="watched", attributes=PARKED)
                               for _ in range(100)])
        stop = time.monotonic() + 3.0
        seen: list[JobStatus] = []

        def caller(mine: list) -> None:
            while time.monotonic() < stop:
                seen.extend(backend.status(mine))

        threads = [threading.Thread(target=caller, args=(jobs[i::8],)) for i in range(8)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        calls = len((bin_dir / "calls").read_text().splitlines())
        assert len(seen) > 1000  # the callers asked thousands of times ...
        # ... and squeue ran at most once per poll interval (0.2 s first, then backoff)
        assert 1 <= calls == backend.watcher.queries <= elapsed / 0.2 + 1
        assert {s.reason for s in seen[-100:]} == {"PartitionDown"}
        backend.cancel(jobs)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_one_scenario_on_two_named_local_backends_and_slurm(tmp_path, monkeypatch):
    """Per-application backends: two applications on two local backends with their own state
    directories, two on Slurm (one array); fields go by reference between all of them."""
    require_slurm()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS),
                                                      os.environ.get("PYTHONPATH", "")]))
    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text('state_dir = "state"\n'
                           '[backend.site_a]\ntype = "local"\nstate_dir = "a"\nidle_exit = 2\n'
                           '[backend.site_b]\ntype = "local"\nstate_dir = "b"\nidle_exit = 2\n'
                           '[backend.hpc]\ntype = "slurm"\nstate_dir = "hpc"\n'
                           'poll_interval = 0.5\n[coupler]\njoin_timeout = 90\n')
    with Coupler.from_config(config_file) as coupler:
        apps = coupler.allocate_many([
            AppRequest("test_appkit_apps:Counter", name="a", backend="site_a"),
            AppRequest("test_appkit_apps:Counter", name="b", backend="site_b"),
            AppRequest("test_appkit_apps:Counter", name="h1", backend="hpc"),
            AppRequest("test_appkit_apps:Counter", name="h2", backend="hpc")])
        for app in apps:
            app.solve_step(TimeStep(0.5, 0.5, 1))
        for producer, consumer in zip(apps, [*apps[1:], apps[0]], strict=True):
            consumer.set_field(producer.get_field("temperature", 0.5, mode="ref"))
            assert consumer.received_mean() == 0.5
        members = {name: coupler._members[name] for name in ("a", "b", "h1", "h2")}
        assert {n: m.backend.name for n, m in members.items()} == {
            "a": "site_a", "b": "site_b", "h1": "hpc", "h2": "hpc"}
        jobs = {n: m.job for n, m in members.items()}
    for name, site, state in (("a", "site_a", "a"), ("b", "site_b", "b")):
        with Journal(tmp_path / state / "journal.sqlite") as journal:
            assert [r.job.spec.name for r in journal.records(site)] == [name]
            assert journal.records(site)[0].status.state.is_final
    with Journal(tmp_path / "hpc" / "journal.sqlite") as journal:
        records = journal.records("hpc")
        assert [r.job.spec.name for r in records] == ["h1", "h2"]
    assert len({jobs[n].native_id.split("_")[0] for n in ("h1", "h2")}) == 1  # one sbatch
    with Journal(tmp_path / "state" / "journal.sqlite") as journal:
        assert journal.records() == []  # the default backend ran nothing


@pytest.mark.slurm
def test_a_task_file_holding_secrets_is_owner_only_in_an_open_state_dir(slurm):
    slurm.state_dir.chmod(0o755)
    old = os.umask(0o022)
    try:
        jobs = slurm.submit([JobSpec(argv=("true",), name="secret", attributes=PARKED,
                                     environment={"GRIDCOUPLE_APP_TOKEN": "s3cret"})])
    finally:
        os.umask(old)
    slurm.cancel(jobs)
    [tasks] = (slurm.state_dir / "slurm").glob("*.tasks")
    assert "s3cret" in tasks.read_text()
    assert tasks.stat().st_mode & 0o077 == 0
