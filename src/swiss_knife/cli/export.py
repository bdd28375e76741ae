"""swiss-knife export: a model folder to a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli_flags import collect, method_options
from ..errors import UserInputError
from .common import _print_json, _progress
from .validation import GivenFlags, _validate_stage


def _export_config(args: argparse.Namespace) -> Any:
    from ..export.method import GGUFExportConfig

    options = method_options("export")
    data: dict[str, Any] = {}
    given: GivenFlags = collect(args, options, data)
    pairs = [(o.flag, o.path[0]) for o in options]
    return _validate_stage(GGUFExportConfig, data, args, given, pairs, where="export options")


def _source_folder(model: str) -> Path:
    """The local checkpoint folder to export; a one-line error for anything else."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        raise UserInputError(f"{model} is already a GGUF file; export reads a model folder")
    if not path.is_dir():
        raise UserInputError(
            f"model folder {model} not found; export reads a local checkpoint folder (save a hub "
            "model first, e.g. with swiss-knife quantize --method fp16)"
        )
    return path


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.method import export

    config = _export_config(args)
    source = _source_folder(args.model)
    out = Path(args.output_file).expanduser()
    if out.exists() and not out.is_dir() and not args.overwrite:
        raise UserInputError(f"output file {out} exists; pass --overwrite to replace it")
    report = export(source, config, out, overwrite=args.overwrite, progress=_progress(args))
    if args.json:
        _print_json({k: v for k, v in report.items() if k != "tensors"})
        return 0
    types = ", ".join(f"{count} {kind}" for kind, count in report["tensor_types"].items())
    print(
        f"{report['architecture']} ({report['model_type']}), {report['parameters']:,} parameters, "
        f"{report['bits_per_weight']:.2f} bits per weight"
    )
    print(f"tensors: {types}")
    exact = len(report["exact_tensors"])
    if exact:
        print(f"{exact} tensors copied from the model's own grid without re-rounding")
    changes: dict[str, int] = {}
    for change in report["fallbacks"].values():
        changes[change] = changes.get(change, 0) + 1
    for change, count in changes.items():
        print(f"note: {count} tensors {change}: their rows do not fill whole blocks")
    print(f"{report['file_size'] / 1e6:.2f} MB, {report['seconds']:.1f} s")
    print(f"saved to {report['output_file']}")
    return 0
