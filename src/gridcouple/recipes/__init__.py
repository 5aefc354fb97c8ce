"""Runnable scenarios. Each recipe is a module with ``main(config, console, **options)``.

``gridcouple run NAME`` looks the name up in :data:`RECIPES`; a new recipe adds one line here.
The options a recipe's ``main`` may take: ``verbose`` (show the dask scheduler's INFO lines)
and ``out`` (the directory for the files it writes); :func:`run_recipe` passes those it takes.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Protocol

from rich.console import Console

from gridcouple.config import Config
from gridcouple.errors import GridcoupleError

RECIPES: dict[str, str] = {
    "demo": "gridcouple.recipes.demo",
    "weak-coupling": "gridcouple.recipes.weak_coupling",
    "thermo-mechanical": "gridcouple.recipes.thermo_mechanical",
    "distributed": "gridcouple.recipes.distributed",
    "monte-carlo": "gridcouple.recipes.monte_carlo",
}


class Recipe(Protocol):
    """What a recipe module provides."""

    def main(self, config: Config, console: Console, **options: Any) -> None: ...


def load_recipe(name: str) -> Recipe:
    """The recipe module registered under ``name``; a clear error for an unknown name."""
    if name not in RECIPES:
        raise GridcoupleError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])  # type: ignore[return-value]


def recipe_options(name: str) -> set[str]:
    """The keyword options the recipe ``name`` takes (e.g. ``{"out", "verbose"}``)."""
    parameters = inspect.signature(load_recipe(name).main).parameters
    return {p.name for p in parameters.values() if p.kind is p.KEYWORD_ONLY}


def run_recipe(name: str, config: Config, console: Console, **options: Any) -> None:
    """Run the recipe ``name`` with ``config``, reporting progress on ``console``. An option
    whose value is None is left to the recipe's default; one the recipe does not take is
    dropped when false (``verbose=False``), else refused."""
    takes = recipe_options(name)
    given = {key: value for key, value in options.items() if value is not None}
    refused = [key for key, value in given.items() if key not in takes and value]
    if refused:
        raise GridcoupleError(f"recipe {name!r} takes no {', '.join(refused)} option; it "
                              f"takes: {', '.join(sorted(takes)) or 'none'}")
    load_recipe(name).main(config, console, **{k: v for k, v in given.items() if k in takes})
