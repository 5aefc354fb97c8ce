"""Submitting, following and running HTCondor jobs: the gridcouple backend against its peers, in
one run, on the real pool of scripts/htcondor-up (as root, like the tests: the pool runs the jobs
as its job user, so the state directories here are handed to that user, as a site's user owns
his own).

- submit: ``HTCondorBackend.submit`` of 1,000 specs (journal, one task file and script, ONE
  ``Schedd.submit`` of a 1,000-proc cluster) against 1,000 ``Schedd.submit`` calls of one job
  each (what dask-jobqueue's HTCondorCluster does per worker, there through condor_submit).
  The jobs match no machine (``requirements = false``): nothing runs. Target: <= 1 s, >= 10x.
- status of those 1,000 jobs per poll: the backend (the job event log; the schedd only at its
  first poll) against one ``Schedd.query`` per job and one ``Schedd.query`` for all of them.
- 100 trivial jobs submitted to done: the backend (one cluster, ``wait``) against the bindings
  one by one (100 ``Schedd.submit`` calls, then their event log followed to the last end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

from gridcouple.backends.htcondor import HTCondorBackend, HTCondorOptions
from gridcouple.backends.htcondor.backend import schedd_submit
from gridcouple.jobs import JobSpec
from slurm_submit import timed  # this folder's scripts share their timer

INFO = Path(__file__).resolve().parents[1] / ".gridcouple-services" / "htcondor.json"
JOBS = 1000
TRIVIAL = 100


class PoolBackend(HTCondorBackend):
    """The backend, with the state directory handed to the pool's job user before a submit."""

    job_uid = 0  # the pool's job user, from its record

    def submit_array(self, shape, script, count, name, tag):
        for root, _, files in os.walk(self.state_dir):
            os.chown(root, self.job_uid, self.job_uid)
            for file in files:
                os.chown(os.path.join(root, file), self.job_uid, self.job_uid)
        return super().submit_array(shape, script, count, name, tag)


def one_by_one(schedd, htcondor2, directory: Path, count: int, parked: bool) -> list[int]:
    """The peer: one Schedd.submit per job (with the backend's fix of the bindings' reference
    leak, without which a few thousand submits abort Python 3.11)."""
    clusters = []
    for index in range(count):
        result = schedd_submit(schedd, htcondor2.Submit({
            "executable": "/bin/true", "arguments": str(index), "initialdir": str(directory),
            "log": str(directory / "peer.log"), "requirements": str(not parked)}))
        clusters.append(result.cluster())
    return clusters


def follow_to_the_end(htcondor2, log: Path, count: int, timeout: float = 300) -> None:
    """Until ``count`` jobs terminated in ``log``."""
    reader, ended, deadline = htcondor2.JobEventLog(str(log)), 0, time.monotonic() + timeout
    while ended < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ended} of {count} peer jobs ended")
        ended += sum(e.type == htcondor2.JobEventType.JOB_TERMINATED
                     for e in reader.events(stop_after=0))
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    try:
        info = json.loads(INFO.read_text())
        import htcondor2
    except (OSError, ImportError) as exc:
        print(f"htcondor_submit: skipped, no pool or no bindings ({exc}); run scripts/htcondor-up")
        return 0
    os.environ["CONDOR_CONFIG"] = info["condor_config"]
    htcondor2.reload_config()
    schedd = htcondor2.Schedd()
    root = Path(info["shared_dir"]) / f"bench-{uuid.uuid4().hex[:8]}"
    (root / "state" / "htcondor").mkdir(parents=True)
    (root / "peer").mkdir()
    for path in (root, root / "state", root / "state" / "htcondor", root / "peer"):
        os.chown(path, info["job_uid"], info["job_uid"])
    backend = PoolBackend(HTCondorOptions(), state_dir=root / "state")
    backend.job_uid = info["job_uid"]
    parked = [JobSpec(argv=("echo", str(i)), name="bench",
                      attributes={"htcondor.requirements": "false"}) for i in range(JOBS)]
    peer_clusters: list[int] = []

    def remove_peer() -> None:  # (a constraint of 1,000 ClusterIds is silently not acted on)
        schedd.act(htcondor2.JobAction.Remove, f'Iwd == "{root / "peer"}"', ("benchmark done", 0))
        peer_clusters.clear()

    try:
        submits, peer_submits = [], []
        for _ in range(rounds):  # each round alone in the queue: its size slows the schedd
            seconds, jobs = timed(lambda: backend.submit(parked))
            submits.append(seconds)
            backend.cancel(jobs)
            seconds, clusters = timed(
                lambda: one_by_one(schedd, htcondor2, root / "peer", JOBS, parked=True))
            peer_submits.append(seconds)
            peer_clusters.extend(clusters)
            remove_peer()
        jobs = backend.submit(parked)

        def poll() -> list:
            backend.watcher.expect_change()  # a native poll, not the journal's answer
            return backend.status(jobs)

        first_poll, _ = timed(poll)
        polls = [timed(poll)[0] for _ in range(max(rounds, 5))]
        reads = [timed(lambda: backend.list_jobs(with_tags=False))[0]
                 for _ in range(max(rounds, 5))]
        native = [j.native_id.split(".") for j in jobs]
        per_job, _ = timed(lambda: [schedd.query(f"ClusterId == {c} && ProcId == {p}",
                                                 ["JobStatus"]) for c, p in native])
        one_query = [timed(lambda: schedd.query(f"ClusterId == {native[0][0]}",
                                                ["ProcId", "JobStatus", "HoldReason"]))[0]
                     for _ in range(max(rounds, 5))]
        backend.cancel(jobs)

        trivial = [JobSpec(argv=("true",), name="trivial") for _ in range(TRIVIAL)]
        ours_done = []
        peers_done = []
        for round_ in range(rounds):  # who goes first alternates: the pool keeps its claims
            peer_dir = root / f"peer{round_}"
            peer_dir.mkdir()
            os.chown(peer_dir, info["job_uid"], info["job_uid"])
            runs = [lambda: ours_done.append(timed(
                        lambda: backend.wait(backend.submit(trivial), timeout=300))[0]),
                    lambda d=peer_dir: peers_done.append(timed(lambda: follow_to_the_end(
                        htcondor2, d / "peer.log",
                        len(one_by_one(schedd, htcondor2, d, TRIVIAL, parked=False))))[0])]
            for run in runs if round_ % 2 == 0 else runs[::-1]:
                run()
    finally:
        live = [r.job for r in backend.journal.records("htcondor", active_only=True)]
        if live:
            backend.cancel(live)
        if peer_clusters:
            remove_peer()
        backend.close()
        shutil.rmtree(root, ignore_errors=True)
    submit = statistics.median(submits)
    print(f"submit {JOBS} jobs, gridcouple (one cluster): median {submit:.3f} s over {rounds} "
          f"rounds (min {min(submits):.3f}, max {max(submits):.3f}); target <= 1 s")
    peer_submit = statistics.median(peer_submits)
    print(f"submit {JOBS} jobs, one Schedd.submit per job: median {peer_submit:.2f} s "
          f"(min {min(peer_submits):.2f}, max {max(peer_submits):.2f})")
    print(f"  ratio: {peer_submit / submit:.1f}x faster (target >= 10x)")
    status, read = statistics.median(polls), statistics.median(reads)
    print(f"status of {JOBS} jobs per poll, gridcouple: median {status * 1000:.1f} ms over "
          f"{len(polls)} polls, of which the native part (the event log read) "
          f"{read * 1000:.1f} ms and the rest the journal (first poll, with the schedd query "
          f"and {JOBS} changes stored: {first_poll * 1000:.0f} ms)")
    print(f"status of {JOBS} jobs, one Schedd.query per job: {per_job:.2f} s "
          f"({per_job / status:.0f}x the backend's whole poll)")
    query = statistics.median(one_query)
    print(f"status of {JOBS} jobs, one Schedd.query for all: median {query * 1000:.1f} ms "
          f"({query / read:.1f}x the event log read)")
    ours, peers = statistics.median(ours_done), statistics.median(peers_done)
    print(f"{TRIVIAL} trivial jobs submitted to done, gridcouple: median {ours:.2f} s over "
          f"{rounds} rounds; the bindings one by one: median {peers:.2f} s "
          f"({peers / ours:.2f}x)")
    return 0 if submit <= 1.0 and peer_submit / submit >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
