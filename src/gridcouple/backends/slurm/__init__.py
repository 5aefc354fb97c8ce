"""The Slurm backend: job arrays through sbatch, one squeue per poll, real Slurm states."""

from gridcouple.backends.slurm.backend import SlurmBackend, SlurmOptions

__all__ = ["SlurmBackend", "SlurmOptions"]
