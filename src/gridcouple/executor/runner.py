"""The job side of :class:`gridcouple.Executor`, and the files both sides share.

A job runs ``python -m gridcouple.executor.runner CALL FUNCTION ARGUMENTS [RESULT]``:

- ``CALL`` is a call file, owner-only: the pickled functions and arguments of one submission,
  one after another. ``FUNCTION`` and ``ARGUMENTS`` are ``OFFSET:LENGTH`` of this job's two
  parts in it (one file per submission, whatever its size: a 1,000-call array writes one).
- the outcome goes to ``RESULT`` (default ``$GRIDCOUPLE_JOB_HOME/result.pickle``), written
  owner-only and renamed into place whole: the value, or the exception raised with its
  traceback. The exit status says which: 0 returned, 1 raised, 2 the call could not be loaded.

The runner refuses a call file that is not its own user's or that others may read or write:
unpickling runs code, so only the user's own files are loaded. This module imports nothing
heavy (pickle, and cloudpickle only when an object needs it): it is every task's start-up.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_NAME = "result.pickle"
CALL_NAME = "call.pickle"  # the name of a call file staged into a job's working directory
EXIT_RAISED = 1
EXIT_UNLOADABLE = 2


class CallFileError(Exception):
    """A call file that cannot be trusted or read."""


def dumps(obj: Any) -> bytes:
    """pickle, else cloudpickle (functions defined in ``__main__``, lambdas, closures)."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        import cloudpickle  # type: ignore[import-untyped]

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class CallFileWriter:
    """Writes one call file (owner-only, created anew); :meth:`add` returns a part's
    ``OFFSET:LENGTH``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._offset = 0

    def add(self, blob: bytes) -> str:
        """Append ``blob``; its reference for the runner's command line."""
        self._file.write(blob)
        ref = f"{self._offset}:{len(blob)}"
        self._offset += len(blob)
        return ref

    def close(self) -> None:
        self._file.close()


def read_part(path: str, ref: str) -> bytes:
    """The part ``OFFSET:LENGTH`` of a call file, after checking the file is this user's own
    and private."""
    try:
        offset, length = (int(n) for n in ref.split(":"))
    except ValueError:
        raise CallFileError(f"bad part reference {ref!r}: expected OFFSET:LENGTH") from None
    with open(path, "rb") as file:
        info = os.fstat(file.fileno())
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise CallFileError(f"refusing the call file {path}: owned by uid {info.st_uid} with "
                                f"mode {info.st_mode & 0o777:o}; only a file of this job's user "
                                f"(uid {os.getuid()}) that nobody else may read or write is "
                                "loaded")
        file.seek(offset)
        data = file.read(length)
    if len(data) != length:
        raise CallFileError(f"the call file {path} is truncated (part {ref})")
    return data


def failure(exc: BaseException, *, skip_frames: int = 0) -> dict[str, Any]:
    """The outcome of a call that raised: the exception pickled when it can be, its type,
    message and traceback text always; ``stage`` says where (``call``; ``load``: the call
    could not be loaded; ``result``: its value could not be pickled)."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        pickled: bytes | None = dumps(exc)
    except Exception:
        pickled = None
    kind = type(exc)
    return {"ok": False, "exception": pickled, "type": f"{kind.__module__}.{kind.__qualname__}",
            "message": str(exc), "traceback": text, "stage": "call"}


def write_outcome(path: str, outcome: dict[str, Any]) -> None:
    """Write the outcome whole: to a ``.part`` file, then renamed into place."""
    partial = f"{path}.part"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(partial, path)


def run(call: str, function_ref: str, arguments_ref: str) -> tuple[dict[str, Any], int]:
    """Load and run one call; its outcome and the exit status."""
    try:
        function: Callable[..., Any] = pickle.loads(read_part(call, function_ref))
        args, kwargs = pickle.loads(read_part(call, arguments_ref))
    except BaseException as exc:
        outcome = failure(exc)
        outcome["stage"] = "load"
        return outcome, EXIT_UNLOADABLE
    try:
        value = function(*args, **kwargs)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the caller hears
        return failure(exc, skip_frames=1), EXIT_RAISED
    try:
        return {"ok": True, "value": dumps(value)}, 0
    except Exception as exc:
        outcome = failure(exc)
        outcome["stage"] = "result"
        return outcome, EXIT_RAISED


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 4):
        print("usage: python -m gridcouple.executor.runner CALL FUNCTION ARGUMENTS [RESULT]",
              file=sys.stderr)
        return EXIT_UNLOADABLE
    os.umask(0o077)
    result = args[3] if len(args) == 4 else os.path.join(
        os.environ.get("GRIDCOUPLE_JOB_HOME", "."), RESULT_NAME)
    outcome, status = run(*args[:3])
    if not outcome["ok"]:
        sys.stderr.write(outcome["traceback"])
    sys.stdout.flush()
    write_outcome(result, outcome)
    return status


if __name__ == "__main__":
    sys.exit(main())
