"""FieldStore on a real zarr v3 directory: versions, references, atomic writes, xarray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from gridcouple.appkit.data import Field, StructuredMesh, UnstructuredMesh
from gridcouple.appkit.store import FieldStore

MESH = StructuredMesh((64, 8), origin=(1.0, 0.0), spacing=(0.5, 0.25))


def temperature(value: float, time: float = 0.0) -> Field:
    values = value + np.arange(64 * 8, dtype=np.float64).reshape(64, 8)
    return Field(MESH, values, "temperature", units="K", time=time)


def test_each_put_is_a_new_immutable_version_read_by_reference(tmp_path):
    store = FieldStore(tmp_path, chunk_bytes=1024)  # 16 rows of 8 float64 per chunk
    first, second = store.put(temperature(0.0, 0.1)), store.put(temperature(100.0, 0.2))
    assert (first.version, second.version) == (1, 2)
    assert store.versions("temperature") == [1, 2]
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
    store.prune("temperature", keep=1)
    assert store.versions("temperature") == [2]


def test_unstructured_mesh_is_stored_once_and_comes_back(tmp_path):
    mesh = UnstructuredMesh([[0, 0], [1, 0], [0, 1], [1, 1]],
                            {"triangle": [[0, 1, 2], [1, 3, 2]]})
    store = FieldStore(tmp_path)
    displacement = Field(mesh, np.arange(8.0).reshape(4, 2), "u", value_type="vector")
    first, second = store.put(displacement), store.put(displacement)
    assert first.mesh == second.mesh and first.mesh["kind"] == "stored"
    assert len(os.listdir(tmp_path / "meshes")) == 1
    back = second.to_field()
    assert back.mesh == mesh and back.value_type == "vector"
    np.testing.assert_array_equal(back.values, displacement.values)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from gridcouple.appkit.data import Field, StructuredMesh
    from gridcouple.appkit.store import FieldStore
    store = FieldStore(sys.argv[1], chunk_bytes=4096)
    store.put(Field(StructuredMesh((4, 2)), np.ones((4, 2)), "t"))
    print("first written", flush=True)
    store.put(Field(StructuredMesh((2**16, 64)), np.zeros((2**16, 64)), "t"))  # 32 MiB
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
    assert store.put(Field(StructuredMesh((4, 2)), np.full((4, 2), 2.0), "t")).version == 2


def test_a_version_opens_in_xarray_with_its_coordinates(tmp_path):
    store = FieldStore(tmp_path)
    store.put(temperature(5.0, 0.5))
    dataset = store.open_dataset("temperature")
    assert dataset["temperature"].dims == ("x", "y")
    np.testing.assert_allclose(dataset["x"].values, 1.0 + 0.5 * np.arange(64))
    np.testing.assert_array_equal(dataset["temperature"].values, temperature(5.0).values)
    assert dataset.attrs["gridcouple"]["units"] == "K"


def test_an_fsspec_store_commits_versions_in_place(tmp_path):
    store = FieldStore("memory://gridcouple-test-store")
    first = store.put(temperature(1.0, 0.1))
    store.put(temperature(2.0, 0.2))
    assert store.versions("temperature") == [first.version, first.version + 1]
    np.testing.assert_array_equal(first.read(), temperature(1.0).values)
    assert store.get("temperature").time == 0.2


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
    ref = store.put(Field(mesh, values, "f", value_type=value_type))
    np.testing.assert_array_equal(ref.read(), values)  # our chunk files, read directly
    np.testing.assert_array_equal(ref.open()[...], values)  # the same files, read by zarr
