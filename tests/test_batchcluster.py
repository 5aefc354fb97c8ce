"""gridcouple.dask.BatchCluster with real worker jobs: on the local backend, the Slurm cluster of
scripts/slurm-up and the HTCondor pool of scripts/htcondor-up. Workers run tasks of
executor_tasks.py; worker jobs that cannot start (a partition that is down, an interpreter
that does not exist) are shown and raised."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from distributed import Client
from distributed.comm import connect as dask_connect
from distributed.security import Security

import executor_tasks as tasks
from conftest import require_slurm
from gridcouple.backends.slurm import SlurmBackend, SlurmOptions
from gridcouple.dask import BatchCluster, WorkerStartError, WorkerStartTimeout
from gridcouple.jobs import JobState
from htcondor_pool import htcondor_pool_fixture  # noqa: F401 (the fixture)
from test_executor import PARKED, TESTS, sbatch_counter, wait_until

pytestmark = pytest.mark.timeout(180)

BAD_PYTHON = "/nonexistent/python3"


def refused(address: str, security: Security) -> bool:
    """Whether a dask peer with ``security`` is refused by the scheduler at ``address``."""

    async def try_to_connect() -> None:
        comm = await dask_connect(address, timeout=3, **security.get_connection_args("client"))
        await comm.write({"op": "identity", "reply": True})
        await comm.read()

    try:
        asyncio.run(try_to_connect())
    except (OSError, TimeoutError):
        return True
    return False


def check_start_failure(error: WorkerStartError) -> None:
    """A worker job that ran a missing interpreter: its state and stderr tail, said clearly."""
    assert error.status is not None and error.job is not None
    assert (error.status.state, error.status.exit_code) == (JobState.FAILED, 127)
    message = str(error)
    assert message.startswith("worker dask-worker-")
    assert f"job {error.job} ended before the worker joined the scheduler" in message
    assert "No such file or directory" in error.stderr and BAD_PYTHON in error.stderr
    assert message.endswith(error.stderr)


# --- the local backend ----------------------------------------------------------------------


def test_scale_is_one_submission_over_mutual_tls_with_a_loopback_dashboard(local_backend):
    with BatchCluster(local_backend) as cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        assert cluster.submissions == 1
        jobs = [w.job for w in cluster.worker_jobs()]
        assert [j.spec.name for j in jobs] == ["dask-worker"] * 2
        assert {w.name for w in cluster.worker_jobs()} == {"dask-worker-0", "dask-worker-1"}
        wait_until(lambda: "2 running (2 joined)" in repr(cluster), what=repr(cluster))
        assert repr(cluster).endswith("local jobs: 0 pending, 2 running (2 joined), 0 failed)")
        assert client.gather(client.map(tasks.square, range(20))) == [i * i for i in range(20)]
        # only holders of the cluster's certificate get in
        address = cluster.scheduler_address
        assert refused(address.replace("tls://", "tcp://"), Security())
        assert refused(address, Security.temporary())
        assert not refused(address, cluster.security)
        # the dashboard's HTTP server listens on loopback
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        health = cluster.dashboard_link.replace("/status", "/health")
        with urllib.request.urlopen(health, timeout=10) as answer:
            assert answer.read() == b"ok"
        cluster.scale(0)
        statuses = local_backend.wait(jobs, timeout=30)
    assert [s.state for s in statuses] == [JobState.CANCELED] * 2


def test_adapt_starts_workers_for_work_and_retires_them(local_backend):
    with BatchCluster(local_backend) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=2, interval="200ms", wait_count=2)
        assert client.submit(tasks.sleep_then, 0.5, "done").result(timeout=60) == "done"
        assert cluster.submissions >= 1
        wait_until(lambda: not client.scheduler_info()["workers"], timeout=60,
                   what="idle workers retired")
        wait_until(lambda: all(w.status.state.is_final for w in cluster.worker_jobs()),
                   what="their jobs ended")
        assert "0 running (0 joined), 0 failed" in repr(cluster)


def test_a_worker_job_with_a_missing_interpreter_is_raised_not_waited_for(local_backend):
    with BatchCluster(local_backend, python=BAD_PYTHON) as cluster, Client(cluster) as client:
        cluster.scale(2)
        started = time.monotonic()
        with pytest.raises(WorkerStartError) as failed:
            client.wait_for_workers(2, timeout=120)
        assert time.monotonic() - started < 10
        check_start_failure(failed.value)
        wait_until(lambda: len(cluster.start_failures) == 2, what="both failures")
        assert repr(cluster).endswith(
            "local jobs: 0 pending, 0 running (0 joined), 2 failed (FAILED (cannot start: No "
            f"such file or directory: '{BAD_PYTHON}') [exit code 127]))")
        # adaptive scaling submits no more after a start failure ...
        cluster.adapt(minimum=1, maximum=2, interval="100ms")
        time.sleep(1.0)
        assert cluster.submissions == 1
        # ... until scale is called again
        cluster.scale(1)
        wait_until(lambda: cluster.submissions == 2, what="a new submission")


# --- Slurm ----------------------------------------------------------------------------------


@pytest.mark.slurm
def test_slurm_scale_4_is_one_sbatch_and_the_workers_compute(tmp_path):
    require_slurm()
    bin_dir = sbatch_counter(tmp_path / "bin")
    with SlurmBackend(SlurmOptions(bin_dir=bin_dir, poll_interval=1.0),
                      state_dir=tmp_path / "state") as backend, \
            BatchCluster(backend) as cluster, Client(cluster) as client:
        cluster.scale(4)
        client.wait_for_workers(4, timeout=120)
        assert (bin_dir / "sbatch.calls").read_text() == "call\n"
        jobs = [w.job for w in cluster.worker_jobs()]
        assert len({j.native_id.split("_")[0] for j in jobs}) == 1  # one array
        assert sum(client.gather(client.map(tasks.square, range(100)))) == 328350
        wait_until(lambda: "slurm jobs: 0 pending, 4 running (4 joined), 0 failed" in
                   repr(cluster), what=repr(cluster))


@pytest.mark.slurm
def test_slurm_worker_jobs_pending_held_and_failed_are_shown_within_one_poll(tmp_path):
    require_slurm()
    poll = 1.0
    with SlurmBackend(SlurmOptions(poll_interval=poll), state_dir=tmp_path / "state") as backend:
        with BatchCluster(backend, attributes=PARKED) as parked:
            started = time.monotonic()
            parked.scale(3)
            wait_until(lambda: "PartitionDown" in parked.queue_state(), timeout=10)
            assert time.monotonic() - started <= poll + 0.5
            assert parked.queue_state() == ("3 pending (QUEUED: PENDING (PartitionDown)), "
                                            "0 running (0 joined), 0 failed")
            backend.hold([parked.worker_jobs()[0].job])
            wait_until(lambda: "JobHeldAdmin" in parked.queue_state(), timeout=10)
            assert parked.queue_state().startswith(
                "3 pending (2 QUEUED: PENDING (PartitionDown), 1 HELD: PENDING (JobHeldAdmin))")
            with pytest.raises(WorkerStartTimeout, match=r"0 of 3 workers joined within 2 s; "
                               r"slurm worker jobs: 3 pending \(2 QUEUED: PENDING "
                               r"\(PartitionDown\)"):
                parked.wait_for_workers(3, timeout=2)
        with BatchCluster(backend, python=BAD_PYTHON) as broken:
            started = time.monotonic()
            broken.scale(1)
            with pytest.raises(WorkerStartError) as failed:
                broken.wait_for_workers(1, timeout=120)
            check_start_failure(failed.value)
            assert failed.value.status.native_state == "FAILED"
            assert time.monotonic() - started < 30
            assert "0 pending, 0 running (0 joined), 1 failed (FAILED (NonZeroExitCode) " \
                   "[exit code 127])" in repr(broken)


# --- HTCondor -------------------------------------------------------------------------------


@pytest.mark.htcondor
def test_htcondor_workers_as_the_job_user_join_and_compute(request):
    pytest.importorskip("htcondor2")
    pool = request.getfixturevalue("htcondor_pool")
    from gridcouple.backends.htcondor import HTCondorOptions
    from test_htcondor import JobUserBackend

    state_dir = Path(pool.shared_dir) / f"test-cluster-{uuid.uuid4().hex[:12]}"
    with JobUserBackend(HTCondorOptions(poll_interval=0.3), state_dir=state_dir,
                        python=pool.python) as backend, \
            BatchCluster(backend, environment={"PYTHONPATH": str(TESTS)}) as cluster, \
            Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=120)
        assert cluster.submissions == 1
        assert len({w.job.native_id.split(".")[0] for w in cluster.worker_jobs()}) == 1
        assert client.submit(tasks.whoami, pure=False).result(timeout=60) == (
            pool.job_uid, pool.python)
        assert client.gather(client.map(tasks.square, range(10))) == [i * i for i in range(10)]
