"""Errors of the GGUF exporter: every one is a one-line `UserInputError` (exit code 2) that is
also a `ValueError`, so library callers can catch it either way."""

from __future__ import annotations

from swiss_knife.errors import OutputExistsError, UnsupportedArchitectureError, UserInputError


class GGUFExportError(UserInputError, ValueError):
    """The export request cannot be honoured; nothing was written."""


class GridNotRepresentableError(GGUFExportError):
    """Under ``type="auto"`` a quantized tensor's grid has no GGUF block type that holds it."""


class ArchitectureNotExportableError(GGUFExportError, UnsupportedArchitectureError):
    """The model's architecture (or one of its settings) has no GGUF/llama.cpp equivalent here."""


class OutputFileExistsError(GGUFExportError, OutputExistsError):
    """The output file exists and overwriting was not asked for."""


__all__ = [
    "ArchitectureNotExportableError",
    "GGUFExportError",
    "GridNotRepresentableError",
    "OutputFileExistsError",
]
