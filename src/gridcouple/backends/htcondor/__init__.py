"""The HTCondor backend: one cluster per submission through the htcondor2 bindings, status from
the job event log, real HTCondor states."""

from gridcouple.backends.htcondor.backend import HTCondorBackend, HTCondorOptions

__all__ = ["HTCondorBackend", "HTCondorOptions"]
