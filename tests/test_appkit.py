"""The application kit: data objects, the Application base, the wire format, and real
application servers (``python -m gridcouple.appkit.server``) called through proxies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes
from hypothesis.extra.numpy import arrays as numpy_arrays

from gridcouple.appkit.data import (
    Field,
    Mesh,
    Property,
    StructuredMesh,
    TimeStep,
    UnstructuredMesh,
)
from gridcouple.appkit.store import FieldRef, FieldStore
from gridcouple.appkit.transport import (
    TOKEN_ENV,
    ApplicationProxy,
    AuthenticationError,
    RemoteError,
)
from gridcouple.appkit.wire import decode, encode
from test_appkit_apps import MESH, Counter, MupifStyle, Sleeper

TESTS = Path(__file__).parent
SECRET = "test-secret"


# --- data objects ---------------------------------------------------------------------------

def test_field_shapes_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match=r"'temperature'.*\(4, 2\).*\(4, 3\)"):
        Field(MESH, np.zeros((4, 2)), "temperature")
    with pytest.raises(ValueError, match=r"vector field needs components of shape \(2,\) or"):
        Field(MESH, np.zeros((4, 3, 4)), "velocity", value_type="vector")
    cells = Field(MESH, np.zeros((3, 2, 3, 3)), "stress", value_type="tensor", location="cell")
    assert cells.values.shape == (3, 2, 3, 3)
    with pytest.raises(ValueError, match="field_id"):
        Field(MESH, np.zeros((4, 3)), "no/slash")
    with pytest.raises(TypeError, match="Field 't': units must be a string"):
        Field(MESH, np.zeros((4, 3)), "t", "scalar", 273.15)


def test_property_takes_only_its_value_by_position():
    # The order (value, units, time, object_id) and MuPIF's (value, propID, valueType,
    # unit, ...) disagree: only keywords say which is meant.
    with pytest.raises(TypeError, match="positional"):
        Property(1.0, "K", 0.0, 0)
    with pytest.raises(TypeError, match="positional"):
        Property(1.0, "K")
    prop = Property(1.0, property_id="conductivity", units="W/m/K", time=0.5, object_id=3)
    assert (prop.getValue(), prop.getPropertyID(), prop.getUnits(), prop.getTime(),
            prop.getObjectID(), prop.getValueType()) == (1.0, "conductivity", "W/m/K", 0.5, 3,
                                                         "scalar")
    assert Property.from_wire(prop.to_wire()) == prop
    assert Property(np.float32(2.5), property_id="p").value == 2.5


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"units": 1.0}, TypeError, r"Property 'p': units must be a string .* got float 1.0"),
    ({"units": None}, TypeError, "units must be a string"),
    ({"value": [1.0, 2.0]}, ValueError,
     r"a scalar value must be a single number, got shape \(2,\); pass value_type='vector'"),
    ({"value": 1.0, "value_type": "vector"}, ValueError,
     r"'p': a vector value must be a non-empty 1-D array, got shape \(\)"),
    ({"value": [], "value_type": "vector"}, ValueError, r"non-empty 1-D array, got shape \(0,"),
    ({"value": [1.0, 2.0], "value_type": "tensor"}, ValueError,
     r"a tensor value must be a non-empty 2-D array, got shape \(2,\); pass "
     "value_type='vector'"),
    ({"value": "hot"}, TypeError, "the value must be numeric, got str 'hot'"),
    ({"value_type": "matrix"}, ValueError, "value_type must be 'scalar', 'vector' or 'tensor'"),
    ({"time": float("nan")}, ValueError, "time must be a finite number or None"),
    ({"object_id": "a"}, TypeError, "object_id must be an integer"),
    ({"property_id": ""}, TypeError, "property_id must be a non-empty string"),
])
def test_property_refuses_what_does_not_fit_naming_it(kwargs, error, message):
    arguments = {"value": 1.0, "property_id": "p", **kwargs}
    with pytest.raises(error, match=message):
        Property(arguments.pop("value"), **arguments)


def test_property_vectors_and_tensors_are_arrays():
    vector = Property([1, 2, 3], property_id="v", value_type="vector")
    tensor = Property([[1.0, 0.0], [0.0, 1.0]], property_id="k", value_type="tensor")
    assert vector.value.shape == (3,) and tensor.value.shape == (2, 2)


def test_meshes_reject_bad_geometry_and_round_trip():
    with pytest.raises(ValueError, match=r"cells\['triangle'\] refers to vertices outside 0..2"):
        UnstructuredMesh([[0, 0], [1, 0], [0, 1]], {"triangle": [[0, 1, 3]]})
    with pytest.raises(ValueError, match="unknown cell type 'blob'"):
        UnstructuredMesh([[0, 0]], {"blob": [[0]]})
    with pytest.raises(ValueError, match="spacing needs 2 values"):
        StructuredMesh((3, 3), spacing=(1.0,))
    mesh = UnstructuredMesh([[0, 0], [1, 0], [0, 1], [1, 1]], {"quad": [[0, 1, 3, 2]]})
    assert Mesh.from_wire(mesh.to_wire()) == mesh
    assert Mesh.from_wire(MESH.to_wire()) == MESH
    assert mesh.cell_shape == (1,)


# --- the Application base -------------------------------------------------------------------

def test_python_and_mupif_names_answer_alike(tmp_path):
    ported = MupifStyle()
    ported.field_store = FieldStore(tmp_path)
    ported.solve_step(TimeStep(0.5, 0.5, 1))
    assert ported.get_critical_time_step() == 0.5
    assert ported.get_field("c", 0.5).values.max() == 0.5
    ported.solveStep(TimeStep(0.75, 0.25, 2), runInBackground=True)
    ported.wait()
    assert ported.getField("c", 0.75, mode="ref").read().max() == 0.75
    counter = Counter()
    counter.solveStep(TimeStep(0.25, 0.25, 1))
    assert counter.getCriticalTimeStep() == 0.25
    assert counter.getProperty("c", 0.25).getValue() == 0.25
    assert counter.getField("c", 0.25).values.max() == 0.25


def test_get_field_by_reference_writes_a_version_the_receiver_reads(tmp_path):
    app = Counter()
    app.field_store = FieldStore(tmp_path / "store")
    app.solve_step(TimeStep(0.5, 0.5, 1))
    ref = app.get_field("temperature", 0.5, mode="ref")
    assert isinstance(ref, FieldRef) and ref.version == 1
    np.testing.assert_array_equal(ref.read(), np.full(MESH.shape, 0.5))
    receiver = Counter()
    receiver.set_field(ref)  # a FieldRef is read before the author's set_field sees it
    assert receiver.received == 0.5
    with pytest.raises(ValueError, match="mode must be 'copy' or 'ref'"):
        app.get_field("temperature", 0.5, mode="move")


def test_an_application_may_take_field_refs_to_read_part_of_them(tmp_path):
    class EdgeReader(Counter):
        accepts_field_refs = True

        def set_field(self, field):
            self.received = float(field.open()[0].sum())  # only the first row's chunk

    ref = FieldStore(tmp_path).put(Field(MESH, np.arange(12.0).reshape(4, 3), "t", time=0.0))
    reader = EdgeReader()
    reader.setField(ref)
    assert reader.received == 3.0


def test_a_field_without_a_time_is_stored_at_the_time_asked_for(tmp_path):
    class Timeless(Counter):
        def get_field(self, field_id, time):
            return Field(MESH, np.full(MESH.shape, self.value), field_id)

    app = Timeless()
    app.field_store = FieldStore(tmp_path)
    ref = app.get_field("t", 0.5, mode="ref")
    assert ref.time == 0.5 and app.field_store.ref("t", time=0.5) == ref
    assert app.get_field("t", 0.5, mode="ref") == ref  # asked again: the same version
    assert app.get_field("t", 0.5).time is None  # a copy is the author's field as it is


def test_a_receiver_may_read_each_step_into_the_same_buffer(tmp_path):
    class Keeping(Counter):
        def set_field(self, field):
            super().set_field(field)
            self.kept = field.values

    class Reusing(Keeping):
        reuse_field_buffers = True

    store = FieldStore(tmp_path)
    receiver = Reusing()
    receiver.set_field(store.put(Field(MESH, np.full(MESH.shape, 1.0), "t", time=0.1)))
    buffer = receiver.kept
    receiver.set_field(store.put(Field(MESH, np.full(MESH.shape, 2.0), "t", time=0.2)))
    assert receiver.kept is buffer and np.all(buffer == 2.0)
    receiver.set_field(store.put(Field(MESH, np.ones((4, 3), np.float32), "t", time=0.3)))
    assert receiver.kept is not buffer and receiver.kept.dtype == np.float32  # another dtype
    plain = Keeping()  # without reuse_field_buffers: a new array each time
    plain.set_field(store.ref("t", time=0.1))
    first = plain.kept
    plain.set_field(store.ref("t", time=0.2))
    assert plain.kept is not first and plain.received == 2.0
    assert np.all(first == 1.0) and np.all(plain.kept == 2.0)


def test_background_steps_of_two_applications_overlap_and_wait_reraises():
    first, second = Sleeper(), Sleeper()
    step = TimeStep(0.5, 0.5, 1)  # each step sleeps 0.5 s
    called = time.time()
    first.solve_step_in_background(step)
    second.solve_step_in_background(step)
    assert time.time() - called < 0.25 and not first.is_solved()  # returned while it runs
    first.wait()
    second.wait()
    assert first.is_solved() and first.value == second.value == 0.5
    (start1, end1), (start2, end2) = first.last_step_times(), second.last_step_times()
    assert end1 - start1 >= 0.5 and end2 - start2 >= 0.5
    assert start2 < end1 and start1 < end2  # the applications' own clocks: they overlapped
    app = Counter()
    app.solveStep(TimeStep(0.001, 0.001, 2), runInBackground=True)
    with pytest.raises(ValueError, match="below this code's limit"):
        app.wait()


# --- the wire format ----------------------------------------------------------------------

def test_wire_carries_appkit_objects_and_arrays_but_nothing_else(tmp_path):
    mesh = UnstructuredMesh([[0, 0], [1, 0], [0, 1]], {"triangle": [[0, 1, 2]]})
    ref = FieldStore(tmp_path).put(Field(MESH, np.ones(MESH.shape), "t", time=1.0))
    value = {"field": Field(mesh, np.arange(3.0), "c", units="mol"), "ref": ref,
             "step": TimeStep(1.0, 0.1, 10),
             "prop": Property([1, 2], property_id="p", value_type="vector", units="m"),
             "ints": np.arange(5, dtype=np.int32), "scalar": np.float32(2.5)}
    header, buffers = encode(value)
    back = decode(header, [bytes(b) for b in buffers])
    assert back["field"].mesh == mesh and back["field"].units == "mol"
    np.testing.assert_array_equal(back["field"].values, np.arange(3.0))
    assert back["ref"] == ref and back["step"] == TimeStep(1.0, 0.1, 10)
    assert back["ints"].dtype == np.int32 and back["scalar"] == 2.5
    assert list(back["prop"].value) == [1, 2] and back["prop"].units == "m"
    with pytest.raises(TypeError, match="cannot send a pathlib"):
        encode({"path": tmp_path})


@settings(max_examples=50, deadline=None)
@given(array=numpy_arrays(
    dtype=st.sampled_from(["<f8", ">f4", "<i8", "|u1", "|b1", "<c16"]),
    shape=array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
    transposed=st.booleans())
def test_wire_round_trips_any_plain_array(array, transposed):
    sent = array.T if transposed else array  # non-contiguous views too
    header, buffers = encode({"a": sent})
    back = decode(header, [bytearray(b) for b in buffers])["a"]
    assert back.dtype == sent.dtype and back.shape == sent.shape
    np.testing.assert_array_equal(back, sent)


# --- real application servers ----------------------------------------------------------------

def server_environment(**extra: str) -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: SECRET,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            **extra}


@pytest.fixture
def counter_server(tmp_path):
    """A Counter served by a real server process; yields its endpoint."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gridcouple.appkit.server", "--app", "test_appkit_apps:Counter"],
        env=server_environment(GRIDCOUPLE_FIELD_STORE=str(tmp_path / "fields")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line, process.stderr.read()
    yield process, json.loads(line)["endpoint"]
    process.kill()
    process.wait()


def test_server_runs_calls_remotely_and_reports_remote_errors(counter_server, tmp_path):
    process, endpoint = counter_server
    app = ApplicationProxy(endpoint, SECRET, name="counter")
    assert app.pid() == process.pid
    app.solve_step(TimeStep(0.5, 0.5, 1))
    app.solveStep(TimeStep(0.75, 0.25, 2))
    assert app.get_property("concentration", 0.75).value == 0.75
    copy = app.get_field("temperature", 0.75)
    assert isinstance(copy, Field) and copy.mesh == MESH
    np.testing.assert_array_equal(copy.values, np.full(MESH.shape, 0.75))
    ref = app.get_field("temperature", 0.75, mode="ref")
    assert isinstance(ref, FieldRef) and ref.store_url == str(tmp_path / "fields")
    np.testing.assert_array_equal(ref.read(), copy.values)
    other = FieldStore(tmp_path / "other").put(copy.with_values(np.full(MESH.shape, 3.0)))
    app.set_field(other)
    assert app.call("get_property", "x").value == 0.75
    with pytest.raises(RemoteError, match=r"counter.solve_step: ValueError: dt 0.001") as err:
        app.solve_step(TimeStep(0.751, 0.001, 3))
    assert "Traceback" in err.value.remote_traceback
    with pytest.raises(RemoteError, match="'_secret' is not a public method"):
        app.call("_secret")
    with pytest.raises(RemoteError, match="the result of unsendable cannot be sent"):
        app.unsendable()
    with pytest.raises(TypeError, match="cannot send a builtins.object"):
        app.set_property(object())
    assert app.get_critical_time_step() == 0.25  # both failures left the proxy usable
    app.terminate()
    assert process.wait(timeout=10) == 0


def test_a_field_fetched_by_copy_lands_in_the_callers_buffer(counter_server):
    _, endpoint = counter_server
    app = ApplicationProxy(endpoint, SECRET, name="counter")
    buffer = np.full(64, -1.0)  # larger than the field: its first 12 values are overwritten
    for step in (1, 2):
        app.solve_step(TimeStep(0.5 * step, 0.5, step))
        field = app.call_into(buffer, "get_field", "temperature", 0.5 * step)
        assert np.shares_memory(field.values, buffer) and field.values.shape == MESH.shape
        np.testing.assert_array_equal(buffer[:12], np.full(12, 0.5 * step))
        assert (buffer[12:] == -1.0).all()
    small = np.zeros(3)
    field = app.call_into(small, "get_field", "temperature", 1.0)  # does not fit: new memory
    assert not np.shares_memory(field.values, small) and (small == 0).all()
    np.testing.assert_array_equal(field.values, np.full(MESH.shape, 1.0))
    for bad in (np.zeros((4, 4))[:, ::2], np.zeros(12).view(), [0.0] * 12):
        if isinstance(bad, np.ndarray) and bad.flags.c_contiguous:
            bad.flags.writeable = False
        with pytest.raises(TypeError, match="writable C-contiguous numpy array"):
            app.call_into(bad, "get_field", "temperature", 1.0)
    with pytest.raises(RemoteError, match="dt 0.001"):
        app.call_into(buffer, "solve_step", TimeStep(1.001, 0.001, 3))
    assert app.get_critical_time_step() == 0.25


def test_server_refuses_a_peer_without_the_secret(counter_server):
    _, endpoint = counter_server
    with pytest.raises(AuthenticationError):
        ApplicationProxy(endpoint, "wrong-secret")
    assert ApplicationProxy(endpoint, SECRET).get_critical_time_step() == 0.25


def test_server_names_a_bad_application_target():
    result = subprocess.run(
        [sys.executable, "-m", "gridcouple.appkit.server", "--app", "test_appkit_apps:Nope"],
        env=server_environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--app 'test_appkit_apps:Nope': test_appkit_apps has no Nope" in result.stderr
