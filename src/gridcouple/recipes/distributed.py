"""``distributed``: the weak-coupling scenario with its two applications on two job managers,
and the concentration passed BY REFERENCE as a field (a FieldRef into the producer's store).

The two job managers are the first two ``[backend.NAME]`` tables with ``type =
"jobmanager"`` in the configuration (partners' sites). Without two such tables the recipe
starts two on this machine, each with its own port, work root and token, and stops them at the
end. Each step prints ``Time / concentration / running average``; the final average is 0.55.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from rich.console import Console

from gridcouple.appkit.data import Field, StructuredMesh
from gridcouple.appkit.store import FieldRef
from gridcouple.config import Config
from gridcouple.coupler import AppRequest, Coupler
from gridcouple.recipes import weak_coupling
from gridcouple.recipes.stepping import step_progress, time_steps

MESH = StructuredMesh((8, 8), origin=(0.0, 0.0), spacing=(0.125, 0.125))
PARTNERS = ("partner-a", "partner-b")


class ConcentrationField(weak_coupling.Concentration):
    """Application 1, as a field: the concentration (equal to the time) on MESH."""

    def get_field(self, field_id: str, time: float,
                  mode: Literal["copy", "ref"] = "copy") -> Field | FieldRef:
        if field_id != "concentration":
            raise KeyError(f"the concentration model has no field {field_id!r}")
        field = Field(MESH, np.full(MESH.shape, self.value), "concentration", units="kg/m**3",
                      time=time)
        return self.export_field(field, mode, time)


class FieldAverage(weak_coupling.RunningAverage):
    """Application 2: the running average of the mean concentration it is given."""

    def set_field(self, field: Field) -> None:
        if field.field_id != "concentration":
            raise ValueError(f"expected the concentration, got {field.field_id!r}")
        self.contribution = float(field.values.mean())


def job_manager_backends(config: Config) -> list[str]:
    """The names of the configured backends of kind ``jobmanager``, sorted."""
    return sorted(name for name in config.backend_tables
                  if config.backend_kind(name)[0] == "jobmanager")


def main(config: Config, console: Console, *, verbose: bool = False) -> None:
    """Run the scenario on two job managers (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        names = job_manager_backends(config)[:2]
        if len(names) < 2:
            console.print("no two [backend.NAME] tables with type = \"jobmanager\": starting "
                          "two job managers on this machine", markup=False)
            config = stack.enter_context(local_job_managers(config))
            names = list(PARTNERS)
        with Coupler(config, verbose=verbose) as coupler:
            for name in names:
                console.print(f"{name}: {coupler.backend_for(name).options.url}", markup=False)
            app1, app2 = coupler.allocate_many([
                AppRequest(f"{__name__}:ConcentrationField", name="concentration",
                           backend=names[0]),
                AppRequest(f"{__name__}:FieldAverage", name="running-average",
                           backend=names[1])])

            def critical() -> float:
                return min(app1.get_critical_time_step(), app2.get_critical_time_step())

            with step_progress(console, "distributed", weak_coupling.TARGET_TIME) as advance:
                for tstep in time_steps(critical, weak_coupling.TARGET_TIME):
                    app1.solve_step(tstep)
                    reference = app1.get_field("concentration", tstep.time, mode="ref")
                    app2.set_field(reference)
                    app2.solve_step(tstep)
                    average = app2.get_property("cumulative concentration", tstep.time)
                    console.print(f"Time: {tstep.time:5.2f} concentration "
                                  f"{app1.get_property('concentration').value:5.2f}, running "
                                  f"average {average.value:5.2f} (field version "
                                  f"{reference.version}, by reference)", markup=False)
                    advance(tstep)


@contextlib.contextmanager
def local_job_managers(config: Config) -> Iterator[Config]:
    """Two job managers on this machine (loopback, any free port, their own work roots and
    tokens) for the time of the block; yields ``config`` with a backend for each."""
    from gridcouple.jobman.launch import LaunchedJobManager, start_job_manager

    root = Path(tempfile.mkdtemp(prefix="gridcouple-distributed-"))
    servers: list[LaunchedJobManager] = []
    try:
        tables = dict(config.backend_tables)
        for name in PARTNERS:
            server = start_job_manager(root / name, {"apps": [f"{__name__}:*"], "max_jobs": 2})
            servers.append(server)
            tables[name] = {"type": "jobmanager", "url": server.url,
                            "token_file": str(server.token_files["coupler"])}
        yield dataclasses.replace(config, backend=PARTNERS[0], backend_tables=tables,
                                  backend_origin="the distributed recipe")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
