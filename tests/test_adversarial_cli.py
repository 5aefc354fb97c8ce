"""Adversarial command-line arguments: whatever the words, a command ends with an exit code and
at most a one-line GridcoupleError (what main() prints), never another exception or a hang, and
the journal's earlier jobs stay as they were. Submissions go to the simulator, so nothing
random ever runs."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import gridcouple.cli.jobs
import gridcouple.cli.run
import gridcouple.cli.simulate  # noqa: F401
from gridcouple.cli import app
from gridcouple.errors import GridcoupleError
from gridcouple.jobs import JobState
from gridcouple.journal import Journal

WORDS = st.one_of(
    st.sampled_from(["1", "0", "-1", "2-1", "1-99999999999", "99999999999999999999", "x", "",
                     "--all", "--json", "-w", "--tail", "--stderr", "--timeout", "nan", "inf",
                     "-1e309", "--interval", "0", "--any", "--signal", "KILL", "USR9",
                     "--grace", "--limit", "-t", "5x", "-c", "0", "--mem", "4Q", "-a", "1",
                     "--backend", "nosuch", "simgrid", "-J", "../..", "--", "\x00", "é",
                     "--config", "/nonexistent.toml", "%j"]),
    st.text(max_size=12))
COMMANDS = ["status", "logs", "wait", "cancel", "hold", "release", "config"]


@pytest.fixture
def journal_with_one_job(tmp_path):
    """A state directory holding one ended job whose record must survive every command."""
    state = tmp_path / "state"
    result = CliRunner().invoke(app, ["submit", "--state-dir", str(state), "--backend",
                                      "simgrid", "--estimate", "1", "--wait", "--", "true"])
    assert result.exit_code == 0, result.output
    with Journal(state / "journal.sqlite") as journal:
        [record] = journal.records()
    assert record.status.state is JobState.COMPLETED
    return state, record


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(COMMANDS), words=st.lists(WORDS, max_size=6))
def test_fuzzed_arguments_end_in_an_exit_code(journal_with_one_job, command, words):
    state, before = journal_with_one_job
    args = [command, *words, "--state-dir", str(state)]
    if command == "config":
        args = ["config", "check", *words]
    if command == "wait":
        args += ["--timeout", "1"]
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, GridcoupleError), (args, repr(result.exception))
    with Journal(state / "journal.sqlite") as journal:
        [after] = journal.records()
    assert (after.job, after.status.state, after.status.exit_code) == (
        before.job, before.status.state, before.status.exit_code)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(WORDS, max_size=6))
def test_fuzzed_submit_options_never_crash_and_run_nothing_random(tmp_path, options):
    state = tmp_path / "fuzz-state"
    args = ["submit", "--state-dir", str(state), "--backend", "simgrid", "--estimate", "1",
            *[o for o in options if o not in ("--", "--backend", "--state-dir")], "--", "true"]
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, GridcoupleError), (args, repr(result.exception))
