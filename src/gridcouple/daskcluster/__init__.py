"""dask.distributed clusters whose workers are gridcouple batch jobs (docs/dask.md).

Import it as :mod:`gridcouple.dask`."""

from gridcouple.daskcluster.cluster import (
    BatchAdaptive,
    BatchCluster,
    BatchWorker,
    WorkerJob,
    WorkerStartError,
    WorkerStartTimeout,
)

__all__ = ["BatchAdaptive", "BatchCluster", "BatchWorker", "WorkerJob", "WorkerStartError",
           "WorkerStartTimeout"]
