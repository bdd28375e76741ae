"""The GGUF export as a registered method: its config, and how the command line, recipes and the
Python API run it. The file format work lives in `swiss_knife.export.gguf`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from swiss_knife import registry
from swiss_knife.config import Flag, StrictModel
from swiss_knife.export.gguf_blocks import EXPORT_TYPES, ExportType


class GGUFExportConfig(StrictModel):
    """Write a GGUF file for llama.cpp (and ollama, LM Studio, llama-cpp-python)."""

    format: Literal["gguf"] = Field(default="gguf", description="File format to write.")
    tensor_type: Annotated[ExportType, Flag(name="--type", metavar="TYPE")] = Field(
        default="q8_0",
        description="Type of the weight matrices: a float type, a llama.cpp block type, or "
        "auto to keep the model's own grid (a GPTQ/AWQ/RTN/HQQ 4-, 5- or 8-bit grid in groups "
        "of 32 is copied without re-rounding)",
    )
    type_overrides: Annotated[
        dict[str, str], Flag(name="--type-override", metavar="PATTERN=TYPE")
    ] = Field(
        default_factory=dict,
        description="Per-weight types: a module name or re:regex, and the type its weights get "
        "(repeatable)",
    )
    file_name: Annotated[str, Flag(skip=True)] = Field(
        default="model.gguf", description="Name of the GGUF file in a recipe stage's folder."
    )

    @field_validator("type_overrides")
    @classmethod
    def _known_types(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {pattern: kind for pattern, kind in value.items() if kind.lower() not in EXPORT_TYPES}
        if bad:
            pattern, kind = next(iter(bad.items()))
            raise ValueError(
                f"unknown type {kind!r} for {pattern!r}; types: {', '.join(EXPORT_TYPES)}"
            )
        return {pattern: kind.lower() for pattern, kind in value.items()}

    @field_validator("file_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if Path(value).name != value or not value.endswith(".gguf"):
            raise ValueError(f"file_name {value!r} must be a plain file name ending in .gguf")
        return value


@registry.register("export", "gguf", GGUFExportConfig, needs_calibration=False)
def export(
    source: str | Path,
    config: GGUFExportConfig,
    output_file: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Export the checkpoint folder `source` to `output_file` as `config` says; the report."""
    from swiss_knife.export.gguf import export_gguf

    return export_gguf(
        source,
        output_file,
        type=config.tensor_type,
        overrides=list(config.type_overrides.items()) or None,
        overwrite=overwrite,
        progress=progress or None,
    )
