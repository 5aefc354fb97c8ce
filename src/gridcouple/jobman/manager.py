"""The job manager's core, without HTTP: who owns which job, what may run, and the limit.

Jobs run through the local backend's queue core (a :class:`LocalBackend` on the job manager's
own state directory, ``WORK_ROOT/queue``, with ``max_jobs`` slots and one slot per job), so the
scheduling policy, walltime, the journal and the adoption of running jobs after a restart come
with it. Each job's record carries its owner, the client's address and the request that made it
(``jobman.*`` attributes of its spec, written in the same transaction as the job), so nothing
about a job lives only in this process's memory.

Every method runs in one worker thread of the server (:mod:`gridcouple.jobman.server`), one at
a time: checking the limit and queueing the jobs is one step that no other request can split
(MuPIF's issue #82 race).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.errors import BackendError, GridcoupleError, JobNotFoundError
from gridcouple.jobman import files
from gridcouple.jobman.settings import JobManagerSection
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus, Resources, StagedFile
from gridcouple.journal import JobRecord

OWNER, CLIENT, REQUEST, WHAT, CPUS = (f"jobman.{key}" for key in
                                      ("owner", "client", "request", "what", "cpus"))
APP_SERVER = ("-m", "gridcouple.appkit.server")
APP_OPTIONS = ("--app", "--name", "--host", "--port")
PYTHON_PLACEHOLDER = "python"  # what clients send as argv[0] of an application server
RUNNING = (JobState.ACTIVE, JobState.SUSPENDED)
MAX_IDS = 10_000  # ids in one status or cancel request
MAX_ARGS = 256
MAX_TAIL_LINES = 10_000
TAIL_BYTES = 1 << 20
UPLOAD_LIFETIME = 3600.0
UPLOADS_PER_USER = 8
REQUESTS_REMEMBERED = 10_000
JOB_KEYS = ("argv", "name", "environment", "resources", "stage_in", "stage_out", "estimate",
            "script", "directory", "stdout", "stderr", "attributes")
RESOURCE_KEYS = ("cpus", "memory_mb", "gpus", "walltime", "nodes")


class Refused(GridcoupleError):
    """A request the job manager does not carry out; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """Files a client sent ahead of an allocation that stages them in."""

    owner: str
    root: Path
    created: float = field(default_factory=time.monotonic)
    size: int = 0


@dataclass
class Client:
    """A user as the status monitor shows it."""

    user: str
    address: str
    last_seen: float
    requests: int = 0


def open_queue(settings: JobManagerSection, work_root: Path) -> LocalBackend:
    """The job manager's queue: a local backend on ``work_root/queue`` with ``max_jobs``
    slots."""
    return LocalBackend(
        LocalOptions(slots=settings.max_jobs, policy=settings.policy,
                     grace_period=settings.grace_period, idle_exit=60.0),
        state_dir=work_root / "queue", name="jobman")


class JobManager:
    """The core of one job manager (see the module docstring)."""

    def __init__(self, settings: JobManagerSection, work_root: Path) -> None:
        self.settings = settings
        self.work_root = work_root
        self.python = settings.python or sys.executable
        work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.queue = open_queue(settings, work_root)
        self.uploads_root = work_root / "uploads"
        shutil.rmtree(self.uploads_root, ignore_errors=True)  # a restart drops half-made uploads
        self.uploads_root.mkdir(mode=0o700)
        self._uploads: dict[str, Upload] = {}
        self._owners: dict[int, str] = {}
        self._requests: dict[tuple[str, str], list[int]] = {}
        for record in self.queue.journal.records("jobman", limit=REQUESTS_REMEMBERED):
            attributes = record.job.spec.attributes
            self._owners[record.job.id] = attributes.get(OWNER, "")
            if attributes.get(REQUEST):
                key = (attributes.get(OWNER, ""), attributes[REQUEST])
                self._requests.setdefault(key, []).append(record.job.id)
        self.clients: dict[str, Client] = {}
        self.started = time.time()

    def start(self) -> None:
        """Make sure the queue's daemon runs: a new one adopts the jobs still running."""
        self.queue.wake_daemon()

    def close(self) -> None:
        """Let go of the queue; an idle daemon is stopped, running jobs go on."""
        if not self.queue.journal.live_states("jobman"):
            self.queue.stop_daemon()
        self.queue.close()

    def seen(self, user: str, address: str) -> None:
        """Note an authenticated request, for the clients table."""
        client = self.clients.setdefault(user, Client(user, address, time.time()))
        client.address, client.last_seen = address, time.time()
        client.requests += 1

    # --- what clients ask ------------------------------------------------------------------

    def info(self, user: str) -> dict[str, Any]:
        """What a client needs to know about this job manager."""
        s = self.settings
        return {"service": "gridcouple job manager", "api": 1, "user": user,
                "max_jobs": s.max_jobs, "over_limit": s.over_limit, "max_queued": s.max_queued,
                "max_body": s.max_body, "max_upload": s.max_upload, "apps": list(s.apps),
                "commands": list(s.commands), "environment": list(s.environment),
                "python": PYTHON_PLACEHOLDER, "field_store_base": self.queue.field_store_base(),
                "end_grace": self.queue.end_grace}

    def allocate(self, user: str, address: str, body: Any) -> dict[str, Any]:
        """Queue the jobs of one request (all or none); answers their ids and states. A
        request id already used by this user answers the jobs it made (a retry is safe)."""
        body = _expect(body, dict, "the request body")
        _only_keys(body, ("jobs", "request", "upload"), "the request body")
        request = body.get("request")
        if request is not None and not (isinstance(request, str) and 0 < len(request) <= 64):
            raise Refused(400, "request: expected a string of 1-64 characters (any unique id)")
        if request and (user, request) in self._requests:
            return self._answer(self._requests[user, request], repeated=True)
        raw_jobs = _expect(body.get("jobs"), list, "jobs")
        if not raw_jobs:
            raise Refused(400, "jobs: expected at least one job")
        upload = self._upload(user, body["upload"]) if body.get("upload") is not None else None
        specs = [self._spec(raw, f"jobs[{i}]", user, address, request or "", upload)
                 for i, raw in enumerate(raw_jobs)]
        self._check_limit(len(specs))
        try:
            jobs = self.queue.submit(specs)
        except BackendError as exc:
            raise Refused(400, str(exc)) from None
        ids = [job.id for job in jobs]
        for job_id in ids:
            self._owners[job_id] = user
        if request:
            self._requests[user, request] = ids
        if upload is not None:
            self.remove_upload(user, body["upload"])
        return self._answer(ids)

    def _answer(self, ids: Sequence[int], repeated: bool = False) -> dict[str, Any]:
        records = self.queue.journal.get(ids)
        waiting = sum(1 for r in records if r.status.state.order < 2)
        return {"jobs": [{"id": r.job.id, "name": r.job.spec.name, "state": r.status.state.value}
                         for r in records], "waiting": waiting, "repeated": repeated}

    def _check_limit(self, count: int) -> None:
        """Refuse a request that would break the limit (see ``over_limit``)."""
        s = self.settings
        live = self.queue.journal.live_states("jobman")
        if s.over_limit == "refuse" and len(live) + count > s.max_jobs:
            raise Refused(429, f"max_jobs is {s.max_jobs}: {len(live)} jobs are running or "
                          f"starting and this request asks for {count} more; this job manager "
                          "refuses jobs beyond its limit (over_limit = \"refuse\"), so none "
                          "was started; ask again when jobs have ended")
        waiting_after = len(live) + count - s.max_jobs
        if s.over_limit == "queue" and waiting_after > s.max_queued:
            raise Refused(429, f"the queue is full: {len(live)} jobs are live and "
                          f"{s.max_jobs} run at once; this request asks for {count} more, "
                          f"and at most {s.max_queued} may wait (max_queued); none was queued")

    def _spec(self, raw: Any, where: str, user: str, address: str, request: str,
              upload: Upload | None) -> JobSpec:
        """The queue's spec for one job of a request; Refused names what is wrong."""
        raw = _expect(raw, dict, where)
        _only_keys(raw, JOB_KEYS, where)
        if raw.get("script") is not None:
            raise Refused(400, f"{where}.script: this job manager runs commands and "
                          "application servers, not scripts")
        for key in ("directory", "stdout", "stderr"):
            if raw.get(key) is not None:
                raise Refused(400, f"{where}.{key}: a job runs in its own working directory "
                              "here, with stdout and stderr in it; leave it unset")
        if raw.get("attributes"):
            raise Refused(400, f"{where}.attributes: this job manager takes none")
        argv = _strings(raw.get("argv"), f"{where}.argv")
        if not argv or len(argv) > MAX_ARGS:
            raise Refused(400, f"{where}.argv: expected 1-{MAX_ARGS} strings")
        argv, what = self._allowed(argv, where)
        environment = self._environment(raw.get("environment", {}), f"{where}.environment")
        cpus, resources = _resources(raw.get("resources", {}), f"{where}.resources")
        stage_in = self._stage_in(raw.get("stage_in", []), f"{where}.stage_in", upload)
        stage_out = tuple(StagedFile(*pair) for pair in
                          _staged(raw.get("stage_out", []), f"{where}.stage_out"))
        estimate = raw.get("estimate")
        if estimate is not None and not _is_number(estimate):
            raise Refused(400, f"{where}.estimate: expected a number of seconds")
        name = raw.get("name", "job")
        try:
            return JobSpec(argv=tuple(argv), name=name, environment=environment,
                           resources=resources, stage_in=stage_in, stage_out=stage_out,
                           estimate=estimate, attributes={
                               OWNER: user, CLIENT: address, REQUEST: request, WHAT: what,
                               CPUS: cpus})
        except (TypeError, ValueError) as exc:
            raise Refused(400, f"{where}: {exc}") from None

    def _allowed(self, argv: list[str], where: str) -> tuple[list[str], str]:
        """The argv to run and what it runs (an application class or a command), if allowed."""
        s = self.settings
        if tuple(argv[1:3]) == APP_SERVER:
            if argv[0] not in (PYTHON_PLACEHOLDER, self.python):
                raise Refused(400, f"{where}.argv[0]: application servers run with this job "
                              f"manager's interpreter; send {PYTHON_PLACEHOLDER!r}")
            options = argv[3:]
            if len(options) % 2 or any(o not in APP_OPTIONS for o in options[::2]):
                raise Refused(400, f"{where}.argv: an application server takes the options "
                              f"{', '.join(APP_OPTIONS)}, each with a value")
            given = dict(zip(options[::2], options[1::2], strict=True))
            app = given.get("--app", "")
            if not any(fnmatch.fnmatchcase(app, pattern) for pattern in s.apps):
                raise Refused(403, f"{where}: this job manager does not run the application "
                              f"{app!r}; it runs {_choices(s.apps)}")
            return [self.python, *APP_SERVER, *options], app
        if argv[0] not in s.commands:
            raise Refused(403, f"{where}: this job manager does not run {argv[0]!r}; it runs "
                          f"the commands {_choices(s.commands)} and the application servers "
                          f"of {_choices(s.apps)}")
        return argv, argv[0]

    def _environment(self, raw: Any, where: str) -> dict[str, str]:
        raw = _expect(raw, dict, where)
        for name, value in raw.items():
            if not any(fnmatch.fnmatchcase(name, p) for p in self.settings.environment):
                raise Refused(403, f"{where}: clients may not set {name!r} here; allowed names: "
                              f"{_choices(self.settings.environment)}")
            if not (_plain(value) and _plain(name)) or "=" in name:
                raise Refused(400, f"{where}.{name!r}: expected a UTF-8 string without NUL "
                              "bytes (and a name without '=')")
        return dict(raw)

    def _stage_in(self, raw: Any, where: str, upload: Upload | None) -> tuple[StagedFile, ...]:
        staged = []
        for index, (source, target) in enumerate(_staged(raw, where)):
            if upload is None:
                raise Refused(400, f"{where}[{index}]: stage-in needs an upload holding "
                              f"{source!r} (POST /api/v1/uploads, then name it in 'upload')")
            try:
                files.listing(upload.root, source)
            except (files.PathRefused, files.FileMissing) as exc:
                raise Refused(400, f"{where}[{index}].source: {exc}") from None
            staged.append(StagedFile(str(upload.root / source), target))
        return tuple(staged)

    def status(self, user: str, ids: Any) -> list[dict[str, Any]]:
        """The status of each job, in the order asked; ``error`` for one that is not yours."""
        wanted = _ids(ids)
        records = self._records(user, wanted)
        statuses = dict(zip(records, self.queue.statuses_of(list(records.values())),
                            strict=True))
        return [_status_json(i, records[i].job.spec.name, statuses[i]) if i in records
                else {"id": i, "error": "no such job of yours"} for i in wanted]

    def list_jobs(self, user: str, live_only: bool) -> list[dict[str, Any]]:
        """The user's jobs (newest 1,000, or the live ones)."""
        records = self.queue.journal.records("jobman", active_only=live_only,
                                             limit=None if live_only else 1000)
        return [_status_json(r.job.id, r.job.spec.name, r.status) for r in records
                if r.job.spec.attributes.get(OWNER) == user]

    def act(self, user: str, action: str, ids: Any, signal: str | None = None) -> dict[str, Any]:
        """cancel, hold, release or signal jobs; answers which were acted on and which are not
        the user's."""
        wanted = _ids(ids)
        jobs = self._jobs(user, wanted)
        chosen = list(jobs.values())
        try:
            if action == "cancel":
                self.queue.cancel_now(chosen)
            elif action == "hold":
                self.queue.hold(chosen)
            elif action == "release":
                self.queue.release(chosen)
            elif not isinstance(signal, str):
                raise Refused(400, "signal: expected a signal name such as 'USR1'")
            else:
                self.queue.send_signal(chosen, signal)
        except BackendError as exc:
            raise Refused(400, str(exc)) from None
        return {"done": [j.id for j in chosen], "unknown": [i for i in wanted if i not in jobs]}

    def events(self, user: str, since: int) -> dict[str, Any]:
        """The user's job events after sequence number ``since`` (at most 1,000)."""
        found = self.queue.journal.events_since(since)
        unknown = sorted({job_id for _, job_id, _, _ in found} - set(self._owners))
        if unknown:
            self._jobs(user, unknown)  # learns their owners
        mine = [{"seq": seq, "id": job_id, "state": state.value, "time": moment}
                for seq, job_id, state, moment in found if self._owners.get(job_id) == user]
        mine = mine[:1000]
        last = mine[-1]["seq"] if len(mine) == 1000 else (found[-1][0] if found else since)
        return {"events": mine, "next": last}

    def request_jobs(self, user: str, request: str) -> list[int]:
        """The ids of the jobs a request made (for a client that lost the answer)."""
        ids = self._requests.get((user, request))
        if ids is None:
            raise Refused(404, f"no request {request!r} of yours reached this job manager")
        return ids

    def job_root(self, user: str, job_id: int) -> Path:
        """A job's working directory (its home), if the job is the user's."""
        if job_id not in self._jobs(user, [job_id]):
            raise Refused(404, f"no job {job_id} of yours")
        home = self.queue.job_home(job_id)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # files may come before the job
        return home

    def tail(self, user: str, job_id: int, stream: str, lines: int) -> str:
        """The last ``lines`` lines (at most 1 MiB) a job wrote to stdout or stderr."""
        if not 0 < lines <= MAX_TAIL_LINES:
            raise Refused(400, f"tail: expected 1-{MAX_TAIL_LINES} lines, got {lines}")
        root = self.job_root(user, job_id)
        try:
            fd, size = files.open_for_reading(root, stream)
        except files.FileMissing:
            return ""
        except files.PathRefused as exc:
            raise Refused(400, str(exc)) from None
        with os.fdopen(fd, "rb") as out:
            out.seek(max(0, size - TAIL_BYTES))
            text = out.read(TAIL_BYTES).decode(errors="replace")
        return "".join(text.splitlines(keepends=True)[-lines:])

    def overview(self) -> dict[str, Any]:
        """Everything the status monitor shows: slots, live and recent jobs, clients."""
        journal = self.queue.journal
        live = journal.records("jobman", active_only=True)
        recent = [r for r in journal.records("jobman", limit=50) if r.status.state.is_final]
        running = sum(1 for r in live if r.status.state in RUNNING)
        live_by_user: dict[str, int] = {}
        for record in live:
            owner = record.job.spec.attributes.get(OWNER, "")
            live_by_user[owner] = live_by_user.get(owner, 0) + 1
        jobs = [{**_status_json(r.job.id, r.job.spec.name, r.status),
                 "owner": r.job.spec.attributes.get(OWNER, ""),
                 "what": r.job.spec.attributes.get(WHAT, "")}
                for r in sorted([*live, *recent], key=lambda r: r.job.id)]
        clients = [{"user": c.user, "address": c.address, "last_seen": c.last_seen,
                    "requests": c.requests, "live_jobs": live_by_user.get(c.user, 0)}
                   for c in sorted(list(self.clients.values()),  # a copy: seen() adds
                                   key=lambda c: -c.last_seen)]
        return {"max_jobs": self.settings.max_jobs, "over_limit": self.settings.over_limit,
                "running": running, "waiting": len(live) - running, "jobs": jobs,
                "clients": clients, "started": self.started, "now": time.time()}

    # --- uploads ---------------------------------------------------------------------------

    def new_upload(self, user: str) -> str:
        """A fresh upload for the user's next allocation; old unused ones are dropped."""
        now = time.monotonic()
        for upload_id, upload in list(self._uploads.items()):
            if now - upload.created > UPLOAD_LIFETIME:
                self.remove_upload(upload.owner, upload_id)
        if sum(1 for u in self._uploads.values() if u.owner == user) >= UPLOADS_PER_USER:
            raise Refused(429, f"{user} has {UPLOADS_PER_USER} uploads not yet used; use or "
                          "remove one first (DELETE /api/v1/uploads/ID)")
        upload_id = secrets.token_hex(16)
        root = self.uploads_root / upload_id
        root.mkdir(mode=0o700)
        self._uploads[upload_id] = Upload(user, root)
        return upload_id

    def _upload(self, user: str, upload_id: Any) -> Upload:
        upload = self._uploads.get(upload_id) if isinstance(upload_id, str) else None
        if upload is None or upload.owner != user:
            raise Refused(404, f"no upload {upload_id!r} of yours (uploads last "
                          f"{UPLOAD_LIFETIME:.0f} s and end with the allocation that uses them)")
        return upload

    def upload(self, user: str, upload_id: str) -> Upload:
        """An upload of the user's, to put files in."""
        return self._upload(user, upload_id)

    def remove_upload(self, user: str, upload_id: str) -> None:
        """Drop an upload and its files."""
        upload = self._upload(user, upload_id)
        del self._uploads[upload_id]
        shutil.rmtree(upload.root, ignore_errors=True)

    # --- helpers -----------------------------------------------------------------------------

    def _jobs(self, user: str, ids: Sequence[int]) -> dict[int, Job]:
        """The jobs among ``ids`` that exist and are the user's."""
        return {job_id: record.job for job_id, record in self._records(user, ids).items()}

    def _records(self, user: str, ids: Sequence[int]) -> dict[int, JobRecord]:
        """The records of the jobs among ``ids`` that exist and are the user's."""
        journal = self.queue.journal
        try:
            records = journal.get(ids)
        except JobNotFoundError:
            records = []
            for job_id in ids:
                with contextlib.suppress(JobNotFoundError):
                    records.extend(journal.get([job_id]))
        found = {}
        for record in records:
            owner = record.job.spec.attributes.get(OWNER, "")
            self._owners[record.job.id] = owner
            if owner == user and record.job.backend == "jobman":
                found[record.job.id] = record
        return found


def _status_json(job_id: int, name: str, status: JobStatus) -> dict[str, Any]:
    return {"id": job_id, "name": name, "state": status.state.value,
            "native_state": status.native_state, "reason": status.reason,
            "exit_code": status.exit_code, "signal": status.signal,
            "submit_time": status.submit_time, "start_time": status.start_time,
            "end_time": status.end_time, "host": status.host}


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise Refused(400, f"{where}: expected {_KINDS.get(kind, kind.__name__)}, got "
                      f"{_kind(value)}")
    return value


_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string", int: "a number",
                           float: "a number", bool: "true/false", type(None): "null"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _only_keys(raw: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise Refused(400, f"{where}: unknown key {unknown[0]!r}; known keys: "
                      f"{', '.join(known)}")


def _strings(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(_plain(x) and len(x) <= 4096 for x in raw):
        raise Refused(400, f"{where}: expected a list of strings (UTF-8 without NUL bytes, at "
                      "most 4096 characters each)")
    return raw


def _plain(value: Any) -> bool:
    """A string a process can take: no NUL, nothing UTF-8 cannot encode (a lone surrogate)."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _resources(raw: Any, where: str) -> tuple[int, Resources]:
    """The processors asked for, and the queue's resources: one slot, the memory limit and
    walltime as asked."""
    raw = _expect(raw, dict, where)
    _only_keys(raw, RESOURCE_KEYS, where)
    for key, value in raw.items():
        integer = key != "walltime"
        if value is None and key in ("memory_mb", "walltime"):
            continue
        if not _is_number(value) or (integer and not isinstance(value, int)):
            raise Refused(400, f"{where}.{key}: expected a non-negative "
                          f"{'integer' if integer else 'number'}, got {value!r}")
    if raw.get("gpus", 0):
        raise Refused(400, f"{where}.gpus: this job manager does not allocate GPUs")
    if raw.get("nodes", 1) != 1:
        raise Refused(400, f"{where}.nodes: this job manager runs one-node jobs")
    try:
        resources = Resources(cpus=1, memory_mb=raw.get("memory_mb"),
                              walltime=raw.get("walltime"))
        cpus = Resources(cpus=raw.get("cpus", 1)).cpus
    except ValueError as exc:
        raise Refused(400, f"{where}: {exc}") from None
    return cpus, resources


def _staged(raw: Any, where: str) -> list[tuple[str, str]]:
    """(source, target) pairs, both confined relative paths."""
    raw = _expect(raw, list, where)
    pairs = []
    for index, item in enumerate(raw):
        item = _expect(item, dict, f"{where}[{index}]")
        _only_keys(item, ("source", "target"), f"{where}[{index}]")
        pair = []
        for key in ("source", "target"):
            value = _expect(item.get(key), str, f"{where}[{index}].{key}")
            try:
                files.clean_parts(value)
            except files.PathRefused as exc:
                raise Refused(400, f"{where}[{index}].{key}: {exc}") from None
            pair.append(value)
        pairs.append((pair[0], pair[1]))
    return pairs


def _ids(raw: Any) -> list[int]:
    if not (isinstance(raw, list) and len(raw) <= MAX_IDS and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**62 for i in raw)):
        raise Refused(400, f"ids: expected a list of at most {MAX_IDS} job ids (positive "
                      "integers)")
    return raw


def _choices(patterns: Sequence[str]) -> str:
    return ", ".join(repr(p) for p in patterns) if patterns else "none"
