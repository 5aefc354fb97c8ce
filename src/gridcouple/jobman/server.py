"""``gridcouple jobman serve``: the job manager's HTTPS+JSON server, on tornado.

Every request passes the same gate before anything else happens (:meth:`Handler.prepare`):
the CIDR ACL on the client's address, then a bearer token (or, for a browser, HTTP Basic with
the token as password), then the size of its body. A refusal is one JSON object
``{"error": "..."}`` with a 4xx status, is logged with the client's address, and runs nothing.
Bodies are streamed and counted, so an oversized one is refused from its headers; idle and slow
connections are closed after ``idle_timeout``; beyond ``max_connections`` new connections get a
503 and are closed. The core (:mod:`gridcouple.jobman.manager`) runs in one worker thread, so a
slow disk or journal never stalls the connections.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import signal
import ssl
import sys
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.httputil import responses
from tornado.iostream import IOStream, StreamClosedError
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from gridcouple.backends.local.backend import process_start
from gridcouple.config import Config
from gridcouple.errors import ConfigError
from gridcouple.jobman import files
from gridcouple.jobman.acl import Acl
from gridcouple.jobman.manager import JobManager, Refused, open_queue
from gridcouple.jobman.page import render_page
from gridcouple.jobman.settings import JobManagerSection
from gridcouple.jobman.tokens import TokenStore

log = logging.getLogger("gridcouple.jobman")
T = TypeVar("T")
CHUNK = 256 * 1024
API = "/api/v1"
REALM = "gridcouple job manager"
UNCOUNTED = 2**62
BODY_TIMEOUT = 600.0  # seconds a request body may take (a large upload on a slow link)


class RefusalLog:
    """Logs refusals with the client's address: per address, at most ``burst`` lines per
    ``window`` seconds, then one line counting those not shown (a flood must not fill the
    disk, nor hide another address's refusals)."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self.window_start = 0.0
        self.counts: dict[str, int] = {}

    def __call__(self, address: str, status: int, what: str) -> None:
        now = time.monotonic()
        if now - self.window_start > self.window:
            self.flush()
            self.window_start = now
        count = self.counts[address] = self.counts.get(address, 0) + 1
        if count <= self.burst:
            log.warning("refused %s: %d %s", address, status, what)

    def flush(self) -> None:
        """Log the counts of the refusals not shown."""
        for address, count in self.counts.items():
            if count > self.burst:
                log.warning("refused %s %d more times in %.0f s (not shown)", address,
                            count - self.burst, self.window)
        self.counts = {}


class Service:
    """What every handler shares: the settings, the core, the gate and the worker thread."""

    def __init__(self, settings: JobManagerSection, work_root: Path, token_file: Path) -> None:
        self.settings = settings
        self.acl = Acl.parse(settings.acl)
        self.tokens = TokenStore(token_file)
        self.manager = JobManager(settings, work_root)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="jobman-core")
        self.refused = RefusalLog()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run a core method in the worker thread (one at a time)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)


@stream_request_body
class Handler(RequestHandler):
    """The gate (ACL, token, body size) and JSON answers; every endpoint derives from it."""

    service: Service
    user = ""
    page = False  # a browser page: a 401 asks for Basic credentials

    def initialize(self, service: Service) -> None:
        self.service = service
        self.body_parts: list[bytes] = []
        self.received = 0
        self.body_refused = False  # answered while the body came: the method does not run
        headers = self.request.headers
        self.body_complete = (headers.get("Content-Length", "0") == "0"
                              and "Transfer-Encoding" not in headers)

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version for strangers

    def body_limit(self) -> int:
        """The largest body this endpoint takes."""
        return self.service.settings.max_body

    async def prepare(self) -> None:
        address = self.request.remote_ip or "?"
        allowed, why = self.service.acl.check(address)
        if not allowed:
            raise Refused(403, f"address {address} is not allowed here ({why})")
        user = self._authenticate()
        if user is None:
            raise Refused(401, "a valid bearer token is required (Authorization: Bearer "
                          "TOKEN); this one is missing, unknown or revoked")
        self.user = user
        self.service.manager.seen(user, address)
        limit = self.body_limit()
        length = self.request.headers.get("Content-Length")
        if length is not None and not (length.isascii() and length.isdigit()):
            raise Refused(400, f"Content-Length {length[:40]!r} is not a number of bytes")
        if length is not None and int(length) > limit:
            raise Refused(413, f"the request body ({length} bytes) is larger than the "
                          f"{limit} bytes this endpoint takes")
        if isinstance(self.request.connection, HTTP1Connection):
            # data_received counts the body (chunked too) and answers 413 itself; tornado's
            # own check would answer a bare 400 to a chunk declared beyond the limit.
            self.request.connection.set_max_body_size(UNCOUNTED)

    def _authenticate(self) -> str | None:
        scheme, _, credentials = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return self.service.tokens.verify(credentials.strip())
        if scheme.lower() == "basic":  # a browser: user name and the token as password
            try:
                text = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            name, _, token = text.partition(":")
            user = self.service.tokens.verify(token)
            return user if user is not None and user == name else None
        return None

    def data_received(self, chunk: bytes) -> None:
        if self.body_refused:
            return
        self.received += len(chunk)
        if self.received > self.body_limit():
            self.body_refused = True
            self.refuse(Refused(413, f"the request body is larger than the {self.body_limit()}"
                                " bytes this endpoint takes"))
            return
        self.take(chunk)

    def take(self, chunk: bytes) -> None:
        """Keep a piece of the body (an upload writes it to its file instead)."""
        self.body_parts.append(chunk)

    def whole_body(self) -> bool:
        """Whether the body came whole (not refused on its way); a method reading the body
        calls it first."""
        self.body_complete = not self.body_refused
        return self.body_complete

    def json_body(self) -> Any:
        """The request body as JSON, or a 400 saying why not."""
        try:
            return json.loads(b"".join(self.body_parts) or b"null")
        except (ValueError, RecursionError) as exc:
            raise Refused(400, f"the request body is not JSON: {exc}") from None

    def answer(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(value))

    def refuse(self, refusal: Refused) -> None:
        """Answer a refusal now (while a body comes) and log it."""
        self.log_exception(Refused, refusal, None)
        self.send_error(refusal.status, exc_info=(Refused, refusal, None))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """Refusals go to the refusal log with the client's address; the rest as tornado
        logs them."""
        status = (value.status if isinstance(value, Refused) else value.status_code
                  if isinstance(value, HTTPError) else 500)
        if status >= 500:
            super().log_exception(typ, value, tb)
            return
        user = f" ({self.user})" if self.user else ""
        self.service.refused(self.request.remote_ip or "?", status,
                             f"{self.request.method} {self.request.path[:200]}{user}: "
                             f"{_message(value, status)}")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every refusal is one JSON object: ``{"error": "what was wrong"}``."""
        value = kwargs["exc_info"][1] if "exc_info" in kwargs else None
        if isinstance(value, Refused):
            status_code = value.status
            self.set_status(status_code)
        if not self.body_complete:  # the rest of the body is not read: the connection ends
            self.set_header("Connection", "close")
        if status_code == 401:
            scheme = "Basic" if self.page else "Bearer"
            self.set_header("WWW-Authenticate", f'{scheme} realm="{REALM}"')
        message = ("internal error (logged by the job manager)" if status_code >= 500
                   else _message(value, status_code))
        self.answer({"error": message}, status_code)

    def job_id(self, text: str) -> int:
        if not (text.isascii() and text.isdigit() and 0 < len(text) < 19):
            raise Refused(404, f"no job {text[:40]!r}")
        return int(text)

    def int_argument(self, name: str, default: int) -> int:
        text = self.get_query_argument(name, str(default))
        if not (text.isascii() and text.isdigit() and len(text) < 19):
            raise Refused(400, f"{name}: expected a non-negative integer, got {text[:40]!r}")
        return int(text)


class NotFound(Handler):
    """Any path no endpoint has (after the gate: a stranger learns nothing)."""

    async def prepare(self) -> None:
        await super().prepare()
        raise Refused(404, f"no endpoint {self.request.method} {self.request.path[:200]}; "
                      "see docs/jobmanager.md for the API")


class Info(Handler):
    """GET /api/v1/info: what a client needs to know."""

    async def get(self) -> None:
        self.answer(await self.service.run(self.service.manager.info, self.user))


class Jobs(Handler):
    """GET: the user's jobs; POST: allocate N jobs in one request."""

    async def get(self) -> None:
        live = self.get_query_argument("live", "0") not in ("0", "false", "")
        jobs = await self.service.run(self.service.manager.list_jobs, self.user, live)
        self.answer({"jobs": jobs})

    async def post(self) -> None:
        if not self.whole_body():
            return
        body = self.json_body()
        answer = await self.service.run(self.service.manager.allocate, self.user,
                                        self.request.remote_ip or "?", body)
        self.answer(answer, 200 if answer["repeated"] else 201)


class JobsAction(Handler):
    """POST /api/v1/jobs/ACTION: status, cancel, hold, release or signal N jobs."""

    async def post(self, action: str) -> None:
        if not self.whole_body():
            return
        body = self.json_body()
        if not isinstance(body, dict):
            raise Refused(400, "the request body: expected an object with 'ids'")
        manager = self.service.manager
        if action == "status":
            self.answer({"jobs": await self.service.run(manager.status, self.user,
                                                        body.get("ids"))})
        else:
            self.answer(await self.service.run(manager.act, self.user, action, body.get("ids"),
                                               body.get("signal")))


class Events(Handler):
    """GET /api/v1/events?since=SEQ: the user's job events."""

    async def get(self) -> None:
        since = self.int_argument("since", 0)
        self.answer(await self.service.run(self.service.manager.events, self.user, since))


class RequestJobs(Handler):
    """GET /api/v1/requests/ID: the jobs a request made."""

    async def get(self, request: str) -> None:
        ids = await self.service.run(self.service.manager.request_jobs, self.user, request)
        self.answer({"ids": ids})


class Output(Handler):
    """GET /api/v1/jobs/ID/stdout|stderr?tail=N."""

    async def get(self, job: str, stream: str) -> None:
        lines = self.int_argument("tail", 100)
        text = await self.service.run(self.service.manager.tail, self.user, self.job_id(job),
                                      stream, lines)
        self.answer({"text": text})


class FileList(Handler):
    """GET /api/v1/jobs/ID/files[?path=DIR]: the files of a job's directory."""

    async def get(self, job: str) -> None:
        root = await self.service.run(self.service.manager.job_root, self.user,
                                      self.job_id(job))
        path = self.get_query_argument("path", "")
        self.answer({"files": await self.service.run(_confined, files.listing, root, path)})


def _message(value: BaseException | None, status: int) -> str:
    if isinstance(value, Refused):
        return str(value)
    if isinstance(value, HTTPError) and value.log_message:
        return value.get_message() or responses.get(status, "refused")
    return responses.get(status, "refused")


def _confined(operation: Callable[..., T], *args: Any) -> T:
    """A file operation, its refusals as Refused."""
    try:
        return operation(*args)
    except files.PathRefused as exc:
        raise Refused(400, str(exc)) from None
    except files.FileMissing as exc:
        raise Refused(404, str(exc)) from None
    except IsADirectoryError:
        raise Refused(400, "that is a directory") from None
    except OSError as exc:  # the job changed its files meanwhile, or the disk is full
        status = 507 if exc.errno == errno.ENOSPC else 409
        raise Refused(status, f"cannot: {exc.strerror or exc}") from None


class FileTransfer(Handler):
    """GET, PUT and DELETE of one file in a job's working directory (or, for PUT, in an
    upload); a PUT streams into a hidden file renamed into place once complete."""

    writer: files.Writer | None = None
    upload: Any = None

    def body_limit(self) -> int:
        if self.request.method == "PUT":
            return self.service.settings.max_upload
        return super().body_limit()

    async def root(self, where: str, kind: str) -> Path:
        manager = self.service.manager
        if kind == "uploads":
            self.upload = await self.service.run(manager.upload, self.user, where)
            return Path(self.upload.root)
        return await self.service.run(manager.job_root, self.user, self.job_id(where))

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "PUT":
            return
        kind, where, path = self.path_args
        root = await self.root(where, kind)
        length = int(self.request.headers.get("Content-Length") or 0)
        if self.upload is not None:
            room = self.service.settings.max_upload - self.upload.size
            if length > room:
                raise Refused(413, f"this upload has room for {room} more bytes (max_upload "
                              f"{self.service.settings.max_upload} in all)")
        self.writer = await self.service.run(_confined, files.Writer, root, path)

    def take(self, chunk: bytes) -> None:
        if self.writer is not None:
            self.writer.write(chunk)

    def on_finish(self) -> None:
        if self.writer is not None:  # a refused or broken upload leaves nothing behind
            self.writer.discard()
            self.writer = None

    def on_connection_close(self) -> None:
        self.on_finish()

    async def put(self, kind: str, where: str, path: str) -> None:
        writer, self.writer = self.writer, None
        if not self.whole_body() or writer is None:
            return
        await self.service.run(_confined, writer.commit)
        if self.upload is not None:
            self.upload.size += writer.size
        self.answer({"path": path, "size": writer.size}, 201)

    async def get(self, kind: str, where: str, path: str) -> None:
        if kind == "uploads":
            raise Refused(405, "uploads take PUT only")
        root = await self.root(where, kind)
        fd, size = await self.service.run(_confined, files.open_for_reading, root, path)
        with os.fdopen(fd, "rb") as source:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(size))
            left = size
            while left > 0:
                chunk = source.read(min(CHUNK, left))
                if not chunk:  # the file shrank meanwhile: end the connection, not the truth
                    if isinstance(self.request.connection, HTTP1Connection):
                        self.request.connection.close()
                    return
                left -= len(chunk)
                self.write(chunk)
                with contextlib.suppress(StreamClosedError):
                    await self.flush()
        self.finish()

    async def delete(self, kind: str, where: str, path: str) -> None:
        if kind == "uploads":
            raise Refused(405, "remove a whole upload with DELETE /api/v1/uploads/ID")
        root = await self.root(where, kind)
        await self.service.run(_confined, files.remove, root, path)
        self.answer({"removed": path})


class Uploads(Handler):
    """POST /api/v1/uploads: a place for stage-in files."""

    async def post(self) -> None:
        upload = await self.service.run(self.service.manager.new_upload, self.user)
        self.answer({"upload": upload}, 201)


class UploadDelete(Handler):
    """DELETE /api/v1/uploads/ID."""

    async def delete(self, upload: str) -> None:
        await self.service.run(self.service.manager.remove_upload, self.user, upload)
        self.answer({"removed": upload})


class Overview(Handler):
    """GET /api/v1/status: what the status monitor shows."""

    async def get(self) -> None:
        self.answer(await self.service.run(self.service.manager.overview))


class Page(Handler):
    """The read-only status page, for a browser (Basic authentication with the token)."""

    page = True

    async def get(self) -> None:
        overview = await self.service.run(self.service.manager.overview)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        self.set_header("X-Frame-Options", "DENY")
        self.finish(render_page(overview, self.user))


def make_application(service: Service) -> Application:
    """The routes (docs/jobmanager.md has the API reference)."""
    args = {"service": service}
    routes = [
        (rf"{API}/info", Info), (rf"{API}/jobs", Jobs),
        (rf"{API}/jobs/(status|cancel|hold|release|signal)", JobsAction),
        (rf"{API}/jobs/([^/]+)/(stdout|stderr)", Output),
        (rf"{API}/jobs/([^/]+)/files", FileList),
        (rf"{API}/(jobs|uploads)/([^/]+)/files/(.+)", FileTransfer),
        (rf"{API}/uploads", Uploads), (rf"{API}/uploads/([^/]+)", UploadDelete),
        (rf"{API}/requests/([^/]+)", RequestJobs), (rf"{API}/events", Events),
        (rf"{API}/status", Overview), (r"/status", Page), (r"/", Page),
    ]
    return Application([(path, handler, args) for path, handler in routes],
                       default_handler_class=NotFound, default_handler_args=args,
                       compress_response=False, serve_traceback=False,
                       log_function=_access_log)


def _access_log(handler: RequestHandler) -> None:
    """Answered requests at DEBUG (refusals have their own log, errors tornado's)."""
    if handler.get_status() < 400:
        log.debug("%d %s %s (%s) %.1f ms", handler.get_status(), handler.request.method,
                  handler.request.path, handler.request.remote_ip,
                  1000 * handler.request.request_time())


class Server(HTTPServer):
    """tornado's HTTP server with a bound on open connections."""

    def initialize(self, *args: Any, max_connections: int = 256,  # type: ignore[override]
                   refused: RefusalLog | None = None, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections
        self.refused = refused or RefusalLog()
        self.streams: weakref.WeakSet[IOStream] = weakref.WeakSet()

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        open_now = [s for s in self.streams if not s.closed()]
        if len(open_now) >= self.max_connections:
            self.refused(str(address[0]) if address else "?", 503,
                         f"{len(open_now)} connections are open (max_connections)")
            body = json.dumps({"error": f"the job manager has {len(open_now)} connections "
                               "open, its limit; try again shortly"}).encode()
            future = stream.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                  b"application/json\r\nConnection: close\r\nContent-Length: "
                                  + str(len(body)).encode() + b"\r\n\r\n" + body)
            future.add_done_callback(lambda _: stream.close())
            return
        self.streams.add(stream)
        super().handle_stream(stream, address)


def settings_and_paths(config: Config) -> tuple[JobManagerSection, Path, Path]:
    """The [jobmanager] section, its work root and its token file."""
    settings: JobManagerSection = config.section("jobmanager")
    work_root = settings.work_root or config.state_dir / "jobman"
    return settings, work_root, settings.token_file or work_root / "tokens.json"


def serve(config: Config, announce: Callable[[dict[str, Any]], None]) -> int:
    """Run the job manager until SIGTERM or SIGINT; ``announce`` gets its URL and pid once
    it listens. Running jobs go on when it stops."""
    settings, work_root, token_file = settings_and_paths(config)
    where = config.where(("jobmanager",), is_table=True)
    work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(work_root / "jobman.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{where}: another job manager serves {work_root}") from None
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{config.where(('jobmanager', 'tls_cert'))}: cannot load "
                              f"{settings.tls_cert} / {settings.tls_key}: {exc}") from None
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < settings.max_connections + 64:
        log.warning("max_connections %d is close to the open-file limit %d",
                    settings.max_connections, hard)
    service = Service(settings, work_root, token_file)
    service.manager.start()
    pidfile = work_root / "jobman.pid"
    pidfile.write_text(json.dumps({"pid": os.getpid(), "start": process_start(os.getpid())}))
    try:
        return asyncio.run(_serve(service, tls, announce))
    finally:
        pidfile.unlink(missing_ok=True)


def stop(config: Config, *, cancel_jobs: bool = False, timeout: float = 30.0) -> str:
    """Stop the job manager serving this configuration's work root (SIGTERM, then SIGKILL
    after ``timeout``); with ``cancel_jobs``, also cancel its jobs and stop its queue. Returns
    what was done, for people."""
    settings, work_root, _ = settings_and_paths(config)
    done = []
    try:
        recorded = json.loads((work_root / "jobman.pid").read_text())
        pid, start = int(recorded["pid"]), recorded["start"]
    except (OSError, ValueError, KeyError, TypeError):
        pid, start = 0, None
    if pid and process_start(pid) == start:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process_start(pid) == start and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_start(pid) == start:
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed the job manager (pid {pid}) after {timeout:g} s")
        else:
            done.append(f"stopped the job manager (pid {pid})")
    else:
        done.append(f"no job manager was running on {work_root}")
    if cancel_jobs and (work_root / "queue").is_dir():
        queue = open_queue(settings, work_root)
        live = [r.job for r in queue.journal.records("jobman", active_only=True)]
        if live:
            queue.cancel(live)
            queue.wait(live, timeout=queue.end_grace)
            done.append(f"canceled {len(live)} jobs")
        queue.stop_daemon()
        queue.close()
    return "; ".join(done)


async def _serve(service: Service, tls: ssl.SSLContext | None,
                 announce: Callable[[dict[str, Any]], None]) -> int:
    settings = service.settings
    server = Server(make_application(service), ssl_options=tls, xheaders=False,
                    max_body_size=max(settings.max_body, settings.max_upload),
                    idle_connection_timeout=settings.idle_timeout,
                    body_timeout=BODY_TIMEOUT,
                    max_connections=settings.max_connections, refused=service.refused)
    try:
        sockets = server_sockets(settings.host, settings.port)
    except OSError as exc:
        raise ConfigError(f"[jobmanager] cannot listen on {settings.host}:{settings.port}: "
                          f"{exc.strerror or exc}") from None
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"{settings.url_scheme}://{host}:{port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("serving %s: max_jobs %d, work root %s", url, settings.max_jobs,
             service.manager.work_root)
    announce({"url": url, "pid": os.getpid(), "work_root": str(service.manager.work_root)})
    await stop.wait()
    service.refused.flush()
    log.info("stopping; running jobs go on")
    server.stop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), 5)
    service.worker.submit(service.manager.close).result()
    service.worker.shutdown()
    return 0


def server_sockets(host: str, port: int) -> list[Any]:
    """The listening socket(s) (tornado's bind_sockets: IPv4 and IPv6 as the host says)."""
    from tornado.netutil import bind_sockets

    return bind_sockets(port, address=host, backlog=1024)


def main_announce(info: dict[str, Any]) -> None:
    """Print the URL and pid as one JSON line on stdout (scripts and tests read it)."""
    print(json.dumps(info), flush=True)
    sys.stdout.flush()
