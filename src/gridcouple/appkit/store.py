"""FieldStore: immutable, atomically written field versions in a zarr v3 store, and FieldRef,
the small remote reference a receiver uses to read them straight from the store.

Layout (a zarr v3 hierarchy, so ``xarray.open_zarr(root, group="temperature/v000003")`` opens a
version with its coordinates)::

    ROOT/temperature/v000003/            group; attributes["gridcouple"] describes the field
    ROOT/temperature/v000003/temperature array (uncompressed, chunked along the first axis)
    ROOT/temperature/v000003/x, y        vertex (or cell centre) coordinates of a structured mesh
    ROOT/temperature/times/0.1/          the commit of the version at time 0.1: {"version": 3}
    ROOT/meshes/<digest>/vertices, cells-*  an unstructured mesh, written once and shared

A version is addressed by its field and time: there is at most one per (field id, time), and
it never changes. It is written completely first, then committed by creating its time marker
create-only (a hard link on a file system, ``pipe_file(mode="create")`` on fsspec); a version
without its marker is never listed or handed out; the latest version is the highest
``vNNNNNN`` whose marker commits it. Putting the same values for a time again
returns the committed version; other values for it raise :class:`VersionConflictError`.

Version numbers are taken exclusively too: on a file system a version is written under
``ROOT/.staging/`` and renamed to the next free ``vNNNNNN`` (a rename never replaces a written
version); on other fsspec stores the version's group metadata is created create-only before its
values are written in place. So a reader never sees half a version, two writers never share a
number, and a producer killed mid-write leaves the earlier versions as they were.

What a writer stages is named for its process (host, pid and start time): opening a store
removes what dead writers of this host left in ``.staging`` (and, from other hosts or from
before the names carried their writer, what is older than a day). Field ids are the store's
names too, so ids it uses itself (``meshes``, ``zarr.json``, any starting with ``.``) are
refused. :func:`new_scratch_root` makes a session's own directory of stores, named for its
process likewise, after removing those whose process is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any, Protocol

import numpy as np

from gridcouple.appkit.data import (
    FIELD_ID_PATTERN,
    Field,
    Mesh,
    StructuredMesh,
    UnstructuredMesh,
    is_finite_real,
)
from gridcouple.errors import GridcoupleError

CHUNK_BYTES = 8 * 1024 * 1024
IO_THREADS = 4
_VERSION_PREFIX = "v"
_STAGING = ".staging"
_MESHES = "meshes"
_TIMES = "times"
_RESERVED_IDS = frozenset({_MESHES, "zarr.json"})  # the root's own names (and ".*")
_STORED_MESH = re.compile(rf"{_MESHES}/[0-9a-f]{{40}}")
#: staging left by a writer whose liveness cannot be told (another host) is stale after this
STALE_STAGING_AGE = 24 * 3600.0
SCRATCH_PREFIX = "gridcouple-fields-"
# host_pid_starttime_ at the start of a name: the process that made it
_OWNER = re.compile(r"(?P<host>[A-Za-z0-9.-]+)_(?P<pid>[0-9]{1,10})_(?P<start>[0-9]{1,20})_")
# On file systems whose create-only write checks, then writes (memory://, fsspec's default
# pipe_file), this lock makes it one step within one process; see _needs_create_lock.
_CREATE_LOCK = threading.Lock()
PRODUCER_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")  # an application's name in a session
_STORE_ID = re.compile(r"[0-9a-f]{32}")
_REF_KEYS = frozenset({"store_url", "field_id", "version", "shape", "dtype", "chunks", "mesh",
                       "value_type", "units", "time", "location", "metadata", "producer",
                       "store_id"})


class StoreReader(Protocol):
    """Read access to one field store's keys (``temperature/v000003/zarr.json``...): a
    confined local directory, or a producer's server (gridcouple.appkit.remote)."""

    url: str

    def get(self, key: str, start: int | None = None, end: int | None = None,
            suffix: int | None = None) -> bytes | bytearray | None:
        """The bytes of ``key`` (``[start:end]``, or the last ``suffix``); None if absent."""

    def read_into(self, key: str, target: memoryview) -> int:
        """Fill ``target`` from the start of ``key``; the bytes read (0: absent)."""

    def list_dir(self, prefix: str) -> list[str]:
        """The names directly below ``prefix``."""

    def zarr_store(self) -> Any:
        """A read-only zarr v3 store of the whole store."""


#: How this process reads FieldRefs it did not make itself: installed by
#: gridcouple.appkit.remote inside a coupling session (the coupler, its application
#: servers); None elsewhere.
ref_resolver: Callable[[FieldRef], Any] | None = None


class VersionConflictError(ValueError):
    """A field already has a committed version for that time, with other values."""


class RefRefusedError(ValueError):
    """A FieldRef this process will not read: it names no producer of this coupling session,
    a store its producer does not serve, a URL, or a file outside its store."""


class FieldUnavailableError(GridcoupleError):
    """The producer that serves a FieldRef's store has gone (or does not answer)."""


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser().absolute()


def _version_name(version: int) -> str:
    return f"{_VERSION_PREFIX}{version:06d}"


def _time_key(time: Any, field_id: str) -> str:
    """The name of a time's marker: the shortest repr of the float (-0.0 is 0.0)."""
    if not is_finite_real(time):
        raise ValueError(f"field {field_id!r}: a stored version is addressed by its time, which "
                         f"must be a finite number, got {time!r}")
    return repr(float(time) + 0.0)


@dataclass(frozen=True)
class FieldRef:
    """Where one immutable field version lives; cheap to send, read by the receiver itself."""

    store_url: str
    field_id: str
    version: int
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    mesh: Mapping[str, Any]  # a mesh's wire form, or {"kind": "stored", "path": ...}
    value_type: str = "scalar"
    units: str = ""
    time: float | None = None
    location: str = "vertex"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    producer: str = ""  # the application (in its coupling session) that serves the store
    store_id: str = ""  # the store's identity, written in its root when it was made

    def __post_init__(self) -> None:
        """A reference (perhaps from the wire) names a version inside its store only."""
        _check_field_id(self.field_id)
        if not isinstance(self.store_url, str) or not self.store_url or "\0" in self.store_url:
            raise ValueError(f"FieldRef of field {self.field_id!r}: store_url must be a "
                             f"non-empty string, got {self.store_url!r}")
        if self.producer and not (isinstance(self.producer, str)
                                  and PRODUCER_NAME.fullmatch(self.producer)):
            raise ValueError(f"FieldRef of field {self.field_id!r}: producer {self.producer!r} "
                             "is not an application name")
        if self.store_id and not (isinstance(self.store_id, str)
                                  and _STORE_ID.fullmatch(self.store_id)):
            raise ValueError(f"FieldRef of field {self.field_id!r}: store_id "
                             f"{self.store_id!r} is not a store identity")
        if isinstance(self.version, bool) or not isinstance(self.version, int) \
                or self.version < 0:
            raise ValueError(f"FieldRef of field {self.field_id!r}: version must be a whole "
                             f"number >= 0, got {self.version!r}")
        if not isinstance(self.mesh, Mapping):
            raise ValueError(f"FieldRef of field {self.field_id!r}: mesh must be a mapping")
        if self.mesh.get("kind") == "stored" and not (
                isinstance(self.mesh.get("path"), str)
                and _STORED_MESH.fullmatch(self.mesh["path"])):
            raise ValueError(f"FieldRef of field {self.field_id!r}: a stored mesh lives at "
                             f"{_MESHES}/<sha1>, not at {self.mesh.get('path')!r}")

    @property
    def group_path(self) -> str:
        """The version's group below the store root."""
        return f"{self.field_id}/{_version_name(self.version)}"

    @property
    def array_path(self) -> str:
        """The values array below the store root."""
        return f"{self.group_path}/{self.field_id}"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def reader(self) -> StoreReader:
        """How this process reads the store: directly (a store it made, a local directory or
        one its producer serves that this host sees, confined to the store's root), or
        through the producer's application server. Inside a coupling session a ref must name
        an application of the session and the store it serves; elsewhere only local
        directories (and memory://) are read. Raises :class:`RefRefusedError` otherwise."""
        if getattr(self, "_made_here", False):
            return direct_reader(self.store_url)
        if ref_resolver is not None:
            return ref_resolver(self)  # type: ignore[no-any-return]
        if _is_local(self.store_url) or self.store_url.startswith("memory://"):
            return direct_reader(self.store_url)
        raise RefRefusedError(
            f"field {self.field_id!r} version {self.version}: refusing to read "
            f"{self.store_url!r}: outside a coupling session only local stores are read")

    def open(self) -> Any:
        """The values as a read-only zarr array: index it to read only the chunks you need
        (through a producer's server, only those chunks travel)."""
        import zarr

        return zarr.open_array(self.reader().zarr_store(), path=self.array_path, mode="r")

    def to_dask(self) -> Any:
        """The values as a lazy dask array, one task per chunk."""
        import dask.array as da

        return da.from_zarr(self.open())

    def open_dataset(self) -> Any:
        """The version as a lazy xarray Dataset, with its coordinates (needs ``xarray``)."""
        import xarray

        return xarray.open_zarr(self.reader().zarr_store(), group=self.group_path,
                                consolidated=False)

    def read(self, out: np.ndarray | None = None) -> np.ndarray:
        """All values, read chunk by chunk straight from the store: into ``out`` when given (a
        writable C-contiguous array of this shape and dtype, e.g. last step's), else into a new
        array. Returns the array read into."""
        if out is not None and (out.shape != self.shape or out.dtype != np.dtype(self.dtype)
                                or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(
                f"read(out=...) of field {self.field_id!r} version {self.version} needs a "
                f"writable C-contiguous array of shape {self.shape} and dtype "
                f"{np.dtype(self.dtype)}, got shape {out.shape} and dtype {out.dtype}"
                f"{'' if out.flags.c_contiguous else ', not C-contiguous'}"
                f"{'' if out.flags.writeable else ', read-only'}")
        reader = self.reader()
        fast = _read_plain(reader, self.array_path, out)
        if fast is not None:
            return fast
        import zarr

        array = zarr.open_array(reader.zarr_store(), path=self.array_path, mode="r")
        if out is None:
            return np.asarray(array[...])
        for slab in _slabs(self.shape, self.chunks):
            out[slab] = array[slab]
        return out

    def load_mesh(self) -> Mesh:
        """The field's mesh (an unstructured one is read from the store)."""
        if self.mesh.get("kind") == "stored":
            return _read_mesh(self.reader().zarr_store(), self.mesh["path"])
        return Mesh.from_wire(self.mesh)

    def to_field(self, out: np.ndarray | None = None) -> Field:
        """A numpy-backed Field with all values read (into ``out``, as :meth:`read`)."""
        return Field(self.load_mesh(), self.read(out), self.field_id,
                     self.value_type, self.units, self.time,  # type: ignore[arg-type]
                     self.location, dict(self.metadata))  # type: ignore[arg-type]

    def to_wire(self) -> dict[str, Any]:
        return {"store_url": self.store_url, "field_id": self.field_id,
                "version": self.version, "shape": list(self.shape), "dtype": self.dtype,
                "chunks": list(self.chunks), "mesh": dict(self.mesh),
                "value_type": self.value_type, "units": self.units, "time": self.time,
                "location": self.location, "metadata": dict(self.metadata),
                "producer": self.producer, "store_id": self.store_id}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FieldRef:
        values = dict(data)
        unknown = sorted(map(str, set(values) - _REF_KEYS))
        if unknown:
            raise ValueError(f"a FieldRef has no {', '.join(unknown)}")
        for key in ("shape", "chunks"):
            values[key] = tuple(values[key])
        return cls(**values)

    def _mark_made_here(self) -> FieldRef:
        """Note that this process made the ref from its own FieldStore (not carried on the
        wire): it is read from that store directly."""
        object.__setattr__(self, "_made_here", True)
        return self


class FieldStore:
    """Field versions below one root: a directory (also ``/dev/shm/...``) or an fsspec URL.

    ``producer`` names the application that serves the store in a coupling session; its
    refs carry it, and the store's identity (``store_id``, made with the store's root), so
    a reader on another host can tell whether the directory it sees at that path is this
    store or merely has its name."""

    def __init__(self, url: str | os.PathLike[str], *, chunk_bytes: int = CHUNK_BYTES,
                 producer: str = "") -> None:
        text = os.fspath(url)
        self.local = _is_local(text)
        self.url = str(_local_path(text)) if self.local else text
        self.chunk_bytes = chunk_bytes
        if producer and not PRODUCER_NAME.fullmatch(producer):
            raise ValueError(f"FieldStore producer {producer!r} is not an application name")
        self.producer = producer
        self._groups: set[str] = set()  # the groups this store has made or found
        if self.local:
            _local_path(self.url).mkdir(parents=True, exist_ok=True)
        _create_exclusive(self.url, "zarr.json", _group_json({"store_id": uuid.uuid4().hex}))
        self._groups.add("")
        found = self._attributes_at("zarr.json").get("store_id", "")
        self.store_id = found if isinstance(found, str) and _STORE_ID.fullmatch(found) else ""
        if self.local:
            _clean_staging(_local_path(self.url) / _STAGING)
            self._ensure_groups_once(_STAGING)  # a group, so zarr sees no stray folder

    def __repr__(self) -> str:
        return f"FieldStore({self.url!r})"

    # --- writing ---------------------------------------------------------------------

    def put(self, field: Field) -> FieldRef:
        """Store ``field`` as the version of its field id at ``field.time``; returns its
        reference. The same values again for that time return the version already there;
        other values raise :class:`VersionConflictError`."""
        field_id = field.field_id
        _check_field_id(field_id)
        time_key = _time_key(field.time, field_id)
        values = np.ascontiguousarray(field.values)
        if values.dtype.hasobject:
            raise ValueError(f"Field {field_id!r}: object arrays cannot be stored")
        committed = self._marker(field_id, time_key)
        if committed is not None:
            return self._same_or_conflict(field, values, committed)
        mesh = self._store_mesh(field.mesh)
        chunks = _chunks_for(values.shape, values.dtype.itemsize, self.chunk_bytes)
        attributes = {**field.describe(), "mesh": mesh}
        self._ensure_groups_once(f"{field_id}/{_TIMES}")
        if self.local:
            staging = _staging_path(self.url)
            _write_version(str(staging), field, values, chunks, attributes)
            version = self._publish(staging, field_id)
        else:
            version = self._claim(field_id, attributes)
            _write_version(self._path(f"{field_id}/{_version_name(version)}"), field, values,
                           chunks)
        marker = {"version": version, "time": field.time}
        if not _create_exclusive(self.url, f"{field_id}/{_TIMES}/{time_key}/zarr.json",
                                 _group_json(marker)):
            # Another writer committed this time first; ours was never visible.
            _remove(self.url, f"{field_id}/{_version_name(version)}")
            winner = self._marker(field_id, time_key)
            assert winner is not None, f"{self}: the marker of {field_id!r} at {time_key} vanished"
            return self._same_or_conflict(field, values, winner)
        return FieldRef(self.url, field_id, version, values.shape, values.dtype.str, chunks,
                        mesh, field.value_type, field.units, field.time, field.location,
                        dict(field.metadata), self.producer, self.store_id)._mark_made_here()

    def _publish(self, staging: Path, field_id: str) -> int:
        """Rename a fully written staging group to the next free version name."""
        directory = _local_path(self.url) / field_id
        version = self._next_version(field_id)
        while True:
            try:
                os.rename(staging, directory / _version_name(version))
                return version
            except OSError:  # another writer took that version first
                if not (directory / _version_name(version)).exists():
                    raise
                version += 1

    def _claim(self, field_id: str, attributes: dict[str, Any]) -> int:
        """Take the next free version number by creating its group metadata create-only."""
        version = self._next_version(field_id)
        while not _create_exclusive(self.url, f"{field_id}/{_version_name(version)}/zarr.json",
                                    _group_json(attributes)):
            version += 1
        return version

    def _next_version(self, field_id: str) -> int:
        """One more than any version name present, committed or not."""
        return max(self._version_numbers(field_id), default=0) + 1

    def _version_numbers(self, field_id: str) -> list[int]:
        """The numbers of the version names present, committed or not, in no order."""
        return [int(name[1:]) for name in _list_dir(self.url, field_id)
                if name.startswith(_VERSION_PREFIX) and name[1:].isdigit()]

    def _same_or_conflict(self, field: Field, values: np.ndarray,
                          marker: Mapping[str, Any]) -> FieldRef:
        """The committed version ``marker`` names if it holds ``field``; else the conflict."""
        version = marker["version"]  # the marker commits it
        attributes = self._attributes_at(f"{field.field_id}/{_version_name(version)}/zarr.json")
        ref = self._ref(field.field_id, version, attributes)
        mesh = _mesh_description(field.mesh)
        ours = _jsonable({**field.describe(), "mesh": mesh, "shape": values.shape,
                          "dtype": values.dtype.str})
        theirs = _jsonable({**attributes, "shape": ref.shape, "dtype": ref.dtype})
        differs = [key for key in ours if ours[key] != theirs.get(key)]
        if not differs:
            stored = ref.open()
            nan = values.dtype.kind in "fc"
            if not all(np.array_equal(stored[slab], values[slab], equal_nan=nan)
                       for slab in _slabs(ref.shape, ref.chunks)):
                differs = ["values"]
        if differs:
            raise VersionConflictError(
                f"{self}: field {field.field_id!r} already has version {ref.version} at time "
                f"{field.time!r}, with other {', '.join(differs)}; a version never changes: "
                "store the new values at another time")
        return ref

    def _store_mesh(self, mesh: Mesh) -> dict[str, Any]:
        if isinstance(mesh, StructuredMesh):
            return mesh.to_wire()
        assert isinstance(mesh, UnstructuredMesh)
        path = _mesh_path(mesh)
        if self.local:
            final = _local_path(self.url) / path
            if not final.exists():
                staging = _staging_path(self.url)
                _write_mesh(str(staging), mesh)
                self._ensure_groups_once(_MESHES)
                try:
                    os.rename(staging, final)
                except OSError:  # written meanwhile by someone else: the same content
                    shutil.rmtree(staging, ignore_errors=True)
        elif not self._attributes_at(f"{path}/zarr.json").get("complete"):
            # Concurrent writers of one mesh write the same bytes and never delete; the mesh
            # counts once one of them has written it all.
            _ensure_groups(self.url, path)
            _write_mesh(self._path(path), mesh, exists=True)
            _set_attributes(self._path(path), {"complete": True})
        return {"kind": "stored", "path": path}

    # --- reading ---------------------------------------------------------------------

    def times(self, field_id: str) -> dict[float, int]:
        """The committed versions of ``field_id`` by time: {time: version}, earliest first."""
        _check_field_id(field_id)
        found = {}
        for key in _list_dir(self.url, f"{field_id}/{_TIMES}"):
            marker = self._marker(field_id, key) if key != "zarr.json" else None
            if marker is not None:
                found[marker["time"]] = marker["version"]
        return dict(sorted(found.items()))

    def versions(self, field_id: str) -> list[int]:
        """The committed versions of ``field_id``, oldest first (reads every marker, as
        :meth:`times`)."""
        return sorted(self.times(field_id).values())

    def field_ids(self) -> list[str]:
        """The field ids with at least one committed version."""
        return sorted(name for name in _list_dir(self.url, "")
                      if _id_problem(name) is None and self._latest(name) is not None)

    def ref(self, field_id: str, version: int | None = None, *,
            time: float | None = None) -> FieldRef:
        """The reference to one committed version: the one at ``time``, or number
        ``version``, or the last one written when neither is given."""
        _check_field_id(field_id)
        if time is not None:
            if version is not None:
                raise ValueError(f"{self}: field {field_id!r}: ref: give a version or a time, "
                                 "not both")
            marker = self._marker(field_id, _time_key(time, field_id))
            if marker is None:
                raise KeyError(f"{self}: field {field_id!r} has no version at time {time!r}")
            version = marker["version"]  # the marker commits it: no second look at it
            attributes = self._attributes_at(f"{field_id}/{_version_name(version)}/zarr.json")
        elif version is None:
            latest = self._latest(field_id)
            if latest is None:
                raise KeyError(f"{self}: no version of field {field_id!r}")
            version, attributes = latest
        else:
            found = self._committed(field_id, version)
            if found is None:
                raise KeyError(f"{self}: field {field_id!r} has no committed version {version}")
            attributes = found
        return self._ref(field_id, version, attributes)

    def _latest(self, field_id: str) -> tuple[int, dict[str, Any]] | None:
        """The newest committed version of ``field_id`` and its attributes, or None: the
        version names from the highest down, until one's commit checks out (normally the
        first)."""
        for version in sorted(self._version_numbers(field_id), reverse=True):
            attributes = self._committed(field_id, version)
            if attributes is not None:
                return version, attributes
        return None

    def _committed(self, field_id: str, version: int) -> dict[str, Any] | None:
        """The attributes of version ``version`` if its time's marker commits it, else None."""
        attributes = self._attributes_at(f"{field_id}/{_version_name(version)}/zarr.json")
        marker = (self._marker(field_id, _time_key(attributes["time"], field_id))
                  if "time" in attributes else None)
        return attributes if marker is not None and marker["version"] == version else None

    def _ref(self, field_id: str, version: int, attributes: Mapping[str, Any]) -> FieldRef:
        """The reference to a committed version with these attributes."""
        array = _read_json(self.url, f"{field_id}/{_version_name(version)}/{field_id}/zarr.json")
        return FieldRef(
            self.url, field_id, version, tuple(array["shape"]),
            np.dtype(array["data_type"]).str,
            tuple(array["chunk_grid"]["configuration"]["chunk_shape"]), attributes["mesh"],
            attributes["value_type"], attributes["units"], attributes["time"],
            attributes["location"], attributes.get("metadata", {}), self.producer,
            self.store_id)._mark_made_here()

    def get(self, field_id: str, version: int | None = None, *,
            time: float | None = None) -> Field:
        """One version (as :meth:`ref` chooses it) as a numpy-backed Field."""
        return self.ref(field_id, version, time=time).to_field()

    def prune(self, field_id: str, keep: int) -> None:
        """Delete all but the newest ``keep`` versions of ``field_id`` (each one's commit
        marker first, so no reader is handed a version being deleted)."""
        if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or keep < 0:
            raise ValueError(f"{self}: prune {field_id!r}: keep must be a whole number >= 0, "
                             f"got {keep!r}")  # keep=-1 deleted the oldest version
        by_version = {version: time for time, version in self.times(field_id).items()}
        for version in sorted(by_version)[:-keep or None]:
            _remove(self.url, f"{field_id}/{_TIMES}/{_time_key(by_version[version], field_id)}")
            _remove(self.url, f"{field_id}/{_version_name(version)}")

    def open_dataset(self, field_id: str, version: int | None = None, *,
                     time: float | None = None) -> Any:
        """One version as an xarray Dataset (needs the optional ``xarray`` package)."""
        import xarray

        ref = self.ref(field_id, version, time=time)
        return xarray.open_zarr(_zarr_store(self.url), group=ref.group_path, consolidated=False)

    def _marker(self, field_id: str, time_key: str) -> dict[str, Any] | None:
        """The commit of ``field_id`` at a time: {"version", "time"}, or None."""
        marker = self._attributes_at(f"{field_id}/{_TIMES}/{time_key}/zarr.json")
        return marker if "version" in marker else None

    def _attributes_at(self, path: str) -> dict[str, Any]:
        try:
            meta = _read_json(self.url, path)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return meta.get("attributes", {}).get("gridcouple", {})

    def _ensure_groups_once(self, path: str) -> None:
        """:func:`_ensure_groups` once per path and FieldStore (the store never deletes a group
        it made: prune removes versions and markers only)."""
        if path not in self._groups:
            _ensure_groups(self.url, path)
            self._groups.add(path)

    def _path(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/{path}"


# --- helpers -----------------------------------------------------------------------------

def _check_field_id(field_id: str) -> None:
    problem = _id_problem(field_id)
    if problem is not None:
        raise ValueError(f"invalid field id {field_id!r}: {problem}")


def _id_problem(field_id: Any) -> str | None:
    """Why ``field_id`` cannot name a field in a store, or None."""
    if not isinstance(field_id, str) or not FIELD_ID_PATTERN.fullmatch(field_id):
        return "use 1-128 letters, digits, '_', '.', '+' or '-'"
    if field_id.startswith(".") or field_id.lower() in _RESERVED_IDS:
        return ("the store keeps its own data under that name (ids may not start with '.' "
                f"nor be {' or '.join(sorted(_RESERVED_IDS))})")
    return None


# --- who wrote it: staging and scratch directories named for their process ----------------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _owner_tag() -> str:
    """``host_pid_starttime``: this process, as the names of what it stages carry it."""
    global _TAG
    pid = os.getpid()
    if _TAG is None or _TAG[0] != pid:  # once per process (a fork is another)
        _TAG = (pid, f"{_host()}_{pid}_{_start_time(pid) or 0}")
    return _TAG[1]


_TAG: tuple[int, str] | None = None


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; 0 where that cannot be read);
    None if there is no such process, or only its zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return None if fields[0] == b"Z" else int(fields[19])
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def _owner_gone(name: str) -> bool | None:
    """Whether the process ``name`` starts with (see :func:`_owner_tag`) has ended: None
    when that cannot be told (no tag, or another host's)."""
    match = _OWNER.match(name)
    if match is None or match["host"] != _host():
        return None
    started, recorded = _start_time(int(match["pid"])), int(match["start"])
    return started is None or (0 not in (started, recorded) and started != recorded)


def _staging_path(url: str, suffix: str = "") -> Path:
    """A fresh name in the store's staging folder, carrying its writer."""
    return _local_path(url) / _STAGING / f"{_owner_tag()}_{uuid.uuid4().hex}{suffix}"


def _clean_staging(staging: Path) -> None:
    """Remove what writers left in ``staging``: of this host, once their process is gone;
    else (another host's, or untagged) once untouched for STALE_STAGING_AGE."""
    try:
        entries = list(os.scandir(staging))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name == "zarr.json":
            continue
        gone = _owner_gone(entry.name)
        try:
            if gone is None:
                gone = time.time() - entry.stat(follow_symlinks=False).st_mtime \
                    > STALE_STAGING_AGE
            if not gone:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another opener removed it first
            continue


def new_scratch_root(base: str | os.PathLike[str] | None = None) -> str:
    """A new directory (mode 0700) for a session's field stores in ``base`` (default: the
    temporary directory), named for this process; first removes the ones in ``base`` whose
    process is gone (:func:`clean_orphaned_scratch_roots`)."""
    clean_orphaned_scratch_roots(base)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_owner_tag()}_", dir=base)


def clean_orphaned_scratch_roots(base: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the directories :func:`new_scratch_root` made in ``base`` whose process, on
    this host, is gone (a SIGKILLed coupler's /dev/shm/gridcouple-fields-*), and return
    them. Live ones, other hosts', other users', untagged ones and symlinks are left."""
    base = os.fspath(base) if base is not None else tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not (entry.name.startswith(SCRATCH_PREFIX)
                and _owner_gone(entry.name.removeprefix(SCRATCH_PREFIX))):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _chunks_for(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Chunk along the first axis only, so each chunk is one contiguous slab of the array."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, min(shape[0], chunk_bytes // max(row_bytes, 1)))
    return (rows, *shape[1:])


def _slabs(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[slice | EllipsisType]:
    """The chunks of an array chunked along its first axis, as index expressions."""
    if not shape:
        yield ...
        return
    for start in range(0, shape[0], chunks[0]):
        yield slice(start, start + chunks[0])


def _mesh_description(mesh: Mesh) -> dict[str, Any]:
    """How a version's attributes name its mesh: a structured one inline, an unstructured one
    by the path of its stored arrays."""
    if isinstance(mesh, StructuredMesh):
        return mesh.to_wire()
    assert isinstance(mesh, UnstructuredMesh)  # the two kinds of mesh
    return {"kind": "stored", "path": _mesh_path(mesh)}


def _mesh_path(mesh: UnstructuredMesh) -> str:
    """Where an unstructured mesh is stored: named by the digest of its content."""
    digest = hashlib.sha1(mesh.vertices.tobytes())
    for name, cells in sorted(mesh.cells.items()):
        digest.update(name.encode())
        digest.update(cells.tobytes())
    return f"{_MESHES}/{digest.hexdigest()}"


def _zarr_store(url: str) -> Any:
    import zarr

    if _is_local(url):
        return zarr.storage.LocalStore(_local_path(url))
    return zarr.storage.FsspecStore.from_url(url)


def _dimension_names(field: Field, ndim: int) -> tuple[str, ...]:
    if isinstance(field.mesh, StructuredMesh):
        leading = ("x", "y", "z")[: field.mesh.dimension]
    else:
        leading = (field.location,)
    components = {"scalar": (), "vector": ("component",), "tensor": ("row", "column")}
    return (*leading, *components[field.value_type])[:ndim]


def _write_version(path: str, field: Field, values: np.ndarray, chunks: tuple[int, ...],
                   attributes: dict[str, Any] | None = None) -> None:
    """Write a version's arrays: into a fresh group with ``attributes`` at ``path``, or (no
    attributes) into the group already created there."""
    import zarr

    if attributes is None:
        group = zarr.open_group(_zarr_store(path), mode="r+")
    else:
        group = zarr.open_group(_zarr_store(path), mode="w",
                                attributes={"gridcouple": _jsonable(attributes)})
    array = group.create_array(
        field.field_id, shape=values.shape, dtype=values.dtype, chunks=chunks or "auto",
        compressors=None, filters=None, fill_value=0, dimension_names=_dimension_names(
            field, values.ndim))
    if isinstance(field.mesh, StructuredMesh):
        offset = 0.0 if field.location == "vertex" else 0.5
        for name, coordinate, spacing in zip(("x", "y", "z"), field.mesh.coordinates(),
                                             field.mesh.spacing, strict=False):
            points = coordinate if field.location == "vertex" else coordinate[:-1]
            group.create_array(name, data=points + offset * spacing, dimension_names=(name,))
    if _is_local(path) and _write_local_chunks(Path(path) / field.field_id, values, chunks):
        return
    array[...] = values


def _set_attributes(path: str, attributes: dict[str, Any]) -> None:
    import zarr

    group = zarr.open_group(_zarr_store(path), mode="r+")
    group.attrs.update({"gridcouple": _jsonable(attributes)})


def _write_mesh(path: str, mesh: UnstructuredMesh, *, exists: bool = False) -> None:
    """Write a mesh's arrays into a fresh group, or (``exists``) into the group at ``path``
    without deleting what may be there."""
    import zarr

    group = zarr.open_group(_zarr_store(path), mode="r+" if exists else "w")
    arrays = {"vertices": mesh.vertices, **{f"cells-{k}": v for k, v in mesh.cells.items()}}
    for name, data in arrays.items():
        group.require_array(name, shape=data.shape, dtype=data.dtype)[...] = data


def _read_mesh(store: Any, path: str) -> UnstructuredMesh:
    """The unstructured mesh at ``path`` of the zarr store ``store``."""
    import zarr

    group = zarr.open_group(store, path=path, mode="r")
    cells = {name.removeprefix("cells-"): array[...] for name, array in group.arrays()
             if name.startswith("cells-")}
    vertices = group["vertices"]
    assert isinstance(vertices, zarr.Array)  # written by _write_mesh
    return UnstructuredMesh(vertices[...], cells)


def _group_json(attributes: Mapping[str, Any]) -> bytes:
    """A zarr v3 group's metadata document with our attributes."""
    return json.dumps({"zarr_format": 3, "node_type": "group",
                       "attributes": {"gridcouple": _jsonable(attributes)}}).encode()


def _ensure_groups(url: str, path: str) -> None:
    """Make the root and every level down to ``path`` a zarr group (those missing), so the
    hierarchy opens from the root."""
    parts = path.split("/")
    for depth in range(len(parts) + 1):
        key = "/".join([*parts[:depth], "zarr.json"])
        if not _exists(url, key):
            _create_exclusive(url, key, json.dumps(
                {"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())


def _exists(url: str, path: str) -> bool:
    if _is_local(url):
        return (_local_path(url) / path).exists()
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return bool(fs.exists(f"{root.rstrip('/')}/{path}"))


def _create_exclusive(url: str, path: str, data: bytes) -> bool:
    """Create the file ``path`` below ``url`` holding ``data``, unless it exists: True if this
    call created it. Readers see the whole file or none."""
    if _is_local(url):
        target = _local_path(url) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = _staging_path(url, ".json")
        temporary.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        try:
            os.link(temporary, target)  # unlike rename, link never replaces a file
        except FileExistsError:
            return False
        finally:
            temporary.unlink()
        return True
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    with _CREATE_LOCK if _needs_create_lock(fs) else contextlib.nullcontext():
        try:
            fs.pipe_file(f"{root.rstrip('/')}/{path}", data, mode="create")
        except FileExistsError:
            return False
    return True


def _needs_create_lock(fs: Any) -> bool:
    """Whether ``fs``'s create-only write checks, then writes: memory://, and any file system
    that keeps fsspec's default ``pipe_file``."""
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.spec import AbstractFileSystem

    return isinstance(fs, MemoryFileSystem) or getattr(
        fs.pipe_file, "__func__", None) is AbstractFileSystem.pipe_file


def _remove(url: str, path: str) -> None:
    """Delete the directory ``path`` below ``url`` and all below it, if it is there."""
    if _is_local(url):
        shutil.rmtree(_local_path(url) / path, ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(f"{root.rstrip('/')}/{path}", recursive=True)


def _list_dir(url: str, path: str) -> list[str]:
    if _is_local(url):
        try:
            return os.listdir(_local_path(url) / path)
        except (FileNotFoundError, NotADirectoryError):
            return []
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1]
                for entry in fs.ls(f"{root.rstrip('/')}/{path}", detail=False)]
    except FileNotFoundError:
        return []


def _read_json(url: str, path: str) -> dict[str, Any]:
    if _is_local(url):
        return json.loads((_local_path(url) / path).read_text())
    import fsspec

    with fsspec.open(f"{url.rstrip('/')}/{path}", "r") as handle:
        return json.load(handle)


def _jsonable(value: Any) -> Any:
    """Numpy scalars and arrays inside attributes become plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


# --- reading a store: confined to its root, and the fast path for plain chunks ------------

def direct_reader(url: str) -> Any:
    """The reader of a store this process opens itself: a local directory (confined to its
    root, see :class:`ConfinedDirectory`) or an fsspec URL."""
    if _is_local(url):
        return ConfinedDirectory(url)
    return FsspecReader(url)


def check_key(key: Any) -> str:
    """``key`` if it names something below a store root (``a/b/zarr.json``), else
    RefRefusedError: no absolute paths, no empty, ``.`` or ``..`` parts, no NUL."""
    if not isinstance(key, str) or len(key) > 4096 or "\0" in key or key.startswith("/") \
            or any(part in ("", ".", "..") for part in key.split("/")):
        raise RefRefusedError(f"{str(key)[:200]!r} is not a key inside a field store")
    return key


class ConfinedDirectory:
    """Read-only access to the files below a store's root directory, never outside it: a
    key's file is opened without following a final symbolic link, and refused unless the
    opened file is a regular file whose real path is inside the root (so a chunk that is a
    symbolic link to ``/etc/shadow``, or a directory of the store that is one, is refused,
    and a FIFO cannot make a reader hang)."""

    def __init__(self, url: str) -> None:
        self.url = str(_local_path(url))
        self.root = os.path.realpath(self.url)

    def __repr__(self) -> str:
        return f"ConfinedDirectory({self.url!r})"

    def open(self, key: str) -> int:
        """A file descriptor of ``key``'s file (FileNotFoundError if there is none)."""
        path = os.path.join(self.root, check_key(key))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RefRefusedError(f"{key} in the store {self.url} is a symbolic link; "
                                      "refused") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                raise FileNotFoundError(path) from None
            raise
        try:
            real = os.path.realpath(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") \
                else os.path.realpath(path)
            if not real.startswith(self.root + os.sep):
                raise RefRefusedError(f"{key} in the store {self.url} leads outside it (to "
                                      f"{real}); refused")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RefRefusedError(f"{key} in the store {self.url} is not a regular file; "
                                      "refused")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def get(self, key: str, start: int | None = None, end: int | None = None,
            suffix: int | None = None) -> bytearray | None:
        try:
            fd = self.open(key)
        except FileNotFoundError:
            return None
        with open(fd, "rb", buffering=0, closefd=True) as handle:
            first, last = _byte_range(os.fstat(handle.fileno()).st_size, start, end, suffix)
            handle.seek(first)
            return _read_exactly(handle, last - first)

    def view(self, key: str, start: int | None = None, end: int | None = None,
             suffix: int | None = None) -> memoryview | bytes | None:
        """What :meth:`get` returns, as a read-only view of the file mapped into memory: no
        copy, no new memory to fault in (a field's chunk is sent from the page cache). Only
        for files nobody rewrites in place (committed versions): a file truncated while
        mapped faults its reader."""
        try:
            fd = self.open(key)
        except FileNotFoundError:
            return None
        try:
            first, last = _byte_range(os.fstat(fd).st_size, start, end, suffix)
            if last == first:
                return b""
            aligned = first - first % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(fd, last - aligned, offset=aligned, prot=mmap.PROT_READ,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        return memoryview(mapped)[first - aligned:]

    def read_into(self, key: str, target: memoryview) -> int:
        try:
            fd = self.open(key)
        except FileNotFoundError:
            return 0
        with open(fd, "rb", buffering=0, closefd=True) as handle:
            done = 0
            while done < target.nbytes:
                got = handle.readinto(target[done:])
                if not got:
                    raise OSError(f"{key} in the store {self.url} is shorter than "
                                  f"{target.nbytes} bytes")
                done += got
            return done

    def list_dir(self, prefix: str) -> list[str]:
        path = os.path.join(self.root, check_key(prefix)) if prefix else self.root
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise RefRefusedError(f"{prefix} in the store {self.url} leads outside it")
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def zarr_store(self) -> Any:
        from gridcouple.appkit.readonly import ReaderStore

        return ReaderStore(self)


def _byte_range(size: int, start: int | None, end: int | None,
                suffix: int | None) -> tuple[int, int]:
    """The bytes ``[first, last)`` of a file of ``size`` bytes that ``start``/``end``, or the
    last ``suffix``, name, clamped to the file."""
    first = max(0, size - suffix) if suffix is not None else min(start or 0, size)
    return first, size if end is None else max(first, min(end, size))


def _read_exactly(handle: Any, size: int) -> bytearray:
    data = bytearray(size)
    with memoryview(data) as view:
        done = 0
        while done < size:
            got = handle.readinto(view[done:])
            if not got:
                break
            done += got
    del data[done:]
    return data


class FsspecReader:
    """A store at an fsspec URL (memory://, s3://), read as the URL's file system allows."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, root.rstrip("/")

    def get(self, key: str, start: int | None = None, end: int | None = None,
            suffix: int | None = None) -> bytes | None:
        fs, root = self._fs()
        try:
            data = fs.cat_file(f"{root}/{check_key(key)}")
        except FileNotFoundError:
            return None
        if suffix is not None:
            return bytes(data[max(0, len(data) - suffix):])
        return bytes(data[start or 0: end])

    def read_into(self, key: str, target: memoryview) -> int:
        data = self.get(key, 0, target.nbytes)
        if not data:
            return 0
        target[:len(data)] = data
        return len(data)

    def list_dir(self, prefix: str) -> list[str]:
        return _list_dir(self.url, check_key(prefix) if prefix else "")

    def zarr_store(self) -> Any:
        import zarr

        return zarr.storage.FsspecStore.from_url(self.url, read_only=True)


def _plain_layout(meta: Mapping[str, Any]) -> list[tuple[str, int, int]] | None:
    """For an uncompressed array chunked along its first axis in native byte order (its
    ``zarr.json`` is ``meta``), the chunk keys (below the array) with the byte range of the
    C-ordered values each holds; None for any other layout."""
    try:
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        codecs = meta["codecs"]
        if (len(codecs) != 1 or codecs[0]["name"] != "bytes"
                or codecs[0].get("configuration", {}).get("endian", sys.byteorder)
                != sys.byteorder
                or meta["chunk_key_encoding"] != {"name": "default",
                                                  "configuration": {"separator": "/"}}
                or not shape or list(chunks[1:]) != list(shape[1:]) or chunks[0] < 1):
            return None
        itemsize = np.dtype(meta["data_type"]).itemsize
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    tail = "/0" * (len(shape) - 1)
    pieces = []
    for index, start in enumerate(range(0, shape[0], chunks[0])):
        rows = min(chunks[0], shape[0] - start)
        pieces.append((f"c/{index}{tail}", start * row_bytes, rows * row_bytes))
    return pieces


def _read_plain(reader: Any, array_path: str, out: np.ndarray | None = None,
                threads: int = IO_THREADS) -> np.ndarray | None:
    """All values of the array at ``array_path`` read chunk by chunk straight into their
    slab of ``out`` (a new array when None), by ``threads`` threads: no zarr decoding, no
    copy. None when the reader cannot (an fsspec store) or the layout is not plain."""
    if not hasattr(reader, "read_into"):
        return None
    raw = reader.get(f"{array_path}/zarr.json")
    if raw is None:
        raise FileNotFoundError(f"{reader.url}: no array {array_path}")
    meta = json.loads(raw)
    pieces = _plain_layout(meta)
    if pieces is None:
        return None
    if out is None:
        out = np.empty(meta["shape"], dtype=np.dtype(meta["data_type"]))
    elif list(out.shape) != list(meta["shape"]) or out.dtype != np.dtype(meta["data_type"]):
        raise ValueError(f"{reader.url}: {array_path} holds {meta['data_type']} of shape "
                         f"{tuple(meta['shape'])}, not {out.dtype} of shape {out.shape}")
    view = out.reshape(-1).view(np.uint8).data

    def read(piece: tuple[str, int, int]) -> None:
        key, offset, size = piece
        target = view[offset: offset + size]
        if reader.read_into(f"{array_path}/{key}", target) == 0:
            # zarr leaves chunks that are all fill value unwritten
            np.frombuffer(target, dtype=out.dtype)[:] = meta["fill_value"]

    if threads <= 1 or len(pieces) == 1:
        for piece in pieces:
            read(piece)
    else:
        with ThreadPoolExecutor(min(threads, len(pieces))) as pool:
            list(pool.map(read, pieces))
    return out


def _local_layout(array_dir: Path) -> list[tuple[str, int, int]] | None:
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
    except FileNotFoundError:
        return None
    return _plain_layout(meta)


def _write_local_chunks(array_dir: Path, values: np.ndarray, chunks: tuple[int, ...]) -> bool:
    pieces = _local_layout(array_dir)
    if pieces is None:
        return False
    flat = values.reshape(-1).view(np.uint8).data
    chunk_bytes = pieces[0][2] if pieces else 0

    def write(piece: tuple[str, int, int]) -> None:
        key, offset, size = piece
        path = array_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(flat[offset: offset + size])
            if size < chunk_bytes:  # zarr stores edge chunks at full size
                handle.write(bytes(chunk_bytes - size))

    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(write, pieces))
    return True
