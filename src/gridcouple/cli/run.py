"""``gridcouple run RECIPE``: run a coupled scenario with a progress display."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from gridcouple.cli import BackendOption, ConfigOption, app, open_config
from gridcouple.recipes import RECIPES, run_recipe


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help=f"One of: {', '.join(RECIPES)}.", metavar="RECIPE",
                                          show_default=False)],
    config: ConfigOption = None,
    backend: BackendOption = None,
) -> None:
    """Run a recipe (a coupled scenario) through the configured backend."""
    # Quiet the dask scheduler's INFO chatter, here and in the application servers (read by
    # dask's config when it is first imported).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    run_recipe(recipe, open_config(config, backend), Console())
