"""AWQ: activation-aware weight quantization, on the one calibration engine.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "AWQ: Activation-aware Weight
Quantization for On-Device LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978).
Reference code: mit-han-lab/llm-awq and its successor casper-hansen/AutoAWQ (``auto_scale.py``,
``auto_clip.py``).

The observation: the few input channels that carry large activations matter most, and rounding
the weights that read them costs the most output error. Multiplying those weight columns by
``s > 1`` before rounding shrinks their relative rounding error; dividing the input by ``s``
keeps the product unchanged, ``y = (x / s) (W diag(s))^T``, and the ``1 / s`` is folded into the
op that produces ``x`` (a norm's weight, or the output rows of the previous linear), so the
saved model has the same shapes and modules as the original and no extra work at run time.

Per block, for each *scaling group* (linears that read the same input, and the op producing it):

1. salience: ``m = mean over calibration tokens of |x|`` per input channel;
2. search ``s(alpha) = m^alpha / sqrt(max * min)`` for ``alpha`` on ``config.scale_grid`` evenly spaced
   points of ``[0, 1]``, keeping the one whose weights ``Q(W diag(s)) diag(s)^-1`` (plain min/max
   round-to-nearest of the scaled weights) give the smallest mean squared error of the block's
   sub-module output (`awq_scale_search`). ``alpha = 0`` gives ``s = 1``, i.e. plain RTN, so the
   chosen scales never do worse than RTN on that objective. For a single linear the error on
   every calibration token comes from the inputs' ``H = 2/n sum x x^T`` (`output_sq_error`);
   an attention or MLP module is re-run on the first `SEARCH_MAX_TOKENS` tokens;
3. fold: the linears' input columns are multiplied by ``s`` and ``1 / s`` goes into the previous
   op (`fold_scales_into_norm`, `fold_scales_into_linear`); exact in real arithmetic;
4. clip (``config.clip_search``): per row and group, the range ``[min, max]`` is shrunk by the
   ratio in ``{1, 0.95, ..., 0.55}`` that minimises the linear's *output* error on (a strided
   subsample of) its scaled calibration inputs (`awq_clip_search`), not the weight error. As in
   the reference code q/k projections (and a fused qkv, which holds them) are not clipped: their
   error reaches the output through the ``q k^T`` product, which a per-linear error cannot see;
5. round to nearest on the final grid, scales stored in the model dtype (`quantize_with_clip`).

Scaling groups (`block_stages`, from the `arch` table):

- attention norm -> q, k, v (or fused qkv); objective: the attention module's output (o_proj
  still in float), re-run on the captured inputs and keyword arguments (mask, rotary tables);
- v -> o: v's output rows (a slice of a fused qkv, by its layout) and o's input columns; with
  grouped-query attention every v channel feeds one o column per query head of its group, so one
  scale per v channel is searched (salience averaged over those columns) and repeated for o;
- MLP norm -> gate, up (fused gate_up, fc1, dense_h_to_4h); objective: the MLP module's
  output with the down projection in float, or the linears' own outputs where the MLP has no
  module of its own (OPT);
- up -> down for gated MLPs (``down(act(gate) * up)`` is linear in up's rows), and fc1 -> fc2
  when the activation is a ReLU (``relu(z / s) = relu(z) / s`` for ``s > 0``). A GELU MLP (GPT-NeoX)
  gets no scale before its down projection: GELU does not commute with a scale, and the reference
  code's fix, a new ``ScaledActivation`` module, would not reload with a plain ``from_pretrained``.
- post-norm OPT (``do_layer_norm_before=False``): the norms sit after the residual add, so they do
  not produce the linears' inputs and receive no scales; v -> o and fc1 -> fc2 still apply.

Differences from AutoAWQ, and why: groups are solved in the engine's true-sequential order (each
group is calibrated on inputs produced by the already-quantized groups before it, like GPTQ),
rather than all scales on the float block first. A scale folded into the output rows of an
already-quantized linear (v, up) is folded into its integer grid's row scales, which is exact,
because round-to-nearest per row and group commutes with a positive per-row factor. Scales use
``mean |x|`` only (the paper's form, not AutoAWQ's optional weight-magnitude "duo scaling").
GPT-2 is not supported: its Conv1D layers cannot be stored in the compressed-tensors format.

Output: the model in memory is fake-quantized (every targeted weight is its dequantized integer
grid, the folded norms and rows are in place) and the writer saves a compressed-tensors
pack-quantized checkpoint that ``AutoModelForCausalLM.from_pretrained`` reloads to the same
logits. A single asymmetric grid loads through `load_compressed` only
(``CompressedTensorsConfig(dequantize=True)``), see `compressed_tensors_format`.

Cost, per block: the engine's passes (one per stage plus the replay, as for true-sequential
GPTQ); per scaling group ``config.scale_grid`` round-to-nearest passes over its weights, each followed
by a re-run of the attention or MLP module on at most `SEARCH_MAX_TOKENS` tokens, or by
O(out * in^2) for a single linear; the clip search's ``10 * out * in * 512`` multiply-adds per
linear. On a CPU the module re-runs and the engine's passes dominate (SmolLM2-135M, 32 x 512
tokens: about a minute per block on two busy cores). Memory besides the engine's activations:
the stage's ``H`` ``(in, in)`` float32 (like GPTQ's), 512 tokens of its input, and the module
inputs and outputs of the searched tokens, ``SEARCH_MAX_TOKENS x hidden`` each.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...arch import (
    ARCH_SPECS,
    ArchSpec,
    attention_geometry,
    get_arch,
    get_module,
    is_pre_norm,
    linear_in_out,
)
from ...calibration import (
    BlockCalibrator,
    BlockContext,
    ChannelNormObserver,
    HessianObserver,
    run_calibration,
)
from ...config import CalibrationSettings
from ...errors import UnsupportedArchitectureError, UserInputError
from ..metrics import sqnr_db
from .base import QuantizationOutcome, QuantizeContext, register_method
from .compressed_tensors_format import compressed_writer, plan_grids, stream_packed
from .gguf_grid import GGUFGridConfig, is_k_grid
from .grid import (
    QuantGrid,
    QuantizedWeight,
    compute_qparams,
    quantize,
    quantize_groups,
    resolve_scale_dtype,
)
from .rtn import rtn_quantize


class AWQConfig(GGUFGridConfig):
    """AWQ (Lin et al. 2023): activation-aware channel scales, folded into the previous op.

    ``grid`` may name a llama.cpp 32-weight block grid (``gguf:q4_0`` ...; `gguf_grid`), which
    fixes bits, groups of 32 and symmetry; llama.cpp's K grids are GPTQ's and RTN's for now.
    """

    method: Literal["awq"] = "awq"
    scale_grid: int = Field(default=20, ge=2, description="Points of the scale-exponent search.")
    clip_search: bool = Field(default=True, description="Search the clipping range per group.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    @model_validator(mode="before")
    @classmethod
    def _scale_grid_was_grid(cls, data: Any) -> Any:
        # Before `grid` named a llama.cpp grid, an integer `grid` was the scale search's points.
        if isinstance(data, dict) and type(data.get("grid")) is int:
            if "scale_grid" in data:
                raise ValueError("give the scale search's points once, as scale_grid")
            data = dict(data)
            data["scale_grid"] = data.pop("grid")
        return data

    @model_validator(mode="after")
    def _no_k_grid(self) -> AWQConfig:
        if is_k_grid(self.grid):
            raise ValueError(
                f"awq does not quantize on llama.cpp's K grids ({self.grid}) yet; use method "
                "gptq or rtn for them, or a 32-weight grid such as gguf:q4_0 with awq"
            )
        return self


FORMAT = "compressed-tensors/pack-quantized"

# AutoAWQ's constants: the floor on m^alpha before normalising (a dead channel must not get a
# zero scale), and the clip search's 20-step grid of which the first half is tried (shrink at
# most to 55% of the range) on at most 512 tokens.
SCALE_FLOOR = 1e-4
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_MAX_TOKENS = 512
# Tokens on which the attention / MLP module is re-run for each candidate scale (whole
# mini-batches, the first ones of the calibration set; the statistics use every token). Picking
# one exponent among `grid` needs far fewer tokens than the statistics do (the reference clip
# search picks a ratio per group from 512), and the re-runs are AWQ's main cost: 20 candidates x
# 64k tokens through SmolLM2-135M's MLP alone would be about 7 TFLOP per block.
SEARCH_MAX_TOKENS = 4096
# Elements per intermediate product in the chunked error computations (64 MiB of float32).
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# Tensor math: no modules, no hooks.
# ---------------------------------------------------------------------------------------------


def awq_scales(x_abs_mean: Tensor, alpha: float) -> Tensor:
    """AWQ's per-channel scales ``s = m^alpha``, normalised so that ``max(s) * min(s) = 1``.

    `x_abs_mean` ``(channels,)`` is the mean ``|x|`` of each input channel. The normalisation
    (from the reference code) centres the scales around 1 on a log scale, so the weights are not
    blown up or shrunk as a whole; ``alpha = 0`` gives all ones.
    """
    s = x_abs_mean.float().pow(alpha).clamp(min=SCALE_FLOOR)  # (channels,)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True, eq=False)
class ScaleSearchResult:
    """The scales `awq_scale_search` kept, and the objective at every grid point."""

    scales: Tensor  # (channels,)
    alpha: float
    loss: float
    # Objective per alpha, alphas evenly spaced on [0, 1]; losses[0] is plain RTN (s = 1).
    losses: tuple[float, ...]


def awq_scale_search(
    x_abs_mean: Tensor, loss: Callable[[Tensor], float], grid: int = 20
) -> ScaleSearchResult:
    """Grid search of ``alpha`` in ``[0, 1]`` (`grid` points) minimising ``loss(awq_scales(m, a))``.

    `loss` maps candidate scales ``(channels,)`` to the output error they cause once the weights
    are quantized (see `scaled_fake_quant`). Ties keep the smaller ``alpha``; a non-finite loss
    never wins. Since ``alpha = 0`` is plain RTN, the result is never worse than RTN on `loss`.
    """
    if grid < 2:
        raise UserInputError(f"the scale search needs at least 2 grid points, got {grid}")
    losses: list[float] = []
    best: tuple[float, float, Tensor] | None = None
    for i in range(grid):
        alpha = i / (grid - 1)
        scales = awq_scales(x_abs_mean, alpha)
        value = float(loss(scales))
        losses.append(value)
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, alpha, scales)
    if best is None:
        raise UserInputError(
            "AWQ scale search: every candidate gave a non-finite output error; the calibration "
            "activations contain NaN or inf"
        )
    return ScaleSearchResult(scales=best[2], alpha=best[1], loss=best[0], losses=tuple(losses))


def scaled_fake_quant(
    W: Tensor, scales: Tensor, grid: QuantGrid, *, scale_dtype: torch.dtype | None = None
) -> Tensor:
    """``Q(W diag(s)) diag(s)^-1``: the weights that act on the UNscaled input after AWQ.

    `W` ``(out, in)``, `scales` ``(in,)``; plain min/max round-to-nearest, float32 result. The
    scale search compares candidates with these weights on the original inputs, which equals
    running the quantized scaled weights on the inputs divided by ``s``.
    """
    s = scales.float().to(W.device)
    qw = rtn_quantize(W.float() * s, grid, scale_dtype=scale_dtype or W.dtype)
    return qw.dequantize().float() / s  # (out, in)


def fold_scales_into_norm(
    weight: Tensor, bias: Tensor | None, scales: Tensor, offset: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of a norm whose output is divided by `scales` ``(channels,)``.

    A norm computes ``(offset + w) * n(x) + b``; dividing that by ``s`` needs
    ``w' = (offset + w) / s - offset`` and ``b' = b / s``. Gemma's RMSNorm multiplies by
    ``1 + w`` (``offset = 1``), so folding into ``w`` alone (as for Llama) would be wrong there.
    """
    s = scales.float().to(weight.device)
    new_weight = ((offset + weight.float()) / s - offset).to(weight.dtype)  # (channels,)
    new_bias = None if bias is None else (bias.float() / s).to(bias.dtype)
    return new_weight, new_bias


def fold_scales_into_linear(
    weight: Tensor, bias: Tensor | None, scales: Tensor, rows: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Weight ``(out, in)`` and bias of a linear whose output rows `rows` are divided by `scales`.

    `rows` ``(channels,)`` selects the output channels that feed the scaled linears (v's rows
    inside a fused qkv, up's half of a fused gate_up); None means all rows, in order.
    """
    s = scales.float().to(weight.device)
    index = rows if rows is not None else torch.arange(weight.shape[0])
    index = index.to(weight.device)
    new_weight = weight.detach().float().clone()  # (out, in)
    new_weight[index] /= s[:, None]
    new_bias = None
    if bias is not None:
        new_bias = bias.detach().float().clone()
        new_bias[index] /= s
        new_bias = new_bias.to(bias.dtype)
    return new_weight.to(weight.dtype), new_bias


def fold_scales_into_quantized(
    qw: QuantizedWeight, scales: Tensor, rows: Tensor | None = None
) -> QuantizedWeight:
    """`fold_scales_into_linear` for a weight already on its integer grid: divide the rows' scales.

    Exact: a row's levels and zero points do not change when the whole row is divided by a
    positive factor, only its scales do (and min/max rounding would have picked the same levels).
    """
    s = scales.float().to(qw.scale.device)
    index = rows if rows is not None else torch.arange(qw.scale.shape[0])
    index = index.to(qw.scale.device)
    scale = qw.scale.float().clone()  # (out, n_groups)
    scale[index] /= s[:, None]
    return QuantizedWeight(
        q=qw.q, scale=scale.to(qw.scale.dtype), zero=qw.zero, grid=qw.grid, g_idx=qw.g_idx
    )


def awq_clip_search(
    W: Tensor,
    X: Tensor,
    grid: QuantGrid,
    *,
    clip_grid: int = CLIP_GRID,
    max_shrink: float = CLIP_MAX_SHRINK,
    scale_dtype: torch.dtype | None = None,
) -> Tensor:
    """Range ratios ``(out * n_groups, 1)`` minimising each group's output error on `X`.

    For every row and group of `W` ``(out, in)`` the range is shrunk by ``1 - i / clip_grid`` for
    ``i < max_shrink * clip_grid`` and the ratio with the smallest
    ``mean_t (x_t[group] . (W - Q(W))[row, group])^2`` over the inputs `X` ``(tokens, in)`` wins.
    Ratio 1.0 (plain min/max) is a candidate, so the error on `X` never increases. The work is
    ``out * in * tokens`` per candidate, so `X` is a subsample (AWQ uses 512 tokens).
    """
    out_features, in_features = W.shape
    n_groups = grid.num_groups(in_features)
    group = in_features // n_groups
    sdtype = resolve_scale_dtype(W, scale_dtype)
    Xg = X.float().reshape(-1, n_groups, group)  # (T, n_g, g)
    tokens = Xg.shape[0]
    rows = W.detach().float().reshape(out_features * n_groups, group)  # (out * n_g, g)
    best_err = torch.full((out_features, n_groups), math.inf, device=W.device)
    best_ratio = torch.ones(out_features, n_groups, device=W.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_groups * tokens))
    for i in range(max(1, int(max_shrink * clip_grid))):
        ratio = 1.0 - i / clip_grid
        scale, zero = compute_qparams(rows, grid.bits, grid.symmetric, ratio, scale_dtype=sdtype)
        levels = quantize(rows, scale, zero, grid.bits, grid.symmetric).float()
        offset = 0.0 if grid.symmetric else zero.float()
        deq = (levels - offset) * scale.float()  # (out * n_g, g)
        diff = (deq - rows).reshape(out_features, n_groups, group)  # (out, n_g, g)
        err = torch.empty(out_features, n_groups, device=W.device)
        for start in range(0, out_features, chunk):
            part = diff[start : start + chunk]  # (c, n_g, g)
            # Per row and group: the partial output error sum_k x[t, g, k] * dW[o, g, k].
            partial = torch.einsum("tgk,ogk->ogt", Xg, part)  # (c, n_g, T)
            err[start : start + chunk] = partial.square().mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio.reshape(out_features * n_groups, 1)


def quantize_with_clip(
    W: Tensor,
    grid: QuantGrid,
    ratio: Tensor | None = None,
    *,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Round `W` ``(out, in)`` to `grid` with each row/group range shrunk by `ratio`.

    `ratio` ``(out * n_groups, 1)`` comes from `awq_clip_search`; None is plain min/max (RTN).
    Scales are stored in `scale_dtype` (default: `W`'s dtype), as the checkpoint will hold them.
    """
    if ratio is None:
        return rtn_quantize(W, grid, scale_dtype=scale_dtype)
    out_features, in_features = W.shape
    n_groups = grid.num_groups(in_features)
    rows = W.detach().float().reshape(out_features * n_groups, in_features // n_groups)
    scale, zero = compute_qparams(
        rows,
        grid.bits,
        grid.symmetric,
        ratio.to(rows.device),
        scale_dtype=resolve_scale_dtype(W, scale_dtype),
    )  # (out * n_groups, 1) each
    return quantize_groups(rows, scale, zero, grid, out_features)


def output_sq_error(H: Tensor, delta: Tensor) -> float:
    """``tr(dW H dW^T)`` for a weight change `delta` ``(out, in)``.

    With the calibration engine's ``H = 2/n sum_t x_t x_t^T`` ``(in, in)`` this is
    ``2/n ||X dW^T||^2`` over the n calibration tokens: the output error on every token for
    O(out * in^2) work, whatever the token count.
    """
    delta = delta.float()
    return max(float(((delta @ H.float()) * delta).sum()), 0.0)


def relative_output_error(H: Tensor, W_ref: Tensor, W_new: Tensor) -> float:
    """``||X W_new^T - X W_ref^T|| / ||X W_ref^T||`` from the inputs' ``H`` (`output_sq_error`)."""
    diff = output_sq_error(H, W_new.float() - W_ref.float())
    ref = output_sq_error(H, W_ref)
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / ref)


# ---------------------------------------------------------------------------------------------
# Where the scales go: the scaling groups of a block, from the architecture table.
# ---------------------------------------------------------------------------------------------

StageName = Literal["attn_in", "attn_out", "mlp_in", "mlp_out"]


@dataclass(frozen=True, eq=False)
class ScalingGroup:
    """Linears that read one input, and the op that produces it and absorbs ``1 / s``.

    Paths are relative to the block. Scales live in the space of `prev`'s output channels
    (`channels` of them); `expand` maps each input column of the linears to its scale.
    """

    linears: tuple[str, ...]
    prev: str
    prev_kind: Literal["norm", "linear"]
    channels: int
    # Gemma's (1 + w) norms: see fold_scales_into_norm.
    norm_offset: float = 0.0
    # (channels,) output rows of a `prev` linear that feed the linears; None: all rows.
    prev_rows: Tensor | None = None
    # (in_features,) scale index of each input column of the linears; None: the identity.
    expand: Tensor | None = None
    # Sub-module whose output the scale search compares; None: the linears' own outputs.
    inspect: str | None = None

    def input_scales(self, scales: Tensor) -> Tensor:
        """Per-channel scales ``(channels,)`` as seen by the linears' input columns."""
        return scales if self.expand is None else scales[self.expand.to(scales.device)]

    def salience(self, x_abs_mean: Tensor) -> Tensor:
        """Mean ``|x|`` of the linears' input columns, averaged onto the scale channels."""
        if self.expand is None:
            return x_abs_mean
        expand = self.expand.to(x_abs_mean.device)
        sums = torch.zeros(self.channels, device=x_abs_mean.device).index_add_(
            0, expand, x_abs_mean.float()
        )
        counts = torch.bincount(expand, minlength=self.channels).clamp(min=1)
        return sums / counts  # (channels,)


@dataclass(frozen=True, eq=False)
class Stage:
    """One engine group: linears solved together, with their scaling group if they have one."""

    name: StageName
    linears: tuple[str, ...]
    scaling: ScalingGroup | None
    # Why `scaling` is None, for the report.
    unscaled_reason: str | None = None


def _parent(path: str) -> str | None:
    parent = path.rpartition(".")[0]
    return parent or None


def _v_rows(spec: ArchSpec, qkv_out: int, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """Output rows of a fused qkv that hold v, by the table's layout."""
    if spec.qkv_layout == "blocked":  # [all q | all k | all v]
        expected = (heads + 2 * kv_heads) * head_dim
        v_rows = torch.arange(kv_heads * head_dim) + (heads + kv_heads) * head_dim
    else:  # "per_head": for each head [q | k | v]; GPT-NeoX has no grouped-query attention
        expected = 3 * heads * head_dim
        head = torch.arange(heads).repeat_interleave(head_dim)
        v_rows = head * 3 * head_dim + 2 * head_dim + torch.arange(head_dim).repeat(heads)
    if qkv_out != expected or (spec.qkv_layout == "per_head" and kv_heads != heads):
        raise UnsupportedArchitectureError(
            f"fused {spec.qkv_proj} has {qkv_out} outputs, not the {expected} its {spec.name} "
            f"layout implies ({heads} heads, {kv_heads} kv heads, head_dim {head_dim})"
        )
    return v_rows


def block_stages(spec: ArchSpec, model_config: Any, block: nn.Module) -> list[Stage]:
    """The four stages of a block in execution order, each with its scaling group (or why none).

    Raises `UnsupportedArchitectureError` for GPT-2 style Conv1D blocks and for shapes that do
    not match the table's layout (the scales would land on the wrong channels).
    """
    if spec.linear_kind != "linear":
        raise UnsupportedArchitectureError(_unsupported_message(spec))
    heads, kv_heads, head_dim = attention_geometry(model_config, spec)
    pre_norm = is_pre_norm(model_config, spec)
    post_norm_reason = (
        "post-norm model: the norm does not produce the linears' inputs, so it cannot absorb scales"
    )
    offset = spec.norm_weight_offset
    attention = tuple(p for p in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj) if p)
    first = get_module(block, attention[0])
    hidden = linear_in_out(first)[0]
    stages: list[Stage] = []

    # attention norm -> q, k, v
    attn_in = ScalingGroup(attention, spec.attn_norm, "norm", hidden, offset, inspect=spec.attn)
    stages.append(
        Stage(
            "attn_in",
            attention,
            attn_in if pre_norm else None,
            None if pre_norm else post_norm_reason,
        )
    )

    # v -> o: one scale per v output channel, repeated for each query head of its kv group.
    attn_out = _v_to_o_group(spec, block, heads, kv_heads, head_dim)
    stages.append(Stage("attn_out", (spec.o_proj,), attn_out))

    # MLP norm -> gate, up (or the single MLP input)
    mlp_module = _parent(spec.mlp_down)
    if spec.mlp_norm is not None and pre_norm:
        mlp_in: ScalingGroup | None = ScalingGroup(
            spec.mlp_up, spec.mlp_norm, "norm", hidden, offset, inspect=mlp_module
        )
        reason = None
    else:
        mlp_in, reason = None, post_norm_reason
    stages.append(Stage("mlp_in", spec.mlp_up, mlp_in, reason))

    # up -> down, when a scale can pass between them
    mlp_out, reason = _up_to_down_group(spec, block)
    stages.append(Stage("mlp_out", (spec.mlp_down,), mlp_out, reason))
    return stages


def _v_to_o_group(
    spec: ArchSpec, block: nn.Module, heads: int, kv_heads: int, head_dim: int
) -> ScalingGroup:
    """The v -> o scaling group: one scale per v output channel (v_proj's, or the v rows of a
    fused qkv), repeated for each query head of its kv group. Raises
    `UnsupportedArchitectureError` when the shapes do not match the attention geometry."""
    o_in = linear_in_out(get_module(block, spec.o_proj))[0]
    v_channels = kv_heads * head_dim
    if spec.v_proj is not None:
        v_path, v_rows = spec.v_proj, None
        v_out = linear_in_out(get_module(block, spec.v_proj))[1]
        if v_out != v_channels:
            raise UnsupportedArchitectureError(
                f"{spec.v_proj} has {v_out} outputs, expected {kv_heads} kv heads x {head_dim}"
            )
    else:
        assert spec.qkv_proj is not None  # the table has either v_proj or a fused qkv
        v_path = spec.qkv_proj
        qkv_out = linear_in_out(get_module(block, spec.qkv_proj))[1]
        v_rows = _v_rows(spec, qkv_out, heads, kv_heads, head_dim)
    if o_in != heads * head_dim or heads % kv_heads:
        raise UnsupportedArchitectureError(
            f"{spec.o_proj} reads {o_in} inputs, not {heads} heads x {head_dim}; the v -> o "
            "scales would not line up"
        )
    expand = None
    if kv_heads != heads:
        column = torch.arange(o_in)
        # repeat_kv: query head h reads kv head h // (heads / kv_heads).
        expand = (column // head_dim // (heads // kv_heads)) * head_dim + column % head_dim
    return ScalingGroup(
        (spec.o_proj,), v_path, "linear", v_channels, prev_rows=v_rows, expand=expand
    )


def _up_to_down_group(spec: ArchSpec, block: nn.Module) -> tuple[ScalingGroup | None, str | None]:
    """The up -> down scaling group, or None and why when no scale passes the activation."""
    inter = linear_in_out(get_module(block, spec.mlp_down))[0]
    if spec.mlp_gated and spec.fused_gate_up:
        # Phi-3: gate, up = gate_up(x).chunk(2); the up half is rows [inter, 2 * inter).
        rows = torch.arange(inter) + inter
        group = ScalingGroup((spec.mlp_down,), spec.mlp_up[0], "linear", inter, prev_rows=rows)
        return group, None
    if spec.mlp_gated:
        # The table lists (gate, up); down(act(gate(x)) * up(x)) is linear in up's rows.
        return ScalingGroup((spec.mlp_down,), spec.mlp_up[-1], "linear", inter), None
    if isinstance(get_module(block, spec.mlp_act), nn.ReLU):
        return ScalingGroup((spec.mlp_down,), spec.mlp_up[0], "linear", inter), None
    act = type(get_module(block, spec.mlp_act)).__name__
    return None, f"{act}: a scale does not pass through this activation (only through a ReLU)"


def _tensor(module: nn.Module, name: str = "weight") -> Tensor | None:
    """A module's parameter as a Tensor (None when absent), for the type checker's benefit."""
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def _weight(module: nn.Module) -> Tensor:
    weight = _tensor(module)
    if weight is None:
        raise UnsupportedArchitectureError(f"{type(module).__name__} has no weight tensor")
    return weight


def apply_scales(block: nn.Module, group: ScalingGroup, scales: Tensor) -> None:
    """Multiply the group's input columns by `scales` ``(channels,)`` and fold ``1 / s`` into
    the previous op, in place. The block computes the same function (up to rounding)."""
    with torch.no_grad():
        for path in group.linears:
            weight = _weight(get_module(block, path))
            s_in = group.input_scales(scales.float().to(weight.device))  # (in,)
            weight.copy_((weight.float() * s_in).to(weight.dtype))
        prev = get_module(block, group.prev)
        weight, bias = _weight(prev), _tensor(prev, "bias")
        if group.prev_kind == "norm":
            new_weight, new_bias = fold_scales_into_norm(weight, bias, scales, group.norm_offset)
        else:
            new_weight, new_bias = fold_scales_into_linear(weight, bias, scales, group.prev_rows)
        weight.copy_(new_weight)
        if bias is not None and new_bias is not None:
            bias.copy_(new_bias)


def _unsupported_message(spec: ArchSpec) -> str:
    supported = sorted(mt for s in ARCH_SPECS if s.linear_kind == "linear" for mt in s.model_types)
    return (
        f"AWQ does not support {spec.name}: its Conv1D layers cannot be stored in the "
        f"compressed-tensors format. Supported model types: {', '.join(supported)}"
    )


# ---------------------------------------------------------------------------------------------
# The calibrator plugged into the engine.
# ---------------------------------------------------------------------------------------------


@dataclass
class _StageState:
    """A stage of the current block while the engine walks it."""

    stage: Stage
    # Full names of the stage's targeted linears: the engine group.
    targets: list[str]
    # Statistics of the stage's common input: mean |x| (salience) and H = 2/n sum x x^T (exact
    # output errors of a linear on every calibration token, see output_sq_error).
    norms: ChannelNormObserver = field(default_factory=ChannelNormObserver)
    hessian: HessianObserver = field(default_factory=HessianObserver)
    # Every `stride`-th input token, for the clip search: (<= CLIP_MAX_TOKENS, in) in all.
    clip_inputs: list[Tensor] = field(default_factory=list)
    seen: int = 0
    # Captured calls of the inspected sub-module: (args, kwargs, reference output).
    calls: list[tuple[tuple[Any, ...], dict[str, Any], Tensor]] = field(default_factory=list)
    recorded: int = 0  # tokens in `calls`
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _first_output(output: Any) -> Tensor:
    # Attention modules return (output, weights); MLPs return the tensor.
    return output if isinstance(output, Tensor) else output[0]


@contextlib.contextmanager
def _weights_replaced(
    modules: Mapping[str, nn.Module], weights: Mapping[str, Tensor]
) -> Iterator[None]:
    """Temporarily give modules other weights (the scale search's candidates)."""
    saved = {path: _weight(modules[path]).detach().clone() for path in weights}
    try:
        with torch.no_grad():
            for path, weight in weights.items():
                target = _weight(modules[path])
                target.copy_(weight.to(target.dtype))
        yield
    finally:
        with torch.no_grad():
            for path, weight in saved.items():
                _weight(modules[path]).copy_(weight)


class AWQCalibrator(BlockCalibrator):
    """Searches, folds and quantizes each block's scaling groups during the engine's walk.

    Per block the engine runs one pass per stage with hooks on the stage's targeted linears
    (`observe` accumulates their common input's statistics); a forward hook of this class on
    the stage's inspected sub-module (attention, MLP) records its arguments and output in the
    same pass, for the first `search_tokens` tokens. `solve` of the stage's first linear then
    does the whole stage, so the next stage's pass sees the already-quantized, already-scaled
    layers before it.

    `total_tokens` (the calibration set's size) sets the stride of the clip search's token
    subsample, which is spread over all samples.
    """

    def __init__(
        self,
        grids: Mapping[str, QuantGrid],
        *,
        grid_points: int,
        clip_search: bool,
        total_tokens: int,
        search_tokens: int = SEARCH_MAX_TOKENS,
    ) -> None:
        self.grids = grids
        self.grid_points = grid_points
        self.clip_search = clip_search
        self.search_tokens = search_tokens
        self.clip_stride = max(1, math.ceil(total_tokens / CLIP_MAX_TOKENS))
        self.quantized: dict[str, QuantizedWeight] = {}
        self.layers: list[dict[str, Any]] = []
        self.searches: list[dict[str, Any]] = []
        self.unscaled: dict[str, str] = {}
        self._ctx: BlockContext | None = None
        self._stages: list[_StageState] = []
        self._current = 0
        self._solving = False
        self._handles: list[Any] = []

    # -- engine hooks -------------------------------------------------------------------------

    def start_block(self, ctx: BlockContext) -> None:
        self._ctx = ctx
        self._current = 0
        self._stages = []
        for stage in block_stages(ctx.spec, ctx.config, ctx.block):
            targets = [ctx.full_name(p) for p in stage.linears if ctx.full_name(p) in self.grids]
            if not targets:
                continue
            state = _StageState(stage, targets)
            self._stages.append(state)
            if stage.scaling is None:
                self.unscaled.setdefault(stage.name, stage.unscaled_reason or "")
            elif stage.scaling.inspect is not None:
                module = get_module(ctx.block, stage.scaling.inspect)
                self._handles.append(
                    module.register_forward_hook(self._recorder(state), with_kwargs=True)
                )

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        return [list(state.targets) for state in self._stages]

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        state = self._stages[self._current]
        if name != state.targets[0]:  # the stage's linears share this input
            return
        inp = inp.detach()  # (tokens, in)
        state.norms.update(inp)
        state.hessian.update(inp)
        # The same global stride across mini-batches: token t is kept when t % stride == 0.
        first = -state.seen % self.clip_stride
        state.clip_inputs.append(inp[first :: self.clip_stride].clone())
        state.seen += inp.shape[0]

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float] | None:
        state = self._stages[self._current]
        if name == state.targets[0]:
            self._solving = True
            try:
                self._solve_stage(state)
            finally:
                self._solving = False
        if name == state.targets[-1]:
            self._current += 1
            # The stage's activations are no longer needed; free them before the next pass.
            state.clip_inputs.clear()
            state.calls.clear()
        return state.metrics.get(name)

    def end_block(self, ctx: BlockContext) -> None:
        self.close()
        self._stages = []
        self._ctx = None

    def close(self) -> None:
        """Remove the forward hooks (also after an error inside the walk)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, state: _StageState) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            # Record only during this stage's pass (not the other stages', not the replay, not
            # the scale search's own re-runs of the module), and only up to the token budget.
            active = self._current < len(self._stages) and self._stages[self._current] is state
            if active and not self._solving and state.recorded < self.search_tokens:
                reference = _first_output(output).detach()  # (batch, seq, hidden)
                state.calls.append((args, dict(kwargs), reference))
                state.recorded += reference.numel() // reference.shape[-1]

        return hook

    # -- one stage ----------------------------------------------------------------------------

    def _solve_stage(self, state: _StageState) -> None:
        """Search the stage's scales (when it has a scaling group), fold them in, then
        clip-search and quantize each targeted linear of the stage."""
        ctx = self._ctx
        assert ctx is not None, "solve called outside a block"
        stage, block = state.stage, ctx.block
        H = state.hessian.hessian  # (in, in), of the inputs before this stage's scaling
        modules = {path: get_module(block, path) for path in stage.linears}
        targeted = [p for p in stage.linears if ctx.full_name(p) in self.grids]
        originals = {p: _weight(modules[p]).detach().float().clone() for p in targeted}  # (out, in)
        alpha: float | None = None
        s_in = torch.ones(H.shape[0], device=H.device)  # (in,)

        group = stage.scaling
        if group is not None:
            result = self._search_scales(state, group, H, modules, targeted, originals)
            alpha = result.alpha
            s_in = group.input_scales(result.scales.to(H.device))

        # The clip search reads what the linears now read: the inputs divided by s.
        X_clip = torch.cat(state.clip_inputs).float() / s_in  # (<= CLIP_MAX_TOKENS, in)
        for path in targeted:
            self._quantize_linear(
                state, path, modules[path], H, originals[path], X_clip, s_in, alpha
            )

    def _search_scales(
        self,
        state: _StageState,
        group: ScalingGroup,
        H: Tensor,
        modules: Mapping[str, nn.Module],
        targeted: Sequence[str],
        originals: Mapping[str, Tensor],
    ) -> ScaleSearchResult:
        """Search the group's scales and fold them into the block (and into `prev`'s quantized
        weight when an earlier stage quantized it); records the search for the report."""
        ctx = self._ctx
        assert ctx is not None
        block = ctx.block
        loss = self._candidate_loss(state, H, modules, targeted, originals)
        result = awq_scale_search(group.salience(state.norms.abs_mean), loss, self.grid_points)
        apply_scales(block, group, result.scales)
        prev_name = ctx.full_name(group.prev)
        if prev_name in self.quantized:
            # v or up was quantized in an earlier stage: keep the grid and the fake-quantized
            # weight in step with the folded scales.
            qw = fold_scales_into_quantized(
                self.quantized[prev_name], result.scales.cpu(), group.prev_rows
            )
            self.quantized[prev_name] = qw
            prev_weight = _weight(get_module(block, group.prev))
            with torch.no_grad():
                prev_weight.copy_(qw.dequantize().to(prev_weight.device, prev_weight.dtype))
        self.searches.append(
            {
                "block": ctx.index,
                "stage": state.stage.name,
                "alpha": result.alpha,
                "loss": result.loss,
                "rtn_loss": result.losses[0],
            }
        )
        return result

    def _quantize_linear(
        self,
        state: _StageState,
        path: str,
        module: nn.Module,
        H: Tensor,
        original: Tensor,
        X_clip: Tensor,
        s_in: Tensor,
        alpha: float | None,
    ) -> None:
        """Clip-search (unless q/k) and quantize one (already scaled) linear in place; keep its
        integers on the CPU and record its errors against `original` and against plain RTN."""
        ctx = self._ctx
        assert ctx is not None
        name = ctx.full_name(path)
        grid = self.grids[name]
        weight = _weight(module)
        W = weight.detach().float()  # (out, in), scaled
        clip = self.clip_search and path not in (
            ctx.spec.q_proj,
            ctx.spec.k_proj,
            ctx.spec.qkv_proj,
        )
        ratio = awq_clip_search(W, X_clip, grid, scale_dtype=weight.dtype) if clip else None
        qw = quantize_with_clip(W, grid, ratio, scale_dtype=weight.dtype)
        deq = qw.dequantize()  # (out, in)
        with torch.no_grad():
            weight.copy_(deq.to(weight.dtype))
        # Both errors on the unscaled inputs: the effective weight is deq / s.
        rel = relative_output_error(H, original, deq.float() / s_in)
        rtn = rtn_quantize(original, grid, scale_dtype=weight.dtype).dequantize()
        rtn_rel = relative_output_error(H, original, rtn)
        # The integers leave the compute device: only one block lives there at a time.
        self.quantized[name] = QuantizedWeight(
            q=qw.q.cpu(),
            scale=qw.scale.cpu(),
            zero=None if qw.zero is None else qw.zero.cpu(),
            grid=grid,
        )
        metrics = {"rel_error": rel, "rtn_rel_error": rtn_rel}
        if alpha is not None:
            metrics["alpha"] = alpha
        state.metrics[name] = metrics
        self.layers.append(
            {
                "name": name,
                "bits": grid.bits,
                "rel_error": rel,
                "sqnr_db": sqnr_db(rel),
                "rtn_rel_error": rtn_rel,
                "alpha": alpha,
                "clip": clip,
            }
        )

    def _candidate_loss(
        self,
        state: _StageState,
        H: Tensor,
        modules: Mapping[str, nn.Module],
        targeted: Sequence[str],
        originals: Mapping[str, Tensor],
    ) -> Callable[[Tensor], float]:
        """The scale search's objective: mean squared output error with candidate scales."""
        ctx = self._ctx
        assert ctx is not None and state.stage.scaling is not None
        group = state.stage.scaling
        dtypes = {p: _weight(modules[p]).dtype for p in targeted}
        grids = {p: self.grids[ctx.full_name(p)] for p in targeted}
        inspect = get_module(ctx.block, group.inspect) if group.inspect is not None else None

        def candidates(scales: Tensor) -> dict[str, Tensor]:
            s_in = group.input_scales(scales.to(H.device))  # (in,)
            return {
                p: scaled_fake_quant(originals[p], s_in, grids[p], scale_dtype=dtypes[p])
                for p in targeted
            }

        if inspect is not None and state.calls:

            def module_loss(scales: Tensor) -> float:
                diff, count = 0.0, 0
                with _weights_replaced(modules, candidates(scales)):
                    for args, kwargs, reference in state.calls:
                        out = _first_output(inspect(*args, **kwargs))
                        diff += float((out.float() - reference.float()).square().sum())
                        count += reference.numel()
                return diff / max(1, count)

            return module_loss

        def linear_loss(scales: Tensor) -> float:
            # tr(dW H dW^T) / 2 is the summed squared error per token; divide by the outputs.
            diff, outputs = 0.0, 0
            for path, W_new in candidates(scales).items():
                diff += output_sq_error(H, W_new - originals[path]) / 2.0
                outputs += W_new.shape[0]
            return diff / max(1, outputs)

        return linear_loss


# ---------------------------------------------------------------------------------------------
# Orchestration.
# ---------------------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def plan_awq_grids(model: nn.Module, config: AWQConfig) -> dict[str, QuantGrid]:
    """Every targeted linear's grid; all problems are reported before any work starts.

    One asymmetric grid for every layer is allowed: it reloads through `load_compressed`."""
    spec = get_arch(model)
    if spec.linear_kind != "linear":
        raise UnsupportedArchitectureError(_unsupported_message(spec))
    plan = plan_grids(model, config, allow_asymmetric=True)
    return {name: grid for name, (_, grid) in plan.items()}


def _describe(config: AWQConfig) -> str:
    group = f"groups of {config.group_size}" if config.group_size else "per-channel scales"
    grid = "symmetric" if config.symmetric else "asymmetric"
    return f"{config.bits}-bit {grid} integer weights, {group}"


def _apply_awq(model: nn.Module, config: AWQConfig, ctx: QuantizeContext) -> QuantizationOutcome:
    if ctx.calibration is None:
        raise UserInputError("awq needs calibration data: pass --calibration-data")
    grids = plan_awq_grids(model, config)
    calibrator = AWQCalibrator(
        grids,
        grid_points=config.scale_grid,
        clip_search=config.clip_search,
        total_tokens=int(ctx.calibration.numel()),
    )
    started = time.perf_counter()
    stream_packed(model, calibrator.quantized)
    try:
        report = run_calibration(
            model,
            ctx.calibration,
            calibrator,
            device=ctx.device,
            batch_size=config.calibration.batch_size,
            precision=config.calibration.precision,
            progress=ctx.progress,
        )
    finally:
        calibrator.close()
    missing = sorted(set(grids) - set(calibrator.quantized))
    if missing:
        raise UserInputError(
            f"{len(missing)} targeted layer(s) never ran during calibration (e.g. {missing[0]}); "
            "they cannot be quantized with AWQ"
        )
    scaled = sorted({s["stage"] for s in calibrator.searches})
    steps = [
        f"AWQ: {_describe(config)}; scales searched over {config.scale_grid} exponents in [0, 1] "
        f"({', '.join(scaled) or 'no scaling group'})"
        + (", output-error clip search (q/k excluded)" if config.clip_search else "")
        + f"; calibrated on {report.num_samples} x {report.seq_len} tokens"
    ]
    steps += [f"AWQ: {stage} not scaled: {why}" for stage, why in calibrator.unscaled.items()]
    rows = sorted(calibrator.layers, key=lambda r: r["rel_error"], reverse=True)
    quantized = calibrator.quantized

    return QuantizationOutcome(
        model=model,
        writer=compressed_writer(model, quantized),
        format=FORMAT,
        steps=steps,
        report={
            "layers": len(quantized),
            "calibration_seconds": round(time.perf_counter() - started, 3),
            "calibration_tokens": report.tokens,
            "calibration_precision": report.precision,
            "sensitivity_kind": "relative output error on the calibration data (AWQ vs RTN)",
            "sensitivity": rows,
            # The same layers, inputs and grids rounded to nearest without scales or clipping.
            "mean_rel_error": _mean(row["rel_error"] for row in rows),
            "mean_rtn_rel_error": _mean(row["rtn_rel_error"] for row in rows),
            "scales": calibrator.searches,
            "unscaled": dict(calibrator.unscaled),
            "blocks": [
                {"index": b.index, "rel_error": b.rel_error, "seconds": b.seconds}
                for b in report.blocks
            ],
        },
    )


def _check(model: nn.Module, config: AWQConfig) -> None:
    plan_awq_grids(model, config)


apply = register_method("awq", AWQConfig, needs_calibration=True, check=_check)(_apply_awq)
