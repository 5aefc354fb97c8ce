"""The ``gridcouple`` command, run as a user runs it: exit codes follow the jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gridcouple.backends.local import LocalBackend

GRIDCOUPLE = shutil.which("gridcouple", path=str(Path(sys.executable).parent)) or "gridcouple"


@pytest.fixture
def cli(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.local]\nslots = 2\ngrace_period = 1\n'
                      'idle_exit = 5\n')
    env = {**os.environ, "GRIDCOUPLE_CONFIG": str(config)}
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
    assert submitted.stdout.count("Submitted job") == 3
    waited = cli("wait", "1", "2", "3")
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
