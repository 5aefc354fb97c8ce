"""Pictures and output files (issue 15): one comparison figure under the name given, every file
written is named, empty traces, the occupancy view, VTK values as precise as their header says,
and the thermo-mechanical recipe's --out."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from gridcouple.cli import app, jobs, run, simulate  # noqa: F401  (main registers them so)
from gridcouple.scheduler import plots
from gridcouple.scheduler.engine import simulate as simulate_jobs
from gridcouple.scheduler.metrics import window_average
from gridcouple.scheduler.policies import make_policy
from gridcouple.scheduler.swf import read_swf, replay_jobs

TRACE = "; MaxProcs: 4\n" + "".join(
    f"{n} {submit} -1 {length} {procs} -1 -1 {procs} {length} -1 1 1 1 -1 1 -1 -1 -1\n"
    for n, (submit, procs, length) in enumerate([(0, 2, 10), (1, 4, 5), (2, 2, 3), (3, 1, 20),
                                              (4, 1, 2)], start=1))


def test_one_figure_under_the_name_given_and_every_file_is_named(tmp_path, monkeypatch):
    trace = tmp_path / "t.swf"
    trace.write_text(TRACE)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["simulate", "t.swf", "-p", "fcfs", "-p", "easy",
                                      "--out", "s.swf", "--plot", "k.png"])
    assert result.exit_code == 0, result.output
    written = re.findall(r"^wrote (\S+)$", result.output, re.MULTILINE)
    assert written == ["s-fcfs.swf", "s-easy.swf", "k.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.png", "s-easy.swf", "s-fcfs.swf",
                                                          "t.swf"]
    assert re.search(r"^fcfs: 5 jobs simulated in \d+\.\d\d s$", result.output, re.MULTILINE)


NO_RUN_TIME = "; MaxProcs: 4\n1 0 -1 0 2 -1 -1 2 10 -1 1 1 1 -1 1 -1 -1 -1\n"


@pytest.mark.parametrize("text", ["; MaxProcs: 4\n", NO_RUN_TIME],
                         ids=["header-only", "every-job-dropped"])
def test_a_trace_without_jobs_simulates_writes_and_draws(tmp_path, text):
    trace = tmp_path / "empty.swf"
    trace.write_text(text)
    result = CliRunner().invoke(app, ["simulate", str(trace), "-p", "fcfs", "-p", "easy",
                                      "--out", str(tmp_path / "e.swf"),
                                      "--plot", str(tmp_path / "e.png")])
    assert result.exit_code == 0, result.output
    assert read_swf(tmp_path / "e-easy.swf").records.shape[0] == 0
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_many_jobs_are_drawn_as_occupancy_not_boxes(tmp_path, monkeypatch):
    replay = replay_jobs(read_swf(_written(tmp_path / "t.swf", TRACE)))
    runs = [(name, simulate_jobs(replay.jobs, make_policy(name), replay.procs))
            for name in ("fcfs", "easy")]
    drawn: list[str] = []

    def recorded(name: str, draw: Any) -> Any:
        """The real drawing function, noting that it was chosen (a spy, not a stand-in)."""
        def spy(*args: Any) -> Any:
            drawn.append(name)
            return draw(*args)
        return spy

    for name in ("gantt", "occupancy"):
        monkeypatch.setattr(plots, f"_{name}", recorded(name, getattr(plots, f"_{name}")))
    plots.plot_schedules(runs, tmp_path / "a.png", gantt_limit=5)
    plots.plot_schedules(runs, tmp_path / "b.png", gantt_limit=4)
    assert drawn == ["gantt", "gantt", "occupancy", "occupancy"]


def test_time_units_and_window_averages():
    assert [plots.time_unit(s).name for s in (60, 3 * 3600, 10 * 86400)] == \
        ["minutes", "hours", "days"]
    # 2 from t=1 to 3, then 0: windows [0, 2) and [2, 4) each hold one busy unit of 2
    np.testing.assert_allclose(window_average(np.array([1.0, 3.0]), np.array([2.0, 0.0]),
                                              np.array([0.0, 2.0, 4.0])), [1.0, 1.0])
    assert window_average(np.empty(0), np.empty(0), np.array([0.0, 1.0])).tolist() == [0.0]


def test_the_progress_steps_give_the_same_schedule(tmp_path):
    replay = replay_jobs(read_swf(_written(tmp_path / "t.swf", TRACE)))
    for name in ("fcfs", "easy", "sjf"):
        whole = simulate_jobs(replay.jobs, make_policy(name), replay.procs)
        stepped = simulate._run_policy(replay.jobs, make_policy(name), replay.procs, False, name)
        assert (stepped.start, stepped.end) == (whole.start, whole.end)


def test_vtk_values_are_written_as_the_floats_the_header_says(tmp_path):
    import meshio

    from gridcouple.appkit.data import Field, StructuredMesh
    from gridcouple.appkit.vtk import write_vtk

    mesh = StructuredMesh((5, 4), origin=(0.0, 0.0), spacing=(0.1, 0.1))
    values = np.random.default_rng(3).random(mesh.shape) * 100
    path = write_vtk(tmp_path / "f.vtk", [Field(mesh, values, "temperature")])
    lines = path.read_text().splitlines()
    assert lines[lines.index("SCALARS temperature float 1") + 1] == "LOOKUP_TABLE default"
    numbers = lines[lines.index("LOOKUP_TABLE default") + 1].split()
    assert max(len(n.replace(".", "").lstrip("0")) for n in numbers) <= 9  # not 17 digits
    read = meshio.read(path).point_data["temperature"].reshape(-1)
    np.testing.assert_array_equal(read.astype(np.float32),
                                  values.reshape(-1, order="F").astype(np.float32))


def test_thermo_mechanical_writes_its_vtk_files_to_out(tmp_path):
    config = tmp_path / "gridcouple.toml"
    config.write_text('state_dir = "state"\n[backend.local]\nslots = 2\nidle_exit = 2\n')
    out = tmp_path / "vtk"
    result = CliRunner().invoke(app, ["run", "thermo-mechanical", "--out", str(out),
                                      "--config", str(config)], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("thermo-mechanical-*.vtk"))) == 9
    assert f"9 VTK files in {out}" in result.output
    assert not (tmp_path / "state" / "thermo-mechanical").exists()
    refused = CliRunner().invoke(app, ["run", "demo", "--out", str(out), "--config",
                                       str(config)])
    assert refused.exit_code != 0 and "recipe 'demo' takes no out option" in str(
        refused.exception)


def _written(path, text):
    path.write_text(text)
    return path
