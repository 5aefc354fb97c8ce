"""A client of the job manager's API over the standard library's ``http.client`` (one
keep-alive connection per thread). Used by the ``jobmanager`` backend and ``gridcouple jobman
status``.

Every request of the API is safe to send twice (allocations carry a request id), so a request
whose connection broke before an answer came is sent again once on a new connection. A job
manager that cannot be reached raises :class:`JobManagerUnavailable` (a
``QueryUnavailableError``: callers retry); one that refuses raises :class:`JobManagerRefused`
with its own words.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gridcouple.errors import BackendError, ConfigError, QueryUnavailableError
from gridcouple.jobman.acl import is_loopback_host
from gridcouple.jobman.tokens import read_owner_only

API = "/api/v1"
CHUNK = 256 * 1024


class JobManagerUnavailable(QueryUnavailableError):
    """The job manager did not answer (down, restarting, unreachable)."""


class JobManagerRefused(BackendError):
    """The job manager answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_token(path: str | os.PathLike[str]) -> str:
    """A token from an owner-only file (its first line); ConfigError otherwise."""
    lines = read_owner_only(path).decode().splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def check_url(url: str) -> urllib.parse.SplitResult:
    """The parts of a job manager URL; ValueError unless it is http(s)://HOST[:PORT], https
    beyond loopback."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not a job manager URL (https://HOST:PORT)")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(f"{url!r}: TLS is required beyond loopback; use https://")
    if parts.path.strip("/") or parts.query or parts.username:
        raise ValueError(f"{url!r}: give only https://HOST:PORT")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    return parts


class JobManagerClient:
    """The API of one job manager, as ``url`` names it, with ``token``."""

    def __init__(self, url: str, token: str, *, ca_file: str | os.PathLike[str] | None = None,
                 timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.parts = check_url(self.url)
        self.token = token
        self.timeout = timeout
        self.tls = None
        if self.parts.scheme == "https":
            self.tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._local = threading.local()

    def close(self) -> None:
        """Close this thread's connection."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            host, port = self.parts.hostname or "", self.parts.port
            if self.tls is not None:
                connection = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                         context=self.tls)
            else:
                connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def request(self, method: str, path: str, payload: Any = None, *, body: bytes | None = None,
                query: dict[str, Any] | None = None) -> http.client.HTTPResponse:
        """Send one request (JSON ``payload`` or raw ``body``) and return the response with
        its body not yet read; raises for an error status."""
        target = API + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {self.token}"}
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise JobManagerRefused(0, f"job manager {self.url}: its certificate is "
                                            f"not trusted: {exc.verify_message}") from None
                if attempt == 2:
                    raise JobManagerUnavailable(f"job manager {self.url} did not answer "
                                                f"{method} {path}: {exc}") from None
        if response.status >= 400:
            raise self._refusal(response, method, path)
        return response

    def _refusal(self, response: http.client.HTTPResponse, method: str,
                 path: str) -> Exception:
        try:
            text = response.read(65536)
            message = json.loads(text)["error"]
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            message = response.reason
        if response.will_close:
            self.close()
        error = f"job manager {self.url} refused {method} {path}: {message}"
        if response.status in (502, 503, 504):
            return JobManagerUnavailable(error)
        return JobManagerRefused(response.status, error)

    def call(self, method: str, path: str, payload: Any = None,
             query: dict[str, Any] | None = None) -> Any:
        """A request whose answer is JSON."""
        response = self.request(method, path, payload, query=query)
        try:
            return json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close()
            raise JobManagerUnavailable(f"job manager {self.url}: broken answer to {method} "
                                        f"{path}: {exc}") from None

    def download(self, path: str) -> Iterator[bytes]:
        """The bytes of a file, in chunks."""
        response = self.request("GET", path)
        try:
            while chunk := response.read(CHUNK):
                yield chunk
            if not response.isclosed() and response.length:
                raise JobManagerUnavailable(f"job manager {self.url}: {path} ended early")
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise JobManagerUnavailable(f"job manager {self.url}: {path} broke off: "
                                        f"{exc}") from None

    def upload(self, path: str, source: Path) -> None:
        """PUT a local file (streamed from disk)."""
        with open(source, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            for attempt in (1, 2):
                file.seek(0)
                connection = self._connection()
                try:
                    connection.putrequest("PUT", API + path)
                    connection.putheader("Authorization", f"Bearer {self.token}")
                    connection.putheader("Content-Length", str(size))
                    connection.endheaders()
                    while chunk := file.read(CHUNK):
                        connection.send(chunk)
                    response = connection.getresponse()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self.close()
                    if attempt == 2:
                        raise JobManagerUnavailable(f"job manager {self.url}: upload of "
                                                    f"{source} failed: {exc}") from None
        if response.status >= 400:
            raise self._refusal(response, "PUT", path)
        response.read()


def quote(path: str) -> str:
    """A relative file path for a URL."""
    return urllib.parse.quote(path, safe="/")
