"""Applications the appkit and coupler tests run as real application servers (imported by the
server process with this directory on PYTHONPATH). No tests here."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from gridcouple.appkit.application import Application
from gridcouple.appkit.data import Field, Property, StructuredMesh, TimeStep

MESH = StructuredMesh((4, 3), spacing=(0.5, 1.0))


class Counter(Application):
    """Adds each step's dt; offers its value as a property and as a field."""

    def __init__(self) -> None:
        self.value = 0.0
        self.received: float | None = None

    def solve_step(self, tstep: TimeStep) -> None:
        if tstep.dt < 0.01:
            raise ValueError(f"dt {tstep.dt} is below this code's limit")
        self.value += tstep.dt

    def get_critical_time_step(self) -> float:
        return 0.25

    def get_property(self, property_id: str, time: float | None = None) -> Property:
        return Property(self.value, property_id=property_id, units="kg/m**3", time=time)

    def get_field(self, field_id: str, time: float) -> Field:
        return Field(MESH, np.full(MESH.shape, self.value), field_id, units="K", time=time)

    def set_field(self, field: Field) -> None:
        self.received = float(field.values.mean())

    def unsendable(self) -> object:
        return object()

    def received_mean(self) -> float | None:
        return self.received

    def pid(self) -> int:
        return os.getpid()

    def _secret(self) -> str:
        return "private"


class Sleeper(Counter):
    """A solve_step that takes dt seconds, says so on stderr first (the SIGKILL test's victim)
    and notes when it started and ended (wall clock, comparable between processes)."""

    step_times: tuple[float, float] | None = None

    def solve_step(self, tstep: TimeStep) -> None:
        started = time.time()
        print(f"solving step {tstep.number}", file=sys.stderr, flush=True)
        time.sleep(tstep.dt)
        self.value += tstep.dt
        self.step_times = (started, time.time())

    def last_step_times(self) -> tuple[float, float] | None:
        return self.step_times


class BrokenAtStart(Application):
    """Fails while starting, as a code without its license would."""

    def __init__(self) -> None:
        raise RuntimeError("no license for the solver found")


class MupifStyle(Application):
    """Written with MuPIF's names only, as a ported application is."""

    def __init__(self) -> None:
        self.time = 0.0

    def solveStep(self, tstep, stageID=0, runInBackground=False):
        self.time = tstep.getTime()

    def getCriticalTimeStep(self):
        return 0.5

    def getField(self, fieldID, time, objectID=0):
        return Field(MESH, np.full(MESH.shape, self.time), fieldID, time=time)
