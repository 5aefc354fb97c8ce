"""The ``gridcouple`` command, run as a user runs it: exit codes follow the jobs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridcouple.backends.local import LocalBackend

GRIDCOUPLE = shutil.which("gridcouple", path=str(Path(sys.executable).parent)) or "gridcouple"


@pytest.fixture
def cli(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.local]\nslots = 2\ngrace_period = 1\n'
                      'idle_exit = 5\n')
    env = {**os.environ, "GRIDCOUPLE_CONFIG": str(config),
           "XDG_STATE_HOME": str(tmp_path / "xdg")}
    env.pop("GRIDCOUPLE_BACKEND", None)

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([GRIDCOUPLE, *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=tmp_path)

    yield run
    LocalBackend(state_dir=tmp_path / "state").stop_daemon()


@pytest.mark.parametrize(("command", "expected"), [
    ("exit 0", 0),
    ("exit 3", 3),
    ("kill -9 $$", 128 + 9),
])
def test_submit_wait_exit_code_follows_the_job(cli, command, expected):
    result = cli("submit", "--wait", "--", "sh", "-c", command)
    assert result.returncode == expected, result.stderr
    assert "Submitted job 1 (local 1)" in result.stdout


def test_timeout_exits_124(cli):
    result = cli("submit", "--wait", "--time", "1s", "--", "sleep", "30")
    assert result.returncode == 124
    assert "TIMEOUT" in result.stdout


def test_array_status_logs_and_wait(cli):
    submitted = cli("submit", "--array", "3", "--name", "sweep", "--",
                    "sh", "-c", "echo task $GRIDCOUPLE_ARRAY_INDEX")
    assert submitted.returncode == 0
    assert submitted.stdout == "Submitted jobs 1-3, an array of 3 (local 1 to 3)\n"
    waited = cli("wait", "1-3")
    assert waited.returncode == 0, waited.stdout
    assert cli("logs", "3").stdout == "task 2\n"
    table = cli("status", "--all").stdout
    assert table.count("COMPLETED") == 3 and "sweep" in table


def test_cancel_then_wait_exits_125(cli):
    assert cli("submit", "--", "sleep", "60").returncode == 0
    canceled = cli("cancel", "1")
    assert canceled.returncode == 0 and "Canceled job 1" in canceled.stdout
    waited = cli("wait", "1")
    assert waited.returncode == 125
    assert "CANCELED" in waited.stdout


def test_wait_timeout_exits_3_and_status_shows_running(cli):
    cli("submit", "--name", "long", "--", "sleep", "60")
    waited = cli("wait", "--timeout", "0.5", "1")
    assert waited.returncode == 3
    status = cli("status").stdout
    assert "long" in status and "ACTIVE" in status
    cli("cancel", "1")


def test_wait_any_returns_at_the_first_end(cli):
    cli("submit", "--", "sleep", "60")
    cli("submit", "--", "sh", "-c", "exit 4")
    waited = cli("wait", "--any", "1", "2", timeout=30)
    assert waited.returncode == 4
    cli("cancel", "1")


def test_unknown_job_and_bad_arguments_exit_2(cli):
    missing = cli("wait", "42")
    assert missing.returncode == 2
    assert "no job 42" in missing.stderr
    bad_env = cli("submit", "--env", "NOEQUALS", "--", "true")
    assert bad_env.returncode == 2
    assert "KEY=VALUE" in bad_env.stderr
    for option, value, words in (("--mem", "lots", "memory 'lots'"),
                                 ("--time", "0", "walltime must be positive")):
        bad = cli("submit", option, value, "--", "true")
        assert bad.returncode == 2
        assert f"Invalid value for {option}" in bad.stderr and words in bad.stderr, bad.stderr


def test_logs_shows_stdout_or_stderr_and_the_tail(cli):
    cli("submit", "--wait", "--", "sh", "-c", "echo out1; echo out2; echo err >&2")
    assert cli("logs", "1").stdout == "out1\nout2\n"
    assert cli("logs", "1", "--stderr").stdout == "err\n"
    assert cli("logs", "1", "--tail", "1").stdout == "out2\n"


def test_config_check_reports_errors_with_line(cli, tmp_path):
    assert cli("config", "check").returncode == 0
    broken = tmp_path / "broken.toml"
    broken.write_text("[backend.local]\nslots = 'x'\n")
    result = cli("config", "check", "--config", str(broken))
    assert result.returncode == 2
    assert f"{broken}:2: [backend.local] slots: expected an integer" in result.stderr


def test_status_watch_follows_given_jobs_until_they_end(cli):
    cli("submit", "--name", "watched", "--", "sleep", "1")
    result = cli("status", "--watch", "--interval", "0.2", "1", timeout=30)
    assert result.returncode == 0
    assert "watched" in result.stdout and "COMPLETED" in result.stdout


# --- issue 15: the habits of sbatch, condor_q and submitit --------------------------------


@pytest.fixture
def quick(tmp_path, monkeypatch):
    """As ``cli``, but each command runs in this process (no interpreter start per command);
    a GridcoupleError ends it as ``main`` ends it: one line on stderr, exit 2."""
    from typer.testing import CliRunner

    from gridcouple.cli import app, jobs, run, simulate  # noqa: F401  (registers them)
    from gridcouple.errors import GridcoupleError

    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.local]\nslots = 2\ngrace_period = 1\n'
                      'idle_exit = 5\n')
    monkeypatch.setenv("GRIDCOUPLE_CONFIG", str(config))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GRIDCOUPLE_BACKEND", raising=False)
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str) -> subprocess.CompletedProcess[str]:
        result = CliRunner().invoke(app, list(args))
        if isinstance(result.exception, GridcoupleError):
            return subprocess.CompletedProcess(
                args, 2, result.stdout, f"{result.stderr}gridcouple: error: {result.exception}\n")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a crash, not an exit code
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    yield invoke
    LocalBackend(state_dir=tmp_path / "state").stop_daemon()


def user_env(tmp_path: Path) -> dict[str, str]:
    """No config file: the per-user state directory below ``tmp_path/xdg``."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    for name in ("GRIDCOUPLE_CONFIG", "GRIDCOUPLE_BACKEND"):
        env.pop(name, None)
    return env


def gridcouple(env: dict[str, str], cwd: Path, *args: str,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRIDCOUPLE, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_jobs_run_where_submitted_and_one_journal_serves_every_directory(tmp_path):
    env = user_env(tmp_path)
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    state = tmp_path / "xdg" / "gridcouple"
    empty = gridcouple(env, elsewhere, "status")
    assert empty.returncode == 0
    assert empty.stdout == f"no jobs: there is no journal at {state / 'journal.sqlite'} yet\n"
    assert not (tmp_path / "xdg").exists() and not list(elsewhere.iterdir())  # read-only
    try:
        (here / "input.txt").write_text("data\n")
        submitted = gridcouple(env, here, "submit", "-W", "-J", "reader", "--",
                               "sh", "-c", "cat input.txt; pwd")
        assert submitted.returncode == 0, submitted.stderr
        assert gridcouple(env, elsewhere, "logs", "1").stdout == f"data\n{here}\n"
        listed = gridcouple(env, elsewhere, "status", "--all")
        assert "reader" in listed.stdout and "COMPLETED" in listed.stdout
        again = gridcouple(env, elsewhere, "submit", "--", "true")
        assert again.stdout == "Submitted job 2 (local 2)\n"  # ids go on, whatever the directory
        assert not list(elsewhere.iterdir())  # no .gridcouple where the commands ran
        assert gridcouple(env, elsewhere, "status").stdout.startswith("no jobs waiting or "
                                                                     f"running in {state}")
    finally:
        LocalBackend(state_dir=state).stop_daemon()


def test_state_dir_option_and_unknown_backend_in_the_environment(tmp_path):
    env = user_env(tmp_path)
    chosen = tmp_path / "chosen"
    result = gridcouple(env, tmp_path, "status", "--state-dir", str(chosen))
    assert str(chosen / "journal.sqlite") in result.stdout and not chosen.exists()
    result = gridcouple({**env, "GRIDCOUPLE_BACKEND": "slrum"}, tmp_path, "status")
    assert result.returncode == 2
    assert result.stderr.startswith("gridcouple: error: $GRIDCOUPLE_BACKEND: backend 'slrum' "
                                    "is not installed; installed: ")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_wait_prints_each_job_as_it_ends(cli, tmp_path):
    gate = tmp_path / "gate"
    cli("submit", "--", "true")
    cli("submit", "--", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    env = {**os.environ, "GRIDCOUPLE_CONFIG": str(tmp_path / "gridcouple.toml"),
           "XDG_STATE_HOME": str(tmp_path / "xdg")}
    with subprocess.Popen([GRIDCOUPLE, "wait", "1", "2"], stdout=subprocess.PIPE, text=True,
                          env=env, cwd=tmp_path) as waiting:
        assert waiting.stdout is not None
        first = waiting.stdout.readline()  # while job 2 still runs
        assert first == "job 1: COMPLETED\n" and waiting.poll() is None
        gate.touch()
        rest = waiting.stdout.read()
    assert waiting.returncode == 0
    assert rest == "job 2: COMPLETED\n2/2 done: 2 COMPLETED\n"


def test_cancel_hold_and_release_say_what_did_not_apply(quick):
    quick("submit", "--wait", "--", "true")
    ended = quick("cancel", "1")
    assert ended.returncode == 4
    assert ended.stderr == "job 1 had already ended: COMPLETED\n" and ended.stdout == ""
    quick("submit", "-J", "big", "-c", "2", "--", "sleep", "60")
    quick("submit", "-J", "small", "--", "sleep", "60")  # waits: job 2 has both slots
    held = quick("hold", "2", "3")
    assert held.returncode == 4 and held.stdout == "Held job 3 (local 3)\n"
    assert "job 2 was not held: ACTIVE" in held.stderr
    assert "HELD" in quick("status", "3").stdout
    not_started = quick("logs", "3")
    assert (not_started.returncode, not_started.stdout) == (0, "")
    assert not_started.stderr.startswith("job 3 has not started yet: HELD")
    released = quick("release", "3")
    assert released.returncode == 0 and released.stdout == "Released job 3 (local 3)\n"
    canceled = quick("cancel", "2-3")
    assert canceled.returncode == 0
    assert canceled.stdout == "Canceled job 2 (local 2)\nCanceled job 3 (local 3)\n"


def test_json_for_scripts_and_the_array_in_one_line(quick):
    import json

    submitted = quick("submit", "--json", "-a", "0-2", "--", "python3", "-c", "pass")
    listing = json.loads(submitted.stdout)
    assert [j["id"] for j in listing["jobs"]] == [1, 2, 3]
    assert {j["name"] for j in listing["jobs"]} == {"python3"}  # named after the program
    named = json.loads(quick("submit", "--json", "--", "sh", "run.sh").stdout)
    assert named["jobs"][0]["name"] == "run.sh"  # after the script, as sbatch does
    quick("wait", "1-3")
    jobs = json.loads(quick("status", "--json", "1-3").stdout)
    assert [(j["id"], j["state"], j["exit_code"]) for j in jobs] == [
        (1, "COMPLETED", 0), (2, "COMPLETED", 0), (3, "COMPLETED", 0)]


def test_time_errors_say_a_plain_number_is_minutes(quick):
    result = quick("submit", "-t", "5x", "--", "true")
    assert result.returncode == 2
    assert "a plain number is minutes" in " ".join(result.stderr.split())


def test_output_files_take_sbatch_patterns(quick, tmp_path):
    result = quick("submit", "-W", "-a", "2", "-J", "out", "-o", "%x-%a.txt", "--",
                 "sh", "-c", "echo $GRIDCOUPLE_ARRAY_INDEX")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out-0.txt").read_text() == "0\n"
    assert quick("logs", "2").stdout == "1\n"  # logs reads the file the job wrote
    refused = quick("submit", "-o", "slurm-%j.out", "--", "true")
    assert refused.returncode == 2 and "%j is not known before" in refused.stderr


def test_config_check_reports_every_error_with_its_line(quick, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[bakend.local]\nslots = 2\n[backend.local]\nslots = 'x'\npolcy = 'fcfs'\n"
                      "[coupler]\njoin_timeout = -1\n")
    result = quick("config", "check", "--config", str(broken))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"gridcouple: error: {broken}:1: bakend: unknown key 'bakend'")
    assert lines[1].startswith(f"gridcouple: error: {broken}:4: [backend.local] slots: expected")
    assert lines[2].startswith(f"gridcouple: error: {broken}:5: [backend.local] polcy: unknown")
    assert lines[3] == (f"gridcouple: error: {broken}:7: [coupler] join_timeout: must be "
                        "positive, got -1.0")
    assert lines[4:] == [f"gridcouple: 4 errors in {broken}"]


def test_help_shows_no_python_types_and_version():
    from typer.testing import CliRunner

    from gridcouple.cli import app, certs, jobman, jobs, run, simulate  # noqa: F401  (as main)

    runner = CliRunner()
    pages = [[], ["config"]] + [[name] for name in (
        "submit", "status", "cancel", "hold", "release", "logs", "wait", "run", "simulate")] \
        + [["config", "check"], ["certs", "ca"], ["certs", "site"], ["jobman"],
           ["jobman", "serve"], ["jobman", "stop"], ["jobman", "status"], ["jobman", "token"],
           ["jobman", "token", "add"], ["jobman", "token", "list"], ["jobman", "token", "revoke"]]
    for page in pages:
        text = runner.invoke(app, [*page, "--help"], terminal_width=100).output
        assert "Usage:" in text and not re.search(r"<[a-z_]+(\[[a-z_, \[\]]*\])?>", text), text
    assert "-J" in runner.invoke(app, ["submit", "--help"], terminal_width=100).output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and re.fullmatch(r"gridcouple \S+\n", version.output)


def test_status_watch_keeps_the_newest_jobs_in_view_in_80_columns(cli, tmp_path):
    cli("submit", "-a", "12", "-J", "a-rather-long-job-name-for-the-table", "--", "true")
    cli("wait", "1-12")
    env = {**os.environ, "GRIDCOUPLE_CONFIG": str(tmp_path / "gridcouple.toml"),
           "XDG_STATE_HOME": str(tmp_path / "xdg"), "COLUMNS": "80", "LINES": "10"}
    result = subprocess.run([GRIDCOUPLE, "status", "--watch", "1-12"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 0
    lines = result.stdout.rstrip("\n").splitlines()
    assert re.match(r"\d\d:\d\d:\d\d  12 COMPLETED; the newest 6 of 12 shown  \(/", lines[0])
    assert lines[1].split()[:2] == ["ID", "NAME"]
    assert [line.split()[0] for line in lines[2:]] == [str(i) for i in range(7, 13)]
    assert all(len(line) <= 80 for line in lines)


def test_status_watch_says_no_jobs(cli, tmp_path):
    env = {**os.environ, "GRIDCOUPLE_CONFIG": str(tmp_path / "gridcouple.toml"),
           "XDG_STATE_HOME": str(tmp_path / "xdg")}
    with subprocess.Popen([GRIDCOUPLE, "status", "--watch", "--interval", "0.1"],
                          stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path) as watching:
        # Ctrl-C once it watches (asleep between refreshes), not after a fixed time that a
        # loaded machine may not give it to start: a Ctrl-C in its imports is a traceback
        wchan = Path(f"/proc/{watching.pid}/wchan")
        deadline = time.monotonic() + 60
        while wchan.exists() and wchan.read_text() != "hrtimer_nanosleep":
            assert time.monotonic() < deadline and watching.poll() is None, "it never watched"
            time.sleep(0.05)
        watching.send_signal(signal.SIGINT)
        output = watching.communicate(timeout=10)[0]
    assert watching.returncode == 0
    assert "no jobs: there is no journal at" in output and "ID" not in output
