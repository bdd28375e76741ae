"""Quantizing directly on llama.cpp's grids (``grid: gguf:q4_k`` and the like), so that the
method's rounding, and GPTQ's error feedback, work on exactly the values llama.cpp will run.

``grid`` on the RTN, GPTQ and AWQ configs (CLI ``--grid``) is one of:

- ``int`` (the default): our own integer grid, ``bits``/``group_size``/``symmetric`` as given,
  saved in the compressed-tensors pack-quantized format;
- a 32-weight block type, ``gguf:q4_0 q4_1 q5_0 q5_1 q8_0``: the grid IS an integer grid, 4-, 5-
  or 8-bit in groups of 32, symmetric for ``_0`` and ``q8_0``, with a zero point for ``_1``
  (``gguf_blocks`` has the table). The grid fixes ``bits``, ``group_size=32`` and ``symmetric``
  (an explicit contradicting value is refused); the output is the usual compressed-tensors
  checkpoint, which ``export --type auto`` copies into the GGUF blocks integer for integer. For
  float32 and float16 models the scales are chosen in fp16 (and stored widened), so the GGUF
  ``d``, an fp16, is the very scale the method rounded with: the GGUF tensor dequantizes bit for
  bit to the checkpoint's weight (Q4_1/Q5_1: up to the fp16 rounding of the offset
  ``m = -d * (z + 8)``, which our zero-point form does not store);
- a K-quant, ``gguf:q4_k q5_k q6_k``: two-level scales over super-blocks of 256 weights of a
  row (llama.cpp ``ggml-common.h``; checked against ``gguf.quants`` 0.19's dequantizers):

  ====== =========================== ================================================ =========
  type   sub-blocks                  a weight is                                      bytes/256
  ====== =========================== ================================================ =========
  Q4_K   8 x 32, 6-bit ``sc``, ``m``  ``d*sc * q - dmin*m``, ``q`` in 0..15, fp16 d/dmin  144
  Q5_K   8 x 32, 6-bit ``sc``, ``m``  ``d*sc * q - dmin*m``, ``q`` in 0..31                176
  Q6_K   16 x 16, int8 ``sc``         ``d*sc * (q - 32)``, ``q`` in 0..63, fp16 d        210
  ====== =========================== ================================================ =========

  each product computed in float32 in that order (``d*sc`` first), as gguf-py and llama.cpp's
  reference dequantizers do. `KQuantizedWeight.dequantize` repeats those operations, so the
  values it gives are bit for bit what ``gguf.quants.dequantize`` gives for the block bytes.
  A targeted linear whose input width 256 does not divide gets the 32-weight block type that
  llama.cpp's quantizer falls back to (`K_FALLBACK`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0),
  quantized by the same method on that integer grid (fp16 scales) and stored with the K layers;
  a width 32 does not divide either is refused, naming the layer. ``bits`` (4/5/6),
  ``group_size`` (the sub-block, 32/32/16) and ``symmetric`` (Q6_K only) follow from the type.

The scales of a super-block are chosen by llama.cpp's reference search (`export.kquants`,
``make_qkx2_quants``/``make_qx_quants`` without an importance matrix): a weighted least-squares
scale and min per sub-block over a sweep of candidate steps, then the sub-block scales and mins
quantized to 6-bit (Q6_K: int8) codes against fp16 ``d``/``dmin``. RTN applies it to the weights
as they are (its bytes equal ``export --type q4_k`` of the float model). GPTQ (`gptq.
gptq_quantize_k`) weights the search's least-squares fits by each column's Hessian diagonal (its
summed squared input: what llama.cpp's importance matrix holds), then rounds each column on
exactly the chosen grid and feeds the error forward. By default on K grids (``static_groups``
off) each super-block is fitted when the column loop enters it, on the weights the earlier
columns' errors have already updated, and ``act_order`` orders columns within each super-block;
``static_groups: true`` fits all super-blocks up front on the original weights and lets
``act_order`` order all columns. Measured on SmolLM2-135M (Q4_1 GGUF weights, dequantized), its
30 down_proj layers on Q4_K (the only layers 256 divides), 32 x 256 WikiText calibration tokens,
24 x 256 held-out tokens: relative logits error / perplexity (float 42.98) 0.0312 / 43.11 fitted
on entry, 0.0337 / 43.26 fitted up front, 0.0373 / 43.31 RTN (= ``export --type q4_k``). On a
synthetic layer whose input channels have log-normal scales the importance weights cut Q4_K
output error by 25-40 %.

``bits_overrides`` pick another member of the grid's family per layer: K grids ``4 -> q4_k,
5 -> q5_k, 6 -> q6_k`` (a Q4_K_M-like mix with ``down_proj=6``), the symmetric block grids
``4 -> q4_0, 5 -> q5_0, 8 -> q8_0``, the others ``4 -> q4_1, 5 -> q5_1``. ``grid_overrides``
(RTN and GPTQ) name any llama.cpp grid per layer, across families: llama.cpp's own Q4_0 with an
importance matrix is such a mix, the first eighth of the ffn_down layers on Q4_1 ("to guard
against craziness", ``llama-quant.cpp``), and on SmolLM2-135M that mix is worth 0.67 % of its
perplexity (128 windows of WikiText-2 test: 32.93 against 33.15 with every layer Q4_0).
A mix is saved as a K grid is, dense weights + the block sidecar (compressed-tensors loads only
one grid family per checkpoint), and exports with ``auto`` integer for integer.

Saving a K grid. compressed-tensors has no two-level scales, so the checkpoint is an ordinary
dense one whose quantized weights are the exact dequantized values (plain ``from_pretrained``
loads it and computes what llama.cpp's weights hold; exactly so for a float32 model, rounded to
the model's dtype for a half-precision one), plus the sidecar ``gguf-grid.safetensors``: for each
quantized linear (fallback layers included), a uint8 tensor named by its module
(``model.layers.0.mlp.down_proj``) holding its GGUF block bytes, ``(out, in / 256 * bytes per
block)`` (``in / 32`` blocks for a fallback type); the file's metadata says
``format: swiss-knife-gguf-grid``, ``version: 1`` and, under ``types``, a JSON object module ->
GGUF type. ``export --type auto`` (and ``--type`` equal to a tensor's type) copies those bytes
into the GGUF file after checking that they decode to the dense weight beside them (a model
changed after quantizing is refused rather than exported stale). The config (with its grid)
is in ``swiss_knife.json``'s recipe, and the report names the sidecar.

Cost: the K-scale search is about 20 passes over a super-block (numpy, on the CPU); GPTQ runs
it once per super-block and row block, O(out * in * 20) per layer beside GPTQ's O(out * in^2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import Field, model_validator
from torch import Tensor, nn

from swiss_knife.config import Flag, IntWeightConfig
from swiss_knife.errors import UserInputError
from swiss_knife.targeting import TargetSpec, resolve_linear_targets, resolve_overrides

from .grid import QuantGrid, QuantizedWeight

GridName = Literal[
    "int",
    "gguf:q4_0",
    "gguf:q4_1",
    "gguf:q5_0",
    "gguf:q5_1",
    "gguf:q8_0",
    "gguf:q4_k",
    "gguf:q5_k",
    "gguf:q6_k",
]
GRID_NAMES: tuple[str, ...] = get_args(GridName)

QK_K = 256  # weights per K-quant super-block
BLOCK_GROUP = 32  # weights per block of the 32-weight types

GRID_FILE = "gguf-grid.safetensors"
GRID_FORMAT = "swiss-knife-gguf-grid"
GRID_VERSION = "1"


@dataclass(frozen=True)
class KSpec:
    """One K-quant type: its sub-block size, level range and whether it has mins."""

    kind: str  # the GGUF type name, "q4_k"
    bits: int
    sub: int  # weights per sub-block
    nmax: int  # largest unsigned level
    has_min: bool
    type_size: int  # bytes per 256-weight super-block

    @property
    def n_sub(self) -> int:
        """Sub-blocks per super-block."""
        return QK_K // self.sub


K_SPECS: dict[str, KSpec] = {
    "gguf:q4_k": KSpec("q4_k", 4, 32, 15, True, 144),
    "gguf:q5_k": KSpec("q5_k", 5, 32, 31, True, 176),
    "gguf:q6_k": KSpec("q6_k", 6, 16, 63, False, 210),
}
# The 32-weight block grids: name -> (bits, symmetric).
BLOCK_GRIDS: dict[str, tuple[int, bool]] = {
    "gguf:q4_0": (4, True),
    "gguf:q4_1": (4, False),
    "gguf:q5_0": (5, True),
    "gguf:q5_1": (5, False),
    "gguf:q8_0": (8, True),
}
# What a K grid becomes on a layer whose input width 256 does not divide: llama.cpp's own
# fallback (``tensor_type_fallback`` in ``src/llama-quant.cpp``), a 32-weight block type.
K_FALLBACK: dict[str, str] = {
    "gguf:q4_k": "gguf:q5_0",
    "gguf:q5_k": "gguf:q5_1",
    "gguf:q6_k": "gguf:q8_0",
}
# bits -> grid, for the family of each grid (what a bits override may choose).
_FAMILIES: tuple[dict[int, str], ...] = (
    {4: "gguf:q4_k", 5: "gguf:q5_k", 6: "gguf:q6_k"},
    {4: "gguf:q4_0", 5: "gguf:q5_0", 8: "gguf:q8_0"},
    {4: "gguf:q4_1", 5: "gguf:q5_1"},
)


def is_k_grid(grid: str) -> bool:
    return grid in K_SPECS


def is_block_grid(grid: str) -> bool:
    return grid in BLOCK_GRIDS


def family(grid: str) -> dict[int, str]:
    """bits -> grid name for the members of `grid`'s family (a GGUF grid)."""
    return next(f for f in _FAMILIES if grid in f.values())


def fixed_fields(grid: str) -> dict[str, Any]:
    """The ``bits``, ``group_size`` and ``symmetric`` a GGUF grid implies."""
    if grid in K_SPECS:
        spec = K_SPECS[grid]
        return {"bits": spec.bits, "group_size": spec.sub, "symmetric": not spec.has_min}
    bits, symmetric = BLOCK_GRIDS[grid]
    return {"bits": bits, "group_size": BLOCK_GROUP, "symmetric": symmetric}


def _describe_fields(fields: Mapping[str, Any]) -> str:
    return (
        f"bits {fields['bits']}, group_size {fields['group_size']}, "
        f"symmetric {str(fields['symmetric']).lower()}"
    )


def _as_given(value: Any) -> Any:
    """A field value as given, with digit strings read as integers (YAML/JSON give ints)."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def resolve_grid_fields(data: Any) -> Any:
    """Before validation: fill in what a GGUF ``grid`` fixes, refusing contradicting values.

    One line per problem; bits overrides must name a bit width of the grid's family.
    """
    if not isinstance(data, dict):
        return data
    grid = data.get("grid", "int")
    if not isinstance(grid, str) or grid == "int" or grid not in GRID_NAMES:
        return data  # the Literal refuses an unknown grid in its own words
    fixed = fixed_fields(grid)
    clashes = [
        f"{key} {str(_as_given(data[key])).lower()}"
        for key in ("bits", "group_size", "symmetric")
        if key in data and _as_given(data[key]) != fixed[key]
    ]
    if clashes:
        raise ValueError(
            f"grid {grid} fixes {_describe_fields(fixed)}; it contradicts "
            f"{' and '.join(clashes)} (leave those out, or use grid int)"
        )
    members = family(grid)
    overrides = data.get("bits_overrides") or {}
    if isinstance(overrides, Mapping):
        bad = {p: b for p, b in overrides.items() if _as_given(b) not in members}
        if bad:
            pattern, bits = next(iter(bad.items()))
            choices = ", ".join(f"{b} ({name})" for b, name in members.items())
            raise ValueError(
                f"bits override {pattern}={bits} does not fit grid {grid}, whose family has "
                f"bits {choices}"
            )
    return {**data, **fixed}


class GGUFGridConfig(IntWeightConfig):
    """An integer weight-only config that may quantize on a llama.cpp grid instead."""

    grid: GridName = Field(
        default="int",
        description="Quantize on a llama.cpp grid: gguf:q4_0 ... q8_0 fix bits, groups of 32 "
        "and symmetry; gguf:q4_k/q5_k/q6_k (rtn, gptq) use llama.cpp's super-blocks of 256 "
        "(saved dense + a GGUF block sidecar); int: bits/group size/symmetry as given.",
    )

    @model_validator(mode="before")
    @classmethod
    def _gguf_grid(cls, data: Any) -> Any:
        return resolve_grid_fields(data)


class GGUFMixConfig(GGUFGridConfig):
    """A grid config whose layers may each take another llama.cpp grid (RTN and GPTQ, which can
    save a mix of GGUF types as dense weights + the block sidecar)."""

    grid_overrides: Annotated[
        dict[str, str], Flag(name="--grid-override", metavar="PATTERN=GRID")
    ] = Field(
        default_factory=dict,
        description="(with a gguf grid) per-pattern llama.cpp grid for a mix of GGUF "
        "types, e.g. 're:model\\.layers\\.[0-3]\\.mlp\\.down_proj=gguf:q4_1', the layers "
        "llama.cpp's Q4_0 with an importance matrix puts on Q4_1 (repeatable; the first "
        "matching pattern wins; saved dense + a GGUF block sidecar).",
    )

    @model_validator(mode="after")
    def _overrides_name_gguf_grids(self) -> GGUFMixConfig:
        if not self.grid_overrides:
            return self
        if self.grid == "int":
            raise ValueError("grid overrides need a llama.cpp grid (grid gguf:...), not grid int")
        names = ", ".join(g for g in GRID_NAMES if g != "int")
        for pattern, grid in self.grid_overrides.items():
            if grid == "int" or grid not in GRID_NAMES:
                raise ValueError(f"grid override {pattern}={grid}: the grid must be one of {names}")
        return self


def uses_sidecar(config: Any) -> bool:
    """Whether a grid config saves dense weights + the GGUF block sidecar (a K grid, or a mix of
    GGUF types from grid overrides) instead of one compressed-tensors grid."""
    return is_k_grid(str(getattr(config, "grid", ""))) or bool(
        getattr(config, "grid_overrides", None)
    )


def block_scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Scale dtype for a block grid: fp16, the type of a GGUF block's ``d``, where the model's
    dtype holds every fp16 value (float32, float16); else the model's own (bf16: its scales are
    fp16 values too, unless below fp16's normal range)."""
    return torch.float16 if weight_dtype in (torch.float32, torch.float16) else weight_dtype


# ----------------------------------------------------------------------------- K-grid math


@dataclass
class KQuantizedWeight:
    """A weight ``(out, in)`` on a K-quant grid, ``in`` a multiple of 256.

    Attributes:
        spec: the K type.
        levels: ``(out, in)`` uint8 unsigned levels (``0..nmax``; Q6_K stores ``q + 32``).
        d: ``(out, in / 256)`` float16 super-block scales.
        sc: ``(out, in / sub)`` int16 sub-block scale codes (6-bit unsigned; Q6_K int8).
        dmin: ``(out, in / 256)`` float16 super-block min scales (Q4_K/Q5_K), else None.
        mn: ``(out, in / sub)`` int16 6-bit min codes (Q4_K/Q5_K), else None.
    """

    spec: KSpec
    levels: Tensor
    d: Tensor
    sc: Tensor
    dmin: Tensor | None = None
    mn: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.levels.shape[0]), int(self.levels.shape[1]))

    def steps(self) -> tuple[Tensor, Tensor | None]:
        """float32 ``d * sc`` and ``dmin * mn`` per sub-block, ``(out, in / sub)`` each."""
        return k_steps(self.spec, self.d, self.sc, self.dmin, self.mn)

    def dequantize(self) -> Tensor:
        """The float32 ``(out, in)`` values, bit for bit those of ``gguf.quants.dequantize``."""
        out_features, in_features = self.shape
        step, low = self.steps()
        return k_values(self.spec, self.levels, step, low).reshape(out_features, in_features)

    def to_blocks(self) -> NDArray[np.uint8]:
        """The GGUF bytes, uint8 ``(out, in / 256 * type_size)``."""
        from swiss_knife.export.kquants import KScales, pack_k_blocks

        out_features, in_features = self.shape
        n = out_features * (in_features // QK_K)
        spec = self.spec
        scales = KScales(
            spec.kind,
            self.d.cpu().numpy().reshape(n),
            self.sc.cpu().numpy().reshape(n, spec.n_sub),
            None if self.dmin is None else self.dmin.cpu().numpy().reshape(n),
            None if self.mn is None else self.mn.cpu().numpy().astype(np.uint8).reshape(n, 8),
        )
        blocks = pack_k_blocks(scales, self.levels.cpu().numpy().reshape(n, QK_K))
        return blocks.reshape(out_features, -1)


def k_steps(
    spec: KSpec, d: Tensor, sc: Tensor, dmin: Tensor | None, mn: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """float32 ``d * sc`` (and ``dmin * mn``) per sub-block: ``(rows, n_sub_total)``, from
    ``(rows, n_super)`` fp16 super-block scales and ``(rows, n_sub_total)`` codes."""
    step = d.float().repeat_interleave(spec.n_sub, dim=1) * sc.float()
    if not spec.has_min:
        return step, None
    assert dmin is not None and mn is not None
    return step, dmin.float().repeat_interleave(spec.n_sub, dim=1) * mn.float()


def k_values(spec: KSpec, levels: Tensor, step: Tensor, low: Tensor | None) -> Tensor:
    """The float32 values of unsigned ``levels`` ``(rows, n_sub_total * sub)`` on the grid
    ``step``/``low`` ``(rows, n_sub_total)``, in the order llama.cpp computes them."""
    rows = levels.shape[0]
    q = levels.reshape(rows, -1, spec.sub).float()  # (rows, n_sub_total, sub)
    if low is None:
        return (step.unsqueeze(-1) * (q - 32.0)).reshape(rows, -1)
    return (step.unsqueeze(-1) * q - low.unsqueeze(-1)).reshape(rows, -1)


def k_round(spec: KSpec, w: Tensor, step: Tensor, low: Tensor | None) -> tuple[Tensor, Tensor]:
    """Round ``w`` to the grid ``step``/``low`` of the same shape (broadcastable): the unsigned
    levels (float32) and the float32 values they decode to, as llama.cpp's quantizers round
    (to nearest, ties to even; a sub-block whose step is 0 stores level 0, resp. 32)."""
    zero = step == 0
    safe = torch.where(zero, torch.ones_like(step), step)
    if low is None:
        lv = torch.clamp(torch.round(w / safe), -32, 31)
        lv = torch.where(zero, torch.zeros_like(lv), lv)
        return lv + 32.0, step * lv
    q = torch.clamp(torch.round((w + low) / safe), 0, spec.nmax)
    q = torch.where(zero, torch.zeros_like(q), q)
    return q, step * q - low


@dataclass
class KScalesTorch:
    """A K grid's scales for ``(rows, n_super)`` super-blocks, as torch tensors."""

    d: Tensor  # (rows, n_super) float16
    sc: Tensor  # (rows, n_super * n_sub) int16
    dmin: Tensor | None  # (rows, n_super) float16
    mn: Tensor | None  # (rows, n_super * n_sub) int16


def fit_k_scales(x: Tensor, spec: KSpec, importance: Tensor | None = None) -> KScalesTorch:
    """llama.cpp's reference scale search (`export.kquants.k_scales`) for every super-block of
    ``x`` ``(rows, n_super * 256)``; the result lives on ``x``'s device.

    ``importance`` ``(n_super * 256,)``, one non-negative weight per column (GPTQ passes the
    Hessian's diagonal, the mean squared input: llama.cpp's importance matrix), multiplies the
    search's per-weight weights.
    """
    from swiss_knife.export.kquants import k_scales

    rows, width = x.shape
    n_super = width // QK_K
    imp = None
    if importance is not None:
        h = importance.detach().float().cpu()
        col = (h / h.mean().clamp_min(1e-30)).numpy()  # (width,), mean 1
        imp = np.broadcast_to(col, (rows, width)).reshape(rows * n_super, QK_K)
    found = k_scales(x.detach().float().cpu().numpy().reshape(rows * n_super, QK_K), spec.kind, imp)

    def put(array: NDArray[Any] | None, dtype: torch.dtype, cols: int) -> Tensor | None:
        if array is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(array)).to(x.device, dtype).reshape(rows, cols)

    d = put(found.d, torch.float16, n_super)
    sc = put(found.sc, torch.int16, n_super * spec.n_sub)
    assert d is not None and sc is not None
    return KScalesTorch(
        d,
        sc,
        put(found.dmin, torch.float16, n_super),
        put(found.mn, torch.int16, n_super * spec.n_sub),
    )


class KGridScales:
    """A K grid's scales for a ``(out, in)`` weight, filled super-block by super-block (GPTQ fits
    each when its column loop reaches it), with the float32 steps its columns round on."""

    def __init__(self, spec: KSpec, out_features: int, in_features: int, device: torch.device):
        self.spec = spec
        n_sub = in_features // spec.sub
        self.d = torch.zeros(out_features, in_features // QK_K, dtype=torch.float16, device=device)
        self.sc = torch.zeros(out_features, n_sub, dtype=torch.int16, device=device)
        self.dmin = torch.zeros_like(self.d) if spec.has_min else None
        self.mn = torch.zeros_like(self.sc) if spec.has_min else None
        self.step = torch.zeros(out_features, n_sub, dtype=torch.float32, device=device)
        self.low = torch.zeros_like(self.step) if spec.has_min else None

    def fit(self, first: int, x: Tensor, importance: Tensor | None = None) -> None:
        """Fit the super-blocks of columns ``first .. first + width`` on ``x`` ``(out, width)``
        (columns in their original order; ``importance`` one weight per column)."""
        spec = self.spec
        found = fit_k_scales(x, spec, importance)
        s0, s1 = first // QK_K, (first + x.shape[1]) // QK_K
        u0, u1 = first // spec.sub, (first + x.shape[1]) // spec.sub
        self.d[:, s0:s1], self.sc[:, u0:u1] = found.d, found.sc
        step, low = k_steps(spec, found.d, found.sc, found.dmin, found.mn)
        self.step[:, u0:u1] = step
        if self.dmin is not None and self.mn is not None and self.low is not None:
            assert found.dmin is not None and found.mn is not None and low is not None
            self.dmin[:, s0:s1], self.mn[:, u0:u1] = found.dmin, found.mn
            self.low[:, u0:u1] = low

    def column(self, sub_block: int) -> tuple[Tensor, Tensor | None]:
        """The ``(out,)`` step and low of a sub-block (for `k_round`)."""
        return self.step[:, sub_block], None if self.low is None else self.low[:, sub_block]

    def result(self, levels: Tensor) -> KQuantizedWeight:
        """The quantized weight of ``levels`` ``(out, in)`` (original order) on these scales."""
        return KQuantizedWeight(
            self.spec, levels.to(torch.uint8), self.d, self.sc, self.dmin, self.mn
        )


def check_k_width(in_features: int, spec: KSpec, name: str = "this layer") -> None:
    if in_features % QK_K:
        raise UserInputError(
            f"grid gguf:{spec.kind} needs input widths that are multiples of {QK_K}: {name} has "
            f"{in_features} inputs"
        )


def rtn_quantize_k(W: Tensor, spec: KSpec) -> KQuantizedWeight:
    """Round ``W`` ``(out, in)`` to a K grid whose scales are fitted on ``W`` itself: the grid
    and levels llama.cpp's reference quantizer (and ``export --type q4_k``) would choose."""
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    check_k_width(W.shape[1], spec)
    x = W.detach().float()
    scales = fit_k_scales(x, spec)
    step, low = k_steps(spec, scales.d, scales.sc, scales.dmin, scales.mn)
    rows = x.shape[0]
    grouped = x.reshape(rows, -1, spec.sub)  # (out, n_sub_total, sub)
    levels, _ = k_round(
        spec, grouped, step.unsqueeze(-1), None if low is None else low.unsqueeze(-1)
    )
    return KQuantizedWeight(
        spec,
        levels.reshape(x.shape).to(torch.uint8),
        scales.d,
        scales.sc,
        scales.dmin,
        scales.mn,
    )


# ----------------------------------------------------------------------------- plans, saving


def block_grid(grid: str) -> QuantGrid:
    """The integer grid a 32-weight block type holds exactly."""
    bits, symmetric = BLOCK_GRIDS[grid]
    return QuantGrid(bits=bits, symmetric=symmetric, group_size=BLOCK_GROUP)


def plan_gguf_grids(
    model: nn.Module, config: Any
) -> dict[str, tuple[nn.Linear, KSpec | QuantGrid]]:
    """Every targeted linear with its GGUF type: a grid override's, else the grid family's
    member a bits override names, else the grid's. A K type on a layer whose input width 256
    does not divide becomes the 32-weight block type llama.cpp falls back to (`K_FALLBACK`:
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); block types are `QuantGrid`s of 32. A width 32
    does not divide either is refused in one line naming the layer."""
    targets = resolve_linear_targets(
        model,
        TargetSpec(tuple(config.targets), tuple(config.ignore)),
        "llama.cpp's grids are planned for nn.Linear weights only",
    )
    members = family(config.grid)
    bits = resolve_overrides(targets, config.bits_overrides) if config.bits_overrides else {}
    overrides = getattr(config, "grid_overrides", None) or {}
    chosen = resolve_overrides(targets, overrides) if overrides else {}
    plan: dict[str, tuple[nn.Linear, KSpec | QuantGrid]] = {}
    misfits: dict[int, list[str]] = {}
    for name, module in targets.items():
        grid = chosen.get(name) or members[bits.get(name, config.bits)]
        in_features = int(module.weight.shape[1])
        if grid in K_SPECS and in_features % QK_K == 0:
            plan[name] = (module, K_SPECS[grid])
        elif in_features % BLOCK_GROUP == 0:
            plan[name] = (module, block_grid(K_FALLBACK.get(grid, grid)))
        else:
            misfits.setdefault(in_features, []).append(name)
    if misfits:
        width, names = next(iter(misfits.items()))
        more = sum(len(n) for n in misfits.values()) - 1
        others = f" (and {more} more layer(s))" if more else ""
        raise UserInputError(
            f"llama.cpp's grids need input widths that are multiples of {BLOCK_GROUP} (and of "
            f"{QK_K} for the K types' super-blocks): {names[0]} has {width} inputs{others}; "
            "ignore such layers"
        )
    return plan


def fallback_blocks(qw: QuantizedWeight) -> tuple[str, NDArray[np.uint8], Tensor]:
    """A block-grid fallback layer of a K-grid run, as the sidecar stores it: its GGUF type,
    the bytes of its integers (written without re-rounding) and the float32 values those bytes
    decode to, which the dense checkpoint holds."""
    from swiss_knife.export.gguf_blocks import GRID_TYPES, decode, encode_levels

    grid = qw.grid
    kind = GRID_TYPES[(grid.bits, grid.symmetric)][0]
    rows, cols = qw.q.shape
    scale = qw.scale.detach().float().cpu().reshape(rows, cols // BLOCK_GROUP).numpy()
    zero = None
    if qw.zero is not None:
        zero = qw.zero.detach().cpu().reshape(rows, cols // BLOCK_GROUP).numpy()
    blocks = encode_levels(qw.q.detach().cpu().numpy(), scale, zero, kind)
    values = torch.from_numpy(decode(blocks, kind).reshape(rows, cols))
    return kind, blocks, values


def gguf_grid_writer(model: nn.Module, blocks: Mapping[str, tuple[str, NDArray[np.uint8]]]) -> Any:
    """The writer of a K-grid outcome: the dense checkpoint, then the block sidecar."""

    def write(directory: Path) -> None:
        model.save_pretrained(directory)  # type: ignore[operator]
        save_grid_sidecar(directory, blocks)

    return write


def save_grid_sidecar(directory: Path, blocks: Mapping[str, tuple[str, NDArray[np.uint8]]]) -> Path:
    """Write ``gguf-grid.safetensors``: module -> uint8 GGUF bytes, types in the metadata."""
    from safetensors.torch import save_file

    tensors = {name: torch.from_numpy(np.ascontiguousarray(b)) for name, (_, b) in blocks.items()}
    metadata = {
        "format": GRID_FORMAT,
        "version": GRID_VERSION,
        "types": json.dumps({name: kind for name, (kind, _) in blocks.items()}),
    }
    path = Path(directory) / GRID_FILE
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_grid_types(path: Path) -> dict[str, str]:
    """module -> GGUF type from a sidecar's metadata; `UserInputError` if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
    except Exception as exc:  # a truncated or foreign file
        raise UserInputError(f"cannot read {path}: {exc}") from None
    if metadata.get("format") != GRID_FORMAT:
        raise UserInputError(f"{path} is not a Swiss Knife GGUF grid file")
    if metadata.get("version") != GRID_VERSION:
        raise UserInputError(
            f"{path} has GGUF grid version {metadata.get('version')!r}; this version reads "
            f"{GRID_VERSION}"
        )
    types: dict[str, str] = json.loads(metadata.get("types", "{}"))
    known = {grid.removeprefix("gguf:") for grid in (*K_SPECS, *BLOCK_GRIDS)}
    unknown = sorted(kind for kind in set(types.values()) if kind not in known)
    if unknown:
        raise UserInputError(
            f"{path} holds {unknown[0]} blocks; this version reads {sorted(known)}"
        )
    missing = sorted(set(types) - names)
    if missing:
        raise UserInputError(f"{path} lists {missing[0]} but holds no tensor for it")
    return types


__all__ = [
    "BLOCK_GRIDS",
    "GRID_FILE",
    "GRID_NAMES",
    "K_FALLBACK",
    "K_SPECS",
    "GGUFGridConfig",
    "GGUFMixConfig",
    "GridName",
    "KGridScales",
    "KQuantizedWeight",
    "KSpec",
    "block_grid",
    "block_scale_dtype",
    "fallback_blocks",
    "fit_k_scales",
    "gguf_grid_writer",
    "is_block_grid",
    "is_k_grid",
    "k_round",
    "k_steps",
    "plan_gguf_grids",
    "read_grid_types",
    "rtn_quantize_k",
    "uses_sidecar",
]
