"""``python -m gridcouple.appkit.server --app package.module:Class``: one Application as a
server, inside any batch job.

It serves the application's methods on a direct, authenticated channel (see
:mod:`gridcouple.appkit.transport`), prints ``{"name", "endpoint", "pid"}`` as one JSON line on
stdout, and, when started by a coupler:

1. registers the endpoint with the coupler (``$GRIDCOUPLE_COUPLER``) over a connection that
   stays open: when the coupler goes away, the server terminates the application and exits;
2. then joins the coupler's dask scheduler (``$GRIDCOUPLE_SCHEDULER``) under the job's name,
   in the background, so starting the server does not wait for dask to import. The scheduler
   speaks mutual TLS only; the session's certificate comes in ``$GRIDCOUPLE_SCHEDULER_TLS``.

It ends after ``terminate()``, on SIGTERM or SIGINT (the batch system cancelling the job), or
when its coupler disappears. The secret comes in ``$GRIDCOUPLE_APP_TOKEN``; what a peer may make
it hold in ``$GRIDCOUPLE_MAX_FRAME``, ``$GRIDCOUPLE_MAX_PENDING`` and
``$GRIDCOUPLE_HANDSHAKE_TIMEOUT`` (see :class:`~gridcouple.appkit.transport.Limits`).
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
import signal
import socket
import ssl
import sys
import threading
from typing import Any

from gridcouple.appkit.application import Application
from gridcouple.appkit.transport import (
    Limits,
    ObjectServer,
    TransportError,
    connect,
    local_token,
    tls_contexts,
)

log = logging.getLogger("gridcouple.appkit.server")

COUPLER_ENV = "GRIDCOUPLE_COUPLER"
SCHEDULER_ENV = "GRIDCOUPLE_SCHEDULER"
JOB_NAME_ENV = "GRIDCOUPLE_JOB_NAME"
JOB_ID_ENV = "GRIDCOUPLE_JOB_ID"
TLS_ENV = "GRIDCOUPLE_TLS"  # JSON: distributed Security keyword arguments (direct channels)
SCHEDULER_TLS_ENV = "GRIDCOUPLE_SCHEDULER_TLS"  # JSON: Security keyword arguments to join dask
JOIN_HANDLER = "gridcouple_join"


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
        tls = _tls_from_env()
    except (ValueError, TransportError) as exc:
        print(f"gridcouple app server: error: {exc}", file=sys.stderr)
        return 2
    name = args.name or os.environ.get(JOB_NAME_ENV) or cls.__name__
    app = cls()
    server = ObjectServer(app, token, host=args.host, port=args.port,
                          tls=tls[0] if tls else None, limits=limits)
    server.start()
    stop = server.stopped
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps({"name": name, "endpoint": server.endpoint, "pid": os.getpid()}),
          flush=True)
    if args.coupler:
        try:
            _register(args.coupler, token, name, server.endpoint, stop,
                      tls[1] if tls else None)
        except (OSError, TransportError) as exc:
            print(f"gridcouple app server: error: cannot register with the coupler at "
                  f"{args.coupler}: {exc}", file=sys.stderr)
            return 3
    if args.scheduler:
        threading.Thread(target=_join_scheduler, name="dask-join", daemon=True,
                         args=(args.scheduler, token, name, server.endpoint)).start()
    stop.wait()
    if server.stopped_by is None:
        with contextlib.suppress(Exception):
            app.terminate()
    log.info("%s: stopped", name)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # threads blocked in calls or in dask must not hold the exit


def _tls_from_env() -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """The TLS contexts ``$GRIDCOUPLE_TLS`` describes; ValueError naming it if it cannot."""
    text = os.environ.get(TLS_ENV, "{}")
    try:
        settings = json.loads(text)
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
        return tls_contexts(settings)
    except (ValueError, KeyError, OSError, ssl.SSLError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"${TLS_ENV}: {detail}") from None


def _register(coupler: str, token: str, name: str, endpoint: str,
              stop: threading.Event, tls: ssl.SSLContext | None) -> None:
    """Tell the coupler where we listen; stop when that connection ends."""
    channel = connect(coupler, token, name=name, tls=tls)
    channel.send({"endpoint": endpoint, "pid": os.getpid(), "host": socket.gethostname(),
                  "job_id": os.environ.get(JOB_ID_ENV)})
    channel.receive()

    def watch() -> None:
        with contextlib.suppress(OSError, TransportError):
            channel.receive()
        if not stop.is_set():
            log.warning("%s: the coupler went away; terminating", name)
            stop.set()

    threading.Thread(target=watch, name="coupler-watch", daemon=True).start()


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
