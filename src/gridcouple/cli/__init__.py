"""The ``gridcouple`` command. Each sub-module adds its commands to :data:`app`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from gridcouple.config import Config, load_config
from gridcouple.errors import GridcoupleError

app = typer.Typer(
    name="gridcouple",
    help="Couple simulation codes across machines: submit, watch and steer batch jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Entry point: run the command; a GridcoupleError becomes one line on stderr, exit 2."""
    from gridcouple.cli import jobman, jobs, run, simulate  # noqa: F401  (registers commands)

    try:
        app()
    except GridcoupleError as exc:
        print(f"gridcouple: error: {exc}", file=sys.stderr)
        sys.exit(2)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="gridcouple.toml to use (else $GRIDCOUPLE_CONFIG, "
                 "else ./gridcouple.toml, else defaults).", show_default=False),
]
BackendOption = Annotated[
    str | None,
    typer.Option("--backend", "-b", help="Backend name; overrides the one in the config file and "
                 "$GRIDCOUPLE_BACKEND.", show_default=False),
]


def open_config(config_path: Path | None, backend: str | None = None) -> Config:
    """Load the configuration the way every command does; ``backend`` overrides its choice."""
    config = load_config(config_path)
    if not backend:
        return config
    return dataclasses.replace(config, backend=backend, backend_origin="--backend")
