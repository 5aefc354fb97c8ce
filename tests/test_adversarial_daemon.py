"""The local daemon, attacked through the directory it is started from: no module there may
run in it. (The daemon did not crash, nothing hung, nothing stored before is lost.)"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.backends.local.backend import daemon_address
from gridcouple.jobs import JobSpec, JobState

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
        self.pid = daemon_pid(state_dir)

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
        assert daemon_pid(self.backend.state_dir) == self.pid, "the daemon was restarted"
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


def daemon_pid(state_dir: Path, timeout: float = 10.0) -> int:
    """The pid of the daemon serving ``state_dir`` (not its keeper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gridcouple.backends.local.daemon" in cmdline and \
                    str(state_dir).encode() in cmdline:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no daemon serves {state_dir}")


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
