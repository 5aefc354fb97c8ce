"""gridcouple: couple simulation codes across machines.

Application servers run as batch jobs through a pluggable backend (local, jobmanager, slurm,
htcondor, simgrid); a dask.distributed coupler steers them and moves fields through zarr.
"""

from gridcouple.errors import BackendError, ConfigError, GridcoupleError, JobNotFoundError
from gridcouple.jobs import Job, JobEvent, JobSpec, JobState, JobStatus, Resources, StagedFile

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "GridcoupleError",
    "Job",
    "JobEvent",
    "JobNotFoundError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Resources",
    "StagedFile",
]
