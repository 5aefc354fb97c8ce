"""The local backend: processes on this machine behind a slot-limited, policy-ordered queue."""

from gridcouple.backends.local.backend import LocalBackend, LocalOptions

__all__ = ["LocalBackend", "LocalOptions"]
