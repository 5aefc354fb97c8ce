"""FieldStore: immutable, atomically written field versions in a zarr v3 store, and FieldRef,
the small remote reference a receiver uses to read them straight from the store.

Layout (a zarr v3 hierarchy, so ``xarray.open_zarr(root, group="temperature/v000003")`` opens a
version with its coordinates)::

    ROOT/temperature/v000003/            group; attributes["gridcouple"] describes the field
    ROOT/temperature/v000003/temperature array (uncompressed, chunked along the first axis)
    ROOT/temperature/v000003/x, y        vertex (or cell centre) coordinates of a structured mesh
    ROOT/meshes/<digest>/vertices, cells-*  an unstructured mesh, written once and shared

On a local or shared file system a version is written under ``ROOT/.staging/`` and renamed into
place in one step, so a reader never sees half a version and a producer killed mid-write leaves
the previous versions as they were. On other fsspec stores (``s3://``, ``memory://``) the version
is written in place and marked committed last; uncommitted versions are never listed or handed
out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gridcouple.appkit.data import FIELD_ID_PATTERN, Field, Mesh, StructuredMesh, UnstructuredMesh

CHUNK_BYTES = 8 * 1024 * 1024
IO_THREADS = 4
_VERSION_PREFIX = "v"
_STAGING = ".staging"
_MESHES = "meshes"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser().absolute()


def _version_name(version: int) -> str:
    return f"{_VERSION_PREFIX}{version:06d}"


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

    def open(self) -> Any:
        """The values as a read-only zarr array: index it to read only the chunks you need."""
        import zarr

        return zarr.open_array(_zarr_store(self.store_url), path=self.array_path, mode="r")

    def to_dask(self) -> Any:
        """The values as a lazy dask array, one task per chunk."""
        import dask.array as da

        return da.from_zarr(self.open())

    def read(self) -> np.ndarray:
        """All values as a numpy array, read chunk by chunk straight from the store."""
        if _is_local(self.store_url):
            fast = _read_local_chunks(_local_path(self.store_url) / self.array_path)
            if fast is not None:
                return fast
        return self.open()[...]

    def load_mesh(self) -> Mesh:
        """The field's mesh (an unstructured one is read from the store)."""
        if self.mesh.get("kind") == "stored":
            return _read_mesh(self.store_url, self.mesh["path"])
        return Mesh.from_wire(self.mesh)

    def to_field(self) -> Field:
        """A numpy-backed Field with all values read."""
        return Field(self.load_mesh(), self.read(), self.field_id, self.value_type,  # type: ignore[arg-type]
                     self.units, self.time, self.location,  # type: ignore[arg-type]
                     dict(self.metadata))

    def to_wire(self) -> dict[str, Any]:
        return {"store_url": self.store_url, "field_id": self.field_id,
                "version": self.version, "shape": list(self.shape), "dtype": self.dtype,
                "chunks": list(self.chunks), "mesh": dict(self.mesh),
                "value_type": self.value_type, "units": self.units, "time": self.time,
                "location": self.location, "metadata": dict(self.metadata)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FieldRef:
        values = dict(data)
        for key in ("shape", "chunks"):
            values[key] = tuple(values[key])
        return cls(**values)


class FieldStore:
    """Field versions below one root: a directory (also ``/dev/shm/...``) or an fsspec URL."""

    def __init__(self, url: str | os.PathLike[str], *, chunk_bytes: int = CHUNK_BYTES) -> None:
        text = os.fspath(url)
        self.local = _is_local(text)
        self.url = str(_local_path(text)) if self.local else text
        self.chunk_bytes = chunk_bytes
        if self.local:
            root = _local_path(self.url)
            (root / _STAGING).mkdir(parents=True, exist_ok=True)
            _write_group_metadata(root / _STAGING)  # so zarr sees a group, not a stray folder

    def __repr__(self) -> str:
        return f"FieldStore({self.url!r})"

    # --- writing ---------------------------------------------------------------------

    def put(self, field: Field) -> FieldRef:
        """Write ``field`` as the next version of its field id; returns its reference."""
        values = np.ascontiguousarray(field.values)
        if values.dtype.hasobject:
            raise ValueError(f"Field {field.field_id!r}: object arrays cannot be stored")
        mesh = self._store_mesh(field.mesh)
        chunks = _chunks_for(values.shape, values.dtype.itemsize, self.chunk_bytes)
        attributes = {**field.describe(), "mesh": mesh, "committed": True}
        if self.local:
            staging = _local_path(self.url) / _STAGING / uuid.uuid4().hex
            _write_version(str(staging), field, values, chunks, attributes)
            version = self._publish(staging, field.field_id)
        else:
            version = (self.versions(field.field_id) or [0])[-1] + 1
            path = f"{self.url.rstrip('/')}/{field.field_id}/{_version_name(version)}"
            _write_version(path, field, values, chunks, {**attributes, "committed": False})
            _set_attributes(path, attributes)
        return FieldRef(self.url, field.field_id, version, values.shape, values.dtype.str,
                        chunks, mesh, field.value_type, field.units, field.time,
                        field.location, dict(field.metadata))

    def _publish(self, staging: Path, field_id: str) -> int:
        """Rename a fully written staging group to the next free version name."""
        directory = _local_path(self.url) / field_id
        directory.mkdir(exist_ok=True)
        _write_group_metadata(directory)
        version = (self.versions(field_id) or [0])[-1] + 1
        while True:
            try:
                os.rename(staging, directory / _version_name(version))
                return version
            except OSError:  # another writer took that version first
                if not (directory / _version_name(version)).exists():
                    raise
                version += 1

    def _store_mesh(self, mesh: Mesh) -> dict[str, Any]:
        if isinstance(mesh, StructuredMesh):
            return mesh.to_wire()
        assert isinstance(mesh, UnstructuredMesh)
        digest = hashlib.sha1(mesh.vertices.tobytes())
        for name, cells in sorted(mesh.cells.items()):
            digest.update(name.encode())
            digest.update(cells.tobytes())
        path = f"{_MESHES}/{digest.hexdigest()}"
        if self.local:
            final = _local_path(self.url) / path
            if not final.exists():
                staging = _local_path(self.url) / _STAGING / uuid.uuid4().hex
                _write_mesh(str(staging), mesh)
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(staging, final)
                except OSError:  # written meanwhile by someone else: the same content
                    shutil.rmtree(staging, ignore_errors=True)
        else:
            _write_mesh(f"{self.url.rstrip('/')}/{path}", mesh)
        return {"kind": "stored", "path": path}

    # --- reading ---------------------------------------------------------------------

    def versions(self, field_id: str) -> list[int]:
        """The committed versions of ``field_id``, oldest first."""
        _check_field_id(field_id)
        found = []
        for name in _list_dir(self.url, field_id):
            if name.startswith(_VERSION_PREFIX) and name[1:].isdigit():
                found.append(int(name[1:]))
        if not self.local:  # in-place writes: only the committed ones count
            found = [v for v in found if self._attributes(field_id, v).get("committed")]
        return sorted(found)

    def field_ids(self) -> list[str]:
        """The field ids with at least one version."""
        return sorted(name for name in _list_dir(self.url, "")
                      if FIELD_ID_PATTERN.fullmatch(name) and name != _MESHES
                      and self.versions(name))

    def ref(self, field_id: str, version: int | None = None) -> FieldRef:
        """The reference to one version (the latest when ``version`` is None)."""
        if version is None:
            versions = self.versions(field_id)
            if not versions:
                raise KeyError(f"{self}: no version of field {field_id!r}")
            version = versions[-1]
        attributes = self._attributes(field_id, version)
        if not attributes.get("committed"):
            raise KeyError(f"{self}: field {field_id!r} has no committed version {version}")
        array = _read_json(self.url, f"{field_id}/{_version_name(version)}/{field_id}/zarr.json")
        return FieldRef(
            self.url, field_id, version, tuple(array["shape"]),
            np.dtype(array["data_type"]).str,
            tuple(array["chunk_grid"]["configuration"]["chunk_shape"]), attributes["mesh"],
            attributes["value_type"], attributes["units"], attributes["time"],
            attributes["location"], attributes.get("metadata", {}))

    def get(self, field_id: str, version: int | None = None) -> Field:
        """One version (the latest by default) as a numpy-backed Field."""
        return self.ref(field_id, version).to_field()

    def prune(self, field_id: str, keep: int) -> None:
        """Delete all but the newest ``keep`` versions of ``field_id`` (local stores)."""
        if not self.local:
            raise NotImplementedError("prune works on local stores only")
        for version in self.versions(field_id)[:-keep or None]:
            shutil.rmtree(_local_path(self.url) / field_id / _version_name(version))

    def open_dataset(self, field_id: str, version: int | None = None) -> Any:
        """One version as an xarray Dataset (needs the optional ``xarray`` package)."""
        import xarray

        ref = self.ref(field_id, version)
        return xarray.open_zarr(_zarr_store(self.url), group=ref.group_path, consolidated=False)

    def _attributes(self, field_id: str, version: int) -> dict[str, Any]:
        try:
            meta = _read_json(self.url, f"{field_id}/{_version_name(version)}/zarr.json")
        except FileNotFoundError:
            return {}
        return meta.get("attributes", {}).get("gridcouple", {})


# --- helpers -----------------------------------------------------------------------------

def _check_field_id(field_id: str) -> None:
    if not FIELD_ID_PATTERN.fullmatch(field_id):
        raise ValueError(f"invalid field id {field_id!r}")


def _chunks_for(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Chunk along the first axis only, so each chunk is one contiguous slab of the array."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, min(shape[0], chunk_bytes // max(row_bytes, 1)))
    return (rows, *shape[1:])


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
                   attributes: dict[str, Any]) -> None:
    import zarr

    group = zarr.open_group(_zarr_store(path), mode="w",
                            attributes={"gridcouple": _jsonable(attributes)})
    array = group.create_array(
        field.field_id, shape=values.shape, dtype=values.dtype, chunks=chunks or None,
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


def _write_mesh(path: str, mesh: UnstructuredMesh) -> None:
    import zarr

    group = zarr.open_group(_zarr_store(path), mode="w")
    group.create_array("vertices", data=mesh.vertices)
    for name, cells in mesh.cells.items():
        group.create_array(f"cells-{name}", data=cells)


def _read_mesh(url: str, path: str) -> UnstructuredMesh:
    import zarr

    group = zarr.open_group(_zarr_store(f"{url.rstrip('/')}/{path}"), mode="r")
    cells = {name.removeprefix("cells-"): array[...] for name, array in group.arrays()
             if name.startswith("cells-")}
    return UnstructuredMesh(group["vertices"][...], cells)


def _write_group_metadata(directory: Path) -> None:
    """Make an intermediate directory a zarr group, so the hierarchy opens from the root."""
    for level in (directory.parent, directory):
        meta = level / "zarr.json"
        if not meta.exists():
            meta.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                        "attributes": {}}))


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


# --- the fast path: uncompressed chunks of a local store, read and written directly ---------

def _plain_layout(array_dir: Path) -> tuple[dict[str, Any], list[tuple[str, int, int]]] | None:
    """For an uncompressed array chunked along its first axis in native byte order, the chunk
    files with the byte range of the C-ordered values each holds; None for any other layout."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
    except FileNotFoundError:
        return None
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    codecs = meta["codecs"]
    if (len(codecs) != 1 or codecs[0]["name"] != "bytes"
            or codecs[0].get("configuration", {}).get("endian", sys.byteorder) != sys.byteorder
            or meta["chunk_key_encoding"] != {"name": "default",
                                              "configuration": {"separator": "/"}}
            or not shape or list(chunks[1:]) != list(shape[1:])):
        return None
    itemsize = np.dtype(meta["data_type"]).itemsize
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    tail = "/0" * (len(shape) - 1)
    pieces = []
    for index, start in enumerate(range(0, shape[0], chunks[0])):
        rows = min(chunks[0], shape[0] - start)
        pieces.append((f"c/{index}{tail}", start * row_bytes, rows * row_bytes))
    return meta, pieces


def _read_local_chunks(array_dir: Path) -> np.ndarray | None:
    layout = _plain_layout(array_dir)
    if layout is None:
        return None
    meta, pieces = layout
    out = np.empty(meta["shape"], dtype=np.dtype(meta["data_type"]))
    view = memoryview(out.reshape(-1).view(np.uint8))

    def read(piece: tuple[str, int, int]) -> None:
        key, offset, size = piece
        target = view[offset: offset + size]
        try:
            with open(array_dir / key, "rb", buffering=0) as handle:
                done = 0
                while done < size:
                    got = handle.readinto(target[done:])
                    if not got:
                        raise OSError(f"chunk {array_dir / key} is shorter than {size} bytes")
                    done += got
        except FileNotFoundError:  # zarr leaves chunks that are all fill value unwritten
            np.frombuffer(target, dtype=out.dtype)[:] = meta["fill_value"]

    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(read, pieces))
    return out


def _write_local_chunks(array_dir: Path, values: np.ndarray, chunks: tuple[int, ...]) -> bool:
    layout = _plain_layout(array_dir)
    if layout is None:
        return False
    _, pieces = layout
    flat = memoryview(values.reshape(-1).view(np.uint8))
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
