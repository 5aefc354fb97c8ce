"""The ``jobmanager`` backend: a partner's job manager, over its HTTPS+JSON API."""

from gridcouple.backends.jobmanager.backend import JobManagerBackend, JobManagerOptions

__all__ = ["JobManagerBackend", "JobManagerOptions"]
