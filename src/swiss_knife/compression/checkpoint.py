"""Write a compressed-tensors checkpoint: ``config.json`` with its ``quantization_config``
block, ``generation_config.json``, and the tensors as ``model.safetensors``.

Shared by the two layouts this project writes in that format, quantized ``pack-quantized``
(`quantization/compressed_tensors_format.py`) and pruned ``sparse-bitmask``
(`pruning/sparse_format.py`), which build their own tensors and config block and hand them here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "compressed-tensors"
WEIGHTS_NAME = "model.safetensors"


def tied_duplicates(model: nn.Module, state: Mapping[str, Tensor]) -> set[str]:
    """Names to drop because they share storage with another entry (tied embeddings):
    safetensors refuses shared tensors, and transformers re-ties them on load."""
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        seen.setdefault(key, []).append(name)
    drop: set[str] = set()
    for names in seen.values():
        if len(names) > 1:
            keep = next((n for n in names if n not in tied_targets), names[0])
            drop.update(n for n in names if n != keep)
    return drop


def write_checkpoint(
    model: PreTrainedModel,
    quantization_config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    directory: str | Path,
) -> Path:
    """Write ``config.json`` carrying `quantization_config`, ``generation_config.json`` if the
    model has one, and `tensors` as ``model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: Any = copy.deepcopy(model.config)
    config.quantization_config = dict(quantization_config)
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    save_file(dict(tensors), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


__all__ = ["QUANT_METHOD", "WEIGHTS_NAME", "tied_duplicates", "write_checkpoint"]
