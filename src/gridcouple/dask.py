"""``gridcouple.dask``: dask.distributed clusters whose workers are batch jobs on any backend
(docs/dask.md). The code lives in :mod:`gridcouple.daskcluster`; this module only names it,
and imports the real dask absolutely like every module of the package."""

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
