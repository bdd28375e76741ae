"""Model size: parameter count, sparsity, bytes on disk and effective bits per weight.

Method
------
* ``num_params`` counts parameter elements once per storage: tied weights (e.g. an LM head that
  shares the input embedding matrix) are one tensor in memory and one on disk, so counting them
  twice would inflate the denominator of bits per weight. Buffers (rotary tables, quantization
  scales stored as buffers, ...) are not parameters and are excluded from the count, but they are
  included in ``in_memory_bytes``.
* ``nonzero_params`` uses ``torch.count_nonzero``; ``sparsity = 1 - nonzero / num_params`` is what
  unstructured pruning (e.g. Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023) changes.
  Zeros stored densely do not shrink the files, which is why disk size is reported separately.
* ``disk_bytes`` is the total size of the weight files of a saved model directory, and
  ``bits_per_weight = 8 * disk_bytes / num_params`` is the usual effective-bits figure for
  quantized checkpoints (it includes scales, zero points, headers and any unquantized tensors, so
  a "4-bit" model honestly reports somewhat more than 4).

Weight files are ``*.safetensors``, ``*.bin``, ``*.pt`` and ``*.gguf``. When a directory holds
more than one of these formats (e.g. both ``model.safetensors`` and ``pytorch_model.bin``), only the
format transformers would load is counted (safetensors first), since adding both would double the
size; a warning names the ignored files.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swiss_knife.errors import UserInputError
from swiss_knife.evaluation.memory import parameter_bytes

logger = logging.getLogger(__name__)

#: Weight-file suffixes in the order a loader would prefer them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class SizeResult:
    """Static size of a model in memory and (when a path is given) on disk."""

    num_params: int
    nonzero_params: int
    sparsity: float
    disk_bytes: int | None
    weight_files: list[str] = field(default_factory=list)
    bits_per_weight: float | None = None
    in_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_files(path: str | Path) -> list[Path]:
    """Weight files of a model directory (sorted), or ``[path]`` if ``path`` is a weight file."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise UserInputError(
                f"{path} is not a weight file (expected one of {', '.join(WEIGHT_SUFFIXES)})"
            )
        return [path]
    if not path.is_dir():
        raise UserInputError(f"model path does not exist: {path}")
    by_suffix: dict[str, list[Path]] = {}
    for child in sorted(path.iterdir()):
        if child.is_file() and child.suffix in WEIGHT_SUFFIXES:
            by_suffix.setdefault(child.suffix, []).append(child)
    formats = [s for s in WEIGHT_SUFFIXES if s in by_suffix]
    if not formats:
        return []
    chosen = by_suffix[formats[0]]
    ignored = [p.name for s in formats[1:] for p in by_suffix[s]]
    if ignored:
        logger.warning(
            "%s holds several weight formats; counting %s files only, ignoring %s",
            path,
            formats[0],
            ", ".join(ignored),
        )
    return chosen


def _unique_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters of ``model``, one per underlying storage (tied weights once)."""
    seen: set[tuple[str, int]] = set()
    unique: list[torch.Tensor] = []
    for param in model.parameters():
        ptr = param.data_ptr()
        # Meta/empty tensors all report data_ptr 0; they share nothing, so use identity.
        key = (str(param.device), ptr if ptr != 0 else -id(param))
        if key not in seen:
            seen.add(key)
            unique.append(param)
    return unique


def _count_nonzero(param: torch.Tensor) -> int:
    """Non-zeros of a parameter; quantized tensor subclasses (torchao) are counted dequantized."""
    try:
        return int(torch.count_nonzero(param))
    except NotImplementedError:
        dequantize = getattr(param, "dequantize", None)
        if callable(dequantize):
            return int(torch.count_nonzero(dequantize()))
        return param.numel()


def model_size(model: torch.nn.Module, path: str | Path | None = None) -> SizeResult:
    """Parameter count, sparsity and in-memory bytes of ``model``; disk size if ``path`` given."""
    from ..streaming import nonzero_count, stream_of

    params = _unique_parameters(model)
    num_params = sum(p.numel() for p in params)
    with torch.inference_mode():
        nonzero = sum(_count_nonzero(p) for p in params if p.device.type != "meta")
    if stream_of(model) is not None:  # weights not in memory: counted as they were read
        param_names = {id(p): n for n, p in model.named_parameters()}
        nonzero += sum(nonzero_count(model, param_names[id(p)], p) for p in params if p.is_meta)
    param_b, buffer_b = parameter_bytes(model)

    disk_bytes: int | None = None
    names: list[str] = []
    bits: float | None = None
    if path is not None:
        files = weight_files(path)
        if not files:
            raise UserInputError(
                f"no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) in {path}"
            )
        disk_bytes = sum(f.stat().st_size for f in files)
        names = [f.name for f in files]
        bits = 8 * disk_bytes / num_params if num_params else None

    return SizeResult(
        num_params=num_params,
        nonzero_params=nonzero,
        sparsity=1.0 - nonzero / num_params if num_params else 0.0,
        disk_bytes=disk_bytes,
        weight_files=names,
        bits_per_weight=bits,
        in_memory_bytes=param_b + buffer_b,
    )
