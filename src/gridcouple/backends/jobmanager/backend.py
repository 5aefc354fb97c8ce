"""The ``jobmanager`` backend: jobs and application servers on a partner's job manager
(``gridcouple jobman serve`` there), over its HTTPS+JSON API only. No file system is shared:
stage-in files are uploaded, stage-out files and output are downloaded.

::

    [backend.partner_a]
    type = "jobmanager"
    url = "https://jm.partner-a.example:8750"
    token_file = "~/.config/gridcouple/partner-a.token"   # owner-only
    ca_file = "partner-a-ca.pem"                          # if its certificate is not public

Jobs are recorded in this side's journal first (NEW), then sent in one request per
``max_body`` of specs with a request id, so a request repeated after a broken connection
makes no second job, and a submitter that died after sending can be matched with what the job
manager made.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gridcouple.backends.base import Backend, Backoff
from gridcouple.backends.local.backend import process_start
from gridcouple.errors import BackendError, ConfigError, OptionError
from gridcouple.jobman.acl import is_loopback_host
from gridcouple.jobman.client import (
    JobManagerClient,
    JobManagerRefused,
    JobManagerUnavailable,
    check_url,
    quote,
    read_token,
)
from gridcouple.jobs import Job, JobSpec, JobState, JobStatus, StagedFile
from gridcouple.journal import JobRecord

TOKEN_ENV = "GRIDCOUPLE_JOBMAN_TOKEN"
SUBMIT_RETRY = 30.0  # seconds a submission keeps trying a job manager that does not answer


@dataclass(frozen=True)
class JobManagerOptions:
    """``[backend.NAME]`` options of a ``jobmanager`` backend."""

    url: str = ""  # https://HOST:PORT (http only on loopback)
    token_file: Path | None = None  # owner-only file with the token; else $GRIDCOUPLE_JOBMAN_TOKEN
    ca_file: Path | None = None  # CA certificate(s) for the job manager's TLS certificate
    timeout: float = 30.0  # seconds one request may take
    poll_interval: float = 1.0  # the longest pause between two status queries

    def __post_init__(self) -> None:
        if not self.url:
            raise OptionError("url", "the job manager's URL is required (https://HOST:PORT)")
        try:
            check_url(self.url)
        except ValueError as exc:
            raise OptionError("url", str(exc)) from None
        for key in ("timeout", "poll_interval"):
            if not getattr(self, key) > 0:
                raise OptionError(key, f"must be positive, got {getattr(self, key)}")


class JobManagerBackend(Backend):
    """One partner's job manager (see the module docstring)."""

    kind = "jobmanager"
    Options = JobManagerOptions

    def __init__(self, options: JobManagerOptions, *, python: str | None = None,
                 **kwargs: Any) -> None:
        # Application servers run with the job manager's interpreter unless told otherwise.
        super().__init__(options, python=python or "python", **kwargs)
        self.backoff = Backoff(first=0.05, most=options.poll_interval)
        if options.token_file is not None:
            token = read_token(options.token_file)
        elif os.environ.get(TOKEN_ENV):
            token = os.environ[TOKEN_ENV]
        else:
            raise ConfigError(f"backend {self.name}: set token_file in [backend.{self.name}] "
                              f"or ${TOKEN_ENV}")
        self.client = JobManagerClient(options.url, token, ca_file=options.ca_file,
                                       timeout=options.timeout)
        self._info: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        """What the job manager says about itself (asked once)."""
        if self._info is None:
            self._info = self.client.call("GET", "/info")
        return self._info

    @property
    def end_grace(self) -> float:
        """The job manager's grace period and a margin (10 s more when it cannot say)."""
        try:
            return float(self.info()["end_grace"]) + 5.0
        except (BackendError, KeyError, TypeError, ValueError):
            return 20.0

    def field_store_base(self) -> str | None:
        """The job manager's place for field versions when it runs on this machine (a job
        manager on loopback); elsewhere there is none this side can read."""
        if not is_loopback_host(self.client.parts.hostname or ""):
            return None
        base = self.info().get("field_store_base")
        return base if isinstance(base, str) else None

    def close(self) -> None:
        self.client.close()
        super().close()

    # --- submit --------------------------------------------------------------------------

    def submit(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Record the jobs, upload their stage-in files, and allocate them in as few requests
        as the job manager's body limit allows."""
        for spec in specs:
            if spec.script is not None:
                raise BackendError(f"job {spec.name}: a job manager runs commands and "
                                   "application servers, not scripts")
        me = os.getpid()
        request = secrets.token_hex(12)
        ids = self.journal.add(self.name, specs, extra={
            "request": request, "submitter": [me, process_start(me)]})
        try:
            natives = self._allocate(request, specs)
        except BackendError as exc:
            self.journal.update([(i, JobStatus(JobState.FAILED, reason=f"not submitted: {exc}",
                                               end_time=time.time())) for i in ids])
            raise
        canceled = self.journal.set_native_ids(
            ((i, str(n), "") for i, n in zip(ids, natives, strict=True)), state=JobState.QUEUED)
        jobs = [Job(id=i, backend=self.name, native_id=str(n), spec=s)
                for i, n, s in zip(ids, natives, specs, strict=True)]
        if canceled:
            self.cancel_now([j for j in jobs if j.id in set(canceled)])
        return jobs

    def _allocate(self, request: str, specs: Sequence[JobSpec]) -> list[int]:
        upload, payloads = self._stage_in(specs)
        limit = int(self.info().get("max_body", 1 << 20)) - 1024
        batches: list[list[dict[str, Any]]] = [[]]
        size = 0
        for payload in payloads:
            length = len(json.dumps(payload)) + 2
            if batches[-1] and size + length > limit:
                batches.append([])
                size = 0
            batches[-1].append(payload)
            size += length
        natives: list[int] = []
        for number, batch in enumerate(batches):
            body = {"request": f"{request}-{number}", "jobs": batch,
                    **({"upload": upload} if upload else {})}
            answer = self._retrying(lambda body=body: self.client.call("POST", "/jobs", body))
            natives.extend(job["id"] for job in answer["jobs"])
        return natives

    def _retrying(self, call: Any) -> Any:
        """A request retried while the job manager does not answer (it may be restarting)."""
        deadline = time.monotonic() + SUBMIT_RETRY
        pause = 0.1
        while True:
            try:
                return call()
            except JobManagerUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _stage_in(self, specs: Sequence[JobSpec]) -> tuple[str | None, list[dict[str, Any]]]:
        """Upload every stage-in source once; the specs as the API takes them, with sources
        renamed to their place in the upload."""
        placed: dict[str, str] = {}
        upload = None
        payloads = []
        for spec in specs:
            staged = []
            for item in spec.stage_in:
                if item.source not in placed:
                    if upload is None:
                        upload = self._retrying(
                            lambda: self.client.call("POST", "/uploads"))["upload"]
                    placed[item.source] = self._upload(upload, Path(item.source),
                                                       f"s{len(placed)}")
                staged.append(StagedFile(placed[item.source], item.target))
            data = spec.to_dict()
            data["stage_in"] = [vars(s).copy() for s in staged]
            data["attributes"] = spec.attributes_for(self.kind)
            for key in ("script", "directory", "stdout", "stderr"):
                if data[key] is None:
                    del data[key]
            payloads.append(data)
        return upload, payloads

    def _upload(self, upload: str, source: Path, name: str) -> str:
        """Send a file, or a directory's files, into the upload under ``name``."""
        limit = int(self.info().get("max_upload", 0)) or None
        if not source.exists():
            raise BackendError(f"cannot stage in {source}: it does not exist")
        found = [(source, name)] if not source.is_dir() else [
            (path, f"{name}/{path.relative_to(source).as_posix()}")
            for path in sorted(source.rglob("*")) if path.is_file()]
        for path, target in found:
            if limit is not None and path.stat().st_size > limit:
                raise BackendError(f"cannot stage in {path}: {path.stat().st_size} bytes, more "
                                   f"than the job manager takes in one upload ({limit})")
            self.client.upload(f"/uploads/{upload}/files/{quote(target)}", path)
        return name

    # --- status and control ------------------------------------------------------------

    def query(self, records: Sequence[JobRecord]) -> dict[int, JobStatus]:
        """ONE status request for every job; a job still NEW whose submitter ended is looked
        up by its request id."""
        result: dict[int, JobStatus] = {}
        by_native = {int(r.job.native_id): r.job.id for r in records if r.job.native_id}
        for record in records:
            if not record.job.native_id:
                result.update(self._unsent(record))
        if by_native:
            answer = self.client.call("POST", "/jobs/status", {"ids": list(by_native)})
            for entry in answer["jobs"]:
                job_id = by_native.get(entry.get("id"))
                if job_id is not None:
                    result[job_id] = _status(entry, self.client.url)
        return result

    def _unsent(self, record: JobRecord) -> dict[int, JobStatus]:
        """A job recorded NEW: still being submitted, or left so by a submitter that died."""
        pid, started = record.extra.get("submitter", (0, None))
        if pid and process_start(pid) == started:
            return {}
        return {record.job.id: JobStatus(
            JobState.FAILED, end_time=time.time(),
            reason=f"not submitted: its submitting process (pid {pid}) ended before the job "
                   f"manager answered; see the job manager's jobs of request "
                   f"{record.extra.get('request')}")}

    def cancel_now(self, jobs: Sequence[Job]) -> None:
        """Waiting jobs end at once; running ones get SIGTERM, then SIGKILL."""
        self._act("cancel", jobs)

    def hold(self, jobs: Sequence[Job]) -> None:
        self._act("hold", jobs)

    def release(self, jobs: Sequence[Job]) -> None:
        self._act("release", jobs)

    def send_signal(self, jobs: Sequence[Job], signal: str) -> None:
        self._act("signal", jobs, signal=signal)

    def _act(self, action: str, jobs: Sequence[Job], **more: Any) -> None:
        natives = [int(j.native_id) for j in jobs if j.native_id]
        if natives:
            self._retrying(lambda: self.client.call("POST", f"/jobs/{action}",
                                                    {"ids": natives, **more}))

    # --- files -----------------------------------------------------------------------------

    def read_output(self, job: Job, stream: Literal["stdout", "stderr"] = "stdout",
                    tail: int | None = None) -> str:
        """The job's stdout or stderr (the last ``tail`` lines), read through the API."""
        if not job.native_id:
            return ""
        if tail:
            return self.client.call("GET", f"/jobs/{job.native_id}/{stream}",
                                    query={"tail": min(tail, 10_000)})["text"]
        try:
            data = b"".join(self.client.download(f"/jobs/{job.native_id}/files/{stream}"))
        except JobManagerRefused as exc:
            if exc.status == 404:
                return ""
            raise
        return data.decode(errors="replace")

    def fetch(self, job: Job, destination: str | Path) -> list[Path]:
        """Download the job's stage-out files to ``destination``."""
        destination = Path(destination)
        copied = []
        for staged in job.spec.stage_out:
            try:
                entries = self.client.call("GET", f"/jobs/{job.native_id}/files",
                                           query={"path": staged.source})["files"]
            except JobManagerRefused as exc:
                if exc.status != 404:
                    raise
                raise BackendError(f"job {job.id}: output {staged.source} was not produced "
                                   f"(the job manager has no such file)") from None
            for entry in entries:
                if entry["type"] != "file":
                    continue
                relative = Path(entry["path"]).relative_to(staged.source)
                target = destination / staged.target / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    for chunk in self.client.download(
                            f"/jobs/{job.native_id}/files/{quote(entry['path'])}"):
                        out.write(chunk)
            copied.append(destination / staged.target)
        return copied


def _status(entry: dict[str, Any], url: str) -> JobStatus:
    """A status as the job manager reports it."""
    if "error" in entry:
        return JobStatus(JobState.FAILED, end_time=time.time(),
                         reason=f"the job manager {url} has no record of it: {entry['error']}")
    try:
        return JobStatus(JobState(entry["state"]), native_state=str(entry["native_state"]),
                         reason=str(entry["reason"]), exit_code=entry["exit_code"],
                         signal=entry["signal"], submit_time=entry["submit_time"],
                         start_time=entry["start_time"], end_time=entry["end_time"],
                         host=str(entry["host"]))
    except (KeyError, ValueError) as exc:
        raise JobManagerUnavailable(f"job manager {url}: a status it sent is malformed "
                                    f"({exc!r})") from None
