"""The job script of a batch submission, and the exit-code file it leaves.

A submission of N same-shaped jobs writes two files, whatever N: the script handed to the batch
system (from ``job.sh.tmpl``) and a task file with one line per job. Task N of the array reads
line N+1: its journal id, name, home, working directory, output files, script text, environment
and command, each value bash-quoted. The script enters the working directory, sets the
environment, runs the command with its output redirected and writes the exit-code file.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from string import Template

from gridcouple.errors import BackendError
from gridcouple.jobs import JobSpec

_HERE = Path(__file__).parent
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Characters written as escapes inside $'...': the quote, the backslash and control characters.
_ESCAPE = re.compile(r"[\\'\x00-\x1f\x7f]")
_NAMED = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}

EXIT_CODE_FILE = "exit_code"


def bash_quote(text: str) -> str:
    """``$'...'`` quoting: one line whatever the text holds, read back verbatim by bash."""
    if "\0" in text:
        raise ValueError("a NUL character cannot be passed to a command")
    return "$'" + _ESCAPE.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"),
                              text) + "'"


@cache
def _template() -> Template:
    return Template((_HERE / "job.sh.tmpl").read_text())


def task_line(spec: JobSpec, *, job_id: int, home: Path, workdir: Path, stdout: Path,
              stderr: Path) -> str:
    """One job's line of a task file (see the module docstring)."""
    for key in spec.environment:
        if not _ENV_NAME.fullmatch(key):
            raise BackendError(f"job {spec.name}: environment variable name {key!r} is not "
                               "valid in a shell (use letters, digits and '_', not starting "
                               "with a digit)")
    words = [str(job_id), spec.name, str(home), str(workdir), str(stdout), str(stderr),
             spec.script or "", str(len(spec.environment))]
    for key, value in spec.environment.items():
        words += [key, str(value)]
    words += spec.argv
    try:
        return " ".join(bash_quote(word) if i else word for i, word in enumerate(words))
    except ValueError as exc:
        raise BackendError(f"job {spec.name}: {exc}") from None


def render_script(*, tasks: Path, task_index: str, state_dir: Path, header: str = "") -> str:
    """The script of one submission. ``task_index`` is the bash expression of the task's index
    (Slurm: ``${SLURM_ARRAY_TASK_ID:-0}``); ``header`` holds directives for the batch system."""
    return _template().substitute(tasks=shlex.quote(str(tasks)), task_index=task_index,
                                  state_dir=shlex.quote(str(state_dir)), header=header)


def task_ids(lines: Iterable[str]) -> list[int]:
    """The journal ids of a task file's lines, in task order."""
    return [int(line.split(" ", 1)[0]) for line in lines if line.strip()]


def parse_exit_record(text: str) -> tuple[int | None, int | None, float, float]:
    """``(exit_code, signal, start, end)`` from an exit-code file's line. A shell reports a
    command killed by signal N as exit code 128+N; that is read back as the signal."""
    try:
        kind, value, start, end = text.split()
        number = int(value)
        times = float(start), float(end)
    except ValueError:
        raise BackendError(f"exit-code file holds {text.strip()!r}, expected "
                           "'exit|signal NUMBER START END'") from None
    if kind == "signal":
        return None, number, *times
    if kind != "exit":
        raise BackendError(f"exit-code file holds {text.strip()!r}: unknown kind {kind!r}")
    if number > 128:
        return None, number - 128, *times
    return number, None, *times
