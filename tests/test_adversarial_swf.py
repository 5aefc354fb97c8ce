"""SWF traces attacked: corrupt and truncated gzip, bytes that are not UTF-8, impossible
machine sizes, huge numbers, a header line built to make a regex backtrack, line breaks other
than \\n, and fuzzed lines and bytes. Reading and replaying may only ever raise SwfError (naming
the file, and the line where there is one), never hang, and a failed write leaves the trace
that was there before."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridcouple.cli import app, jobs, main, simulate  # noqa: F401  (registers the commands)
from gridcouple.scheduler.swf import SwfError, read_swf, replay_jobs, write_swf

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
ROW = "1 0 5 10 2 -1 -1 2 20 -1 1 1 1 -1 1 -1 -1 -1"
GOOD = f"; MaxProcs: 8\n{ROW}\n"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def swf_error(path: Path, *, procs: int | None = None) -> str:
    """The SwfError message of reading and replaying ``path`` (which must raise it)."""
    with pytest.raises(SwfError) as error:
        replay_jobs(read_swf(path), procs)
    return str(error.value)


# --- the named cases -----------------------------------------------------------------------

def test_a_corrupt_gzip_body_is_an_swf_error_naming_the_file(tmp_path):
    data = bytearray(gzip.compress((GOOD * 50).encode()))
    data[20:40] = bytes(b ^ 0xFF for b in data[20:40])
    path = write(tmp_path / "corrupt.swf.gz", bytes(data))
    assert swf_error(path).startswith(f"trace {path} cannot be read: the gzip data is corrupt")


def test_truncated_and_fake_gzip_are_swf_errors_naming_the_file(tmp_path):
    truncated = write(tmp_path / "truncated.swf.gz", gzip.compress(GOOD.encode())[:-12])
    assert "the gzip data is truncated" in swf_error(truncated)
    fake = write(tmp_path / "plain.swf.gz", GOOD)
    assert swf_error(fake).startswith(f"trace {fake} cannot be read: Not a gzipped file")


def test_bytes_that_are_not_utf8_are_an_swf_error_naming_the_line(tmp_path):
    path = write(tmp_path / "latin1.swf", GOOD.encode() + b"; Computer: M\xfcnchen\n")
    assert swf_error(path) == f"{path}:3: not UTF-8 text: byte 0xfc at column 14"


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1e400", "99999999999999999999", "٣"])
def test_an_impossible_machine_size_is_an_swf_error_naming_the_line(tmp_path, value):
    path = write(tmp_path / "size.swf", f"; Version: 2.2\n; MaxProcs: {value}\n{ROW}\n")
    assert swf_error(path) == (f"{path}:2: MaxProcs {value!r} is not a machine size (a whole "
                               "number of processors, at least 1)")


def test_maxprocs_0_ends_the_simulate_command_in_one_line(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "zero.swf", f"; MaxProcs: 0\n{ROW}\n")
    monkeypatch.setattr(sys, "argv", ["gridcouple", "simulate", str(path), "-p", "fcfs"])
    with pytest.raises(SystemExit) as exited:
        main()
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1
    assert f"{path}:1: MaxProcs '0' is not a machine size" in error


def test_an_unknown_maxprocs_falls_back_and_a_bad_explicit_size_is_refused(tmp_path):
    path = write(tmp_path / "unknown.swf", f"; MaxProcs: -1\n; MaxNodes: 4\n{ROW}\n")
    assert replay_jobs(read_swf(path)).procs == 4
    for procs in (-1, 2 ** 60):
        assert "the machine size must be a whole number" in swf_error(path, procs=procs)


def test_numbers_beyond_exact_whole_floats_are_refused_naming_field_and_line(tmp_path):
    huge = ROW.replace(" 2 20 ", " 1e300 20 ", 1)
    path = write(tmp_path / "huge.swf", f"; MaxProcs: 8\n{ROW}\n{huge}\n")
    assert swf_error(path) == f"{path}:3: field requested_procs is too large: '1e300'"


@pytest.mark.parametrize("token", ["1_0", "٣", "\uff11"])  # the last: fullwidth 1
def test_numbers_python_reads_but_the_loader_does_not_name_field_and_line(tmp_path, token):
    path = write(tmp_path / "token.swf", f"{ROW}\n{ROW.replace('5', token, 1)}\n")
    assert swf_error(path, procs=8) == f"{path}:2: field wait_time is not a number: {token!r}"


def test_a_hash_is_no_comment_in_swf(tmp_path):
    """numpy's loader would drop a '#' line (then every line number after it was off by one)
    or the end of a line after '#'."""
    path = write(tmp_path / "hash.swf", f"# not a comment\n{ROW}\n")
    assert swf_error(path, procs=8) == (f"{path}:1: expected 18 fields, found 4: "
                                        "'# not a comment'")
    path = write(tmp_path / "tail.swf", f"{ROW}\n{ROW[:-3]} #-1\n")
    assert swf_error(path, procs=8) == f"{path}:2: field think_time is not a number: '#-1'"


def test_a_header_line_built_to_backtrack_is_read_in_linear_time(tmp_path):
    path = write(tmp_path / "spaces.swf", "; a" + " " * 50_000 + "b\n" + GOOD)
    started = time.monotonic()
    trace = read_swf(path)
    assert time.monotonic() - started < 1
    assert trace.header[0] == ("", "a" + " " * 50_000 + "b") and len(trace.records) == 1


def test_only_newlines_end_lines(tmp_path):
    """A comment holding U+0085 or U+2028 stays one comment: no phantom data line, and the
    line numbers are the file's."""
    path = write(tmp_path / "breaks.swf", f"; a\x85b\u2028c: d\r\n{ROW}\r\n; MaxProcs: 0\n")
    trace = read_swf(path)
    assert len(trace.records) == 1 and list(trace.lines) == [2]
    assert trace.header[0] == ("", "a\x85b\u2028c: d")
    assert swf_error(path).startswith(f"{path}:3: MaxProcs '0'")


def test_a_failed_write_leaves_the_trace_that_was_there(tmp_path):
    """Writing past the file size limit (EFBIG, as a full disk fails) must not have
    truncated the earlier trace first, nor leave a temporary file."""
    path = write(tmp_path / "kept.swf", GOOD)
    script = textwrap.dedent("""
        import resource, signal, sys
        import numpy as np
        from gridcouple.scheduler.swf import SwfError, write_swf
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_swf(sys.argv[1], np.ones((1000, 18)))
        except SwfError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.startswith(f"cannot write {path}: File too large"), result.stderr
    assert path.read_text() == GOOD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.swf"]


def test_header_values_with_line_breaks_are_refused_not_written(tmp_path):
    path = write(tmp_path / "kept.swf", GOOD)
    with pytest.raises(SwfError, match="may not hold a line break"):
        write_swf(path, read_swf(path).records, [("Note", "x\n1 2 3")])
    assert path.read_text() == GOOD


# --- fuzzing -------------------------------------------------------------------------------

def read_and_replay(path: Path) -> None:
    """Read and replay ``path``: SwfError, or jobs a simulator can take."""
    try:
        replay = replay_jobs(read_swf(path), None)
    except SwfError as exc:
        assert str(exc).startswith((f"trace {path}", f"{path}:", f"{path}: "))
        return
    assert replay.procs >= 1 and len(replay.trace.lines) == len(replay.trace.records)
    for job in replay.jobs:
        assert 1 <= job.procs <= replay.procs
        assert np.isfinite([job.submit, job.estimate, job.work]).all() and job.work >= 0


tokens = st.sampled_from(
    ["0", "1", "-1", "8", "3.5", "1e9", "1e300", "-0", "nan", "inf", "-inf", "1_0", "x",
     "٣", ";", ":", "; MaxProcs:", "MaxNodes", "\x00", "\x85", "\u2028", "\t", "\r", "\x0c",
     "9" * 25]) | st.integers(-(2 ** 63), 2 ** 64).map(str)
lines = st.one_of(
    st.lists(tokens, min_size=17, max_size=19).map(" ".join),
    st.builds(lambda key, value: f"; {key}: {value}",
              st.sampled_from(["MaxProcs", "MaxNodes", "Version", "max procs", ""]), tokens),
    st.text(max_size=40))


@FUZZ
@given(body=st.lists(lines, max_size=6), compressed=st.booleans())
def test_fuzzed_lines_give_a_trace_or_an_swf_error(tmp_path, body, compressed):
    data = "\n".join(["; MaxProcs: 8", *body, ROW]).encode("utf-8", "surrogatepass")
    name = "fuzz.swf.gz" if compressed else "fuzz.swf"
    path = write(tmp_path / name, gzip.compress(data) if compressed else data)
    read_and_replay(path)


@FUZZ
@given(data=st.binary(max_size=300), compressed=st.booleans(), cut=st.integers(0, 400))
def test_fuzzed_bytes_give_a_trace_or_an_swf_error(tmp_path, data, compressed, cut):
    if compressed:  # a valid gzip stream, cut or with bytes flipped
        whole = gzip.compress((GOOD + data.decode("latin-1")).encode())
        data = whole[:cut] + bytes(b ^ 0x5A for b in data[:8]) + whole[cut + 8:]
    path = write(tmp_path / ("bytes.swf.gz" if compressed else "bytes.swf"), data)
    read_and_replay(path)
