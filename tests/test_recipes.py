"""The coupled recipes, run for real on the local backend (the CLI for weak-coupling)."""

from __future__ import annotations

import io

import meshio
import numpy as np
from rich.console import Console
from typer.testing import CliRunner

from gridcouple.cli import app, jobs, run, simulate  # noqa: F401  (main registers them so)
from gridcouple.config import load_config
from gridcouple.recipes import thermo_mechanical
from gridcouple.recipes.stepping import time_steps


def write_config(tmp_path):
    path = tmp_path / "gridcouple.toml"
    path.write_text('state_dir = "state"\n[backend.local]\nslots = 4\nidle_exit = 2\n')
    return path


def test_time_steps_land_exactly_on_the_target():
    steps = list(time_steps(lambda: 0.1, 1.0))
    assert len(steps) == 10 and steps[-1].time == 1.0 and steps[-1].number == 10
    assert [s.time for s in time_steps(lambda: 0.3, 1.0)] == [0.3, 0.6, 0.8999999999999999, 1.0]
    assert abs(list(time_steps(lambda: 0.3, 1.0))[-1].dt - 0.1) < 1e-12


def test_weak_coupling_prints_each_step_and_ends_at_the_average_055(tmp_path):
    result = CliRunner().invoke(app, ["run", "weak-coupling", "--config",
                                      str(write_config(tmp_path))])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Time:")]
    assert len(lines) == 10
    assert lines[0] == "Time:  0.10 concentration  0.10, running average  0.10"
    assert lines[-1] == "Time:  1.00 concentration  1.00, running average  0.55"


def test_thermo_mechanical_writes_vtk_per_step_that_matches_the_solvers(tmp_path):
    config = load_config(write_config(tmp_path))
    output = io.StringIO()
    thermo_mechanical.main(config, Console(file=output, width=120))
    files = sorted((config.state_dir / "thermo-mechanical").glob("*.vtk"))
    steps = list(time_steps(lambda: min(thermo_mechanical.HeatSolver().get_critical_time_step(),
                                        thermo_mechanical.OUTPUT_INTERVAL),
                            thermo_mechanical.TARGET_TIME))
    assert len(files) == len(steps) == 9 and "9 VTK files" in output.getvalue()
    heat = thermo_mechanical.HeatSolver()  # the same solver, in this process, as the reference
    for tstep in steps:
        heat.solve_step(tstep)
    expected = heat.get_field("temperature", 0.5).values
    read = meshio.read(files[-1])
    temperature = read.point_data["temperature"].reshape(-1)
    np.testing.assert_allclose(temperature, expected.reshape(-1, order="F"), rtol=1e-6)
    # Free expansion: u_x at the right edge is b * int_0^2 T dx along each row.
    u_x = read.point_data["displacement"][:, 0].reshape(thermo_mechanical.MESH.shape, order="F")
    dx = thermo_mechanical.MESH.spacing[0]
    integral = dx * (expected.sum(axis=0) - 0.5 * (expected[0] + expected[-1]))
    np.testing.assert_allclose(u_x[-1], thermo_mechanical.EXPANSION * integral, rtol=1e-5)
