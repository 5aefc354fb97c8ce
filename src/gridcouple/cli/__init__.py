"""The ``gridcouple`` command. Each sub-module adds its commands to :data:`app`."""

from __future__ import annotations

import sys

import typer

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
    from gridcouple.cli import jobs  # noqa: F401  (registers commands)

    try:
        app()
    except GridcoupleError as exc:
        print(f"gridcouple: error: {exc}", file=sys.stderr)
        sys.exit(2)
