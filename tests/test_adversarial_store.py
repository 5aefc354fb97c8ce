"""The field store attacked through its names and references, and after crashes: ids that
would leave the store or land on its own data, references from the wire that point outside
it, staging left by SIGKILLed writers (cleaned on the next open, a live writer's kept), and
the scratch directories of SIGKILLed sessions. Every test also checks that what was stored
before still reads back, and bounds every wait."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridcouple.appkit.data import Field, StructuredMesh
from gridcouple.appkit.store import (
    STALE_STAGING_AGE,
    FieldRef,
    FieldStore,
    RefRefusedError,
    clean_orphaned_scratch_roots,
    new_scratch_root,
)
from gridcouple.appkit.wire import decode, encode

MESH = StructuredMesh((4, 3))
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def field(field_id: str = "temperature", time: float = 1.0, value: float = 1.0) -> Field:
    return Field(MESH, np.full(MESH.shape, value), field_id, time=time)


@pytest.fixture
def store(tmp_path):
    """A store with one version of "temperature" at time 1.0 (value 1.0) in its own folder,
    whose parent holds nothing else."""
    root = tmp_path / "parent" / "store"
    store = FieldStore(root)
    store.put(field())
    return store


def assert_intact(store: FieldStore) -> None:
    """What the fixture stored reads back, and nothing appeared beside the store."""
    np.testing.assert_array_equal(store.get("temperature", time=1.0).values,
                                  np.full(MESH.shape, 1.0))
    assert sorted(os.listdir(Path(store.url).parent)) == ["store"]
    assert "temperature" in store.field_ids()


# --- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field_id", ["..", ".", ".staging", "meshes", "zarr.json", ".hidden",
                                      "MESHES"])
def test_ids_that_leave_the_store_or_are_its_own_are_refused_naming_the_id(store, field_id):
    before = sorted(os.listdir(store.url))
    with pytest.raises(ValueError, match=rf"invalid field id {field_id!r}"):
        store.put(field(field_id, time=2.0))
    with pytest.raises(ValueError, match=rf"invalid field id {field_id!r}"):
        store.ref(field_id)
    with pytest.raises(ValueError, match=rf"invalid field id {field_id!r}"):
        store.times(field_id)
    assert sorted(os.listdir(store.url)) == before
    assert_intact(store)


id_characters = st.sampled_from("abc.-_+AZ09/\\\x00 :é")


@FUZZ
@given(field_id=st.text(id_characters, min_size=0, max_size=12))
def test_any_id_is_stored_and_read_back_or_refused_with_a_value_error(store, field_id):
    values = np.full(MESH.shape, 3.0)
    try:
        ref = store.put(Field(MESH, values, field_id, time=3.0))
    except ValueError as exc:
        assert repr(field_id) in str(exc)
    else:
        assert ref.field_id == field_id and (Path(store.url) / field_id).is_dir()
        np.testing.assert_array_equal(store.get(field_id, time=3.0).values, values)
    with contextlib.suppress(ValueError, KeyError):  # refused, or not stored
        store.ref(field_id, time=3.0)
    assert_intact(store)


def test_a_reference_from_the_wire_cannot_point_outside_its_store(store):
    good = store.ref("temperature")
    wire = good.to_wire()
    for change in [{"field_id": ".."}, {"field_id": "a/b"}, {"field_id": ".staging"},
                   {"version": -1}, {"version": "1"},
                   {"mesh": {"kind": "stored", "path": "../../elsewhere"}},
                   {"mesh": {"kind": "stored", "path": "meshes/../../x"}}]:
        with pytest.raises(ValueError, match="FieldRef|invalid field id"):
            FieldRef.from_wire({**wire, **change})
    header, buffers = encode(good)
    bad = header.replace(b"temperature", b"../../../xx")  # same length: still well-formed
    with pytest.raises(ValueError, match="malformed frame.*invalid field id '../../../xx'"):
        decode(bad, buffers)
    assert FieldRef.from_wire(wire) == good
    for change in [{"producer": "no/such name"}, {"store_id": "x"}, {"store_url": ""},
                   {"owner": "root"}]:
        with pytest.raises(ValueError, match="FieldRef"):
            FieldRef.from_wire({**wire, **change})
    assert_intact(store)


def test_outside_a_session_a_ref_from_the_wire_reads_local_stores_only(store, tmp_path):
    """A ref that came over the wire (not made by this process's store) to a URL is
    refused; to a directory, read confined to it: a chunk that is a symbolic link, or a
    FIFO, is refused, never followed or waited on."""
    good = store.ref("temperature")
    for url in ("ftp://127.0.0.1/x", "http://127.0.0.1:1/x", "file:///etc/../etc"):
        wire = FieldRef.from_wire({**good.to_wire(), "store_url": url})
        if url.startswith("file://"):
            with pytest.raises(FileNotFoundError):
                wire.read()
            continue
        with pytest.raises(RefRefusedError, match="outside a coupling session only local"):
            wire.read()
    ref = FieldRef.from_wire(good.to_wire())
    np.testing.assert_array_equal(ref.read(), good.read())
    chunk = Path(store.url) / ref.array_path / "c" / "0" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(RefRefusedError, match="not a regular file"):
        ref.read()
    chunk.unlink()
    chunk.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_bytes(b"secret" * 100)
    for read in (ref.read, lambda: ref.open()[:], lambda: ref.to_dask().compute()):
        with pytest.raises(RefRefusedError, match="symbolic link"):
            read()


# --- writers killed mid-write --------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from gridcouple.appkit.data import Field, StructuredMesh
    from gridcouple.appkit.store import FieldStore

    publish = FieldStore._publish

    def stall(self, staging, field_id):
        print(staging, flush=True)  # written completely, not yet renamed into place
        sys.stdin.readline()
        return publish(self, staging, field_id)

    FieldStore._publish = stall
    mesh = StructuredMesh((4, 3))
    FieldStore(sys.argv[1]).put(Field(mesh, np.full(mesh.shape, 2.0), "temperature", time=2.0))
    print("done", flush=True)
""")


def start_writer(store: FieldStore) -> tuple[subprocess.Popen[str], Path]:
    """A writer process stopped with its version staged; (process, its staging folder)."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, store.url], text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    staging = Path(process.stdout.readline().strip())
    assert staging.is_dir() and staging.parent.name == ".staging"
    return process, staging


def test_staging_of_a_sigkilled_writer_is_removed_on_the_next_open(store):
    process, staging = start_writer(store)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    reopened = FieldStore(store.url)
    assert not staging.exists()
    assert sorted(os.listdir(staging.parent)) == ["zarr.json"]
    assert reopened.versions("temperature") == [1]
    reopened.put(field(time=2.0, value=2.0))  # the store goes on
    assert_intact(reopened)


def test_staging_of_a_live_writer_survives_an_open_and_is_published(store):
    process, staging = start_writer(store)
    try:
        FieldStore(store.url)
        assert staging.is_dir()
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline() == "done\n"
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    np.testing.assert_array_equal(store.get("temperature", time=2.0).values,
                                  np.full(MESH.shape, 2.0))
    assert_intact(store)


def test_untagged_or_foreign_staging_is_removed_only_once_stale(store):
    staging = Path(store.url) / ".staging"
    old = [staging / "0123456789abcdef0123456789abcdef", staging / "other-host_12_34_ab"]
    fresh = staging / "other-host_12_34_cd"
    for path in [*old, fresh]:
        path.mkdir()
        (path / "zarr.json").write_text("{}")
    for path in old:
        os.utime(path, (time.time() - STALE_STAGING_AGE - 60,) * 2)
    FieldStore(store.url)
    assert not any(path.exists() for path in old) and fresh.is_dir()
    assert_intact(store)


# --- scratch directories of sessions -----------------------------------------------------

def test_the_scratch_root_of_a_sigkilled_session_is_removed_on_the_next_start(tmp_path):
    session = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gridcouple.appkit.store import "
         "new_scratch_root; print(new_scratch_root(sys.argv[1]), flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    orphan = Path(session.stdout.readline().strip())
    assert orphan.is_dir() and clean_orphaned_scratch_roots(tmp_path) == []  # it lives
    session.send_signal(signal.SIGKILL)
    session.wait(timeout=10)
    FieldStore(orphan / "heat").put(field())  # what the dead session's application wrote
    untagged = tmp_path / "gridcouple-fields-abcdefgh"
    untagged.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / (orphan.name[:-1] + "Z")  # a look-alike symlink to a victim
    link.symlink_to(elsewhere)
    ours = Path(new_scratch_root(tmp_path))  # cleans first
    assert not orphan.exists()
    assert ours.is_dir() and ours.stat().st_mode & 0o777 == 0o700
    assert untagged.is_dir() and link.is_symlink() and elsewhere.is_dir()
    assert clean_orphaned_scratch_roots(tmp_path) == []  # ours lives
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ours.name, untagged.name, link.name, "elsewhere"])


def test_prune_with_a_negative_keep_deletes_nothing(store):
    store.put(field(time=2.0, value=2.0))
    for keep in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep must be a whole number >= 0"):
            store.prune("temperature", keep)
    assert store.versions("temperature") == [1, 2]
    store.prune("temperature", np.int64(2))
    assert_intact(store)
