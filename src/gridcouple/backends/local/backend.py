"""The local backend: jobs are processes on this machine, queued behind a slot limit.

Like a small batch system, it has a daemon (one per state directory, started on demand, gone
when idle) that owns the queue: it starts jobs in the order the scheduling policy chooses,
reaps them, enforces walltimes and acts on cancellations. Clients (this class, ``gridcouple``
in another shell, the coupler after a crash) talk to it through the journal and wake it over
a local socket. Jobs therefore outlive the process that submitted them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal as signal_module
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gridcouple.backends.base import Backend, Backoff
from gridcouple.backends.shared_fs import SharedFileSystem
from gridcouple.errors import BackendError, OptionError
from gridcouple.jobs import Job, JobEvent, JobSpec, JobState, JobStatus
from gridcouple.journal import JobRecord
from gridcouple.scheduler.policies import check_policy

WAITING = (JobState.NEW, JobState.QUEUED, JobState.HELD)


@dataclass(frozen=True)
class LocalOptions:
    """``[backend.local]`` options."""

    slots: int = 0  # processors jobs may use at once; 0 = this machine's CPU count
    policy: str = "fcfs"  # a name from scheduler.policies or package.module:Class
    grace_period: float = 5.0  # seconds between SIGTERM and SIGKILL on cancel and timeout
    idle_exit: float = 30.0  # the daemon exits after this long with no job queued or running

    def __post_init__(self) -> None:
        if not isinstance(self.slots, int) or isinstance(self.slots, bool) or self.slots < 0:
            raise OptionError("slots", f"must be 0 (all CPUs) or more, got {self.slots!r}")
        for key in ("grace_period", "idle_exit"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or isinstance(value, bool) \
                    or not math.isfinite(value) or value < 0:
                raise OptionError(key, f"must be a finite number of seconds, not negative, "
                                       f"got {value!r}")
        if not isinstance(self.policy, str):
            raise OptionError("policy", f"must be a name, got {self.policy!r}")
        check_policy(self.policy)

    @property
    def capacity(self) -> int:
        """The slot limit in processors."""
        return self.slots or os.cpu_count() or 1


def daemon_address(state_dir: Path, name: str = "local") -> str:
    """The daemon's socket: in Linux's abstract namespace (no path-length limit, no file left
    behind), named after the state directory and the backend's name. The daemon checks each
    peer's uid."""
    suffix = "" if name == "local" else f"#{name}"
    return "\0gridcouple-local:" + str(Path(state_dir).resolve()) + suffix


def socket_peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    return int(struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1])


def peer_uid(address: str) -> int | None:
    """The uid of the process listening on a Unix socket address (None if none listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(address)
            return socket_peer_uid(sock)
        except OSError:
            return None


def process_start(pid: int, *, zombie: bool = False) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from its reuse); None
    if there is no such process, or it is a zombie (unless ``zombie``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] == b"Z" and not zombie:
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def daemon_environment() -> dict[str, str]:
    """This environment for the daemon, with PYTHONPATH's entries absolute and no empty
    one (which would put the daemon's working directory on its import path)."""
    environment = dict(os.environ)
    if "PYTHONPATH" in environment:
        entries = [os.path.abspath(p) for p in environment["PYTHONPATH"].split(os.pathsep) if p]
        environment["PYTHONPATH"] = os.pathsep.join(entries)
    return environment


def environment_file(state_dir: Path, name: str) -> Path:
    """Where a saved submitting environment lives."""
    return Path(state_dir) / "environments" / f"{name}.json"


class LocalBackend(SharedFileSystem, Backend):
    """Processes on this machine behind a slot-limited queue (see the module docstring)."""

    kind = "local"
    Options = LocalOptions
    backoff = Backoff(first=0.01, most=0.25)

    def __init__(self, options: LocalOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options or LocalOptions(), **kwargs)
        self._daemon_checked = 0.0

    @property
    def end_grace(self) -> float:
        """The grace period between SIGTERM and SIGKILL, and a margin."""
        return self.options.grace_period + 10.0

    def field_store_base(self) -> str | None:
        """Memory (/dev/shm): every job runs on this machine."""
        return "/dev/shm" if os.path.isdir("/dev/shm") else str(self.state_dir / "fields")

    def submit(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Record the jobs, stage their inputs, queue them and wake the daemon."""
        capacity = self.options.capacity
        for spec in specs:
            if spec.resources.cpus > capacity:
                raise BackendError(f"job {spec.name} asks for {spec.resources.cpus} cpus; the "
                                   f"local backend has {capacity} slots ([backend.local] slots)")
            if spec.resources.gpus:
                raise BackendError(f"job {spec.name} asks for {spec.resources.gpus} gpus; the "
                                   "local backend does not allocate GPUs")
            if spec.resources.nodes > 1:
                raise BackendError(f"job {spec.name} asks for {spec.resources.nodes} nodes; the "
                                   "local backend has one")
        me = os.getpid()
        extra = {"environment": self._save_environment(), "submitter": [me, process_start(me)]}
        with contextlib.suppress(OSError):  # relative directories are relative to it
            extra["cwd"] = os.getcwd()
        ids = self.journal.add(self.name, specs, extra=extra)
        try:
            for job_id, spec in zip(ids, specs, strict=True):
                if spec.stage_in:  # copied now: the inputs as they are at submission
                    self.stage_in(spec, self.job_home(job_id))
        except BackendError as exc:
            self.journal.update([(i, JobStatus(JobState.FAILED, reason=f"not submitted: {exc}",
                                               end_time=time.time())) for i in ids])
            raise
        self.journal.set_native_ids(((i, str(i), str(self.job_home(i))) for i in ids),
                                    state=JobState.QUEUED)
        self.wake_daemon()
        return [Job(id=i, backend=self.name, native_id=str(i), spec=s)
                for i, s in zip(ids, specs, strict=True)]

    def _save_environment(self) -> str:
        """Keep the submitting environment (jobs get it, as with Slurm's --export=ALL) in a
        file named by its hash, written once however many jobs share it."""
        text = json.dumps(dict(os.environ), sort_keys=True)
        name = hashlib.sha256(text.encode()).hexdigest()[:20]
        path = environment_file(self.state_dir, name)
        if not path.exists():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.touch(mode=0o600)
            partial.write_text(text)
            partial.replace(path)
        return name

    def query(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """The daemon keeps the journal current, so the records are the answer; a job still
        NEW whose submitting process has ended was never queued, and is FAILED."""
        self._ensure_daemon()
        result = {r.job.id: r.status for r in records}
        alive: dict[tuple[int, int | None], bool] = {}  # one /proc read per submitter
        for record in records:
            if record.status.state is not JobState.NEW or "submitter" not in record.extra:
                continue
            pid, started = record.extra["submitter"]
            if (pid, started) not in alive:
                alive[pid, started] = process_start(pid) == started
            if not alive[pid, started]:
                result[record.job.id] = JobStatus(
                    JobState.FAILED, end_time=time.time(),
                    reason=f"not queued: its submitting process (pid {pid}) ended first")
        return result

    def events(self, jobs: Sequence[Job], *, timeout: float | None = None) -> Iterator[JobEvent]:
        """Follow the journal's event table, which the daemon writes: each poll is one small
        query, and only jobs that changed are read again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = self.journal.last_event()
        known = {}
        for job, status in zip(jobs, self.status(jobs), strict=True):
            known[job.id] = status.state
            yield JobEvent(job=job, status=status, previous=None)
        by_id = {job.id: job for job in jobs}
        unfinished = {i for i, state in known.items() if not state.is_final}
        interval = self.backoff.first
        while unfinished:
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(interval if deadline is None
                       else max(0.0, min(interval, deadline - time.monotonic())))
            new = self.journal.events_since(seq, min(unfinished), max(unfinished))
            seq = new[-1][0] if new else seq
            changed = sorted({job_id for _, job_id, _, _ in new if job_id in unfinished})
            for record in self.journal.get(changed):
                state = record.status.state
                if state != known[record.job.id]:
                    yield JobEvent(job=by_id[record.job.id], status=record.status,
                                   previous=known[record.job.id])
                    known[record.job.id] = state
                    if state.is_final:
                        unfinished.discard(record.job.id)
            interval = self.backoff.first if changed else min(interval * self.backoff.factor,
                                                              self.backoff.most)
            self._ensure_daemon()

    def _ensure_daemon(self) -> None:
        """Start the daemon again if it died (it adopts running jobs); checked once a second."""
        now = time.monotonic()
        if now - self._daemon_checked > 1.0:
            self._daemon_checked = now
            if not self._send({"op": "ping"}):
                self.wake_daemon()

    def send_signal(self, jobs: Sequence[Job], signal: str) -> None:
        """Signal the process group of each running job (the daemon's children)."""
        try:
            signum = signal_module.Signals["SIG" + signal.upper().removeprefix("SIG")]
        except KeyError:
            raise BackendError(f"unknown signal {signal!r}") from None
        for record in self.journal.get(job.id for job in jobs):
            pid = record.extra.get("pid")
            if record.status.state is JobState.ACTIVE and pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signum)

    def cancel_now(self, jobs: Sequence[Job]) -> None:
        """Waiting jobs end at once; running ones get SIGTERM, then SIGKILL after the grace
        period, to their whole process group."""
        now = time.time()
        ids = [job.id for job in jobs]
        ended = self.journal.update(
            [(i, JobStatus(JobState.CANCELED, reason="canceled before it started", end_time=now))
             for i in ids], only_if=WAITING)
        running = [i for i in ids if i not in set(ended)]
        if running:
            self.journal.request_cancel(running)
            self.wake_daemon()

    def hold(self, jobs: Sequence[Job]) -> None:
        """Keep queued jobs from starting (running jobs are not affected)."""
        self.journal.update([(j.id, JobStatus(JobState.HELD, reason="held by user"))
                             for j in jobs], only_if=[JobState.QUEUED])

    def release(self, jobs: Sequence[Job]) -> None:
        """Let held jobs start again."""
        self.journal.update([(j.id, JobStatus(JobState.QUEUED)) for j in jobs],
                            only_if=[JobState.HELD])
        self.wake_daemon()

    def stop_daemon(self) -> bool:
        """Ask the daemon to exit now; running jobs go on and the next daemon adopts them."""
        return self._send({"op": "shutdown"})

    def wake_daemon(self, timeout: float = 10.0) -> None:
        """Tell the daemon to look at the journal, starting it when none is running."""
        message = {"op": "wake", "options": asdict(self.options)}
        if self._send(message):
            return
        log = self.state_dir / "local-daemon.log"
        with open(log, "ab") as out:
            # -P and cwd "/": no working directory on its import path, where a selectors.py
            # would run as the user; PYTHONPATH's entries made absolute, empty ones (= the
            # working directory) dropped.
            subprocess.Popen(
                [sys.executable, "-P", "-m", "gridcouple.backends.local.daemon",
                 str(self.state_dir.resolve()), json.dumps(asdict(self.options)), self.name],
                cwd="/", env=daemon_environment(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._send(message):
                return
            time.sleep(0.02)
        raise BackendError(f"the local daemon for {self.state_dir} did not start within "
                           f"{timeout:.0f} s; see {log}")

    def _send(self, message: dict) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            try:
                sock.connect(daemon_address(self.state_dir, self.name))
                holder = socket_peer_uid(sock)  # the name is in a namespace open to all users
                if holder != os.getuid():
                    raise BackendError(
                        f"uid {holder} holds the local daemon's socket name for "
                        f"{self.state_dir}: no daemon of yours can serve it")
                sock.sendall(json.dumps(message).encode() + b"\n")
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            except OSError as exc:
                raise BackendError(f"cannot reach the local daemon: {exc}") from exc
        return True
