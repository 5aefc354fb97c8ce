"""Standard Workload Format (SWF v2.2) traces: read, turn into jobs to replay, write.

One job per line, 18 whitespace-separated numbers, -1 for missing; lines starting with ``;``
are the header (``; Key: value``) and comments. Plain or gzip-compressed (``.gz``), UTF-8,
lines ending in ``\n`` (or ``\r\n``). Whatever the file holds, reading and replaying it raise
:class:`SwfError` only, naming the file (and the line, where there is one).

Replaying a trace needs choices the trace does not make; :class:`ReplayOptions` holds them with
these defaults, and :class:`Replay` counts how many jobs each rule touched:

- procs: the requested processors, or the allocated ones when none were requested;
- estimate: the requested time (the user's estimate), or the run time when none was given;
- run time <= 0 (the job never ran, mostly cancelled while waiting): dropped;
- cancelled jobs (status 5) that did run: kept, they held the machine;
- jobs wider than the machine: dropped.

A run time longer than the requested time is not a reader's choice but the engine's (kill at
the requested time, or let it run as the trace records: the default, since the trace says the
machine did let it run); the replay only counts such jobs.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import secrets
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from gridcouple.errors import GridcoupleError
from gridcouple.scheduler.engine import SimJob, SimState, Simulator
from gridcouple.scheduler.policies import INFINITY

FIELDS = (
    "job_number", "submit_time", "wait_time", "run_time", "allocated_procs",
    "average_cpu_time", "used_memory", "requested_procs", "requested_time",
    "requested_memory", "status", "user_id", "group_id", "executable", "queue", "partition",
    "preceding_job", "think_time",
)
COLUMN = {name: index for index, name in enumerate(FIELDS)}
#: averages over a job's processors, so they may have a fraction; every other field is whole
FRACTIONAL = ("average_cpu_time", "used_memory")
WHOLE = np.array([name not in FRACTIONAL for name in FIELDS])
STATUS_FAILED, STATUS_COMPLETED, STATUS_CANCELLED = 0, 1, 5
#: the largest magnitude a field may have: whole numbers are exact in float64 up to it
LARGEST = float(2 ** 53)

_HEADER_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_ ]*")


class SwfError(GridcoupleError):
    """A trace cannot be read or replayed; the message names the file and the line."""


@dataclass
class SwfTrace:
    """A trace: its header as ``(key, value)`` pairs in file order (comments without a key
    have key ``""``), and one row of the 18 fields per job."""

    path: str
    header: list[tuple[str, str]]
    records: np.ndarray  # shape (jobs, 18), float64
    lines: np.ndarray  # the 1-based line number of each record
    header_lines: list[int] = field(default_factory=list)  # the line of each header entry

    def header_value(self, key: str) -> str | None:
        """The value of the first header line with this key (case-insensitive)."""
        found = self._header_entry(key)
        return None if found is None else found[0]

    def _header_entry(self, key: str) -> tuple[str, int | None] | None:
        wanted = key.lower()
        for index, (k, value) in enumerate(self.header):
            if k.lower() == wanted:
                lines = self.header_lines
                return value, lines[index] if index < len(lines) else None
        return None

    @property
    def max_procs(self) -> int | None:
        """The machine size the header gives (MaxProcs, else MaxNodes), if any; -1 there means
        unknown. SwfError for a value that is not a positive whole number."""
        for key in ("MaxProcs", "MaxNodes"):
            found = self._header_entry(key)
            if found is None or found[0].split()[:1] == ["-1"]:
                continue
            value, line = found
            first = value.split()[0] if value.split() else ""
            if first.isascii() and first.isdigit() and 0 < int(first) <= LARGEST:
                return int(first)
            where = f"{self.path}:{line}" if line else self.path
            raise SwfError(f"{where}: {key} {value!r} is not a machine size (a whole number "
                           "of processors, at least 1)")
        return None


def _read_text(path: Path) -> str:
    """The trace's text; SwfError (naming the line of a byte that is not UTF-8) if it
    cannot be read."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                data = stream.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise SwfError(f"trace {path} does not exist") from None
    except EOFError as exc:
        raise SwfError(f"trace {path} cannot be read: the gzip data is truncated ({exc})") \
            from None
    except zlib.error as exc:
        raise SwfError(f"trace {path} cannot be read: the gzip data is corrupt ({exc})") \
            from None
    except (OSError, ValueError) as exc:  # BadGzipFile is an OSError; a NUL in the path
        raise SwfError(f"trace {path} cannot be read: {_reason(exc)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SwfError(f"{path}:{line}: not UTF-8 text: byte {data[exc.start]:#04x} at column "
                       f"{column}") from None


def _reason(exc: OSError | ValueError) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or \
        type(exc).__name__


def _header_entry(line: str) -> tuple[str, str]:
    """``; Key: value`` as (key, value); a comment without a key as ("", text)."""
    body = line[1:]
    key, colon, value = body.partition(":")
    if colon and _HEADER_KEY.fullmatch(key.strip()):
        return key.strip(), value.strip()
    return "", body.strip()


def read_swf(path: str | Path) -> SwfTrace:
    """Read a trace; a malformed line raises SwfError naming the file and the line."""
    path = Path(path)
    text = _read_text(path)
    header: list[tuple[str, str]] = []
    header_lines: list[int] = []
    data: list[str] = []
    numbers: list[int] = []
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # not splitlines:
    for number, line in enumerate(lines, start=1):  # \x85 or \u2028 in a comment is no end
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(";"):
            header.append(_header_entry(stripped))
            header_lines.append(number)
            continue
        data.append(stripped)
        numbers.append(number)
    if not data:
        return SwfTrace(str(path), header, np.empty((0, len(FIELDS))), np.empty(0, dtype=int),
                        header_lines)
    try:
        # comments=None: a '#' is no comment in SWF (loadtxt would drop what follows it)
        records = np.loadtxt(data, dtype=np.float64, ndmin=2, comments=None)
        if records.shape != (len(data), len(FIELDS)):
            raise ValueError
    except ValueError as exc:
        _raise_first_bad_line(path, data, numbers)
        raise SwfError(f"{path}: cannot be parsed: {exc}") from None
    _check_values(path, records, data, numbers)
    return SwfTrace(str(path), header, records, np.asarray(numbers), header_lines)


def _check_values(path: Path, records: np.ndarray, data: Sequence[str],
                  numbers: Sequence[int]) -> None:
    """Raise SwfError at the first value that is not finite, not whole in a whole-number
    field, or a negative submit time."""
    bad = _first_bad_value(records, negative_submit=True)
    if bad is not None:
        row, column, what = bad
        raise SwfError(f"{path}:{numbers[row]}: field {FIELDS[column]} {what}: "
                       f"{data[row].split()[column]!r}")


def _first_bad_value(records: np.ndarray, *,
                     negative_submit: bool) -> tuple[int, int, str] | None:
    """(row, column, what is wrong) of the first value that is not finite, larger than
    LARGEST, or not whole in a whole-number field (or, with ``negative_submit``, a negative
    submit time); else None."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(records) | (np.abs(records) > LARGEST) \
            | (WHOLE & (records != np.round(records)))
    submit = COLUMN["submit_time"]
    if negative_submit:
        bad[:, submit] |= records[:, submit] < 0
    if not bad.any():
        return None
    row, column = divmod(int(np.argmax(bad)), len(FIELDS))
    value = records[row, column]
    what = ("is not a finite number" if not np.isfinite(value)
            else "is too large" if abs(value) > LARGEST
            else "is negative" if column == submit and value < 0
            else "is not a whole number")
    return row, column, what


def _raise_first_bad_line(path: Path, data: Sequence[str], numbers: Sequence[int]) -> None:
    for line, number in zip(data, numbers, strict=True):
        parts = line.split()
        if len(parts) != len(FIELDS):
            raise SwfError(f"{path}:{number}: expected {len(FIELDS)} fields, found "
                           f"{len(parts)}: {line[:80]!r}")
        for name, part in zip(FIELDS, parts, strict=True):
            try:
                float(part if part.isascii() and "_" not in part else "?")  # as loadtxt reads
            except ValueError:
                raise SwfError(f"{path}:{number}: field {name} is not a number: "
                               f"{part!r}") from None


def write_swf(path: str | Path, records: np.ndarray,
              header: Iterable[tuple[str, str]] = ()) -> None:
    """Write a trace (gzip-compressed when ``path`` ends in .gz). Every field but the two
    averages must be a whole number, as a reader expects; SwfError if not, or if the file
    cannot be written. The file is replaced whole: a write that fails or is killed leaves
    what was there before."""
    path = Path(path)
    bad = _first_bad_value(records, negative_submit=False)
    if bad is not None:
        row, column, what = bad
        raise SwfError(f"{path}: record {row + 1}, field {FIELDS[column]} {what}: "
                       f"{records[row, column]}")
    lines = [f"; {key}: {value}" if key else f"; {value}" for key, value in header]
    for line in lines:
        if "\n" in line or "\r" in line:
            raise SwfError(f"{path}: a header line may not hold a line break: {line[:80]!r}")
    buffer = io.StringIO()
    integral = np.all(records == np.round(records), axis=0) if len(records) else []
    formats = ["%d" if whole else "%.2f" for whole in integral] or ["%d"] * len(FIELDS)
    if len(records):
        np.savetxt(buffer, records, fmt=formats, delimiter=" ")
    data = ("\n".join(lines) + ("\n" if lines else "") + buffer.getvalue()).encode()
    target = Path(os.path.realpath(path))  # through a symlink, as open() would
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(gzip.compress(data) if path.suffix == ".gz" else data)
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise SwfError(f"cannot write {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ReplayOptions:
    """The choices a replay needs; see the module docstring for why these defaults."""

    procs: Literal["requested", "allocated"] = "requested"
    estimate: Literal["requested", "runtime"] = "requested"
    nonpositive_runtime: Literal["drop", "keep"] = "drop"
    cancelled: Literal["keep", "drop"] = "keep"
    too_wide: Literal["drop", "clip", "error"] = "drop"


@dataclass
class Replay:
    """The jobs to simulate (``payload`` = the row in the trace), the machine size, and how
    many jobs each rule touched."""

    trace: SwfTrace
    jobs: list[SimJob]
    procs: int
    counts: dict[str, int] = field(default_factory=dict)


def replay_jobs(trace: SwfTrace, procs: int | None = None,
                options: ReplayOptions = ReplayOptions()) -> Replay:
    """The jobs of ``trace`` on a machine of ``procs`` processors (default: the header's)."""
    if procs is not None and (isinstance(procs, bool) or not isinstance(procs, int | np.integer)
                              or not 0 < procs <= LARGEST):
        raise SwfError(f"{trace.path}: the machine size must be a whole number of processors, "
                       f"at least 1, got {procs!r}")
    procs = procs or trace.max_procs
    if procs is None:
        raise SwfError(f"{trace.path}: no MaxProcs or MaxNodes in the header; give the "
                       "machine size (--procs)")
    r = trace.records
    col = COLUMN
    requested, allocated = r[:, col["requested_procs"]], r[:, col["allocated_procs"]]
    first, second = (requested, allocated) if options.procs == "requested" else (allocated,
                                                                                 requested)
    fallback = "allocated" if options.procs == "requested" else "requested"
    width = np.where(first > 0, first, second)
    runtime = r[:, col["run_time"]]
    asked = r[:, col["requested_time"]]
    use_runtime = asked <= 0 if options.estimate == "requested" else np.ones(len(r), bool)
    estimate = np.where(use_runtime, runtime, asked)
    counts: dict[str, int] = {"records": len(r)}
    keep = np.ones(len(r), dtype=bool)

    def rule(name: str, mask: np.ndarray, drop: bool) -> None:
        counts[name] = int(np.count_nonzero(mask & keep))
        if drop:
            keep[mask] = False

    rule("dropped: no procs given", width <= 0, True)
    rule(f"{options.nonpositive_runtime}: run time <= 0", runtime <= 0,
         options.nonpositive_runtime == "drop")
    rule(f"{options.cancelled}: cancelled (status 5)",
         r[:, col["status"]] == STATUS_CANCELLED, options.cancelled == "drop")
    wide = width > procs
    if options.too_wide == "error" and np.any(wide & keep):
        row = int(np.argmax(wide & keep))
        raise SwfError(f"{trace.path}:{trace.lines[row]}: job asks for {int(width[row])} "
                       f"processors, the machine has {procs}")
    rule(f"{options.too_wide}: wider than {procs} procs", wide, options.too_wide == "drop")
    width = np.minimum(width, procs)
    runtime = np.maximum(runtime, 0)
    estimate = np.maximum(estimate, 0)
    counts[f"procs from {fallback}"] = int(np.count_nonzero((first <= 0) & keep))
    counts["estimate from run time"] = int(np.count_nonzero(use_runtime & keep)) \
        if options.estimate == "requested" else int(np.count_nonzero(keep))
    counts["run time > estimate"] = int(np.count_nonzero((runtime > estimate) & keep))
    rows = np.flatnonzero(keep)
    order = rows[np.argsort(r[rows, col["submit_time"]], kind="stable")]
    submit = r[order, col["submit_time"]].tolist()
    limit = np.where(asked > 0, asked, INFINITY)
    jobs = [SimJob(s, p, e, w, x, row) for s, p, e, w, x, row in zip(
        submit, width[order].astype(int).tolist(), estimate[order].tolist(),
        runtime[order].tolist(), limit[order].tolist(), order.tolist(), strict=True)]
    counts["jobs replayed"] = len(jobs)
    return Replay(trace, jobs, int(procs), counts)


def schedule_records(replay: Replay, simulator: Simulator) -> np.ndarray:
    """The simulated schedule as SWF rows: the trace's fields, with wait time, run time,
    allocated procs and status from the simulation (killed jobs have status 0)."""
    rows = np.array([job.payload for job in simulator.jobs], dtype=int)
    out = replay.trace.records[rows].copy()
    submit = np.array([job.submit for job in simulator.jobs])
    start, end = np.array(simulator.start), np.array(simulator.end)
    col = COLUMN
    out[:, col["submit_time"]] = submit
    out[:, col["wait_time"]] = start - submit
    out[:, col["run_time"]] = end - start
    out[:, col["allocated_procs"]] = [job.procs for job in simulator.jobs]
    estimate = np.array([job.estimate for job in simulator.jobs])
    out[:, col["requested_time"]] = np.where(estimate == INFINITY, -1, estimate)
    killed = np.array([s == SimState.KILLED for s in simulator.state])
    out[killed, col["status"]] = STATUS_FAILED
    return out
