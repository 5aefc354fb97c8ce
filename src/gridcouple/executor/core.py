"""``gridcouple.Executor``: a :class:`concurrent.futures.Executor` whose calls are batch jobs.

::

    from gridcouple import Executor

    with Executor("slurm", resources=Resources(walltime=600)) as ex:
        futures = ex.map_array(simulate, parameters)   # ONE submission: a Slurm array
        print([f.result() for f in futures])
        one = ex.submit(simulate, 3.0)                 # submitted with whatever came meanwhile
        print(one.job, one.status.describe())          # the job, its state, native state, reason

Calls travel as files (docs/tasks.md): each submission writes one owner-only call file in the
backend's state directory with the pickled function(s) and arguments; each job runs
``python -m gridcouple.executor.runner`` on its part and writes its outcome, owner-only, into
its home. On a backend whose jobs do not see the state directory (HTCondor with spooling, a
job manager) each job's part is staged in and its outcome fetched.

One thread follows all calls: it looks for outcome files (cheap, so results come as soon as
they are written) and asks the backend for the jobs' statuses at the backend's own pace (for
batch systems one native query per poll interval for all jobs). A job that ends without an
outcome fails its future with :class:`TaskDiedError`, which says how it ended and shows the
tail of its stderr.

On a simulated backend (``simgrid``) nothing runs: a ``cost`` function gives each call's
run time on a speed-1 worker and the futures resolve to :class:`PredictedCall` (start, end,
worker); :attr:`Executor.makespan` is the predicted end of the last call.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from gridcouple.backends import open_backend
from gridcouple.backends.base import Backend
from gridcouple.backends.shared_fs import SharedFileSystem, shares_file_system
from gridcouple.config import Config, load_config
from gridcouple.errors import BackendError, GridcoupleError, QueryUnavailableError
from gridcouple.executor.runner import CALL_NAME, RESULT_NAME, CallFileWriter
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus, Resources, StagedFile

log = logging.getLogger(__name__)

STDERR_TAIL = 20
RESULT_POLL_FIRST = 0.01  # seconds between looks for outcome files, after one arrived
RESULT_POLL_MOST = 0.25  # ... growing to this while none arrives
TASKS_DIR = "tasks"  # below the backend's state directory: the call files


class TaskError(GridcoupleError):
    """A call failed in a way its own exception cannot say: the exception could not be
    brought back, the call could not be loaded in the job, or its value could not be
    pickled. ``remote_traceback`` holds the job's traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


class TaskDiedError(GridcoupleError):
    """A call's job ended without an outcome (killed, over its walltime, out of memory,
    canceled by someone else ...): ``job``, ``status`` and ``stderr`` (its last lines)."""

    def __init__(self, message: str, job: Job, status: JobStatus, stderr: str) -> None:
        super().__init__(message)
        self.job, self.status, self.stderr = job, status, stderr


class RemoteTraceback(Exception):
    """The job's traceback, set as the ``__cause__`` of an exception raised by a call (so a
    printed traceback shows where it was raised in the job)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\nThe job's traceback:\n" + self.text.rstrip("\n")


@dataclass(frozen=True)
class PredictedCall:
    """What a simulated backend predicts for one call (simulated seconds from its start)."""

    start: float
    end: float
    worker: str
    state: JobState


class TaskFuture(concurrent.futures.Future[Any]):
    """The future of one call. Besides the Future API: ``job`` (None until submitted),
    ``status`` (the job's status as last seen: state, native state, reason), ``label`` and
    :meth:`stderr`. :meth:`cancel` also cancels a job that has started."""

    def __init__(self, executor: Executor, label: str) -> None:
        super().__init__()
        self.label = label
        self.job: Job | None = None
        self.status = JobStatus(JobState.NEW)
        self._executor = executor
        self._submitted = threading.Event()
        self._cancel_requested = False
        self._call_file: Path | None = None

    @property
    def state(self) -> JobState:
        """The job's state as last seen."""
        return self.status.state

    @property
    def native_state(self) -> str:
        """The batch system's word for the job's state, as last seen."""
        return self.status.native_state

    @property
    def reason(self) -> str:
        """The batch system's reason (``PartitionDown``, a hold reason ...), as last seen."""
        return self.status.reason

    def wait_submitted(self, timeout: float | None = None) -> Job:
        """The job, once the call has been submitted (raises the submission's error)."""
        if not self._submitted.wait(timeout):
            raise TimeoutError(f"{self.label} was not submitted within {timeout} s")
        if self.job is None:
            exc = self.exception(0)
            raise GridcoupleError(f"{self.label} was not submitted: {exc}") from exc
        return self.job

    def running(self) -> bool:
        """True while its job runs (and the call has no outcome yet)."""
        return not self.done() and self.status.state in (JobState.ACTIVE, JobState.SUSPENDED)

    def cancel(self) -> bool:
        """Cancel the call: it is not submitted, or its job leaves the queue, or (unlike a
        process pool's future) its running job is stopped. False once it has an outcome."""
        if self.done():
            return self.cancelled()
        self._executor._cancel([self])
        return self._mark_cancelled()

    @property
    def _submitted_job(self) -> Job:
        """The job of a submitted call."""
        assert self.job is not None
        return self.job

    def _mark_cancelled(self) -> bool:
        with self._condition:
            if self.done():
                return self.cancelled()
            super().cancel()
            self.set_running_or_notify_cancel()  # wakes wait() and as_completed()
            return True

    def stderr(self, tail: int | None = STDERR_TAIL) -> str:
        """What the job wrote to stderr (its last ``tail`` lines)."""
        if self.job is None:
            return ""
        return self._executor.backend.read_output(self.job, "stderr", tail=tail)

    def result(self, timeout: float | None = None) -> Any:
        self._executor._predict_if_simulated()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._executor._predict_if_simulated()
        return super().exception(timeout)

    def __repr__(self) -> str:
        job = f" job {self.job}" if self.job else ""
        return f"<TaskFuture {self.label}{job} {self.status.describe()} {self._state}>"


@dataclass
class _Call:
    future: TaskFuture
    function: bytes
    arguments: bytes
    estimate: float | None = None  # simulated backends: the call's cost


@dataclass
class _CallFile:
    path: Path
    left: int  # calls whose outcome has not arrived yet


class Executor(concurrent.futures.Executor):
    """Run Python calls as batch jobs on any backend (see the module docstring).

    ``backend``: a name (a ``[backend.NAME]`` table or a kind; default the configured one) or
    an open :class:`Backend` (left open at shutdown). ``config``: a :class:`Config` or its
    path (default: the usual search). ``resources``, ``environment`` and ``attributes`` go to
    every call's job. ``cost(*args, **kwargs) -> seconds`` on a speed-1 worker is required on
    a simulated backend (unless it has its own cost function). ``keep_files`` keeps outcome
    files in the job homes after they were read.
    """

    def __init__(self, backend: str | Backend | None = None, *,
                 config: Config | str | os.PathLike[str] | None = None,
                 resources: Resources | None = None,
                 environment: Mapping[str, str] | None = None,
                 attributes: Mapping[str, Any] | None = None,
                 cost: Callable[..., float] | None = None,
                 keep_files: bool = False) -> None:
        self.config, self.backend, self._own_backend = backend_of(backend, config)
        self.resources = resources or Resources()
        self.environment = dict(environment or {})
        self.attributes = dict(attributes or {})
        self.cost = cost
        self.keep_files = keep_files
        self.predicting = not self.backend.hosts_applications
        if self.predicting and cost is None and getattr(self.backend, "cost", None) is None:
            raise GridcoupleError(f"the {self.backend.name} backend is simulated: give "
                                  "Executor(cost=...), the seconds a call takes on a speed-1 "
                                  "worker, or a cost function in its config")
        self.submissions = 0  # backend submissions made, for tests and benchmarks
        self._shared = _sees_state_directory(self.backend)
        self._tasks_dir = self.backend.state_dir / TASKS_DIR
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # submit() added calls
        self._changed = threading.Condition(self._lock)  # calls submitted, shutting down
        self._submit_lock = threading.Lock()
        self._in_flight = 0  # calls taken for a submission, not yet followed
        self._queue: list[_Call] = []  # submit() calls waiting for the next submission
        self._active: dict[int, TaskFuture] = {}  # by journal id: submitted, no outcome yet
        self._files: dict[Path, _CallFile] = {}
        self._predicted: list[TaskFuture] = []
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._job_defaults: tuple[str | None, dict[str, str]] | None = None

    # --- the Executor API ------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Submit one call; returns at once. Calls submitted while a submission is under way
        go together in the next one (one native call for many jobs)."""
        call = self._call(fn, dumps(fn), args, kwargs, _label(fn))
        if self.predicting:
            self._submit_now([call])
            return call.future
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append(call)
            self._start_threads()
            self._queued.notify()
        return call.future

    def map_array(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[TaskFuture]:
        """``fn`` on each item (or zipped items) in ONE backend submission (a Slurm array, an
        HTCondor cluster, one local submission); the futures in order. Raises the
        backend's error when the submission is refused."""
        if self._closing:
            raise RuntimeError("cannot submit after shutdown")
        function = dumps(fn)
        name = _label(fn)
        calls = [self._call(fn, function, args, {}, f"{name}[{i}]")
                 for i, args in enumerate(zip(*iterables, strict=False))]
        if calls:
            self._submit_now(calls)
        return [call.future for call in calls]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`, with ONE submission
        (:meth:`map_array`); the results in order. ``chunksize`` is ignored."""
        futures = self.map_array(fn, *iterables)
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            try:
                for future in futures:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield future.result(left)
            finally:
                self._cancel([f for f in futures if not f.done()], mark=True)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls. ``cancel_futures``: cancel every call without an outcome (their
        jobs in one cancel). ``wait``: wait until every call has its outcome."""
        with self._lock:
            self._closing = True
            self._queued.notify_all()
            self._changed.notify_all()
        if cancel_futures:
            with self._lock:
                futures = [c.future for c in self._queue] + list(self._active.values())
            self._cancel(futures, mark=True)
        if self.predicting:
            if wait:
                self._predict_if_simulated()
        elif wait:
            for thread in self._threads:
                thread.join()
        if wait and self._own_backend:
            self.backend.close()

    # --- what a simulated backend predicts ------------------------------------------------

    @property
    def makespan(self) -> float:
        """Simulated backends: the predicted end of the last call submitted (simulated
        seconds from the backend's start); the simulation runs as far as needed."""
        if not self.predicting:
            raise GridcoupleError(f"the {self.backend.name} backend runs its jobs: makespan "
                                  "is a prediction of a simulated backend (simgrid)")
        self._predict_if_simulated()
        ends = [f.result().end for f in self._predicted]
        return max(ends, default=0.0)

    def _predict_if_simulated(self) -> None:
        """Run the simulation until every submitted call has ended; resolve their futures."""
        if not self.predicting:
            return
        with self._submit_lock:
            waiting = [f for f in self._predicted if not f.done()]
            jobs = [f.job for f in waiting if f.job is not None]
            if not jobs:
                return
            statuses = self.backend.wait(jobs)
            for future, status in zip(waiting, statuses, strict=True):
                future.status = status
                start = status.start_time if status.start_time is not None else math.nan
                end = status.end_time if status.end_time is not None else math.nan
                if not future.done():
                    future.set_result(PredictedCall(start, end, status.host, status.state))

    # --- submitting -------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], function: bytes, args: tuple[Any, ...],
              kwargs: dict[str, Any], label: str) -> _Call:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        estimate = None
        if self.predicting and self.cost is not None:
            estimate = float(self.cost(*args, **kwargs))
        return _Call(TaskFuture(self, label), function, dumps((tuple(args), kwargs)), estimate)

    def _submit_now(self, calls: list[_Call]) -> None:
        """ONE backend submission for ``calls``; each future gets its job, or the error."""
        with self._lock:
            self._in_flight += 1
            if not self.predicting:
                self._start_threads()
        try:
            self._submit_calls(calls)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._changed.notify_all()

    def _submit_calls(self, calls: list[_Call]) -> None:
        with self._submit_lock:
            calls = [c for c in calls if not c.future.cancelled()]
            if not calls:
                return
            try:
                specs, path = self._specs(calls)
            except BaseException as exc:
                for call in calls:
                    _fail(call.future, exc)
                raise
            try:
                jobs = self.backend.submit(specs)
            except BaseException as exc:
                if self._shared and path is not None:
                    path.unlink(missing_ok=True)
                for call in calls:
                    _fail(call.future, exc)
                raise
            finally:
                if not self._shared and path is not None:
                    shutil.rmtree(path, ignore_errors=True)  # staged into the job homes
            self.submissions += 1
            canceled = []
            with self._lock:
                if self._shared and path is not None:
                    self._files[path] = _CallFile(path, len(calls))
                for call, job in zip(calls, jobs, strict=True):
                    future = call.future
                    future.job = job
                    future.status = JobStatus(JobState.QUEUED)
                    future._call_file = path if self._shared else None
                    if self.predicting:
                        self._predicted.append(future)
                    else:
                        self._active[job.id] = future
                    if future._cancel_requested:
                        canceled.append(job)
                    future._submitted.set()
            if canceled:
                self.backend.cancel(canceled)

    def _specs(self, calls: list[_Call]) -> tuple[list[JobSpec], Path | None]:
        """The calls' job specs, and the call file (shared state directory) or the directory
        of per-call files (staged into each job's home)."""
        directory, environment = self._job_settings()
        python = self.backend.python
        common: dict[str, Any] = dict(resources=self.resources, attributes=self.attributes,
                                      environment=environment, directory=directory)
        if self.predicting:
            return [JobSpec(argv=("gridcouple-predicted", c.future.label), name=_name(c),
                            estimate=c.estimate, resources=self.resources,
                            attributes=self.attributes) for c in calls], None
        self._tasks_dir.mkdir(mode=0o700, exist_ok=True)
        path = self._tasks_dir / f"{uuid.uuid4().hex}.call"
        specs = []
        if self._shared:
            writer = CallFileWriter(path)
            try:
                parts: dict[bytes, str] = {}
                for call in calls:
                    function = parts.get(call.function) or writer.add(call.function)
                    parts[call.function] = function
                    specs.append(JobSpec(
                        argv=(python, "-m", "gridcouple.executor.runner", str(path), function,
                              writer.add(call.arguments)), name=_name(call), **common))
            finally:
                writer.close()
            return specs, path
        path.mkdir(mode=0o700)
        for index, call in enumerate(calls):
            own = path / f"{index}.call"
            writer = CallFileWriter(own)
            try:
                refs = writer.add(call.function), writer.add(call.arguments)
            finally:
                writer.close()
            specs.append(JobSpec(
                argv=(python, "-m", "gridcouple.executor.runner", CALL_NAME, *refs, RESULT_NAME),
                name=_name(call), stage_in=(StagedFile(str(own), CALL_NAME),),
                stage_out=(StagedFile(RESULT_NAME, RESULT_NAME),), **common))
        return specs, path

    def _job_settings(self) -> tuple[str | None, dict[str, str]]:
        """Where calls run and their environment (see :func:`job_settings`)."""
        if self._job_defaults is None:
            self._job_defaults = job_settings(self.backend, self.environment)
        return self._job_defaults

    def _start_threads(self) -> None:
        """The submitter and the follower, on first use (with the lock held)."""
        if not self._threads:
            for target, name in ((self._submitter, "gridcouple-submit"),
                                 (self._follow, "gridcouple-follow")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _submitter(self) -> None:
        """Sends the calls of :meth:`submit`: whatever queued up while the previous
        submission was under way goes in the next one."""
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._queued.wait()
                if not self._queue:
                    return
                calls, self._queue = self._queue, []
                self._in_flight += 1  # the follower stays until they are followed
            try:
                self._submit_calls(calls)
            except Exception:
                pass  # the futures carry the error
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self._changed.notify_all()

    # --- following ----------------------------------------------------------------------------

    def _follow(self) -> None:
        """Resolve futures: outcome files as soon as they appear, job statuses at the
        backend's pace; ends once shut down and every call has its outcome."""
        while True:
            try:
                self._follow_calls()
                return
            except Exception:  # keep following: a future must not wait for ever
                log.exception("%s: following the calls failed; retrying in 1 s",
                              self.backend.name)
                time.sleep(1.0)

    def _follow_calls(self) -> None:
        result_pause = RESULT_POLL_FIRST
        status_interval = self.backend.backoff.first
        status_due = 0.0
        while True:
            with self._lock:
                futures = list(self._active.values())
                if not futures:
                    if self._closing and not self._queue and not self._in_flight:
                        return
                    self._changed.wait(1.0)
                    continue
            arrived = 0
            if self._shared:
                for future in futures:
                    if os.path.exists(self._outcome_path(future._submitted_job)):
                        arrived += self._finish(future, None)
            now = time.monotonic()
            if now >= status_due:
                changed = self._refresh([f for f in futures
                                         if f._submitted_job.id in self._active])
                status_interval = self.backend.next_poll(status_interval, changed)
                status_due = time.monotonic() + status_interval
            result_pause = RESULT_POLL_FIRST if arrived else min(result_pause * 1.5,
                                                                 RESULT_POLL_MOST)
            time.sleep(min(result_pause, max(0.0, status_due - time.monotonic())))

    def _refresh(self, futures: Sequence[TaskFuture]) -> bool:
        """One status call for the futures' jobs; futures of ended jobs are resolved.
        Returns whether a state changed."""
        if not futures:
            return False
        jobs = [f._submitted_job for f in futures]
        try:
            statuses = self.backend.status(jobs)
        except QueryUnavailableError as exc:
            log.warning("%s: status query failed, retrying: %s", self.backend.name, exc)
            return False
        changed = False
        for future, status in zip(futures, statuses, strict=True):
            changed |= status.state is not future.status.state
            future.status = status
            if status.state.is_final:
                self._finish(future, status)
        return changed

    def _outcome_path(self, job: Job) -> Path:
        assert isinstance(self.backend, SharedFileSystem)
        return self.backend.job_home(job.id) / RESULT_NAME

    def _finish(self, future: TaskFuture, status: JobStatus | None) -> int:
        """Resolve a future from its outcome file; with ``status`` (the job ended) also when
        there is none. Returns 1 when it was resolved."""
        job = future.job
        assert job is not None
        refused: TaskError | None = None
        try:
            data = self._read_outcome(job, final=status is not None)
        except TaskError as exc:
            data, refused = None, exc
        if data is None and refused is None and status is None:
            return 0
        with self._lock:
            if self._active.pop(job.id, None) is None:
                return 0
            self._release_call_file(future)
        if future.cancelled():
            return 1
        if refused is not None:
            _fail(future, refused)
        elif data is not None:
            _resolve(future, data)
        elif future._cancel_requested:
            future._mark_cancelled()
        else:
            assert status is not None
            _fail(future, self._died(future, job, status))
        return 1

    def _read_outcome(self, job: Job, *, final: bool) -> bytes | None:
        """The outcome file's bytes (None while there is none), trusted only when written by
        the user's own jobs: owned by this user or the state directory's owner, and
        writable by nobody else."""
        if self._shared:
            path = self._outcome_path(job)
            owners = {os.getuid(), self.backend.state_dir.stat().st_uid}
            data = _read_trusted(path, owners)
            if data is not None and not self.keep_files:
                path.unlink(missing_ok=True)
            return data
        if not final:
            return None
        with tempfile.TemporaryDirectory(prefix="gridcouple-outcome-") as scratch:
            try:
                self.backend.fetch(job, scratch)
            except BackendError:
                return None
            return _read_trusted(Path(scratch) / RESULT_NAME, {os.getuid()})

    def _release_call_file(self, future: TaskFuture) -> None:
        """One call of a call file has its outcome; the file goes with the last (lock
        held)."""
        path = future._call_file
        if path is None or path not in self._files:
            return
        entry = self._files[path]
        entry.left -= 1
        if entry.left <= 0:
            del self._files[path]
            path.unlink(missing_ok=True)

    def _died(self, future: TaskFuture, job: Job, status: JobStatus) -> TaskDiedError:
        """The error of a call whose job ended without an outcome."""
        try:
            tail = self.backend.stderr_tail(job, STDERR_TAIL).rstrip("\n")
        except (BackendError, OSError) as exc:
            tail = f"(its stderr cannot be read: {exc})"
        how = _how_it_ended(status)
        message = (f"{future.label}: job {job} {how} without a result; job state "
                   f"{status.describe()}; last lines of its stderr:\n{tail or '(empty)'}")
        return TaskDiedError(message, job, status, tail)

    def _cancel(self, futures: Sequence[TaskFuture], *, mark: bool = False) -> None:
        """Cancel calls: those not submitted yet are dropped, the jobs of the others are
        canceled in ONE backend call. ``mark``: also mark the futures cancelled."""
        jobs = []
        cancelling = {id(f) for f in futures}
        with self._lock:
            queued = {id(c.future) for c in self._queue}
            self._queue = [c for c in self._queue if id(c.future) not in cancelling]
            for future in futures:
                if future.done():
                    continue
                future._cancel_requested = True
                if future.job is not None and id(future) not in queued:
                    jobs.append(future.job)
        if jobs and not self.predicting:
            self.backend.cancel(jobs)
        elif jobs:
            self.backend.cancel_now(jobs)
        if mark:
            for future in futures:
                future._mark_cancelled()

    def __enter__(self) -> Executor:
        return self


def backend_of(backend: str | Backend | None, config: Config | str | os.PathLike[str] | None,
               ) -> tuple[Config | None, Backend, bool]:
    """The configuration, the backend and whether the caller opened it (and closes it): an
    open ``backend`` as it is, else the one its name (or the configuration) names."""
    if isinstance(backend, Backend):
        return (config if isinstance(config, Config) else None), backend, False
    loaded = config if isinstance(config, Config) else load_config(config)
    return loaded, open_backend(loaded, backend), True


def job_settings(backend: Backend,
                 environment: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """The working directory and environment of jobs that unpickle your objects: on a backend
    whose jobs share this machine's files, this directory and this process's import path
    before ``environment``'s ``PYTHONPATH`` (as sbatch jobs do), so functions of your own
    modules unpickle there; elsewhere the job's home and ``environment`` as given."""
    environment = dict(environment)
    if not shares_file_system(backend):
        return None, environment
    from gridcouple.coupler.session import user_import_path

    path = [*filter(None, environment.get("PYTHONPATH", "").split(os.pathsep)),
            *user_import_path()]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return os.getcwd(), environment


def dumps(obj: Any) -> bytes:
    """cloudpickle: what plain pickle would send by reference to this process's
    ``__main__`` (your script's functions and classes), it sends by value; functions of
    importable modules by reference."""
    return bytes(cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _sees_state_directory(backend: Backend) -> bool:
    """Whether the backend's jobs see its state directory at the same path (the call file
    is read in place, the outcome found in the job's home)."""
    if not isinstance(backend, SharedFileSystem):
        return False
    job_path = getattr(backend, "job_path", None)
    return job_path is None or job_path(backend.state_dir) == backend.state_dir


def _label(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _name(call: _Call) -> str:
    """A job name from the call's label (JobSpec's alphabet, 64 characters at most)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", call.future.label.split("[")[0]).strip("-")
    return (name or "task")[:64]


def _read_trusted(path: Path, owners: set[int]) -> bytes | None:
    """The file's bytes when it is owned by one of ``owners`` and writable by nobody else;
    None when there is no file; TaskError when it is not to be trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise TaskError(f"cannot open the outcome {path}: {exc}") from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if info.st_uid not in owners or info.st_mode & 0o022:
            raise TaskError(f"refusing the outcome {path}: owned by uid {info.st_uid} with "
                            f"mode {info.st_mode & 0o777:o}, not written by your own job")
        return file.read()


def _resolve(future: TaskFuture, data: bytes) -> None:
    """Set the future from an outcome file's bytes."""
    try:
        outcome = pickle.loads(data)
        if outcome["ok"]:
            future.set_result(pickle.loads(outcome["value"]))
            return
    except Exception as exc:
        _fail(future, TaskError(f"{future.label}: its result cannot be loaded here: "
                                f"{type(exc).__name__}: {exc}"))
        return
    text = outcome["traceback"]
    stage = outcome.get("stage", "call")
    if stage == "load":
        _fail(future, TaskError(
            f"{future.label}: the job could not load the call: {outcome['type']}: "
            f"{outcome['message']} (the job imports with its backend's python; make the "
            "function's module importable there, e.g. environment={'PYTHONPATH': ...})", text))
        return
    if stage == "result":
        _fail(future, TaskError(f"{future.label}: its value could not be pickled in the job: "
                                f"{outcome['type']}: {outcome['message']}", text))
        return
    raised: BaseException | None = None
    if outcome["exception"] is not None:
        with contextlib.suppress(Exception):
            raised = pickle.loads(outcome["exception"])
    if not isinstance(raised, BaseException):
        raised = TaskError(f"{future.label} raised {outcome['type']}: {outcome['message']} "
                           "(the exception itself could not be brought back)", text)
    raised.__cause__ = RemoteTraceback(text)
    with contextlib.suppress(AttributeError, TypeError):
        raised.remote_traceback = text  # type: ignore[attr-defined]
    _fail(future, raised)


def _fail(future: TaskFuture, exc: BaseException) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(exc)
    future._submitted.set()


def _how_it_ended(status: JobStatus) -> str:
    """A few words on how a job ended, for errors."""
    words = f"{status.native_state} {status.reason}".upper()
    if "MEMORY" in words or "OOM" in words:
        return "ran out of memory"
    if status.state is JobState.TIMEOUT:
        return "reached its walltime"
    if status.state is JobState.CANCELED:
        return "was canceled"
    if status.signal is not None:
        return f"was killed (signal {status.signal})"
    if status.exit_code is not None and status.exit_code > 128:  # the job script's shell
        return f"was killed (signal {status.exit_code - 128})"
    if status.state is JobState.COMPLETED:
        return "ended"
    return "failed"

