"""The one table from HTCondor's JobStatus (1-7) to :class:`gridcouple.jobs.JobState`.

docs/htcondor.md explains each choice. The native state (``IDLE``, ``HELD`` ...) and HTCondor's
reason (HoldReason with its HoldReasonCode, RemoveReason, LastRejMatchReason) stay beside ours
in :class:`JobStatus`. A HELD job is ours HELD only when a release can let it run: a job held
because it cannot run (its executable or files missing: HTCondor's FailedToCreateProcess,
transfer and I/O errors) is FAILED, one held for its walltime (JobDurationExceeded) TIMEOUT,
and one held while its input is spooled QUEUED.
"""

from __future__ import annotations

from typing import Any

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
