"""Save integer weight-only quantized models as compressed-tensors "pack-quantized" checkpoints.

compressed-tensors (https://github.com/vllm-project/compressed-tensors) is the checkpoint format
of llm-compressor: transformers loads it with ``AutoModelForCausalLM.from_pretrained`` when the
``compressed-tensors`` package is installed, and vLLM serves it (its W4A16/W8A16 kernels take 4-
and 8-bit weights). This module writes the format directly from `QuantizedWeight`s, without
importing compressed-tensors; the layout mirrors ``compressors/pack_quantized/`` (0.18 to 0.20):

For each quantized ``nn.Linear`` called ``name``, ``name.weight`` is replaced by

- ``name.weight_packed`` int32 ``(out, ceil(in * bits / 32))``: the signed levels ``q`` are
  offset to ``q + 2^(bits-1)`` (unsigned) and packed densely along the input dimension, element
  ``i`` of a row occupying bits ``[i * bits, (i + 1) * bits)`` of the row's little-endian stream of
  32-bit words. For 2, 4 and 8 bits this is also the layout of compressed-tensors < 0.18; 3, 5, 6
  and 7 bits need compressed-tensors >= 0.18 to load (and vLLM has kernels for 4 and 8 bits only).
- ``name.weight_scale`` ``(out, in / group_size)`` (``(out, 1)`` per channel) in the weight's dtype.
- ``name.weight_zero_point`` (asymmetric grids only): the ``(out, n_groups)`` zero-point levels,
  packed the same way along the OUTPUT dimension: int32 ``(ceil(out * bits / 32), n_groups)``.
- ``name.weight_shape`` int64 ``[out, in]``.

and ``config.json`` gets a ``quantization_config`` block: ``quant_method: compressed-tensors``,
``format: pack-quantized``, ``quantization_status: compressed``, the ``config_groups`` (which
modules get which grid: class names such as ``Linear``, exact module names, or ``re:`` regexes,
minus the ``ignore`` list) and ``ignore``.

Loading dequantizes ``(q - zero) * scale`` in the scale's dtype, as `QuantizedWeight.dequantize`
does, so a reloaded model computes with exactly the weights that were evaluated before saving
(the tests compare them bit for bit). What transformers 5.24 does with these checkpoints:

- symmetric grids load with a plain ``AutoModelForCausalLM.from_pretrained(dir)``: the packed
  tensors stay packed and compressed-tensors decompresses them to dense weights at the first
  forward pass (on CPU there are no int4 kernels, so the forward runs dense in the model dtype);
- a single asymmetric grid loads with ``quantization_config=CompressedTensorsConfig(
  dequantize=True)`` (what `load_compressed` passes), which decompresses while loading. The
  plain path fails with a size mismatch on ``weight_zero_point`` under compressed-tensors 0.18
  to 0.20: when it builds the packed module layout on the meta device it leaves the zero point
  unpacked, whereas every writer (llm-compressor, this module) packs it and vLLM reads it
  packed. compressed-tensors 0.15 to 0.17 load it on both paths (but only 2, 4 and 8 bits);
- several grids (config groups) load on the plain path only, since the dequantize-on-load path
  applies one scheme to every dense layer; hence a mix that includes an asymmetric grid cannot be
  loaded at all, and `save_compressed` refuses it (`check_loadable`).

Not representable, so refused here: group sizes that do not divide a layer's width, and GPTQ
activation order with groups fitted on the fly (a non-trivial ``g_idx``; use ``static_groups``,
the compressed-tensors ``actorder="weight"`` form). `plan_grids` finds all of these, and every
grid the loader would refuse, from the model's shapes before a method does any work.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
from torch import Tensor

from swiss_knife.compression.checkpoint import QUANT_METHOD, tied_duplicates, write_checkpoint
from swiss_knife.compression.quantization.grid import (
    QuantGrid,
    QuantizedWeight,
    fitting_group_sizes,
)
from swiss_knife.errors import MissingDependencyError, UserInputError
from swiss_knife.targeting import TargetSpec, resolve_linear_targets, resolve_overrides

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT = "pack-quantized"

ConfigGroup = tuple[Sequence[str], QuantGrid]


# ----------------------------------------------------------------------------- bit packing


def pack_int32(levels: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack signed ``bits``-bit levels (int8, 2-D) densely into int32 along ``dim`` (0 or 1)."""
    if levels.ndim != 2 or dim not in (0, 1):
        raise ValueError("pack_int32 packs 2-D tensors along dim 0 or 1")
    offset = 1 << (bits - 1)
    # int64 arithmetic: shifted values never overflow; the words are cut to 32 bits at the end.
    values = levels.to(torch.int64) + offset  # (rows, cols), in [0, 2^bits)
    if dim == 0:
        values = values.T
    rows, cols = values.shape
    packed_cols = math.ceil(cols * bits / 32)
    # 32 elements fill exactly `bits` words, so pad to a multiple of 32 and work per 32-chunk.
    padded = math.ceil(cols / 32) * 32
    values = torch.nn.functional.pad(values, (0, padded - cols)).reshape(rows, padded // 32, 32)
    start = torch.arange(32, device=values.device) * bits  # (32,) bit offset of each element
    word, shift = start // 32, start % 32
    words = torch.zeros(rows, padded // 32, bits, dtype=torch.int64, device=values.device)
    words.scatter_add_(2, word.expand_as(values), values << shift)
    # Elements that straddle a word boundary put their high bits into the next word.
    spill = shift + bits > 32  # (32,)
    if bool(spill.any()):
        high = values[..., spill] >> (32 - shift[spill])
        words.scatter_add_(2, (word[spill] + 1).expand_as(high), high)
    words = words.reshape(rows, -1)[:, :packed_cols] & 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return (words.T if dim == 0 else words).contiguous()


def unpack_int32(packed: Tensor, bits: int, length: int, dim: int = 1) -> Tensor:
    """Inverse of `pack_int32`: the ``length`` signed levels along ``dim``, as int8."""
    if packed.ndim != 2 or dim not in (0, 1):
        raise ValueError("unpack_int32 unpacks 2-D tensors along dim 0 or 1")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        words = words.T
    rows = words.shape[0]
    start = torch.arange(length, device=words.device) * bits  # (length,)
    word, shift = start // 32, start % 32
    # Read two adjacent words as one 64-bit value so straddling elements need no special case.
    padded = torch.nn.functional.pad(words, (0, 1))
    pair = padded[:, word] | (padded[:, word + 1] << 32)  # (rows, length)
    values = (pair >> shift) & ((1 << bits) - 1)
    levels = (values - (1 << (bits - 1))).to(torch.int8).reshape(rows, length)
    return (levels.T if dim == 0 else levels).contiguous()


# ----------------------------------------------------------------------------- config


def _weights_args(grid: QuantGrid, actorder: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "strategy": "channel" if grid.group_size is None else "group",
        "group_size": grid.group_size,
        "dynamic": False,
    }
    if actorder:
        # "weight": columns were processed in activation order during GPTQ, but the groups stay
        # contiguous, so the stored layout is the plain one (no g_idx).
        args["actorder"] = "weight"
    return args


def quantization_config_dict(
    groups: Sequence[ConfigGroup], ignore: Iterable[str] = (), *, actorder: bool = False
) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for weight-only integer groups.

    Args:
        groups: ``(targets, grid)`` pairs; targets are module class names (``"Linear"``), exact
            module names, or ``"re:"`` regexes matched from the start of the module name.
        ignore: modules the targets match that stay unquantized (same syntax), e.g. ``lm_head``.
        actorder: record ``actorder: "weight"`` (GPTQ with activation order, static groups).
    """
    if not groups:
        raise UserInputError("a compressed-tensors config needs at least one config group")
    config_groups: dict[str, Any] = {}
    for index, (targets, grid) in enumerate(groups):
        if isinstance(targets, str) or not targets:
            raise UserInputError(f"config group {index}: targets must be a non-empty list")
        config_groups[f"group_{index}"] = {
            "targets": list(targets),
            "weights": _weights_args(grid, actorder),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' rule (``utils/match.py``): regex, exact name, or a class in the MRO."""
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    if target == name:
        return True
    return any(cls.__name__ == target for cls in type(module).__mro__)


def infer_config_groups(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight]
) -> tuple[list[ConfigGroup], list[str]]:
    """Config groups and ignore list that select exactly the modules in ``quantized``.

    One grid: ``(["Linear"], grid)`` and every other ``nn.Linear`` (usually ``lm_head``) ignored,
    the form llm-compressor writes. Several grids: one group per grid listing its module names.
    """
    if not quantized:
        raise UserInputError("nothing to save: no quantized weights given")
    by_grid: dict[QuantGrid, list[str]] = {}
    for name, qw in quantized.items():
        by_grid.setdefault(qw.grid, []).append(name)
    if len(by_grid) == 1:
        grid = next(iter(by_grid))
        ignore = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in quantized
        ]
        return [(["Linear"], grid)], ignore
    groups: list[ConfigGroup] = [(sorted(names), grid) for grid, names in by_grid.items()]
    return groups, []


def check_config_covers(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    groups: Sequence[ConfigGroup],
    ignore: Iterable[str],
) -> None:
    """Raise `UserInputError` unless the config selects exactly the quantized modules, each once,
    with its own grid: the loader creates packed parameters for every module a group selects, so
    a mismatch would leave weights uninitialised or unused."""
    ignore = list(ignore)
    problems: list[str] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name == "" or not isinstance(weight, Tensor):
            continue
        if any(_matches(name, module, target) for target in ignore):
            selected: list[QuantGrid] = []
        else:
            selected = [
                grid for targets, grid in groups if any(_matches(name, module, t) for t in targets)
            ]
        if name in quantized:
            if len(selected) != 1:
                problems.append(f"{name}: quantized but selected by {len(selected)} config groups")
            elif selected[0] != quantized[name].grid:
                problems.append(
                    f"{name}: quantized with {quantized[name].grid} but its config group says "
                    f"{selected[0]}"
                )
        elif selected:
            problems.append(f"{name}: selected by a config group but not quantized")
    missing = sorted(set(quantized) - {name for name, _ in model.named_modules()})
    problems += [f"{name}: no such module in the model" for name in missing]
    if problems:
        raise UserInputError(
            "compressed-tensors config does not match the model: " + "; ".join(problems)
        )


# ----------------------------------------------------------------------------- tensors


def pack_weight(qw: QuantizedWeight, scale_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The pack-quantized tensors of one module (keys without the module prefix)."""
    if qw.g_idx is not None:
        raise UserInputError(
            "this weight was quantized with GPTQ activation order and groups fitted on the fly "
            "(a g_idx), which compressed-tensors' pack-quantized loader cannot represent; "
            "quantize with static_groups=True (actorder 'weight') or per-channel scales"
        )
    bits = qw.grid.bits
    scale = qw.scale if scale_dtype is None else qw.scale.to(scale_dtype)
    tensors = {
        "weight_packed": pack_int32(qw.q, bits, dim=1),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.zero is not None:
        tensors["weight_zero_point"] = pack_int32(qw.zero, bits, dim=0)
    return tensors


def unpack_weight(tensors: Mapping[str, Tensor], grid: QuantGrid) -> QuantizedWeight:
    """Read one module's pack-quantized tensors (keys without prefix) back into a weight."""
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    bits = grid.bits
    q = unpack_int32(tensors["weight_packed"], bits, in_features, dim=1)
    zero = None
    if not grid.symmetric:
        zero = unpack_int32(tensors["weight_zero_point"], bits, out_features, dim=0)
    return QuantizedWeight(q=q, scale=tensors["weight_scale"], zero=zero, grid=grid)


def stream_packed(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """On a streamed model each finished block is written packed, and its integers dropped
    (`quantized` is filled by the method as it walks); nothing for a model in memory."""
    from swiss_knife.streaming import save_as

    def release(prefix: str) -> None:
        for name in [n for n in quantized if n.startswith(prefix)]:
            quantized[name] = quantized[name].to("meta")

    save_as(model, lambda: pack_state_dict(model, quantized), release)


def pack_state_dict(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight]
) -> dict[str, Tensor]:
    """The model's state dict with every quantized module's ``weight`` replaced by its packed
    tensors; every other tensor unchanged (tied duplicates dropped), all on the CPU.

    Scales are stored in the module weight's dtype, the dtype compressed-tensors gives them on
    load. Quantize with that ``scale_dtype`` (the default when ``W`` is the module's weight) so
    the reloaded weights equal `QuantizedWeight.dequantize` exactly; other scales are cast.
    """
    state = dict(model.state_dict())
    for name, qw in quantized.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise UserInputError(
                f"{name}: only nn.Linear weights can be exported as pack-quantized, got "
                f"{type(module).__name__}"
            )
        if tuple(module.weight.shape) != qw.shape:
            raise UserInputError(
                f"{name}: quantized shape {qw.shape} differs from the weight's "
                f"{tuple(module.weight.shape)}"
            )
        del state[f"{name}.weight"]
        if qw.q.is_meta:  # a streamed block written already
            continue
        for key, tensor in pack_weight(qw, scale_dtype=module.weight.dtype).items():
            state[f"{name}.{key}"] = tensor
    for name in tied_duplicates(model, state):
        del state[name]
    # Meta tensors (the blocks a streamed model has already written) stay meta.
    return {
        name: tensor if tensor.is_meta else tensor.detach().to("cpu").contiguous()
        for name, tensor in state.items()
    }


def compressed_writer(model: nn.Module, quantized: Mapping[str, QuantizedWeight]) -> Any:
    """The outcome writer of a weight-only method: `save_compressed` into the folder it gets."""

    def write(directory: Path) -> None:
        save_compressed(model, quantized, directory)  # type: ignore[arg-type]

    return write


def save_compressed(
    model: PreTrainedModel,
    quantized: Mapping[str, QuantizedWeight],
    directory: str | Path,
    *,
    groups: Sequence[ConfigGroup] | None = None,
    ignore: Iterable[str] | None = None,
    actorder: bool = False,
) -> Path:
    """Write ``config.json`` (with ``quantization_config``), ``generation_config.json`` if the
    model has one, and ``model.safetensors`` into ``directory``. Tokenizer files are the
    caller's.

    ``groups``/``ignore`` default to `infer_config_groups`; explicit ones are checked against
    the quantized modules (`check_config_covers`).
    """
    if groups is None:
        inferred_groups, inferred_ignore = infer_config_groups(model, quantized)
        groups = inferred_groups
        ignore = inferred_ignore if ignore is None else ignore
    ignore = list(ignore or [])
    check_config_covers(model, quantized, groups, ignore)
    check_loadable(groups)
    tensors = pack_state_dict(model, quantized)
    qconfig = quantization_config_dict(groups, ignore, actorder=actorder)
    return write_checkpoint(model, qconfig, tensors, directory)


def check_loadable(groups: Sequence[ConfigGroup]) -> None:
    """Refuse configs that transformers 5.24 cannot load: several config groups of which one is
    asymmetric. Its dequantize-on-load path applies a single scheme to every dense layer, and its
    compressed path fails on asymmetric zero points (module docstring); vLLM would serve it."""
    if len(groups) > 1 and any(not grid.symmetric for _, grid in groups):
        grids = ", ".join(str(grid) for _, grid in groups)
        raise UserInputError(
            "transformers cannot load a compressed-tensors checkpoint that mixes several grids "
            f"when one is asymmetric ({grids}); use one grid for all layers, or symmetric grids"
        )


class GridSettings(Protocol):
    """What an integer weight-only config (RTN, GPTQ, AWQ) says about its layers' grids."""

    @property
    def targets(self) -> Sequence[str]: ...
    @property
    def ignore(self) -> Sequence[str]: ...
    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int | None: ...
    @property
    def symmetric(self) -> bool: ...
    @property
    def bits_overrides(self) -> Mapping[str, int]: ...


def plan_grids(
    model: nn.Module, config: GridSettings, *, allow_asymmetric: bool
) -> dict[str, tuple[nn.Linear, QuantGrid]]:
    """Every targeted linear with its grid; every problem is found before any work starts.

    Refused: targeted GPT-2 Conv1D layers (the format stores nn.Linear weights only), a group
    size that does not divide a layer's input width (a partial last group would not load), and
    grids transformers cannot load. With `allow_asymmetric` one asymmetric grid for every layer
    passes (it reloads through `load_compressed`) and only a mix that includes one is refused
    (`check_loadable`): AWQ. Without it any asymmetric grid is refused, so that the checkpoint
    loads with a plain ``from_pretrained``: RTN and GPTQ.
    """
    targets = resolve_linear_targets(
        model,
        TargetSpec(tuple(config.targets), tuple(config.ignore)),
        "the compressed-tensors format stores nn.Linear weights only",
    )
    bits = resolve_overrides(targets, config.bits_overrides) if config.bits_overrides else {}
    plan: dict[str, tuple[nn.Linear, QuantGrid]] = {}
    misfits: dict[int, list[str]] = {}
    for name, module in targets.items():
        in_features = module.weight.shape[1]  # what the grid is fitted to
        if config.group_size is not None and in_features % config.group_size:
            misfits.setdefault(in_features, []).append(name)
        grid = QuantGrid(
            bits=bits.get(name, config.bits),
            symmetric=config.symmetric,
            group_size=config.group_size,
        )
        plan[name] = (module, grid)
    if misfits:
        lines = []
        for width, names in misfits.items():
            fits = fitting_group_sizes(width)
            fit_text = ", ".join(map(str, fits)) if fits else "none (use per-channel scales)"
            lines.append(
                f"{len(names)} layer(s) with {width} inputs (e.g. {names[0]}): fitting group "
                f"sizes {fit_text}"
            )
        raise UserInputError(
            f"group size {config.group_size} does not divide every layer's input width, and a "
            "partial last group would not load: "
            + "; ".join(lines)
            + ". Choose a group size that fits, --group-size 0 for per-channel scales, or "
            "ignore those layers"
        )
    if not allow_asymmetric and not config.symmetric:
        raise UserInputError(
            "asymmetric integer grids do not load with a plain from_pretrained under the "
            "installed compressed-tensors (its zero-point path fails); use a symmetric grid"
        )
    by_grid: dict[QuantGrid, list[str]] = {}
    for name, (_, grid) in plan.items():
        by_grid.setdefault(grid, []).append(name)
    check_loadable([(names, grid) for grid, names in by_grid.items()])
    return plan


def load_compressed(directory: str | Path, **kwargs: Any) -> Any:
    """Load a compressed-tensors checkpoint with transformers, as dense weights.

    Symmetric grids load through the plain ``from_pretrained`` path and are decompressed right
    away (instead of at the first forward); a checkpoint with one asymmetric grid is dequantized
    while loading (``CompressedTensorsConfig(dequantize=True)``), the one route transformers 5.24
    has for it. Both give the weights `QuantizedWeight.dequantize` computes. ``kwargs`` go to
    ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_compressed_tensors_available

    if not is_compressed_tensors_available():
        raise MissingDependencyError(
            "loading compressed-tensors checkpoints needs the compressed-tensors package: "
            "pip install 'compressed-tensors>=0.18'"
        )
    from transformers import CompressedTensorsConfig

    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    groups = config.get("quantization_config", {}).get("config_groups", {}).values()
    symmetric = all((group.get("weights") or {}).get("symmetric", True) for group in groups)
    if symmetric:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        quantizer = getattr(model, "hf_quantizer", None)
        if hasattr(model, "ct_decompress_hook") and quantizer is not None:
            quantizer.compressor.decompress_model(model)
        return model
    if len(groups) > 1:
        raise UserInputError(
            f"{directory}: transformers cannot load several compressed-tensors config groups "
            "when one is asymmetric"
        )
    with warnings.catch_warnings():
        # transformers warns that the passed config only overrides loading attributes: intended.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=CompressedTensorsConfig(dequantize=True), **kwargs
        )
