"""``gridcouple.dask.BatchCluster``: a dask.distributed cluster whose workers are batch jobs on
any gridcouple backend.

::

    from distributed import Client
    from gridcouple.dask import BatchCluster

    with BatchCluster("slurm", cores=1, memory="2 GiB", walltime=3600) as cluster:
        cluster.scale(8)                 # ONE submission: a Slurm array of 8 worker jobs
        client = Client(cluster)
        client.wait_for_workers(8)       # raises WorkerStartError if a worker job failed
        print(cluster)                   # ..., jobs: 8 running (8 joined)

It is a :class:`distributed.SpecCluster`: ``scale``, ``adapt``, ``Client(cluster)``,
``close`` work as usual. What it adds:

- Workers started together (``scale(n)``, one adaptive step) go as ONE backend submission,
  and are canceled together.
- The scheduler speaks mutual TLS only (:mod:`gridcouple.tls_scheduler`, as the coupler's);
  its dashboard listens on loopback.
- It follows its worker jobs through the backend (for batch systems, one native query per
  poll interval for all of them) and shows their real queue state: pending with the batch
  system's reason (``PENDING (PartitionDown)``, a hold reason), running and joined, failed.
- A worker job that ends before its worker joined is a start failure: logged with its state
  and the tail of its stderr, shown as failed, raised by ``wait_for_workers`` as
  :class:`WorkerStartError`; adaptive scaling submits no more workers until you call
  ``scale`` again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import html
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_bytes, parse_timedelta
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.spec import ProcessInterface, SpecCluster

from gridcouple.backends.base import Backend
from gridcouple.config import Config, CouplerSection, is_loopback_host
from gridcouple.daskcluster.worker import TLS_ENV
from gridcouple.errors import GridcoupleError, QueryUnavailableError
from gridcouple.executor.core import backend_of, job_settings
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus, Resources
from gridcouple.tls_scheduler import (
    configured_tls,
    session_security,
    start_tls_scheduler,
    worker_kwargs,
)

log = logging.getLogger(__name__)

STDERR_TAIL = 20
WATCH_MOST = 2.0  # the longest pause between two looks at the worker jobs (seconds)
WATCH_LEAST = 0.05


class WorkerStartError(GridcoupleError):
    """A worker job ended before its worker joined the scheduler (or its submission was
    refused): ``job``, ``status`` and ``stderr`` (its last lines) when there was a job."""

    def __init__(self, message: str, job: Job | None = None, status: JobStatus | None = None,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.job, self.status, self.stderr = job, status, stderr


class WorkerStartTimeout(GridcoupleError, TimeoutError):
    """Fewer workers than asked for joined in time; the message says where their jobs are."""


@dataclass(frozen=True)
class WorkerJob:
    """One worker's job as the cluster last saw it."""

    name: str
    job: Job
    status: JobStatus
    joined: bool  # its worker is (or was) in the scheduler


class BatchWorker(ProcessInterface):
    """One worker of a :class:`BatchCluster`: its job. Started and stopped in batches."""

    def __init__(self, scheduler: str, name: str, batcher: _Batcher) -> None:
        super().__init__()
        self.scheduler_address = scheduler
        self.name = name
        self.batcher = batcher
        self.job: Job | None = None

    async def start(self) -> None:
        self.job = await self.batcher.start(self)
        await super().start()

    async def close(self) -> None:
        if self.job is not None:
            await self.batcher.stop(self)
        await super().close()

    def __repr__(self) -> str:
        return f"<BatchWorker {self.name} job {self.job} status={self.status.name}>"


class _Batcher:
    """Collects the workers started (or stopped) in one turn of the event loop and submits
    (or cancels) their jobs in one backend call, in a thread."""

    def __init__(self, cluster: BatchCluster) -> None:
        self.cluster = cluster
        self._starting: list[tuple[BatchWorker, asyncio.Future[Job]]] = []
        self._stopping: list[tuple[BatchWorker, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Future[None]] = set()

    def _later(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, worker: BatchWorker) -> Job:
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._starting.append((worker, future))
        if len(self._starting) == 1:
            self._later(self._submit())
        return await future

    async def stop(self, worker: BatchWorker) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stopping.append((worker, future))
        if len(self._stopping) == 1:
            self._later(self._cancel())
        await future

    async def _submit(self) -> None:
        for _ in range(3):  # every worker started in this turn joins the batch
            await asyncio.sleep(0)
        batch, self._starting = self._starting, []
        try:
            jobs = await asyncio.to_thread(self.cluster._submit_workers, [w for w, _ in batch])
        except Exception as exc:
            self.cluster._refused([w.name for w, _ in batch], exc)
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), job in zip(batch, jobs, strict=True):
            future.set_result(job)

    async def _cancel(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        batch, self._stopping = self._stopping, []
        try:
            await asyncio.to_thread(self.cluster._cancel_workers, [w for w, _ in batch])
        except Exception as exc:
            log.warning("cancelling worker jobs failed: %s", exc)
        for _, future in batch:
            future.set_result(None)


class BatchAdaptive(Adaptive):
    """dask's adaptive scaling, except that after a worker job failed before joining it
    submits no more workers until ``cluster.scale`` is called again."""

    async def scale_up(self, n: Any) -> None:
        cluster = self.cluster
        failure = getattr(cluster, "start_failure", None)
        if failure is not None:
            if not getattr(self, "_told", False):
                log.error("adaptive scaling submits no more workers: %s (call cluster.scale "
                          "to try again)", failure)
                self._told = True
            return
        self._told = False
        await super().scale_up(n)


class BatchCluster(SpecCluster):
    """A dask cluster whose workers are jobs on a gridcouple backend (see the module
    docstring).

    ``backend``: a name (a ``[backend.NAME]`` table or a kind; default the configured one)
    or an open :class:`Backend` (left open on close). ``config``: a :class:`Config` or its
    path. Each worker has ``cores`` threads and asks for that many processors; ``memory``
    (``"2 GiB"``, bytes) is its dask memory limit and its job's memory; ``walltime`` seconds;
    ``resources`` replaces all three for the job. ``environment``, ``attributes``
    (``{"slurm.partition": "debug"}``) and ``python`` (default: the backend's) go to every
    worker job. The scheduler listens on ``host`` (default ``[coupler] host``) with the
    ``[coupler]`` TLS files or a certificate made for this cluster (``security`` replaces
    both); ``dashboard_address`` stays on loopback by default.
    """

    def __init__(self, backend: str | Backend | None = None, *,
                 config: Config | str | os.PathLike[str] | None = None,
                 n_workers: int = 0, cores: int = 1, memory: str | int | None = None,
                 walltime: float | None = None, resources: Resources | None = None,
                 environment: Mapping[str, str] | None = None,
                 attributes: Mapping[str, Any] | None = None, python: str | None = None,
                 job_name: str = "dask-worker", host: str | None = None, port: int = 0,
                 dashboard_address: str = "127.0.0.1:0", security: Any = None,
                 death_timeout: float = 60.0, asynchronous: bool = False, loop: Any = None,
                 silence_logs: int | str | bool = logging.WARNING,
                 name: str | None = None) -> None:
        self.config, self.backend, self._own_backend = backend_of(backend, config)
        if not self.backend.hosts_applications:
            raise GridcoupleError(f"the {self.backend.name} backend is simulated: it cannot "
                                  "run dask workers")
        settings: CouplerSection = (self.config.section("coupler") if self.config
                                    else CouplerSection())
        self.cores = cores
        self.memory_limit = parse_bytes(memory) if isinstance(memory, str) else (memory or 0)
        self.resources = resources or Resources(
            cpus=cores, walltime=walltime,
            memory_mb=math.ceil(self.memory_limit / 2**20) if self.memory_limit else None)
        self.environment = dict(environment or {})
        self.attributes = dict(attributes or {})
        self.python = python or self.backend.python
        self.job_name = job_name
        self.death_timeout = death_timeout
        self.submissions = 0  # backend submissions made, for tests and benchmarks
        self.start_failure: WorkerStartError | None = None  # since the last scale()
        self.start_failures: list[WorkerStartError] = []
        self._host = host or settings.host
        self._port = port
        self._dashboard_address = dashboard_address
        if security is None:
            security = session_security(configured_tls(settings))
        self._jobs_lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._statuses: dict[str, JobStatus] = {}
        self._joined: set[str] = set()
        self._ended_by_us: set[str] = set()
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._job_defaults: tuple[str | None, dict[str, str]] | None = None
        self._batcher = _Batcher(self)
        worker = {"cls": BatchWorker, "options": {"batcher": self._batcher}}
        super().__init__(worker=worker, security=security, asynchronous=asynchronous,
                         loop=loop, silence_logs=silence_logs, name=name)
        if n_workers:
            self.scale(n_workers)

    # --- the scheduler and the follower -------------------------------------------------

    async def _start(self) -> None:
        if self.scheduler is None:
            self.scheduler = await start_tls_scheduler(
                self._host, self._port, self.security,
                dashboard_address=self._dashboard_address)
        await super()._start()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="batchcluster-watch",
                                             daemon=True)
            self._watcher.start()

    async def _close(self) -> None:
        await super()._close()
        self._stop_watching.set()
        if self._own_backend:
            await asyncio.to_thread(self.backend.close)

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self.job_name}-{worker_number}"

    def _watch(self) -> None:
        """Follow the worker jobs at the backend's pace until the cluster closes."""
        interval = self.backend.backoff.first
        while not self._stop_watching.wait(min(max(interval, WATCH_LEAST), WATCH_MOST)):
            changed = False
            try:
                changed = self._look()
            except QueryUnavailableError as exc:
                log.warning("%s: worker job status unavailable, retrying: %s",
                            self.backend.name, exc)
            except Exception:
                log.exception("following the worker jobs failed")
            interval = self.backend.next_poll(interval, changed)

    def _look(self) -> bool:
        """One status call for the worker jobs not yet ended; start failures recorded."""
        with self._jobs_lock:
            live = [(name, job) for name, job in self._jobs.items()
                    if not self._statuses[name].state.is_final]
        if not live:
            return False
        statuses = self.backend.status([job for _, job in live])
        joined = self._scheduler_names()
        changed = False
        failures = []
        with self._jobs_lock:
            self._joined |= joined
            for (name, job), status in zip(live, statuses, strict=True):
                changed |= status.state is not self._statuses[name].state
                self._statuses[name] = status
                if (status.state.is_final and name not in self._joined
                        and name not in self._ended_by_us):
                    failures.append((name, job, status))
        for name, job, status in failures:
            self._start_failed(name, job, status)
        return changed

    def _scheduler_names(self) -> set[str]:
        """Names of the workers in the scheduler now."""
        scheduler = self.scheduler
        if scheduler is None:
            return set()
        for _ in range(3):  # the dict may change under us (another thread runs the loop)
            with contextlib.suppress(RuntimeError):
                return {str(ws.name) for ws in list(scheduler.workers.values())}
        return set()

    def _start_failed(self, name: str, job: Job, status: JobStatus) -> None:
        """A worker job ended before its worker joined: record, log, forget its spec."""
        try:
            tail = self.backend.stderr_tail(job, STDERR_TAIL).rstrip("\n")
        except Exception as exc:
            tail = f"(its stderr cannot be read: {exc})"
        error = WorkerStartError(
            f"worker {name}: job {job} ended before the worker joined the scheduler; job "
            f"state {status.describe()}; last lines of its stderr:\n{tail or '(empty)'}",
            job, status, tail)
        self.start_failure = error
        self.start_failures.append(error)
        log.error("%s", error)
        if self.loop is not None:
            self.loop.add_callback(self._forget, [name])

    def _forget(self, names: Sequence[str]) -> None:
        """Drop workers whose jobs failed from the spec (in the event loop), so a later
        ``scale`` submits new ones."""
        for name in names:
            self.worker_spec.pop(name, None)
            worker = self.workers.pop(name, None)
            if worker is not None:
                worker.status = Status.failed

    def _refused(self, names: Sequence[str], exc: Exception) -> None:
        """The backend refused a submission of workers."""
        error = WorkerStartError(f"the {self.backend.name} backend refused the worker jobs "
                                 f"{', '.join(names)}: {exc}")
        self.start_failure = error
        self.start_failures.append(error)
        log.error("%s", error)
        self._forget(names)

    # --- the jobs --------------------------------------------------------------------------

    def _submit_workers(self, workers: Sequence[BatchWorker]) -> list[Job]:
        """ONE backend submission for the workers' jobs (in a thread)."""
        specs = [self._worker_spec(w) for w in workers]
        jobs = self.backend.submit(specs)
        self.submissions += 1
        with self._jobs_lock:
            for worker, job in zip(workers, jobs, strict=True):
                self._jobs[worker.name] = job
                self._statuses[worker.name] = JobStatus(JobState.QUEUED)
        return jobs

    def _cancel_workers(self, workers: Sequence[BatchWorker]) -> None:
        """ONE backend cancel for the workers' jobs that have not ended (in a thread), as
        dask-jobqueue cancels each of its jobs: dask has retired the workers by then."""
        with self._jobs_lock:
            self._ended_by_us.update(w.name for w in workers)
            jobs = [w.job for w in workers if w.job is not None
                    and not self._statuses.get(w.name, JobStatus(JobState.NEW)).state.is_final]
        if jobs:
            self.backend.cancel(jobs)

    def _worker_spec(self, worker: BatchWorker) -> JobSpec:
        """The job of one worker."""
        if self._job_defaults is None:
            self._job_defaults = job_settings(self.backend, self.environment)
        directory, environment = self._job_defaults
        environment = {**environment, TLS_ENV: json.dumps(worker_kwargs(self.security))}
        argv = [self.python, "-m", "gridcouple.daskcluster.worker", worker.scheduler_address,
                "--name", worker.name, "--nthreads", str(self.cores),
                "--memory-limit", str(self.memory_limit),
                "--death-timeout", f"{self.death_timeout:g}"]
        if is_loopback_host(self._host):
            argv += ["--host", "127.0.0.1"]
        return JobSpec(argv=tuple(argv), name=self.job_name, environment=environment,
                       directory=directory, resources=self.resources,
                       attributes=self.attributes)

    # --- what it shows and waits for ------------------------------------------------------

    def scale(self, n: int = 0, memory: Any = None, cores: Any = None) -> Any:
        """dask's ``scale``; it also clears a start failure (you ask again)."""
        self.start_failure = None
        return super().scale(n, memory=memory, cores=cores)

    def adapt(self, Adaptive: type[Adaptive] = BatchAdaptive, minimum: float = 0,
              maximum: float = math.inf, minimum_cores: int | None = None,
              maximum_cores: int | None = None, minimum_memory: str | None = None,
              maximum_memory: str | None = None, **kwargs: Any) -> Adaptive:
        """dask's ``adapt``, with :class:`BatchAdaptive` (no new workers after a start
        failure)."""
        return super().adapt(Adaptive=Adaptive, minimum=minimum, maximum=maximum,
                             minimum_cores=minimum_cores, maximum_cores=maximum_cores,
                             minimum_memory=minimum_memory, maximum_memory=maximum_memory,
                             **kwargs)

    def worker_jobs(self) -> list[WorkerJob]:
        """Every worker job this cluster submitted, as last seen."""
        with self._jobs_lock:
            return [WorkerJob(name, job, self._statuses[name], name in self._joined)
                    for name, job in self._jobs.items()]

    def queue_state(self) -> str:
        """``8 pending (QUEUED: PENDING (PartitionDown)), 0 running (0 joined), 0 failed``:
        the worker jobs not ended by the cluster, in the batch system's own words."""
        pending: collections.Counter[str] = collections.Counter()
        failed: collections.Counter[str] = collections.Counter()
        running = joined = 0
        with self._jobs_lock:
            joined_now = self._scheduler_names()
            for name, status in self._statuses.items():
                state = status.state
                if state.order < 2:
                    pending[status.describe()] += 1
                elif not state.is_final:
                    running += 1
                    joined += name in joined_now
                elif name not in self._ended_by_us and (
                        state is not JobState.COMPLETED or name not in self._joined):
                    failed[status.describe()] += 1

        def counted(counter: collections.Counter[str], label: str) -> str:
            total = sum(counter.values())
            if not total:
                return f"0 {label}"
            kinds = ", ".join(f"{n} {what}" if len(counter) > 1 else what
                              for what, n in counter.most_common())
            return f"{total} {label} ({kinds})"

        return (f"{counted(pending, 'pending')}, {running} running ({joined} joined), "
                f"{counted(failed, 'failed')}")

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, {self.backend.name} jobs: {self.queue_state()})"

    def _repr_html_(self, cluster_status: Any = None) -> str:
        state = html.escape(f"{self.backend.name} worker jobs: {self.queue_state()}")
        return f"{super()._repr_html_(cluster_status)}<p>{state}</p>"

    async def _wait_for_workers(self, n_workers: int = 0, timeout: Any = None) -> None:
        """Until ``n_workers`` workers run; WorkerStartError as soon as a worker job ended
        before joining, WorkerStartTimeout (with the jobs' queue state) after ``timeout``."""
        deadline = None if not timeout else time.monotonic() + parse_timedelta(timeout)
        while True:
            running = sum(ws.status == Status.running
                          for ws in self.scheduler.workers.values())  # type: ignore[union-attr]
            if running >= n_workers:
                return
            if self.start_failure is not None:
                raise self.start_failure
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerStartTimeout(
                    f"{running} of {n_workers} workers joined within {timeout} s; "
                    f"{self.backend.name} worker jobs: {self.queue_state()}")
            await asyncio.sleep(0.05)
