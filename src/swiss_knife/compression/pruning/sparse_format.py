"""Save pruned models in the compressed-tensors "sparse-bitmask" layout, and load them back.

The layout is the one compressed-tensors' ``BitmaskCompressor`` wrote and read up to version 0.14
(and llm-compressor with it): for each compressed module ``name`` (a pruned linear), the dense
``name.weight`` is replaced by

- ``name.compressed``: the non-zero values, 1-D, in the weight's dtype, row after row;
- ``name.bitmask``: uint8 ``(rows, ceil(cols / 8))``, bit ``j % 8`` (least significant first, as
  ``numpy.packbits(..., bitorder="little")``) of byte ``j // 8`` set where ``weight[r, j] != 0``;
- ``name.row_offsets``: int64 ``(rows,)``, where row ``r`` starts in ``compressed``;
- ``name.shape``: int64 ``[rows, cols]``,

and ``config.json`` carries ``quantization_config = {"quant_method": "compressed-tensors",
"sparsity_config": {"format": "sparse-bitmask", "global_sparsity", "sparsity_structure",
"targets", "ignore"}}``. On disk a weight at sparsity ``s`` takes ``(1 - s) x dtype size + 1/8``
bytes per weight instead of the dtype size: 0.53x at 50 % in fp32, 0.56x in bf16.

Loading, with the library versions this project pins (transformers 5.24, compressed-tensors 0.20):
**a plain ``AutoModelForCausalLM.from_pretrained`` cannot load this layout.** compressed-tensors
0.15 removed every sparse compressor (vllm-project/compressed-tensors#610; llm-compressor now
saves sparse models dense, llm-compressor#2452) and transformers raised its minimum to 0.15 and
dropped the ``sparsity_config`` path (huggingface/transformers#46342). transformers 5.24 then
ignores ``sparsity_config``, finds no ``weight`` for the compressed layers, initialises them
randomly and only warns. `load_sparse_bitmask` (and `swiss_knife.models.load_model`, which detects
the layout) decompresses the tensors and builds the model with ``from_pretrained(None,
config=..., state_dict=...)``, so the result is an ordinary dense transformers model equal to the
one saved. Older stacks (compressed-tensors <= 0.14 with a transformers of that era) decompress it
in ``from_pretrained`` themselves. Save with ``save_format: dense`` for a checkpoint that loads
anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from swiss_knife.compression.quantization.compressed_tensors_format import (
    QUANT_METHOD,
    tied_duplicates,
    write_checkpoint,
)
from swiss_knife.errors import ModelLoadError, UserInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SPARSE_FORMAT = "sparse-bitmask"
# The per-module tensor names the layout uses instead of `weight`.
PARTS = ("compressed", "bitmask", "row_offsets", "shape")

# ----------------------------------------------------------------------------- tensors


def pack_bitmask(nonzero: Tensor) -> Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8, least significant bit first."""
    rows, cols = nonzero.shape
    padded = -(-cols // 8) * 8
    bits = torch.nn.functional.pad(nonzero.to(torch.uint8), (0, padded - cols))  # (rows, padded)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=nonzero.device)
    packed = (bits.reshape(rows, padded // 8, 8) * weights).sum(dim=2, dtype=torch.int32)
    return packed.to(torch.uint8)  # (rows, padded / 8)


def unpack_bitmask(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `pack_bitmask`: (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (rows, bytes, 8)
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def bitmask_compress(weight: Tensor) -> dict[str, Tensor]:
    """The four tensors of one 2-D weight (keys without the module prefix), on the CPU."""
    if weight.ndim != 2:
        raise ValueError(f"bitmask compression takes 2-D weights, got {tuple(weight.shape)}")
    weight = weight.detach().cpu()
    nonzero = weight != 0  # (rows, cols)
    counts = nonzero.sum(dim=1)  # (rows,)
    return {
        "compressed": weight[nonzero].contiguous(),  # (nnz,) row-major order
        "bitmask": pack_bitmask(nonzero),
        "row_offsets": torch.cumsum(counts, 0) - counts,
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }


def bitmask_decompress(tensors: Mapping[str, Tensor]) -> Tensor:
    """Rebuild the dense weight from its `bitmask_compress` tensors."""
    rows, cols = (int(v) for v in tensors["shape"].tolist())
    nonzero = unpack_bitmask(tensors["bitmask"], cols)  # (rows, cols)
    values = tensors["compressed"]
    if int(nonzero.sum()) != values.numel():
        raise ModelLoadError(
            f"corrupt sparse-bitmask tensor: the bitmask marks {int(nonzero.sum())} weights but "
            f"{values.numel()} values are stored"
        )
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[nonzero] = values
    return dense


# ----------------------------------------------------------------------------- saving


def sparsity_config_dict(
    model: nn.Module, compressed: Iterable[str], *, structure: str = "unstructured"
) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for a sparsity-only checkpoint.

    Targets are the class names of the compressed modules; every other module of those classes
    (usually ``lm_head``) is listed in ``ignore``, as llm-compressor wrote it. ``global_sparsity``
    is the fraction of zeros over all the model's parameters.
    """
    names = set(compressed)
    modules = dict(model.named_modules())
    classes = sorted({type(modules[name]).__name__ for name in names})
    ignore = [
        name
        for name, module in modules.items()
        if type(module).__name__ in classes and name and name not in names
    ]
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    zeros = sum(p.numel() - int(torch.count_nonzero(p)) for p in params)
    return {
        "quant_method": QUANT_METHOD,
        "sparsity_config": {
            "format": SPARSE_FORMAT,
            "global_sparsity": zeros / max(total, 1),
            "sparsity_structure": structure,
            "targets": classes,
            "ignore": ignore,
        },
    }


def sparse_state_dict(model: nn.Module, compressed: Iterable[str]) -> dict[str, Tensor]:
    """The state dict with each listed module's ``weight`` replaced by its bitmask tensors;
    everything else unchanged (tied duplicates dropped), all on the CPU and contiguous."""
    state = dict(model.state_dict())
    for name in compressed:
        key = f"{name}.weight"
        if key not in state:
            raise UserInputError(f"{name}: no such module weight in the model")
        weight = state.pop(key)
        for part, tensor in bitmask_compress(weight).items():
            state[f"{name}.{part}"] = tensor
    for name in tied_duplicates(model, state):
        del state[name]
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def save_sparse_bitmask(
    model: PreTrainedModel,
    compressed: Iterable[str],
    directory: str | Path,
    *,
    structure: str = "unstructured",
) -> Path:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` with the
    listed modules' weights bitmask-compressed. Tokenizer files are the caller's."""
    names = list(compressed)
    if not names:
        raise UserInputError("nothing to compress: no module names given")
    tensors = sparse_state_dict(model, names)
    qconfig = sparsity_config_dict(model, names, structure=structure)
    return write_checkpoint(model, qconfig, tensors, directory)


# ----------------------------------------------------------------------------- loading


def is_sparse_bitmask_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory/config.json`` describes a sparsity-only sparse-bitmask checkpoint."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qconfig, dict) or qconfig.get("config_groups"):
        return False
    sparsity = qconfig.get("sparsity_config")
    return isinstance(sparsity, dict) and sparsity.get("format") == SPARSE_FORMAT


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [directory / name for name in sorted(set(shards))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no .safetensors weights")
    return files


def decompressed_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, with each module's bitmask tensors turned back into its
    dense ``weight``."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in _weight_files(Path(directory)):
        state.update(load_file(str(file)))
    prefixes = {key[: -len(".bitmask")] for key in state if key.endswith(".bitmask")}
    for prefix in sorted(prefixes):
        parts = {part: state.pop(f"{prefix}.{part}", None) for part in PARTS}
        missing = [part for part, tensor in parts.items() if tensor is None]
        if missing:
            raise ModelLoadError(f"{directory}: {prefix} lacks {', '.join(missing)}")
        state[f"{prefix}.weight"] = bitmask_decompress(
            {part: tensor for part, tensor in parts.items() if tensor is not None}
        )
    return state


def load_sparse_bitmask(directory: str | Path, **kwargs: Any) -> Any:
    """Load a sparse-bitmask checkpoint as an ordinary dense transformers model.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``, ``trust_remote_code``). The returned
    model carries no quantization config, so it saves as a plain dense checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not is_sparse_bitmask_checkpoint(directory):
        raise ModelLoadError(f"{directory} is not a compressed-tensors sparse-bitmask checkpoint")
    trust = bool(kwargs.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust)
    del config.quantization_config
    state = decompressed_state_dict(directory)
    try:
        # The concrete class: the Auto class refuses a state dict without a path to read.
        model_class: Any = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"{directory}: transformers has no causal LM class for {config.model_type!r}"
        ) from None
    options = {k: v for k, v in kwargs.items() if k not in ("use_safetensors", "weights_only")}
    model = model_class.from_pretrained(None, config=config, state_dict=state, **options)
    generation = directory / "generation_config.json"
    if generation.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


__all__ = [
    "SPARSE_FORMAT",
    "bitmask_compress",
    "bitmask_decompress",
    "decompressed_state_dict",
    "is_sparse_bitmask_checkpoint",
    "load_sparse_bitmask",
    "pack_bitmask",
    "save_sparse_bitmask",
    "sparse_state_dict",
    "sparsity_config_dict",
    "unpack_bitmask",
]
