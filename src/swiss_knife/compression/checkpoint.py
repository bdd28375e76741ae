"""Write a compressed-tensors checkpoint: ``config.json`` with its ``quantization_config``
block, ``generation_config.json``, and the tensors as ``model.safetensors``.

Shared by the two layouts this project writes in that format, quantized ``pack-quantized``
(`quantization/compressed_tensors_format.py`) and pruned ``sparse-bitmask``
(`pruning/sparse_format.py`), which build their own tensors and config block and hand them here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..streaming import stream_of

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
    stream = stream_of(model)
    if stream is not None:  # the blocks are written already: the rest, and the shard index
        stream.write_remaining(directory, tensors)
    else:
        save_file(dict(tensors), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def dense_writer(model: nn.Module) -> Callable[[Path], None]:
    """The outcome writer of a model that saves as an ordinary dense checkpoint."""

    def write(directory: Path) -> None:
        save_dense(model, directory)

    return write


def save_dense(model: nn.Module, directory: Path) -> None:
    """``model.save_pretrained(directory)``; for a streamed model, whose blocks are written
    already, the config, the generation config, the rest of the tensors and the shard index."""
    stream = stream_of(model)
    if stream is None:
        model.save_pretrained(directory)  # type: ignore[operator]
        return
    config: Any = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = stream.dtype  # what save_pretrained records: the weights' dtype
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(directory)
    stream.write_remaining(directory, model.state_dict())


__all__ = [
    "QUANT_METHOD",
    "WEIGHTS_NAME",
    "dense_writer",
    "save_dense",
    "tied_duplicates",
    "write_checkpoint",
]
