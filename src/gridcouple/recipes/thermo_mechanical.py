"""``thermo-mechanical``: a 2-D transient heat solver and a thermal-expansion solver, each an
application server in its own job, on one structured mesh.

The plate [0, 2] x [0, 1] m starts at the reference temperature; its left edge is held 100 K
above it, the other edges at it. The heat solver integrates dT/dt = a (T_xx + T_yy) with
explicit finite differences (its critical time step is the stability limit). Each step the
expansion solver takes the temperature BY REFERENCE (a FieldRef into the heat solver's zarr
store; the values never pass through the steering process) and computes the displacement of
free thermal expansion, u_x = int_0^x b T dx and u_y = int_0^y b T dy from the clamped left and
bottom edges, then writes temperature and displacement to one VTK file per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from gridcouple.appkit.application import Application
from gridcouple.appkit.data import Field, Property, StructuredMesh, TimeStep
from gridcouple.appkit.store import FieldRef
from gridcouple.appkit.vtk import write_vtk
from gridcouple.config import Config
from gridcouple.coupler import AppRequest, Coupler
from gridcouple.recipes.stepping import step_progress, time_steps

MESH = StructuredMesh((41, 21), origin=(0.0, 0.0), spacing=(0.05, 0.05))
DIFFUSIVITY = 0.01  # m^2/s
EXPANSION = 1.2e-5  # 1/K (steel)
HOT_EDGE = 100.0  # K above the reference temperature
TARGET_TIME = 0.5  # s
OUTPUT_INTERVAL = 0.1  # s, the expansion solver's longest step


class HeatSolver(Application):
    """Explicit finite differences on MESH; Dirichlet edges."""

    def __init__(self) -> None:
        self.temperature = np.zeros(MESH.shape)
        self.temperature[0, :] = HOT_EDGE
        self.time = 0.0

    def get_critical_time_step(self) -> float:
        dx, dy = MESH.spacing
        return 0.9 / (2 * DIFFUSIVITY * (1 / dx**2 + 1 / dy**2))

    def solve_step(self, tstep: TimeStep) -> None:
        dx, dy = MESH.spacing
        t = self.temperature
        laplacian = ((t[2:, 1:-1] - 2 * t[1:-1, 1:-1] + t[:-2, 1:-1]) / dx**2
                     + (t[1:-1, 2:] - 2 * t[1:-1, 1:-1] + t[1:-1, :-2]) / dy**2)
        t[1:-1, 1:-1] += DIFFUSIVITY * tstep.dt * laplacian
        self.time = tstep.time

    def get_property(self, property_id: str, time: float | None = None) -> Property:
        if property_id != "mean_temperature":
            raise KeyError(f"the heat solver has no property {property_id!r}")
        return Property(float(self.temperature.mean()), property_id=property_id, units="K",
                        time=self.time)

    def get_field(self, field_id: str, time: float,
                  mode: Literal["copy", "ref"] = "copy") -> Field | FieldRef:
        if field_id != "temperature":
            raise KeyError(f"the heat solver has no field {field_id!r}")
        field = Field(MESH, self.temperature.copy(), "temperature", units="K", time=self.time)
        return self.export_field(field, mode, time)


class ThermalExpansion(Application):
    """Free thermal expansion from the clamped left and bottom edges; VTK output per step.
    Each step's temperature is read from the heat solver's store into last step's array."""

    reuse_field_buffers = True

    def __init__(self) -> None:
        self.temperature: Field | None = None
        self.displacement = np.zeros((*MESH.shape, 2))
        self.output: Path | None = None
        self.written: list[str] = []

    def initialize(self, output_directory: str = ".", **options: object) -> None:
        self.output = Path(output_directory)
        self.output.mkdir(parents=True, exist_ok=True)

    def get_critical_time_step(self) -> float:
        return OUTPUT_INTERVAL

    def set_field(self, field: Field) -> None:
        if field.field_id != "temperature" or field.mesh != MESH:
            raise ValueError(f"expected the temperature on {MESH!r}, got {field.field_id!r} "
                             f"on {field.mesh!r}")
        self.temperature = field

    def solve_step(self, tstep: TimeStep) -> None:
        if self.temperature is None:
            raise RuntimeError("set_field(temperature) must come before solve_step")
        strain = EXPANSION * self.temperature.values
        dx, dy = MESH.spacing
        self.displacement[..., 0] = _cumulative_trapezoid(strain, dx, axis=0)
        self.displacement[..., 1] = _cumulative_trapezoid(strain, dy, axis=1)

    def finish_step(self, tstep: TimeStep) -> None:
        assert self.temperature is not None and self.output is not None
        displacement = Field(MESH, self.displacement, "displacement", "vector", "m", tstep.time)
        path = write_vtk(self.output / f"thermo-mechanical-{tstep.number:04d}.vtk",
                         [self.temperature, displacement],
                         title=f"thermo-mechanical t={tstep.time:g} s")
        self.written.append(str(path))

    def get_field(self, field_id: str, time: float,
                  mode: Literal["copy", "ref"] = "copy") -> Field | FieldRef:
        if field_id != "displacement":
            raise KeyError(f"the expansion solver has no field {field_id!r}")
        field = Field(MESH, self.displacement.copy(), "displacement", "vector", "m", time)
        return self.export_field(field, mode, time)

    def get_property(self, property_id: str, time: float | None = None) -> Property:
        if property_id == "right_edge_displacement":  # the mean u_x of the edge x = 2 m
            return Property(float(self.displacement[-1, :, 0].mean()), property_id=property_id,
                            units="m", time=time)
        raise KeyError(f"the expansion solver has no property {property_id!r}")

    def vtk_files(self) -> list[str]:
        """The VTK files written so far, oldest first."""
        return list(self.written)


def _cumulative_trapezoid(values: np.ndarray, spacing: float, axis: int) -> np.ndarray:
    """The integral from the first grid line along ``axis``, by the trapezoid rule."""
    moved = np.moveaxis(values, axis, 0)
    steps = 0.5 * (moved[1:] + moved[:-1]) * spacing
    integral = np.concatenate([np.zeros_like(moved[:1]), np.cumsum(steps, axis=0)])
    return np.moveaxis(integral, 0, axis)


def main(config: Config, console: Console, *, out: Path | None = None,
         verbose: bool = False) -> None:
    """Run the scenario through the configured backend. One VTK file per step goes to
    ``out`` (default: ``thermo-mechanical`` in the state directory); ``verbose`` shows the
    dask scheduler's INFO lines."""
    output = (Path(out).expanduser() if out is not None
              else config.state_dir / "thermo-mechanical").absolute()
    with Coupler(config, verbose=verbose) as coupler:
        console.print(f"starting the heat and expansion solvers on the {config.backend} "
                      "backend")
        heat, mechanics = coupler.allocate_many([
            AppRequest(f"{__name__}:HeatSolver", name="heat"),
            AppRequest(f"{__name__}:ThermalExpansion", name="expansion")])
        mechanics.initialize(output_directory=str(output))

        def critical() -> float:
            return min(heat.get_critical_time_step(), mechanics.get_critical_time_step())

        table = Table("step", "time [s]", "mean temperature [K]", "right edge u_x [m]")
        with step_progress(console, "thermo-mechanical", TARGET_TIME) as advance:
            for tstep in time_steps(critical, TARGET_TIME):
                heat.solve_step(tstep)
                mechanics.set_field(heat.get_field("temperature", tstep.time, mode="ref"))
                mechanics.solve_step(tstep)
                heat.finish_step(tstep)
                mechanics.finish_step(tstep)
                mean = heat.get_property("mean_temperature", tstep.time).value
                moved = mechanics.get_property("right_edge_displacement", tstep.time).value
                table.add_row(str(tstep.number), f"{tstep.time:.4f}", f"{mean:.3f}",
                              f"{moved:.3e}")
                advance(tstep)
        files = mechanics.vtk_files()
    console.print(table)
    console.print(f"{len(files)} VTK files in {output}", soft_wrap=True, markup=False,
                  highlight=False)
