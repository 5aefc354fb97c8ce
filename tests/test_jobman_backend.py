"""The ``jobmanager`` backend: the whole Backend protocol over a real job manager's API, with
no file system shared on purpose (inputs uploaded, outputs downloaded), through a restart of
the job manager, and under the coupler: ``run weak-coupling`` and ``run distributed``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gridcouple.backends import open_backend
from gridcouple.config import load_config
from gridcouple.coupler import AppRequest, Coupler
from gridcouple.errors import BackendError, ConfigError
from gridcouple.jobman.launch import toml_table
from gridcouple.jobs import JobSpec, JobState, Resources, StagedFile
from test_jobman_helpers import GRIDCOUPLE, running_jobman, start_jobman, wait_for


def client_config(tmp_path, *servers, default: str = "partner-a", **more):
    """A gridcouple.toml with a jobmanager backend for each server (partner-a, partner-b)."""
    text = f'state_dir = "{tmp_path / "client-state"}"\n[backend]\nname = "{default}"\n'
    for name, jm in zip(("partner-a", "partner-b"), servers, strict=False):
        text += toml_table(f"backend.{name}", {
            "type": "jobmanager", "url": jm.url, "token_file": jm.token_files["alice"],
            **({"ca_file": jm.ca_file} if jm.ca_file else {}), "poll_interval": 0.2, **more})
    path = tmp_path / "gridcouple.toml"
    path.write_text(text)
    return load_config(path)


@pytest.fixture
def jm(tmp_path):
    with running_jobman(tmp_path / "jm", max_jobs=2, commands=["sh", "sleep"]) as server:
        yield server


def test_stage_in_run_stage_out_and_output_without_a_shared_file_system(tmp_path, jm):
    inputs = tmp_path / "inputs"
    (inputs / "mesh").mkdir(parents=True)
    (inputs / "params.txt").write_text("alpha 0.5\n")
    (inputs / "mesh" / "part1").write_text("1 2 3\n")
    (inputs / "mesh" / "part2").write_bytes(os.urandom(200_000))
    script = textwrap.dedent("""
        set -e
        test "$(cat params.txt)" = "alpha 0.5"
        mkdir -p results/deep
        cat mesh/part1 > results/summary.txt
        cp mesh/part2 results/deep/copy.bin
        for i in $(seq 1 50); do echo "line $i"; done
        echo "to stderr" >&2""")
    specs = [JobSpec(argv=("sh", "-c", script), name=f"stage-{i}",
                     stage_in=(StagedFile(str(inputs / "params.txt"), "params.txt"),
                               StagedFile(str(inputs / "mesh"), "mesh")),
                     stage_out=(StagedFile("results", "out"),
                                StagedFile("results/summary.txt", "summary.txt")))
             for i in range(2)]
    with open_backend(client_config(tmp_path, jm), "partner-a") as backend:
        jobs = backend.submit(specs)
        statuses = backend.wait(jobs, timeout=30)
        assert [s.state for s in statuses] == [JobState.COMPLETED] * 2, \
            [backend.stderr_tail(j) for j in jobs]
        assert backend.read_output(jobs[0]).splitlines()[-1] == "line 50"
        assert backend.read_output(jobs[0], tail=2) == "line 49\nline 50\n"
        assert backend.stderr_tail(jobs[1]) == "to stderr\n"
        fetched = backend.fetch(jobs[1], tmp_path / "fetched")
        assert fetched == [tmp_path / "fetched" / "out", tmp_path / "fetched" / "summary.txt"]
        assert (tmp_path / "fetched" / "out" / "deep" / "copy.bin").read_bytes() == \
            (inputs / "mesh" / "part2").read_bytes()
        assert (tmp_path / "fetched" / "summary.txt").read_text() == "1 2 3\n"
        missing = JobSpec(argv=("sh", "-c", "true"), stage_out=(StagedFile("nothing", "x"),))
        job = backend.submit([missing])[0]
        backend.wait([job], timeout=30)
        with pytest.raises(BackendError, match="output nothing was not produced"):
            backend.fetch(job, tmp_path / "fetched")
    # The uploads went away with the allocation that used them.
    assert list((jm.work_root / "uploads").iterdir()) == []


def test_status_cancel_hold_release_signal_and_events(tmp_path, jm):
    with open_backend(client_config(tmp_path, jm), "partner-a") as backend:
        trap = ("trap 'echo got USR1; exit 3' USR1; echo ready; "
                "while true; do sleep 0.05; done")
        first, second, third = backend.submit([
            JobSpec(argv=("sh", "-c", trap), name="trapper"),
            JobSpec(argv=("sleep", "30"), name="sleeper"),
            JobSpec(argv=("sh", "-c", "echo third"), name="third")])
        wait_for(lambda: backend.read_output(first) == "ready\n")
        backend.hold([third])
        assert backend.status([third])[0].state is JobState.HELD
        backend.send_signal([first], "USR1")
        status = backend.wait([first], timeout=15)[0]
        assert status.state is JobState.FAILED and status.exit_code == 3
        assert backend.read_output(first) == "ready\ngot USR1\n"
        backend.cancel([second])
        assert backend.wait([second], timeout=15)[0].state is JobState.CANCELED
        assert backend.status([third])[0].state is JobState.HELD
        backend.release([third])
        events = [(e.job.spec.name, e.status.state) for e in backend.events([third], timeout=15)]
        assert events[-1] == ("third", JobState.COMPLETED)
        assert backend.end_grace == pytest.approx(1.0 + 10.0 + 5.0)
        assert backend.field_store_base() == "/dev/shm"
        with pytest.raises(BackendError, match="does not run 'true'"):
            backend.submit([JobSpec(argv=("true",))])
        with pytest.raises(BackendError, match="not scripts"):
            backend.submit([JobSpec(script="echo hi")])


@pytest.mark.parametrize("ending", ["SIGKILL", "SIGTERM"])
def test_a_job_runs_on_through_a_job_manager_ended_and_restarted(tmp_path, ending):
    jm = start_jobman(tmp_path / "jm", commands=["sh"])
    try:
        with open_backend(client_config(tmp_path, jm), "partner-a") as backend:
            job = backend.submit([JobSpec(argv=("sh", "-c", "sleep 1.5; echo kept"))])[0]
            wait_for(lambda: backend.status([job])[0].state is JobState.ACTIVE)
            jm.process.send_signal(signal.Signals[ending])
            jm.process.wait(10)
            jm.restart()
            assert backend.wait([job], timeout=30)[0].state is JobState.COMPLETED
            assert backend.read_output(job) == "kept\n"
    finally:
        jm.cleanup()


@pytest.mark.parametrize(("table", "words"), [
    ({}, "url: the job manager's URL is required"),
    ({"url": "http://192.0.2.1:8750"}, "url: 'http://192.0.2.1:8750': TLS is required beyond"),
    ({"url": "https://127.0.0.1:8750", "poll_interval": 0}, "poll_interval: must be positive"),
])
def test_bad_backend_options_are_named_by_file_line_and_key(tmp_path, table, words):
    path = tmp_path / "gridcouple.toml"
    path.write_text(toml_table("backend.partner", {"type": "jobmanager", **table}))
    with pytest.raises(ConfigError) as info:
        open_backend(load_config(path), "partner")
    assert words in str(info.value) and str(path) in str(info.value)


def test_the_token_must_be_in_an_owner_only_file_or_the_environment(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("gcjm_x\n")
    token.chmod(0o644)
    path = tmp_path / "gridcouple.toml"
    path.write_text(toml_table("backend.partner", {"type": "jobmanager",
                                                   "url": "http://127.0.0.1:1",
                                                   "token_file": token}))
    with pytest.raises(ConfigError, match="open to others .* chmod 600"):
        open_backend(load_config(path), "partner")
    path.write_text(toml_table("backend.partner", {"type": "jobmanager",
                                                   "url": "http://127.0.0.1:1"}))
    monkeypatch.delenv("GRIDCOUPLE_JOBMAN_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="set token_file in \\[backend.partner\\]"):
        open_backend(load_config(path), "partner")
    monkeypatch.setenv("GRIDCOUPLE_JOBMAN_TOKEN", "gcjm_y")
    assert open_backend(load_config(path), "partner").client.token == "gcjm_y"


def test_weak_coupling_runs_through_a_job_manager_over_https(tmp_path):
    with running_jobman(tmp_path / "jm", tls=True) as jm:
        config = client_config(tmp_path, jm)
        run = subprocess.run([GRIDCOUPLE, "run", "weak-coupling", "--config", str(config.path)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "Time:  1.00 concentration  1.00, running average  0.55" in run.stdout
        _, overview = jm.request("GET", "/api/v1/status")
        assert [j["what"] for j in overview["jobs"]] == [
            "gridcouple.recipes.weak_coupling:Concentration",
            "gridcouple.recipes.weak_coupling:RunningAverage"]
        assert all(j["state"] in ("completed", "canceled") for j in overview["jobs"])


def test_an_application_the_job_manager_does_not_run_is_one_clear_error(tmp_path):
    with running_jobman(tmp_path / "jm", apps=["gridcouple.recipes.weak_coupling:*"]) as jm, \
            Coupler(client_config(tmp_path, jm)) as coupler, \
            pytest.raises(BackendError, match="does not run the application "
                          "'gridcouple.recipes.demo:Sweep'"):
        coupler.allocate("gridcouple.recipes.demo:Sweep", resources=Resources())


def test_run_distributed_on_two_configured_job_managers(tmp_path):
    with running_jobman(tmp_path / "a", apps=["gridcouple.recipes.distributed:*"]) as a, \
            running_jobman(tmp_path / "b", apps=["gridcouple.recipes.distributed:*"]) as b:
        config = client_config(tmp_path, a, b)
        run = subprocess.run([GRIDCOUPLE, "run", "distributed", "--config", str(config.path)],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "200"})
        assert run.returncode == 0, run.stderr
        assert f"partner-a: {a.url}" in run.stdout and f"partner-b: {b.url}" in run.stdout
        assert "Time:  1.00 concentration  1.00, running average  0.55 (field version 10, by " \
               "reference)" in run.stdout
        for server, app in ((a, "ConcentrationField"), (b, "FieldAverage")):
            jobs = server.request("GET", "/api/v1/status")[1]["jobs"]
            assert [j["what"] for j in jobs] == [f"gridcouple.recipes.distributed:{app}"]


def test_run_distributed_starts_two_job_managers_when_none_is_configured(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    run = subprocess.run([sys.executable, "-c", "from gridcouple.cli import main; main()",
                          "run", "distributed", "--config", str(config)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    assert "starting two job managers on this machine" in run.stdout
    assert "running average  0.55" in run.stdout
    assert not [p for p in os.listdir("/tmp") if p.startswith("gridcouple-distributed-")
                and _owned_by_me(f"/tmp/{p}") and _recent(f"/tmp/{p}")]


def _owned_by_me(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:
        return False


def _recent(path: str) -> bool:
    import time

    try:
        return time.time() - os.stat(path).st_mtime < 60
    except OSError:
        return False


def test_one_session_on_two_job_managers_and_the_local_machine_at_once(tmp_path):
    """Per-application backends: one allocate_many, one submission per backend."""
    app = "gridcouple.recipes.weak_coupling:Concentration"
    with running_jobman(tmp_path / "a") as a, running_jobman(tmp_path / "b") as b:
        config = client_config(tmp_path, a, b)
        with Coupler(config) as coupler:
            proxies = coupler.allocate_many([
                AppRequest(app, name="on-a", backend="partner-a"),
                AppRequest(app, name="on-b", backend="partner-b"),
                AppRequest(app, name="here", backend="local")])
            assert [p.get_critical_time_step() for p in proxies] == [0.1, 0.1, 0.1]
        for server, name in ((a, "on-a"), (b, "on-b")):
            jobs = server.request("GET", "/api/v1/status")[1]["jobs"]
            assert [j["name"] for j in jobs] == [name]
