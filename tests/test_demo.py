"""The demo sweep (what `make run` shows) runs real jobs and gets the physics right."""

from __future__ import annotations

import io
import math

from rich.console import Console

from gridcouple.backends.local import LocalBackend
from gridcouple.config import load_config
from gridcouple.recipes import run_recipe
from gridcouple.recipes.demo import ALPHAS, solve


def test_heat_solver_matches_the_exact_solution():
    result = solve(1.0)
    assert math.isclose(result["u_mid"], math.exp(-math.pi**2 * 0.1), rel_tol=1e-4)


def test_demo_sweep_completes_every_job(tmp_path):
    config_file = tmp_path / "gridcouple.toml"
    config_file.write_text('state_dir = "state"\n[backend.local]\nslots = 2\nidle_exit = 5\n')
    out = io.StringIO()
    try:
        run_recipe("demo", load_config(config_file), Console(file=out, width=120))
    finally:
        LocalBackend(state_dir=tmp_path / "state").stop_daemon()
    text = out.getvalue()
    assert text.count("COMPLETED") == len(ALPHAS)
    assert f"{math.exp(-math.pi**2 * 0.1):.6f}" in text
