"""FieldStore on a real zarr v3 directory and on fsspec's memory store: versions by time,
references, atomic and exclusive writes (racing threads and processes), xarray."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from gridcouple.appkit.data import Field, StructuredMesh, UnstructuredMesh
from gridcouple.appkit.store import FieldStore, VersionConflictError, _needs_create_lock

MESH = StructuredMesh((64, 8), origin=(1.0, 0.0), spacing=(0.5, 0.25))


def temperature(value: float, time: float = 0.0) -> Field:
    values = value + np.arange(64 * 8, dtype=np.float64).reshape(64, 8)
    return Field(MESH, values, "temperature", units="K", time=time)


def test_each_put_is_a_new_immutable_version_read_by_reference(tmp_path):
    store = FieldStore(tmp_path, chunk_bytes=1024)  # 16 rows of 8 float64 per chunk
    first, second = store.put(temperature(0.0, 0.1)), store.put(temperature(100.0, 0.2))
    assert (first.version, second.version) == (1, 2)
    assert store.versions("temperature") == [1, 2]
    assert store.times("temperature") == {0.1: 1, 0.2: 2}
    assert store.ref("temperature", time=0.1) == first  # a reader finds a version by time
    assert store.get("temperature", time=0.2).time == 0.2
    assert store.field_ids() == ["temperature"]
    assert second.chunks == (16, 8) and second.shape == (64, 8) and second.time == 0.2
    np.testing.assert_array_equal(first.read(), temperature(0.0).values)
    latest = store.get("temperature")
    assert latest.time == 0.2 and latest.mesh == MESH and latest.units == "K"
    np.testing.assert_array_equal(latest.values, temperature(100.0).values)
    # A receiver may read only the chunks it needs; zarr itself reads what we wrote.
    np.testing.assert_array_equal(second.open()[16:32], temperature(100.0).values[16:32])
    assert zarr.open_array(tmp_path / second.array_path, mode="r").shape == (64, 8)
    assert float(second.to_dask()[:, 0].sum().compute()) == float(
        temperature(100.0).values[:, 0].sum())
    with pytest.raises(KeyError, match="no version of field 'pressure'"):
        store.ref("pressure")
    with pytest.raises(KeyError, match="'temperature' has no version at time 0.3"):
        store.ref("temperature", time=0.3)
    store.prune("temperature", keep=1)
    assert store.versions("temperature") == [2]
    with pytest.raises(KeyError, match="no committed version 1"):
        store.ref("temperature", 1)


@pytest.mark.parametrize("where", ["directory", "memory"])
def test_a_time_has_one_version_putting_it_again_is_idempotent_or_refused(tmp_path, where):
    store = FieldStore(tmp_path if where == "directory" else
                       f"memory://gridcouple-{uuid.uuid4().hex}", chunk_bytes=1024)
    first = store.put(temperature(0.0, 0.1))
    assert store.put(temperature(0.0, 0.1)) == first  # the same values: the same version
    with pytest.raises(VersionConflictError,
                       match=r"'temperature' already has version 1 at time 0.1, with other "
                             r"values; a version never changes"):
        store.put(temperature(1.0, 0.1))
    with pytest.raises(VersionConflictError, match="with other units"):
        store.put(Field(MESH, temperature(0.0).values, "temperature", units="degC", time=0.1))
    assert store.versions("temperature") == [1]
    np.testing.assert_array_equal(store.get("temperature", time=0.1).values,
                                  temperature(0.0).values)
    assert store.put(temperature(1.0, 0.2)).version == 2
    with pytest.raises(ValueError, match="addressed by its time, which must be a finite "
                                         "number, got None"):
        store.put(Field(MESH, temperature(0.0).values, "temperature"))


def test_the_latest_version_is_the_highest_committed_one_found_with_one_marker_read(
        tmp_path, monkeypatch):
    store = FieldStore(tmp_path, chunk_bytes=1024)
    for index in range(5):
        store.put(temperature(float(index), 0.1 * index))
    # A version written but never committed (its writer died before the marker): not listed.
    shutil.copytree(tmp_path / "temperature" / "v000005", tmp_path / "temperature" / "v000006")
    zarr.open_group(tmp_path / "temperature" / "v000006", mode="r+").attrs["gridcouple"] = {
        **store.ref("temperature").to_wire(), "time": 9.0}
    shutil.copytree(tmp_path / "temperature" / "v000005", tmp_path / "orphan" / "v000001")
    marker_reads = []
    original = FieldStore._marker
    monkeypatch.setattr(FieldStore, "_marker", lambda self, field_id, key: (
        marker_reads.append(key), original(self, field_id, key))[1])
    assert store.ref("temperature").version == 5
    assert marker_reads == ["9.0", "0.4"]  # v000006 is skipped; v000005 checks out
    marker_reads.clear()
    store.put(temperature(5.0, 0.5))  # takes the next free number past the uncommitted one
    assert store.ref("temperature").version == 7 and len(marker_reads) == 2  # put's and ref's
    assert store.field_ids() == ["temperature"]  # "orphan" has no committed version
    assert store.versions("temperature") == [1, 2, 3, 4, 5, 7]
    with pytest.raises(ValueError, match=r"FieldStore\(.*\): field 'temperature': ref: give "
                                         r"a version or a time, not both"):
        store.ref("temperature", 1, time=0.1)


def test_a_repeated_put_compares_everything_the_version_stored(tmp_path, monkeypatch):
    store = FieldStore(tmp_path)
    describe = Field.describe
    monkeypatch.setattr(Field, "describe", lambda self: {**describe(self), "origin": "model"})
    first = store.put(temperature(0.0, 0.1))
    assert store.put(temperature(0.0, 0.1)) == first  # a key FieldRef does not carry
    monkeypatch.setattr(Field, "describe", lambda self: {**describe(self), "origin": "other"})
    with pytest.raises(VersionConflictError, match="with other origin"):
        store.put(temperature(0.0, 0.1))


def test_only_file_systems_without_an_atomic_create_take_the_create_lock():
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.spec import AbstractFileSystem

    class CheckThenWrite(AbstractFileSystem):
        """Keeps fsspec's default pipe_file: exists(), then write."""

    class ConditionalWrite(AbstractFileSystem):
        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            """One conditional request, as object stores with If-None-Match."""

    assert _needs_create_lock(MemoryFileSystem())
    assert _needs_create_lock(CheckThenWrite())
    assert not _needs_create_lock(ConditionalWrite())


def test_unstructured_mesh_is_stored_once_and_comes_back(tmp_path):
    mesh = UnstructuredMesh([[0, 0], [1, 0], [0, 1], [1, 1]],
                            {"triangle": [[0, 1, 2], [1, 3, 2]]})
    store = FieldStore(tmp_path)
    displacement = Field(mesh, np.arange(8.0).reshape(4, 2), "u", value_type="vector",
                         time=0.0)
    first, second = store.put(displacement), store.put(displacement.with_values(
        displacement.values, time=1.0))
    assert store.versions("u") == [1, 2]
    assert first.mesh == second.mesh and first.mesh["kind"] == "stored"
    assert [p.is_dir() for p in (tmp_path / "meshes").iterdir()].count(True) == 1
    back = second.to_field()
    assert back.mesh == mesh and back.value_type == "vector"
    np.testing.assert_array_equal(back.values, displacement.values)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from gridcouple.appkit.data import Field, StructuredMesh
    from gridcouple.appkit.store import FieldStore, VersionConflictError
    store = FieldStore(sys.argv[1], chunk_bytes=4096)
    store.put(Field(StructuredMesh((4, 2)), np.ones((4, 2)), "t", time=0.0))
    print("first written", flush=True)
    store.put(Field(StructuredMesh((2**16, 64)), np.zeros((2**16, 64)), "t", time=1.0))  # 32 MiB
    print("second written", flush=True)
""")


def test_a_producer_killed_mid_write_leaves_the_previous_version_readable(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "first written"
    staging = tmp_path / ".staging"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the second version is half written
        partial = [p for p in staging.iterdir() if p.is_dir()]
        if partial and len(list(partial[0].rglob("c/*/0"))) > 50:
            break
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL
    store = FieldStore(tmp_path)
    assert store.versions("t") == [1]
    np.testing.assert_array_equal(store.get("t").values, np.ones((4, 2)))
    again = store.put(Field(StructuredMesh((4, 2)), np.full((4, 2), 2.0), "t", time=1.0))
    assert again.version == 2 and store.times("t") == {0.0: 1, 1.0: 2}


def test_a_version_opens_in_xarray_with_its_coordinates(tmp_path):
    store = FieldStore(tmp_path)
    store.put(temperature(5.0, 0.5))
    dataset = store.open_dataset("temperature")
    assert dataset["temperature"].dims == ("x", "y")
    np.testing.assert_allclose(dataset["x"].values, 1.0 + 0.5 * np.arange(64))
    np.testing.assert_array_equal(dataset["temperature"].values, temperature(5.0).values)
    assert dataset.attrs["gridcouple"]["units"] == "K"


def test_an_fsspec_store_commits_versions_in_place():
    store = FieldStore(f"memory://gridcouple-{uuid.uuid4().hex}")
    first = store.put(temperature(1.0, 0.1))
    store.put(temperature(2.0, 0.2))
    assert store.versions("temperature") == [1, 2]
    np.testing.assert_array_equal(first.read(), temperature(1.0).values)
    assert store.get("temperature").time == 0.2
    store.prune("temperature", keep=1)
    assert store.times("temperature") == {0.2: 2}


# memory:// lives in one process, and its create-only write checks, then writes: writer threads
# racing on it test the store's in-process create lock, not create-only writes of the store.
RACED_STORES = [pytest.param("directory", id="directory"),
                pytest.param("memory", id="memory-in-process-lock")]


def race(count: int, write):
    """``write(index)`` in ``count`` threads released at once; its results or exceptions."""
    barrier = threading.Barrier(count)

    def run(index):
        barrier.wait()
        try:
            return write(index)
        except VersionConflictError as error:
            return error

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


@pytest.mark.parametrize("where", RACED_STORES)
def test_writer_threads_racing_each_get_their_own_version(tmp_path, where):
    url = str(tmp_path) if where == "directory" else f"memory://race-{uuid.uuid4().hex}"
    refs = race(8, lambda i: FieldStore(url, chunk_bytes=1024).put(
        temperature(100.0 * i, 0.1 * i)))
    assert sorted(ref.version for ref in refs) == list(range(1, 9))
    store = FieldStore(url)
    assert store.times("temperature") == {0.1 * i: ref.version for i, ref in enumerate(refs)}
    for index, ref in enumerate(refs):  # nobody's chunks were overwritten by another writer
        np.testing.assert_array_equal(ref.read(), temperature(100.0 * index).values)


@pytest.mark.parametrize("where", RACED_STORES)
def test_writer_threads_racing_for_one_time_commit_exactly_one_version(tmp_path, where):
    url = str(tmp_path) if where == "directory" else f"memory://race-{uuid.uuid4().hex}"
    offsets = [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]  # four writers agree, two do not
    results = race(len(offsets), lambda i: FieldStore(url, chunk_bytes=1024).put(
        temperature(offsets[i], 0.5)))
    store = FieldStore(url)
    [version] = store.versions("temperature")
    stored = store.get("temperature", time=0.5).values
    for offset, result in zip(offsets, results, strict=True):
        if np.array_equal(temperature(offset).values, stored):
            assert result.version == version  # the winner, and every writer agreeing with it
        else:
            assert isinstance(result, VersionConflictError), result
    assert sum(not isinstance(r, Exception) for r in results) >= 1


RACER = textwrap.dedent("""
    import os, sys, time, numpy as np
    from gridcouple.appkit.data import Field, StructuredMesh
    from gridcouple.appkit.store import FieldStore, VersionConflictError
    root, index, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = FieldStore(root, chunk_bytes=4096)
    mesh = StructuredMesh((256, 64))
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    store.put(Field(mesh, np.full((256, 64), float(index)), "t", time=float(index)))
    try:
        store.put(Field(mesh, np.full((256, 64), float(index)), "t", time=99.0))
        print("won", flush=True)
    except VersionConflictError:
        print("conflict", flush=True)
""")


def test_writer_processes_racing_on_one_directory_never_share_a_version(tmp_path):
    root, go = tmp_path / "store", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", RACER, str(root), str(i), str(go)],
                                stdout=subprocess.PIPE, text=True) for i in range(4)]
    assert all(w.stdout.readline().strip() == "ready" for w in writers)
    go.touch()
    outcomes = [w.communicate(timeout=60)[0].strip() for w in writers]
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "won"]
    store = FieldStore(root)
    times = store.times("t")
    assert sorted(times) == [0.0, 1.0, 2.0, 3.0, 99.0]
    assert len(set(times.values())) == 5  # a loser's number may stay unused
    for index in range(4):
        np.testing.assert_array_equal(store.get("t", time=float(index)).values,
                                      np.full((256, 64), float(index)))
    assert store.get("t", time=99.0).values[0, 0] == outcomes.index("won")


@pytest.mark.parametrize("where", ["directory", "memory"])
def test_read_into_a_caller_buffer(tmp_path, where):
    url = str(tmp_path) if where == "directory" else f"memory://gridcouple-{uuid.uuid4().hex}"
    store = FieldStore(url, chunk_bytes=1024)
    first, second = store.put(temperature(0.0, 0.1)), store.put(temperature(7.0, 0.2))
    buffer = np.zeros((64, 8))
    assert first.read(out=buffer) is buffer
    np.testing.assert_array_equal(buffer, temperature(0.0).values)
    field = second.to_field(out=buffer)
    assert field.values is buffer
    np.testing.assert_array_equal(buffer, temperature(7.0).values)
    with pytest.raises(ValueError, match=r"needs a writable C-contiguous array of shape "
                                         r"\(64, 8\) and dtype float64, got shape \(8, 64\)"):
        first.read(out=np.zeros((8, 64)))
    with pytest.raises(ValueError, match="and dtype float32"):
        first.read(out=np.zeros((64, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="not C-contiguous"):
        first.read(out=np.zeros((8, 64)).T)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(2, 9), min_size=1, max_size=3),
       components=st.sampled_from([(), (2,), (3, 3)]),
       chunk_bytes=st.integers(8, 2000),
       dtype=st.sampled_from(["<f8", "<f4", "<i4", "<u2"]))
def test_direct_chunk_io_agrees_with_zarr_for_any_shape_and_chunking(
        tmp_path_factory, shape, components, chunk_bytes, dtype):
    mesh = StructuredMesh(shape)
    value_type = {(): "scalar", (2,): "vector", (3, 3): "tensor"}[components]
    values = np.arange(np.prod(shape) * int(np.prod(components)), dtype=dtype).reshape(
        *shape, *components)
    store = FieldStore(tmp_path_factory.mktemp("store"), chunk_bytes=chunk_bytes)
    ref = store.put(Field(mesh, values, "f", value_type=value_type, time=0.0))
    np.testing.assert_array_equal(ref.read(), values)  # our chunk files, read directly
    np.testing.assert_array_equal(ref.open()[...], values)  # the same files, read by zarr
