"""Exceptions a user of gridcouple may catch. Every message names what was wrong and where."""


class GridcoupleError(Exception):
    """Base of every error gridcouple raises on purpose."""


class ConfigError(GridcoupleError):
    """A configuration file or value is wrong; the message names the file, key and line."""


class BackendError(GridcoupleError):
    """A backend or the batch system behind it refused or failed a request."""


class JobNotFoundError(BackendError):
    """No job with that id is known to the journal or the batch system."""


class QueryUnavailableError(BackendError):
    """The batch system could not answer a status query right now (e.g. squeue timed out).

    Nothing is concluded about the jobs: ``wait`` retries with backoff instead of failing them.
    """
