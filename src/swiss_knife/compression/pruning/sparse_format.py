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
"version", "sparsity_config": {"format": "sparse-bitmask", "global_sparsity",
"sparsity_structure", "targets", "ignore", "registry_requires_subclass"}}``, the sparsity block
being compressed-tensors' own ``BitmaskConfig`` dumped as ``ModelCompressor`` wrote it. On disk a
weight at sparsity ``s`` takes ``(1 - s) x dtype size + 1/8`` bytes per weight instead of the
dtype size: 0.53x at 50 % in fp32, 0.56x in bf16.

**A plain ``AutoModelForCausalLM.from_pretrained`` cannot load this layout** with the versions
this project supports (transformers >= 5, which needs compressed-tensors >= 0.15).
compressed-tensors 0.15 removed every sparse compressor (only the ``BitmaskConfig`` class is left;
``ModelCompressor.update_config`` now writes ``"sparsity_config": {}``;
vllm-project/compressed-tensors#610, llm-compressor#2452) and transformers dropped its
``sparsity_config`` path with it (huggingface/transformers#46342): ``CompressedTensorsConfig``
swallows the block unread, finds no ``weight`` for the compressed layers, initialises them
randomly and only warns. No setting in ``config.json`` makes transformers decompress the tensors,
and none that keeps this a compressed-tensors config makes it refuse them. So the tensors go to ``sparse-bitmask.safetensors``, not ``model.safetensors``: a plain
``from_pretrained`` then fails with "no file named model.safetensors" instead of returning a model
with random layers (the name cannot be matched by a ``variant`` either, which would read
``model.<variant>.safetensors``). On a stack of the compressed-tensors <= 0.14 era, renaming the
file to ``model.safetensors`` gives exactly what llm-compressor wrote.

`load_sparse_bitmask` (and `swiss_knife.models.load_model`, which detects the layout from
``config.json``) decompresses the tensors and builds the model with ``from_pretrained(None,
config=..., state_dict=...)``, so the result is an ordinary dense transformers model equal to the
one saved; it also reads the checkpoints earlier versions wrote to ``model.safetensors``. Save with
``save_format: dense`` for a checkpoint that loads anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from swiss_knife.compression.checkpoint import (
    QUANT_METHOD,
    WEIGHTS_NAME,
    tied_duplicates,
    write_checkpoint,
)
from swiss_knife.errors import ModelLoadError, UserInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SPARSE_FORMAT = "sparse-bitmask"
# The per-module tensor names the layout uses instead of `weight`.
PARTS = ("compressed", "bitmask", "row_offsets", "shape")
# Not `model.safetensors`: transformers would load that and leave the compressed layers random.
SPARSE_WEIGHTS_NAME = "sparse-bitmask.safetensors"

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
    is the fraction of zeros over all the model's parameters. The ``sparsity_config`` block is
    compressed-tensors' own ``BitmaskConfig``, validated and dumped by it.
    """
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig

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
    sparsity = BitmaskConfig(
        global_sparsity=zeros / max(total, 1),
        sparsity_structure=structure,
        targets=classes,
        ignore=ignore,
    )
    assert sparsity.format == SPARSE_FORMAT
    return {
        "quant_method": QUANT_METHOD,
        "version": compressed_tensors.__version__,
        "sparsity_config": sparsity.model_dump(),
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
    """Write ``config.json``, ``generation_config.json`` and ``sparse-bitmask.safetensors`` with
    the listed modules' weights bitmask-compressed. Tokenizer files are the caller's.

    The weights are deliberately not in ``model.safetensors`` (module docstring): a plain
    ``from_pretrained`` must fail on this folder rather than load random layers from it.
    """
    names = list(compressed)
    if not names:
        raise UserInputError("nothing to compress: no module names given")
    tensors = sparse_state_dict(model, names)
    qconfig = sparsity_config_dict(model, names, structure=structure)
    directory = write_checkpoint(model, qconfig, tensors, directory)
    (directory / WEIGHTS_NAME).replace(directory / SPARSE_WEIGHTS_NAME)
    return directory


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
    if (directory / SPARSE_WEIGHTS_NAME).is_file():
        return [directory / SPARSE_WEIGHTS_NAME]
    # Checkpoints written before the rename, and llm-compressor's, use the usual names.
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
    "SPARSE_WEIGHTS_NAME",
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
