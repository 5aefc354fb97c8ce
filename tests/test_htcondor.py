"""The HTCondor backend against the real pool of scripts/htcondor-up (docs/htcondor.md).

The pool maps this submitter (root) to the job user gcjob, whose jobs run in the pool's chroot:
at a site the submitter and the job owner are one user. So the in-process backend here is
:class:`JobUserBackend`, which hands the state directory's files to gcjob before each submit;
the coupled runs go further and run the coupler itself as gcjob (uid 2001, with its own copy of
the token), as a site's user would. Faults the pool does not show on demand are injected by
subclasses named ``Fault...``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_service
from htcondor_pool import PoolInfo, htcondor_pool_fixture, htcondor_shared_dir_fixture, schedd

if importlib.util.find_spec("htcondor2") is None and os.environ.get("CI") != "true":
    pytest.skip("the htcondor bindings are not installed (pip install 'gridcouple[htcondor]')",
                allow_module_level=True)

from gridcouple.backends.htcondor import HTCondorBackend, HTCondorOptions
from gridcouple.errors import BackendError
from gridcouple.jobs import JobSpec, JobState, Resources, StagedFile

pytestmark = [pytest.mark.htcondor, pytest.mark.timeout(180)]
__all__ = ["htcondor_pool_fixture", "htcondor_shared_dir_fixture"]  # fixtures, used by name

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
METACHARACTERS = "it's a \"q\" $HOME;`id` | * \\ ${X} $(date)"


def give_to_job_user(path: Path, uid: int) -> None:
    """chown -R ``path`` to the job user."""
    for root, _, files in os.walk(path):
        os.chown(root, uid, uid)
        for name in files:
            os.chown(os.path.join(root, name), uid, uid)


class JobUserBackend(HTCondorBackend):
    """The real backend; before each submit the state directory (task files, scripts, job homes
    with their staged input) goes to the job user, who owns the jobs of this pool."""

    JOB_UID = 2001

    def submit_array(self, shape, script, count, name, tag):
        give_to_job_user(self.state_dir, self.JOB_UID)
        return super().submit_array(shape, script, count, name, tag)


class FaultSubmitterKilled(JobUserBackend):
    """The submitting process is killed (SIGKILL) between Schedd.submit and storing the ids."""

    def _store_native_ids(self, native):
        if native:
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._store_native_ids(native)


class FaultScriptVanishes(JobUserBackend):
    """The submission's script is gone once submitted: what an execute machine that does not
    share the state directory sees."""

    def submit_array(self, shape, script, count, name, tag):
        native = super().submit_array(shape, script, count, name, tag)
        script.unlink()
        return native


class FaultLogUnreadable(HTCondorBackend):
    """This submitter cannot read the event log (as on a file system it does not mount)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.event_log.path = self.batch_dir / "not-mounted" / "events.log"


@pytest.fixture(scope="module")
def state_dir(htcondor_pool: PoolInfo):
    """A state directory in the pool's shared directory, for the module's backend."""
    path = Path(htcondor_pool.shared_dir) / f"test-backend-{uuid.uuid4().hex[:12]}"
    yield path
    deadline = time.monotonic() + 30  # the schedd writes the last events of removed jobs
    while schedd().query(f'Iwd == "{path}"', ["ClusterId"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def backend(state_dir):
    """The backend; whatever it left in the queue is removed afterwards."""
    with JobUserBackend(HTCondorOptions(poll_interval=0.3), state_dir=state_dir) as backend:
        yield backend
        live = [r.job for r in backend.journal.records("htcondor", active_only=True)]
        if live:
            backend.cancel(live)


def queue_of(cluster: str) -> list:
    """The schedd's ads of a cluster (for checks the backend does not make itself)."""
    return schedd().query(f"ClusterId == {cluster}", ["ProcId", "JobStatus", "HoldReasonCode"])


def test_complete_fail_and_killed_with_metacharacters_staging_and_exit_codes(backend, tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("21\n")
    workdir = backend.state_dir / "a work dir's \"name\" $x"
    workdir.mkdir(parents=True, exist_ok=True)
    ok, fails, killed, staged, placed = backend.submit([
        JobSpec(argv=("sh", "-c", 'printf "%s|%s|%s\\n" "$1" "$GC_X" "$(pwd)"', "sh",
                      METACHARACTERS), name="ok", environment={"GC_X": METACHARACTERS}),
        JobSpec(script="echo about to fail >&2\nexit 3\n", name="fails"),
        JobSpec(argv=("sh", "-c", "kill -9 $$"), name="killed"),
        JobSpec(argv=("sh", "-c", "echo $(( $(cat input.txt) * 2 )) > answer.txt"),
                name="staged", stage_in=(StagedFile(str(source), "input.txt"),),
                stage_out=(StagedFile("answer.txt", "answer.txt"),)),
        JobSpec(argv=("sh", "-c", "pwd; echo oops >&2"), name="placed", directory=str(workdir),
                stdout="out $1 'x'.txt", stderr=str(workdir / "err.txt")),
    ])
    jobs = [ok, fails, killed, staged, placed]
    assert len({j.native_id.split(".")[0] for j in jobs}) == 1
    done, failed, signaled, doubled, there = backend.wait(jobs, timeout=60)
    assert (done.state, done.native_state, done.exit_code) == (JobState.COMPLETED, "COMPLETED", 0)
    home = backend.job_home(ok.id)
    assert backend.read_output(ok) == f"{METACHARACTERS}|{METACHARACTERS}|{home}\n"
    assert done.host and done.start_time and done.end_time
    assert (failed.state, failed.exit_code) == (JobState.FAILED, 3)
    assert failed.describe() == "FAILED: COMPLETED [exit code 3]"
    assert backend.read_output(fails, "stderr") == "about to fail\n"
    assert (signaled.state, signaled.signal) == (JobState.FAILED, 9)
    assert doubled.state is JobState.COMPLETED
    assert [p.read_text() for p in backend.fetch(staged, tmp_path / "out")] == ["42\n"]
    assert there.state is JobState.COMPLETED
    assert (workdir / "out $1 'x'.txt").read_text() == f"{workdir}\n"
    assert (workdir / "err.txt").read_text() == "oops\n"


def test_cancel_signals_and_suspend(backend):
    script = ("trap 'echo got TERM; exit 143' TERM\necho started\n"
              "while :; do sleep 0.1; done\n")
    job, = backend.submit([JobSpec(script=script, name="cancel-me")])
    deadline = time.monotonic() + 30
    while "started" not in backend.read_output(job):
        assert time.monotonic() < deadline, backend.status([job])
        time.sleep(0.1)
    with pytest.raises(BackendError, match="cannot send SIGUSR1"):
        backend.send_signal([job], "USR1")
    backend.send_signal([job], "STOP")  # HTCondor's suspend
    assert wait_for_state(backend, job, JobState.SUSPENDED).native_state == "SUSPENDED"
    backend.send_signal([job], "CONT")
    assert wait_for_state(backend, job, JobState.ACTIVE).native_state == "RUNNING"
    started = time.monotonic()
    backend.cancel([job])
    status, = backend.wait([job], timeout=30)
    assert time.monotonic() - started < 5  # the TERM reached the command: no kill_wait
    assert (status.state, status.native_state) == (JobState.CANCELED, "REMOVED")
    assert "canceled by gridcouple" in status.reason
    assert backend.read_output(job).endswith("got TERM\n")


def wait_for_state(backend, job, state: JobState, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (status := backend.status([job])[0]).state is not state:
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def test_hold_then_release(backend):
    job, = backend.submit([JobSpec(argv=("sh", "-c", "sleep 1; echo done"), name="held")])
    backend.hold([job])
    held = wait_for_state(backend, job, JobState.HELD)
    assert held.native_state == "HELD"
    assert held.reason == "held by gridcouple (by user gcjob) (HoldReasonCode 1)"
    time.sleep(2)
    assert backend.status([job])[0].state is JobState.HELD  # it does not start while held
    backend.release([job])
    status, = backend.wait([job], timeout=60)
    assert status.state is JobState.COMPLETED and backend.read_output(job) == "done\n"


def test_walltime_exceeded_is_timeout_with_htcondors_reason(backend):
    job, = backend.submit([JobSpec(argv=("sleep", "60"), name="overrun",
                                   resources=Resources(walltime=2))])
    status, = backend.wait([job], timeout=60)
    assert (status.state, status.native_state) == (JobState.TIMEOUT, "HELD")
    assert "exceeded allowed job duration of 00:02" in status.reason
    assert status.end_time - status.start_time >= 2
    # periodic_remove takes the held job out of the queue; the TERM reached the job script.
    deadline = time.monotonic() + 60
    while [ad for ad in queue_of(job.native_id.split(".")[0]) if ad["JobStatus"] == 5]:
        assert time.monotonic() < deadline, "the job stayed held"
        time.sleep(0.5)
    assert (backend.job_home(job.id) / "exit_code").read_text().startswith("signal 15 ")


def test_a_job_that_cannot_start_is_failed_with_the_hold_reason(backend):
    with FaultScriptVanishes(backend.options, state_dir=backend.state_dir) as faulty:
        job, = faulty.submit([JobSpec(argv=("true",), name="no-script")])
        status, = faulty.wait([job], timeout=60)
    assert (status.state, status.native_state) == (JobState.FAILED, "HELD")
    script = faulty.batch_dir / f"{job.id}.sh"
    assert status.describe().startswith(f"FAILED: HELD (Failed to execute '{script}'")
    assert "No such file or directory" in status.reason and "(HoldReasonCode 6)" in status.reason
    deadline = time.monotonic() + 30  # removed at once, not left held
    while any(ad["JobStatus"] != 3 for ad in queue_of(job.native_id.split(".")[0])):
        assert time.monotonic() < deadline, queue_of(job.native_id.split(".")[0])
        time.sleep(0.3)


def test_an_unmatchable_job_waits_with_the_negotiators_reason(backend):
    job, = backend.submit([JobSpec(argv=("true",), name="too-big",
                                   resources=Resources(cpus=64))])
    deadline = time.monotonic() + 30
    while True:  # a new process (here: a new backend) asks the schedd once at start
        with HTCondorBackend(backend.options, state_dir=backend.state_dir) as fresh:
            status, = fresh.status([job])
        if status.reason:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert (status.state, status.native_state, status.reason) == (
        JobState.QUEUED, "IDLE", "no match found")
    assert status.describe() == "QUEUED: IDLE (no match found)"
    backend.cancel([job])
    assert backend.wait([job], timeout=30)[0].state is JobState.CANCELED


class CountingBackend(JobUserBackend):
    """Counts its schedd queries (the event log answers the polls in between)."""

    reconciles = 0

    def _reconcile(self, followed, *, required):
        type(self).reconciles += 1
        super()._reconcile(followed, required=required)


@pytest.mark.timeout(240)
def test_cluster_of_200_one_submit_and_the_event_log_between_reconciles(backend):
    with CountingBackend(HTCondorOptions(poll_interval=0.3, reconcile_interval=600),
                         state_dir=backend.state_dir) as counting:
        jobs = counting.submit([JobSpec(argv=("echo", f"task {i}"), name="many")
                                for i in range(200)])
        assert {j.native_id.split(".")[0] for j in jobs} == {jobs[0].native_id.split(".")[0]}
        assert [j.native_id.split(".")[1] for j in jobs] == [str(i) for i in range(200)]
        statuses = counting.wait(jobs, timeout=200)  # 15-30 s; 100 s on a loaded machine
        polls = counting.watcher.queries
    assert [s.state for s in statuses] == [JobState.COMPLETED] * 200
    assert polls > 3 and CountingBackend.reconciles == 1  # at start only
    assert [backend.read_output(j) for j in jobs] == [f"task {i}\n" for i in range(200)]


def test_reattach_from_a_new_process(backend):
    job, = backend.submit([JobSpec(argv=("sh", "-c", "sleep 1; echo finished"), name="later")])
    backend.status([job])  # this process has read the log: the next one resumes after it
    code = textwrap.dedent(f"""
        import json
        from gridcouple.backends.htcondor import HTCondorBackend
        backend = HTCondorBackend(state_dir={str(backend.state_dir)!r})
        job = backend.reattach({job.native_id!r})
        status, = backend.wait([job], timeout=60)
        print(json.dumps([job.id, str(status.state), status.exit_code, backend.read_output(job)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=90, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == [job.id, "COMPLETED", 0, "finished\n"]


def test_jobs_of_a_submitter_killed_after_submit_are_found_by_their_tag(backend):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_htcondor import FaultSubmitterKilled
        from gridcouple.jobs import JobSpec
        dying = FaultSubmitterKilled(state_dir={str(backend.state_dir)!r})
        dying.submit([JobSpec(argv=("echo", str(i)), name="orphan") for i in range(3)])
    """)
    died = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr
    orphans = [r.job for r in backend.journal.records("htcondor")
               if r.job.spec.name == "orphan"]
    assert [j.native_id for j in orphans] == ["", "", ""]
    statuses = backend.wait(orphans, timeout=60)
    assert [s.state for s in statuses] == [JobState.COMPLETED] * 3
    found = [backend.job(j.id) for j in orphans]
    assert len({j.native_id.split(".")[0] for j in found}) == 1
    assert [backend.read_output(j) for j in found] == ["0\n", "1\n", "2\n"]


def test_event_log_truncated_or_unreadable_falls_back_to_the_schedd(backend):
    specs = [JobSpec(script="sleep 2\n", name="survives"),
             JobSpec(script="sleep 2\nexit 3\n", name="survives-fails")]
    jobs = backend.submit(specs)
    backend.status(jobs)
    with open(backend.event_log.path, "r+") as log:  # truncated under the reader
        log.truncate(0)
    done, failed = backend.wait(jobs, timeout=60)
    assert (done.state, failed.state, failed.exit_code) == (JobState.COMPLETED,
                                                            JobState.FAILED, 3)
    jobs = backend.submit(specs)
    with FaultLogUnreadable(backend.options, state_dir=backend.state_dir) as blind:
        states = []
        for event in blind.events(jobs, timeout=60):
            states.append(event.status.state)
            assert event.status.state in (JobState.QUEUED, JobState.ACTIVE, JobState.COMPLETED,
                                          JobState.FAILED), event.status
        done, failed = blind.status(jobs)
    assert JobState.ACTIVE in states  # followed through the schedd while they ran
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
    assert (failed.state, failed.exit_code) == (JobState.FAILED, 3)


def test_file_transfer_without_a_shared_file_system(htcondor_pool: PoolInfo, tmp_path):
    state = tmp_path / "state"  # root's, outside the pool's chroot: the jobs cannot see it
    assert not htcondor_pool.in_chroot(tmp_path).exists()
    source = tmp_path / "input.txt"
    source.write_text("from the submitter\n")
    with HTCondorBackend(HTCondorOptions(spool=True, poll_interval=0.5),
                         state_dir=state) as spooled:
        ok, fails = spooled.submit([
            JobSpec(argv=("sh", "-c", 'tr a-z A-Z < input.txt > result.txt; echo "$1"; pwd',
                          "sh", METACHARACTERS), name="transfer",
                    stage_in=(StagedFile(str(source), "input.txt"),),
                    stage_out=(StagedFile("result.txt", "result.txt"),)),
            JobSpec(script="echo no luck >&2\nexit 3\n", name="transfer-fails")])
        done, failed = spooled.wait([ok, fails], timeout=90)
        assert (done.state, done.exit_code) == (JobState.COMPLETED, 0), done
        assert (failed.state, failed.exit_code) == (JobState.FAILED, 3)
        text, where = spooled.read_output(ok).splitlines()
        assert text == METACHARACTERS and where.startswith("/var/lib/condor/execute/")
        assert spooled.read_output(fails, "stderr") == "no luck\n"
        fetched = spooled.fetch(ok, tmp_path / "out")
        assert [p.read_text() for p in fetched] == ["FROM THE SUBMITTER\n"]
        assert spooled.field_store_base() is None


# --- coupled runs, with the coupler as the job user ------------------------------------------


@dataclass(frozen=True)
class JobUser:
    """Runs Python as the pool's job user, with its own copy of the token."""

    pool: PoolInfo
    home: Path
    python: str

    @property
    def condor_config(self) -> Path:
        return self.home / "condor_config"

    def run(self, args: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        path = os.pathsep.join([str(SRC), sysconfig.get_paths()["purelib"]])
        uid = str(self.pool.job_uid)
        return subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env", "-i",
             "PATH=/usr/bin:/bin", f"HOME={self.home}", f"PYTHONPATH={path}",
             f"CONDOR_CONFIG={self.condor_config}", "LANG=C.UTF-8", self.python, *args],
            cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def job_user(htcondor_pool: PoolInfo):
    """The job user's home (0700): a client configuration and a copy of the token."""
    require_service("setpriv", shutil.which("setpriv") is not None, "util-linux's setpriv")
    home = Path(tempfile.mkdtemp(prefix="gridcouple-jobuser-"))
    tokens = home / "tokens.d"
    tokens.mkdir()
    shutil.copy(htcondor_pool.token_file, tokens / "gcjob")
    config = Path(htcondor_pool.condor_config).read_text()
    (home / "condor_config").write_text(
        "".join(line for line in config.splitlines(keepends=True)
                if not line.startswith("SEC_TOKEN_DIRECTORY"))
        + f"SEC_TOKEN_DIRECTORY = {tokens}\n")
    give_to_job_user(home, htcondor_pool.job_uid)
    # This interpreter, or the system's of the same version when the job user cannot run it
    # (a Python under root's home): either imports this venv's packages.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/python{version}"):
        user = JobUser(htcondor_pool, home, python)
        probe = user.run(["-c", "import gridcouple.coupler, htcondor2"], cwd=home, timeout=60)
        if probe.returncode == 0:
            break
    require_service("a Python the job user can run", probe.returncode == 0, probe.stderr[-300:])
    yield user
    shutil.rmtree(home, ignore_errors=True)


CLI = "import sys; from gridcouple.cli import main; sys.argv[0] = 'gridcouple'; main()"


def coupled_config(directory: Path, pool: PoolInfo, user: JobUser) -> Path:
    config = directory / "gridcouple.toml"
    config.write_text(f'state_dir = "state"\n[backend.htcondor]\npython = "{pool.python}"\n'
                      f'condor_config = "{user.condor_config}"\npoll_interval = 0.5\n'
                      "[coupler]\njoin_timeout = 60\n")
    return config


def servers_of(state: Path, names: list[str]) -> None:
    """The recipe's servers were procs of one cluster, and ended."""
    with HTCondorBackend(state_dir=state) as servers:
        jobs = [r.job for r in servers.journal.records("htcondor")]
        assert [j.spec.name for j in jobs] == names
        assert len({j.native_id.split(".")[0] for j in jobs}) == 1
        assert [j.native_id.split(".")[1] for j in jobs] == ["0", "1"]
        assert all(s.state.is_final for s in servers.wait(jobs, timeout=30))


@pytest.mark.parametrize(("recipe", "names", "last"), [
    ("weak-coupling", ["concentration", "running-average"],
     "Time:  1.00 concentration  1.00, running average  0.55"),
    ("thermo-mechanical", ["heat", "expansion"], "9 VTK files in "),
])
def test_coupled_recipe_on_the_pool(htcondor_pool, htcondor_shared_dir, job_user, recipe, names,
                                    last):
    config = coupled_config(htcondor_shared_dir, htcondor_pool, job_user)
    result = job_user.run(["-c", CLI, "run", recipe, "--backend", "htcondor", "--config",
                           str(config)], cwd=htcondor_shared_dir, timeout=170)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert any(line.startswith(last) for line in result.stdout.splitlines()), result.stdout
    servers_of(htcondor_shared_dir / "state", names)


DIES_MID_STEP = """
import json, os, signal, sys, threading, time
from gridcouple.appkit.data import TimeStep
from gridcouple.coupler import ApplicationFailedError, Coupler
with Coupler.from_config(sys.argv[1], backend="htcondor") as coupler:
    app = coupler.allocate("test_appkit_apps:Sleeper", name="victim",
                           environment={"PYTHONPATH": sys.argv[2]})
    threading.Timer(0.5, os.kill, (app.pid(), signal.SIGKILL)).start()
    started = time.monotonic()
    try:
        app.solve_step(TimeStep(60.0, 60.0, 7))
        message = "no failure"
    except ApplicationFailedError as exc:
        message = str(exc)
    print(json.dumps([time.monotonic() - started, message,
                      str(coupler._members["victim"].job)]))
"""


def test_a_server_killed_mid_step_is_reported_within_5_s_with_its_stderr(
        htcondor_pool, htcondor_shared_dir, job_user):
    config = coupled_config(htcondor_shared_dir, htcondor_pool, job_user)
    result = job_user.run(["-c", DIES_MID_STEP, str(config), str(TESTS)],
                          cwd=htcondor_shared_dir, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    elapsed, message, job = json.loads(result.stdout.splitlines()[-1])
    print(f"the server's end reported after {elapsed:.1f} s")
    assert elapsed < 5.5, message
    assert f"application victim (test_appkit_apps:Sleeper), job {job}" in message
    assert "job state FAILED: COMPLETED [killed by SIGKILL]" in message
    assert "native state COMPLETED" in message
    assert message.endswith("last lines of its stderr:\nsolving step 7")
