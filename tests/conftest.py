"""Shared fixtures. Real services only: a service that is missing skips its tests with one line
saying why, except with CI=true, where it fails them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_home(tmp_path_factory):
    """Tests never touch the user's own state directory ($XDG_STATE_HOME/gridcouple, the
    default of a configuration without state_dir)."""
    home = tmp_path_factory.mktemp("xdg-state")
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(home)
    yield home
    if previous is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = previous


def require_service(service: str, available: bool, why: str) -> None:
    """Skip (or, with CI=true, fail) the calling test when ``service`` is not available."""
    if available:
        return
    message = f"{service} is not available: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires {message}")
    pytest.skip(message)


def require_slurm() -> None:
    """Skip (or fail, with CI=true) unless the single-node test cluster answers."""
    require_service("slurm", *_slurm_cluster())


def _slurm_cluster() -> tuple[bool, str]:
    """Whether the test cluster of scripts/slurm-up answers, and why not."""
    if shutil.which("sinfo") is None:
        return False, "sinfo is not on PATH (start the cluster with scripts/slurm-up as root)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a"], capture_output=True,
                              text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False, "sinfo did not answer within 10 s"
    if proc.returncode or proc.stdout.strip() != "up":
        return False, f"partition debug is not up: {proc.stderr.strip() or proc.stdout.strip()}"
    return True, ""


@pytest.fixture
def state_dir(tmp_path):
    """A fresh gridcouple state directory (journal, job homes)."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def local_backend(state_dir):
    """A local backend with 2 slots on a fresh state dir; its jobs and daemon end afterwards."""
    from gridcouple.backends.local import LocalBackend, LocalOptions

    backend = LocalBackend(LocalOptions(slots=2, grace_period=1.0, idle_exit=5.0),
                           state_dir=state_dir)
    yield backend
    live = [r.job for r in backend.journal.records("local", active_only=True)]
    if live:
        backend.cancel(live)
        backend.wait(live, timeout=15)
    backend.stop_daemon()
    backend.close()
