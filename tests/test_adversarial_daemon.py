"""The local daemon, attacked through its socket, through the specs it is given, through its
journal and through the directory it is started from. Each test asserts three things: the
daemon did not crash (the same process serves a legitimate job afterwards: a crash would be
masked by the client, which starts a new daemon), nothing hung (every wait is bounded), and
nothing stored before is lost (a job that ran before the attack keeps its record and output)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.backends.local.backend import daemon_address
from gridcouple.errors import BackendError, OptionError
from gridcouple.jobs import JobSpec, JobState, Resources
from test_local_backend import _daemon_pid

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
KEPT = "kept output\n"  # what the job run before every attack wrote


class Victim:
    """A backend on a fresh state dir whose daemon ran one job before the attack."""

    def __init__(self, state_dir: Path) -> None:
        self.backend = LocalBackend(LocalOptions(slots=2, grace_period=0.5, idle_exit=30),
                                    state_dir=state_dir)
        [self.kept] = self.backend.submit([JobSpec(argv=("sh", "-c", f"printf '{KEPT}'"),
                                                   name="kept")])
        [status] = self.backend.wait([self.kept], timeout=30)
        assert status.state is JobState.COMPLETED
        self.pid = _daemon_pid(self.backend)

    def send(self, data: bytes) -> None:
        """Send raw bytes on the daemon's socket and close."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(daemon_address(self.backend.state_dir))
            with contextlib.suppress(OSError):  # it may close on us: that is its right
                sock.sendall(data)

    def assert_unharmed(self, timeout: float = 20.0) -> None:
        """The same daemon runs a new job to completion; the earlier job is as it was."""
        [job] = self.backend.submit([JobSpec(argv=("sh", "-c", "echo fine"), name="after")])
        [status] = self.backend.wait([job], timeout=timeout)
        assert status.state is JobState.COMPLETED, status
        assert self.backend.read_output(job) == "fine\n"
        assert _daemon_pid(self.backend) == self.pid, "the daemon was restarted"
        [record] = self.backend.journal.get([self.kept.id])
        assert record.status.state is JobState.COMPLETED and record.status.exit_code == 0
        assert self.backend.read_output(self.kept) == KEPT

    def close(self) -> None:
        live = [r.job for r in self.backend.journal.records("local", active_only=True)]
        if live:
            self.backend.cancel(live)
            self.backend.wait(live, timeout=15)
        self.backend.stop_daemon()
        self.backend.close()


@pytest.fixture
def victim(state_dir):
    target = Victim(state_dir)
    yield target
    target.close()


# --- the socket: named cases -----------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b'"hello"\n', b"[1, 2]\n", b"null\n", b"42\n", b'{"op": ["wake"]}\n', b"\xff\xfe\n",
    b"[" * 100_000 + b"\n",  # RecursionError, not ValueError
    b"1" * 60_000 + b"\n",  # an integer too long to convert
    b'{"op": "wake", "options": "fast"}\n',
    b'{"op": "wake", "options": {"slots": -1}}\n',
    b'{"op": "wake", "options": {"slots": "2"}}\n',
    b'{"op": "wake", "options": {"policy": 5}}\n',
    b'{"op": "wake", "options": {"policy": "no_such_module_gc:Policy"}}\n',
    b'{"op": "wake", "options": {"unknown": 1}}\n',
    b'{"op": "wake", "options": {"grace_period": Infinity}}\n',
    b'{"op": "wake", "options": {"1": 2, "idle_exit": -0.5}}\n',
], ids=lambda d: repr(d[:24]))
def test_a_bad_message_is_ignored(victim, data):
    victim.send(data)
    victim.assert_unharmed()


@pytest.mark.parametrize("options", [
    {"grace_period": math.nan}, {"grace_period": math.inf}, {"idle_exit": math.nan},
    {"slots": 1.5}, {"slots": True}, {"grace_period": "5"}, {"policy": None}])
def test_options_that_are_not_numbers_of_seconds_or_slots_are_refused(options):
    with pytest.raises(OptionError):
        LocalOptions(**options)


def test_nan_grace_period_is_refused_so_cancel_still_kills(victim, tmp_path):
    """nan made the SIGKILL after the grace period never come."""
    victim.send(b'{"op": "wake", "options": {"slots": 2, "grace_period": NaN}}\n')
    ready = tmp_path / "ready"
    [job] = victim.backend.submit([JobSpec(argv=(
        "sh", "-c", f"trap '' TERM; touch {ready}; while :; do sleep 0.05; done"))])
    victim.send(b'{"op": "wake", "options": {"slots": 2, "grace_period": NaN}}\n')
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.backend.journal.request_cancel([job.id])  # as a client would, minus its options
    victim.send(b'{"op": "wake"}\n')
    [status] = victim.backend.wait([job], timeout=10)
    assert status.state is JobState.CANCELED and status.signal == signal.SIGKILL
    victim.assert_unharmed()


def test_huge_lines_are_dropped(victim):
    victim.send(b"x" * (4 << 20))  # no newline at all
    victim.send(b'{"op": "wake", "pad": "' + b"y" * (1 << 20) + b'"}\n')
    victim.assert_unharmed()


def test_idle_and_slow_clients_do_not_block_the_loop(victim):
    """300 connections that send nothing, some that send half a line: a job submitted
    meanwhile still completes at once (each idle client blocked the loop for 2 s)."""
    idle = []
    try:
        for i in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(daemon_address(victim.backend.state_dir))
            if i % 10 == 0:
                sock.sendall(b'{"op": "wa')
            idle.append(sock)
        started = time.monotonic()
        victim.assert_unharmed(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
    victim.assert_unharmed()


# --- specs that cannot start -----------------------------------------------------------------

def test_a_job_that_cannot_start_fails_alone_with_its_reason(victim, tmp_path):
    """Each of these killed the daemon, and the job it ran ended FAILED 'exit status unknown'
    although it exited 0."""
    ready = tmp_path / "ready"
    [running] = victim.backend.submit([JobSpec(argv=(
        "sh", "-c", f"touch {ready}; sleep 1; exit 0"), name="bystander")])
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    bad = victim.backend.submit([
        JobSpec(argv=("echo", "a\0b"), name="nul-in-argv"),
        JobSpec(argv=("true",), environment={"A=B": "1"}, name="equals-in-key"),
        JobSpec(argv=("true",), environment={"TOKEN": "s3cret\0"}, name="nul-in-value"),
        JobSpec(argv=("true",), environment={"A": 1}, name="not-text"),  # type: ignore[dict-item]
        JobSpec(argv=("true",), stdout=str(tmp_path / "missing" / "out"), name="stdout-dir"),
        JobSpec(argv=("true",), stderr=str(tmp_path / "missing" / "err"), name="stderr-dir"),
        JobSpec(argv=("true",), directory=str(tmp_path / "nowhere"), name="no-directory"),
        JobSpec(argv=("/etc/passwd",), name="not-executable"),
        JobSpec(argv=("no-such-command-gc",), name="not-found"),
        JobSpec(script="echo \udcff", name="unencodable-script"),
    ])
    statuses = victim.backend.wait([running, *bad], timeout=30)
    assert statuses[0].state is JobState.COMPLETED, statuses[0]
    for job, status in zip(bad, statuses[1:], strict=True):
        assert status.state is JobState.FAILED, (job.spec.name, status)
        assert status.reason.startswith("cannot start"), (job.spec.name, status)
    by_name = {job.spec.name: status for job, status in zip(bad, statuses[1:], strict=True)}
    assert by_name["not-found"].exit_code == 127 and by_name["not-executable"].exit_code == 126
    assert "no-such-command-gc" in victim.backend.read_output(bad[8], "stderr")
    assert "gridcouple: cannot start" in victim.backend.read_output(bad[4], "stderr")
    assert "TOKEN" in by_name["nul-in-value"].reason  # named, its value never shown
    assert "s3cret" not in by_name["nul-in-value"].reason + victim.backend.read_output(
        bad[2], "stderr") + (victim.backend.state_dir / "local-daemon.log").read_text()
    victim.assert_unharmed()


def test_a_corrupt_journal_row_fails_alone(victim):
    """A queued row whose spec (or bookkeeping) JSON is corrupt, or whose spec is not a spec."""
    good = victim.backend.submit([JobSpec(argv=("true",), name=f"g{i}") for i in range(3)])
    victim.backend.hold(good)
    path = victim.backend.journal.path
    rows = ['{not json', '[]', '5', json.dumps({"argv": ["true"], "name": "bad name!"})]
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        ids = [db.execute("INSERT INTO jobs (backend, name, spec, state, submit_time) "
                          "VALUES ('local', 'corrupt', ?, 'queued', ?)",
                          (spec, time.time())).lastrowid for spec in rows]
        ids.append(db.execute("INSERT INTO jobs (backend, name, spec, state, submit_time, extra) "
                              "VALUES ('local', 'corrupt', ?, 'queued', ?, '{oops')",
                              (json.dumps(JobSpec(argv=("true",)).to_dict()),
                               time.time())).lastrowid)
    victim.backend.release(good)
    assert all(s.state is JobState.COMPLETED for s in victim.backend.wait(good, timeout=30))
    with contextlib.closing(sqlite3.connect(path)) as db:
        states = db.execute(f"SELECT state, reason FROM jobs WHERE id IN "
                            f"({','.join(map(str, ids))})").fetchall()
    assert [s for s, _ in states] == ["failed"] * len(ids)
    assert all("journal record is unreadable" in reason for _, reason in states)
    victim.assert_unharmed()


def test_a_corrupt_row_of_a_started_job_does_not_stop_a_new_daemon(state_dir):
    """Taking over the jobs of an earlier daemon reads their rows: one that is corrupt is
    FAILED, and the daemon goes on to serve."""
    from gridcouple.journal import Journal

    with Journal(state_dir / "journal.sqlite") as journal:
        [started] = journal.add("local", [JobSpec(argv=("true",))], state=JobState.ACTIVE)
    with contextlib.closing(sqlite3.connect(state_dir / "journal.sqlite")) as db, db:
        db.execute("UPDATE jobs SET spec = '{oops' WHERE id = ?", (started,))
    backend = LocalBackend(LocalOptions(slots=1, idle_exit=5), state_dir=state_dir)
    try:
        [job] = backend.submit([JobSpec(argv=("true",))])
        assert backend.wait([job], timeout=30)[0].state is JobState.COMPLETED
        with contextlib.closing(sqlite3.connect(state_dir / "journal.sqlite")) as db:
            state, reason = db.execute("SELECT state, reason FROM jobs WHERE id = ?",
                                       (started,)).fetchone()
        assert state == "failed" and "journal record is unreadable" in reason
    finally:
        backend.stop_daemon()
        backend.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_holding_the_socket_name_is_an_error_not_a_hang(state_dir):
    """The abstract socket namespace is open to every local user: a client must not take a
    stranger's socket for its daemon (it would wait for ever, telling it its options)."""
    ready, told = os.pipe()
    squatter = os.fork()
    if squatter == 0:  # pragma: no cover (the child)
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(daemon_address(state_dir))
            sock.listen(8)
            os.write(told, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        backend = LocalBackend(LocalOptions(slots=1, idle_exit=5), state_dir=state_dir)
        with pytest.raises(BackendError, match="uid 65534 holds the local daemon's socket"):
            backend.wake_daemon()
        backend.close()
    finally:
        os.kill(squatter, signal.SIGKILL)
        os.waitpid(squatter, 0)


# --- the directory it is started from ---------------------------------------------------------

def test_modules_in_the_working_directory_never_run_in_the_daemon(state_dir, tmp_path,
                                                                   monkeypatch):
    """``python -m`` put the caller's directory first on the daemon's import path; an empty
    PYTHONPATH entry does the same."""
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    ran = tmp_path / "poison-ran"
    for module in ("selectors", "json", "signal", "struct"):
        (poisoned / f"{module}.py").write_text(
            f"open({str(ran)!r}, 'a').write('{module} ')\nraise SystemExit('poisoned')\n")
    monkeypatch.chdir(poisoned)
    monkeypatch.setenv("PYTHONPATH", os.pathsep + os.environ.get("PYTHONPATH", ""))
    backend = LocalBackend(LocalOptions(slots=1, idle_exit=5), state_dir=Path("..") /
                           state_dir.relative_to(tmp_path))
    try:
        [job] = backend.submit([JobSpec(argv=("true",))])
        [status] = backend.wait([job], timeout=30)
        assert status.state is JobState.COMPLETED
        assert not ran.exists(), f"the daemon imported {ran.read_text()}from its cwd"
    finally:
        backend.stop_daemon()
        backend.close()


# --- fuzzing ----------------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
OPTION_KEYS = st.sampled_from([*asdict(LocalOptions()), "op", "extra", ""])


def _harmless(key: str, value: object) -> object:
    """An option value, but never one that lets the daemon exit for being idle (a legitimate
    exit, not a crash) or the slots drop to one (the checks would just take longer)."""
    if key == "idle_exit" and isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0:
        return 60
    if key == "slots" and value == 1:
        return 2
    return value


OPTIONS = st.dictionaries(OPTION_KEYS, JSON_LEAF, max_size=4).map(
    lambda d: {k: _harmless(k, v) for k, v in d.items()})
MESSAGES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUE.map(lambda v: json.dumps(v).encode() + b"\n"),
    st.fixed_dictionaries({"op": st.sampled_from(["wake", "ping", "WAKE", "", "stop"])},
                          optional={"options": st.one_of(OPTIONS, JSON_VALUE)})
    .map(lambda v: json.dumps(v).encode() + b"\n"),
    st.binary(max_size=40).map(lambda b: b'{"op": "wake", "options": ' + b + b"}\n"),
)


@FUZZ
@given(messages=st.lists(MESSAGES, min_size=1, max_size=4))
def test_fuzzed_messages(victim, messages):
    for message in messages:
        victim.send(message)
    victim.assert_unharmed()


SAFE_COMMANDS = st.sampled_from(["true", "false", "/bin/echo", "no-such-command-gc", "",
                                 "/nonexistent/x", "tr\0ue", "/etc/passwd", "/tmp", "./x"])
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(
    ["\0", "=", "/", "\n", "\udcff"]), max_size=12)


def _relative(text: str) -> str:
    """A path that stays below the directory it is relative to."""
    return text.replace("..", "__").lstrip("/") or "o"


@st.composite
def specs(draw, base: Path) -> JobSpec:
    """Specs whose files all stay in ``base``, the job's home or nowhere (/proc)."""
    place = st.one_of(st.none(), TEXT.map(_relative), st.sampled_from([
        str(base), str(base / "missing" / "f"), "/dev/null", "/proc/1/nope", "rel/f"]))
    argv = (draw(SAFE_COMMANDS), *draw(st.lists(TEXT, max_size=3)))
    script = draw(st.one_of(st.none(), st.sampled_from(
        ["echo hi", "#!/bin/sh\nexit 3\n", "#!/no/such/interpreter\n", "exit \udcff"])))
    return JobSpec(
        argv=() if script is not None else argv, script=script,
        environment=draw(st.dictionaries(TEXT, TEXT, max_size=3)),
        directory=draw(st.one_of(st.none(), st.sampled_from(
            [str(base), str(base / "nowhere"), "/etc/passwd"]))),
        stdout=draw(place), stderr=draw(place),
        resources=Resources(cpus=draw(st.integers(1, 2)),
                            walltime=draw(st.sampled_from([None, 5.0]))),
        name=draw(st.sampled_from(["fuzz", "f.1", "x-y"])))


@FUZZ
@given(data=st.data())
def test_fuzzed_specs(victim, tmp_path, data):
    base = tmp_path / "fuzz"
    base.mkdir(exist_ok=True)
    batch = data.draw(st.lists(specs(base), min_size=1, max_size=3))
    jobs = victim.backend.submit(batch)
    for job, status in zip(jobs, victim.backend.wait(jobs, timeout=30), strict=True):
        assert status.state in (JobState.COMPLETED, JobState.FAILED), (job.spec, status)
        if status.reason:
            assert status.reason.startswith("cannot start"), (job.spec, status)
    victim.assert_unharmed()
