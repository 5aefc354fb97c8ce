"""The direct channel between a caller and an application server.

One TCP connection per proxy, authenticated both ways with an HMAC challenge over a shared
secret before anything is decoded; then request/reply frames of one msgpack header plus raw
buffers (see :mod:`gridcouple.appkit.wire`). A frame is::

    u32 header length | u16 buffer count | u64 length of each buffer | header | buffers

Buffers are sent with one gathering ``sendmsg`` and received straight into their final numpy
memory, so a field crosses the channel with no copy in Python on either side. Beyond loopback
the coupler configures TLS (the same certificates as its dask scheduler): both ends then
present a certificate signed by the configured CA (see :func:`tls_contexts`).

What a peer may make us hold is bounded (:class:`Limits`, from the environment): a frame's
size, checked against its prefix before anything is allocated; the number of connections not
yet authenticated; and the time one may take to authenticate, TLS included. Listeners accept
through :class:`Acceptor`, which outlives every transient error (EMFILE and the like).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import math
import mmap
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from gridcouple.appkit.wire import decode, encode
from gridcouple.errors import GridcoupleError

log = logging.getLogger(__name__)

TOKEN_ENV = "GRIDCOUPLE_APP_TOKEN"
MAX_FRAME_ENV = "GRIDCOUPLE_MAX_FRAME"
MAX_PENDING_ENV = "GRIDCOUPLE_MAX_PENDING"
HANDSHAKE_TIMEOUT_ENV = "GRIDCOUPLE_HANDSHAKE_TIMEOUT"
SPIN_ENV = "GRIDCOUPLE_SPIN_US"
SPIN_DEFAULT_US = 200
_MAGIC = b"GRIDCOUPLE-APP/1\n"
_NONCE = 32
_PREFIX = struct.Struct("<IH")
_HANDSHAKE_TIMEOUT = 10.0
_SMALL = 1 << 16
_PIECE = 4 << 20  # bytes received at a time into a large buffer
_PAGE = mmap.PAGESIZE


class TransportError(GridcoupleError):
    """The channel to an application server failed."""


class AuthenticationError(TransportError):
    """The peer does not know the session's secret."""


class ConnectionLostError(TransportError):
    """The peer closed the connection or vanished."""


class CallTimeoutError(TransportError):
    """A call did not return within the proxy's ``call_timeout``; the proxy is closed."""


class FrameTooLargeError(TransportError):
    """A frame is larger than the channel's ``max_frame``: refused before it is sent, or (a
    claim in a received prefix) before anything is allocated for it."""


class RemoteError(GridcoupleError):
    """The application raised an exception; ``remote_type`` and ``remote_traceback`` tell what.
    Its text ends with the remote traceback, so the file and line that raised are in sight."""

    def __init__(self, message: str, remote_type: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.message = message
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        if not self.remote_traceback.strip():
            return self.message
        return (f"{self.message}\n\nThe application server's traceback:\n"
                f"{self.remote_traceback.rstrip()}")


@dataclass(frozen=True)
class Limits:
    """What a peer may make us hold.

    ``max_frame``: bytes in one frame, header and buffers (a field sent by copy is one frame:
    1 GiB holds a 4096 x 32768 float64 field; larger fields go by reference). Both ends must
    agree: a sender refuses a frame its own limit refuses. ``max_pending``: connections that
    have not authenticated yet; a new one beyond it drops the oldest. ``handshake_timeout``:
    seconds from accepting a connection to its authentication, TLS included.
    """

    max_frame: int = 1 << 30
    max_pending: int = 64
    handshake_timeout: float = _HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive whole number, got {value!r}")
        timeout = self.handshake_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
                or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"Limits.handshake_timeout must be a positive number of seconds, "
                             f"got {timeout!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The defaults, overridden by ``$GRIDCOUPLE_MAX_FRAME`` (bytes),
        ``$GRIDCOUPLE_MAX_PENDING`` and ``$GRIDCOUPLE_HANDSHAKE_TIMEOUT`` (seconds)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, name, kind in ((MAX_FRAME_ENV, "max_frame", int),
                                (MAX_PENDING_ENV, "max_pending", int),
                                (HANDSHAKE_TIMEOUT_ENV, "handshake_timeout", float)):
            text = environ.get(key, "").strip()
            if not text:
                continue
            try:
                values[name] = kind(text)
                cls(**values)  # this variable's value checked, naming it
            except ValueError:
                raise TransportError(f"${key}={text!r}: expected a positive "
                                     f"{'whole number' if kind is int else 'number'}") from None
        return cls(**values)


def spin_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How long one end of a channel polls for the other's next frame before it sleeps in
    the kernel: ``$GRIDCOUPLE_SPIN_US`` microseconds (default 200, 0 never), and never on a
    machine of one CPU.

    A process asleep in ``recv`` on an idle vCPU takes tens of microseconds to wake (the
    hypervisor must schedule the vCPU again), more than the call itself; one that polls
    meanwhile sees the bytes at once. Each poll yields the CPU to any other runnable task,
    so two ends on one CPU take turns instead of spinning against each other."""
    environ = os.environ if environ is None else environ
    text = environ.get(SPIN_ENV, "").strip()
    try:
        micros = float(text) if text else SPIN_DEFAULT_US
        if not 0 <= micros <= 1e6:
            raise ValueError
    except ValueError:
        raise TransportError(f"${SPIN_ENV}={text!r}: expected microseconds from 0 to "
                             "1000000") from None
    if (os.cpu_count() or 1) < 2:
        return 0.0
    return micros / 1e6


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

def frame(value: Any, max_frame: int | None = None) -> list[bytes | memoryview]:
    """The parts of one frame carrying ``value``; raises TypeError for a value the wire cannot
    carry, and FrameTooLargeError for one of more than ``max_frame`` bytes (both before
    anything is sent)."""
    header, buffers = encode(value)
    if not buffers:  # the common case: a call or a small result
        size = _PREFIX.size + len(header)
        if max_frame is not None and size > max_frame:
            raise FrameTooLargeError(
                f"a value of {_size(size)} is more than the channel carries in one frame "
                f"({_size(max_frame)}, ${MAX_FRAME_ENV} on both ends)")
        return [_PREFIX.pack(len(header), 0) + header]
    if len(buffers) > 0xFFFF:
        raise TypeError(f"cannot send {len(buffers)} arrays in one value (at most 65535)")
    prefix = _PREFIX.pack(len(header), len(buffers))
    if buffers:
        prefix += struct.pack(f"<{len(buffers)}Q", *(b.nbytes for b in buffers))
    size = len(prefix) + len(header) + sum(b.nbytes for b in buffers)
    if max_frame is not None and size > max_frame:
        raise FrameTooLargeError(
            f"a value of {_size(size)} is more than the channel carries in one frame "
            f"({_size(max_frame)}, ${MAX_FRAME_ENV} on both ends); send large fields by "
            "reference (get_field(..., mode='ref')) or raise the limit")
    return [prefix + header, *buffers]


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.4g} {unit}"
    return f"{nbytes} bytes"


class Channel:
    """Frames over one connected socket. Not thread-safe: one request at a time.

    A received frame larger than ``max_frame`` (default: :meth:`Limits.from_env`) raises
    FrameTooLargeError from its prefix, before anything is allocated for it; the channel is
    then out of step and must be closed. While ``deadline`` (a ``time.monotonic()`` value) is
    set, every read waits at most until then. :meth:`wait_readable` polls for the next frame
    for ``spin`` seconds (see :func:`spin_seconds`) before it sleeps."""

    def __init__(self, sock: socket.socket, max_frame: int | None = None,
                 spin: float | None = None) -> None:
        self.sock = sock
        self.max_frame = Limits.from_env().max_frame if max_frame is None else max_frame
        self.spin = spin_seconds() if spin is None else spin
        self.deadline: float | None = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray(_SMALL)
        self._start = self._end = 0
        self._poller: select.poll | None = None

    def close(self) -> None:
        self.sock.close()

    def send(self, value: Any) -> None:
        """Send one value as a frame."""
        self.send_parts(frame(value, self.max_frame))

    def send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send byte strings in order with as few system calls as the kernel allows."""
        if len(parts) == 1 and isinstance(parts[0], bytes):  # one small frame: as a rule,
            sent = self.sock.send(parts[0])  # one send (TLS's sendall costs more in Python)
            if sent < len(parts[0]):
                self.sock.sendall(parts[0][sent:])
            return
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

    def receive(self, into: memoryview | None = None) -> Any:
        """Receive one frame and decode it; arrays land in freshly allocated numpy memory, the
        largest one in ``into`` when given and large enough (it is then a view of ``into``).
        ValueError for a frame that does not decode (the channel stays in step)."""
        self._fill(_PREFIX.size)
        header_length, count = _PREFIX.unpack_from(self._buffer, self._start)
        self._check_claim(_PREFIX.size + 8 * count + header_length, header_length, count)
        self._start += _PREFIX.size
        if not count and self._end - self._start >= header_length:  # a call, a small reply
            start = self._start
            self._start += header_length
            return decode(self._buffer[start: start + header_length], ())
        lengths: tuple[int, ...] = ()
        if count:
            lengths = struct.unpack(f"<{count}Q", self._take(8 * count))
            self._check_claim(_PREFIX.size + 8 * count + header_length + sum(lengths),
                              header_length, count)
        header = self._take(header_length)
        buffers: list[Any] = []
        fitting = [n for n in lengths if into is not None and n <= into.nbytes]
        chosen = lengths.index(max(fitting)) if fitting else -1
        for index, length in enumerate(lengths):
            if index == chosen:
                assert into is not None
                self.receive_into(into[:length])
                buffers.append(into[:length])
                continue
            try:
                target = np.empty(length, dtype=np.uint8)
            except MemoryError:
                raise FrameTooLargeError(f"cannot allocate {_size(length)} for a received "
                                         "frame") from None
            self.receive_into(memoryview(target))  # type: ignore[arg-type]
            buffers.append(target)
        return decode(header, buffers)

    def _check_claim(self, size: int, header_length: int, count: int) -> None:
        if size > self.max_frame:
            raise FrameTooLargeError(
                f"the peer announced a frame of {_size(size)} (a header of "
                f"{_size(header_length)} and {count} buffers), more than the limit of "
                f"{_size(self.max_frame)} (${MAX_FRAME_ENV})")

    def receive_into(self, target: memoryview) -> None:
        """Fill ``target`` from the stream: first what is buffered, then straight from the
        socket, :data:`_PIECE` bytes at a time, each piece's pages touched first (memory
        the kernel must fault in during ``recv`` slows a transfer several times over; a
        touch in Python faults it in at memory speed)."""
        done = min(self._end - self._start, target.nbytes)
        target[:done] = self._buffer[self._start: self._start + done]
        self._start += done
        while done < target.nbytes:
            piece = target[done: done + _PIECE]
            if piece.nbytes > _PAGE:
                np.frombuffer(piece, dtype=np.uint8)[::_PAGE] = 0
            filled = 0
            while filled < piece.nbytes:
                got = self._recv_into(piece[filled:])
                if not got:
                    raise ConnectionLostError("the peer closed the connection")
                filled += got
            done += filled

    def forward_frame(self, to: Channel, chunk: int = 1 << 20) -> None:
        """Receive one frame and send it on ``to`` as it arrives, undecoded: its prefix and
        header at once, its buffers ``chunk`` bytes at a time. Its size is checked against
        ``max_frame`` first, as in :meth:`receive`."""
        self._fill(_PREFIX.size)
        header_length, count = _PREFIX.unpack_from(self._buffer, self._start)
        self._check_claim(_PREFIX.size + 8 * count + header_length, header_length, count)
        self._fill(_PREFIX.size + 8 * count)
        lengths = struct.unpack_from(f"<{count}Q", self._buffer, self._start + _PREFIX.size)
        self._check_claim(_PREFIX.size + 8 * count + header_length + sum(lengths),
                          header_length, count)
        to.sock.sendall(self._take(_PREFIX.size + 8 * count + header_length))
        left = sum(lengths)
        buffer = bytearray(min(chunk, left))
        with memoryview(buffer) as view:
            while left:
                piece = view[:min(chunk, left)]
                self.receive_into(piece)
                to.sock.sendall(piece)
                left -= piece.nbytes

    def has_buffered(self) -> bool:
        return self._end > self._start or (isinstance(self.sock, ssl.SSLSocket)
                                           and self.sock.pending() > 0)

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Whether bytes of a frame are here, or arrive within ``timeout`` seconds (None: no
        limit): polled for (see :meth:`spin_for_frame`), then waited for in the kernel."""
        started = time.perf_counter()
        if self.spin_for_frame(timeout):
            return True
        if timeout is not None:
            timeout = max(0.0, timeout - (time.perf_counter() - started))
        return bool(self._poll(None if timeout is None else timeout * 1000))

    def spin_for_frame(self, limit: float | None = None) -> bool:
        """Whether bytes of a frame are here, polling for them for up to ``spin`` seconds (at
        most ``limit``) and yielding the CPU between polls."""
        if self.has_buffered():
            return True
        spin = self.spin if limit is None else min(self.spin, limit)
        if spin <= 0:
            return False
        poll, clock, end = self._poll_once().poll, time.perf_counter, time.perf_counter() + spin
        while not poll(0):
            if clock() >= end:
                return False
            os.sched_yield()
        return True

    def _poll(self, milliseconds: float | None) -> list[tuple[int, int]]:
        return self._poll_once().poll(milliseconds)

    def _poll_once(self) -> select.poll:
        """The poll object watching this channel's socket (one per channel)."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN)
        return self._poller

    def _take(self, size: int) -> bytes:
        self._fill(size)
        data = bytes(self._buffer[self._start: self._start + size])
        self._start += size
        return data

    def _fill(self, size: int) -> None:
        """Receive until at least ``size`` bytes are buffered."""
        if self._end - self._start < size:
            if self._start:
                remaining = self._end - self._start
                self._buffer[:remaining] = self._buffer[self._start: self._end]
                self._start, self._end = 0, remaining
            while self._end < size:
                if self._end == len(self._buffer):  # grow with what arrives, not with a claim
                    self._buffer.extend(bytes(min(size, 2 * len(self._buffer))
                                              - len(self._buffer)))
                with memoryview(self._buffer) as view:
                    got = self._recv_into(view[self._end:])
                if not got:
                    raise ConnectionLostError("the peer closed the connection")
                self._end += got

    def _recv_into(self, view: memoryview) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)
        return self.sock.recv_into(view)


# --- the handshake ----------------------------------------------------------------------

def _digest(token: str, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), role + nonce, hashlib.sha256).digest()


def accept_handshake(channel: Channel, token_for: Callable[[str], str | None]) -> str:
    """The listening side: challenge the peer, check its answer with the secret
    ``token_for(its name)``, answer its challenge; returns the peer's name. In a connection
    an :class:`Acceptor` handed over, all of it must end by the connection's handshake
    deadline; elsewhere within 10 s."""
    sock = channel.sock
    deadline, timeout = _handshake_deadline()
    channel.deadline = deadline
    try:
        nonce = secrets.token_bytes(_NONCE)
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        sock.sendall(_MAGIC + nonce)
        name = channel._take(channel._take(1)[0]).decode("utf-8", "replace")
        reply = channel._take(2 * _NONCE)
        token = token_for(name)
        if token is None or not hmac.compare_digest(reply[:_NONCE],
                                                    _digest(token, b"client", nonce)):
            raise AuthenticationError(f"the peer {name!r} failed the challenge (wrong secret)")
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        sock.sendall(_digest(token, b"server", reply[_NONCE:]))
    except TimeoutError:
        raise TransportError(f"the peer did not authenticate within {timeout:g} s") from None
    except (OSError, TransportError) as exc:
        raise _dropped_or(exc) from None
    finally:
        channel.deadline = None
    sock.settimeout(None)
    _authenticated()
    return name


def accept_tls(sock: socket.socket, tls: ssl.SSLContext | None) -> socket.socket:
    """The accepted socket, wrapped in TLS when ``tls`` is given (failures are OSErrors or
    TransportErrors; the socket is closed then). The TLS handshake counts towards the
    connection's handshake deadline."""
    if tls is None:
        return sock
    deadline, timeout = _handshake_deadline()
    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    wrapped = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    _pending_socket(wrapped)  # dropping the connection now shuts this one down
    try:
        wrapped.do_handshake()  # bounded as a whole by the socket's timeout
    except TimeoutError:
        wrapped.close()
        raise TransportError(f"the peer did not complete TLS within {timeout:g} s") from None
    except BaseException as exc:
        wrapped.close()
        if isinstance(exc, OSError | TransportError):
            raise _dropped_or(exc) from None
        raise
    return wrapped


def connect_handshake(channel: Channel, token: str, name: str = "") -> None:
    """The connecting side, introducing itself as ``name``: answer the challenge, then check
    the listener's answer (all of it within 10 s)."""
    sock = channel.sock
    channel.deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
    sock.settimeout(_HANDSHAKE_TIMEOUT)
    try:
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
    finally:
        channel.deadline = None
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


# --- accepting ----------------------------------------------------------------------------

# accept() errors after which the listener is gone (closed, shut down); any other is transient
# (EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED, EPROTO, EPERM from a firewall...): back off.
_LISTENER_GONE = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EOPNOTSUPP})
_BACKOFF_FIRST, _BACKOFF_MOST = 0.005, 0.1


class _Pending:
    """A connection not yet authenticated: its socket (the TLS one once wrapped), its
    handshake deadline, where it comes from."""

    __slots__ = ("deadline", "dropped", "peer", "sock", "timeout")

    def __init__(self, sock: socket.socket, deadline: float, timeout: float,
                 peer: str) -> None:
        self.sock, self.deadline, self.timeout, self.peer = sock, deadline, timeout, peer
        self.dropped = False  # ended by the Acceptor to make room


# The connection the current thread is authenticating, if an Acceptor handed it over: how
# accept_tls and accept_handshake find its deadline and release its place once it is in.
_current = threading.local()


def _handshake_deadline() -> tuple[float, float]:
    """(deadline, its length in seconds) of the current thread's handshake."""
    entry = getattr(_current, "entry", None)
    if entry is not None:
        return entry[1].deadline, entry[1].timeout
    return time.monotonic() + _HANDSHAKE_TIMEOUT, _HANDSHAKE_TIMEOUT


def _pending_socket(sock: socket.socket) -> None:
    entry = getattr(_current, "entry", None)
    if entry is not None:
        entry[1].sock = sock


def _dropped_or(exc: Exception) -> Exception:
    """What a failed handshake raises: ``exc``, unless the Acceptor dropped the connection."""
    entry = getattr(_current, "entry", None)
    if entry is None or not entry[1].dropped:
        return exc
    return TransportError(f"dropped for a newer connection: more than "
                          f"{entry[0].limits.max_pending} were waiting to authenticate "
                          f"(${MAX_PENDING_ENV})")


def _authenticated() -> None:
    entry = getattr(_current, "entry", None)
    if entry is not None:
        _current.entry = None
        entry[0]._release(entry[1])


class Acceptor:
    """Accepts connections on ``listener`` and calls ``handle(sock)`` for each in a thread of
    its own, until the listener is closed or :meth:`stop` is called. Every accept error but a
    closed listener is waited out with a short back-off (one EMFILE must not end accepting).

    ``handle`` authenticates with :func:`accept_tls` and :func:`accept_handshake`; until
    then a connection is pending: it must authenticate within ``limits.handshake_timeout``
    of being accepted, and at most ``limits.max_pending`` are pending at once (a new one
    beyond that drops the oldest, so a flood of idle connections cannot keep a quick peer
    out)."""

    def __init__(self, listener: socket.socket, handle: Callable[[socket.socket], None], *,
                 limits: Limits | None = None, name: str = "accept") -> None:
        self.listener = listener
        self.handle = handle
        self.limits = limits or Limits.from_env()
        self.name = name
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[_Pending, None] = {}  # oldest first
        self._dropped = 0  # pending connections dropped for newer ones, since the last log

    def start(self) -> threading.Thread:
        """Accept in a background thread (returned)."""
        thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop accepting and close the listener (pending connections end on their own)."""
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        self.listener.close()

    @property
    def pending(self) -> int:
        """How many connections are waiting to authenticate."""
        return len(self._pending)

    def run(self) -> None:
        """The accept loop, in the calling thread."""
        backoff, failures = _BACKOFF_FIRST, 0
        while not self.stopped.is_set():
            try:
                sock, address = self.listener.accept()
            except OSError as exc:
                if self._gone(exc):
                    return
                failures += 1
                if failures == 1:
                    log.warning("%s: accepting failed (%s); retrying", self.name, exc)
                self.stopped.wait(backoff)
                backoff = min(2 * backoff, _BACKOFF_MOST)
                continue
            if failures:
                log.warning("%s: accepting again after %d failed tries", self.name, failures)
                backoff, failures = _BACKOFF_FIRST, 0
            if self.stopped.is_set() or self.listener.fileno() == -1:
                sock.close()
                return
            self._admit(sock, address)

    def _gone(self, exc: OSError) -> bool:
        return (self.stopped.is_set() or self.listener.fileno() == -1
                or exc.errno in _LISTENER_GONE)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        timeout = self.limits.handshake_timeout
        entry = _Pending(sock, time.monotonic() + timeout, timeout, _peer_text(address))
        with self._lock:
            while len(self._pending) >= self.limits.max_pending:
                self._drop(next(iter(self._pending)))
            self._pending[entry] = None
        try:
            threading.Thread(target=self._run, args=(sock, entry), name=f"{self.name}-conn",
                             daemon=True).start()
        except RuntimeError as exc:  # no thread to spare: this connection only is refused
            log.warning("%s: refused a connection from %s: %s", self.name, entry.peer, exc)
            self._release(entry)
            sock.close()

    def _drop(self, entry: _Pending) -> None:
        """Make room: end the oldest pending connection (its thread sees it closed)."""
        del self._pending[entry]
        entry.dropped = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(entry.sock, socket.SHUT_RDWR)
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 1000 == 0:
            log.warning("%s: %d connections are waiting to authenticate (%s=%d); dropped the "
                        "oldest, from %s (%d so far)", self.name, len(self._pending) + 1,
                        MAX_PENDING_ENV, self.limits.max_pending, entry.peer, self._dropped)

    def _release(self, entry: _Pending) -> None:
        with self._lock:
            self._pending.pop(entry, None)
            if not self._pending:
                self._dropped = 0

    def _run(self, sock: socket.socket, entry: _Pending) -> None:
        _current.entry = (self, entry)
        try:
            self.handle(sock)
        except Exception:  # a bug in a handler ends its connection, never the server
            log.exception("%s: the connection from %s failed", self.name, entry.peer)
            with contextlib.suppress(OSError):
                entry.sock.close()
        finally:
            _current.entry = None
            self._release(entry)


def accept_connections(listener: socket.socket, handle: Callable[[socket.socket], None], *,
                       limits: Limits | None = None, name: str = "accept") -> None:
    """Run an :class:`Acceptor` on ``listener`` in the calling thread until it is closed."""
    Acceptor(listener, handle, limits=limits, name=name).run()


def _peer_text(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return format_endpoint(str(address[0]), int(address[1]))
    return str(address) or "an unnamed peer"


# --- serving ------------------------------------------------------------------------------

FIELDS_PEER = "fields:"  # the name prefix of a peer that reads fields only


class ObjectServer:
    """Serves the public methods of ``target`` to authenticated peers, one thread per
    connection. ``stopped`` is set after a call named in ``stop_after`` returns. ``limits``
    (default :meth:`Limits.from_env`) bound what a peer may make it hold.

    ``fields`` is ``(token, service)``: a peer that introduces itself as ``fields:NAME``
    and knows that token is served ``service`` (the store reads of
    :class:`gridcouple.appkit.remote.StoreService`) and nothing else."""

    def __init__(self, target: Any, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 stop_after: Sequence[str] = ("terminate",),
                 tls: ssl.SSLContext | None = None, limits: Limits | None = None,
                 fields: tuple[str, Any] | None = None) -> None:
        self.target = target
        self.token = token
        self.fields = fields
        self.tls = tls
        self.limits = limits or Limits.from_env()
        self.stop_after = set(stop_after)
        self.stopped = threading.Event()
        self.stopped_by: str | None = None  # the call that stopped the server, if one did
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # A deep backlog: a burst of connections waits in the kernel, not in SYN retries.
        self.listener = socket.create_server((host, port), family=family, backlog=1024)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self.acceptor = Acceptor(self.listener, self._serve, limits=self.limits,
                                 name=f"app server {self.endpoint}")
        self._refusals = WarningThrottle()

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)

    def start(self) -> None:
        """Accept connections in a background thread."""
        self.acceptor.start()

    def close(self) -> None:
        self.stopped.set()
        self.acceptor.stop()

    def _token_for(self, name: str) -> str | None:
        if name.startswith(FIELDS_PEER):
            return self.fields[0] if self.fields is not None else None
        return self.token

    def _serve(self, sock: socket.socket) -> None:
        peer = _peer_of(sock)
        try:
            sock = accept_tls(sock, self.tls)
            channel = Channel(sock, self.limits.max_frame)
            name = accept_handshake(channel, self._token_for)
        except (OSError, TransportError) as exc:
            self._refusals.warn("refused a connection from %s: %s", peer, exc)
            sock.close()
            return
        if name.startswith(FIELDS_PEER) and self.fields is not None:
            serve_channel(channel, self.fields[1], peer)
        else:
            self.serve(channel, peer)

    def serve(self, channel: Channel, peer: str) -> None:
        """Answer the calls that come over an authenticated ``channel`` until it closes."""
        method = serve_channel(channel, self.target, peer, stop_after=self.stop_after)
        if method is not None:
            self.stopped_by = method
            self.stopped.set()


def serve_channel(channel: Channel, target: Any, peer: str,
                  stop_after: Sequence[str] | set[str] = ()) -> str | None:
    """Answer calls of ``target``'s public methods over ``channel`` until it closes, or until
    a call named in ``stop_after`` has been answered (its name is returned then)."""
    with channel.sock:
        while True:
            try:
                channel.spin_for_frame()
                request = channel.receive()
            except (OSError, TransportError, ValueError) as exc:
                if not isinstance(exc, ConnectionLostError):
                    log.warning("closing the connection from %s: %s", peer, exc)
                return None
            method, reply = _answer(target, request)
            try:
                parts = frame(reply, channel.max_frame)
            except (TypeError, FrameTooLargeError) as exc:  # a result we cannot send
                parts = frame(_error_reply(type(exc)(f"the result of {method} cannot be "
                                                     f"sent: {exc}")))
            try:
                channel.send_parts(parts)
            except OSError as exc:
                log.warning("closing the connection from %s: %s", peer, exc)
                return None
            if method in stop_after:
                return method


def call_method(target: Any, request: Any) -> list[Any]:
    """The reply to one request: ``[0, result]`` or ``[1, {type, message, traceback}]``."""
    return _answer(target, request)[1]


def _answer(target: Any, request: Any) -> tuple[str | None, list[Any]]:
    """The method a request names (None for a malformed one) and the reply to it."""
    if not _is_request(request):
        return None, _error_reply(TypeError("a request is [method, [arguments], {keyword "
                                            f"arguments}}], got {str(request)[:200]}"))
    method, args, kwargs = request
    try:
        if method.startswith("_"):
            raise AttributeError(f"{method!r} is not a public method")
        function = getattr(target, method)
        if not callable(function):
            raise AttributeError(f"{method!r} is not a method")
        return method, [0, function(*args, **kwargs)]
    except Exception as exc:
        return method, _error_reply(exc)


class WarningThrottle:
    """Warnings of one kind, at most ``burst`` per ``window`` seconds: a flood of refused
    connections must not fill the job's stderr. The next one logged after a quiet spell
    says how many were left out."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._lock = threading.Lock()
        self._start = -math.inf
        self._count = self._skipped = 0

    def warn(self, message: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start > self.window:
                self._start, self._count = now, 0
            self._count += 1
            if self._count > self.burst:
                self._skipped += 1
                return
            skipped, self._skipped = self._skipped, 0
        if skipped:
            message += f" ({skipped} more like it not logged)"
        log.warning(message, *args)


def _is_request(request: Any) -> bool:
    return (isinstance(request, list | tuple) and len(request) == 3
            and isinstance(request[0], str) and isinstance(request[1], list | tuple)
            and isinstance(request[2], dict)
            and (not request[2] or all(isinstance(k, str) for k in request[2])))


def _is_reply(reply: Any) -> bool:
    """[0, value], or [1, {"type", "message", "traceback"}] (see :func:`_error_reply`)."""
    if not (isinstance(reply, list | tuple) and len(reply) == 2 and reply[0] in (0, 1)):
        return False
    error = reply[1]
    return reply[0] == 0 or (isinstance(error, dict) and all(
        isinstance(error.get(key), str) for key in ("type", "message", "traceback")))


def _peer_of(sock: socket.socket) -> str:
    try:
        return _peer_text(sock.getpeername())
    except OSError:
        return "a peer gone"


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
                 call_timeout: float | None = None, channel: Channel | None = None) -> None:
        self._endpoint = endpoint
        self.call_timeout = call_timeout
        self._name = name
        self._on_lost = on_lost
        self._check_alive = check_alive
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._lost: Exception | None = None
        self._channel: Channel | None = channel
        if channel is not None:  # authenticated already (the server dialled us)
            return
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
            return self._call(None, method, args, kwargs)

        call.__name__ = method
        return call

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method(*args, **kwargs)`` on the application and return its result."""
        return self._call(None, method, args, kwargs)

    def call_into(self, out: np.ndarray, method: str, *args: Any, **kwargs: Any) -> Any:
        """:meth:`call`, with the result's largest array (a field's values) received
        straight into ``out``'s memory when it fits, so that a field fetched every step by
        copy needs no new memory: ``proxy.call_into(buffer, "get_field", "temperature",
        t)``. That array then shares ``out``'s memory (its dtype and shape are the
        sender's); one too large for ``out`` lands in new memory as with :meth:`call`."""
        if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable):
            raise TypeError("call_into needs a writable C-contiguous numpy array")
        return self._call(out.reshape(-1).view(np.uint8).data, method, args, kwargs)

    def _call(self, into: memoryview | None, method: str, args: Sequence[Any],
              kwargs: dict[str, Any]) -> Any:
        with self._lock:
            if self._lost is not None:
                raise self._lost
            channel = self._channel
            assert channel is not None
            # A TypeError or FrameTooLargeError here leaves us usable: nothing was sent.
            request = frame([method, list(args), kwargs], channel.max_frame)
            try:
                channel.send_parts(request)
                self._await_reply(channel, method)
                reply = channel.receive(into)
                if not _is_reply(reply):
                    raise TransportError(f"{self._name} at {self._endpoint} answered {method} "
                                         f"with no reply: {str(reply)[:200]}")
                status, value = reply
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

    def interrupt(self) -> None:
        """From any thread: shut the connection down, so that a call waiting on it fails
        now (through ``on_lost``) and later calls fail at once."""
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(channel.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection (the application goes on running)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._lost = self._lost or TransportError(f"the proxy of {self._name} is closed")

    def _await_reply(self, channel: Channel, method: str) -> None:
        if self._check_alive is None and self.call_timeout is None:
            channel.spin_for_frame()  # then the reply is received in the kernel's wait
            return
        deadline = None if self.call_timeout is None else time.monotonic() + self.call_timeout
        while True:
            wait = self._poll_interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if channel.wait_readable(wait):
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
