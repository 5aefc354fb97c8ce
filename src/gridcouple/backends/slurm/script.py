"""The scripts a Slurm job runs, rendered from the templates beside this module.

``job.sh.tmpl`` becomes each job's own ``job.sh`` in its home: it enters the working directory,
sets the environment, runs the command with its output redirected and writes the exit-code
file. ``array.sh.tmpl`` is the batch script handed to sbatch: task N of an array runs the
``job.sh`` of the N-th journal id. Every value that came from the user is shell-quoted.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from string import Template

from gridcouple.errors import BackendError
from gridcouple.jobs import JobSpec

_HERE = Path(__file__).parent
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

EXIT_CODE_FILE = "exit_code"
JOB_SCRIPT = "job.sh"
USER_SCRIPT = "script"


@cache
def _template(name: str) -> Template:
    return Template((_HERE / name).read_text())


def render_job_script(spec: JobSpec, *, job_id: int, home: Path, workdir: Path,
                      stdout: Path, stderr: Path, state_dir: Path) -> str:
    """The text of one job's ``job.sh``. A ``spec.script`` is run from ``home/script``
    (directly when it starts with ``#!``, else with /bin/sh), the caller writes that file."""
    q = shlex.quote
    for key in spec.environment:
        if not _ENV_NAME.fullmatch(key):
            raise BackendError(f"job {spec.name}: environment variable name {key!r} is not "
                               "valid in a shell (use letters, digits and '_', not starting "
                               "with a digit)")
    if spec.script is None:
        command = shlex.join(spec.argv)
    elif spec.script.startswith("#!"):
        command = q(str(home / USER_SCRIPT))
    else:
        command = "/bin/sh " + q(str(home / USER_SCRIPT))
    redirects = f">>{q(str(stdout))} " + ("2>&1" if stderr == stdout else f"2>>{q(str(stderr))}")
    environment = "".join(f"export {key}={q(str(value))}\n"
                          for key, value in spec.environment.items())
    return _template("job.sh.tmpl").substitute(
        job_id=job_id, name=q(spec.name), home=q(str(home)), workdir=q(str(workdir)),
        state_dir=q(str(state_dir)), environment=environment.rstrip("\n"), command=command,
        redirects=redirects)


def render_batch_script(job_ids: Sequence[int], jobs_root: Path) -> str:
    """The script given to sbatch for one plain job (one id) or one array (task N -> id N)."""
    return _template("array.sh.tmpl").substitute(
        ids=" ".join(str(i) for i in job_ids), jobs_root=shlex.quote(str(jobs_root)))


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
