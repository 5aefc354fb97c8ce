"""``[jobmanager]``: the job manager server's configuration (docs/jobmanager.md).

Validated by :mod:`gridcouple.config` like every section, so a bad value names its file, line
and key. Kept free of heavy imports: every ``load_config`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gridcouple.errors import OptionError
from gridcouple.jobman.acl import Acl, is_loopback_host


@dataclass(frozen=True)
class JobManagerSection:
    """``[jobmanager]``: where the server listens, what it runs and for whom."""

    host: str = "127.0.0.1"  # beyond loopback, tls_cert and tls_key are required
    port: int = 8750  # 0: any free port (the server prints the one it got)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    work_root: Path | None = None  # queue, job directories, uploads; None: state_dir/jobman
    token_file: Path | None = None  # hashed bearer tokens; None: work_root/tokens.json
    max_jobs: int = 4  # jobs running at once, never more
    over_limit: Literal["queue", "refuse"] = "queue"  # what happens to jobs beyond max_jobs
    max_queued: int = 1000  # with "queue": jobs that may wait; more are refused
    policy: str = "fcfs"  # the queue's scheduling policy (as [backend.local] policy)
    grace_period: float = 5.0  # seconds between SIGTERM and SIGKILL on cancel and walltime
    acl: list[str] = field(default_factory=lambda: ["allow 127.0.0.0/8", "allow ::1/128"])
    apps: list[str] = field(default_factory=list)  # application classes (fnmatch patterns)
    commands: list[str] = field(default_factory=list)  # executables a job may start
    # names of environment variables clients may set (fnmatch patterns); DASK_LOGGING__* only
    # sets log levels (other DASK_* variables could make a server import a module)
    environment: list[str] = field(default_factory=lambda: ["GRIDCOUPLE_*", "DASK_LOGGING__*"])
    python: str = ""  # the interpreter application servers run with; "": the server's
    max_body: int = 1 << 20  # bytes of a JSON request body
    max_upload: int = 256 << 20  # bytes of one uploaded file
    max_connections: int = 256  # open connections; more are answered 503 and closed
    idle_timeout: float = 20.0  # seconds a connection may take to send a request's headers

    def __post_init__(self) -> None:
        positive = ("max_jobs", "max_upload", "max_connections")
        for key in positive:
            if getattr(self, key) < 1:
                raise OptionError(key, f"must be at least 1, got {getattr(self, key)}")
        if self.max_queued < 0:
            raise OptionError("max_queued", f"must not be negative, got {self.max_queued}")
        if self.max_body < 1024:
            raise OptionError("max_body", f"must be at least 1024 bytes, got {self.max_body}")
        for key in ("grace_period", "idle_timeout"):
            if not getattr(self, key) > 0:
                raise OptionError(key, f"must be positive, got {getattr(self, key)}")
        if not 0 <= self.port <= 65535:
            raise OptionError("port", f"must be 0-65535, got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (("tls_cert", "tls_key") if self.tls_key is None
                              else ("tls_key", "tls_cert"))
            raise OptionError(given, f"TLS needs both tls_cert and tls_key; set {missing} too")
        if self.tls_cert is None and not is_loopback_host(self.host):
            raise OptionError("host", f"listening on {self.host!r} (beyond loopback) needs TLS: "
                              "set tls_cert and tls_key")
        try:
            Acl.parse(self.acl)
        except ValueError as exc:
            raise OptionError("acl", str(exc)) from None
        from gridcouple.scheduler.policies import check_policy

        check_policy(self.policy)

    @property
    def url_scheme(self) -> str:
        """``https`` with TLS files, else ``http`` (loopback only)."""
        return "http" if self.tls_cert is None else "https"
