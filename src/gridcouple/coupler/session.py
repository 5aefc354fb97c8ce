"""The coupler: starts a dask scheduler, allocates application servers as batch jobs through
the configured backend, hands back proxies, and tears everything down.

::

    with Coupler.from_config("gridcouple.toml") as c:
        heat = c.allocate("mypkg.heat:Heat", name="heat", resources=Resources(cpus=1))
        heat.solve_step(TimeStep(0.1, 0.1, 1))

Each application may run on a backend of its own (``AppRequest(..., backend="partner_a")``, a
``[backend.partner_a]`` table): one scenario can put one code on Slurm and another on a
partner's machine; each backend gets one submission per ``allocate_many``.

How an application server reaches us: the backend starts ``python -m gridcouple.appkit.server``
(with the backend's ``python``) with a per-application secret in its environment. The server
dials the coupler's registry and registers (its endpoint, host and field store) on a
connection that stays open for its life (the control connection); then it joins the dask
scheduler under the job's name in the background. Every connection between the coupler and a
server is dialled by the server: for calls, and for reading its field store, the coupler asks
it over the control connection to dial back. So a server on a host that accepts no inbound
connection couples as well as any; only the coupler's registry must be reachable. Method calls
go over these direct channels, not through dask (see docs/coupler.md for why and the figures).

The registry also answers the servers' questions about each other (``lookup``: where an
application runs, the store it serves) and relays field reads to a producer that readers cannot
reach directly (see :mod:`gridcouple.appkit.remote`).

Failure is never a hang: a call waiting on a server that died raises
:class:`ApplicationFailedError` naming the application, the job, its native state and the last
lines of its stderr. The coupler pings every server each second over its control connection;
one that has not answered for ``heartbeat_timeout`` seconds (its host vanished, its network
cut) is reported as :class:`ApplicationUnreachableError`. A server that hears nothing from the
coupler for ``coupler_silence`` seconds ends itself. Leaving the ``with`` block terminates the
applications and ends every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import select
import shutil
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gridcouple.appkit import remote
from gridcouple.appkit.server import (
    COUPLER_SILENCE,
    HEARTBEAT_ENV,
    HEARTBEAT_INTERVAL,
    JOIN_HANDLER,
    SCHEDULER_TLS_ENV,
    TLS_ENV,
    join_proof,
)
from gridcouple.appkit.store import new_scratch_root
from gridcouple.appkit.transport import (
    TOKEN_ENV,
    ApplicationProxy,
    Channel,
    ConnectionLostError,
    TransportError,
    WarningThrottle,
    accept_connections,
    accept_handshake,
    accept_tls,
    app_token,
    format_endpoint,
    tls_contexts,
)
from gridcouple.backends import backend_class, open_backend
from gridcouple.backends.base import Backend
from gridcouple.backends.shared_fs import shares_file_system
from gridcouple.config import Config, CouplerSection, load_config
from gridcouple.errors import ConfigError, GridcoupleError
from gridcouple.jobman.acl import is_loopback_host
from gridcouple.jobs import Job, JobSpec, JobStatus, Resources
from gridcouple.tls_scheduler import (
    client_kwargs,
    configured_tls,
    session_security,
    start_tls_scheduler,
)

log = logging.getLogger(__name__)

STDERR_TAIL = 20
FAILURE_REPORT_WAIT = 3.0  # seconds to wait for the backend to see a lost server end
STATUS_INTERVAL = 1.0  # least seconds between backend queries while a call waits
TERMINATE_WAIT = 5.0
HEARTBEAT_TIMEOUT = 5.0  # seconds without a pong before a server counts as unreachable
DIAL_BACK_TIMEOUT = 10.0  # seconds a server has to dial back when asked
DASK_LOGGERS = ("distributed",)  # quiet below WARNING unless the coupler is verbose
_MISSING_MODULE = re.compile(r"No module named '([^']+)'")


class ApplicationError(GridcoupleError):
    """An application server could not be started or failed."""


class ApplicationStartError(ApplicationError):
    """An application server's job ended, or did not join in time, before it was usable."""


class ApplicationFailedError(ApplicationError):
    """An application server went away while in use."""


class ApplicationUnreachableError(ApplicationFailedError):
    """An application server stopped answering the coupler's heartbeat: its host vanished or
    the network to it was cut (no connection was closed)."""


@dataclass(frozen=True)
class AppRequest:
    """One application server to allocate: ``app`` is ``package.module:Class``; ``backend``
    names the backend that runs it (a ``[backend.NAME]`` table; None: the configured one)."""

    app: str
    name: str | None = None
    resources: Resources = field(default_factory=Resources)
    environment: Mapping[str, str] = field(default_factory=dict)
    backend: str | None = None


@dataclass
class _Member:
    """What the coupler knows of one application server."""

    name: str
    app: str
    token: str
    backend: Backend
    job: Job | None = None
    endpoint: str | None = None
    joined: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    proxy: ApplicationProxy | None = None
    last_status_check: float = 0.0
    host: str = ""
    pid: int | None = None
    store: str = ""
    store_id: str = ""
    control: Channel | None = None  # the connection the server registered on
    outbox: deque[dict[str, Any]] = field(default_factory=deque)  # for the control connection
    wake: int = -1  # written to wake the control connection's thread
    wake_lock: threading.Lock = field(default_factory=threading.Lock)
    last_seen: float = 0.0  # time.monotonic() of its last word on the control connection
    lost: str = ""  # why it is gone, once it is
    unreachable: bool = False  # gone silently (no heartbeat), not by a closed connection

    def info(self) -> remote.MemberInfo:
        return remote.MemberInfo(self.name, self.host, self.endpoint or "", self.store,
                                 self.store_id, self.gone.is_set())


@dataclass
class _Ticket:
    """A connection the coupler asked a server to dial back, until it arrives."""

    name: str
    arrived: threading.Event = field(default_factory=threading.Event)
    channel: Channel | None = None


class Coupler:
    """A coupling session; use it as a context manager (see the module docstring)."""

    def __init__(self, config: Config, backend: Backend | None = None, *,
                 verbose: bool = False) -> None:
        """``backend``: one already open (it stays open) to use as the default; by default the
        configured one. Backends are opened when first used and closed on exit. The dask
        scheduler's INFO lines are shown only when ``verbose``."""
        self.config = config
        self.verbose = verbose
        self._logger_levels: dict[str, int] = {}
        self.settings: CouplerSection = config.section("coupler")
        self._default_backend = backend.name if backend else config.backend
        self._backends: dict[str, Backend] = {}
        self._own_backends: set[str] = set()
        if backend is not None:
            _refuse_simulated(backend.name, type(backend))
            self._backends[backend.name] = backend
        self._secret = secrets.token_hex(32)
        self._members: dict[str, _Member] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduler: Any = None
        self._registry: socket.socket | None = None
        self._registry_channels: list[Channel] = []
        self._refusals = WarningThrottle()  # a flood of bad registrations logs a few lines
        self._scheduler_members: dict[str, dict[str, Any]] = {}
        self._scheduler_client_kwargs: dict[str, Any] = {}
        self._store_roots: dict[str, str | None] = {}  # field store root by backend name
        self._own_stores: list[str] = []
        self._tickets: dict[str, _Ticket] = {}
        self._relays: list[socket.socket] = []
        self._closing = threading.Event()
        self.heartbeat_interval = HEARTBEAT_INTERVAL  # seconds between pings to each server
        self.heartbeat_timeout = HEARTBEAT_TIMEOUT  # silence after which a server is lost
        self.coupler_silence = COUPLER_SILENCE  # silence after which a server ends itself
        self._reader = remote.SessionReader(self._member_info, self._open_fields)
        self.security_kwargs = self._security_kwargs()
        self._tls = tls_contexts(self.security_kwargs)  # the direct channels' (server, client)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None, *,
                    backend: str | None = None, verbose: bool = False) -> Coupler:
        """A coupler for the configuration at ``path`` (see :func:`load_config` for the search
        order); ``backend`` overrides the configured backend's name."""
        config = load_config(path)
        return cls(dataclasses.replace(config, backend=backend) if backend else config,
                   verbose=verbose)

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Coupler:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Open the default backend, the registry and the dask scheduler."""
        self.backend_for(None)
        self._closing.clear()
        self._start_registry()
        self._start_scheduler()
        remote.install(self._reader)

    @property
    def backend(self) -> Backend:
        """The default backend."""
        return self.backend_for(None)

    def backend_for(self, name: str | None) -> Backend:
        """The backend called ``name`` (None: the default), opened on first use. A simulated
        backend is refused: it cannot host application servers."""
        name = name or self._default_backend
        if name not in self._backends:
            _refuse_simulated(name, backend_class(name, self.config))
            self._backends[name] = open_backend(self.config, name)
            self._own_backends.add(name)
        return self._backends[name]

    @property
    def scheduler_address(self) -> str:
        """The dask scheduler's address (``tls://127.0.0.1:PORT`` by default)."""
        if self._scheduler is None:
            raise ApplicationError("the coupler is not started; use it in a with block")
        return self._scheduler.address

    @property
    def scheduler_security(self) -> Any:
        """The distributed ``Security`` a dask client needs to reach the scheduler (mutual TLS
        with the session's certificate): ``Client(c.scheduler_address, security=...)``."""
        from distributed.security import Security

        if self._scheduler is None:
            raise ApplicationError("the coupler is not started; use it in a with block")
        return Security(**self._scheduler_client_kwargs)

    @property
    def registry_endpoint(self) -> str:
        assert self._registry is not None
        host, port = self._registry.getsockname()[:2]
        return format_endpoint(host, port)

    def scheduler_members(self) -> dict[str, dict[str, Any]]:
        """The application servers that joined the dask scheduler, by job name."""
        return dict(self._scheduler_members)

    def close(self) -> None:
        """Terminate every application, end every job, stop the scheduler. Safe to repeat."""
        members = list(self._members.values())
        self._closing.set()
        remote.uninstall(self._reader)
        self._terminate_applications(members)
        by_backend: dict[str, list[Job]] = defaultdict(list)
        for member in members:
            if member.job is not None:
                by_backend[member.backend.name].append(member.job)
        for name, jobs in by_backend.items():
            self._end_jobs(self._backends[name], jobs)
        for member in members:
            if member.proxy is not None:
                member.proxy.close()
        self._members.clear()
        self._stop_registry()
        for sock in self._relays:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._relays.clear()
        self._stop_scheduler()
        for root in self._own_stores:
            shutil.rmtree(root, ignore_errors=True)
        self._own_stores.clear()
        self._store_roots.clear()
        for name in self._own_backends:
            self._backends.pop(name).close()
        self._own_backends.clear()

    # --- allocating ----------------------------------------------------------------------

    def allocate(self, app: str | AppRequest, *, name: str | None = None,
                 resources: Resources | None = None,
                 environment: Mapping[str, str] | None = None,
                 backend: str | None = None) -> ApplicationProxy:
        """Start one application server as a job; returns its proxy once it has joined.

        ``app``: ``"package.module:Class"`` (an :class:`~gridcouple.appkit.application.
        Application` subclass the server imports), or a whole :class:`AppRequest` (then give
        no other keyword). ``name``: the application's name in this session (unique; default
        the class name in lower case, then ``-2``, ``-3`` ...). ``resources``: what its job
        asks for (default ``Resources()``: one processor). ``environment``: variables added to
        its job's environment (a ``PYTHONPATH`` given here comes before the one the coupler
        passes). ``backend``: the name of the backend (a ``[backend.NAME]`` table) that runs
        it; default the configured one.

        Raises :class:`ApplicationStartError` when the job ends before the server joins, or
        after ``[coupler] join_timeout`` seconds.
        """
        if isinstance(app, AppRequest):
            given = [key for key, value in (("name", name), ("resources", resources),
                                            ("environment", environment),
                                            ("backend", backend)) if value is not None]
            if given:
                raise ApplicationError(f"allocate(AppRequest(...)) takes no other keyword; "
                                       f"put {', '.join(given)} in the AppRequest")
            return self.allocate_many([app])[0]
        if not isinstance(app, str):
            raise ApplicationError(f"allocate: app must be 'package.module:Class' or an "
                                   f"AppRequest, not {type(app).__name__}")
        request = AppRequest(app, name, resources or Resources(), environment or {}, backend)
        return self.allocate_many([request])[0]

    def allocate_many(self, requests: Sequence[AppRequest]) -> list[ApplicationProxy]:
        """Start several application servers with ONE submission per backend; wait until all
        have joined or one of their jobs ended (then raise :class:`ApplicationStartError`)."""
        members = [self._new_member(r, self.backend_for(r.backend)) for r in requests]
        by_backend: dict[str, list[int]] = defaultdict(list)
        for index, member in enumerate(members):
            by_backend[member.backend.name].append(index)
        for name, indices in by_backend.items():
            backend = self._backends[name]
            specs = [self._job_spec(members[i], requests[i]) for i in indices]
            for index, job in zip(indices, backend.submit(specs), strict=True):
                members[index].job = job
        self._wait_joined(members)
        for member in members:
            try:
                channel = self._dial_back(member, "app")
            except TransportError as exc:
                why = f"registered but did not dial back for calls ({exc})"
                raise ApplicationStartError(self._describe(member, None, why)) from None
            member.proxy = ApplicationProxy(
                member.endpoint or "", member.token, name=member.name,
                on_lost=functools.partial(self._failure, member),
                # A call waits in recv, no polling: when the server goes, its control
                # connection's thread interrupts the proxy. With a call_timeout the wait is
                # polled anyway, and the backend's state checked too.
                check_alive=functools.partial(self._check_alive, member)
                if self.settings.call_timeout else None,
                call_timeout=self.settings.call_timeout or None,
                channel=channel)
        return [m.proxy for m in members if m.proxy is not None]

    def where(self, name: str) -> remote.MemberInfo:
        """Where the application ``name`` runs: its host, endpoint and the field store it
        serves (URL and identity)."""
        member = self._members.get(name)
        if member is None or not member.joined.is_set():
            raise ApplicationError(f"no application named {name!r} has joined this session")
        return member.info()

    def _new_member(self, request: AppRequest, backend: Backend) -> _Member:
        if not isinstance(request, AppRequest) or not isinstance(request.app, str):
            raise ApplicationError(f"allocate_many takes AppRequest('package.module:Class', "
                                   f"...) items, not {request!r}")
        module, _, cls = request.app.partition(":")
        if not module or not cls:
            raise ApplicationError(f"application {request.app!r}: use package.module:Class")
        base = request.name or cls.split(".")[-1].lower()
        if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", base):
            raise ApplicationError(f"application name {base!r}: use 1-64 letters, digits, "
                                   "'_', '.', '+' or '-'")
        with self._lock:
            name = base
            if request.name and name in self._members:
                raise ApplicationError(f"an application named {name!r} is already allocated")
            number = 1
            while name in self._members:
                number += 1
                name = f"{base}-{number}"
            member = _Member(name=name, app=request.app, token=app_token(self._secret, name),
                             backend=backend)
            self._members[name] = member
        return member

    def _job_spec(self, member: _Member, request: AppRequest) -> JobSpec:
        host = "127.0.0.1" if is_loopback_host(self.settings.host) else "0.0.0.0"
        root = self._field_store_root(member.backend)
        environment = {
            TOKEN_ENV: member.token,
            remote.FIELD_TOKEN_ENV: remote.field_token(self._secret),
            HEARTBEAT_ENV: f"{self.heartbeat_interval:g},{self.coupler_silence:g}",
            "GRIDCOUPLE_COUPLER": self.registry_endpoint,
            "GRIDCOUPLE_SCHEDULER": self.scheduler_address,
            **({"GRIDCOUPLE_FIELD_STORE": f"{root}/{member.name}"} if root else {}),
            SCHEDULER_TLS_ENV: json.dumps(self._scheduler_client_kwargs),
            **({TLS_ENV: json.dumps(self.security_kwargs)} if self.security_kwargs else {}),
            **({} if self.verbose else {"DASK_LOGGING__DISTRIBUTED": "warning"}),
            **request.environment,
        }
        directory = None
        if shares_file_system(member.backend):
            # Like sbatch: the server runs where the coupler runs, and imports what it can.
            directory = os.getcwd()
            path = [*_split_path(request.environment.get("PYTHONPATH", "")),
                    *user_import_path()]
            environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        return JobSpec(argv=(member.backend.python, "-m", "gridcouple.appkit.server",
                             "--app", request.app, "--name", member.name, "--host", host),
                       name=member.name, environment=environment, resources=request.resources,
                       directory=directory)

    def _wait_joined(self, members: Sequence[_Member]) -> None:
        deadline = time.monotonic() + self.settings.join_timeout
        interval = 0.01
        most = max(m.backend.backoff.most for m in members)
        while True:
            waiting = [m for m in members if not m.joined.is_set()]
            if not waiting:
                return
            statuses = self._statuses(waiting)
            for member, status in zip(waiting, statuses, strict=True):
                if status.state.is_final and not member.joined.is_set():
                    raise ApplicationStartError(self._describe(
                        member, status, "ended before it joined the coupler")
                        + self._import_hint(member))
            if time.monotonic() > deadline:
                member = waiting[0]
                raise ApplicationStartError(self._describe(
                    member, statuses[0], f"did not join within {self.settings.join_timeout:g} s "
                    f"([coupler] join_timeout in {self.config.path or 'the defaults'})"))
            waiting[0].joined.wait(interval)
            interval = min(interval * 1.5, most)

    @staticmethod
    def _statuses(members: Sequence[_Member]) -> list[JobStatus]:
        """The members' job statuses, with one status call per backend."""
        by_backend: dict[str, list[int]] = defaultdict(list)
        for index, member in enumerate(members):
            by_backend[member.backend.name].append(index)
        statuses: dict[int, JobStatus] = {}
        for indices in by_backend.values():
            backend = members[indices[0]].backend
            jobs = [members[i].job for i in indices]
            statuses.update(zip(indices, backend.status([j for j in jobs if j is not None]),
                                strict=True))
        return [statuses[i] for i in range(len(members))]

    # --- failures ------------------------------------------------------------------------

    def _check_alive(self, member: _Member) -> None:
        """Called while a call waits: raise when the server is known to be gone."""
        if member.gone.is_set():
            raise self._failure(member, TransportError(
                member.lost or "its registration connection closed"))
        now = time.monotonic()
        interval = max(STATUS_INTERVAL, member.backend.backoff.most)
        if member.job is not None and now - member.last_status_check >= interval:
            member.last_status_check = now
            status = member.backend.status([member.job])[0]
            if status.state.is_final:
                raise self._failure(member, TransportError("its job ended"))

    def _failure(self, member: _Member, cause: Exception) -> ApplicationFailedError:
        """The error for a server that went away: waits briefly for the backend to see the
        job end, so the message carries its final state and stderr."""
        status = None
        if member.job is not None:
            # An unreachable server's job looks alive to its batch system for minutes.
            deadline = time.monotonic() + (0.0 if member.unreachable else FAILURE_REPORT_WAIT)
            while True:
                try:
                    status = member.backend.status([member.job])[0]
                except GridcoupleError as exc:
                    log.warning("%s: no job status: %s", member.name, exc)
                    break
                if status.state.is_final or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        if member.unreachable:
            where = f" on {member.host}" if member.host else ""
            return ApplicationUnreachableError(self._describe(
                member, status, f"unreachable{where} ({member.lost})"))
        return ApplicationFailedError(self._describe(member, status, f"failed ({cause})"))

    def _describe(self, member: _Member, status: JobStatus | None, what: str) -> str:
        text = f"application {member.name} ({member.app})"
        if member.job is not None:
            text += f", job {member.job}"
        text += f", {what}"
        if status is not None:
            # A backend without native words of its own (local) reports ours as its native.
            text += (f"; job state {status.describe()}, native state "
                     f"{status.native_state or status.state}")
        if member.job is not None:
            tail = member.backend.stderr_tail(member.job, STDERR_TAIL).rstrip()
            text += ("; last lines of its stderr:\n" + tail) if tail else "; its stderr is empty"
        return text

    def _import_hint(self, member: _Member) -> str:
        """What to set when the server could not import the application's module."""
        if member.job is None:
            return ""
        found = _MISSING_MODULE.search(member.backend.stderr_tail(member.job, STDERR_TAIL))
        if not found:
            return ""
        module, backend = found.group(1), member.backend
        if shares_file_system(backend):
            passed = member.job.spec.environment.get("PYTHONPATH", "")
            return (f"\nThe server ran in {member.job.spec.directory} with PYTHONPATH={passed}; "
                    f"none of these holds {module!r}. Pass the directory that holds it: "
                    f"allocate(..., environment={{'PYTHONPATH': 'DIR'}}), or install it for "
                    f"{backend.python}.")
        return (f"\nThe {backend.name} backend's jobs do not see this machine's files, so the "
                f"coupler passes no import path. Install {module!r} for {backend.python} on "
                f"its hosts, or pass where it is there: allocate(..., environment="
                f"{{'PYTHONPATH': 'DIR'}}) (or AppRequest(..., environment=...)).")

    # --- ending ----------------------------------------------------------------------------

    def _terminate_applications(self, members: Sequence[_Member]) -> None:
        live = [m for m in members if m.proxy is not None and not m.gone.is_set()]
        threads = []
        for member in live:
            thread = threading.Thread(target=_quietly_terminate, args=(member,), daemon=True)
            thread.start()
            threads.append(thread)
        deadline = time.monotonic() + TERMINATE_WAIT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _end_jobs(backend: Backend, jobs: Sequence[Job]) -> None:
        """Wait briefly for servers to exit on their own, then cancel what still runs."""
        deadline = time.monotonic() + 2.0
        statuses = backend.status(jobs)
        while not all(s.state.is_final for s in statuses) and time.monotonic() < deadline:
            time.sleep(0.05)
            statuses = backend.status(jobs)
        running = [j for j, s in zip(jobs, statuses, strict=True) if not s.state.is_final]
        if not running:
            return
        backend.cancel(running)
        for _event in backend.events(running, timeout=backend.end_grace):
            pass
        left = [j for j, s in zip(running, backend.status(running), strict=True)
                if not s.state.is_final]
        if left:
            log.warning("jobs still not ended after cancel: %s", ", ".join(map(str, left)))

    # --- the registry: where servers tell us their endpoint -------------------------------

    def _start_registry(self) -> None:
        """Listen for servers: on ``[coupler] port`` + 1 when the scheduler's port is set (so
        a firewall in front of the coupler opens two known ports), else on any free port."""
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        port = self.settings.port + 1 if 0 < self.settings.port < 65535 else 0
        self._registry = socket.create_server((host, port), family=family, backlog=1024)
        threading.Thread(target=self._accept_registrations, name="registry",
                         daemon=True).start()

    def _stop_registry(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None
        for channel in self._registry_channels:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)
            channel.close()
        self._registry_channels.clear()

    def _accept_registrations(self) -> None:
        if self._registry is not None:  # survives EMFILE & co; bounds unauthenticated peers
            accept_connections(self._registry, self._registration, name="registry")

    def _registration(self, sock: socket.socket) -> None:
        """One connection a server dialled: a registration (its control connection), a
        connection it dialled back (``attach``), a question about another application
        (``lookup``) or a field read to relay (``relay``)."""
        try:
            sock = accept_tls(sock, self._tls[0] if self._tls else None)
            channel = Channel(sock)
            name = accept_handshake(channel, self._token_of)
            message = channel.receive()
            op = message.get("op", "register") if isinstance(message, dict) else None
            if op == "register" and not isinstance(message.get("endpoint"), str):
                raise TransportError(f"{name}: a registration must name its endpoint, got "
                                     f"{type(message).__name__}")
            if op not in ("register", "attach", "lookup", "relay"):
                raise TransportError(f"{name}: not a request of the registry: "
                                     f"{str(message)[:100]}")
        except (OSError, TransportError, ValueError) as exc:
            self._refusals.warn("refused an application server registration: %s", exc)
            sock.close()
            return
        member = self._members.get(name)
        if member is None:
            channel.close()
            return
        try:
            if op == "register":
                self._register(member, channel, message)
            elif op == "attach":
                self._attach(member, channel, message)
            elif op == "lookup":
                with channel.sock:
                    found = self._member_info(str(message.get("name")))
                    channel.send(found.to_wire() if found is not None else None)
            else:
                self._relay(member, channel, message)
        except (OSError, TransportError) as exc:
            log.warning("registry: %s (%s): %s", name, op, exc)
            channel.close()

    def _register(self, member: _Member, channel: Channel, info: dict[str, Any]) -> None:
        """Keep the control connection: note the server's pongs until it closes."""
        if member.control is not None:
            raise TransportError(f"{member.name} is registered already")
        member.endpoint = info["endpoint"]
        member.host = str(info.get("host") or "")
        member.pid = info.get("pid") if isinstance(info.get("pid"), int) else None
        member.store = str(info.get("store") or "")
        member.store_id = str(info.get("store_id") or "")
        member.last_seen = time.monotonic()
        channel.send("ok")
        self._registry_channels.append(channel)
        wake, member.wake = os.pipe()
        member.control = channel
        member.joined.set()
        try:
            self._control(member, channel, wake)
        except ConnectionLostError:
            pass
        except (OSError, TransportError, ValueError) as exc:
            member.lost = member.lost or f"its control connection failed: {exc}"
        finally:
            with member.wake_lock:
                os.close(wake)
                os.close(member.wake)
                member.wake = -1
            with contextlib.suppress(OSError):  # so a server that comes back ends itself
                socket.socket.shutdown(channel.sock, socket.SHUT_RDWR)
        member.lost = member.lost or "its control connection closed"
        member.gone.set()
        if member.proxy is not None:
            member.proxy.interrupt()  # a call waiting on it ends now, with the story
        self._reader.forget(member.name)

    def _control(self, member: _Member, channel: Channel, wake: int) -> None:
        """The control connection, in this one thread (a TLS connection must not be read and
        written by two threads at once): a ping every ``heartbeat_interval``, the pongs, the
        messages others queued (``member.outbox``, woken through ``wake``); returns when the
        server's end closes, or marks it unreachable after ``heartbeat_timeout`` of silence."""
        poller = select.poll()
        poller.register(channel.sock, select.POLLIN)
        poller.register(wake, select.POLLIN)
        next_ping = time.monotonic()
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_ping:
                channel.send({"op": "ping"})
                next_ping = now + self.heartbeat_interval
            silent = now - member.last_seen
            if silent > self.heartbeat_timeout:
                member.lost = f"no heartbeat for {silent:.1f} s from {member.host or 'its host'}"
                member.unreachable = True
                return
            ready = [] if not channel.has_buffered() else [(channel.sock.fileno(), 0)]
            ready = ready or poller.poll(1000 * max(0.0, next_ping - now))
            for fd, _ in ready:
                if fd == wake:
                    os.read(wake, 4096)
                else:
                    channel.receive()  # a pong, or EOF (ConnectionLostError)
                    member.last_seen = time.monotonic()
            while member.outbox:
                channel.send(member.outbox.popleft())

    def _tell(self, member: _Member, message: dict[str, Any]) -> None:
        """Send ``message`` on ``member``'s control connection (from its own thread)."""
        member.outbox.append(message)
        with member.wake_lock, contextlib.suppress(OSError):
            if member.wake >= 0:
                os.write(member.wake, b"\0")

    def _attach(self, member: _Member, channel: Channel, message: dict[str, Any]) -> None:
        ticket = self._tickets.pop(str(message.get("ticket")), None)
        if ticket is None or ticket.name != member.name:
            raise TransportError(f"{member.name} dialled back with a ticket it was not given")
        ticket.channel = channel
        ticket.arrived.set()

    def _dial_back(self, member: _Member, role: str,
                   timeout: float = DIAL_BACK_TIMEOUT) -> Channel:
        """A new connection from the server ``member`` that serves ``role`` (``app``: its
        application; ``fields``: its field store), asked for on its control connection."""
        if member.gone.is_set() or member.control is None:
            raise TransportError(f"{member.name} has gone ({member.lost or 'not registered'})")
        name = secrets.token_hex(16)
        ticket = self._tickets[name] = _Ticket(member.name)
        try:
            self._tell(member, {"op": "dial", "ticket": name, "role": role})
            deadline = time.monotonic() + timeout
            while not ticket.arrived.wait(0.05):
                if member.gone.is_set():
                    raise TransportError(f"{member.name} has gone ({member.lost})")
                if time.monotonic() > deadline or self._closing.is_set():
                    raise TransportError(f"{member.name} did not dial back within "
                                         f"{timeout:g} s")
        finally:
            self._tickets.pop(name, None)
        assert ticket.channel is not None
        return ticket.channel

    def _relay(self, member: _Member, channel: Channel, message: dict[str, Any]) -> None:
        """Relay ``member``'s field reads to a producer it cannot reach directly, over a
        connection the producer dials back: bytes both ways until either end closes."""
        producer = self._members.get(str(message.get("name")))
        if producer is None or not producer.joined.is_set():
            channel.send(f"no application {message.get('name')!r} in this session")
            channel.close()
            return
        try:
            back = self._dial_back(producer, "fields")
        except TransportError as exc:
            channel.send(str(exc))
            channel.close()
            return
        channel.send("ok")
        for end in (channel.sock, back.sock):
            end.settimeout(None)  # a reader may be idle between reads
            self._relays.append(end)
        try:
            remote.relay(channel, back)
        finally:
            for end in (channel.sock, back.sock):
                end.close()
                with contextlib.suppress(ValueError):
                    self._relays.remove(end)

    def _member_info(self, name: str) -> remote.MemberInfo | None:
        member = self._members.get(name)
        if member is None or not member.joined.is_set():
            return None
        return member.info()

    def _open_fields(self, info: remote.MemberInfo) -> Channel:
        """A connection to the store service of the application ``info`` names (dialled
        back by its server), for reads of its FieldRefs in this process."""
        member = self._members.get(info.name)
        if member is None:
            raise TransportError(f"no application {info.name!r} in this session")
        return self._dial_back(member, "fields")

    def _token_of(self, name: str) -> str | None:
        member = self._members.get(name)
        return member.token if member else None

    # --- the dask scheduler ------------------------------------------------------------

    def _quiet_dask(self) -> None:
        """Show dask's WARNING and worse only (its INFO lines name a dashboard that is not
        served); the levels come back in :meth:`close`. Nothing changes when verbose."""
        if self.verbose:
            return
        for name in DASK_LOGGERS:
            logger = logging.getLogger(name)
            self._logger_levels.setdefault(name, logger.level)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)

    def _restore_dask_logging(self) -> None:
        for name, level in self._logger_levels.items():
            logging.getLogger(name).setLevel(level)
        self._logger_levels.clear()

    def _start_scheduler(self) -> None:
        import distributed  # noqa: F401  (sets its loggers' levels when imported: first)

        self._quiet_dask()

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="dask-scheduler", daemon=True).start()
        self._loop = loop

        # Mutual TLS always: a dask peer may send pickles. Beyond loopback the configured
        # certificate; on loopback one made for this session (so another local user cannot
        # run code in the coupler through the scheduler).
        security = session_security(self.security_kwargs)
        self._scheduler_client_kwargs = client_kwargs(security)
        # No HTTP routes: the scheduler is our membership list, not a dashboard.
        start = start_tls_scheduler(self.settings.host, self.settings.port, security,
                                    handlers={JOIN_HANDLER: self._scheduler_join})
        self._scheduler = asyncio.run_coroutine_threadsafe(start, loop).result(30)

    async def _scheduler_join(self, comm: Any, name: str, endpoint: str, proof: str,
                              **info: Any) -> Any:
        from distributed.comm import CommClosedError
        from distributed.core import Status

        member = self._members.get(name)
        if member is None or proof != join_proof(member.token, name, endpoint):
            log.warning("refused a scheduler join from %r", name)
            return Status.dont_reply
        self._scheduler_members[name] = {"endpoint": endpoint, **info}
        try:
            while True:
                await comm.read()
        except CommClosedError:
            pass
        self._scheduler_members.pop(name, None)
        return Status.dont_reply

    def _stop_scheduler(self) -> None:
        loop, scheduler = self._loop, self._scheduler
        self._loop = self._scheduler = None
        if loop is None:
            return
        if scheduler is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(scheduler.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._restore_dask_logging()

    # --- settings ----------------------------------------------------------------------

    def _security_kwargs(self) -> dict[str, Any]:
        """distributed Security's keyword arguments: none on loopback without TLS files;
        beyond loopback all three files are required."""
        settings = self.settings
        keys = ("tls_ca_file", "tls_cert", "tls_key")
        given = {k: getattr(settings, k) for k in keys if getattr(settings, k) is not None}
        if not given and is_loopback_host(settings.host):
            return {}
        missing = [k for k in keys if k not in given]
        if missing:
            why = ("TLS needs all three files" if given else
                   f"listening on {settings.host!r} (beyond loopback) needs TLS")
            where = self.config.where(("coupler", next(iter(given), "host")))
            raise ConfigError(f"{where}: {why}; set {', '.join(missing)} in [coupler]")
        for key, path in given.items():
            if not path.is_file():
                raise ConfigError(f"{self.config.where(('coupler', key))}: {path} is not a file")
        return configured_tls(settings)

    def _field_store_root(self, backend: Backend) -> str | None:
        """Where the applications of ``backend`` keep field versions: ``[coupler]
        field_store``, else a directory of this session below the backend's own place for
        them (/dev/shm for the local backend), else (None: the backend's hosts share no such
        place) each server keeps its store in its own host's scratch and serves it."""
        if self.settings.field_store:
            return self.settings.field_store.rstrip("/")
        if backend.name not in self._store_roots:
            base = backend.field_store_base()
            root = None
            if base is not None:
                os.makedirs(base, mode=0o700, exist_ok=True)
                root = new_scratch_root(base)  # also removes those of dead couplers
                self._own_stores.append(root)
            self._store_roots[backend.name] = root
        return self._store_roots[backend.name]


def _refuse_simulated(name: str, cls: type[Backend]) -> None:
    """A simulated backend predicts schedules; it cannot run application servers."""
    if not cls.hosts_applications:
        raise ApplicationError(f"backend {name!r} is simulated ({cls.kind}): it predicts "
                               "schedules and cannot host application servers; choose a "
                               "backend that runs jobs (local, slurm, ...)")


def user_import_path() -> list[str]:
    """The directories of this process's import path that its interpreter does not bring by
    itself: the script's directory, ``$PYTHONPATH`` and what the program added; not the
    standard library, site-packages or what their ``.pth`` files add. An application server
    on a backend that shares this machine's files gets them, so it imports what the coupler
    imports."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               sys.base_exec_prefix)}
    from_pth = _pth_directories()
    found = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if not os.path.isdir(path) or path in from_pth:
            continue
        if any(path == p or path.startswith(p + os.sep) for p in prefixes):
            continue
        if {"site-packages", "dist-packages"} & set(path.split(os.sep)):
            continue
        found.append(path)
    return list(dict.fromkeys(found))


def _pth_directories() -> set[str]:
    """The directories the ``.pth`` files of the site directories put on the path."""
    import site

    directories = set()
    sites = [*site.getsitepackages(), site.getusersitepackages()]
    for base in sites:
        with contextlib.suppress(OSError):
            for name in os.listdir(base):
                if not name.endswith(".pth"):
                    continue
                with contextlib.suppress(OSError, UnicodeDecodeError), \
                        open(os.path.join(base, name), encoding="utf-8") as lines:
                    for line in lines:
                        line = line.strip()
                        if line and not line.startswith(("#", "import ", "import\t")):
                            directories.add(os.path.realpath(os.path.join(base, line)))
    return directories


def _split_path(value: str) -> list[str]:
    return [p for p in value.split(os.pathsep) if p]


def _quietly_terminate(member: _Member) -> None:
    with contextlib.suppress(Exception):
        assert member.proxy is not None
        member.proxy.terminate()


__all__ = ["AppRequest", "ApplicationError", "ApplicationFailedError", "ApplicationStartError",
           "ApplicationUnreachableError", "Coupler"]
