"""The local daemon: owns the queue of one state directory.

Run as ``python -P -m gridcouple.backends.local.daemon STATE_DIR OPTIONS_JSON [NAME]`` (the
backend starts it on demand, in ``/``, so that no working directory is on its import path). One
thread, one ``select`` loop: woken by clients on its socket, by SIGCHLD, by the exit of adopted
jobs (pidfds) and by walltime, grace-period and client deadlines. Each turn it reaps ended jobs,
reads the journal if a client changed it, enforces deadlines, asks the scheduling policy which
waiting jobs start, and writes the changes back.

Clients are read without blocking: at most :data:`MAX_CLIENTS` at once, each with
:data:`CLIENT_TIMEOUT` seconds to send one line of at most :data:`MAX_MESSAGE` bytes. No message,
spec or journal row can end the daemon: a job that cannot start fails alone, with its reason.

**Starting a job** never lets it run before its pid is durable. The job is spawned through a
gate (``/bin/sh`` blocked on a pipe); the daemon commits ACTIVE, then the pid and its start time,
and only then lets the gate ``exec`` the job. Should the daemon die on the way, the gate reads
end-of-file and exits without running anything, leaving ``.not-started.PID`` in the job's home.
So the next daemon knows every job: ACTIVE without a pid, or with a gate that never opened, never
ran and is requeued; the others are adopted by pid (checked against the process start time).
The gates of the next :data:`READY_GATES` waiting jobs are spawned ahead, while the slots are
busy, so that the shell's start-up is not in the way of a job's start.

**Exit statuses outlive the daemon.** :func:`main` forks first: the daemon serves in the child,
and the parent becomes the *keeper* (a child subreaper running :data:`KEEPER`, a few lines of
the standard library). Jobs orphaned by the daemon's death become the keeper's children, so it
learns their exit status and writes it to ``STATE_DIR/exits/PID-START.json``, where the next
daemon reads it. Only when the keeper died too does a job that ended unwatched end FAILED with a
reason saying its exit status is unknown, rather than being guessed COMPLETED.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridcouple.backends.local.backend import (
    LocalOptions,
    daemon_address,
    environment_file,
    peer_uid,
    process_start,
    socket_peer_uid,
)
from gridcouple.backends.shared_fs import job_home, output_file, working_directory
from gridcouple.errors import JobNotFoundError
from gridcouple.jobs import JobSpec, JobState, JobStatus
from gridcouple.journal import Journal
from gridcouple.scheduler.policies import RunningJob, WaitingJob, make_policy

log = logging.getLogger("gridcouple.local.daemon")

RESYNC_INTERVAL = 5.0  # read the journal at least this often, even without a wake-up
MEMORY_CHECK_INTERVAL = 1.0  # how often jobs with a memory limit have their memory sampled
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
MAX_CLIENTS = 64  # connections being read at once; the oldest is dropped for a new one
CLIENT_TIMEOUT = 2.0  # seconds a client has to send its line
MAX_MESSAGE = 65536  # bytes in one line
EXIT_WAIT = 2.0  # how long an adopted job's exit status is awaited from a keeper
FAILED_TURN_PAUSE = 1.0  # after a turn that raised, before the next one
READY_GATES = 2  # gates spawned ahead for the next waiting jobs (their start is then quick)
NOT_STARTED = ".not-started"  # + ".PID": a gate that never let its job run

# The gate: wait for one line on stdin; at end of file leave a mark and exit without running
# anything; else go to the job's directory and run it ("$@") with /dev/null as stdin, in this
# very process.
GATE = ('read go || { : > "$1.$$"; exit 99; }; cd -- "$2" || exit 126; shift 2; '
        'exec </dev/null; exec "$@"')

# The keeper (``python -I -S -``, the program read from a pipe): reap every child; for each one
# that is a session leader other than the daemon (the jobs the daemon's death left, and the
# gates), write its exit status for the next daemon before reaping it. It ends when it has no
# children left.
KEEPER = """# gridcouple local keeper
import json, os, sys
daemon, exits = int(sys.argv[2]), sys.argv[3]
while True:
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    pid = info.si_pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
        fields = text[text.rindex(b")") + 2:].split()
        if pid != daemon and int(fields[3]) == pid:
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            os.makedirs(exits, mode=0o700, exist_ok=True)
            path = os.path.join(exits, f"{pid}-{int(fields[19])}.json")
            with open(path + ".tmp", "w") as out:
                json.dump({"returncode": code}, out)
            os.replace(path + ".tmp", path)
    except (OSError, ValueError, IndexError):
        pass
    os.waitpid(pid, 0)
"""


# what reading a corrupt journal row (JSON, spec, state) raises; sqlite's errors are not here
_BAD_ROW = (ValueError, TypeError, KeyError, AttributeError, RecursionError)


class CannotStart(Exception):
    """A job that cannot start: the reason and, for a command not found or not executable,
    the shell's exit code (127, 126)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunningProcess:
    """A started job: our child (``child``) or a job adopted from an earlier daemon."""

    job_id: int
    pid: int
    procs: int
    start_time: float
    estimate: float | None
    deadline: float | None  # walltime end (epoch seconds)
    child: bool = False
    pidfd: int | None = None
    memory_mb: int | None = None  # resident memory limit of the whole process group
    peak_memory_mb: float = 0.0
    ending: str | None = None  # "cancel", "timeout" or "memory" once we signalled it
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM
    proc_start: int = 0  # the process's start time in clock ticks (adopted jobs)
    home: Path | None = None  # adopted jobs: where the gate leaves its mark
    exit_wait_until: float | None = None  # adopted and ended: awaiting the keeper's record


@dataclass
class Launch:
    """A job's gate, spawned and waiting for the word to run the job."""

    job_id: int
    spec: JobSpec
    home: Path
    pid: int
    go: int  # the write end of the gate's stdin
    proc_start: int


@dataclass
class Client:
    """A connection being read."""

    sock: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)


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
        self.aborted: dict[int, Path] = {}  # gates told not to run: their homes by pid
        self.ready: dict[int, Launch] = {}  # gates spawned ahead, by job id (still closed)
        self.not_ready: set[int] = set()  # waiting jobs whose gate failed to spawn ahead
        self.commands: dict[tuple[str, str, str], float] = {}  # found: until when to trust it
        self.clients: dict[int, Client] = {}  # by file descriptor
        self.changes: list[tuple[int, JobStatus]] = []
        # Once the changes are committed: the children whose end they record are reaped (a
        # zombie left by our death goes to the keeper, which records its status) and the
        # files that told of adopted jobs' ends are removed. Never before.
        self.unreaped: list[int] = []
        self.cleanup: list[Path] = []
        self.extra: dict[int, dict[str, Any]] = {}
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.accept_paused_until = 0.0
        self.needs_sync = True
        self.last_sync = 0.0
        self.stopping = False
        self.next_memory_check = 0.0
        self.adopted = False  # the jobs of earlier daemons are taken over (retried until so)

    # --- the loop --------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until idle for ``idle_exit`` seconds or asked to stop; 0 if another daemon runs."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(daemon_address(self.state_dir, self.name))
        except OSError:
            holder = peer_uid(daemon_address(self.state_dir, self.name))
            if holder not in (None, os.getuid()):
                log.error("uid %d holds the socket name of %s: no daemon can serve it",
                          holder, self.state_dir)
            else:
                log.info("another daemon already serves %s", self.state_dir)
            return 0
        listener.listen(256)
        listener.setblocking(False)
        self.listener = listener
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
        idle_since: float | None = None
        while not self.stopping:
            for key, _ in self.selector.select(self._timeout(idle_since)):
                if key.data == "listener":
                    self._accept(listener)
                elif key.data == "signal":
                    while _drain(wake_read):
                        pass
                elif isinstance(key.data, Client):
                    self._read(key.data)
                else:
                    self._adopted_ended(key.data)
            self._expire_clients()
            if not self._guarded(self._turn):
                time.sleep(FAILED_TURN_PAUSE)
            if self.running or self.waiting:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.options.idle_exit:
                log.info("idle for %.0f s, exiting", self.options.idle_exit)
                break
        self._guarded(self._flush)
        for launch in self.ready.values():
            self._abort(launch)
        self.ready.clear()
        deadline = time.monotonic() + 1.0
        while self.aborted and time.monotonic() < deadline:  # they end at once
            self._reap()
            time.sleep(0.01)
        listener.close()
        return 0

    def _guarded(self, step: Any) -> bool:
        """Run one step; an error is logged, never the end of the daemon (its jobs would go
        on unwatched). False if it raised."""
        try:
            step()
        except Exception:
            log.exception("the daemon's turn failed; it goes on")
            self.needs_sync = True
            return False
        return True

    def _turn(self) -> None:
        if not self.adopted:
            self._adopt()
        self._reap()
        if self.needs_sync or time.monotonic() - self.last_sync > RESYNC_INTERVAL:
            self._sync()
        self._enforce_deadlines()
        self._enforce_memory()
        while self._schedule():  # the slots of jobs that could not start are free again
            pass
        self._flush()
        self._prepare()

    def _timeout(self, idle_since: float | None) -> float:
        now = time.time()
        moments = [RESYNC_INTERVAL]
        for run in self.running.values():
            for moment in (run.deadline if run.ending is None else None, run.kill_at):
                if moment is not None:
                    moments.append(moment - now)
            if run.exit_wait_until is not None:
                moments.append(0.01)
        if any(run.memory_mb for run in self.running.values()):
            moments.append(self.next_memory_check - time.monotonic())
        if idle_since is not None:
            moments.append(self.options.idle_exit - (time.monotonic() - idle_since))
        if self.clients:
            moments.append(min(c.deadline for c in self.clients.values()) - time.monotonic())
        if self.accept_paused_until:
            moments.append(self.accept_paused_until - time.monotonic())
        return max(0.0, min(moments))

    def _request_stop(self, *_: object) -> None:
        self.stopping = True

    # --- clients ---------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(MAX_CLIENTS):  # a flood must leave time for the turn
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENOBUFS ...: drop the oldest client, pause
                log.warning("cannot accept a connection: %s", exc)
                if self.clients:
                    self._drop(min(self.clients.values(), key=lambda c: c.deadline))
                self.selector.unregister(listener)
                self.accept_paused_until = time.monotonic() + 0.1
                return
            try:
                uid = socket_peer_uid(conn)
            except OSError:
                conn.close()
                continue
            if uid != os.getuid():
                log.warning("ignored a connection from uid %d", uid)
                conn.close()
                continue
            conn.setblocking(False)
            if len(self.clients) >= MAX_CLIENTS:
                self._drop(min(self.clients.values(), key=lambda c: c.deadline))
            client = Client(conn, time.monotonic() + CLIENT_TIMEOUT)
            self.clients[conn.fileno()] = client
            self.selector.register(conn, selectors.EVENT_READ, client)
            self._read(client)  # the line is usually there already

    def _read(self, client: Client) -> None:
        """Take what a client sent; one whole line (or all it sent before closing) is its
        message."""
        if client.sock.fileno() < 0:  # dropped earlier in this round
            return
        ended = False
        while True:
            try:
                chunk = client.sock.recv(MAX_MESSAGE + 1 - len(client.data))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                ended = True
                break
            client.data += chunk
            if b"\n" in chunk or len(client.data) > MAX_MESSAGE:
                break
        line, newline, _ = bytes(client.data).partition(b"\n")
        if not newline and len(client.data) > MAX_MESSAGE:
            log.warning("ignored a message longer than %d bytes", MAX_MESSAGE)
            self._drop(client)
        elif newline or ended:
            self._drop(client)
            if line.strip():
                self._guarded(lambda: self._handle(line))

    def _drop(self, client: Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.sock)
        client.sock.close()

    def _expire_clients(self) -> None:
        now = time.monotonic()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            log.warning("dropped a client that sent no whole line within %g s", CLIENT_TIMEOUT)
            self._drop(client)
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            assert self.listener is not None  # paused only while serving
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            log.warning("ignored a message that is not JSON: %.200s", exc)
            return
        if not isinstance(message, dict):
            log.warning("ignored a message that is not an object: %.80r", message)
            return
        op = message.get("op")
        if op == "wake":
            self.needs_sync = True
            if "options" in message:
                self._set_options(message["options"])
        elif op == "shutdown":
            log.info("asked to stop; %d running jobs go on", len(self.running))
            self.stopping = True
        elif op != "ping":
            log.warning("ignored a message with op %.80r", op)

    def _set_options(self, values: object) -> None:
        try:
            if not isinstance(values, dict):
                raise TypeError(f"options must be an object, not {type(values).__name__}")
            options = LocalOptions(**values)
            policy = make_policy(options.policy) if options.policy != self.options.policy \
                else self.policy
        except (Exception, SystemExit) as exc:  # a user's policy module may raise anything
            log.error("kept the old options; the new ones are wrong: %.300s", exc)
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
            self.not_ready.discard(job_id)
            if job_id in self.ready:  # held or canceled: its gate never opens
                self._abort(self.ready.pop(job_id))
        new = sorted(i for i in queued if i not in self.waiting and i not in self.running)
        out_of_order = bool(new and self.waiting and new[0] < max(self.waiting))  # released
        for job_id, record in self._records(new):
            if isinstance(record, Exception):
                self.changes.append((job_id, JobStatus(
                    JobState.FAILED, reason=f"cannot start: its journal record is unreadable: "
                    f"{record}"[:500], end_time=time.time(), host=self.host)))
                continue
            spec = record.job.spec
            cwd = record.extra.get("cwd")
            if spec.directory and isinstance(cwd, str):  # relative to where it was submitted
                spec = dataclasses.replace(spec, directory=os.path.join(
                    cwd, os.path.expanduser(spec.directory)))
            self.specs[job_id] = (spec, self._environment(record.extra.get("environment")))
            self.waiting[job_id] = WaitingJob(
                key=job_id, procs=spec.resources.cpus,
                submit_time=record.status.submit_time or time.time(),
                estimate=spec.expected_runtime)
        if out_of_order:
            self.waiting = dict(sorted(self.waiting.items()))

    def _records(self, ids: list[int]) -> list[tuple[int, Any]]:
        """(id, record) for these jobs, or (id, the error) for a row that cannot be read."""
        if not ids:
            return []
        try:
            return [(r.job.id, r) for r in self.journal.get(ids)]
        except (*_BAD_ROW, JobNotFoundError):
            pass  # find the bad rows one by one; a database error goes up
        found: list[tuple[int, Any]] = []
        for job_id in ids:
            try:
                found.append((job_id, self.journal.get([job_id])[0]))
            except JobNotFoundError:
                continue
            except _BAD_ROW as exc:
                log.error("job %d: unreadable journal record: %s", job_id, exc)
                found.append((job_id, exc))
        return found

    def _environment(self, name: object) -> dict[str, str]:
        key = name if isinstance(name, str) else None
        if key not in self.environments:
            try:
                if key is not None and not re.fullmatch(r"[0-9a-f]{1,64}", key):
                    raise ValueError(f"bad name {key!r}")
                environment = json.loads(environment_file(self.state_dir, key or "")
                                         .read_text())
                if not isinstance(environment, dict):
                    raise ValueError("not an object")
                _check_environment(environment)
                self.environments[key] = environment
            except (OSError, ValueError, CannotStart) as exc:
                log.warning("submitting environment %s unreadable (%s); using mine", key, exc)
                self.environments[key] = dict(os.environ)
        return self.environments[key]

    def _commit(self, statuses: list[tuple[int, JobStatus]],
                only_if: list[JobState] | None = None) -> set[int]:
        """Write the pending changes and ``statuses`` in one transaction, then reap and clean
        up after them; the ids that changed."""
        changes, unreaped, cleanup = self.changes, self.unreaped, self.cleanup
        self.changes, self.unreaped, self.cleanup = [], [], []
        try:
            changed = set(self.journal.update(changes + statuses, only_if=only_if))
        except BaseException:  # kept for the next commit
            self.changes, self.unreaped = changes + self.changes, unreaped + self.unreaped
            self.cleanup = cleanup + self.cleanup
            raise
        for pid in unreaped:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for path in cleanup:
            _remove(path)
        return changed

    def _flush(self) -> None:
        if self.changes or self.unreaped or self.cleanup:
            self._commit([])
        if self.extra:
            extra, self.extra = self.extra, {}
            self.journal.set_extra(extra)

    # --- starting --------------------------------------------------------------------------

    def _schedule(self) -> bool:
        """Start the jobs the policy chooses: spawn their gates, commit ACTIVE (with the jobs
        that ended, in one transaction), commit their pids, then open the gates. True if a
        job could not start (the policy may choose again)."""
        if not self.waiting:
            return False
        now = time.time()
        allowed = self._choose(now)
        if not allowed:
            return False
        launches: dict[int, Launch] = {}
        statuses = []
        for job_id in allowed:
            del self.waiting[job_id]
            spec, environment = self.specs.pop(job_id)
            self.not_ready.discard(job_id)
            ready = self.ready.pop(job_id, None)
            try:
                launches[job_id] = ready if ready is not None else self._launch(
                    job_id, spec, environment)
            except Exception as exc:
                statuses.append((job_id, self._cannot_start(job_id, spec, exc, now)))
            else:
                statuses.append((job_id, JobStatus(JobState.ACTIVE, start_time=now,
                                                   host=self.host)))
        started: set[int] = set()
        try:
            # ended jobs are ACTIVE, new ones QUEUED: a job held or canceled meanwhile stays so
            started = self._commit(statuses, only_if=[JobState.QUEUED, JobState.ACTIVE])
            started &= set(launches)
            if started:
                self.journal.set_extra({i: {"pid": launches[i].pid,
                                            "proc_start": launches[i].proc_start}
                                        for i in started})
        except BaseException:
            for job_id in started:  # ACTIVE without a pid: never let run, so requeued
                self._requeue(job_id, launches[job_id].home)
            for launch in launches.values():
                self._abort(launch)
            self.needs_sync = True
            raise
        for job_id, launch in launches.items():
            if job_id not in started:
                self._abort(launch)
                continue
            with contextlib.suppress(OSError):  # a gate killed meanwhile ends as its job
                os.write(launch.go, b"go\n")
            os.close(launch.go)
            walltime = launch.spec.resources.walltime
            self.running[job_id] = RunningProcess(
                job_id=job_id, pid=launch.pid, procs=launch.spec.resources.cpus,
                start_time=now, estimate=launch.spec.expected_runtime,
                deadline=now + walltime if walltime else None,
                memory_mb=launch.spec.resources.memory_mb, child=True)
        return len(launches) < len(allowed)

    def _prepare(self) -> None:
        """Spawn the gates of the next waiting jobs ahead of their start, while the slots are
        busy: starting one is then a commit and a write, not a shell's start-up. A gate is
        closed until its job starts, and ends without running it if this daemon dies."""
        for job_id in self.waiting:
            if len(self.ready) >= min(READY_GATES, self.options.capacity):
                return
            if job_id in self.ready or job_id in self.not_ready:
                continue
            try:
                self.ready[job_id] = self._launch(job_id, *self.specs[job_id])
            except Exception:  # it fails, with its reason, when its turn comes
                self.not_ready.add(job_id)

    def _choose(self, now: float) -> list[int]:
        capacity = self.options.capacity
        running = [RunningJob(key=r.job_id, procs=r.procs, start_time=r.start_time,
                              estimate=r.estimate) for r in self.running.values()]
        try:
            chosen = [job.key for job in self.policy.select(
                now, list(self.waiting.values()), running, capacity)]
        except Exception:
            log.exception("policy %s failed; jobs start in submit order this turn",
                          self.options.policy)
            chosen = list(self.waiting)
        free = capacity - sum(r.procs for r in running)
        allowed = []
        for key in chosen:  # a policy of a user's own must not overfill the machine
            job = self.waiting.get(key) if isinstance(key, int) else None
            if job is not None and key not in allowed and job.procs <= free:
                allowed.append(key)
                free -= job.procs
        return allowed

    def _launch(self, job_id: int, spec: JobSpec, environment: dict[str, str]) -> Launch:
        """Spawn the job's gate; raises CannotStart (or any error of a bad spec)."""
        home = job_home(self.state_dir, job_id)
        home.mkdir(parents=True, exist_ok=True)
        _check_environment(spec.environment)  # the submitted one was checked when read
        environment = {**environment, **spec.environment}
        environment.update(GRIDCOUPLE_JOB_ID=str(job_id), GRIDCOUPLE_JOB_NAME=spec.name,
                           GRIDCOUPLE_JOB_HOME=str(home), GRIDCOUPLE_STATE_DIR=str(self.state_dir))
        cwd = os.path.abspath(working_directory(spec, home))
        if not stat.S_ISDIR(os.stat(cwd).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), cwd)
        argv = list(spec.argv)
        if spec.script is not None:
            script = home / "job.sh"
            script.write_text(spec.script)
            script.chmod(0o700)
            argv = [str(script)] if spec.script.startswith("#!") else ["/bin/sh", str(script)]
        self._check_command(argv[0], environment.get("PATH", os.defpath), cwd)
        out_path, err_path = output_file(spec, home, "stdout"), output_file(spec, home, "stderr")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out = os.open(out_path, flags, 0o666)
        try:
            err = out if err_path == out_path else os.open(err_path, flags, 0o666)
        except BaseException:
            os.close(out)
            raise
        gate, go = os.pipe()
        try:  # posix_spawn: no Python between fork and exec, and the environment in C
            pid = os.posix_spawn("/bin/sh", [
                "/bin/sh", "-c", GATE, "gridcouple-gate", str(home / NOT_STARTED), cwd, *argv,
            ], environment, file_actions=[(os.POSIX_SPAWN_DUP2, gate, 0),
                                          (os.POSIX_SPAWN_DUP2, out, 1),
                                          (os.POSIX_SPAWN_DUP2, err, 2)],
                setsid=True, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except BaseException:
            os.close(go)
            raise
        finally:
            for fd in {gate, out, err}:
                os.close(fd)
        _remove(home / f"{NOT_STARTED}.{pid}")  # a mark of a gate long gone
        return Launch(job_id=job_id, spec=spec, home=home, pid=pid, go=go,
                      proc_start=process_start(pid, zombie=True) or 0)

    def _check_command(self, command: str, path: str, cwd: str) -> None:
        """Raise CannotStart unless ``command`` names an executable file (as exec finds it
        from ``cwd`` along ``path``); a command found is trusted for RESYNC_INTERVAL."""
        here = ("/" in command and not command.startswith("/")) or any(
            not d.startswith("/") for d in path.split(os.pathsep))  # found from cwd
        key = (command, path, cwd if here else "")
        if self.commands.get(key, 0.0) > time.monotonic():
            return
        _check_command(command, path, cwd)
        if len(self.commands) > 1000:
            self.commands.clear()
        self.commands[key] = time.monotonic() + RESYNC_INTERVAL

    def _abort(self, launch: Launch) -> None:
        """Close a gate without running its job (it ends at once)."""
        with contextlib.suppress(OSError):
            os.close(launch.go)
        self.aborted[launch.pid] = launch.home

    def _cannot_start(self, job_id: int, spec: JobSpec, exc: Exception,
                      now: float) -> JobStatus:
        """The FAILED status of a job that could not start; its stderr says why if it can."""
        if isinstance(exc, CannotStart):
            message, code = str(exc), exc.exit_code
        elif isinstance(exc, OSError):
            message = f"cannot start: {exc.strerror or exc}: {exc.filename or spec.argv[:1]}"
            code = 127 if isinstance(exc, FileNotFoundError) else 126
        else:
            message, code = f"cannot start: {type(exc).__name__}: {exc}", None
        message = message[:1000]
        log.warning("job %d %s", job_id, message)
        stderr = output_file(spec, job_home(self.state_dir, job_id), "stderr")
        with contextlib.suppress(Exception), open(stderr, "a") as err:  # if it can be written
            err.write(f"gridcouple: {message}\n")
        return JobStatus(JobState.FAILED, reason=message, exit_code=code, start_time=now,
                         end_time=time.time(), host=self.host)

    # --- watching and ending ---------------------------------------------------------------

    def _reap(self) -> None:
        """Note the jobs that ended; our children stay zombies until their end is committed."""
        for run in list(self.running.values()):
            if run.child:
                try:
                    returncode = _exited(run.pid)
                except ChildProcessError:  # reaped by someone else: no status to learn
                    self._finish(run, None)
                    continue
                if returncode is not None:
                    self._finish(run, returncode)
            elif run.exit_wait_until is not None:
                self._adopted_ended(run.job_id)
        for pid in list(self.aborted):  # gates closed on purpose: nothing to record
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            _remove(self.aborted.pop(pid) / f"{NOT_STARTED}.{pid}")

    def _adopted_ended(self, job_id: int) -> None:
        """An adopted job's process ended: its status is the keeper's record, if any."""
        run = self.running.get(job_id)
        if run is None:
            return
        if run.pidfd is not None:
            self.selector.unregister(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None
        assert run.home is not None  # adopted jobs know their home
        outcome = _ended_unwatched(run.pid, run.proc_start, run.home, self.state_dir)
        if outcome == "running":  # a zombie its keeper has not reaped yet: ask again soon
            if run.exit_wait_until is None:
                run.exit_wait_until = time.monotonic() + EXIT_WAIT
            if time.monotonic() < run.exit_wait_until:
                return
            outcome = None
        if outcome == "not started":
            del self.running[job_id]
            self._requeue(job_id, run.home, run.pid, run.proc_start)
        else:
            self._finish(run, self._claim(outcome, run.pid, run.proc_start))

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

    def _finish(self, run: RunningProcess, returncode: int | None, *,
                kill_group: bool = True) -> None:
        """Record the end of a job; kill what is left of its process group."""
        if kill_group:  # our child is a zombie still: its pid cannot be another's yet
            _kill_group(run.pid, signal.SIGKILL)
        if run.child:
            self.unreaped.append(run.pid)
        if run.pidfd is not None:
            self.selector.unregister(run.pidfd)
            os.close(run.pidfd)
        self.running.pop(run.job_id, None)
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
            reason = ("exit status unknown: it ended while no local daemon (nor its keeper) "
                      "was watching")
        elif returncode == 0:
            state, reason = JobState.COMPLETED, ""
        else:
            state, reason = JobState.FAILED, ""
        self.changes.append((run.job_id, JobStatus(
            state, native_state=native_state, reason=reason, exit_code=exit_code, signal=signum,
            start_time=run.start_time, end_time=time.time(), host=self.host)))

    def _requeue(self, job_id: int, home: Path, pid: int | None = None,
                 proc_start: int = 0) -> None:
        """A job the previous daemon committed but never let run goes back to the queue."""
        log.info("job %d was never started: requeued", job_id)
        self.changes.append((job_id, JobStatus(
            JobState.QUEUED, requeue=True, host=self.host,
            reason="requeued: the local daemon stopped before starting it")))
        self.extra[job_id] = {"pid": 0, "proc_start": 0}
        if pid:  # the gate's mark, and what its keeper wrote of it
            self.cleanup += [home / f"{NOT_STARTED}.{pid}",
                             _exit_record(self.state_dir, pid, proc_start)]
        self.needs_sync = True

    def _claim(self, outcome: int | str | None, pid: int, proc_start: int) -> int | None:
        """The return code a keeper recorded (its record removed once the end is committed),
        or None."""
        if not isinstance(outcome, int):
            return None
        self.cleanup.append(_exit_record(self.state_dir, pid, proc_start))
        return outcome

    def _adopt(self) -> None:
        """Take over the jobs an earlier daemon started: adopt those running, finish those
        that ended (with the status their keeper wrote), requeue those never let run."""
        _prune_exits(self.state_dir / "exits")
        started = [i for i, state, _ in self.journal.live_states(self.name)
                   if state in (JobState.ACTIVE, JobState.SUSPENDED) and i not in self.running]
        for job_id, record in self._records(started):
            if isinstance(record, Exception):  # nothing to go by: not even its pid
                self.changes.append((job_id, JobStatus(
                    JobState.FAILED, end_time=time.time(), host=self.host,
                    reason=f"its journal record is unreadable: {record}"[:500])))
                continue
            spec = record.job.spec
            home = job_home(self.state_dir, job_id)
            pid, proc_start = record.extra.get("pid"), record.extra.get("proc_start")
            if not isinstance(pid, int) or pid <= 0 or not isinstance(proc_start, int):
                self._requeue(job_id, home)  # its gate never had the word to run
                continue
            start = record.status.start_time or time.time()
            walltime = spec.resources.walltime
            run = RunningProcess(
                job_id=job_id, pid=pid, procs=spec.resources.cpus, start_time=start,
                estimate=spec.expected_runtime,
                deadline=start + walltime if walltime else None,
                memory_mb=spec.resources.memory_mb, proc_start=proc_start, home=home)
            # running, or a zombie not yet reaped
            if process_start(pid, zombie=True) == proc_start:
                try:
                    run.pidfd = os.pidfd_open(pid)
                except OSError:
                    run.pidfd = None
                if run.pidfd is not None:
                    self.selector.register(run.pidfd, selectors.EVENT_READ, job_id)
                    self.running[job_id] = run
                    log.info("adopted job %d (pid %d)", job_id, pid)
                    continue
            outcome = _ended_unwatched(pid, proc_start, home, self.state_dir)
            if outcome == "not started":
                self._requeue(job_id, home, pid, proc_start)
            else:
                self._finish(run, self._claim(outcome, pid, proc_start),
                             kill_group=False)  # long gone: its pid may be another's now
        self._flush()
        self.adopted = True


def _ended_unwatched(pid: int, proc_start: int, home: Path,
                     state_dir: Path) -> int | str | None:
    """How an adopted job's process ended: "not started" (its gate never opened), its
    return code (from its keeper), "running" (not reaped yet), or None (unknown)."""
    if os.path.exists(home / f"{NOT_STARTED}.{pid}"):
        return "not started"
    record = _exit_record(state_dir, pid, proc_start)
    for _ in range(2):  # the keeper writes before it reaps: look again once it is gone
        try:
            code = json.loads(record.read_text())["returncode"]
        except (OSError, ValueError, KeyError, TypeError):
            code = None
        if isinstance(code, int):
            return code
        if process_start(pid, zombie=True) == proc_start:
            return "running"
    return None


def _exit_record(state_dir: Path, pid: int, proc_start: int) -> Path:
    """Where a keeper writes the exit status of a process it reaped."""
    return state_dir / "exits" / f"{pid}-{proc_start}.json"


def _exited(pid: int) -> int | None:
    """The return code of our child if it has ended (negative: killed by that signal), without
    reaping it; None while it runs."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _check_environment(environment: Mapping[Any, Any]) -> None:
    """Raise CannotStart unless every variable has a name without '=' and NUL, and a text
    value without NUL (the message never shows a value: it may be a secret)."""
    for key, value in environment.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise CannotStart(f"cannot start: bad environment variable name {key!r}"[:300])
        if not isinstance(value, str) or "\0" in value:
            raise CannotStart(f"cannot start: the value of environment variable {key!r} is "
                              f"not text without NUL"[:300])


def _check_command(command: str, path: str, cwd: str) -> None:
    """Raise CannotStart unless ``command`` names an executable file (as exec would find
    it from ``cwd`` along ``path``)."""
    if "/" in command:
        candidates = [os.path.join(cwd, command)]
    else:
        candidates = [os.path.join(cwd, d or ".", command) for d in path.split(os.pathsep)]
    denied = None
    for candidate in candidates if command else ():
        try:
            if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
                return
            if os.path.exists(candidate):
                denied = candidate
        except ValueError:  # a NUL byte
            break
    if denied is not None:
        raise CannotStart(f"cannot start: Permission denied: {denied!r}", 126)
    raise CannotStart(f"cannot start: No such file or directory: {command!r}", 127)


def _prune_exits(directory: Path, age: float = 86400.0) -> None:
    """Drop exit records no daemon claimed within a day (session leaders that were no job)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < time.time() - age:
                    os.unlink(entry.path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
            with open(f"/proc/{entry.name}/stat", "rb") as proc_stat:
                text = proc_stat.read()
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


def _become_keeper(state_dir: Path) -> None:
    """Fork: the child returns to serve as the daemon; this process becomes its keeper (see
    the module docstring) and never returns. Without prctl, no keeper: the daemon serves."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError) as exc:
        log.warning("no keeper (%s): exit statuses of jobs are lost if the daemon dies", exc)
        return
    execed, parent = os.pipe()  # the parent's end closes on exec: end of file here
    daemon = os.fork()
    if daemon == 0:  # serve once no other process shows the daemon's command line
        os.close(parent)
        os.read(execed, 1)
        os.close(execed)
        return
    os.close(execed)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-I", "-S", "-", "gridcouple-local-keeper", str(daemon),
            str(state_dir / "exits")]
    try:
        source, sink = os.pipe()  # the program on stdin: a short command line for ps
        os.write(sink, KEEPER.encode())
        os.close(sink)
        os.dup2(source, 0)
        os.execv(sys.executable, argv)
    except OSError:  # the same, in here
        os.close(parent)
        sys.argv = argv[3:]
        exec(compile(KEEPER, "keeper", "exec"), {"__name__": "keeper"})
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """``python -P -m gridcouple.backends.local.daemon STATE_DIR OPTIONS_JSON [NAME]``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s local-daemon[%(process)d] %(message)s")
    state_dir = Path(args[0]).resolve()
    options = LocalOptions(**json.loads(args[1])) if len(args) > 1 else LocalOptions()
    if argv is None:
        _become_keeper(state_dir)
    return Daemon(state_dir, options, *args[2:3]).serve()


if __name__ == "__main__":
    sys.exit(main())
