"""The job manager server against real ``gridcouple jobman serve`` processes: tokens,
allocation, status, cancel, events, files, output, the max_jobs limit under a 50-request race,
and durability across SIGKILL."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from gridcouple.backends.local.backend import process_start
from gridcouple.config import load_config
from gridcouple.errors import ConfigError
from gridcouple.jobman.client import JobManagerClient, JobManagerRefused
from gridcouple.scheduler.metrics import step_count
from test_jobman_helpers import (
    GRIDCOUPLE,
    assert_refused,
    job_states,
    running_jobman,
    start_jobman,
    wait_for,
    wait_states,
)


def gridcouple(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRIDCOUPLE, *args], capture_output=True, text=True, timeout=timeout)


def test_tokens_are_made_listed_and_revoked_and_stored_hashed_owner_only(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text(f'[jobmanager]\nwork_root = "{tmp_path / "work"}"\n')
    made = gridcouple("jobman", "token", "add", "alice", "--config", str(config))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("gcjm_") and len(token) > 40
    token_file = tmp_path / "work" / "tokens.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in token_file.read_text()  # only its hash
    again = gridcouple("jobman", "token", "add", "alice", "--config", str(config))
    assert again.returncode == 2 and "already has a token" in again.stderr
    replaced = gridcouple("jobman", "token", "add", "alice", "--replace", "--config", str(config))
    assert replaced.returncode == 0 and replaced.stdout.strip() != token
    listed = gridcouple("jobman", "token", "list", "--config", str(config))
    assert listed.stdout.count("alice") == 2 and token not in listed.stdout
    revoked = gridcouple("jobman", "token", "revoke", "alice", "--config", str(config))
    assert revoked.returncode == 0 and "revoked 1 token of alice" in revoked.stdout
    unknown = gridcouple("jobman", "token", "revoke", "mallory", "--config", str(config))
    assert unknown.returncode == 2 and "'mallory' has no active token" in unknown.stderr
    bad = gridcouple("jobman", "token", "add", "a b", "--config", str(config))
    assert bad.returncode == 2 and "user name 'a b'" in bad.stderr
    token_file.chmod(0o644)
    opened = gridcouple("jobman", "token", "list", "--config", str(config))
    assert opened.returncode == 2 and "chmod 600" in opened.stderr


@pytest.mark.parametrize(("table", "words"), [
    ('host = "0.0.0.0"', ":2: [jobmanager] host: listening on '0.0.0.0' (beyond loopback) "
                         "needs TLS"),
    ('acl = ["allow 10.0.0.0/8", "permit 1.2.3.4/32"]', ":2: [jobmanager] acl: rule 1 "
                                                         "('permit 1.2.3.4/32')"),
    ('acl = ["allow 10.0.0.1/8"]', "has host bits set"),
    ('tls_cert = "cert.pem"', ":2: [jobmanager] tls_cert: TLS needs both tls_cert and tls_key"),
    ("max_jobs = 0", ":2: [jobmanager] max_jobs: must be at least 1"),
    ('over_limit = "drop"', ":2: [jobmanager] over_limit: 'drop' is not one of"),
    ('polcy = "fcfs"', "unknown key 'polcy' (did you mean 'policy'?)"),
])
def test_a_bad_jobmanager_table_is_named_by_file_line_and_key(tmp_path, table, words):
    path = tmp_path / "gridcouple.toml"
    path.write_text(f"[jobmanager]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path)) and words in str(info.value)


def test_allocate_status_cancel_events_and_output_each_in_one_request(tmp_path):
    with running_jobman(tmp_path, max_jobs=2) as jm:
        client = jm.client()
        answer = client.call("POST", "/jobs", {"jobs": [
            {"argv": ["sh", "-c", "echo out-$GRIDCOUPLE_X; echo err >&2"], "name": "one",
             "environment": {"GRIDCOUPLE_X": "42"}},
            {"argv": ["sleep", "30"], "name": "two"},
            {"argv": ["sleep", "30"], "name": "three"}]})
        ids = [job["id"] for job in answer["jobs"]]
        assert [job["name"] for job in answer["jobs"]] == ["one", "two", "three"]
        assert 1 <= answer["waiting"] <= 3  # max_jobs = 2: one waits at least
        assert wait_states(jm, ids, {"completed", "active"}) == ["completed", "active", "active"]
        output = client.call("GET", f"/jobs/{ids[0]}/stdout", query={"tail": 5})
        assert output == {"text": "out-42\n"}
        assert client.call("GET", f"/jobs/{ids[0]}/stderr")["text"] == "err\n"
        done = client.call("POST", "/jobs/cancel", {"ids": [*ids[1:], 999]})
        assert done == {"done": ids[1:], "unknown": [999]}
        assert wait_states(jm, ids, {"completed", "canceled"}) == [
            "completed", "canceled", "canceled"]
        statuses = client.call("POST", "/jobs/status", {"ids": ids})["jobs"]
        assert statuses[0]["exit_code"] == 0 and statuses[1]["reason"] == "canceled by user"
        events = client.call("GET", "/events")
        states = [(e["id"], e["state"]) for e in events["events"]]
        assert (ids[0], "active") in states and (ids[0], "completed") in states
        assert client.call("GET", "/events", query={"since": events["next"]})["events"] == []
        listed = client.call("GET", "/jobs")["jobs"]
        assert [j["id"] for j in listed] == ids
        # Another user sees none of it.
        other = jm.client("bob")
        assert other.call("POST", "/jobs/status", {"ids": ids})["jobs"][0] == {
            "id": ids[0], "error": "no such job of yours"}
        assert other.call("GET", "/jobs")["jobs"] == []
        with pytest.raises(JobManagerRefused, match=f"no job {ids[0]} of yours"):
            other.call("GET", f"/jobs/{ids[0]}/files")


def test_what_a_job_may_run_is_the_configured_commands_and_applications(tmp_path):
    with running_jobman(tmp_path, commands=["sleep"], apps=["gridcouple.recipes.*"]) as jm:
        def refused(job: dict, status: int, *words: str) -> None:
            assert_refused(jm.request("POST", "/api/v1/jobs", {"jobs": [job]}), status, *words)

        refused({"argv": ["/bin/sh", "-c", "id"]}, 403, "does not run '/bin/sh'", "'sleep'")
        refused({"argv": ["python", "-m", "gridcouple.appkit.server", "--app", "os:system"]},
                403, "does not run the application 'os:system'")
        refused({"argv": ["/usr/bin/python3", "-m", "gridcouple.appkit.server", "--app",
                          "gridcouple.recipes.weak_coupling:Concentration"]}, 400,
                "send 'python'")
        refused({"argv": ["python", "-m", "gridcouple.appkit.server", "--app",
                          "gridcouple.recipes.weak_coupling:Concentration", "--evil"]}, 400,
                "takes the options")
        refused({"argv": ["sleep", "1"], "environment": {"LD_PRELOAD": "/tmp/x.so"}}, 403,
                "may not set 'LD_PRELOAD'")
        refused({"argv": ["sleep", "1"], "environment": {"DASK_DISTRIBUTED__X": "1"}}, 403,
                "DASK_DISTRIBUTED__X")
        refused({"script": "id"}, 400, "not scripts")
        refused({"argv": ["sleep", "1"], "directory": "/etc"}, 400, "own working directory")
        refused({"argv": ["sleep", "1"], "resources": {"gpus": 1}}, 400, "GPUs")
        refused({"argv": ["sleep", "1"], "resources": {"cpus": True}}, 400, "cpus")
        refused({"argv": ["sleep", "1"], "name": "a b"}, 400, "JobSpec.name")
        refused({"argv": ["sleep", "1"], "stage_in": [{"source": "x", "target": "y"}]}, 400,
                "needs an upload")
        refused({"argv": ["sleep", "1"], "stage_out": [{"source": "../x", "target": "y"}]},
                400, "stage_out[0].source")
        code, body = jm.request("POST", "/api/v1/jobs", {"jobs": [{"argv": [
            "python", "-m", "gridcouple.appkit.server", "--app",
            "gridcouple.recipes.weak_coupling:Concentration", "--name", "c"]}]})
        assert code == 201, body
        assert [job["id"] for job in body["jobs"]] == [1]  # the journal kept no refused job
        assert not (jm.work_root / "queue" / "jobs" / "2").exists()  # nothing refused was kept


def test_files_of_a_job_are_listed_read_written_and_removed_inside_its_directory(tmp_path):
    with running_jobman(tmp_path) as jm:
        client = jm.client()
        job = client.call("POST", "/jobs", {"jobs": [{"argv": ["sh", "-c", textwrap.dedent("""
            mkdir -p out && echo result > out/data.txt
            ln -s /etc out-link; ln -s /etc/hostname passwd-link
            while [ ! -e go ]; do sleep 0.05; done; cat go > copied""")]}]})["jobs"][0]["id"]
        wait_for(lambda: "passwd-link" in str(client.call("GET", f"/jobs/{job}/files")))
        with (tmp_path / "in.bin").open("wb") as file:
            file.write(os.urandom(300_000))
        client.upload(f"/jobs/{job}/files/in/put.bin", tmp_path / "in.bin")
        assert b"".join(client.download(f"/jobs/{job}/files/in/put.bin")) == \
            (tmp_path / "in.bin").read_bytes()
        jm.request("PUT", f"/api/v1/jobs/{job}/files/go", b"hello")
        wait_states(jm, [job], {"completed"})
        listing = {e["path"]: e["type"] for e in client.call("GET", f"/jobs/{job}/files")["files"]}
        assert listing == {"copied": "file", "go": "file", "in": "dir", "in/put.bin": "file",
                           "out": "dir", "out/data.txt": "file", "out-link": "symlink",
                           "passwd-link": "symlink", "stderr": "file", "stdout": "file"}
        assert b"".join(client.download(f"/jobs/{job}/files/copied")) == b"hello"
        # Symlinks are listed, never followed (the job made them pointing out).
        for path in ("passwd-link", "out-link/hostname"):
            with pytest.raises(JobManagerRefused, match="symlink|regular file"):
                b"".join(client.download(f"/jobs/{job}/files/{path}"))
        assert_refused(jm.request("PUT", f"/api/v1/jobs/{job}/files/out-link/x", b"x"), 400,
                       "symlinks are never followed")
        assert client.call("DELETE", f"/jobs/{job}/files/out-link") == {"removed": "out-link"}
        assert Path("/etc/hostname").exists()
        client.call("DELETE", f"/jobs/{job}/files/out")
        names = [e["path"] for e in client.call("GET", f"/jobs/{job}/files")["files"]]
        assert "out" not in names and "out/data.txt" not in names
        assert_refused(jm.request("GET", f"/api/v1/jobs/{job}/files/nothing"), 404, "no file")


def test_max_jobs_is_never_exceeded_under_50_concurrent_allocations_from_5_clients(tmp_path):
    """MuPIF #82: 50 requests at once from 5 users; the jobs' own clocks say how many ran at
    once (queue mode: all run, at most max_jobs at a time, and the limit is reached)."""
    users = ("u1", "u2", "u3", "u4", "u5")
    with running_jobman(tmp_path, max_jobs=4, users=users) as jm:
        ids: list[int] = []
        barrier = threading.Barrier(50)

        def allocate(user: str) -> None:
            client = jm.client(user)
            barrier.wait()
            answer = client.call("POST", "/jobs", {"jobs": [{"argv": [
                "sh", "-c", "date +%s.%N; sleep 0.3; date +%s.%N"]}]})
            ids.extend((user, job["id"]) for job in answer["jobs"])  # type: ignore[misc]

        threads = [threading.Thread(target=allocate, args=(users[i % 5],)) for i in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(ids) == 50
        wait_for(lambda: all(s == "completed" for s in _all_states(jm, ids)), timeout=60)
        spans = []
        for _, job in ids:
            lines = (jm.work_root / "queue" / "jobs" / str(job) / "stdout").read_text().split()
            spans.append((float(lines[0]), float(lines[1])))
        assert max_overlap(spans) == 4


def _all_states(jm, ids) -> list[str]:
    states = []
    for user in {u for u, _ in ids}:
        mine = [job for u, job in ids if u == user]
        states.extend(job_states(jm, mine, user))
    return states


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    starts, ends = zip(*spans, strict=True)
    return int(step_count(np.array(starts), np.array(ends))[1].max())


def test_over_limit_refuse_answers_429_beyond_max_jobs_under_a_race(tmp_path):
    with running_jobman(tmp_path, max_jobs=4, over_limit="refuse") as jm:
        answers: list[tuple[int, object]] = []
        barrier = threading.Barrier(50)

        def allocate() -> None:
            barrier.wait()
            answers.append(jm.request("POST", "/api/v1/jobs",
                                      {"jobs": [{"argv": ["sleep", "30"]}]}))

        threads = [threading.Thread(target=allocate) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        accepted = [a for a in answers if a[0] == 201]
        refused = [a for a in answers if a[0] != 201]
        assert len(accepted) == 4 and len(refused) == 46
        message = assert_refused(refused[0], 429, "max_jobs is 4", "none was started")
        assert "over_limit" in message
        _, overview = jm.request("GET", "/api/v1/status")
        assert overview["running"] + overview["waiting"] == 4
        assert_refused(jm.request("POST", "/api/v1/jobs", {"jobs": [
            {"argv": ["sleep", "1"]}] * 5}), 429)


def test_a_retried_allocation_with_the_same_request_id_makes_no_second_job(tmp_path):
    with running_jobman(tmp_path) as jm:
        body = {"request": "r-1", "jobs": [{"argv": ["true"]}]}
        first = jm.request("POST", "/api/v1/jobs", body)
        second = jm.request("POST", "/api/v1/jobs", body)
        assert first[0] == 201 and second[0] == 200 and second[1]["repeated"]
        assert first[1]["jobs"][0]["id"] == second[1]["jobs"][0]["id"]
        assert jm.request("GET", "/api/v1/requests/r-1")[1] == {"ids": [first[1]["jobs"][0]["id"]]}
        assert jm.request("POST", "/api/v1/jobs", body, user="bob")[0] == 201  # bob's own


def test_records_survive_sigkill_and_running_jobs_are_adopted_after_a_restart(tmp_path):
    """SIGKILL the server AND its queue's daemon; a restart keeps every record, adopts the job
    still running (its pid unchanged), starts the queued one, and a client reconnects."""
    jm = start_jobman(tmp_path, max_jobs=1)
    try:
        client = jm.client()
        done = client.call("POST", "/jobs", {"jobs": [{"argv": ["true"]}]})["jobs"][0]["id"]
        wait_states(jm, [done], {"completed"})
        running, queued = (j["id"] for j in client.call("POST", "/jobs", {"jobs": [
            {"argv": ["sh", "-c", "echo started; exec sleep 60"]},
            {"argv": ["sh", "-c", "echo second"]}]})["jobs"])
        wait_for(lambda: job_states(jm, [running]) == ["active"])
        pid = _job_pid(jm, running)
        daemon = _daemon_pid(jm)
        jm.kill()
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: process_start(daemon) is None)
        assert process_start(pid) is not None  # the job outlived both
        jm.restart()
        assert job_states(jm, [done, running, queued]) == ["completed", "active", "queued"]
        assert client.call("GET", f"/jobs/{running}/stdout")["text"] == "started\n"
        assert _job_pid(jm, running) == pid
        client.call("POST", "/jobs/cancel", {"ids": [running]})  # the old connection is gone
        assert wait_states(jm, [running, queued], {"canceled", "completed", "failed"}) == [
            "canceled", "completed"]
        assert process_start(pid) is None
    finally:
        jm.cleanup()


def _job_pid(jm, job_id: int) -> int:
    from gridcouple.journal import Journal

    with Journal(jm.work_root / "queue" / "journal.sqlite") as journal:
        return wait_for(lambda: journal.get([job_id])[0].extra.get("pid"))


def _daemon_pid(jm) -> int:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                command = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gridcouple.backends.local.daemon" in command and \
                    str(jm.work_root / "queue").encode() in command:
                return int(entry.name)
    raise AssertionError("no queue daemon found")


def test_https_with_a_certificate_the_client_checks(tmp_path):
    with running_jobman(tmp_path, tls=True) as jm:
        assert jm.url.startswith("https://127.0.0.1:")
        assert jm.client().call("GET", "/info")["user"] == "alice"
        stranger = JobManagerClient(jm.url, jm.token, ca_file=None, timeout=5)
        with pytest.raises(JobManagerRefused, match="certificate is not trusted"):
            stranger.call("GET", "/info")
        plain = JobManagerClient(jm.url.replace("https", "http"), jm.token, timeout=5)
        with pytest.raises(Exception, match="did not answer|refused"):
            plain.call("GET", "/info")
        assert jm.alive()


def test_http_is_refused_beyond_loopback_by_the_client():
    for url, words in (("http://192.0.2.1:8750", "TLS is required beyond loopback"),
                       ("ftp://127.0.0.1:1", "not a job manager URL"),
                       ("https://127.0.0.1:8750/x", "only https://HOST:PORT")):
        with pytest.raises(ValueError, match=words):
            JobManagerClient(url, "gcjm_x")


def test_a_second_server_on_the_same_work_root_is_refused(tmp_path):
    with running_jobman(tmp_path) as jm:
        second = gridcouple("jobman", "serve", "--config", str(jm.config))
        assert second.returncode == 2
        assert f"another job manager serves {jm.work_root}" in second.stderr


def test_status_command_shows_slots_jobs_and_clients(tmp_path):
    with running_jobman(tmp_path, max_jobs=3) as jm:
        client = jm.client()
        client.call("POST", "/jobs", {"jobs": [{"argv": ["sleep", "30"], "name": "long"}]})
        wait_for(lambda: client.call("GET", "/status")["running"] == 1)
        shown = subprocess.run([GRIDCOUPLE, "jobman", "status", jm.url, "--once",
                                "--token-file", str(jm.token_files["bob"])],
                               capture_output=True, text=True, timeout=30,
                               env={**os.environ, "COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        assert "1 of 3 slots used, 0 waiting" in shown.stdout
        assert "long" in shown.stdout and "alice" in shown.stdout and "127.0.0.1" in shown.stdout
        no_token = subprocess.run([GRIDCOUPLE, "jobman", "status", jm.url, "--once"],
                                  capture_output=True, text=True, timeout=30,
                                  env={k: v for k, v in os.environ.items()
                                       if k != "GRIDCOUPLE_JOBMAN_TOKEN"})
        assert no_token.returncode == 2 and "--token-file" in no_token.stderr


def test_stop_ends_the_server_and_with_cancel_jobs_its_jobs(tmp_path):
    jm = start_jobman(tmp_path)
    job = jm.client().call("POST", "/jobs", {"jobs": [{"argv": ["sleep", "60"]}]})["jobs"][0]
    wait_for(lambda: job_states(jm, [job["id"]]) == ["active"])
    pid = _job_pid(jm, job["id"])
    stopped = gridcouple("jobman", "stop", "--config", str(jm.config), "--cancel-jobs")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the job manager" in stopped.stdout and "canceled 1 jobs" in stopped.stdout
    assert jm.process.wait(10) == 0
    wait_for(lambda: process_start(pid) is None)
    assert "no job manager was running" in gridcouple(
        "jobman", "stop", "--config", str(jm.config)).stdout
