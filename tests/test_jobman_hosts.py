"""The job managers of scripts/jobman-up (a test service): one on this machine, one inside
the test host gc-h1 with nothing shared with this side but the network. Application servers
run on gc-h1 and register with a coupler listening on the bridge (mutual TLS)."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import require_service
from gridcouple.jobman.client import JobManagerClient, read_token
from gridcouple.jobman.launch import toml_table
from test_jobman_helpers import GRIDCOUPLE, make_certificate

pytest_plugins = ["testhosts"]
RECORD = os.path.join(os.path.dirname(__file__), "..", ".gridcouple-services", "jobman.json")


def service() -> dict[str, dict]:
    """The recorded job managers by name, each answering; skips (fails with CI=true)
    otherwise."""
    try:
        with open(RECORD) as file:
            instances = {i["name"]: i for i in json.load(file)["instances"]}
    except (OSError, ValueError, KeyError) as exc:
        require_service("jobman", False, f"{RECORD}: {exc} (start it with scripts/jobman-up)")
    for name, instance in instances.items():
        try:
            client = JobManagerClient(instance["url"], read_token(instance["token_file"]),
                                      ca_file=instance["ca_file"], timeout=5)
            client.call("GET", "/info")
        except Exception as exc:  # any failure means: not usable
            require_service("jobman", False, f"{name} at {instance['url']}: {exc}")
    return instances


def coupled_config(path, shared, backends: dict[str, dict]) -> str:
    """A client configuration: a coupler on the bridge with TLS files the test hosts see, a
    field store in the shared directory, and a jobmanager backend per instance."""
    ca, cert, key = make_certificate(shared, "169.254.77.1")
    text = f'state_dir = "{path / "state"}"\n[backend]\nname = "{next(iter(backends))}"\n'
    for name, instance in backends.items():
        text += toml_table(f"backend.{name}", {
            "type": "jobmanager", "url": instance["url"], "token_file": instance["token_file"],
            "ca_file": instance["ca_file"]})
    text += toml_table("coupler", {"host": "169.254.77.1", "tls_ca_file": str(ca),
                                   "tls_cert": str(cert), "tls_key": str(key),
                                   "field_store": str(shared / "fields")})
    config = path / "gridcouple.toml"
    config.write_text(text)
    return str(config)


def test_weak_coupling_with_both_applications_on_a_test_host(tmp_path, testhosts,
                                                             shared_tmp_path):
    instances = service()
    if "gc-h1" not in instances:
        require_service("jobman on gc-h1", False, "scripts/jobman-up found no test hosts")
    config = coupled_config(tmp_path, shared_tmp_path, {"h1": instances["gc-h1"]})
    run = subprocess.run([GRIDCOUPLE, "run", "weak-coupling", "--config", config],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Time:  1.00 concentration  1.00, running average  0.55" in run.stdout
    h1 = instances["gc-h1"]
    overview = JobManagerClient(h1["url"], read_token(h1["token_file"]),
                                ca_file=h1["ca_file"]).call("GET", "/status")
    last = overview["jobs"][-2:]
    assert [j["host"] for j in last] == ["gc-h1", "gc-h1"]
    assert [j["what"].rsplit(":", 1)[1] for j in last] == ["Concentration", "RunningAverage"]


def test_distributed_on_this_machine_and_a_test_host(tmp_path, testhosts, shared_tmp_path):
    """The two applications on two job managers on two hosts; the field goes by reference
    through the shared directory (as on a cluster's /home)."""
    instances = service()
    if "gc-h1" not in instances:
        require_service("jobman on gc-h1", False, "scripts/jobman-up found no test hosts")
    config = coupled_config(tmp_path, shared_tmp_path, {"partner-a": instances["local"],
                                                         "partner-b": instances["gc-h1"]})
    run = subprocess.run([GRIDCOUPLE, "run", "distributed", "--config", config],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    assert "partner-b: https://169.254.77.2:29750" in run.stdout
    assert "running average  0.55 (field version 10, by reference)" in run.stdout
