"""Read the tensors of a local checkpoint for export: dense weights and packed integer grids.

A Swiss Knife output is one of:

- a plain checkpoint (fp32/fp16/bf16 safetensors, or a pickle ``.bin``), including pruned,
  structured-pruned and layer-reduced models, whose ``config.json`` already holds the new shapes;
- a compressed-tensors ``pack-quantized`` checkpoint (RTN, GPTQ, AWQ, HQQ): each quantized
  linear ``name`` stores ``name.weight_packed``, ``name.weight_scale``, optionally
  ``name.weight_zero_point`` and ``name.weight_shape`` (see `compressed_tensors_format`), and
  the grid (bits, symmetry, group size) comes from the ``config_groups`` of its
  ``quantization_config``. These are read as integers, so `auto` export can keep them;
- a compressed-tensors ``sparse-bitmask`` checkpoint (pruned, stored sparse): decompressed to
  dense weights by `sparse_format.decompressed_state_dict`;
- another compressed-tensors layout (e.g. the static int8 ``int-quantized``): loaded dense
  through `swiss_knife.models.load_model`, transformers doing the decompression.

A dense checkpoint quantized on a llama.cpp K grid (``grid: gguf:q4_k``, see
`compression.quantization.gguf_grid`) also holds ``gguf-grid.safetensors``: the GGUF block bytes
of each quantized linear. Its weights are listed with their ``gguf_type``, and
`Checkpoint.gguf_blocks` returns the bytes once they are checked to decode to the dense weight.

Tensors are read lazily, one at a time, from memory-mapped safetensors files, so exporting a
model needs about one tensor of extra memory beyond what the writer keeps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from swiss_knife.compression.quantization.compressed_tensors_format import unpack_weight
from swiss_knife.compression.quantization.gguf_grid import GRID_FILE, read_grid_types
from swiss_knife.compression.quantization.grid import QuantGrid, QuantizedWeight
from swiss_knife.errors import UserInputError
from swiss_knife.export.errors import GGUFExportError

FLOAT_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


@dataclass(frozen=True)
class SourceTensor:
    """One weight of the checkpoint as the exporter sees it.

    ``name`` is the Hugging Face tensor name (``model.layers.0.mlp.down_proj.weight``), ``shape``
    its logical torch shape, ``dtype`` the float dtype it is stored in (for a packed grid, the
    dtype of its scales), ``grid`` the integer grid of a packed weight, else None, and
    ``gguf_type`` the GGUF type of its block bytes in the K-grid sidecar, else None.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    grid: QuantGrid | None = None
    gguf_type: str | None = None


@dataclass
class Checkpoint:
    """The config and tensors of a local model folder, read on demand; close it when done."""

    directory: Path
    config: dict[str, Any]
    layout: str  # "dense", "pack-quantized", "sparse-bitmask" or another compressed-tensors format
    tensors: dict[str, SourceTensor]
    _read: Callable[[str], Tensor]
    _stack: ExitStack = field(default_factory=ExitStack)
    _raw_names: set[str] = field(default_factory=set)  # stored tensor names of a packed layout
    _blocks: Callable[[str], Tensor] | None = None  # K-grid sidecar reader, by module name

    def dense(self, name: str) -> NDArray[np.float32]:
        """The float32 values of tensor ``name`` (a packed grid is dequantized exactly as the
        compressed-tensors loader does, in its scale dtype, then widened)."""
        entry = self.tensors[name]
        weight = self.quantized(name).dequantize() if entry.grid is not None else self._read(name)
        return weight.detach().to(torch.float32).cpu().numpy()

    def quantized(self, name: str) -> QuantizedWeight:
        """The integer levels, scales and zero points of the packed weight ``name``."""
        entry = self.tensors[name]
        if entry.grid is None:
            raise KeyError(f"{name} is not a packed integer weight")
        module = name.removesuffix(".weight")
        parts = {
            suffix: self._read(f"{module}.{suffix}")
            for suffix in _PACKED_SUFFIXES
            if f"{module}.{suffix}" in self._raw_names
        }
        return unpack_weight(parts, entry.grid)

    def gguf_blocks(self, name: str) -> NDArray[np.uint8]:
        """The GGUF bytes ``(rows, bytes per row)`` of the K-grid weight ``name``, checked to
        decode to exactly its dense values (in their stored dtype): a weight changed after it
        was quantized is refused rather than exported stale."""
        from swiss_knife.export.gguf_blocks import decode, encoded_nbytes

        entry = self.tensors[name]
        kind = entry.gguf_type
        if kind is None or self._blocks is None:
            raise KeyError(f"{name} has no GGUF blocks")
        blocks = self._blocks(name.removesuffix(".weight")).numpy()
        rows = entry.shape[0]
        if blocks.dtype != np.uint8 or blocks.size != encoded_nbytes(kind, entry.shape):
            raise GGUFExportError(
                f"{name}: its {GRID_FILE} entry is not {kind} blocks of shape {list(entry.shape)}"
            )
        blocks = blocks.reshape(rows, -1)
        decoded = torch.from_numpy(decode(blocks, kind).reshape(entry.shape))
        stored = self._read(name)
        if not torch.equal(decoded.to(stored.dtype), stored):
            raise GGUFExportError(
                f"{name}: the weight no longer matches its {kind} blocks in {GRID_FILE} (was the "
                "model changed after quantizing?); export with an explicit --type instead"
            )
        return blocks

    def close(self) -> None:
        """Release the memory-mapped files."""
        self._stack.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, with a one-line error when it is missing or broken."""
    if not directory.is_dir():
        raise GGUFExportError(f"model folder not found: {directory}")
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GGUFExportError(f"{directory} is not a model folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise GGUFExportError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise GGUFExportError(f"{path} does not hold a JSON object")
    return config


def _safetensors_files(directory: Path, preferred: str = "model.safetensors") -> list[Path]:
    index = directory / f"{preferred}.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [directory / name for name in sorted(set(shards))]
    if (directory / preferred).is_file():
        return [directory / preferred]
    return sorted(directory.glob("*.safetensors"))


def _open_raw(
    directory: Path, stack: ExitStack
) -> tuple[dict[str, tuple[tuple[int, ...], str]], Callable[[str], Tensor]]:
    """Names -> (shape, dtype tag) of every stored tensor, and a reader for one of them."""
    files = [path for path in _safetensors_files(directory) if path.name != GRID_FILE]
    if files:
        from safetensors import safe_open

        where: dict[str, Any] = {}
        info: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = handle.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype())
                info[name] = (tuple(int(d) for d in piece.get_shape()), dtype)
                where[name] = handle

        def read(name: str) -> Tensor:
            tensor: Tensor = where[name].get_tensor(name)
            return tensor

        return info, read
    pickles = sorted(directory.glob("pytorch_model*.bin"))
    if not pickles:
        raise GGUFExportError(f"{directory} has no .safetensors or pytorch_model*.bin weights")
    state: dict[str, Tensor] = {}
    for path in pickles:
        state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return _state_info(state), state.__getitem__


def _state_info(state: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        name: (tuple(tensor.shape), FLOAT_DTYPES.get(tensor.dtype, str(tensor.dtype)))
        for name, tensor in state.items()
    }


def _group_grids(qconfig: dict[str, Any]) -> list[tuple[list[str], QuantGrid | str]]:
    """``(targets, grid)`` per config group; the grid is a reason string when unsupported."""
    groups: list[tuple[list[str], QuantGrid | str]] = []
    for key, group in (qconfig.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        targets = [str(t) for t in group.get("targets") or []]
        strategy = weights.get("strategy")
        if weights.get("type", "int") != "int" or strategy not in ("group", "channel"):
            groups.append((targets, f"group {key}: {weights.get('type')} weights, {strategy}"))
            continue
        groups.append(
            (
                targets,
                QuantGrid(
                    bits=int(weights["num_bits"]),
                    symmetric=bool(weights.get("symmetric", True)),
                    group_size=int(weights["group_size"]) if strategy == "group" else None,
                ),
            )
        )
    return groups


def _target_matches(module: str, target: str) -> bool:
    """compressed-tensors' rule for a packed linear: regex from the start, exact name, or the
    class name ``Linear`` (a packed weight is always an ``nn.Linear``)."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in (module, "Linear")


def _packed_grid(module: str, groups: list[tuple[list[str], QuantGrid | str]]) -> QuantGrid:
    found = [grid for targets, grid in groups if any(_target_matches(module, t) for t in targets)]
    grids = {str(grid) for grid in found}
    if len(grids) != 1:
        raise GGUFExportError(
            f"{module}: its quantization_config selects it in {len(found)} config groups "
            "with different grids; cannot tell how its integers were made"
        )
    grid = found[0]
    if isinstance(grid, str):
        raise GGUFExportError(f"{module}: unsupported packed weights ({grid})")
    return grid


def _read_packed(
    directory: Path, config: dict[str, Any], stack: ExitStack
) -> tuple[dict[str, SourceTensor], Callable[[str], Tensor], set[str]]:
    info, read = _open_raw(directory, stack)
    groups = _group_grids(config["quantization_config"])
    tensors: dict[str, SourceTensor] = {}
    packed_modules = [
        n.removesuffix(".weight_packed") for n in info if n.endswith(".weight_packed")
    ]
    for module in packed_modules:
        if f"{module}.weight_g_idx" in info:
            raise GGUFExportError(
                f"{module}: the checkpoint stores a weight_g_idx (GPTQ groups in activation "
                "order), which no GGUF block type and no export path here reads"
            )
        for needed in ("weight_scale", "weight_shape"):
            if f"{module}.{needed}" not in info:
                raise GGUFExportError(f"{module}: packed weight without its {needed}")
        grid = _packed_grid(module, groups)
        shape_tensor = read(f"{module}.weight_shape")
        shape = tuple(int(v) for v in shape_tensor.tolist())
        scale_dtype = info[f"{module}.weight_scale"][1]
        tensors[f"{module}.weight"] = SourceTensor(f"{module}.weight", shape, scale_dtype, grid)
    packed_parts = {f"{m}.{s}" for m in packed_modules for s in _PACKED_SUFFIXES}
    for name, (shape, dtype) in info.items():
        if name not in packed_parts:
            tensors[name] = SourceTensor(name, shape, dtype)
    return tensors, read, set(info)


def _attach_grid(
    directory: Path, tensors: dict[str, SourceTensor], stack: ExitStack
) -> Callable[[str], Tensor] | None:
    """Mark the weights the K-grid sidecar holds blocks for; the reader of those blocks."""
    path = directory / GRID_FILE
    if not path.is_file():
        return None
    try:
        types = read_grid_types(path)
    except UserInputError as exc:
        raise GGUFExportError(str(exc)) from None
    for module, kind in types.items():
        name = f"{module}.weight"
        entry = tensors.get(name)
        if entry is None or entry.grid is not None or len(entry.shape) != 2:
            raise GGUFExportError(
                f"{GRID_FILE} holds blocks for {module}, which has no dense 2-D weight here"
            )
        tensors[name] = SourceTensor(name, entry.shape, entry.dtype, gguf_type=kind)
    from safetensors import safe_open

    handle = stack.enter_context(safe_open(str(path), framework="pt"))

    def read(module: str) -> Tensor:
        tensor: Tensor = handle.get_tensor(module)
        return tensor

    return read


def _load_dense_via_transformers(directory: Path) -> dict[str, Tensor]:
    """Dense state dict of a checkpoint only transformers can decompress."""
    from swiss_knife.models import load_model

    loaded = load_model(str(directory), with_tokenizer=False, device="cpu")
    state = {name: tensor.detach() for name, tensor in loaded.model.state_dict().items()}
    return state


def open_checkpoint(directory: Path) -> Checkpoint:
    """Index the tensors of the model folder ``directory`` (see the module docstring)."""
    config = read_config(directory)
    qconfig = config.get("quantization_config")
    stack = ExitStack()
    raw: set[str] = set()
    layout = "dense"
    blocks = None
    try:
        if not qconfig:
            info, read = _open_raw(directory, stack)
            tensors = {name: SourceTensor(name, *entry) for name, entry in info.items()}
            blocks = _attach_grid(directory, tensors, stack)
            if blocks is not None:
                layout = "dense + gguf-grid"
        elif not isinstance(qconfig, dict) or qconfig.get("quant_method") != "compressed-tensors":
            method = qconfig.get("quant_method") if isinstance(qconfig, dict) else qconfig
            raise GGUFExportError(
                f"{directory} is a {method} checkpoint, which cannot be exported to GGUF; "
                "export the original model, or a Swiss Knife compressed-tensors output"
            )
        else:
            from swiss_knife.compression.pruning.sparse_format import (
                decompressed_state_dict,
                is_sparse_bitmask_checkpoint,
            )

            formats = {
                str(group.get("format") or qconfig.get("format"))
                for group in (qconfig.get("config_groups") or {}).values()
            }
            if is_sparse_bitmask_checkpoint(directory):
                layout = "sparse-bitmask"
                state = decompressed_state_dict(directory)
                tensors = {n: SourceTensor(n, *e) for n, e in _state_info(state).items()}
                read = state.__getitem__
            elif formats == {"pack-quantized"}:
                layout = "pack-quantized"
                tensors, read, raw = _read_packed(directory, config, stack)
            else:
                layout = ", ".join(sorted(formats)) or str(qconfig.get("format"))
                state = _load_dense_via_transformers(directory)
                tensors = {n: SourceTensor(n, *e) for n, e in _state_info(state).items()}
                read = state.__getitem__
    except BaseException:
        stack.close()
        raise
    return Checkpoint(directory, config, layout, tensors, read, stack, raw, blocks)


def iter_weights(checkpoint: Checkpoint) -> Iterator[SourceTensor]:
    """The float and packed weights, in file order, skipping integer bookkeeping tensors."""
    for entry in checkpoint.tensors.values():
        if entry.grid is not None or entry.dtype in ("f32", "f16", "bf16"):
            yield entry


__all__ = ["Checkpoint", "SourceTensor", "iter_weights", "open_checkpoint", "read_config"]
