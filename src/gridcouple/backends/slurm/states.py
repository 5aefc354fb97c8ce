"""The one table from Slurm's job states to :class:`gridcouple.jobs.JobState`.

docs/slurm.md explains each choice. The native state and Slurm's Reason are kept beside ours in
:class:`JobStatus`, so ``PENDING (Resources)`` or ``OUT_OF_MEMORY`` stay visible.
"""

from __future__ import annotations

from gridcouple.jobs import JobState, JobStatus

SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.QUEUED,  # HELD instead when the Reason is a hold (see HELD_REASONS)
    "CONFIGURING": JobState.QUEUED,  # resources allocated, nodes booting: nothing runs yet
    "POWER_UP_NODE": JobState.QUEUED,
    "REQUEUED": JobState.QUEUED,  # back in the queue after a run (the model allows this move)
    "REQUEUE_FED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.HELD,
    "RESV_DEL_HOLD": JobState.HELD,
    "SPECIAL_EXIT": JobState.HELD,  # requeued and held after a chosen exit code
    "RUNNING": JobState.ACTIVE,
    "COMPLETING": JobState.ACTIVE,  # processes may still be ending, epilog running
    "SIGNALING": JobState.ACTIVE,
    "STAGE_OUT": JobState.ACTIVE,
    "RESIZING": JobState.ACTIVE,
    "SUSPENDED": JobState.SUSPENDED,  # keeps its allocation and can resume: not final
    "STOPPED": JobState.SUSPENDED,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELED,
    "REVOKED": JobState.CANCELED,  # a federation sibling removed because another one started
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "LAUNCH_FAILED": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,  # ended by a policy the user did not choose
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,  # reached its --deadline
}

HELD_REASONS = frozenset({"JobHeldUser", "JobHeldAdmin"})
# States in which a job that ran is back in the queue: the one backward move the model allows.
REQUEUE_STATES = frozenset({"REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT"})


def to_job_state(native_state: str, reason: str = "") -> JobState | None:
    """Our state for Slurm's; None for a state this table does not know (the caller keeps the
    job's previous state and shows the native one)."""
    base = native_state.split()[0].rstrip("+") if native_state.strip() else ""  # "CANCELLED by 0"
    state = SLURM_STATES.get(base)
    if state is JobState.QUEUED and reason in HELD_REASONS:
        return JobState.HELD
    return state


def decode_wait_status(status: int) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` from the raw wait status squeue reports (768 for ``exit 3``)."""
    if status & 0x7F:
        return None, status & 0x7F
    return status >> 8, None


def decode_exit_code(text: str) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` from sacct's ExitCode ``code:signal`` (``3:0`` for ``exit 3``,
    ``0:9`` for killed by SIGKILL); ``(None, None)`` for what is not that."""
    code, _, signal = text.partition(":")
    if not (code.isdigit() and signal.isdigit()):
        return None, None
    if int(signal):
        return None, int(signal)
    return int(code), None


def slurm_status(native_state: str, reason: str, previous: JobStatus, **details) -> JobStatus:
    """A JobStatus from Slurm's words; exit code and times (``details``) only once final."""
    state = to_job_state(native_state, reason) or previous.state
    if not state.is_final:
        details = {k: v for k, v in details.items() if k in ("submit_time", "start_time", "host")}
    return JobStatus(state=state, native_state=native_state, reason=_shown_reason(reason),
                     requeue=native_state.split(" ")[0] in REQUEUE_STATES, **details)


def _shown_reason(reason: str) -> str:
    return "" if reason in ("None", "(null)") else reason
