"""Fields by reference between hosts that share no file system.

A :class:`~gridcouple.appkit.store.FieldRef` names its producer (the application whose store
holds the version) and the store's identity. Whoever reads it inside a coupling session (an
application server, or the coupler itself) first checks it against the session:

- the producer must be an application of this session, and the ref's store the one that
  application announced when it registered (else :class:`RefRefusedError`: a ref cannot send
  a consumer to an arbitrary directory, a symbolic link or an ``ftp://`` URL);
- if this host sees that store (the same directory, with the same identity in its root), the
  reader opens it directly, confined to its root;
- otherwise it reads through the producer's application server: :class:`StoreService`
  answers ``get(key, range)`` and ``list_dir(prefix)`` for committed versions only, over the
  session's authenticated channel. The reader connects to the producer directly when it can,
  else through the coupler, which relays to a connection the producer dialled out (so a
  producer behind a firewall that accepts no inbound connections still serves its fields).

Only the keys asked for travel: ``FieldRef.open()[10:20]`` fetches the array's metadata and the
chunks that hold rows 10 to 20. A producer that has gone is reported in one line
(:class:`FieldUnavailableError`); no read waits longer than ``FIELD_READ_TIMEOUT`` seconds for
a byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from gridcouple.appkit import store as store_module
from gridcouple.appkit.store import (
    _VERSION_PREFIX,
    ConfinedDirectory,
    FieldRef,
    FieldStore,
    FieldUnavailableError,
    FsspecReader,
    RefRefusedError,
    _id_problem,
    _is_local,
    check_key,
    direct_reader,
)
from gridcouple.appkit.transport import (
    FIELDS_PEER,
    AuthenticationError,
    Channel,
    TransportError,
    _is_reply,
    connect,
)

log = logging.getLogger(__name__)

FIELD_TOKEN_ENV = "GRIDCOUPLE_FIELD_TOKEN"
FIELD_READ_TIMEOUT = 10.0  # seconds a reader waits for a byte from a producer
CONNECT_TIMEOUT = 3.0  # seconds to reach a producer directly before going through the coupler
MAX_CHANNELS = 4  # connections to one producer a process keeps (parallel chunk reads)
_VERSION = re.compile(rf"{_VERSION_PREFIX}[0-9]{{6}}")
_MESH_DIGEST = re.compile(r"[0-9a-f]{40}")


def field_token(session_secret: str) -> str:
    """The secret with which the applications of a session read each other's fields: derived
    from the session's, distinct from every application's own (names hold no ':')."""
    return hmac.new(session_secret.encode(), FIELDS_PEER.encode(), hashlib.sha256).hexdigest()


# --- the producer's side ----------------------------------------------------------------------

class StoreService:
    """The read-only face of one FieldStore that a producer serves to field readers: the
    store's root metadata, committed versions (never one being written) and stored meshes;
    nothing else (no staging, no commit markers, nothing outside the root). Counts what it
    served (:meth:`counts`)."""

    def __init__(self, store: FieldStore) -> None:
        self.store = store
        self.reader: Any = direct_reader(store.url)
        # Chunks are sent from their files mapped into memory only in memory file systems
        # (the default store, in /dev/shm): a network file system may fault a mapping.
        self.maps_chunks = (isinstance(self.reader, ConfinedDirectory)
                            and filesystem_type(self.reader.root) in _MEMORY_FILE_SYSTEMS)
        self._committed: set[str] = set()
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "chunk_requests": 0, "bytes": 0}
        self._chunks: dict[str, int] = {}  # chunk requests by array

    def get(self, key: str, start: int | None = None, end: int | None = None,
            suffix: int | None = None) -> np.ndarray | None:
        """The bytes of ``key`` (``[start:end]``, or the last ``suffix``), or None."""
        self._allow(key)
        for name, value in (("start", start), ("end", end), ("suffix", suffix)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        array, chunk, _ = key.partition("/c/")
        if chunk and self.maps_chunks:  # a committed version's chunk is never rewritten
            data: Any = self.reader.view(key, start, end, suffix)
        else:
            data = self.reader.get(key, start, end, suffix)
        with self._lock:
            self._counts["requests"] += 1
            if chunk:
                self._counts["chunk_requests"] += 1
                self._chunks[array] = self._chunks.get(array, 0) + 1
            self._counts["bytes"] += len(data) if data is not None else 0
        return None if data is None else np.frombuffer(data, dtype=np.uint8)

    def list_dir(self, prefix: str) -> list[str]:
        """The names below ``prefix`` (hidden ones left out)."""
        if prefix:
            self._allow(prefix)
        with self._lock:
            self._counts["requests"] += 1
        names = self.reader.list_dir(prefix)
        if not prefix:
            names = [n for n in names if n == "zarr.json" or _id_problem(n) is None
                     or n == "meshes"]
        return [n for n in names if not n.startswith(".") and n != "times"]

    def counts(self) -> dict[str, Any]:
        """Requests answered, of them chunk reads, and bytes sent, since the start; and
        ``chunks``: the chunk reads by array (``temperature/v000001/temperature``)."""
        with self._lock:
            return {**self._counts, "chunks": dict(self._chunks)}

    def _allow(self, key: str) -> None:
        parts = check_key(key).split("/")
        if parts == ["zarr.json"]:
            return
        if parts[0] == "meshes" and len(parts) >= 2 and _MESH_DIGEST.fullmatch(parts[1]):
            return
        if _id_problem(parts[0]) is None:
            if len(parts) == 1 or parts[1:] == ["zarr.json"]:
                return
            if _VERSION.fullmatch(parts[1]) and self._is_committed(parts[0], parts[1]):
                return
        raise RefRefusedError(f"{key!r} is not part of a committed field version in the store "
                              f"of {self.store.producer or 'this application'}")

    def _is_committed(self, field_id: str, version: str) -> bool:
        name = f"{field_id}/{version}"
        if name in self._committed:
            return True
        if self.store._committed(field_id, int(version[1:])) is None:
            return False
        self._committed.add(name)
        return True


_MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")


def filesystem_type(path: str) -> str:
    """The type of the file system holding ``path`` (``tmpfs``, ``ext4``, ``nfs4``...), from
    /proc/self/mountinfo; "" where that cannot be told."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest:
                    continue
                point = parts[4].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, rest.split()[0]
    except OSError:
        return ""
    return kind


_served: StoreService | None = None


def serve_store(service: StoreService | None) -> None:
    """Make ``service`` this process's served store (see :func:`served_counts`)."""
    global _served
    _served = service


def served_counts() -> dict[str, Any]:
    """What this process's application server has served of its store so far (see
    :meth:`StoreService.counts`; zeros when it serves none)."""
    if _served is None:
        return {"requests": 0, "chunk_requests": 0, "bytes": 0, "chunks": {}}
    return _served.counts()


# --- the reader's side ------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberInfo:
    """What a session says about one of its applications: where it runs and listens, the
    store it serves (URL and identity), and whether it has gone."""

    name: str
    host: str = ""
    endpoint: str = ""
    store: str = ""
    store_id: str = ""
    gone: bool = False

    @classmethod
    def from_wire(cls, data: Any) -> MemberInfo:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise TransportError(f"not a member description: {str(data)[:200]}")
        return cls(**{k: data[k] for k in ("name", "host", "endpoint", "store", "store_id",
                                            "gone") if data.get(k) is not None})

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "endpoint": self.endpoint,
                "store": self.store, "store_id": self.store_id, "gone": self.gone}

    def describe(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return f"{self.name}{where}"


class RemoteSource:
    """A producer's store, read through its application server: a StoreReader whose
    connections ``opener`` makes (at most :data:`MAX_CHANNELS` at once, kept for reuse)."""

    def __init__(self, info: MemberInfo, opener: Callable[[], Channel],
                 max_channels: int = MAX_CHANNELS) -> None:
        self.info = info
        self.url = info.store
        self._opener = opener
        self._idle: list[Channel] = []
        self._slots = threading.BoundedSemaphore(max_channels)
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RemoteSource({self.info.describe()}, {self.url!r})"

    def get(self, key: str, start: int | None = None, end: int | None = None,
            suffix: int | None = None) -> bytes | None:
        reply = self._bytes(self._call("get", [check_key(key), start, end, suffix]))
        return None if reply is None else reply.tobytes()

    def read_into(self, key: str, target: memoryview) -> int:
        reply = self._bytes(self._call("get", [check_key(key), 0, target.nbytes, None],
                                       into=target))
        if reply is None:
            return 0
        got = reply.nbytes
        if got != target.nbytes:
            raise FieldUnavailableError(f"{key} from {self.info.describe()}: {got} bytes, "
                                        f"expected {target.nbytes}")
        if not _shares_memory(reply, target):
            target[:] = reply.data
        return got

    def _bytes(self, reply: Any) -> np.ndarray | None:
        """A ``get`` reply: None, or the bytes as a flat uint8 array; anything else is the
        producer's fault."""
        if reply is None or (isinstance(reply, np.ndarray) and reply.dtype == np.uint8
                             and reply.ndim == 1):
            return reply
        raise FieldUnavailableError(f"{self.info.describe()} answered a read with "
                                    f"{type(reply).__name__}, not bytes")

    def list_dir(self, prefix: str) -> list[str]:
        names = self._call("list_dir", [check_key(prefix) if prefix else ""])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise FieldUnavailableError(f"{self.info.describe()} answered list_dir with "
                                        f"{str(names)[:100]}")
        return names

    def zarr_store(self) -> Any:
        from gridcouple.appkit.readonly import ReaderStore

        return ReaderStore(self)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for channel in idle:
            channel.close()

    def _call(self, method: str, args: list[Any], into: memoryview | None = None) -> Any:
        with self._slots, self._channel() as channel:
            try:
                channel.send([method, args, {}])
                reply = channel.receive(into)
            except (OSError, TransportError, ValueError) as exc:  # ValueError: a bad frame
                raise self._gone(exc) from None
        if not _is_reply(reply):
            raise FieldUnavailableError(f"{self.info.describe()} answered {method} with "
                                        f"{str(reply)[:100]}")
        status, value = reply
        if status:
            if value["type"] == "RefRefusedError":
                raise RefRefusedError(value["message"])
            raise FieldUnavailableError(f"{self.info.describe()} could not serve {args[0]!r}: "
                                        f"{value['type']}: {value['message']}")
        return value

    @contextlib.contextmanager
    def _channel(self) -> Iterator[Channel]:
        with self._lock:
            channel = self._idle.pop() if self._idle else None
        if channel is None:
            try:
                channel = self._opener()
            except (OSError, TransportError) as exc:
                raise self._gone(exc) from None
            channel.sock.settimeout(FIELD_READ_TIMEOUT)
        try:
            yield channel
        except BaseException:
            channel.close()
            raise
        with self._lock:
            if self._closed:
                channel.close()
            else:
                self._idle.append(channel)

    def _gone(self, exc: BaseException) -> FieldUnavailableError:
        why = "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        return FieldUnavailableError(f"the producer {self.info.describe()} of the store "
                                     f"{self.url} cannot be read: {why.splitlines()[0]}")


def _shares_memory(array: Any, target: memoryview) -> bool:
    try:
        return bool(np.may_share_memory(np.asarray(array), np.frombuffer(target, np.uint8)))
    except (TypeError, ValueError):
        return False


def check_ref(ref: FieldRef, info: MemberInfo | None) -> MemberInfo:
    """``info`` if ``ref`` names that member of the session and the store it serves; else
    RefRefusedError saying why."""
    what = f"field {ref.field_id!r} version {ref.version}"
    if not ref.producer:
        raise RefRefusedError(f"{what}: refusing a FieldRef that names no producer (store "
                              f"{ref.store_url!r}): only refs made by applications of this "
                              "coupling session are read")
    if info is None:
        raise RefRefusedError(f"{what}: refusing a FieldRef from {ref.producer!r}, which is "
                              "not an application of this coupling session")
    if ref.store_url != info.store:
        raise RefRefusedError(f"{what}: refusing a FieldRef into {ref.store_url!r}: "
                              f"{info.name} serves the store {info.store!r}")
    if info.store_id and ref.store_id != info.store_id:
        raise RefRefusedError(f"{what}: refusing a FieldRef whose store identity "
                              f"{ref.store_id!r} is not that of {info.name}'s store")
    if info.gone:
        raise FieldUnavailableError(f"{what}: its producer {info.describe()} has gone")
    return info


def sees_store(info: MemberInfo) -> bool:
    """Whether this host sees ``info``'s store directly: a local directory at the same path
    with the same identity in its root (or a URL that is not process-local memory)."""
    if not _is_local(info.store):
        return not info.store.startswith("memory://")
    if not info.store_id:
        return False
    try:
        root = ConfinedDirectory(info.store).get("zarr.json")
        found = json.loads(root)["attributes"]["gridcouple"]["store_id"] if root else ""
    except (OSError, ValueError, KeyError, TypeError, RefRefusedError):
        return False
    return bool(found == info.store_id)


class SessionReader:
    """How one process of a coupling session reads FieldRefs (see the module docstring):
    ``lookup(name)`` says what the session knows of an application, ``open_source(info)``
    opens a connection to its store service."""

    def __init__(self, lookup: Callable[[str], MemberInfo | None],
                 open_source: Callable[[MemberInfo], Channel], *, me: str = "",
                 own_store: FieldStore | None = None) -> None:
        self.lookup = lookup
        self.open_source = open_source
        self.me = me
        self.own_store = own_store
        self._sources: dict[tuple[str, str], RemoteSource] = {}
        self._direct: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def resolve(self, ref: FieldRef) -> Any:
        """The reader of ``ref``'s store; RefRefusedError or FieldUnavailableError."""
        if self.own_store is not None and ref.producer == self.me and ref.producer \
                and ref.store_url == self.own_store.url \
                and ref.store_id == self.own_store.store_id:
            return direct_reader(self.own_store.url)
        info = check_ref(ref, self.lookup(ref.producer) if ref.producer else None)
        key = (info.name, info.store)
        with self._lock:
            direct = self._direct.get(key)
        if direct is None:
            direct = sees_store(info)
            with self._lock:
                self._direct[key] = direct
        if direct:
            return ConfinedDirectory(info.store) if _is_local(info.store) \
                else FsspecReader(info.store)
        with self._lock:
            source = self._sources.get(key)
            if source is None:
                log.info("%sreading the fields of %s through its server (its store %s is not "
                         "on this host)", f"{self.me}: " if self.me else "", info.describe(),
                         info.store)
                source = self._sources[key] = RemoteSource(
                    info, lambda: self.open_source(info))
        return source

    def forget(self, name: str) -> None:
        """Drop what is cached of ``name`` (it has gone)."""
        with self._lock:
            for key in [k for k in self._sources if k[0] == name]:
                self._sources.pop(key).close()
            for key in [k for k in self._direct if k[0] == name]:
                del self._direct[key]

    def close(self) -> None:
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
        for source in sources:
            source.close()


# --- the process's sessions ---------------------------------------------------------------

_sessions: list[SessionReader] = []
_sessions_lock = threading.Lock()


def install(session: SessionReader) -> None:
    """Read FieldRefs in this process through ``session`` (and the others installed)."""
    with _sessions_lock:
        _sessions.append(session)
        store_module.ref_resolver = _resolve


def uninstall(session: SessionReader) -> None:
    with _sessions_lock:
        with contextlib.suppress(ValueError):
            _sessions.remove(session)
        if not _sessions:
            store_module.ref_resolver = None
    session.close()


def _resolve(ref: FieldRef) -> Any:
    with _sessions_lock:
        sessions = list(_sessions)
    if not sessions:  # uninstalled meanwhile
        return check_ref(ref, None)
    for session in sessions[:-1]:  # several couplers in one process: the one that knows it
        info = session.lookup(ref.producer) if ref.producer else None
        if info is not None and info.store == ref.store_url:
            return session.resolve(ref)
    return sessions[-1].resolve(ref)


# --- connecting to a producer, from an application server --------------------------------

class CouplerLink:
    """An application server's way to its coupler for field reads: who an application of the
    session is (asked once, then kept), and a connection to its store service, directly to
    its endpoint when that answers within CONNECT_TIMEOUT, else relayed by the coupler."""

    def __init__(self, coupler: str, name: str, token: str, fields_token: str,
                 tls: ssl.SSLContext | None) -> None:
        self.coupler, self.name, self.token = coupler, name, token
        self.fields_token, self.tls = fields_token, tls
        self._members: dict[str, MemberInfo] = {}
        self._relay_only: set[str] = set()
        self._lock = threading.Lock()

    def request(self, message: dict[str, Any]) -> Any:
        """One request to the coupler's registry, on a connection of its own."""
        channel, reply = self._ask(message)
        channel.close()
        return reply

    def lookup(self, name: str) -> MemberInfo | None:
        with self._lock:
            known = self._members.get(name)
        if known is not None:
            return known
        try:
            reply = self.request({"op": "lookup", "name": name})
        except (OSError, TransportError) as exc:
            raise FieldUnavailableError(f"cannot ask the coupler at {self.coupler} about "
                                        f"{name!r}: {exc}") from None
        if reply is None:
            return None
        info = MemberInfo.from_wire(reply)
        if not info.gone:
            with self._lock:
                self._members[name] = info
        return info

    def open_source(self, info: MemberInfo) -> Channel:
        if info.endpoint and info.name not in self._relay_only:
            try:
                return connect(info.endpoint, self.fields_token, name=FIELDS_PEER + self.name,
                               tls=self.tls, timeout=CONNECT_TIMEOUT)
            except AuthenticationError:
                raise
            except (OSError, TransportError) as exc:
                log.info("%s: cannot reach %s at %s directly (%s); reading its fields through "
                         "the coupler", self.name, info.name, info.endpoint, exc)
                with self._lock:
                    self._relay_only.add(info.name)
        return self.relay(info.name)

    def relay(self, producer: str) -> Channel:
        """A channel to ``producer``'s store service that the coupler relays."""
        channel, reply = self._ask({"op": "relay", "name": producer})
        if reply != "ok":
            channel.close()
            raise TransportError(f"the coupler does not relay to {producer}: {reply}")
        return channel

    def _ask(self, message: dict[str, Any]) -> tuple[Channel, Any]:
        """A new connection to the coupler's registry, ``message`` sent on it, and the
        reply; the connection stays open for the caller."""
        channel = connect(self.coupler, self.token, name=self.name, tls=self.tls,
                          timeout=CONNECT_TIMEOUT)
        try:
            channel.sock.settimeout(FIELD_READ_TIMEOUT)
            channel.send(message)
            return channel, channel.receive()
        except BaseException:
            channel.close()
            raise


def relay(reader: Channel, producer: Channel) -> None:
    """Pass a field reader's requests to a producer's store service and its replies back,
    frame by frame in this one thread (each TLS connection is read and written by one thread
    only), until either end closes. A reply's buffers stream through, never held whole."""
    with contextlib.suppress(OSError, TransportError):
        while True:
            reader.forward_frame(producer)
            producer.forward_frame(reader)
