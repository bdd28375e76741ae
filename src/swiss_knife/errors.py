"""Exceptions that carry an exit code, so the CLI can print one line instead of a traceback.

`UserInputError` (exit 2) means the request itself is wrong: a missing path, a bad value, an
architecture a method does not support. Anything else derived from `SwissKnifeError` (exit 1) is a
failure while doing valid work.
"""

from __future__ import annotations


class SwissKnifeError(Exception):
    """Base class for errors that Swiss Knife raises on purpose."""

    exit_code = 1


class UserInputError(SwissKnifeError):
    """The input (path, option, recipe, data) is invalid; nothing was written."""

    exit_code = 2


class ConfigError(UserInputError):
    """A config or recipe failed validation; the message lists every problem."""


class DataError(UserInputError):
    """Text data is missing, empty, too short, or unreadable."""


class ModelLoadError(UserInputError):
    """A model could not be found or loaded."""


class UnsupportedArchitectureError(UserInputError):
    """The model's architecture is not in the table of supported architectures."""


class OutputExistsError(UserInputError):
    """The output directory exists and is not empty, or would overwrite the input."""


class MissingDependencyError(UserInputError):
    """An optional package needed for the requested feature is not installed."""
