"""Support for the job manager tests (no tests here): real ``gridcouple jobman serve``
processes on loopback, each with its own port, work root and tokens, and a raw HTTP client
for requests our own client would never send.

Import it from a test module (tests/ is on sys.path, as for conftest)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridcouple.cli.certs import make_ca, make_site
from gridcouple.jobman.client import JobManagerClient
from gridcouple.jobman.launch import LaunchedJobManager, launch, start_job_manager

GRIDCOUPLE = str(Path(sys.executable).with_name("gridcouple"))


def make_certificate(directory: Path, *addresses: str) -> tuple[Path, Path, Path]:
    """A certificate authority and a certificate it signed for 127.0.0.1, localhost and
    ``addresses``, as ``gridcouple certs`` makes them; returns (the authority's certificate,
    the certificate, its key)."""
    make_ca(directory / "ca", days=2, force=True)
    site = make_site(directory / "ca", "site", hosts=["127.0.0.1", "localhost", *addresses],
                     days=2, force=True)
    return site / "ca.pem", site / "cert.pem", site / "key.pem"


@dataclass
class JobManagerProcess(LaunchedJobManager):
    """One running job manager, as the tests drive it."""

    ca_file: Path | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def token(self) -> str:
        return self.tokens["alice"]

    def client(self, user: str = "alice", timeout: float = 10.0) -> JobManagerClient:
        return JobManagerClient(self.url, self.tokens[user], ca_file=self.ca_file,
                                timeout=timeout)

    def raw(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        """A plain http.client connection, to send anything."""
        if self.url.startswith("https"):
            context = ssl.create_default_context(cafile=str(self.ca_file))
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, user: str | None = "alice",
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """One request on a new connection; returns (status, parsed JSON or bytes)."""
        connection = self.raw()
        try:
            sent = dict(headers or {})
            if user is not None:
                sent.setdefault("Authorization", f"Bearer {self.tokens[user]}")
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        with contextlib.suppress(ValueError):
            return response.status, json.loads(data)
        return response.status, data

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: nothing gets to clean up."""
        self.process.kill()
        self.process.wait(5)

    def restart(self) -> JobManagerProcess:
        """Start the same configuration again, on the same port (clients reconnect)."""
        text = self.config.read_text()
        self.config.write_text(text.replace("port = 0\n", f"port = {self.port}\n"))
        self.process, self.url = launch(self.config, self.log)
        return self

    def cleanup(self) -> None:
        """Stop the server, cancel what still runs, stop its queue's daemon."""
        self.stop(cancel_jobs=True)


def start_jobman(directory: Path, *, users: tuple[str, ...] = ("alice", "bob"), tls: bool = False,
                 **settings: Any) -> JobManagerProcess:
    """A job manager on 127.0.0.1 (any free port) with a fresh work root below ``directory``,
    tokens for ``users``, and ``settings`` for its [jobmanager] table."""
    directory.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"max_jobs": 2, "commands": ["sh", "sleep", "true", "cat"],
                              "apps": ["gridcouple.recipes.*"], "grace_period": 1.0}
    ca_file = None
    if tls:
        ca_file, cert, key = make_certificate(directory)
        values.update(tls_cert=cert, tls_key=key)
    values.update(settings)
    started = start_job_manager(directory, values, users)
    return JobManagerProcess(**vars(started), ca_file=ca_file)


@contextlib.contextmanager
def running_jobman(directory: Path, **settings: Any) -> Iterator[JobManagerProcess]:
    """start_jobman, cleaned up afterwards."""
    jobman = start_jobman(directory, **settings)
    try:
        yield jobman
    finally:
        jobman.cleanup()


def wait_for(condition: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``condition()`` until it is truthy; its value, or AssertionError at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(interval)


def assert_refused(answer: tuple[int, Any], status: int, *words: str) -> str:
    """A refusal is one JSON object with a clear error; returns the message."""
    code, body = answer
    assert code == status, answer
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and len(message) > 10, body
    for word in words:
        assert word in message, (word, message)
    return message


def closes_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes ``sock`` within ``seconds`` (reading what it sends)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def job_states(jobman: JobManagerProcess, ids: list[int], user: str = "alice") -> list[str]:
    code, body = jobman.request("POST", "/api/v1/jobs/status", {"ids": ids}, user=user)
    assert code == 200, body
    return [j.get("state", "unknown") for j in body["jobs"]]


def wait_states(jobman: JobManagerProcess, ids: list[int], wanted: set[str],
                timeout: float = 20.0) -> list[str]:
    return wait_for(lambda: (lambda s: s if set(s) <= wanted else None)(
        job_states(jobman, ids)), timeout)
