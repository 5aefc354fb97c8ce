"""The real HTCondor pool of scripts/htcondor-up, through the host's htcondor2 bindings.

These tests prove what the HTCondor backend relies on (docs/htcondor.md, "Notes for the
backend"): the host submits as the job user with its IDTOKEN; one ``Schedd.submit`` call makes a
cluster of N procs from itemdata; the user event log in the shared directory reports each
proc's end and exit code, and a pickled ``JobEventLog`` resumes where it stopped; history keeps
the exit code; jobs run the chroot's Python with the checkout's gridcouple; a spooled job whose
directory the pool cannot see gets its input and brings its output back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from pathlib import Path

import pytest

from htcondor_pool import (  # noqa: F401 (fixtures)
    PoolInfo,
    htcondor_pool_fixture,
    htcondor_shared_dir_fixture,
    schedd,
)

try:
    import htcondor2
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("the htcondor bindings are not installed (pip install 'gridcouple[htcondor]')",
                allow_module_level=True)

pytestmark = [pytest.mark.htcondor, pytest.mark.timeout(120)]

COMPLETED = 4
HELD = 5


def arguments(*argv: str) -> str:
    """A submit ``arguments`` value (new syntax) for argv without quotes in it."""
    assert not any("'" in a or '"' in a for a in argv)
    return '"' + " ".join(f"'{a}'" for a in argv) + '"'


@pytest.fixture
def clusters():
    """Cluster ids a test submits; whatever of them is still queued is removed afterwards."""
    ids: list[int] = []
    yield ids
    if ids:
        with contextlib.suppress(htcondor2.HTCondorException):  # the pool may be gone by now
            schedd().act(htcondor2.JobAction.Remove, " || ".join(f"ClusterId == {c}" for c in ids))


def wait_for_status(cluster: int, status: int, timeout: float = 60.0) -> list:
    """Poll the schedd (fine for a test; a backend follows the event log) until every proc of
    ``cluster`` has ``status`` (or has left the queue); fail on a hold that is not spooling."""
    deadline = time.monotonic() + timeout
    while True:
        ads = schedd().query(f"ClusterId == {cluster}",
                             ["ProcId", "JobStatus", "HoldReason", "HoldReasonCode"])
        held = [ad for ad in ads if ad["JobStatus"] == HELD and ad.get("HoldReasonCode") != 16]
        assert not held or status == HELD, f"held: {held[0].get('HoldReason')}"
        if all(ad["JobStatus"] == status for ad in ads):
            return ads
        assert time.monotonic() < deadline, f"cluster {cluster} not all in status {status}: {ads}"
        time.sleep(0.3)


def history(cluster: int, procs: int, projection: list[str], timeout: float = 30.0) -> dict:
    """The history ads of ``cluster`` by ProcId, once all ``procs`` of them are there."""
    deadline = time.monotonic() + timeout
    while True:
        ads = schedd().history(f"ClusterId == {cluster}", ["ProcId", *projection], match=procs)
        if len(ads) == procs:
            return {ad["ProcId"]: ad for ad in ads}
        assert time.monotonic() < deadline, f"history has {len(ads)} of {procs} procs of {cluster}"
        time.sleep(0.3)


def test_collector_sees_a_slot_a_schedd_and_a_negotiator(htcondor_pool: PoolInfo):
    collector = htcondor2.Collector()
    slots = collector.query(htcondor2.AdType.Startd, projection=["Name", "Cpus", "State"])
    assert slots, "no slot in the collector"
    assert sum(ad["Cpus"] for ad in slots) >= 8
    assert collector.query(htcondor2.AdType.Schedd, projection=["Name"])
    assert collector.query(htcondor2.AdType.Negotiator, projection=["Name"])
    # Reads need no authentication; the token authorizes the job user to submit (WRITE).
    assert schedd().query("false", ["ClusterId"]) == []
    ping = htcondor2.ping(collector.locate(htcondor2.DaemonType.Schedd), "WRITE")
    assert ping["AuthorizationSucceeded"] is True
    assert ping["MyRemoteUserName"] == htcondor_pool.identity


def test_cluster_of_20_procs_in_one_submit_followed_through_the_event_log(
        htcondor_pool: PoolInfo, htcondor_shared_dir: Path, clusters):
    log = htcondor_shared_dir / "events.log"
    description = htcondor2.Submit({
        "executable": "/bin/sh",
        "arguments": arguments("-c", "echo $(word); exit $(code)"),
        "initialdir": str(htcondor_shared_dir),
        "output": "out.$(ProcId)",
        "error": "err.$(ProcId)",
        "log": str(log),
        "request_cpus": "1",
        "request_memory": "64MB",
        "+GridcoupleTest": '"cluster-of-20"',
    })
    items = [{"word": f"item{i}", "code": str(i % 4)} for i in range(20)]
    started = time.monotonic()
    result = schedd().submit(description, itemdata=iter(items))
    clusters.append(result.cluster())
    assert (result.first_proc(), result.num_procs()) == (0, 20)
    queued = schedd().query(f"ClusterId == {result.cluster()}", ["Owner", "GridcoupleTest"])
    assert all(ad["Owner"] == htcondor_pool.job_user for ad in queued)
    assert all(ad["GridcoupleTest"] == "cluster-of-20" for ad in queued)

    # Follow the log as a backend would: non-blocking reads, the reader pickled between polls
    # (as if another process resumed it) - no event may be lost or repeated.
    reader = htcondor2.JobEventLog(str(log))
    terminated: dict[int, dict] = {}
    submitted: list[int] = []
    deadline = time.monotonic() + 60
    while len(terminated) < 20:
        assert time.monotonic() < deadline, f"only {sorted(terminated)} terminated after 60 s"
        for event in reader.events(stop_after=0):
            assert event.cluster == result.cluster()
            if event.type == htcondor2.JobEventType.SUBMIT:
                submitted.append(event.proc)
            elif event.type == htcondor2.JobEventType.JOB_TERMINATED:
                assert event.proc not in terminated, f"proc {event.proc} terminated twice"
                terminated[event.proc] = dict(event)
        reader = pickle.loads(pickle.dumps(reader))
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    assert sorted(submitted) == list(range(20))
    for proc, event in terminated.items():
        assert event["TerminatedNormally"] is True
        assert event["ReturnValue"] == proc % 4
        assert (htcondor_shared_dir / f"out.{proc}").read_text().split()[0] == f"item{proc}"
    print(f"20 procs submitted to all terminated: {elapsed:.1f} s")
    assert elapsed < 60


def test_exit_code_3_is_in_history(htcondor_pool: PoolInfo, htcondor_shared_dir: Path, clusters):
    result = schedd().submit(htcondor2.Submit({
        "executable": "/bin/sh",
        "arguments": arguments("-c", "exit 3"),
        "initialdir": str(htcondor_shared_dir),
        "log": str(htcondor_shared_dir / "events.log"),
    }))
    clusters.append(result.cluster())
    ad = history(result.cluster(), 1, ["ExitCode", "ExitBySignal", "JobStatus", "Owner"])[0]
    assert ad["ExitCode"] == 3
    assert ad["ExitBySignal"] is False
    assert ad["JobStatus"] == COMPLETED
    assert ad["Owner"] == htcondor_pool.job_user


def test_job_runs_the_chroots_python_with_the_checkouts_gridcouple(
        htcondor_pool: PoolInfo, htcondor_shared_dir: Path, clusters):
    probe = ("import os, sys, gridcouple, zarr, numpy, dask, distributed; "
             "print(os.getuid(), sys.executable, gridcouple.__file__)")
    description = htcondor2.Submit({
        "executable": htcondor_pool.python,  # a path inside the chroot, not on the host
        "transfer_executable": "false",
        "arguments": "$(args)",
        "initialdir": str(htcondor_shared_dir),
        "output": "out.$(ProcId)",
        "error": "err.$(ProcId)",
        "log": str(htcondor_shared_dir / "events.log"),
    })
    items = [{"args": arguments("-c", probe)},
             {"args": arguments("-m", "gridcouple.appkit.server", "--help")}]
    result = schedd().submit(description, itemdata=iter(items))
    clusters.append(result.cluster())
    ads = history(result.cluster(), 2, ["ExitCode"], timeout=60)
    errors = {p: (htcondor_shared_dir / f"err.{p}").read_text() for p in ads}
    assert [ads[p]["ExitCode"] for p in (0, 1)] == [0, 0], errors
    uid, executable, module = (htcondor_shared_dir / "out.0").read_text().split()
    assert int(uid) == htcondor_pool.job_uid
    assert executable == htcondor_pool.python
    assert module == os.path.join(htcondor_pool.checkout, "src", "gridcouple", "__init__.py")
    usage = (htcondor_shared_dir / "out.1").read_text()
    assert "usage: python -m gridcouple.appkit.server" in usage


def test_spooled_job_in_a_directory_the_pool_cannot_see_brings_its_output_back(
        htcondor_pool: PoolInfo, tmp_path: Path, clusters):
    assert not htcondor_pool.in_chroot(tmp_path).exists()  # no shared file system here
    (tmp_path / "input.txt").write_text("from the submitter\n")
    result = schedd().submit(htcondor2.Submit({
        "executable": "/bin/sh",
        "transfer_executable": "false",
        "arguments": arguments("-c", "tr a-z A-Z < input.txt > result.txt; pwd"),
        "initialdir": str(tmp_path),
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT",
        "transfer_input_files": "input.txt",
        "output": "out",
        "error": "err",
        "log": str(tmp_path / "events.log"),
    }), spool=True)
    clusters.append(result.cluster())
    ad, = schedd().query(f"ClusterId == {result.cluster()}", ["JobStatus", "HoldReasonCode"])
    assert (ad["JobStatus"], ad["HoldReasonCode"]) == (HELD, 16)  # held until the input is spooled
    schedd().spool(result)
    wait_for_status(result.cluster(), COMPLETED)
    assert not (tmp_path / "result.txt").exists()
    schedd().retrieve(f"{result.cluster()}.0")
    assert (tmp_path / "result.txt").read_text() == "FROM THE SUBMITTER\n"
    assert (tmp_path / "out").read_text().startswith("/var/lib/condor/execute/")
    # The user log was kept in the spool directory and comes back with the output.
    events = list(htcondor2.JobEventLog(str(tmp_path / "events.log")).events(stop_after=0))
    assert htcondor2.JobEventType.JOB_TERMINATED in [e.type for e in events]
