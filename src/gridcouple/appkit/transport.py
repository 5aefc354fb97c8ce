"""The direct channel between a caller and an application server.

One TCP connection per proxy, authenticated both ways with an HMAC challenge over a shared
secret before anything is decoded; then request/reply frames of one msgpack header plus raw
buffers (see :mod:`gridcouple.appkit.wire`). A frame is::

    u32 header length | u16 buffer count | u64 length of each buffer | header | buffers

Buffers are sent with one gathering ``sendmsg`` and received straight into their final numpy
memory, so a field crosses the channel with no copy in Python on either side. Beyond loopback
the coupler configures TLS (the same certificates as its dask scheduler): both ends then
present a certificate signed by the configured CA (see :func:`tls_contexts`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import select
import socket
import ssl
import struct
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gridcouple.appkit.wire import decode, encode
from gridcouple.errors import GridcoupleError

log = logging.getLogger(__name__)

TOKEN_ENV = "GRIDCOUPLE_APP_TOKEN"
_MAGIC = b"GRIDCOUPLE-APP/1\n"
_NONCE = 32
_PREFIX = struct.Struct("<IH")
_HANDSHAKE_TIMEOUT = 10.0
_SMALL = 1 << 16


class TransportError(GridcoupleError):
    """The channel to an application server failed."""


class AuthenticationError(TransportError):
    """The peer does not know the session's secret."""


class ConnectionLostError(TransportError):
    """The peer closed the connection or vanished."""


class CallTimeoutError(TransportError):
    """A call did not return within the proxy's ``call_timeout``; the proxy is closed."""


class RemoteError(GridcoupleError):
    """The application raised an exception; ``remote_type`` and ``remote_traceback`` tell what."""

    def __init__(self, message: str, remote_type: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


def app_token(session_secret: str, name: str) -> str:
    """The secret of one application: derived from the session's, so a leaked job
    environment exposes one application, not the session."""
    return hmac.new(session_secret.encode(), name.encode(), hashlib.sha256).hexdigest()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a tuple; a clear error otherwise."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def format_endpoint(host: str, port: int) -> str:
    """``host:port`` for peers to connect to; a wildcard address becomes this host's name."""
    host = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- frames ---------------------------------------------------------------------------------

def frame(value: Any) -> list[bytes | memoryview]:
    """The parts of one frame carrying ``value``; raises TypeError (before anything is sent)
    for a value the wire cannot carry."""
    header, buffers = encode(value)
    prefix = _PREFIX.pack(len(header), len(buffers))
    if buffers:
        prefix += struct.pack(f"<{len(buffers)}Q", *(b.nbytes for b in buffers))
    return [prefix + header, *buffers]


class Channel:
    """Frames over one connected socket. Not thread-safe: one request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray(_SMALL)
        self._start = self._end = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, value: Any) -> None:
        """Send one value as a frame."""
        self.send_parts(frame(value))

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send byte strings in order with as few system calls as the kernel allows."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        if isinstance(self.sock, ssl.SSLSocket):  # TLS has no gathering send
            for view in views:
                self.sock.sendall(view)
            return
        while views:
            sent = self.sock.sendmsg(views[:512])
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def receive(self) -> Any:
        """Receive one frame and decode it; arrays land in freshly allocated numpy memory."""
        header_length, count = _PREFIX.unpack(self._take(_PREFIX.size))
        lengths = struct.unpack(f"<{count}Q", self._take(8 * count)) if count else ()
        header = self._take(header_length)
        buffers = []
        for length in lengths:
            target = np.empty(length, dtype=np.uint8)
            self.receive_into(memoryview(target))
            buffers.append(target)
        return decode(header, buffers)

    def receive_into(self, target: memoryview) -> None:
        """Fill ``target`` from the stream: first what is buffered, then straight from the
        socket."""
        done = min(self._end - self._start, target.nbytes)
        target[:done] = self._buffer[self._start: self._start + done]
        self._start += done
        while done < target.nbytes:
            got = self.sock.recv_into(target[done:])
            if not got:
                raise ConnectionLostError("the peer closed the connection")
            done += got

    def has_buffered(self) -> bool:
        return self._end > self._start

    def _take(self, size: int) -> bytes:
        if self._end - self._start < size:
            if size > len(self._buffer):
                self._buffer.extend(bytes(size - len(self._buffer)))
            if self._start:
                remaining = self._end - self._start
                self._buffer[:remaining] = self._buffer[self._start: self._end]
                self._start, self._end = 0, remaining
            view = memoryview(self._buffer)
            while self._end < size:
                got = self.sock.recv_into(view[self._end:])
                if not got:
                    raise ConnectionLostError("the peer closed the connection")
                self._end += got
        data = bytes(self._buffer[self._start: self._start + size])
        self._start += size
        return data


# --- the handshake ----------------------------------------------------------------------

def _digest(token: str, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), role + nonce, hashlib.sha256).digest()


def accept_handshake(channel: Channel, token_for: Callable[[str], str | None]) -> str:
    """The listening side: challenge the peer, check its answer with the secret
    ``token_for(its name)``, answer its challenge; returns the peer's name."""
    sock = channel.sock
    sock.settimeout(_HANDSHAKE_TIMEOUT)
    nonce = secrets.token_bytes(_NONCE)
    sock.sendall(_MAGIC + nonce)
    name = channel._take(channel._take(1)[0]).decode("utf-8", "replace")
    reply = channel._take(2 * _NONCE)
    token = token_for(name)
    if token is None or not hmac.compare_digest(reply[:_NONCE],
                                                _digest(token, b"client", nonce)):
        raise AuthenticationError(f"the peer {name!r} failed the challenge (wrong secret)")
    sock.sendall(_digest(token, b"server", reply[_NONCE:]))
    sock.settimeout(None)
    return name


def accept_tls(sock: socket.socket, tls: ssl.SSLContext | None) -> socket.socket:
    """The accepted socket, wrapped in TLS when ``tls`` is given (failures are OSErrors)."""
    if tls is None:
        return sock
    sock.settimeout(_HANDSHAKE_TIMEOUT)
    return tls.wrap_socket(sock, server_side=True)


def connect_handshake(channel: Channel, token: str, name: str = "") -> None:
    """The connecting side, introducing itself as ``name``: answer the challenge, then check
    the listener's answer."""
    sock = channel.sock
    sock.settimeout(_HANDSHAKE_TIMEOUT)
    greeting = channel._take(len(_MAGIC) + _NONCE)
    if not greeting.startswith(_MAGIC):
        raise TransportError("the peer is not a gridcouple application server")
    nonce = secrets.token_bytes(_NONCE)
    identity = name.encode()[:255]
    sock.sendall(bytes([len(identity)]) + identity
                 + _digest(token, b"client", greeting[len(_MAGIC):]) + nonce)
    try:
        answer = channel._take(_NONCE)
    except ConnectionLostError:
        raise AuthenticationError("the server refused us (wrong secret?)") from None
    if not hmac.compare_digest(answer, _digest(token, b"server", nonce)):
        raise AuthenticationError("the server failed the challenge (wrong secret)")
    sock.settimeout(None)


def tls_contexts(settings: Mapping[str, Any]) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """(server, client) TLS contexts from distributed Security's keyword arguments
    (``tls_ca_file``, ``tls_scheduler_cert``/``_key`` to listen, ``tls_client_cert``/``_key``
    to connect); None when they name no CA. Both sides must show a certificate the CA signed;
    host names are not checked (jobs land on nodes the certificate cannot know)."""
    if not settings.get("tls_ca_file"):
        return None
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings["tls_ca_file"])
    server.load_cert_chain(settings["tls_scheduler_cert"], settings["tls_scheduler_key"])
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings["tls_ca_file"])
    client.check_hostname = False
    client.load_cert_chain(settings["tls_client_cert"], settings["tls_client_key"])
    return server, client


def connect(endpoint: str, token: str, name: str = "", timeout: float = 10.0,
            tls: ssl.SSLContext | None = None) -> Channel:
    """An authenticated channel to ``endpoint``, introducing ourselves as ``name``."""
    sock = socket.create_connection(parse_endpoint(endpoint), timeout=timeout)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise TransportError(f"TLS with {endpoint} failed: {exc}") from exc
    channel = Channel(sock)
    try:
        connect_handshake(channel, token, name)
    except (OSError, TransportError) as exc:
        channel.close()
        if isinstance(exc, TransportError):
            raise
        raise TransportError(f"handshake with {endpoint} failed: {exc}") from exc
    return channel


# --- serving ------------------------------------------------------------------------------

class ObjectServer:
    """Serves the public methods of ``target`` to authenticated peers, one thread per
    connection. ``stopped`` is set after a call named in ``stop_after`` returns."""

    def __init__(self, target: Any, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 stop_after: Sequence[str] = ("terminate",),
                 tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.token = token
        self.tls = tls
        self.stop_after = set(stop_after)
        self.stopped = threading.Event()
        self.stopped_by: str | None = None  # the call that stopped the server, if one did
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, port), family=family, backlog=64)
        self.host = host
        self.port = self.listener.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)

    def start(self) -> None:
        """Accept connections in a background thread."""
        threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="call", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock = accept_tls(sock, self.tls)
            channel = Channel(sock)
            accept_handshake(channel, lambda _name: self.token)
        except (OSError, TransportError) as exc:
            log.warning("refused a connection: %s", exc)
            sock.close()
            return
        with channel.sock:
            while True:
                try:
                    method, args, kwargs = channel.receive()
                except (OSError, TransportError, ValueError) as exc:
                    if not isinstance(exc, ConnectionLostError):
                        log.warning("closing a connection: %s", exc)
                    return
                reply = self._call(method, args, kwargs)
                try:
                    parts = frame(reply)
                except TypeError as exc:  # a result the wire cannot carry
                    parts = frame(_error_reply(TypeError(f"the result of {method} cannot be "
                                                         f"sent: {exc}")))
                channel.send_parts(parts)
                if method in self.stop_after:
                    self.stopped_by = method
                    self.stopped.set()

    def _call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
        try:
            if not isinstance(method, str) or method.startswith("_"):
                raise AttributeError(f"{method!r} is not a public method")
            function = getattr(self.target, method)
            if not callable(function):
                raise AttributeError(f"{method!r} is not a method")
            return [0, function(*args, **kwargs)]
        except Exception as exc:
            return _error_reply(exc)


def _error_reply(exc: Exception) -> list[Any]:
    return [1, {"type": type(exc).__name__, "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc))}]


# --- calling --------------------------------------------------------------------------------

class ApplicationProxy:
    """Calls an application server's methods: ``proxy.solve_step(ts)`` runs remotely.

    ``on_lost`` turns a lost connection into the error to raise (the coupler names the job,
    its state and its stderr there); ``check_alive`` is called every ``poll_interval`` seconds
    while a call waits and may raise to end the wait. ``call_timeout`` (seconds, None for no
    limit) bounds how long a call may wait for a server that is alive but does not answer.
    """

    def __init__(self, endpoint: str, token: str, *, name: str = "application",
                 on_lost: Callable[[Exception], Exception] | None = None,
                 check_alive: Callable[[], None] | None = None,
                 poll_interval: float = 0.5, tls: ssl.SSLContext | None = None,
                 call_timeout: float | None = None) -> None:
        self._endpoint = endpoint
        self.call_timeout = call_timeout
        self._name = name
        self._on_lost = on_lost
        self._check_alive = check_alive
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._lost: Exception | None = None
        self._channel: Channel | None = None
        try:
            self._channel = connect(endpoint, token, tls=tls)
        except AuthenticationError:
            raise
        except (OSError, TransportError) as exc:
            raise self._lose(exc) from exc

    @property
    def name(self) -> str:
        return self._name

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def __repr__(self) -> str:
        return f"<ApplicationProxy {self._name} at {self._endpoint}>"

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(method, *args, **kwargs)

        call.__name__ = method
        return call

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method(*args, **kwargs)`` on the application and return its result."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            channel = self._channel
            assert channel is not None
            request = frame([method, list(args), kwargs])  # TypeError here leaves us usable
            try:
                channel.send_parts(request)
                self._await_reply(channel, method)
                status, value = channel.receive()
            except (OSError, ConnectionLostError) as exc:
                raise self._lose(exc) from exc
            except BaseException as exc:  # check_alive's verdict, or an interrupt mid-call:
                channel.close()  # the reply may still come, so the channel is out of step
                self._channel = None
                self._lost = exc if isinstance(exc, Exception) else TransportError(
                    f"a call to {self._name} was interrupted; the proxy is closed")
                raise
        if status:
            raise RemoteError(f"{self._name}.{method}: {value['type']}: {value['message']}",
                              value["type"], value["traceback"])
        return value

    def close(self) -> None:
        """Close the connection (the application goes on running)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._lost = self._lost or TransportError(f"the proxy of {self._name} is closed")

    def _await_reply(self, channel: Channel, method: str) -> None:
        if channel.has_buffered() or (self._check_alive is None and self.call_timeout is None):
            return
        deadline = None if self.call_timeout is None else time.monotonic() + self.call_timeout
        poller = select.poll()
        poller.register(channel.sock, select.POLLIN)
        while True:
            wait = self._poll_interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if poller.poll(wait * 1000):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise CallTimeoutError(f"{self._name}.{method} did not return within "
                                       f"{self.call_timeout:g} s (call_timeout); the proxy "
                                       "is closed, the application still runs")
            if self._check_alive is not None:
                self._check_alive()

    def _lose(self, exc: Exception) -> Exception:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        lost = ConnectionLostError(f"lost the connection to {self._name} at {self._endpoint}: "
                                   f"{exc}")
        self._lost = self._on_lost(lost) if self._on_lost else lost
        return self._lost


def local_token() -> str:
    """The application secret given to this process by its launcher."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise TransportError(f"${TOKEN_ENV} is not set: an application server needs the "
                             "secret its coupler shares with it")
    return token
