"""The Slurm backend against the real single-node cluster of scripts/slurm-up.

The cluster has a "debug" partition (default) and a "parked" one that is DOWN, where jobs wait
with Reason=PartitionDown, and keeps accounting (slurmdbd), so sacct knows jobs that ended.
Slurm counts walltime in whole minutes and checks it every 30 s, so the walltime job is
submitted first (by the module fixture) and checked last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

# Importing the command modules registers their commands, as gridcouple's main() does.
import gridcouple.cli.jobs
import gridcouple.cli.run
import gridcouple.cli.simulate  # noqa: F401
from conftest import require_slurm
from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
from gridcouple.cli import app
from gridcouple.errors import BackendError, QueryUnavailableError
from gridcouple.jobs import JobSpec, JobState, Resources, StagedFile

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A backend on a fresh state dir, and the walltime job submitted before everything else."""
    require_slurm()
    state_dir = tmp_path_factory.mktemp("slurm-state")
    backend = SlurmBackend(SlurmOptions(poll_interval=0.5), state_dir=state_dir)
    walltime_job, = backend.submit([JobSpec(argv=("sleep", "600"), name="overrun",
                                            resources=Resources(walltime=30))])
    yield backend, walltime_job
    backend.cancel([walltime_job])
    backend.close()


@pytest.fixture
def backend(cluster):
    return cluster[0]


def test_complete_with_staging_and_fail_with_exit_code(backend, tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("21\n")
    ok, bad = backend.submit([
        JobSpec(argv=("sh", "-c", "echo $(( $(cat input.txt) * 2 )) > answer.txt; echo stdout"),
                name="double", stage_in=(StagedFile(str(source), "input.txt"),),
                stage_out=(StagedFile("answer.txt", "answer.txt"),)),
        JobSpec(script="echo about to fail >&2\nexit 3\n", name="fails"),
    ])
    done, failed = backend.wait([ok, bad], timeout=60)
    assert (done.state, done.native_state, done.exit_code) == (JobState.COMPLETED, "COMPLETED", 0)
    assert backend.read_output(ok) == "stdout\n"
    fetched = backend.fetch(ok, tmp_path / "out")
    assert [p.read_text() for p in fetched] == ["42\n"]
    assert (failed.state, failed.native_state, failed.exit_code) == (JobState.FAILED, "FAILED", 3)
    assert backend.read_output(bad, "stderr") == "about to fail\n"
    assert failed.describe() == "FAILED (NonZeroExitCode) [exit code 3]"


def test_cancel_after_a_signal_and_wait_timeout(backend):
    script = "trap 'echo got USR1' USR1\necho started\nwhile :; do sleep 0.2; done\n"
    job, = backend.submit([JobSpec(script=script, name="cancel-me")])
    started = time.monotonic()
    status, = backend.wait([job], timeout=1.0)
    assert time.monotonic() - started < 5 and not status.state.is_final
    deadline = time.monotonic() + 30
    while "started" not in backend.read_output(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    backend.cancel([job], signal="USR1", grace=1.0)
    status, = backend.wait([job], timeout=30)
    assert (status.state, status.native_state) == (JobState.CANCELED, "CANCELLED")
    assert "got USR1" in backend.read_output(job)


def test_array_of_200_is_one_sbatch_call_and_one_squeue_per_poll(backend, tmp_path):
    jobs = backend.submit([JobSpec(argv=("echo", f"task {i}"), name="many") for i in range(200)])
    assert len({job.native_id.split("_")[0] for job in jobs}) == 1
    counting = ("open(__file__ + '.calls', 'a').write('call\\n')\n"
                "import os\nos.execv(REAL, [REAL, *sys.argv[1:]])\n")
    bin_dir = wrapped_bin_dir(tmp_path / "bin", squeue=counting)
    with SlurmBackend(SlurmOptions(bin_dir=bin_dir), state_dir=backend.state_dir) as counted:
        assert len(counted.status(jobs)) == 200
    assert (bin_dir / "squeue.calls").read_text() == "call\n"
    statuses = backend.wait(jobs, timeout=100)
    assert [s.state for s in statuses] == [JobState.COMPLETED] * 200
    assert [backend.read_output(j) for j in jobs] == [f"task {i}\n" for i in range(200)]


def test_pending_job_shows_its_reason_and_can_be_held_and_released(backend):
    parked = {"slurm.partition": "parked"}
    jobs = backend.submit([JobSpec(argv=("true",), name="parked", attributes=parked)
                           for _ in range(2)])
    statuses = backend.status(jobs)
    assert [(s.state, s.native_state, s.reason) for s in statuses] == [
        (JobState.QUEUED, "PENDING", "PartitionDown")] * 2
    assert statuses[0].describe() == "QUEUED: PENDING (PartitionDown)"
    backend.hold(jobs[:1])
    held, _ = backend.status(jobs)
    assert (held.state, held.reason) == (JobState.HELD, "JobHeldAdmin")
    backend.release(jobs[:1])
    assert backend.status(jobs)[0].state is JobState.QUEUED
    backend.cancel(jobs)  # pending array tasks leave squeue at once: the journal's mark decides
    assert [s.state for s in backend.wait(jobs, timeout=30)] == [JobState.CANCELED] * 2


def test_reattach_from_a_new_process(backend):
    job, = backend.submit([JobSpec(argv=("sh", "-c", "sleep 1; echo finished"), name="later")])
    code = textwrap.dedent(f"""
        import json, sys
        from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
        backend = SlurmBackend(SlurmOptions(poll_interval=0.5),
                               state_dir={str(backend.state_dir)!r})
        job = backend.reattach({job.native_id!r})
        status, = backend.wait([job], timeout=60)
        print(json.dumps([job.id, str(status.state), backend.read_output(job)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=90, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == [job.id, "COMPLETED", "finished\n"]


class FaultSubmitterDies(BaseException):
    """The submitting process dies between sbatch and recording the native ids."""


class FaultBackendDiesAfterSbatch(SlurmBackend):
    def _store_native_ids(self, native):
        if native:
            raise FaultSubmitterDies


def test_jobs_of_a_submitter_that_died_after_sbatch_are_found(backend):
    with (FaultBackendDiesAfterSbatch(SlurmOptions(), state_dir=backend.state_dir) as dying,
          pytest.raises(FaultSubmitterDies)):
        dying.submit([JobSpec(argv=("echo", str(i)), name="orphan") for i in range(3)])
    orphans = [r.job for r in backend.journal.records("slurm") if r.job.spec.name == "orphan"]
    assert [j.native_id for j in orphans] == ["", "", ""]
    statuses = backend.wait(orphans, timeout=60)
    assert [s.state for s in statuses] == [JobState.COMPLETED] * 3
    found = [backend.job(j.id) for j in orphans]
    assert len({j.native_id.split("_")[0] for j in found}) == 1
    assert [backend.read_output(j) for j in found] == ["0\n", "1\n", "2\n"]


def test_parameter_sweep_groups_shapes_into_arrays(backend, tmp_path):
    specs = [JobSpec(argv=("sh", "-c", 'echo $((P * P)) > square'), name=f"sweep-{p}",
                     environment={"P": str(p)}, stage_out=(StagedFile("square", f"{p}"),),
                     resources=Resources(cpus=2 if p % 2 else 1))
             for p in range(10)]
    jobs = backend.submit(specs)
    assert len({job.native_id.split("_")[0] for job in jobs}) == 2  # cpus=1 and cpus=2
    assert [s.state for s in backend.wait(jobs, timeout=60)] == [JobState.COMPLETED] * 10
    for job in jobs:
        backend.fetch(job, tmp_path / "results")
    squares = {int(f.name): int(f.read_text()) for f in (tmp_path / "results").iterdir()}
    assert squares == {p: p * p for p in range(10)}


@pytest.mark.parametrize(("name", "spec_args", "message"), [
    ("nowhere", {"attributes": {"slurm.partition": "nosuch"}}, "Invalid partition name specified"),
    ("too-big", {"resources": Resources(memory_mb=10 * 2**20)},
     "Requested node configuration is not available"),
])
def test_sbatch_error_carries_slurms_message(backend, name, spec_args, message):
    with pytest.raises(BackendError, match=message):
        backend.submit([JobSpec(argv=("true",), name=name, **spec_args)])
    record = backend.journal.records("slurm")[-1]
    assert record.job.spec.name == name and record.status.state is JobState.FAILED
    assert message in record.status.reason


def test_controller_down_is_a_clear_error_and_nothing_is_lost(backend, tmp_path, monkeypatch):
    """The real commands against a controller that does not answer: a copy of the cluster's
    slurm.conf whose SlurmctldPort nobody listens on."""
    conf = tmp_path / "slurm.conf"
    cluster_conf = Path("/etc/slurm/slurm.conf").read_text()
    conf.write_text(cluster_conf + "SlurmctldPort=9\nMessageTimeout=1\n")
    before = len(backend.journal.records("slurm"))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with (SlurmBackend(SlurmOptions(), state_dir=backend.state_dir) as down,
          pytest.raises(BackendError, match="Unable to contact slurm controller")):
        down.submit([JobSpec(argv=("true",), name="unreachable")])
    records = backend.journal.records("slurm")
    assert len(records) == before + 1
    assert records[-1].status.state is JobState.FAILED
    assert "Unable to contact slurm controller" in records[-1].status.reason


def wrapped_bin_dir(path: Path, **bodies: str) -> Path:
    """Slurm's real commands, except those given in ``bodies`` (``squeue="..."``), which run
    their body (Python; ``REAL`` is the real command): faults the real cluster cannot be made to
    show on demand."""
    path.mkdir()
    for tool in ("sbatch", "squeue", "scontrol", "scancel", "sacct"):
        real = shutil.which(tool)
        if tool not in bodies:
            (path / tool).symlink_to(real)
            continue
        wrapper = path / tool
        wrapper.write_text(f"#!{sys.executable}\nimport subprocess, sys\nREAL = {real!r}\n"
                           f"{bodies[tool]}")
        wrapper.chmod(0o755)
    return path


# Fault injection: an squeue that leaves out the native ids listed in squeue.forget beside it,
# as if the controller had purged the jobs (after MinJobAge, 600 s on the test cluster).
FORGETFUL_SQUEUE = (
    "forget = set(open(__file__ + '.forget').read().split())\n"
    "proc = subprocess.run([REAL, *sys.argv[1:]], capture_output=True, text=True)\n"
    "sys.stderr.write(proc.stderr)\n"
    "sys.stdout.write(''.join(line for line in proc.stdout.splitlines(True)\n"
    "                         if line.split('|')[0] not in forget))\n"
    "sys.exit(proc.returncode)\n")


def forgetting(path: Path, jobs, **bodies: str) -> Path:
    """A bin dir whose squeue (FORGETFUL_SQUEUE) no longer lists ``jobs``."""
    bin_dir = wrapped_bin_dir(path, squeue=FORGETFUL_SQUEUE, **bodies)
    (bin_dir / "squeue.forget").write_text(" ".join(j.native_id for j in jobs))
    return bin_dir


def wait_for_sacct(jobs, timeout: float = 30.0) -> None:
    """Until the real sacct holds an end record of every job: records reach the database a
    fraction of a second to ~2 s after a job ends."""
    wanted = {j.native_id for j in jobs}
    arrays = ",".join(sorted({n.split("_")[0] for n in wanted}))
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["sacct", "-P", "-n", "-X", "-o", "JobID,State", "-j", arrays],
                             capture_output=True, text=True, timeout=30).stdout
        ended = {line.split("|")[0] for line in out.splitlines()
                 if line.split("|")[-1].split(" ")[0] in ("COMPLETED", "FAILED", "CANCELLED",
                                                          "TIMEOUT")}
        if wanted <= ended:
            return
        assert time.monotonic() < deadline, (f"sacct has no end record of {sorted(wanted - ended)}"
                                             f" after {timeout:g} s:\n{out}")
        time.sleep(0.1)


def test_failing_squeue_marks_nothing_failed(backend, tmp_path):
    job, = backend.submit([JobSpec(argv=("sleep", "2"), name="survives")])
    body = ('sys.stderr.write("squeue: error: Unable to contact slurm controller")\n'
            "sys.exit(1)\n")
    with (SlurmBackend(SlurmOptions(bin_dir=wrapped_bin_dir(tmp_path / "bin", squeue=body)),
                       state_dir=backend.state_dir) as down,
          pytest.raises(QueryUnavailableError, match="Unable to contact slurm controller")):
        down.status([job])
    assert not backend.journal.get([job.id])[0].status.state.is_final
    assert backend.wait([job], timeout=60)[0].state is JobState.COMPLETED


def test_jobs_purged_from_squeue_are_resolved_by_sacct(backend, tmp_path):
    tasks = backend.submit([JobSpec(script="exit 3\n", name="acct-fails"),
                            JobSpec(argv=("true",), name="acct-ok")])
    assert [j.native_id.split("_")[1] for j in tasks] == ["0", "1"]  # two tasks of one array
    canceled, = backend.submit([JobSpec(argv=("sleep", "300"), name="acct-canceled")])
    backend.cancel([canceled])
    jobs = [*tasks, canceled]
    wait_for_sacct(jobs)
    with SlurmBackend(SlurmOptions(bin_dir=forgetting(tmp_path / "bin", jobs)),
                      state_dir=backend.state_dir) as forgetful:
        failed, done, gone = forgetful.status(jobs)
    assert (failed.state, failed.exit_code, failed.native_state) == (JobState.FAILED, 3, "FAILED")
    assert (done.state, done.exit_code, done.native_state) == (JobState.COMPLETED, 0, "COMPLETED")
    assert (gone.state, gone.native_state) == (JobState.CANCELED, "CANCELLED by 0")
    assert {s.reason for s in (failed, done, gone)} == {"from sacct (no longer listed by squeue)"}
    assert failed.end_time >= failed.start_time > 0 and failed.host


# The real sacct, sent to a port where no slurmdbd listens: what slurmdbd being down looks like.
SLURMDBD_UNREACHABLE = "AccountingStoragePort=9\n"
# Fault injection: an sacct that answers but has no record of the jobs yet, as when records lag
# behind the jobs' end (the real cluster's records are there before the test looks).
SACCT_WITHOUT_RECORDS = "sys.exit(0)\n"


@pytest.mark.parametrize(("conf_extra", "sacct", "why"), [
    (SLURMDBD_UNREACHABLE, {}, "sacct failed"),
    ("", {"sacct": SACCT_WITHOUT_RECORDS}, "no final record in sacct"),
], ids=["slurmdbd-unreachable", "sacct-records-lag"])
def test_job_purged_from_squeue_is_resolved_by_its_exit_code_file(backend, tmp_path, monkeypatch,
                                                                  conf_extra, sacct, why):
    jobs = backend.submit([JobSpec(script="sleep 1\nexit 3\n", name="purged"),
                           JobSpec(argv=("true",), name="purged-ok")])
    wait_for_sacct(jobs)  # without the fault, sacct would answer
    conf = tmp_path / "slurm.conf"
    conf.write_text(Path("/etc/slurm/slurm.conf").read_text() + conf_extra)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with SlurmBackend(SlurmOptions(bin_dir=forgetting(tmp_path / "bin", jobs, **sacct)),
                      state_dir=backend.state_dir) as forgetful:
        assert forgetful.accounting
        failed, done = forgetful.status(jobs)
    assert (failed.state, failed.exit_code, failed.native_state) == (JobState.FAILED, 3, "")
    assert failed.reason == f"from its exit-code file (no longer listed by squeue, {why})"
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)


def test_weak_coupling_recipe_with_application_servers_as_slurm_jobs(cluster, tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend]\nname = "slurm"\n'
                      "[backend.slurm]\npoll_interval = 0.5\n")
    result = CliRunner().invoke(app, ["run", "weak-coupling", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Time:")]
    assert lines[-1] == "Time:  1.00 concentration  1.00, running average  0.55"
    with SlurmBackend(SlurmOptions(), state_dir=tmp_path / "state") as servers:
        jobs = [r.job for r in servers.journal.records("slurm")]
        assert [j.spec.name for j in jobs] == ["concentration", "running-average"]
        assert len({j.native_id.split("_")[0] for j in jobs}) == 1  # one array
        assert [s.state for s in servers.wait(jobs, timeout=30)] == [JobState.COMPLETED] * 2


class FaultSmallArrays(SlurmBackend):
    """A cluster whose MaxArraySize is 3 (the test cluster's is 10001)."""

    max_array_size = 3


def test_arrays_are_split_at_max_array_size(backend):
    with FaultSmallArrays(SlurmOptions(), state_dir=backend.state_dir) as small:
        jobs = small.submit([JobSpec(argv=("echo", str(i)), name="split") for i in range(7)])
        ids = [job.native_id.split("_")[0] for job in jobs]
        assert [ids.count(i) for i in dict.fromkeys(ids)] == [3, 3, 1]
        assert [s.state for s in small.wait(jobs, timeout=60)] == [JobState.COMPLETED] * 7
        assert [small.read_output(j) for j in jobs] == [f"{i}\n" for i in range(7)]


def test_walltime_ends_in_timeout(cluster, tmp_path):
    backend, job = cluster
    status, = backend.wait([job], timeout=130)
    assert (status.state, status.native_state) == (JobState.TIMEOUT, "TIMEOUT")
    assert os.path.exists(backend.job_home(job.id) / "exit_code")
    wait_for_sacct([job])
    with SlurmBackend(SlurmOptions(bin_dir=forgetting(tmp_path / "bin", [job])),
                      state_dir=backend.state_dir) as forgetful:
        from_sacct = forgetful.query(forgetful.journal.get([job.id]))[job.id]
    assert (from_sacct.state, from_sacct.native_state) == (JobState.TIMEOUT, "TIMEOUT")


def test_a_cancel_that_comes_while_sbatch_runs_is_carried_out(backend, tmp_path):
    """Another process cancels a job the submitter is still handing to sbatch (no native id
    yet): once sbatch answers, the job is scancel'ed, not left to run."""
    import threading

    # Fault injection: an sbatch that answers a second late, so the cancel lands meanwhile.
    slow = "import time\ntime.sleep(1)\nsys.exit(subprocess.call([REAL, *sys.argv[1:]]))\n"
    bin_dir = wrapped_bin_dir(tmp_path / "bin", sbatch=slow)
    submitted = []
    with SlurmBackend(SlurmOptions(bin_dir=bin_dir, poll_interval=0.5),
                      state_dir=backend.state_dir) as submitter:
        worker = threading.Thread(target=lambda: submitted.extend(submitter.submit(
            [JobSpec(argv=("sleep", "300"), name="late-cancel")])))
        worker.start()
        deadline = time.monotonic() + 10
        while not (records := [r for r in backend.journal.records("slurm")
                               if r.job.spec.name == "late-cancel"]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert records[0].job.native_id == ""  # still inside sbatch
        backend.cancel([records[0].job])
        worker.join(timeout=30)
    [status] = backend.wait(submitted, timeout=30)
    assert status.state is JobState.CANCELED, status
