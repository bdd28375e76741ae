"""Writers for the runtimes users deploy on: GGUF for llama.cpp (and ollama, LM Studio,
llama-cpp-python, which read the same files).

``export_gguf(source_folder, "model.gguf", type="q4_k")`` is the entry point; see
`swiss_knife.export.gguf` for the types and the per-tensor rules.
"""

from __future__ import annotations

from swiss_knife.export.errors import (
    ArchitectureNotExportableError,
    GGUFExportError,
    GridNotRepresentableError,
    OutputFileExistsError,
)
from swiss_knife.export.gguf import export_gguf
from swiss_knife.export.gguf_arch import SUPPORTED_TEXT as SUPPORTED_ARCHITECTURES
from swiss_knife.export.gguf_blocks import EXPORT_TYPES, GGUF_TYPES, ExportType, GGUFType

__all__ = [
    "EXPORT_TYPES",
    "GGUF_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "ArchitectureNotExportableError",
    "ExportType",
    "GGUFExportError",
    "GGUFType",
    "GridNotRepresentableError",
    "OutputFileExistsError",
    "export_gguf",
]
