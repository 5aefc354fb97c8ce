"""Applications the remote-reference and multi-host tests run as real application servers
(imported by the server with this directory on PYTHONPATH). No tests here."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np

from gridcouple.appkit import remote
from gridcouple.appkit.application import Application
from gridcouple.appkit.data import Field, StructuredMesh, TimeStep
from gridcouple.appkit.store import FieldRef

ROWS, COLUMNS = 512, 128  # float64: 512 KiB; 64 chunks of 8 rows (8 KiB) each
CHUNK_ROWS = 8


def values() -> np.ndarray:
    return np.arange(ROWS * COLUMNS, dtype=np.float64).reshape(ROWS, COLUMNS)


class Producer(Application):
    """Offers one field of 64 chunks; says where it runs and what its server served."""

    def __init__(self) -> None:
        self.field_store.chunk_bytes = CHUNK_ROWS * COLUMNS * 8

    def get_field(self, field_id: str, time: float) -> Field:
        return Field(StructuredMesh((ROWS, COLUMNS)), values(), field_id, units="K", time=time)

    def solve_step(self, tstep: TimeStep) -> None:
        time.sleep(tstep.dt)

    def served(self) -> dict[str, int]:
        return remote.served_counts()

    def host(self) -> str:
        return socket.gethostname()

    def pid(self) -> int:
        return os.getpid()

    def plant_symlink(self, ref: FieldRef, chunk: int, target: str) -> str:
        """Replace one chunk file of a version in its own store by a symbolic link."""
        path = Path(self.field_store.url) / ref.array_path / "c" / str(chunk) / "0"
        path.unlink()
        path.symlink_to(target)
        return str(path)


class Consumer(Application):
    """Reads what it is asked to of the FieldRefs it is given."""

    accepts_field_refs = True

    def __init__(self) -> None:
        self.ref: FieldRef | None = None

    def set_field(self, field: FieldRef) -> None:
        self.ref = field

    def read_rows(self, ref: FieldRef, start: int, stop: int) -> float:
        return float(np.asarray(ref.open()[start:stop]).sum())

    def read_all(self, ref: FieldRef) -> float:
        return float(ref.read().sum())

    def dask_rows(self, ref: FieldRef, start: int, stop: int) -> float:
        return float(ref.to_dask()[start:stop].sum().compute())

    def xarray_rows(self, ref: FieldRef, start: int, stop: int) -> float:
        dataset = ref.open_dataset()
        return float(dataset[ref.field_id][start:stop].sum().values)

    def timed_read(self, ref: FieldRef) -> list[object]:
        """[seconds, the error's type or "", its text]: a read that fails says why."""
        started = time.monotonic()
        try:
            ref.read()
        except Exception as exc:
            return [time.monotonic() - started, type(exc).__name__, str(exc)]
        return [time.monotonic() - started, "", ""]

    def host(self) -> str:
        return socket.gethostname()
