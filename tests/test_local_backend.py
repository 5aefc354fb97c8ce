"""The local backend with real processes: its daemon, queue, signals, walltimes and journal."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.errors import BackendError
from gridcouple.jobs import JobSpec, JobState, JobStatus, Resources, StagedFile

PY = sys.executable


def sh(script: str, **kwargs) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), **kwargs)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone (ESRCH while it is being reaped too)
        return False
    return "State:\tZ" not in state


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_complete_and_fail_with_exit_codes_and_output(local_backend):
    jobs = local_backend.submit([
        sh("echo out; echo err >&2"),
        sh("echo partial; exit 3"),
    ])
    done, failed = local_backend.wait(jobs, timeout=30)
    assert done.state is JobState.COMPLETED and done.exit_code == 0
    assert failed.state is JobState.FAILED and failed.exit_code == 3
    assert local_backend.read_output(jobs[0]) == "out\n"
    assert local_backend.read_output(jobs[0], "stderr") == "err\n"
    assert local_backend.read_output(jobs[1]) == "partial\n"
    assert done.start_time and done.end_time and done.start_time <= done.end_time
    assert done.host


def test_killed_by_signal_is_failed_with_the_signal(local_backend):
    [job] = local_backend.submit([sh("kill -9 $$")])
    [status] = local_backend.wait([job], timeout=30)
    assert status.state is JobState.FAILED
    assert status.signal == signal.SIGKILL and status.exit_code is None
    assert "SIGKILL" in status.describe()


def test_command_that_does_not_exist_fails_with_127(local_backend):
    [job] = local_backend.submit([JobSpec(argv=("no-such-command-gridcouple",))])
    [status] = local_backend.wait([job], timeout=30)
    assert status.state is JobState.FAILED and status.exit_code == 127
    assert "no-such-command-gridcouple" in local_backend.read_output(job, "stderr")


def test_environment_directory_and_script(local_backend, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    [job] = local_backend.submit([JobSpec(
        script="#!/bin/sh\necho \"$GREETING from $(pwd) as job $GRIDCOUPLE_JOB_ID\"\n",
        environment={"GREETING": "hello"}, directory=str(workdir), name="env-test")])
    [status] = local_backend.wait([job], timeout=30)
    assert status.state is JobState.COMPLETED
    assert local_backend.read_output(job) == f"hello from {workdir} as job {job.id}\n"


def test_cancel_running_kills_the_whole_process_group(local_backend, tmp_path):
    child_pid_file = tmp_path / "child.pid"
    [job] = local_backend.submit([sh(f"sleep 300 & echo $! > {child_pid_file}; wait")])
    child = int(wait_for_file(child_pid_file))
    assert pid_alive(child)
    local_backend.cancel([job])
    [status] = local_backend.wait([job], timeout=15)
    assert status.state is JobState.CANCELED
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child), "the job's child outlived the cancel"


def test_cancel_escalates_to_sigkill_after_grace(local_backend, tmp_path):
    ready = tmp_path / "ready"
    stubborn = f"trap '' TERM; echo up > {ready}; while :; do sleep 0.1; done"
    [job] = local_backend.submit([sh(stubborn)])
    wait_for_file(ready)
    started = time.monotonic()
    local_backend.cancel([job])
    [status] = local_backend.wait([job], timeout=15)
    assert status.state is JobState.CANCELED
    assert status.signal == signal.SIGKILL
    assert 0.8 <= time.monotonic() - started < 10  # grace_period is 1 s


def test_cancel_queued_job_never_starts(local_backend, tmp_path):
    marker = tmp_path / "ran"
    blockers = local_backend.submit([sh("sleep 30"), sh("sleep 30")])
    [queued] = local_backend.submit([sh(f"touch {marker}")])
    assert local_backend.status([queued])[0].state is JobState.QUEUED
    local_backend.cancel([queued])
    assert local_backend.status([queued])[0].state is JobState.CANCELED
    local_backend.cancel(blockers)
    local_backend.wait(blockers, timeout=15)
    time.sleep(0.3)
    assert not marker.exists()


def test_walltime_gives_timeout(local_backend):
    [job] = local_backend.submit([sh("sleep 60", resources=Resources(walltime=1))])
    started = time.monotonic()
    [status] = local_backend.wait([job], timeout=20)
    assert status.state is JobState.TIMEOUT
    assert "walltime" in status.reason
    assert 0.9 <= time.monotonic() - started < 8


def test_hold_and_release(local_backend, tmp_path):
    marker = tmp_path / "ran"
    blockers = local_backend.submit([sh("sleep 30"), sh("sleep 30")])
    [job] = local_backend.submit([sh(f"touch {marker}")])
    local_backend.hold([job])
    local_backend.cancel(blockers)
    local_backend.wait(blockers, timeout=15)
    time.sleep(0.5)
    assert local_backend.status([job])[0].state is JobState.HELD
    assert not marker.exists()
    local_backend.release([job])
    [status] = local_backend.wait([job], timeout=15)
    assert status.state is JobState.COMPLETED and marker.exists()


def test_stage_in_and_fetch_outputs(local_backend, tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("3 4\n")
    [job] = local_backend.submit([JobSpec(
        argv=(PY, "-c", "a, b = map(int, open('in/data.txt').read().split());"
                        "open('sum.txt', 'w').write(str(a + b))"),
        stage_in=(StagedFile(str(source), "in/data.txt"),),
        stage_out=(StagedFile("sum.txt", "results/sum.txt"),))])
    [status] = local_backend.wait([job], timeout=30)
    assert status.state is JobState.COMPLETED, local_backend.read_output(job, "stderr")
    [copied] = local_backend.fetch(job, tmp_path / "out")
    assert copied == tmp_path / "out" / "results" / "sum.txt"
    assert copied.read_text() == "7"


def test_missing_stage_in_file_is_a_clear_error_and_nothing_runs(local_backend, tmp_path):
    with pytest.raises(BackendError, match="cannot stage in .*missing.txt"):
        local_backend.submit([sh("true"), JobSpec(
            argv=("true",), stage_in=(StagedFile(str(tmp_path / "missing.txt"), "x"),))])
    records = local_backend.journal.records("local")
    assert [r.status.state for r in records] == [JobState.FAILED, JobState.FAILED]


def test_what_the_machine_cannot_give_is_refused_before_anything_is_recorded(local_backend):
    with pytest.raises(BackendError, match="asks for 3 cpus.*2 slots"):
        local_backend.submit([sh("true", resources=Resources(cpus=3))])
    with pytest.raises(BackendError, match="asks for 1 gpus; the local backend does not"):
        local_backend.submit([sh("true", resources=Resources(gpus=1))])
    assert local_backend.journal.records("local") == []


def test_thousand_jobs_through_two_slots(local_backend):
    jobs = local_backend.submit([JobSpec(argv=("true",), name=f"t{i}") for i in range(1000)])
    daemon_pid = _daemon_pid(local_backend)
    threads = int(_proc_field(daemon_pid, "Threads"))
    statuses = local_backend.wait(jobs, timeout=240)
    assert threads == 1, "the daemon must not use a thread per job"
    assert all(s.state is JobState.COMPLETED for s in statuses)
    intervals = sorted((s.start_time, s.end_time) for s in statuses)
    assert _max_overlap(intervals) <= 2
    # FCFS: jobs start in submit order
    starts = [s.start_time for s in statuses]
    assert starts == sorted(starts)


def test_two_cpu_job_takes_both_slots(local_backend):
    jobs = local_backend.submit([
        sh("sleep 0.3", resources=Resources(cpus=2)),
        sh("sleep 0.3"), sh("sleep 0.3"),
    ])
    wide, a, b = local_backend.wait(jobs, timeout=30)
    assert wide.end_time <= a.start_time and wide.end_time <= b.start_time
    assert abs(a.start_time - b.start_time) < 0.2  # both narrow jobs share the two slots


def test_user_policy_orders_the_live_queue(state_dir, tmp_path, monkeypatch):
    module = tmp_path / "policy_lifo.py"
    module.write_text(textwrap.dedent("""
        from gridcouple.scheduler.policies import Policy

        class LastComeFirstServed(Policy):
            name = "lifo"

            def select(self, now, waiting, running, capacity):
                free = capacity - sum(j.procs for j in running)
                chosen = []
                for job in reversed(list(waiting)):
                    if job.procs <= free:
                        chosen.append(job)
                        free -= job.procs
                return chosen
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for the daemon
    monkeypatch.syspath_prepend(str(tmp_path))  # the options check imports it here too
    backend = LocalBackend(LocalOptions(slots=1, policy="policy_lifo:LastComeFirstServed",
                                        idle_exit=5), state_dir=state_dir)
    try:
        blocker = backend.submit([sh("sleep 0.5")])
        queued = backend.submit([sh("true", name=f"q{i}") for i in range(4)])
        statuses = backend.wait(blocker + queued, timeout=30)
        starts = [s.start_time for s in statuses[1:]]
        assert starts == sorted(starts, reverse=True), "newest queued job must start first"
    finally:
        backend.stop_daemon()
        backend.close()


def test_status_and_reattach_from_another_process(local_backend, state_dir):
    [job] = local_backend.submit([sh("sleep 1; echo finished")])
    code = textwrap.dedent(f"""
        from pathlib import Path
        from gridcouple.backends.local import LocalBackend
        backend = LocalBackend(state_dir=Path({str(state_dir)!r}))
        job = backend.reattach({job.native_id!r})
        [status] = backend.wait([job], timeout=30)
        print(status.state.value, backend.read_output(job).strip())
    """)
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["completed", "finished"], result.stderr


def test_jobs_survive_a_sigkilled_client_and_every_run_has_a_record(state_dir, tmp_path):
    """SIGKILL the submitting process mid-way through 100 submissions."""
    marks = tmp_path / "marks"
    marks.mkdir()
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from gridcouple.backends.local import LocalBackend, LocalOptions
        from gridcouple.jobs import JobSpec
        backend = LocalBackend(LocalOptions(slots=2, idle_exit=5),
                               state_dir=Path({str(state_dir)!r}))
        for i in range(100):
            backend.submit([JobSpec(argv=("sh", "-c", "touch {marks}/" + str(i)), name=f"s{{i}}")])
            print(i, flush=True)
    """)
    client = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    for line in client.stdout:
        if int(line) >= 30:
            break
    client.send_signal(signal.SIGKILL)
    client.wait()
    backend = LocalBackend(state_dir=state_dir)
    try:
        records = backend.journal.records("local")
        assert 30 <= len(records) <= 100
        statuses = backend.wait([r.job for r in records], timeout=60)
        # At most the one job being submitted when the client died was never queued: it is
        # FAILED, saying so, not NEW for ever.
        unqueued = [s for s in statuses if s.state is not JobState.COMPLETED]
        assert len(unqueued) <= 1
        for status in unqueued:
            assert status.state is JobState.FAILED
            assert f"submitting process (pid {client.pid}) ended" in status.reason
        recorded = {r.job.spec.name for r in records}
        ran = {f"s{p.name}" for p in marks.iterdir()}
        assert ran <= recorded, f"jobs ran without a record: {sorted(ran - recorded)}"
        assert len(ran) == len(statuses) - len(unqueued)
    finally:
        backend.stop_daemon()
        backend.close()


def test_a_new_daemon_adopts_running_jobs(local_backend, tmp_path):
    ready = tmp_path / "ready"
    [job] = local_backend.submit([sh(f"echo up > {ready}; sleep 300")])
    wait_for_file(ready)
    old = _daemon_pid(local_backend)
    os.kill(old, signal.SIGKILL)
    while pid_alive(old):
        time.sleep(0.02)
    # The next client call notices the daemon is gone and starts one, which adopts the job.
    local_backend._daemon_checked = 0.0
    assert local_backend.status([job])[0].state is JobState.ACTIVE
    new = _daemon_pid(local_backend)
    assert new != old
    local_backend.cancel([job])
    [status] = local_backend.wait([job], timeout=15)
    assert status.state is JobState.CANCELED


def test_sigkill_while_starting_jobs_runs_each_exactly_once(state_dir, tmp_path):
    """SIGKILL the daemon at random points of a 30-job start (21 seeded trials: while it
    spawns, just after, or at a random moment), then let a new daemon run. Every job is adopted
    with its pid or requeued, never left running while FAILED: each runs exactly once (one
    line with its pid), ends exactly once, COMPLETED (the exit status of what ended unwatched
    is kept by the killed daemon's keeper), and no job process is left."""
    rng = random.Random(20261202)
    marks = tmp_path / "marks"
    marks.mkdir()
    backend = LocalBackend(LocalOptions(slots=30, grace_period=1, idle_exit=10),
                           state_dir=state_dir)
    try:
        backend.wake_daemon()
        for trial in range(21):
            daemon = _daemon_pid(backend)
            jobs = backend.submit([
                sh(f"echo $$ >> {marks}/{trial}.{i}; sleep {rng.choice((0, 0.05, 0.3))}",
                   name=f"k{trial}.{i}") for i in range(30)])
            homes = [backend.job_home(job.id) for job in jobs]
            if trial % 3 == 0:  # while it spawns: after the k-th job's home is made
                k = rng.randrange(30)
                _wait_until(lambda home=homes[k]: home.exists())
            elif trial % 3 == 1:  # once it has started some
                first = jobs[0].id
                _wait_until(lambda first=first: backend.journal.get([first])[0].extra.get("pid"))
                time.sleep(rng.uniform(0, 0.05))
            else:
                time.sleep(rng.uniform(0, 0.2))
            os.kill(daemon, signal.SIGKILL)
            _wait_until(lambda pid=daemon: not pid_alive(pid))
            backend.wake_daemon()  # the next daemon takes over
            statuses = backend.wait(jobs, timeout=60)
            pids = []
            for i, status in enumerate(statuses):
                assert status.state is JobState.COMPLETED, (trial, i, status)
                runs = (marks / f"{trial}.{i}").read_text().split()
                assert len(runs) == 1, f"job {trial}.{i} ran {len(runs)} times"
                pids.append(int(runs[0]))
            events = backend.journal.events_since(0, jobs[0].id, jobs[-1].id)
            finals = Counter(job_id for _, job_id, state, _ in events if state.is_final)
            assert all(finals[job.id] == 1 for job in jobs), finals
            assert not [pid for pid in pids if pid_alive(pid)], "a job process is left"
        # the trials did hit the start-up turn: gates that never ran left their mark, and
        # jobs that ran were adopted
        assert list((state_dir / "jobs").glob("*/.not-started.*"))
        assert "adopted job" in (state_dir / "local-daemon.log").read_text()
    finally:
        backend.stop_daemon()
        backend.close()


def test_a_new_daemon_requeues_what_never_ran_and_ends_what_ended_unwatched(state_dir):
    """The journal after a daemon's death, as each moment of its start-up turn leaves it: a
    job ACTIVE without a pid, or whose gate never opened, is requeued and runs once; one whose
    keeper recorded its exit status ends with it; only without any record is it FAILED with
    its exit status unknown."""
    from gridcouple.backends.local.backend import process_start
    from gridcouple.journal import Journal

    ended = [subprocess.Popen(["cat"], stdin=subprocess.PIPE) for _ in range(3)]
    pids = [(p.pid, process_start(p.pid)) for p in ended]
    for process in ended:
        process.communicate()
    with Journal(state_dir / "journal.sqlite") as journal:
        ids = journal.add("local", [sh(f"echo ran >> {state_dir}/ran-{i}", name=f"j{i}")
                                    for i in range(4)])
        journal.set_native_ids([(i, str(i), "") for i in ids], state=JobState.QUEUED)
        journal.update([(i, JobStatus(JobState.ACTIVE, start_time=time.time()))
                        for i in ids])
        journal.set_extra({i: {"pid": pid, "proc_start": start}
                           for i, (pid, start) in zip(ids[1:], pids, strict=True)})
    (state_dir / "jobs" / str(ids[1])).mkdir(parents=True)
    (state_dir / "jobs" / str(ids[1]) / f".not-started.{pids[0][0]}").touch()
    (state_dir / "exits").mkdir()
    (state_dir / "exits" / "{}-{}.json".format(*pids[1])).write_text('{"returncode": 3}')
    backend = LocalBackend(LocalOptions(slots=2, idle_exit=5), state_dir=state_dir)
    try:
        backend.wake_daemon()
        jobs = [backend.job(i) for i in ids]
        never, gate_closed, recorded, unknown = backend.wait(jobs, timeout=30)
        for status, i in ((never, 0), (gate_closed, 1)):
            assert status.state is JobState.COMPLETED
            assert (state_dir / f"ran-{i}").read_text() == "ran\n"
        assert recorded.state is JobState.FAILED and recorded.exit_code == 3
        assert unknown.state is JobState.FAILED and "exit status unknown" in unknown.reason
        assert not (state_dir / "ran-2").exists() and not (state_dir / "ran-3").exists()
        requeues = [job_id for _, job_id, state, _ in backend.journal.events_since(0)
                    if state is JobState.QUEUED]
        assert sorted(requeues) == sorted([*ids, ids[0], ids[1]])
        assert not list((state_dir / "exits").iterdir())  # the record was claimed
    finally:
        backend.stop_daemon()
        backend.close()


def test_gates_spawned_ahead_close_without_running_their_job(local_backend, tmp_path):
    """The next waiting jobs get their gate (a blocked shell) ahead of their start; a job
    canceled or held meanwhile never runs, and its gate ends."""
    ran = tmp_path / "ran"
    ran.mkdir()
    blockers = local_backend.submit([sh("sleep 30"), sh("sleep 30")])
    canceled, held = local_backend.submit([sh(f"touch {ran}/{name}", name=name)
                                           for name in ("canceled", "held")])
    gates = {job.id: _gate_pid(local_backend, job.id) for job in (canceled, held)}
    local_backend.cancel([canceled])
    local_backend.hold([held])
    local_backend.wake_daemon()
    _wait_until(lambda: not any(pid_alive(pid) for pid in gates.values()))
    local_backend.cancel(blockers)
    local_backend.wait(blockers, timeout=15)
    assert local_backend.status([canceled, held])[0].state is JobState.CANCELED
    assert local_backend.status([held])[0].state is JobState.HELD
    time.sleep(0.3)
    assert not list(ran.iterdir())
    local_backend.release([held])
    assert local_backend.wait([held], timeout=15)[0].state is JobState.COMPLETED
    assert [p.name for p in ran.iterdir()] == ["held"]


def _gate_pid(backend: LocalBackend, job_id: int) -> int:
    home = str(backend.job_home(job_id)).encode()
    return pid_with_args(b"gridcouple-gate", home + b"/.not-started", what=f"gate for job {job_id}")


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _daemon_pid(backend: LocalBackend) -> int:
    """The pid of the daemon serving the backend's state dir (not its keeper)."""
    return pid_with_args(b"gridcouple.backends.local.daemon", str(backend.state_dir).encode(),
                         what=f"local daemon serving {backend.state_dir}")


def pid_with_args(*args: bytes, what: str, timeout: float = 10.0) -> int:
    """The pid of a process whose command line has each of ``args`` (waiting for one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(arg in cmdline for arg in args):
                return int(proc.name)
        time.sleep(0.02)
    raise AssertionError(f"no {what}")


def _proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


@pytest.mark.parametrize("policy", ["fcfs", "easy"])
def test_live_queue_runs_the_simulators_policies(state_dir, policy):
    """The very policy objects the simulator uses order the live queue: under EASY a short
    job backfills past a wide head job that must wait; under FCFS it waits its turn."""
    backend = LocalBackend(LocalOptions(slots=2, policy=policy, idle_exit=5),
                           state_dir=state_dir)
    try:
        [long] = backend.submit([JobSpec(argv=("sleep", "2"), estimate=2.0)])
        while backend.status([long])[0].state is not JobState.ACTIVE:
            time.sleep(0.02)
        wide, short = backend.submit([
            JobSpec(argv=("sleep", "0.1"), resources=Resources(cpus=2), estimate=0.5),
            JobSpec(argv=("sleep", "0.2"), estimate=0.5),
        ])
        _, wide_status, short_status = backend.wait([long, wide, short], timeout=30)
        if policy == "easy":
            assert short_status.start_time < wide_status.start_time
            assert short_status.end_time <= wide_status.start_time  # the head was not delayed
        else:
            assert short_status.start_time >= wide_status.end_time
    finally:
        backend.stop_daemon()
        backend.close()


def test_journal_and_state_dir_are_private(local_backend, tmp_path):
    local_backend.submit([sh("true", environment={"TOKEN": "secret"})])
    assert local_backend.journal.path.stat().st_mode & 0o077 == 0
    fresh = tmp_path / "fresh-state"
    LocalBackend(state_dir=fresh).close()
    assert fresh.stat().st_mode & 0o077 == 0


def test_a_second_journal_in_one_process_keeps_the_first_ones_locks(state_dir):
    """Opening a journal must not drop another connection's POSIX locks (closing any
    descriptor of the file would): otherwise another process, closing last as it thinks,
    removes the write-ahead log under our feet and our later writes are lost."""
    from gridcouple.journal import Journal

    path = state_dir / "journal.sqlite"
    count = f"from gridcouple.journal import Journal; j = Journal({str(path)!r})"
    first = Journal(path)
    try:
        first.add("local", [JobSpec(argv=("true",))])
        Journal(path).close()
        subprocess.run([PY, "-c", count + "; j.add('local', [j.get([1])[0].job.spec]); "
                        "j.close()"], check=True)
        first.add("local", [JobSpec(argv=("true",))] * 3)
        seen = subprocess.run([PY, "-c", count + "; print(len(j.records()))"], check=True,
                              capture_output=True, text=True).stdout
        assert seen.strip() == "5"
    finally:
        first.close()


def test_cancel_with_a_signal_first_lets_the_job_checkpoint(local_backend, tmp_path):
    ready, checkpoint = tmp_path / "ready", tmp_path / "checkpoint"
    script = (f"trap 'echo saved > {checkpoint}; exit 0' USR1; echo up > {ready}; "
              "while :; do sleep 0.1; done")
    [job] = local_backend.submit([sh(script)])
    wait_for_file(ready)
    local_backend.cancel([job], signal="USR1", grace=10)
    [status] = local_backend.wait([job], timeout=15)
    assert checkpoint.read_text() == "saved\n"
    assert status.state is JobState.COMPLETED  # it ended on its own within the grace period


def test_unknown_signal_is_refused(local_backend):
    [job] = local_backend.submit([sh("sleep 30")])
    with pytest.raises(BackendError, match="unknown signal 'NOPE'"):
        local_backend.cancel([job], signal="NOPE")


def test_memory_limit_is_enforced_on_the_whole_process_group(local_backend):
    hog = f"{PY} -c \"import time; b = b'x' * (300 * 2**20); time.sleep(30)\""
    small = f"{PY} -c \"import time; b = b'x' * (20 * 2**20); time.sleep(1.5)\""
    over, under = local_backend.submit([
        sh(f"{hog} & wait", resources=Resources(memory_mb=150)),  # the child holds the memory
        sh(small, resources=Resources(memory_mb=400)),
    ])
    over_status, under_status = local_backend.wait([over, under], timeout=30)
    assert over_status.state is JobState.FAILED
    assert over_status.native_state == "OUT_OF_MEMORY"
    assert "exceeded the 150 MiB asked for" in over_status.reason
    assert over_status.end_time - over_status.start_time < 10
    assert under_status.state is JobState.COMPLETED


def test_a_job_canceled_while_its_inputs_are_staged_in_never_runs(local_backend, tmp_path):
    """Cancel lands between the journal's NEW record and queueing: it must stay canceled."""
    import threading

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(3000):  # slow enough to stage that the cancel lands meanwhile
        (inputs / f"f{i}").write_text("x" * 100)
    ran = tmp_path / "ran"
    canceled = threading.Event()

    def cancel_while_new():
        while not canceled.is_set():
            records = local_backend.journal.records("local")
            if records and records[0].status.state is JobState.NEW:
                local_backend.cancel([records[0].job])
                canceled.set()
            time.sleep(0.001)

    canceller = threading.Thread(target=cancel_while_new, daemon=True)
    canceller.start()
    staged = (StagedFile(str(inputs), "inputs"),)
    [job] = local_backend.submit([sh(f"touch {ran}", stage_in=staged)])
    canceller.join(timeout=10)
    assert canceled.is_set()
    [status] = local_backend.wait([job], timeout=5)
    assert status.state is JobState.CANCELED
    time.sleep(0.5)
    assert not ran.exists()
