"""Job files on a file system the submitting side shares with the jobs (this machine, or a
cluster's shared home): each job has a home ``state_dir/jobs/ID`` for its stdout, stderr and
bookkeeping, and the file operations of :class:`gridcouple.backends.base.Backend` are plain
file operations there. A backend without such a file system implements them over its own
protocol instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from gridcouple.errors import BackendError
from gridcouple.jobs import Job, JobSpec

Stream = Literal["stdout", "stderr"]


def job_home(state_dir: Path, job_id: int) -> Path:
    """A job's home below a state directory: ``state_dir/jobs/ID``."""
    return Path(state_dir) / "jobs" / str(job_id)


def working_directory(spec: JobSpec, home: Path) -> Path:
    """Where a job runs: its own ``directory`` or else its home."""
    return Path(spec.directory).expanduser() if spec.directory else home


def output_file(spec: JobSpec, home: Path, stream: Stream) -> Path:
    """The file a job's stdout or stderr goes to: as the spec says (relative paths from its
    working directory), else ``home/stdout`` and ``home/stderr``."""
    chosen = getattr(spec, stream)
    if chosen is None:
        return home / stream
    path = Path(chosen)
    return path if path.is_absolute() else working_directory(spec, home) / path


def shares_file_system(backend: Any) -> bool:
    """Whether a backend's jobs see this machine's files at the same paths (its
    ``shares_file_system``; False for a backend that does not say)."""
    return bool(getattr(backend, "shares_file_system", False))


class SharedFileSystem:
    """The file operations of a backend whose jobs see its state directory at the same path.
    Mix in before :class:`~gridcouple.backends.base.Backend`."""

    state_dir: Path
    #: The jobs see this machine's files at the same paths, not only the state directory: the
    #: coupler runs application servers in its own working directory, with its import path.
    #: A site whose nodes share the state directory alone sets False.
    shares_file_system: ClassVar[bool] = True

    def job_home(self, job_id: int) -> Path:
        """Where a job's stdout, stderr and bookkeeping live: ``state_dir/jobs/ID``."""
        return job_home(self.state_dir, job_id)

    def output_path(self, job: Job, stream: Stream) -> Path:
        """The file a job's stdout or stderr goes to."""
        return output_file(job.spec, self.job_home(job.id), stream)

    def read_output(self, job: Job, stream: Stream = "stdout", tail: int | None = None) -> str:
        """The text a job wrote to stdout or stderr so far (the last ``tail`` lines)."""
        path = self.output_path(job, stream)
        try:
            text = path.read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return ""
        return "".join(text.splitlines(keepends=True)[-tail:]) if tail else text

    def stage_in(self, spec: JobSpec, home: Path) -> None:
        """Create the job's home and copy its input files into its working directory."""
        home.mkdir(parents=True, exist_ok=True)
        workdir = working_directory(spec, home)
        for staged in spec.stage_in:
            target = workdir / staged.target
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                copy = shutil.copytree if Path(staged.source).is_dir() else shutil.copy2
                copy(staged.source, target)
            except OSError as exc:
                raise BackendError(f"job {spec.name}: cannot stage in {staged.source}: "
                                   f"{exc.strerror or exc}") from exc

    def fetch(self, job: Job, destination: str | Path) -> list[Path]:
        """Copy the job's stage-out files to ``destination``; returns the copied paths."""
        workdir = working_directory(job.spec, self.job_home(job.id))
        destination = Path(destination)
        copied = []
        for staged in job.spec.stage_out:
            source, target = workdir / staged.source, destination / staged.target
            if not source.exists():
                raise BackendError(f"job {job.id}: output {staged.source} was not produced "
                                   f"(looked in {workdir})")
            target.parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if source.is_dir() else shutil.copy2
            copy(source, target)
            copied.append(target)
        return copied

    def field_store_base(self) -> str | None:
        """None: each application server keeps its field versions in its own node's memory
        (/dev/shm) and serves them; a reader on the same node opens them directly, one on
        another node reads the chunks it needs through the producer's server (no version
        goes through the shared file system, often the slowest one on a cluster). ``[coupler]
        field_store`` puts them in one shared place instead."""
        return None
