"""Runnable scenarios. Each recipe is a module with ``main(config, console) -> None``.

``gridcouple run NAME`` looks the name up in :data:`RECIPES`; a new recipe adds one line here.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from rich.console import Console

from gridcouple.config import Config
from gridcouple.errors import GridcoupleError

RECIPES: dict[str, str] = {
    "demo": "gridcouple.recipes.demo",
    "weak-coupling": "gridcouple.recipes.weak_coupling",
    "thermo-mechanical": "gridcouple.recipes.thermo_mechanical",
}


class Recipe(Protocol):
    """What a recipe module provides."""

    def main(self, config: Config, console: Console) -> None: ...


def load_recipe(name: str) -> Recipe:
    """The recipe module registered under ``name``; a clear error for an unknown name."""
    if name not in RECIPES:
        raise GridcoupleError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])  # type: ignore[return-value]


def run_recipe(name: str, config: Config, console: Console) -> None:
    """Run the recipe ``name`` with ``config``, reporting progress on ``console``."""
    load_recipe(name).main(config, console)
