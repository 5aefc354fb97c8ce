"""The ``gridcouple`` command. Each sub-module adds its commands to :data:`app`."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from gridcouple.config import Config, load_config
from gridcouple.errors import GridcoupleError

EXIT_USAGE = 2  # usage or configuration errors (click's own code for usage errors)


def _plain_help(params: list[Any]) -> None:
    """Help without Python types (``<bool>``, ``<list[str]>``): an option shows its metavar
    (its name in capitals unless given), a flag nothing, an argument its name alone."""
    for param in params:
        if getattr(param, "param_type_name", "") == "argument":
            param.display_type_rich = lambda ctx: None
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = (param.name or "value").upper()


class _PlainHelp:
    """Help that shows no Python types (mixed into typer's command and group classes)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        _plain_help(params)
        return params


class Command(_PlainHelp, TyperCommand):
    """A command whose help shows no Python types."""


class Group(_PlainHelp, TyperGroup):
    """A group of commands whose help shows no Python types."""


class _Typer(typer.Typer):
    """typer.Typer whose commands are :class:`Command` unless told otherwise."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Callable[[Any], Any]:
        return super().command(*args, cls=cls or Command, **kwargs)


def new_app(**kwargs: Any) -> typer.Typer:
    """A typer app (or sub-app) with plain help."""
    return _Typer(cls=Group, add_completion=False, pretty_exceptions_enable=False, **kwargs)


app = new_app(
    name="gridcouple",
    help="Couple simulation codes across machines: submit, watch and steer batch jobs.",
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("gridcouple")
        except PackageNotFoundError:  # run from a source tree without installing
            number = "unknown (not installed)"
        typer.echo(f"gridcouple {number}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version,
        is_eager=True)] = False,
) -> None:
    """Couple simulation codes across machines: submit, watch and steer batch jobs."""


def main() -> None:
    """Entry point: run the command; a GridcoupleError becomes one line on stderr, exit 2."""
    from gridcouple.cli import certs, jobman, jobs, run, simulate  # noqa: F401  (registers commands)

    try:
        app()
    except GridcoupleError as exc:
        print(f"gridcouple: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", metavar="FILE", help="gridcouple.toml to use (else "
                 "$GRIDCOUPLE_CONFIG, else ./gridcouple.toml, else defaults).",
                 show_default=False),
]
BackendOption = Annotated[
    str | None,
    typer.Option("--backend", "-b", metavar="NAME", help="Backend name; overrides the one in "
                 "the config file and $GRIDCOUPLE_BACKEND.", show_default=False),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option("--state-dir", metavar="DIR", help="Journal and job homes (else state_dir in "
                 "the config, else $XDG_STATE_HOME/gridcouple).", show_default=False),
]


def with_overrides(config: Config, backend: str | None = None,
                   state_dir: Path | None = None) -> Config:
    """``config`` with the backend and state directory given on the command line."""
    if backend:
        config = dataclasses.replace(config, backend=backend, backend_origin="--backend")
    if state_dir is not None:
        config = dataclasses.replace(config, state_dir=state_dir.expanduser().absolute())
    return config


def open_config(config_path: Path | None, backend: str | None = None,
                state_dir: Path | None = None) -> Config:
    """Load the configuration the way every command does: ``backend`` overrides its choice,
    ``state_dir`` its state directory. The chosen backend must exist: a typo in
    ``$GRIDCOUPLE_BACKEND`` is an error, not an empty journal."""
    from gridcouple.backends import backend_class

    config = with_overrides(load_config(config_path), backend, state_dir)
    backend_class(config.backend, config)
    return config
