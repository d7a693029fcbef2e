"""User-facing errors: one line that names the file, key or value and what was expected.

The CLI prints ``error: <message>`` for these and exits with status 2; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations


class FmbsegError(Exception):
    """An error caused by input, configuration or environment, not by a bug."""


class ConfigError(FmbsegError):
    """A params file or override that does not fit the typed configuration."""


class WeightsError(FmbsegError):
    """Model weights that cannot be found, downloaded, verified or loaded."""


class InputError(FmbsegError):
    """An input file (image, mask, table) that cannot be used."""
