"""The one table from HTCondor's JobStatus (1-7) to :class:`gridcouple.jobs.JobState`.

docs/htcondor.md explains each choice. The native state (``IDLE``, ``HELD`` ...) and HTCondor's
reason (HoldReason with its HoldReasonCode, RemoveReason, LastRejMatchReason) stay beside ours
in :class:`JobStatus`. A HELD job is ours HELD only when a release can let it run: a job held
because it cannot run (its executable or files missing: HTCondor's FailedToCreateProcess,
transfer and I/O errors) is FAILED, one held for its walltime (JobDurationExceeded) TIMEOUT,
and one held while its input is spooled QUEUED.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import htcondor2

from gridcouple.jobs import JobState, JobStatus

# JobStatus -> (native name, our state); HELD and REMOVED are refined by the hold code below.
CONDOR_STATES: dict[int, tuple[str, JobState]] = {
    1: ("IDLE", JobState.QUEUED),
    2: ("RUNNING", JobState.ACTIVE),
    3: ("REMOVED", JobState.CANCELED),
    4: ("COMPLETED", JobState.COMPLETED),  # FAILED for a non-zero exit code or a signal
    5: ("HELD", JobState.HELD),
    6: ("TRANSFERRING_OUTPUT", JobState.ACTIVE),
    7: ("SUSPENDED", JobState.SUSPENDED),
}

# HoldReasonCode -> our state, for holds a release would not cure (the rest stay HELD).
WALLTIME_HOLDS = frozenset({46, 47})  # JobDurationExceeded, JobExecuteExceeded
CANNOT_RUN_HOLDS = frozenset({
    6,  # FailedToCreateProcess: the executable is missing or not executable
    7, 8, 9, 10,  # UnableToOpenOutput/Input(Stream)
    12, 13,  # TransferOutputError, TransferInputError
    14,  # IwdError: the working directory cannot be entered
    22, 23,  # UnableToInitUserLog, FailedToAccessUserAccount
    32, 33,  # MaxTransferInput/OutputSizeExceeded
    34,  # JobOutOfResources: over its memory limit
    35, 45,  # InvalidDockerImage, SingularityTestFailed
})
SPOOLING_HOLD = 16  # SpoolingInput: the schedd releases the job once its input is uploaded
FINAL_HOLDS = WALLTIME_HOLDS | CANNOT_RUN_HOLDS


def to_job_state(job_status: int, hold_code: int = 0, exit_code: int | None = None,
                 signal: int | None = None) -> JobState | None:
    """Our state for HTCondor's JobStatus (and, for HELD and REMOVED, the last hold code);
    None for a status this table does not know."""
    if job_status not in CONDOR_STATES:
        return None
    state = CONDOR_STATES[job_status][1]
    if job_status in (3, 5):
        if hold_code in WALLTIME_HOLDS:
            return JobState.TIMEOUT
        if hold_code in CANNOT_RUN_HOLDS:
            return JobState.FAILED
        if job_status == 5 and hold_code == SPOOLING_HOLD:
            return JobState.QUEUED
    if job_status == 4 and (exit_code or signal is not None):
        return JobState.FAILED
    return state


def split_exit(return_value: int | None, signal: int | None) -> tuple[int | None, int | None]:
    """``(exit_code, signal)``: the job script exits 128+N for a command killed by signal N."""
    if signal:
        return None, signal
    if return_value is not None and return_value > 128:
        return None, return_value - 128
    return return_value, None


def condor_status(job_status: int, previous: JobStatus, *, reason: str = "", hold_code: int = 0,
                  exit_code: int | None = None, signal: int | None = None,
                  **details: Any) -> JobStatus:
    """A JobStatus from HTCondor's words; exit code and end time only once final. A started job
    back to waiting (evicted, held) is a requeue."""
    exit_code, signal = split_exit(exit_code, signal)
    state = to_job_state(job_status, hold_code, exit_code, signal) or previous.state
    native = CONDOR_STATES.get(job_status, (f"JobStatus {job_status}", state))[0]
    if hold_code and job_status == 5:
        code = f"HoldReasonCode {hold_code}"
        reason = f"{reason} ({code})" if reason else code
    if not state.is_final:
        details = {k: v for k, v in details.items() if k in ("submit_time", "start_time", "host")}
        exit_code = signal = None
    return JobStatus(state=state, native_state=native, reason=reason, exit_code=exit_code,
                     signal=signal, requeue=state.order == 1 and previous.state.order == 2,
                     **details)


class CondorRow(NamedTuple):
    """One job as the event log or the schedd described it last."""

    job_status: int = 1
    reason: str = ""
    hold_code: int = 0
    exit_code: int | None = None
    signal: int | None = None
    submit_time: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    host: str = ""
    tag: str = ""  # the submission's tag (+GridcoupleTag, or the submit event's notes)

    @property
    def final(self) -> bool:
        state = to_job_state(self.job_status, self.hold_code, self.exit_code, self.signal)
        return state is not None and state.is_final

    def status(self, previous: JobStatus) -> JobStatus:
        """Our status for this row."""
        return condor_status(self.job_status, previous, reason=self.reason,
                             hold_code=self.hold_code, exit_code=self.exit_code,
                             signal=self.signal, submit_time=self.submit_time,
                             start_time=self.start_time, end_time=self.end_time, host=self.host)


def row_from_ad(ad: Any) -> CondorRow:
    """A row from a job ad of the queue or the history."""
    status = ad.get("JobStatus", 0)
    hold_code = ad.get("HoldReasonCode") if status == 5 else (
        ad.get("LastHoldReasonCode") if status == 3 else 0)
    reason = {1: "LastRejMatchReason", 3: "RemoveReason", 5: "HoldReason"}.get(status, "")
    text = ad.get(reason) or "" if reason else ""
    if status == 3 and hold_code in FINAL_HOLDS:  # removed by periodic_remove after that hold
        text = ad.get("LastHoldReason") or text
    return CondorRow(
        job_status=status, reason=text, hold_code=hold_code or 0, exit_code=ad.get("ExitCode"),
        signal=ad.get("ExitSignal") if ad.get("ExitBySignal") else None,
        submit_time=ad.get("QDate"), start_time=ad.get("JobStartDate"),
        end_time=(ad.get("CompletionDate") or ad.get("EnteredCurrentStatus")) if status in (
            3, 4) else None,
        host=ad.get("RemoteHost") or ad.get("LastRemoteHost") or "",
        tag=ad.get("GridcoupleTag") or "")


def apply_event(rows: dict[str, CondorRow], event: Any) -> None:
    """Update ``rows`` with one event of the job event log."""
    kinds = htcondor2.JobEventType
    native_id = f"{event.cluster}.{event.proc}"
    row, kind, when = rows.get(native_id, CondorRow()), event.type, float(event.timestamp)
    if kind == kinds.SUBMIT:
        row = row._replace(job_status=1, submit_time=when, tag=event.get("UserNotes", ""))
    elif kind == kinds.EXECUTE:
        row = row._replace(job_status=2, start_time=when, host=event.get("SlotName", ""),
                           reason="")
    elif kind == kinds.JOB_TERMINATED:
        row = row._replace(job_status=4, end_time=when, exit_code=event.get("ReturnValue"),
                           signal=event.get("TerminatedBySignal"))
    elif kind == kinds.JOB_ABORTED:
        row = row._replace(job_status=3, end_time=when, reason=event.get("Reason", ""))
    elif kind == kinds.JOB_HELD:
        row = row._replace(job_status=5, end_time=when, reason=event.get("HoldReason", ""),
                           hold_code=event.get("HoldReasonCode", 0))
    elif kind in (kinds.JOB_RELEASED, kinds.JOB_EVICTED):
        row = row._replace(job_status=1, hold_code=0, reason=event.get("Reason", ""))
    elif kind in (kinds.JOB_SUSPENDED, kinds.JOB_UNSUSPENDED):
        row = row._replace(job_status=7 if kind == kinds.JOB_SUSPENDED else 2)
    elif kind == kinds.REMOTE_ERROR:  # with a hold code: the job is being held for it
        code = event.get("HoldReasonCode", 0)
        row = row._replace(reason=event.get("ErrorMsg", ""), **(
            {"job_status": 5, "hold_code": code, "end_time": when} if code in FINAL_HOLDS
            else {}))
    else:
        return
    rows[native_id] = row
