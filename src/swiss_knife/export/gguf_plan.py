"""Which GGUF type each tensor gets, and in which order the tensors are written.

The rules are llama.cpp's (``llama-quant.cpp``'s type choice and shape fallback,
``convert_hf_to_gguf.py``'s float handling), summarised in `swiss_knife.export.gguf`; `auto`
maps a packed integer grid to the block type that holds it exactly (`gguf_blocks.GRID_TYPES`),
and keeps the K-quant blocks of a weight quantized on a llama.cpp K grid (its sidecar bytes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from swiss_knife.compression.quantization.gguf_grid import K_FALLBACK
from swiss_knife.compression.quantization.grid import QuantGrid
from swiss_knife.errors import UserInputError
from swiss_knife.export.errors import GGUFExportError, GridNotRepresentableError
from swiss_knife.export.gguf_arch import (
    ExportArch,
    HParams,
    TensorNames,
    check_complete,
    expected_shape,
    llama3_rope_factors,
    qk_row_order,
    rope_type,
)
from swiss_knife.export.gguf_blocks import (
    EXPORT_TYPES,
    FLOAT_TYPES,
    GRID_GROUP,
    GRID_TYPES,
    block_size,
)
from swiss_knife.export.gguf_source import Checkpoint, SourceTensor, iter_weights
from swiss_knife.targeting import resolve_overrides

Overrides = Sequence[tuple[str, str]] | Sequence[str] | Mapping[str, str]

# llama.cpp's shape fallback, the table the K-grid methods share.
_K_FALLBACK = {k.removeprefix("gguf:"): v.removeprefix("gguf:") for k, v in K_FALLBACK.items()}
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class PlannedTensor:
    """One tensor of the output: where it comes from and how it is stored."""

    gguf_name: str
    source: SourceTensor | None  # None for a tensor computed here (rope_freqs)
    kind: str  # the GGUF type written
    wanted: str  # the type chosen before the shape fallback
    exact: bool  # integers copied from the source grid
    row_order: NDArray[np.int64] | None = None
    computed: NDArray[np.float32] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (torch-order) shape."""
        if self.source is not None:
            return self.source.shape
        assert self.computed is not None
        return tuple(self.computed.shape)


def _grid_text(grid: QuantGrid) -> str:
    group = "per channel" if grid.group_size is None else f"group size {grid.group_size}"
    symmetry = "symmetric" if grid.symmetric else "asymmetric"
    return f"{grid.bits}-bit {symmetry} {group}"


def grid_type(entry: SourceTensor) -> str:
    """The block type that holds the grid of a packed weight exactly, or a one-line refusal."""
    grid = entry.grid
    assert grid is not None
    mapped = GRID_TYPES.get((grid.bits, grid.symmetric))
    if grid.group_size == GRID_GROUP and mapped is not None:
        return mapped[0]
    raise GridNotRepresentableError(
        f"{entry.name}: its {_grid_text(grid)} grid has no GGUF block type (auto keeps 4/5-bit "
        "grids and symmetric 8-bit grids in groups of 32); choose an explicit type such as q4_k"
    )


def shape_fallback(kind: str, row_length: int) -> str:
    """The type llama.cpp uses when rows of ``row_length`` do not fit ``kind``'s blocks."""
    if kind in FLOAT_TYPES or row_length % block_size(kind) == 0:
        return kind
    nxt = _K_FALLBACK.get(kind)
    if nxt is not None and row_length % block_size(nxt) == 0:
        return nxt
    return "f16"


def check_type(kind: Any, what: str) -> str:
    """``kind`` if it is a type name `export_gguf` accepts, else a one-line refusal."""
    if kind not in EXPORT_TYPES:
        raise GGUFExportError(
            f"unknown GGUF type {kind!r} for {what}; choose one of {', '.join(EXPORT_TYPES)}"
        )
    return str(kind)


def parse_overrides(overrides: Overrides | None) -> dict[str, str]:
    """Ordered pattern -> type, from pairs, ``"pattern=type"`` strings or a mapping."""
    if overrides is None:
        return {}
    pairs: Iterable[Any] = overrides.items() if isinstance(overrides, Mapping) else overrides
    parsed: dict[str, str] = {}
    for item in pairs:
        if isinstance(item, str):
            pattern, sep, kind = item.rpartition("=")
            if not sep:
                raise GGUFExportError(f"type override {item!r} is not PATTERN=TYPE")
        else:
            pattern, kind = item
        parsed[str(pattern)] = check_type(str(kind).lower(), f"override {pattern!r}")
    return parsed


def _choose(
    entry: SourceTensor,
    gguf_name: str,
    base: str,
    override: str | None,
    tied: bool,
    auto_base: str | None = None,
) -> tuple[str, str, bool]:
    """``(kind, wanted, exact)`` for one tensor: the type written, the type llama.cpp's rules
    asked for before the shape fallback, and whether the source integers are kept.

    Under ``auto`` a tensor with a grid keeps it; in a quantized checkpoint (``auto_base``: its
    most common block type) the float embeddings and output head get what llama.cpp gives them
    in a file of that type; any other float matrix (a layer left out of quantization) keeps
    its dtype."""
    if len(entry.shape) != 2:
        return "f32", "f32", False
    wanted = override or base
    if entry.gguf_type is not None and wanted in ("auto", entry.gguf_type):
        return entry.gguf_type, entry.gguf_type, True  # its blocks, byte for byte
    if wanted == "auto":
        if entry.grid is not None:
            kind = grid_type(entry)
            return kind, kind, True
        if auto_base is None or gguf_name not in ("token_embd.weight", "output.weight"):
            return entry.dtype, entry.dtype, False
        wanted = auto_base
    cols = entry.shape[-1]
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if override is None and is_output and wanted not in FLOAT_TYPES and wanted != "q8_0":
        wanted = "q8_0" if cols % block_size(wanted) else "q6_k"
    return shape_fallback(wanted, cols), wanted, False


def plan_tensors(
    checkpoint: Checkpoint,
    arch: ExportArch,
    hp: HParams,
    base: str,
    overrides: dict[str, str],
) -> list[PlannedTensor]:
    """Every tensor of the output file with its type, in llama.cpp's usual order.

    Checks, before anything is written, that each weight has a GGUF name and the shape
    ``config.json`` implies, that no tensor llama.cpp needs is missing, and that the override
    patterns are valid and each selects a weight (``targeting.resolve_overrides``, matched
    against module names such as ``model.layers.0.mlp.down_proj``). ``base`` is the requested
    type; a tied output head is left out (llama.cpp reads it from ``token_embd``).
    """
    names = TensorNames(arch, hp.n_layers)
    mapped: list[tuple[SourceTensor, str]] = []
    for entry in iter_weights(checkpoint):
        if entry.name.endswith(_SKIPPED_SUFFIXES):
            continue
        gguf_name = names.gguf_name(entry.name)
        if gguf_name is None:
            raise GGUFExportError(
                f"tensor {entry.name} has no place in a GGUF {arch.gguf_name} model"
            )
        if gguf_name == "output.weight" and hp.tied:
            continue  # llama.cpp reads the tied head from token_embd
        want = expected_shape(gguf_name, hp)
        if want is not None and tuple(entry.shape) != want:
            raise GGUFExportError(
                f"tensor {entry.name} has shape {list(entry.shape)} but config.json implies "
                f"{list(want)}"
            )
        mapped.append((entry, gguf_name))
    check_complete({name for _, name in mapped}, hp, arch)

    modules = [e.name.removesuffix(".weight") for e, _ in mapped if len(e.shape) == 2]
    try:
        chosen = resolve_overrides(modules, overrides) if overrides else {}
    except UserInputError as exc:
        raise GGUFExportError(str(exc)) from None

    auto_base = _grid_base(entry for entry, _ in mapped) if base == "auto" else None
    plan: list[PlannedTensor] = []
    for entry, gguf_name in mapped:
        override = chosen.get(entry.name.removesuffix(".weight")) if len(entry.shape) == 2 else None
        kind, wanted, exact = _choose(entry, gguf_name, base, override, bool(hp.tied), auto_base)
        order = None
        if arch.permute_qk and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hp.n_head if ".attn_q." in gguf_name else hp.n_kv
            order = qk_row_order(entry.shape[0], heads)
        plan.append(PlannedTensor(gguf_name, entry, kind, wanted, exact, order))
    if rope_type(hp) == "llama3":
        factors = llama3_rope_factors(hp)
        plan.append(PlannedTensor("rope_freqs.weight", None, "f32", "f32", False, computed=factors))

    def position(item: PlannedTensor) -> tuple[int, int]:
        parts = item.gguf_name.split(".")
        if parts[0] == "blk":
            return 1, int(parts[1])
        return (2, 0) if parts[0] in ("output_norm", "output") else (0, 0)

    return sorted(plan, key=position)  # stable: source order within a block


def _grid_base(entries: Iterable[SourceTensor]) -> str | None:
    """The block type holding the most weights among tensors that have a grid, or None for a
    checkpoint without any (a float model keeps its dtype under auto)."""
    counts: Counter[str] = Counter()
    for entry in entries:
        kind = entry.gguf_type
        if kind is None and entry.grid is not None:
            try:
                kind = grid_type(entry)
            except GGUFExportError:
                continue  # refused with its own message when its turn comes
        if kind is not None:
            counts[kind] += int(np.prod(entry.shape))
    return max(counts, key=lambda k: counts[k]) if counts else None


def dominant_type(plan: list[PlannedTensor]) -> str:
    """The quantized type holding the most weights (else the float type): the file type."""
    counts: Counter[str] = Counter()
    for item in plan:
        if len(item.shape) == 2:
            counts[item.kind] += int(np.prod(item.shape))
    quantized = {k: v for k, v in counts.items() if k not in FLOAT_TYPES}
    pool = quantized or counts
    return max(pool, key=lambda k: pool[k]) if pool else "f32"


__all__ = [
    "Overrides",
    "PlannedTensor",
    "check_type",
    "dominant_type",
    "grid_type",
    "parse_overrides",
    "plan_tensors",
    "shape_fallback",
]
