"""Exceptions a user of gridcouple may catch. Every message names what was wrong and where."""


class GridcoupleError(Exception):
    """Base of every error gridcouple raises on purpose."""


class ConfigError(GridcoupleError):
    """A configuration file or value is wrong; the message names the file, key and line."""


class OptionError(ValueError):
    """A bad value of one option, raised by an options dataclass; ``key`` names the option so
    the config error can point at its line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class BackendError(GridcoupleError):
    """A backend or the batch system behind it refused or failed a request."""


class JobNotFoundError(BackendError):
    """No job with that id is known to the journal or the batch system."""


class QueryUnavailableError(BackendError):
    """The batch system could not answer a status query right now (e.g. squeue timed out).

    Nothing is concluded about the jobs: ``wait`` retries with backoff instead of failing them.
    """
