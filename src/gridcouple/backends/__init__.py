"""Backends: one per batch system, all behind :class:`gridcouple.backends.base.Backend`.

Backends are found through the entry-point group ``gridcouple.backends`` (the built-in ones
register the same way), so a third party adds PBS without touching this package.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from gridcouple.backends.base import Backend
from gridcouple.config import Config, load_config
from gridcouple.errors import ConfigError

GROUP = "gridcouple.backends"


def backend_names() -> list[str]:
    """The names of the installed backends."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def backend_class(name: str, config: Config | None = None) -> type[Backend]:
    """The class of backend ``name``: its ``type`` in the config, else the kind called
    ``name``; a clear error when it is not installed."""
    kind, where = config.backend_kind(name) if config else (name, "")
    where = f"{where}: " if where else ""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == kind]
    if not found:
        raise ConfigError(f"{where}backend {kind!r} is not installed; installed: "
                          f"{', '.join(backend_names()) or 'none'}")
    try:
        cls = found[0].load()
    except ImportError as exc:
        raise ConfigError(f"{where}backend {kind!r} cannot be loaded: {exc} (install "
                          f"gridcouple[{kind}]?)") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"{where}entry point {kind!r} is not a gridcouple Backend")
    return cls


def open_backend(config: Config | None = None, name: str | None = None) -> Backend:
    """The configured backend (or the one named ``name``), with its options validated from
    its ``[backend.NAME]`` table."""
    config = config or load_config()
    name = name or config.backend
    cls = backend_class(name, config)
    options: object = config.backend_options(name, cls.Options)  # an instance of cls.Options
    site = config.site(name)
    return cls(options, state_dir=site.state_dir or config.state_dir, name=name,
               python=site.python)


def check_config(config: Config) -> list[str]:
    """Validate every backend table in the config; returns the backend names checked."""
    names = sorted({config.backend, *config.backend_tables})
    for name in names:
        cls = backend_class(name, config)
        config.backend_options(name, cls.Options)
        config.site(name)
    return names


__all__ = ["Backend", "backend_class", "backend_names", "check_config", "open_backend"]
