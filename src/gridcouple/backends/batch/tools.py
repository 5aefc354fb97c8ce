"""Running a batch system's command-line tools: one place for timeouts, exit codes and the two
kinds of failure a backend must tell apart.

- :class:`~gridcouple.errors.BackendError`: the batch system refused (a bad option, a limit);
  its own message is kept.
- :class:`~gridcouple.errors.QueryUnavailableError`: no answer right now (a timeout, a
  controller that is down); nothing is concluded about the jobs, and callers retry.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gridcouple.errors import BackendError, QueryUnavailableError


def one_line(text: str) -> str:
    """A tool's message on one line: its non-empty lines joined with '; '."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


@dataclass(frozen=True)
class ToolRunner:
    """Runs the tools of one batch system. ``system`` names it in messages ("Slurm"),
    ``section`` is the config table whose ``bin_dir`` and ``command_timeout`` apply;
    ``environment`` is added to this process's for every tool (Slurm's ``SLURM_CONF``)."""

    system: str
    section: str
    bin_dir: Path | None
    timeout: float
    environment: Mapping[str, str] | None = None

    def run(self, tool: str, args: Sequence[str], *, unavailable: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one tool. Its failure raises BackendError with the tool's own message, or
        QueryUnavailableError when it only means "no answer right now": a timeout, or any
        failure of a query (``unavailable``)."""
        command = str(self.bin_dir / tool) if self.bin_dir else tool
        try:
            proc = subprocess.run([command, *args], capture_output=True, text=True,
                                  timeout=self.timeout, env={**os.environ, **self.environment}
                                  if self.environment else None)
        except FileNotFoundError:
            where = f"in {self.bin_dir}" if self.bin_dir else "on PATH"
            raise BackendError(f"{tool} is not {where}: is {self.system} installed? "
                               f"([{self.section}] bin_dir)") from None
        except subprocess.TimeoutExpired:
            raise QueryUnavailableError(f"{tool} did not answer within {self.timeout:g} s "
                                        f"([{self.section}] command_timeout)") from None
        if check and proc.returncode:
            message = one_line(proc.stderr) or one_line(proc.stdout) or "no message"
            error = QueryUnavailableError if unavailable else BackendError
            raise error(f"{tool} failed (exit code {proc.returncode}): {message}")
        return proc
