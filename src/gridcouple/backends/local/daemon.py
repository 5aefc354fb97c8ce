"""The local daemon: owns the queue of one state directory.

Run as ``python -P -m gridcouple.backends.local.daemon STATE_DIR OPTIONS_JSON [NAME]`` (the
backend starts it on demand, in ``/``, so that no working directory is on its import path). One
thread, one ``select`` loop: woken by clients on its socket, by SIGCHLD, by the exit of adopted
jobs (pidfds) and by walltime and grace-period deadlines. Each turn it reaps
ended jobs, reads the journal if a client changed it, enforces deadlines, asks the scheduling
policy which waiting jobs start, and writes all changes back in one transaction.

Jobs are its children, so their exit codes and signals are exact. If the daemon itself dies,
its jobs go on; the next daemon adopts them by pid (checked against the process start time) and
sees them end, but cannot learn their exit status: such a job ends FAILED with a reason saying
so, rather than being guessed COMPLETED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gridcouple.backends.local.backend import (
    LocalOptions,
    daemon_address,
    environment_file,
    process_start,
)
from gridcouple.backends.shared_fs import job_home, output_file, working_directory
from gridcouple.errors import ConfigError
from gridcouple.jobs import JobSpec, JobState, JobStatus
from gridcouple.journal import Journal
from gridcouple.scheduler.policies import RunningJob, WaitingJob, make_policy

log = logging.getLogger("gridcouple.local.daemon")

RESYNC_INTERVAL = 5.0  # read the journal at least this often, even without a wake-up
MEMORY_CHECK_INTERVAL = 1.0  # how often jobs with a memory limit have their memory sampled
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class RunningProcess:
    """A started job: our child (``process``) or a job adopted from an earlier daemon."""

    job_id: int
    pid: int
    procs: int
    start_time: float
    estimate: float | None
    deadline: float | None  # walltime end (epoch seconds)
    process: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    memory_mb: int | None = None  # resident memory limit of the whole process group
    peak_memory_mb: float = 0.0
    ending: str | None = None  # "cancel", "timeout" or "memory" once we signalled it
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM


class Daemon:
    """The queue of one state directory (see the module docstring)."""

    def __init__(self, state_dir: Path, options: LocalOptions, name: str = "local") -> None:
        self.state_dir = state_dir
        self.name = name  # the backend's name: its jobs in the journal
        self.journal = Journal(state_dir / "journal.sqlite")
        self.host = socket.gethostname()
        self.options = options
        self.policy = make_policy(options.policy)
        self.waiting: dict[int, WaitingJob] = {}  # in submit (id) order
        self.specs: dict[int, tuple[JobSpec, dict[str, str]]] = {}  # waiting: spec, environment
        self.environments: dict[str | None, dict[str, str]] = {}  # by name (None too)
        self.running: dict[int, RunningProcess] = {}
        self.changes: list[tuple[int, JobStatus]] = []
        self.extra: dict[int, dict[str, int]] = {}
        self.selector = selectors.DefaultSelector()
        self.needs_sync = True
        self.last_sync = 0.0
        self.stopping = False
        self.next_memory_check = 0.0

    # --- the loop --------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until idle for ``idle_exit`` seconds or asked to stop; 0 if another daemon runs."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(daemon_address(self.state_dir, self.name))
        except OSError:
            log.info("another daemon already serves %s", self.state_dir)
            return 0
        listener.listen(256)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._request_stop)
        self.selector.register(wake_read, selectors.EVENT_READ, "signal")
        log.info("serving %s with %d slots, policy %s", self.state_dir,
                 self.options.capacity, self.options.policy)
        self._adopt()
        idle_since: float | None = None
        while not self.stopping:
            for key, _ in self.selector.select(self._timeout(idle_since)):
                if key.data == "listener":
                    self._accept(listener)
                elif key.data == "signal":
                    while _drain(wake_read):
                        pass
                else:
                    self._adopted_ended(key.data)
            self._turn()
            if self.running or self.waiting:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.options.idle_exit:
                log.info("idle for %.0f s, exiting", self.options.idle_exit)
                break
        self._flush()
        listener.close()
        return 0

    def _turn(self) -> None:
        self._reap()
        if self.needs_sync or time.monotonic() - self.last_sync > RESYNC_INTERVAL:
            self._sync()
        self._enforce_deadlines()
        self._enforce_memory()
        self._schedule()
        self._flush()

    def _timeout(self, idle_since: float | None) -> float:
        now = time.time()
        moments = [RESYNC_INTERVAL]
        for run in self.running.values():
            for moment in (run.deadline if run.ending is None else None, run.kill_at):
                if moment is not None:
                    moments.append(moment - now)
        if any(run.memory_mb for run in self.running.values()):
            moments.append(self.next_memory_check - time.monotonic())
        if idle_since is not None:
            moments.append(self.options.idle_exit - (time.monotonic() - idle_since))
        return max(0.0, min(moments))

    def _request_stop(self, *_: object) -> None:
        self.stopping = True

    # --- clients ---------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(2.0)
                uid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
                if uid != os.getuid():
                    log.warning("ignored a connection from uid %d", uid)
                    continue
                try:
                    line = conn.makefile("rb").readline(65536)
                    message = json.loads(line)
                except (OSError, ValueError) as exc:
                    log.warning("ignored a bad message: %s", exc)
                    continue
            self._handle(message)

    def _handle(self, message: dict) -> None:
        op = message.get("op")
        if op == "wake":
            self.needs_sync = True
            if "options" in message:
                self._set_options(message["options"])
        elif op == "shutdown":
            log.info("asked to stop; %d running jobs go on", len(self.running))
            self.stopping = True

    def _set_options(self, values: dict) -> None:
        try:
            options = LocalOptions(**values)
            policy = make_policy(options.policy) if options.policy != self.options.policy \
                else self.policy
        except (TypeError, ValueError, ConfigError) as exc:
            log.error("kept the old options; the new ones are wrong: %s", exc)
            return
        self.options, self.policy = options, policy

    # --- the journal -----------------------------------------------------------------------

    def _sync(self) -> None:
        """Take in what clients changed: new, held, released and canceled jobs."""
        self.needs_sync = False
        self.last_sync = time.monotonic()
        queued = set()
        for job_id, state, cancel_requested in self.journal.live_states(self.name):
            if state is JobState.QUEUED:
                queued.add(job_id)
            elif job_id in self.running and cancel_requested:
                run = self.running[job_id]
                if run.ending is None:
                    self._signal(run, signal.SIGTERM, "cancel")
        for job_id in [i for i in self.waiting if i not in queued]:
            del self.waiting[job_id]
            del self.specs[job_id]
        new = sorted(i for i in queued if i not in self.waiting and i not in self.running)
        out_of_order = bool(new and self.waiting and new[0] < max(self.waiting))  # released
        for record in self.journal.get(new) if new else ():
            spec = record.job.spec
            cwd = record.extra.get("cwd")
            if spec.directory and isinstance(cwd, str):  # relative to where it was submitted
                spec = dataclasses.replace(spec, directory=os.path.join(
                    cwd, os.path.expanduser(spec.directory)))
            self.specs[record.job.id] = (spec, self._environment(record.extra.get("environment")))
            self.waiting[record.job.id] = WaitingJob(
                key=record.job.id, procs=spec.resources.cpus,
                submit_time=record.status.submit_time or time.time(),
                estimate=spec.expected_runtime)
        if out_of_order:
            self.waiting = dict(sorted(self.waiting.items()))

    def _environment(self, name: str | None) -> dict[str, str]:
        if name not in self.environments:
            try:
                path = environment_file(self.state_dir, name or "")
                self.environments[name] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("submitting environment %s unreadable (%s); using mine", name, exc)
                self.environments[name] = dict(os.environ)
        return self.environments[name]

    def _flush(self) -> None:
        if self.changes:
            self.journal.update(self.changes)
            self.changes = []
        if self.extra:
            self.journal.set_extra(self.extra)
            self.extra = {}

    # --- starting --------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self.waiting:
            return
        now = time.time()
        capacity = self.options.capacity
        running = [RunningJob(key=r.job_id, procs=r.procs, start_time=r.start_time,
                              estimate=r.estimate) for r in self.running.values()]
        chosen = self.policy.select(now, list(self.waiting.values()), running, capacity)
        free = capacity - sum(r.procs for r in running)
        allowed = []
        for job in chosen:  # a policy of a user's own must not overfill the machine
            if job.key in self.waiting and job.procs <= free:
                allowed.append(job.key)
                free -= job.procs
        if not allowed:
            return
        started = self.journal.update(
            [(i, JobStatus(JobState.ACTIVE, start_time=now, host=self.host)) for i in allowed],
            only_if=[JobState.QUEUED])
        for job_id in allowed:
            del self.waiting[job_id]
        for job_id in started:
            self._start(job_id, now)

    def _start(self, job_id: int, now: float) -> None:
        spec, environment = self.specs.pop(job_id)
        home = job_home(self.state_dir, job_id)
        try:
            home.mkdir(parents=True, exist_ok=True)
            process = _spawn(spec, home, job_id, self.state_dir, environment)
        except OSError as exc:
            message = f"cannot start: {exc.strerror or exc}: {exc.filename or spec.argv[:1]}"
            with open(output_file(spec, home, "stderr"), "a") as err:
                err.write(f"gridcouple: {message}\n")
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            self.changes.append((job_id, JobStatus(
                JobState.FAILED, reason=message, exit_code=code, start_time=now,
                end_time=time.time(), host=self.host)))
            return
        walltime = spec.resources.walltime
        self.running[job_id] = RunningProcess(
            job_id=job_id, pid=process.pid, procs=spec.resources.cpus, start_time=now,
            estimate=spec.expected_runtime, deadline=now + walltime if walltime else None,
            memory_mb=spec.resources.memory_mb, process=process)
        self.extra[job_id] = {"pid": process.pid, "proc_start": process_start(process.pid) or 0}

    # --- watching and ending ---------------------------------------------------------------

    def _reap(self) -> None:
        for run in list(self.running.values()):
            if run.process is not None and run.process.poll() is not None:
                self._finish(run, run.process.returncode)

    def _adopted_ended(self, job_id: int) -> None:
        run = self.running.get(job_id)
        if run is not None:
            self._finish(run, None)

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for run in self.running.values():
            if run.ending is None and run.deadline is not None and now >= run.deadline:
                self._signal(run, signal.SIGTERM, "timeout")
            elif run.kill_at is not None and now >= run.kill_at:
                _kill_group(run.pid, signal.SIGKILL)
                run.kill_at = None

    def _enforce_memory(self) -> None:
        """Like Slurm's OverMemoryKill without cgroups: sample the resident memory of each
        limited job's process group; a job over its limit is killed at once."""
        limited = {run.pid: run for run in self.running.values()
                   if run.memory_mb and run.ending is None}
        if not limited or time.monotonic() < self.next_memory_check:
            return
        self.next_memory_check = time.monotonic() + MEMORY_CHECK_INTERVAL
        for pgid, resident_mb in _resident_memory_by_group(set(limited)).items():
            run = limited[pgid]
            assert run.memory_mb is not None  # limited holds only jobs with a limit
            run.peak_memory_mb = max(run.peak_memory_mb, resident_mb)
            if resident_mb > run.memory_mb:
                run.ending = "memory"
                _kill_group(pgid, signal.SIGKILL)

    def _signal(self, run: RunningProcess, signum: int, why: str) -> None:
        run.ending = why
        run.kill_at = time.time() + self.options.grace_period
        _kill_group(run.pid, signum)

    def _finish(self, run: RunningProcess, returncode: int | None) -> None:
        """Record the end of a job; kill what is left of its process group."""
        _kill_group(run.pid, signal.SIGKILL)
        if run.pidfd is not None:
            self.selector.unregister(run.pidfd)
            os.close(run.pidfd)
        del self.running[run.job_id]
        exit_code = signum = None
        native_state = ""
        if returncode is not None and returncode < 0:
            signum = -returncode
        elif returncode is not None:
            exit_code = returncode
        if run.ending == "cancel":
            state, reason = JobState.CANCELED, "canceled by user"
        elif run.ending == "memory":
            state, native_state = JobState.FAILED, "OUT_OF_MEMORY"
            reason = (f"resident memory {run.peak_memory_mb:.0f} MiB exceeded the "
                      f"{run.memory_mb} MiB asked for")
        elif run.ending == "timeout":
            assert run.deadline is not None  # only a job with a walltime times out
            state = JobState.TIMEOUT
            reason = f"walltime of {run.deadline - run.start_time:g} s reached"
        elif returncode is None:
            state = JobState.FAILED
            reason = "exit status unknown: the local daemon was restarted while the job ran"
        elif returncode == 0:
            state, reason = JobState.COMPLETED, ""
        else:
            state, reason = JobState.FAILED, ""
        self.changes.append((run.job_id, JobStatus(
            state, native_state=native_state, reason=reason, exit_code=exit_code, signal=signum,
            start_time=run.start_time, end_time=time.time(), host=self.host)))

    def _adopt(self) -> None:
        """Take over the jobs an earlier daemon started and left running."""
        for record in self.journal.records(self.name, active_only=True):
            if record.status.state not in (JobState.ACTIVE, JobState.SUSPENDED):
                continue
            job_id, spec = record.job.id, record.job.spec
            pid = record.extra.get("pid")
            if not pid or process_start(pid) != record.extra.get("proc_start"):
                why = ("exit status unknown: it ended while no local daemon was watching" if pid
                       else "the local daemon stopped while starting it")
                self.changes.append((job_id, JobStatus(JobState.FAILED, reason=why,
                                                       end_time=time.time(), host=self.host)))
                continue
            pidfd = os.pidfd_open(pid)
            self.selector.register(pidfd, selectors.EVENT_READ, job_id)
            start = record.status.start_time or time.time()
            walltime = spec.resources.walltime
            self.running[job_id] = RunningProcess(
                job_id=job_id, pid=pid, procs=spec.resources.cpus, start_time=start,
                estimate=spec.expected_runtime,
                deadline=start + walltime if walltime else None,
                memory_mb=spec.resources.memory_mb, pidfd=pidfd)
            log.info("adopted job %d (pid %d)", job_id, pid)
        self._flush()


def _spawn(spec: JobSpec, home: Path, job_id: int, state_dir: Path,
           submitted_environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a job in its own session (so its process group can be signalled as a whole)."""
    environment = {**submitted_environment, **spec.environment}
    environment.update(GRIDCOUPLE_JOB_ID=str(job_id), GRIDCOUPLE_JOB_NAME=spec.name,
                       GRIDCOUPLE_JOB_HOME=str(home), GRIDCOUPLE_STATE_DIR=str(state_dir))
    argv = list(spec.argv)
    if spec.script is not None:
        script = home / "job.sh"
        script.write_text(spec.script)
        script.chmod(0o700)
        argv = [str(script)] if spec.script.startswith("#!") else ["/bin/sh", str(script)]
    out_path, err_path = output_file(spec, home, "stdout"), output_file(spec, home, "stderr")
    with open(out_path, "ab") as out:
        err = out if err_path == out_path else open(err_path, "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(argv, cwd=working_directory(spec, home), env=environment,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
        finally:
            if err is not out:
                err.close()


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _resident_memory_by_group(groups: set[int]) -> dict[int, float]:
    """Resident memory in MiB summed over the processes of each process group in ``groups``."""
    usage: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text[text.rindex(b")") + 2 :].split()
        group = int(fields[2])
        if group in groups:
            usage[group] = usage.get(group, 0.0) + int(fields[21]) * PAGE_MB
    return usage


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m gridcouple.backends.local.daemon STATE_DIR OPTIONS_JSON [NAME]``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s local-daemon[%(process)d] %(message)s")
    state_dir = Path(args[0]).resolve()
    options = LocalOptions(**json.loads(args[1])) if len(args) > 1 else LocalOptions()
    return Daemon(state_dir, options, *args[2:3]).serve()


if __name__ == "__main__":
    sys.exit(main())
