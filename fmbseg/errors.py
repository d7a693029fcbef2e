"""User-facing errors: one line that names the file, key or value and what was expected.

The CLI prints ``error: <message>`` for these and exits with their ``exit_code``: 2 for bad
input or configuration (running it again cannot help), 3 for a service that does not answer
(running it again once it does can succeed). Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
UNAVAILABLE_EXIT = 3


class FmbsegError(Exception):
    """An error caused by input, configuration or environment, not by a bug."""

    exit_code = USER_ERROR_EXIT


class UnavailableError(FmbsegError):
    """A service the command needs (an MLflow tracking server) does not answer."""

    exit_code = UNAVAILABLE_EXIT


class ConfigError(FmbsegError):
    """A params file or override that does not fit the typed configuration."""


class WeightsError(FmbsegError):
    """Model weights that cannot be found, downloaded, verified or loaded."""


class InputError(FmbsegError):
    """An input file (image, mask, table) that cannot be used."""
