"""``python -m gridcouple.appkit.server --app package.module:Class``: one Application as a
server, inside any batch job.

It serves the application's methods on a direct, authenticated channel (see
:mod:`gridcouple.appkit.transport`), prints ``{"name", "endpoint", "pid"}`` as one JSON line on
stdout, and, when started by a coupler:

1. registers with the coupler (``$GRIDCOUPLE_COUPLER``) over a connection it dials out and
   keeps open (the *control* connection): its endpoint, host, and the field store it serves.
   The coupler's calls come over connections the server dials out on the coupler's request
   (``dial`` on the control connection), so a server that accepts no inbound connection (a
   partner's workstation behind a firewall) still couples; the coupler pings every
   ``interval`` seconds, the server answers, and a server that hears nothing from its coupler
   for ``silence`` seconds (``$GRIDCOUPLE_HEARTBEAT`` = ``interval,silence``), or sees the
   connection end, terminates the application and exits;
2. then joins the coupler's dask scheduler (``$GRIDCOUPLE_SCHEDULER``) under the job's name,
   in the background, so starting the server does not wait for dask to import. The scheduler
   speaks mutual TLS only; the session's certificate comes in ``$GRIDCOUPLE_SCHEDULER_TLS``.

Its listener serves the application to holders of ``$GRIDCOUPLE_APP_TOKEN`` and its field
store, read-only, to the session's other applications (``$GRIDCOUPLE_FIELD_TOKEN``; see
:mod:`gridcouple.appkit.remote`). The store is ``$GRIDCOUPLE_FIELD_STORE`` when the coupler
names one, else a directory of the server's own in the host's scratch (/dev/shm), removed when
the server ends.

It ends after ``terminate()``, on SIGTERM or SIGINT (the batch system cancelling the job), or
when its coupler disappears. What a peer may make it hold is bounded by
``$GRIDCOUPLE_MAX_FRAME``, ``$GRIDCOUPLE_MAX_PENDING`` and ``$GRIDCOUPLE_HANDSHAKE_TIMEOUT``
(see :class:`~gridcouple.appkit.transport.Limits`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import importlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gridcouple.appkit import application, remote
from gridcouple.appkit.application import Application
from gridcouple.appkit.store import PRODUCER_NAME, FieldStore
from gridcouple.appkit.transport import (
    Channel,
    Limits,
    ObjectServer,
    TransportError,
    connect,
    local_token,
    serve_channel,
    spin_seconds,
    tls_contexts,
)
from gridcouple.jobman.acl import is_loopback_host

log = logging.getLogger("gridcouple.appkit.server")

COUPLER_ENV = "GRIDCOUPLE_COUPLER"
SCHEDULER_ENV = "GRIDCOUPLE_SCHEDULER"
JOB_NAME_ENV = "GRIDCOUPLE_JOB_NAME"
JOB_ID_ENV = "GRIDCOUPLE_JOB_ID"
TLS_ENV = "GRIDCOUPLE_TLS"  # JSON: distributed Security keyword arguments (direct channels)
SCHEDULER_TLS_ENV = "GRIDCOUPLE_SCHEDULER_TLS"  # JSON: Security keyword arguments to join dask
HEARTBEAT_ENV = "GRIDCOUPLE_HEARTBEAT"  # "interval,silence" in seconds
TLS_DIR_ENV = "GRIDCOUPLE_TLS_DIR"  # this host's ca.pem, cert.pem, key.pem (gridcouple certs)
JOIN_HANDLER = "gridcouple_join"
HEARTBEAT_INTERVAL = 1.0  # seconds between the coupler's pings
COUPLER_SILENCE = 20.0  # seconds without a word from the coupler before a server gives up


def load_application_class(target: str) -> type[Application]:
    """The class named by ``package.module:Class``; a clear error for anything else."""
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"--app {target!r}: use package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--app {target!r}: cannot import {module_name}: {exc}") from exc
    cls = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)  # type: ignore[assignment]
        if cls is None:
            raise ValueError(f"--app {target!r}: {module_name} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, Application)):
        raise ValueError(f"--app {target!r}: {class_name} is not a gridcouple Application")
    return cls


def join_proof(token: str, name: str, endpoint: str) -> str:
    """What a server shows the scheduler to prove it knows its application secret."""
    return hmac.new(token.encode(), f"join:{name}:{endpoint}".encode(),
                    hashlib.sha256).hexdigest()


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gridcouple.appkit.server",
                                     description="Run one gridcouple Application as a server.")
    parser.add_argument("--app", required=True, help="package.module:Class")
    parser.add_argument("--name", default=None,
                        help="the application's name (default: $GRIDCOUPLE_JOB_NAME)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=0, help="port to listen on (0: any)")
    parser.add_argument("--coupler", default=os.environ.get(COUPLER_ENV),
                        help="the coupler's registration endpoint HOST:PORT")
    parser.add_argument("--scheduler", default=os.environ.get(SCHEDULER_ENV),
                        help="the coupler's dask scheduler address")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the server until the application is terminated; returns the exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s app-server[%(process)d] %(message)s")
    args = _parse_args(argv)
    try:
        cls = load_application_class(args.app)
        token = local_token()
        limits = Limits.from_env()
        spin_seconds()  # a bad $GRIDCOUPLE_SPIN_US ends the start, not every connection
        tls = _tls_from_env()
        if tls is None and not is_loopback_host(args.host):
            raise ValueError(f"--host {args.host}: listening beyond loopback needs mutual TLS "
                             f"(${TLS_ENV}, which a coupler with TLS files passes)")
    except (ValueError, TransportError) as exc:
        print(f"gridcouple app server: error: {exc}", file=sys.stderr)
        return 2
    name = args.name or os.environ.get(JOB_NAME_ENV) or cls.__name__
    application.store_producer = name if PRODUCER_NAME.fullmatch(name) else ""
    app = cls()
    store, scratch = _open_store(app, name)
    fields_token = os.environ.get(remote.FIELD_TOKEN_ENV, "")
    service = remote.StoreService(store) if store is not None else None
    remote.serve_store(service)
    server = ObjectServer(app, token, host=args.host, port=args.port,
                          tls=tls[0] if tls else None, limits=limits,
                          fields=(fields_token, service) if fields_token and service else None)
    server.start()
    stop = server.stopped
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps({"name": name, "endpoint": server.endpoint, "pid": os.getpid()}),
          flush=True)
    if args.coupler:
        try:
            control = Control(args.coupler, token, name, server, service,
                              tls[1] if tls else None)
            control.register(store)
        except (OSError, TransportError, ValueError) as exc:
            print(f"gridcouple app server: error: cannot register with the coupler at "
                  f"{args.coupler}: {exc}", file=sys.stderr)
            _remove_scratch(scratch)
            return 3
        if fields_token:
            link = remote.CouplerLink(args.coupler, name, token, fields_token,
                                      tls[1] if tls else None)
            remote.install(remote.SessionReader(link.lookup, link.open_source, me=name,
                                                own_store=store))
    if args.scheduler:
        threading.Thread(target=_join_scheduler, name="dask-join", daemon=True,
                         args=(args.scheduler, token, name, server.endpoint)).start()
    stop.wait()
    if server.stopped_by is None:
        with contextlib.suppress(Exception):
            app.terminate()
    _remove_scratch(scratch)
    served = remote.served_counts()
    if served["requests"]:
        log.info("%s: served %d field reads to other applications (%d chunks, %d bytes)",
                 name, served["requests"], served["chunk_requests"], served["bytes"])
    log.info("%s: stopped", name)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # threads blocked in calls or in dask must not hold the exit


def _open_store(app: Application, name: str) -> tuple[FieldStore | None, str | None]:
    """The application's field store, made now (if its ``__init__`` did not) so the coupler
    learns where it is: the one the coupler named, else a new directory in this host's
    scratch (returned second, to be removed at the end)."""
    if not isinstance(app, Application):
        return None, None
    store = app.field_store
    if not store.producer and PRODUCER_NAME.fullmatch(name):
        store.producer = name  # a store the class made itself
    return store, app._field_store_scratch


def _remove_scratch(scratch: str | None) -> None:
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def _tls_from_env() -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """The TLS contexts ``$GRIDCOUPLE_TLS`` describes; ValueError naming it if it cannot.
    When the files it names are not on this host (a partner's machine that does not share
    the coupler's), this host's own: ``ca.pem``, ``cert.pem`` and ``key.pem`` in
    ``$GRIDCOUPLE_TLS_DIR`` (default ``~/.config/gridcouple/tls``), as ``gridcouple certs
    site`` writes them."""
    text = os.environ.get(TLS_ENV, "{}")
    try:
        settings = json.loads(text)
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
        return tls_contexts(_this_hosts_files(settings))
    except (ValueError, KeyError, OSError, ssl.SSLError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"${TLS_ENV}: {detail}") from None


def _this_hosts_files(settings: dict[str, Any]) -> dict[str, Any]:
    files = [v for k, v in settings.items() if k.startswith("tls_") and isinstance(v, str)]
    if not files or all(os.path.isfile(f) for f in files):
        return settings
    directory = Path(os.environ.get(TLS_DIR_ENV) or "~/.config/gridcouple/tls").expanduser()
    own = {"ca": directory / "ca.pem", "cert": directory / "cert.pem",
           "key": directory / "key.pem"}
    missing = [str(path) for path in own.values() if not path.is_file()]
    if missing:
        absent = next(f for f in files if not os.path.isfile(f))
        raise ValueError(f"{absent} is not on this host, nor is {', '.join(missing)} "
                         f"(${TLS_DIR_ENV}; make them with 'gridcouple certs site')")
    return {**settings, "tls_ca_file": str(own["ca"]),
            "tls_scheduler_cert": str(own["cert"]), "tls_scheduler_key": str(own["key"]),
            "tls_client_cert": str(own["cert"]), "tls_client_key": str(own["key"])}


def _heartbeat() -> tuple[float, float]:
    text = os.environ.get(HEARTBEAT_ENV, "")
    try:
        interval, silence = (float(x) for x in text.split(","))
        if 0 < interval < silence:
            return interval, silence
    except ValueError:
        pass
    return HEARTBEAT_INTERVAL, COUPLER_SILENCE


class Control:
    """The server's control connection to its coupler: registration, the coupler's pings
    (answered), its requests to dial a connection back (for calls, or for reading the
    field store), and the end of the server when the coupler goes away or falls silent."""

    def __init__(self, coupler: str, token: str, name: str, server: ObjectServer,
                 service: remote.StoreService | None, tls: ssl.SSLContext | None) -> None:
        self.coupler, self.token, self.name = coupler, token, name
        self.server, self.service, self.tls = server, service, tls
        self.stop = server.stopped
        self.interval, self.silence = _heartbeat()
        self.channel: Channel | None = None
        self._send_lock = threading.Lock()

    def register(self, store: FieldStore | None) -> None:
        """Register (raises if the coupler refuses), then watch the connection."""
        channel = self.channel = connect(self.coupler, self.token, name=self.name,
                                         tls=self.tls)
        channel.send({"op": "register", "endpoint": self.server.endpoint, "pid": os.getpid(),
                      "host": socket.gethostname(), "job_id": os.environ.get(JOB_ID_ENV),
                      "store": store.url if store is not None else "",
                      "store_id": store.store_id if store is not None else ""})
        reply = channel.receive()
        if reply != "ok":
            raise TransportError(f"the coupler answered {str(reply)[:200]}")
        threading.Thread(target=self._watch, name="coupler-watch", daemon=True).start()

    def _watch(self) -> None:
        channel = self.channel
        assert channel is not None
        why = "the coupler went away"
        poller = select.poll()
        poller.register(channel.sock, select.POLLIN)
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                if not channel.has_buffered() and not poller.poll(1000 * min(
                        self.interval, max(0.0, last + self.silence - time.monotonic()))):
                    if time.monotonic() - last >= self.silence:
                        why = (f"the coupler at {self.coupler} sent nothing for "
                               f"{self.silence:g} s")
                        break
                    continue
                message = channel.receive()
                last = time.monotonic()
                self._handle(message)
        except (OSError, TransportError, ValueError) as exc:
            why = f"the coupler went away ({exc})"
        if not self.stop.is_set():
            log.warning("%s: %s; terminating", self.name, why)
            self.stop.set()
        channel.close()

    def _handle(self, message: Any) -> None:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "ping":
            with self._send_lock:
                assert self.channel is not None
                self.channel.send({"op": "pong"})
        elif op == "dial" and isinstance(message.get("ticket"), str) \
                and message.get("role") in ("app", "fields"):
            threading.Thread(target=self._dial, args=(message["ticket"], message["role"]),
                             name=f"dial-{message['role']}", daemon=True).start()
        else:
            log.warning("%s: ignored a control message from the coupler: %s", self.name,
                        str(message)[:200])

    def _dial(self, ticket: str, role: str) -> None:
        """Dial the coupler back and serve the application (``app``) or the field store
        (``fields``) over that connection."""
        try:
            channel = connect(self.coupler, self.token, name=self.name, tls=self.tls)
            channel.send({"op": "attach", "ticket": ticket})
        except (OSError, TransportError) as exc:
            log.warning("%s: could not dial the coupler back at %s: %s", self.name,
                        self.coupler, exc)
            return
        peer = f"the coupler at {self.coupler}"
        if role == "app":
            self.server.serve(channel, peer)
        elif self.service is not None:
            serve_channel(channel, self.service, peer)
        else:
            channel.close()


def _join_scheduler(address: str, token: str, name: str, endpoint: str) -> None:
    """Appear in the dask scheduler under ``name``; the comm stays open while we live."""
    with contextlib.suppress(AttributeError, OSError):  # Linux: threads have own priorities
        # Importing dask takes a CPU-second: let starting applications and calls go first.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
    try:
        asyncio.run(_join(address, token, name, endpoint))
    except Exception as exc:
        log.warning("%s: could not join the dask scheduler at %s: %s", name, address, exc)


async def _join(address: str, token: str, name: str, endpoint: str) -> None:
    from distributed.comm import CommClosedError
    from distributed.comm import connect as dask_connect
    from distributed.security import Security

    security = Security(**json.loads(os.environ.get(SCHEDULER_TLS_ENV, "{}")))
    comm = await dask_connect(address, **security.get_connection_args("client"))
    message: dict[str, Any] = {"op": JOIN_HANDLER, "name": name, "endpoint": endpoint,
                               "pid": os.getpid(), "host": socket.gethostname(),
                               "proof": join_proof(token, name, endpoint), "reply": False}
    await comm.write(message)
    import zarr  # noqa: F401  (now, not in the first get_field(mode="ref"))

    with contextlib.suppress(CommClosedError):
        await comm.read()  # returns when the scheduler closes the comm


if __name__ == "__main__":
    sys.exit(main())
