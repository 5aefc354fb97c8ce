"""How the ends of a channel wait for each other: a bounded poll before the kernel's wait
(``$GRIDCOUPLE_SPIN_US``), and large frames received a piece at a time."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gridcouple.appkit.data import Field, StructuredMesh, TimeStep
from gridcouple.appkit.remote import StoreService, filesystem_type
from gridcouple.appkit.store import ConfinedDirectory, FieldStore
from gridcouple.appkit.transport import (
    SPIN_ENV,
    TOKEN_ENV,
    ApplicationProxy,
    Channel,
    TransportError,
    frame,
    spin_seconds,
)

TESTS = Path(__file__).resolve().parent
SECRET = "waiting-secret"


@pytest.fixture
def pair():
    """Two connected TCP sockets on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


@pytest.mark.parametrize("text", ["abc", "-1", "1e7", "nan", "inf"])
def test_a_bad_spin_setting_is_refused_naming_the_variable(text):
    with pytest.raises(TransportError, match=rf"\${SPIN_ENV}={text!r}: expected microseconds"):
        spin_seconds({SPIN_ENV: text})


def test_spin_setting_default_zero_and_microseconds():
    if (os.cpu_count() or 1) < 2:
        assert spin_seconds({}) == 0.0
        return
    assert spin_seconds({}) == pytest.approx(200e-6)
    assert spin_seconds({SPIN_ENV: " 50 "}) == pytest.approx(50e-6)
    assert spin_seconds({SPIN_ENV: "0"}) == 0.0


def test_a_frame_that_arrives_while_polling_is_seen_without_the_kernels_wait(pair):
    client, server = pair
    channel = Channel(server, spin=5.0)
    sender = threading.Timer(0.05, lambda: Channel(client, spin=0).send(["ping", [], {}]))
    started = time.perf_counter()
    sender.start()
    assert channel.spin_for_frame()
    assert time.perf_counter() - started < 4.0  # the frame ended the poll, not the window
    assert channel.receive() == ["ping", [], {}]


def test_polling_stops_at_the_end_of_its_window(pair):
    _, server = pair
    channel = Channel(server, spin=0.05)
    started = time.perf_counter()
    assert not channel.spin_for_frame()
    assert 0.05 <= time.perf_counter() - started < 2.0
    assert not Channel(server, spin=0).spin_for_frame()


def test_waiting_for_a_frame_honours_its_timeout_and_sees_one_that_comes(pair):
    client, server = pair
    channel = Channel(server, spin=0.01)
    started = time.perf_counter()
    assert not channel.wait_readable(0.3)
    assert 0.3 <= time.perf_counter() - started < 2.5
    threading.Timer(0.1, lambda: client.sendall(frame("late")[0])).start()
    assert channel.wait_readable(5.0)
    assert channel.receive() == "late"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_polling_is_bounded_an_idle_server_and_a_waiting_caller_use_no_cpu():
    """The poll lasts microseconds: a server idle between calls and a caller waiting for a
    long call sleep in the kernel."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gridcouple.appkit.server", "--app", "test_appkit_apps:Sleeper"],
        env={**os.environ, TOKEN_ENV: SECRET, SPIN_ENV: "1000",
             "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        app = ApplicationProxy(json.loads(process.stdout.readline())["endpoint"], SECRET)
        app.get_critical_time_step()
        before = _cpu_seconds(process.pid)
        time.sleep(1.0)
        assert _cpu_seconds(process.pid) - before < 0.1  # idle after its answer
        mine = resource.getrusage(resource.RUSAGE_THREAD)
        app.solve_step(TimeStep(1.0, 1.0, 1))  # the server sleeps 1 s
        after = resource.getrusage(resource.RUSAGE_THREAD)
        assert after.ru_utime + after.ru_stime - mine.ru_utime - mine.ru_stime < 0.1
    finally:
        process.kill()
        process.wait()


def test_a_large_frame_arrives_whole_into_fresh_memory_and_into_a_given_buffer(pair):
    client, server = pair
    values = np.random.default_rng(1).random(3_000_003)  # pieces of 4 MiB and a partial page
    sender = Channel(client, spin=0)
    receiver = Channel(server, spin=0)
    threading.Thread(target=lambda: (sender.send(values), sender.send(values[:-1])),
                     daemon=True).start()
    np.testing.assert_array_equal(receiver.receive(), values)
    buffer = np.full(values.nbytes, 7, dtype=np.uint8)
    got = receiver.receive(into=memoryview(buffer))
    assert np.shares_memory(got, buffer)
    np.testing.assert_array_equal(got, values[:-1])
    assert (buffer[-8:] == 7).all()  # nothing beyond the frame was written


def test_the_largest_array_of_a_frame_is_the_one_received_into_a_given_buffer(pair):
    client, server = pair
    vertices, values = np.arange(6.0), np.arange(100.0)
    Channel(client, spin=0).send({"vertices": vertices, "values": values})
    buffer = np.zeros(128)
    got = Channel(server, spin=0).receive(into=buffer.view(np.uint8).data)
    assert np.shares_memory(got["values"], buffer)
    assert not np.shares_memory(got["vertices"], buffer)
    np.testing.assert_array_equal(got["vertices"], vertices)
    np.testing.assert_array_equal(buffer[:100], values)


def test_a_stored_chunk_is_viewed_in_place_and_ranges_are_clamped(tmp_path):
    data = bytes(range(256)) * 40_000
    (tmp_path / "chunk").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    reader = ConfinedDirectory(str(tmp_path))
    for start, end, suffix in ((None, None, None), (70_001, 9_000_000, None),
                               (5, 5, None), (20_000_000, None, None), (None, None, 300),
                               (None, None, 20_000_000), (65_536, 65_537, None)):
        assert bytes(reader.view("chunk", start, end, suffix)) == \
            bytes(reader.get("chunk", start, end, suffix)), (start, end, suffix)
    assert bytes(reader.view("empty")) == b""
    assert reader.view("missing") is None


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_producer_serves_chunks_mapped_only_from_a_memory_file_system(tmp_path, in_memory):
    if in_memory and not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if in_memory else tmp_path
    if not in_memory and filesystem_type(str(base)) in ("tmpfs", "ramfs"):
        pytest.skip(f"{base} is in memory on this machine")
    try:
        store = FieldStore(base / "store")
        values = np.arange(2048.0).reshape(64, 32)
        store.put(Field(StructuredMesh((64, 32)), values, "temp", time=1.0))
        service = StoreService(store)
        assert service.maps_chunks is in_memory
        chunk = service.get("temp/v000001/temp/c/0/0")
        np.testing.assert_array_equal(chunk.view(np.float64).reshape(64, 32), values)
        assert service.get("temp/v000001/temp/c/0/0", 8, 24).tobytes() == values.tobytes()[8:24]
        assert service.counts()["chunk_requests"] == 2
    finally:
        if in_memory:
            shutil.rmtree(base, ignore_errors=True)


def test_the_file_system_of_a_path_is_named_from_the_mount_table(tmp_path):
    if not Path("/proc/self/mountinfo").exists():
        pytest.skip("needs /proc/self/mountinfo")
    assert filesystem_type("/proc/self") == "proc"
    if Path("/dev/shm").is_dir():
        assert filesystem_type("/dev/shm/not/there/yet") == "tmpfs"
    assert filesystem_type(str(tmp_path)) not in ("", "proc")
