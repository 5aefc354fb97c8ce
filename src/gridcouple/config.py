"""Load and validate ``gridcouple.toml``. Every error names the file, the key and the line.

Shape::

    state_dir = "~/gc-state"           # journal, job homes (relative to this file); default:
                                       # one per user, $XDG_STATE_HOME/gridcouple

    [backend]
    name = "local"                     # GRIDCOUPLE_BACKEND overrides it

    [backend.local]                    # one table of options per backend
    slots = 2

    [backend.partner_a]                # a second site: any name, with the kind in ``type``
    type = "local"
    state_dir = "/scratch/partner-a"   # its own journal and job homes (default: the one above)
    python = "/opt/venv/bin/python"    # the interpreter its application servers run with

Each ``[backend.NAME]`` table is one named backend: ``type`` (default NAME), ``state_dir`` and
``python`` (:class:`SiteKeys`), and the options of its kind, validated against the backend's
``Options``. :data:`SECTIONS` validates the other tables. The file is found from
``--config``, then ``GRIDCOUPLE_CONFIG``, then ``./gridcouple.toml``; with none of them the
defaults apply.

Loading stops at the first error, unless the caller passes a list as ``errors``: then every
error is appended there (each naming its file, line and key) and loading goes on with the
defaults for what was wrong, so ``gridcouple config check`` reports them all at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gridcouple.errors import ConfigError, OptionError
from gridcouple.jobman.acl import is_loopback_host
from gridcouple.jobman.settings import JobManagerSection

T = TypeVar("T")

CONFIG_ENV = "GRIDCOUPLE_CONFIG"
BACKEND_ENV = "GRIDCOUPLE_BACKEND"
DEFAULT_FILE = "gridcouple.toml"
STATE_ENV = "XDG_STATE_HOME"


def default_state_dir() -> Path:
    """One state directory per user, wherever the command runs: ``$XDG_STATE_HOME/gridcouple``,
    else ``~/.local/state/gridcouple`` (the XDG base directory rules: a relative
    ``$XDG_STATE_HOME`` is ignored)."""
    base = os.environ.get(STATE_ENV, "")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "gridcouple"


@dataclass(frozen=True)
class BackendSection:
    """``[backend]``: which backend to use; its options live in ``[backend.NAME]``."""

    name: str = "local"


@dataclass(frozen=True)
class CouplerSection:
    """``[coupler]``: how the coupler's dask scheduler listens."""

    host: str = "127.0.0.1"
    port: int = 0
    join_timeout: float = 120.0
    call_timeout: float = 0.0  # seconds a call may take before it fails; 0 = no limit
    field_store: str = ""  # directory or fsspec URL for field versions; "" = a temporary one
    tls_ca_file: Path | None = None  # TLS for the scheduler; required beyond loopback
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise OptionError("port", f"must be a TCP port, 0 (any free one) to 65535, got "
                              f"{self.port}")
        if self.join_timeout <= 0:
            raise OptionError("join_timeout", f"must be positive, got {self.join_timeout}")
        if self.call_timeout < 0:
            raise OptionError("call_timeout", f"must not be negative, got {self.call_timeout}")
        self._check_tls()

    def _check_tls(self) -> None:
        """Beyond loopback every connection is mutual TLS: all three files, existing."""
        keys = ("tls_ca_file", "tls_cert", "tls_key")
        given = [k for k in keys if getattr(self, k) is not None]
        missing = [k for k in keys if k not in given]
        if not given and not is_loopback_host(self.host):
            raise OptionError("host", f"listening on {self.host!r} (beyond loopback) needs "
                              f"TLS; set {', '.join(keys)} in [coupler] (make them with "
                              "'gridcouple certs')")
        if given and missing:
            raise OptionError(given[0], f"TLS needs all three files; set {', '.join(missing)} "
                              "in [coupler]")
        for key in given:
            path = getattr(self, key)
            if not path.is_file():
                raise OptionError(key, f"{path} is not a file")



SECTIONS: dict[str, type] = {"backend": BackendSection, "coupler": CouplerSection,
                             "jobmanager": JobManagerSection}


@dataclass(frozen=True)
class SiteKeys:
    """The keys a ``[backend.NAME]`` table holds besides its kind's options."""

    type: str = ""  # the backend's kind (an installed backend); "" = NAME
    state_dir: Path | None = None  # its journal and job homes; None = the top-level state_dir
    python: str | None = None  # the interpreter application servers run with on its hosts


SITE_KEYS = frozenset(f.name for f in dataclasses.fields(SiteKeys))
_BACKEND_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Config:
    """A loaded configuration. ``path`` is None when no file was found (all defaults)."""

    path: Path | None
    state_dir: Path
    backend: str
    sections: Mapping[str, Any]
    backend_tables: Mapping[str, Mapping[str, Any]]
    text: str = field(default="", repr=False)
    backend_origin: str = ""  # where the backend name came from, for messages

    def where_backend(self, name: str) -> str:
        """Where backend ``name`` was asked for: the chosen one's origin (``[backend] name``,
        ``$GRIDCOUPLE_BACKEND``, ``--backend``), else its ``[backend.NAME]`` table."""
        if name == self.backend and self.backend_origin:
            return self.backend_origin
        if name in self.backend_tables:
            return self.where(("backend", name), is_table=True)
        return self.where(("backend", "name"))

    def section(self, name: str) -> Any:
        """The validated dataclass of a top-level section, e.g. ``config.section("coupler")``."""
        return self.sections[name]

    def backend_options(self, name: str, options_type: type[T],
                        errors: list[ConfigError] | None = None) -> T:
        """Validate ``[backend.NAME]`` (less its :class:`SiteKeys`) against the backend's
        options dataclass (``errors``: see the module docstring)."""
        table = {k: v for k, v in self.backend_tables.get(name, {}).items() if k not in SITE_KEYS}
        return validate(options_type, table, ("backend", name), self, errors)

    def site(self, name: str, errors: list[ConfigError] | None = None) -> SiteKeys:
        """The :class:`SiteKeys` of backend ``name`` (defaults when it has no table)."""
        table = {k: v for k, v in self.backend_tables.get(name, {}).items() if k in SITE_KEYS}
        return validate(SiteKeys, table, ("backend", name), self, errors)

    def backend_kind(self, name: str) -> tuple[str, str]:
        """The kind of backend ``name`` and where it was said, for messages."""
        kind = self.site(name).type
        if kind:
            return kind, self.where(("backend", name, "type"))
        return name, self.where_backend(name)

    def where(self, keys: tuple[str, ...], *, is_table: bool = False) -> str:
        """``file:line: [table] key`` (or ``file:line: [table]``) for messages; the line is
        found by reading the file."""
        place = str(self.path) if self.path else "<defaults>"
        line = locate_key(self.text, keys) if self.text else None
        if line is not None:
            place += f":{line}"
        if is_table:
            return f"{place}: [{'.'.join(keys)}]"
        table, key = keys[:-1], keys[-1]
        return f"{place}: [{'.'.join(table)}] {key}" if table else f"{place}: {key}"


def load_config(path: str | os.PathLike[str] | None = None, *,
                errors: list[ConfigError] | None = None) -> Config:
    """Find, read and validate the configuration (see the module docstring for the order and
    for ``errors``). A file that is missing or not TOML raises in any case."""
    from_env = path is None and bool(os.environ.get(CONFIG_ENV))
    if from_env:
        path = os.environ[CONFIG_ENV]
    if path is None and Path(DEFAULT_FILE).is_file():
        path = DEFAULT_FILE
    if path is None:
        data: dict[str, Any] = {}
        text, file, base = "", None, Path.cwd()
    else:
        file = Path(path).expanduser().absolute()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object[:exc.start].count(b"\n") + 1
            raise ConfigError(f"{file}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}"
                              "); TOML files are UTF-8") from None
        except FileNotFoundError:
            named = f" (named by ${CONFIG_ENV})" if from_env else ""
            raise ConfigError(f"config file {file}{named} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {file} cannot be read: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        base = file.parent
    return _build(data, file, text, base, errors)


def _report(errors: list[ConfigError] | None, message: str) -> None:
    """Raise the error, or note it when every error is collected."""
    if errors is None:
        raise ConfigError(message)
    errors.append(ConfigError(message))


def _build(data: dict[str, Any], file: Path | None, text: str, base: Path,
           errors: list[ConfigError] | None = None) -> Config:
    probe = Config(path=file, state_dir=base, backend="", sections={}, backend_tables={}, text=text)
    allowed = {"state_dir", *SECTIONS}
    for key in data:
        if key not in allowed:
            _report(errors, f"{probe.where((key,))}: unknown key{_suggest(key, allowed)}")
    state_dir = data.get("state_dir")
    if state_dir is not None and not isinstance(state_dir, str):
        _report(errors, f"{probe.where(('state_dir',))}: expected a string (a directory path)")
        state_dir = None
    backend_table = data.get("backend", {})
    if not isinstance(backend_table, dict):
        _report(errors, f"{probe.where(('backend',))}: expected a table ([backend] with "
                        f"name = \"local\"), got {_kind(backend_table)}")
        backend_table = {}
    backend_table = dict(backend_table)
    backend_tables = {k: v for k, v in backend_table.items() if isinstance(v, dict)}
    for name in list(backend_tables):
        del backend_table[name]
        if not _BACKEND_NAME.fullmatch(name):
            _report(errors, f"{probe.where(('backend', name), is_table=True)}: a backend name "
                            "is 1-64 letters, digits, '_', '.' or '-'")
            del backend_tables[name]
    sections: dict[str, Any] = {}
    for name, section_type in SECTIONS.items():
        table = backend_table if name == "backend" else data.get(name, {})
        if not isinstance(table, dict):
            _report(errors, f"{probe.where((name,))}: expected a table")
            table = {}
        sections[name] = validate(section_type, table, (name,), probe, errors)
    backend = os.environ.get(BACKEND_ENV) or sections["backend"].name
    origin = f"${BACKEND_ENV}" if os.environ.get(BACKEND_ENV) else probe.where(("backend", "name"))
    return Config(
        path=file,
        state_dir=(base / Path(state_dir).expanduser()).resolve() if state_dir
        else default_state_dir(),
        backend=backend,
        sections=sections,
        backend_tables=backend_tables,
        text=text,
        backend_origin=origin,
    )


def validate(
    options_type: type[T], table: Mapping[str, Any], where: tuple[str, ...], config: Config,
    errors: list[ConfigError] | None = None,
) -> T:
    """Build ``options_type`` (a dataclass) from a TOML table, checking names and types.

    Supported field types: str, int, float, bool, Path, list[X], dict[str, X], X | None,
    Literal[...]. The dataclass's ``__post_init__`` may raise OptionError (the message then
    points at that key's line) or ValueError (at the table's) for bad values. With
    ``errors``, every bad key is noted there and left at its default; a value refused by
    ``__post_init__`` is noted and the defaults are returned.
    """
    hints = typing.get_type_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type) if f.init}  # type: ignore[arg-type]
    values = {}
    for key, value in table.items():
        keys = (*where, key)
        try:
            if key not in fields:
                raise ConfigError(f"{config.where(keys)}: unknown key{_suggest(key, fields)}")
            values[key] = _convert(value, hints[key], keys, config)
        except ConfigError as exc:
            if errors is None:
                raise
            errors.append(exc)
    try:
        return options_type(**values)
    except OptionError as exc:
        _report(errors, f"{config.where((*where, exc.key))}: {exc}")
    except ValueError as exc:
        _report(errors, f"{config.where(where, is_table=True)}: {exc}")
    return options_type()


def _convert(value: Any, hint: Any, keys: tuple[str, ...], config: Config) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, keys, config)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{config.where(keys)}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{config.where(keys)}: expected a list, got {_kind(value)}")
        converted = [_convert(v, args[0], keys, config) for v in value]
        return converted if origin is list else tuple(converted)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{config.where(keys)}: expected a table, got {_kind(value)}")
        inner = args[1] if args else Any
        return {k: _convert(v, inner, (*keys, k), config) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{config.where(keys)}: expected a finite number, got {value!r}")
    if hint is Path and isinstance(value, str):
        base = config.path.parent if config.path else Path.cwd()
        return (base / Path(value).expanduser()).resolve()
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(
            f"{config.where(keys)}: expected {_TYPE_NAMES.get(hint, hint.__name__)}, "
            f"got {_kind(value)} {value!r}"
        )
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               Path: "a path string"}


def _kind(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f" {key!r}{hint}; known keys: {', '.join(names)}"


_TABLE_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_BARE_OR_QUOTED = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY_RE = re.compile(rf"^\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(_BARE_OR_QUOTED, text)
    return tuple(p.strip("\"'") for p in parts)


def locate_key(text: str, keys: tuple[str, ...]) -> int | None:
    """The 1-based line of ``keys`` (a table path plus key) in TOML text, else of its table,
    else of the first table or dotted key below it (``[bakend.local]`` for ``bakend``)."""
    table: tuple[str, ...] = ()
    table_line = below_line = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _TABLE_RE.match(line)
        if match:
            table = _split_dotted(match.group(1))
            if table == keys:
                return number
            if table == keys[: len(table)] and table:
                table_line = number
            elif table[: len(keys)] == keys and below_line is None:
                below_line = number
            continue
        match = _KEY_RE.match(line)
        if match:
            path = (*table, *_split_dotted(match.group(1)))
            if path == keys:
                return number
            if path[: len(keys)] == keys and below_line is None:
                below_line = number
    return table_line if table_line is not None else below_line
