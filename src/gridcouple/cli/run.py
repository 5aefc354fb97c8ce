"""``gridcouple run RECIPE``: run a coupled scenario with a progress display."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gridcouple.cli import BackendOption, ConfigOption, StateDirOption, app, open_config
from gridcouple.recipes import RECIPES, run_recipe


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help=f"One of: {', '.join(RECIPES)}.", metavar="RECIPE",
                                          show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", help="Where the recipe writes its files (thermo-mechanical: "
        "one VTK file per step; default: thermo-mechanical in the state directory).",
        show_default=False)] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show the dask scheduler's INFO lines.")] = False,
    config: ConfigOption = None,
    backend: BackendOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Run a recipe (a coupled scenario) through the configured backend."""
    run_recipe(recipe, open_config(config, backend, state_dir), Console(), out=out,
               verbose=verbose)
