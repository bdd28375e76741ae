"""HQQ: Half-Quadratic Quantization, a data-free fit of each group's zero point (and scale).

Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", Mobius Labs blog,
November 2023 (https://mobiusml.github.io/hqq_blog/); reference code mobiusml/hqq,
``hqq/core/optimize.py`` (``optimize_weights_proximal_legacy``).

Round-to-nearest on a min/max grid lets a group's two extreme weights set its range. HQQ instead
fits the grid to the weights under an lp error with ``p < 1``, which is nearly indifferent to how
far the few worst-rounded weights are off and so tracks the bulk of the group. The problem
``min_z ||W - s (Q_z(W) - z)||_p^p`` is split half-quadratically with an auxiliary error ``W_e``
and solved by alternating closed-form steps, starting from the asymmetric min/max grid:

1. ``q = clamp(round(W / s + z))``, the nearest levels;
2. ``W_e = shrink_lp(W - s (q - z), beta)``: the generalised soft-thresholding of the residual,
   the proximal step of the lp norm (its large entries are the outliers the fit may ignore);
3. ``z = mean(q - (W - W_e) / s)`` over the group, the zero point of the quadratic subproblem;
4. ``beta *= kappa``: the splitting tightens at every step.

The paper keeps a float zero point. compressed-tensors stores it as an integer level (and
vLLM's kernels read it so), and rounding the paper's zero at the end undoes the fit: its steps
move the min/max zero by less than half a level, so the rounded result is round-to-nearest again
(measured on stories260K and random heavy-tailed weights: the same SQNR to 0.01 dB). Here the
zero of step 3 is therefore rounded and clamped to the grid at every step, and step 3 continues
with the closed-form scale for that integer zero and the current levels, the least-squares
``s = <W - W_e, q - z> / ||q - z||^2``: with the zero on the integers the scale is the one
continuous parameter left to fit. What is stored (integer levels, integer zero, scale in the
model's dtype) is exactly what was optimised.

Early stopping as in the reference code, except that each group keeps the parameters of its
lowest squared error seen (the quantity weight SQNR measures; the reference watches the mean
absolute error of the whole tensor and keeps its last parameters): the loop ends when the total
squared error stops decreasing, or after ``iterations`` steps. Starting from round-to-nearest,
no group ends worse than round-to-nearest on the same grid (``iterations=0`` is exactly it).

With ``beta = 10`` and ``p = 0.7`` the shrink keeps only residuals above
``beta^(-1 / (2 - p))`` (about 0.17) as outliers, far above the rounding error of ordinary LLM
weights, so on those the steps reduce to alternating least squares of zero and scale, as in
the reference implementation with its defaults; larger ``beta`` makes the fit robust to smaller
residuals.

Output: the same compressed-tensors pack-quantized checkpoint as RTN writes for an asymmetric
grid (integer levels, integer zero points, scales in the model's dtype), with the model kept
fake-quantized in memory. transformers 5 with compressed-tensors 0.18 to 0.20 loads asymmetric
checkpoints through ``CompressedTensorsConfig(dequantize=True)`` (`load_compressed`) only; a
plain ``from_pretrained`` fails on the packed zero points (see `compressed_tensors_format`).

Cost: no calibration data. Per linear, ``iterations`` passes of O(out * in) element-wise work
(about ten tensor operations each; early stopping typically ends after 8 to 12), on the compute
device one linear at a time, with about four float32 copies of that weight as working memory.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...config import IntWeightConfig
from ...errors import UserInputError
from ..metrics import sensitivity_table, sqnr_db
from .base import QuantizationOutcome, QuantizeContext, register_method
from .compressed_tensors_format import compressed_writer, plan_grids
from .grid import (
    QuantGrid,
    QuantizedWeight,
    check_group_size,
    compute_qparams,
    dequantize,
    level_range,
    quantize,
    quantize_groups,
    resolve_scale_dtype,
)
from .rtn import rtn_quantize

FORMAT = "compressed-tensors/pack-quantized"


class HQQConfig(IntWeightConfig):
    """HQQ (Badri & Shaji 2023): data-free half-quadratic fit of each group's zero point."""

    method: Literal["hqq"] = "hqq"
    symmetric: Literal[False] = Field(
        default=False,
        description="Always false: HQQ fits the zero point, so its grid is asymmetric.",
    )
    iterations: int = Field(
        default=20,
        ge=0,
        le=1000,
        description="Most half-quadratic steps per layer (early stopping usually ends sooner); "
        "0 is round-to-nearest on the asymmetric min/max grid.",
    )
    lp_norm: float = Field(
        default=0.7,
        gt=0.0,
        le=1.0,
        description="p of the lp error the solver fits; below 1 it tolerates a few large errors.",
    )
    beta: float = Field(
        default=10.0, gt=0.0, description="Initial weight of the half-quadratic coupling."
    )
    kappa: float = Field(
        default=1.01, ge=1.0, le=10.0, description="Growth factor of beta at every step."
    )
    early_stop: bool = Field(
        default=True, description="Stop when the total squared weight error stops decreasing."
    )


# ---------------------------------------------------------------------------------------------
# Tensor math.
# ---------------------------------------------------------------------------------------------


def shrink_lp(x: Tensor, beta: float, lp_norm: float) -> Tensor:
    """The generalised soft-thresholding of HQQ: ``sign(x) relu(|x| - |x|^(p-1) / beta)``.

    The proximal step of ``|x|^p`` with weight ``beta`` for ``p <= 1`` (one fixed-point step of the
    generalised iterated shrinkage, as in the reference code); ``p = 1`` is the ordinary soft
    threshold ``sign(x) relu(|x| - 1 / beta)``. Entries with ``|x| <= beta^(-1 / (2 - p))``
    become 0 (there ``|x|^(2-p) <= 1 / beta``), the others keep their sign and shrink toward 0.
    """
    magnitude = x.abs()
    # Only the entries above the threshold need the power, the costly part of a step: usually
    # none of a weight's rounding errors (defaults), sometimes most of them (a large beta).
    kept = magnitude > beta ** (-1.0 / (2.0 - lp_norm))
    count = int(kept.sum())
    if count > x.numel() // 8:
        shrunk = magnitude - magnitude.pow(lp_norm - 1.0) / beta
        return torch.sign(x) * shrunk.clamp_min(0.0)
    out = torch.zeros_like(x)
    if count:
        m = magnitude[kept]
        out[kept] = torch.sign(x[kept]) * (m - m.pow(lp_norm - 1.0) / beta).clamp_min(0.0)
    return out


def _assign(
    rows: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest levels of ``rows`` ``(n, group)`` on float32 grids ``(scale, zero)`` ``(n, 1)``:
    the levels (as float), the residual ``W - s (q - z)`` and each row's squared error ``(n, 1)``.
    The operations of `grid.quantize` and `grid.dequantize`, in place."""
    q = torch.div(rows, scale).add_(zero).round_().clamp_(qmin, qmax)
    residual = torch.sub(rows, torch.sub(q, zero).mul_(scale))
    return q, residual, residual.square().sum(dim=1, keepdim=True)


def _levels_and_error(
    rows: Tensor, scale: Tensor, zero: Tensor, bits: int
) -> tuple[Tensor, Tensor]:
    """Nearest levels of ``rows`` ``(n, group)`` on the grids ``(scale, zero)`` ``(n, 1)``, as
    float, and each row's squared error ``(n, 1)``, dequantized in the scale's dtype."""
    q = quantize(rows, scale, zero, bits, symmetric=False)  # (n, group) int8
    residual = rows - dequantize(q, scale, zero).float()
    return q.float(), residual.square().sum(dim=1, keepdim=True)


def hqq_optimize(
    rows: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    *,
    iterations: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
) -> tuple[Tensor, Tensor, int]:
    """The half-quadratic solver on integer zero points (module docstring).

    Args:
        rows: ``(n, group)`` float32, one row per (output channel, group).
        scale, zero: ``(n, 1)`` the starting grid: a float32 scale and an integer-valued zero
            level in ``level_range(bits)``.

    Returns:
        ``(scale, zero, steps)``: the ``(n, 1)`` float32 scale and integer-valued float32 zero of
        each row's lowest squared error seen (the start included), and the steps taken.
    """
    qmin, qmax = level_range(bits)
    scale, zero = scale.float(), zero.float()
    q, residual, error = _assign(rows, scale, zero, qmin, qmax)
    best_scale, best_zero, best_error = scale, zero, error
    total = float(error.sum())
    steps = 0
    for _ in range(iterations):
        steps += 1
        outliers = shrink_lp(residual, beta, lp_norm)  # W_e: (n, group)
        target = rows - outliers
        # The paper's zero-point step, projected onto the integer levels ...
        zero = torch.round((q - target / scale).mean(dim=1, keepdim=True)).clamp_(qmin, qmax)
        # ... and the least-squares scale for that zero and these levels.
        codes = q - zero
        fitted = (target * codes).sum(dim=1, keepdim=True) / codes.square().sum(dim=1, keepdim=True)
        scale = torch.where(torch.isfinite(fitted) & (fitted > 0), fitted, scale)
        beta *= kappa
        q, residual, error = _assign(rows, scale, zero, qmin, qmax)
        better = error < best_error  # (n, 1)
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        new_total = float(error.sum())
        if early_stop and not new_total < total:
            break
        total = new_total
    return best_scale, best_zero, steps


def hqq_quantize(
    W: Tensor,
    bits: int,
    group_size: int | None,
    *,
    iterations: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantize ``W`` ``(out, in)`` to ``bits`` asymmetric integer levels with HQQ.

    Starts from the asymmetric min/max grid of every row (``group_size=None``) or group of
    ``group_size`` input columns (`grid.compute_qparams`) and runs `hqq_optimize`. The scale is
    then rounded to ``scale_dtype`` (default ``W.dtype``; use the dtype the model is saved in)
    and the levels are the nearest for that stored grid; a group whose error that rounding made
    worse than its starting grid's keeps the starting grid, so no group ends worse than
    round-to-nearest.

    Returns:
        a `QuantizedWeight` on ``QuantGrid(bits, symmetric=False, group_size)``: int8 levels in
        ``[-2^(bits-1), 2^(bits-1) - 1]`` (the unsigned codes ``0 .. 2^bits - 1`` offset by
        ``2^(bits-1)``, as compressed-tensors stores them) and int8 zero points in that range.

    Raises:
        UserInputError: for settings out of range or a group size that does not divide ``in``.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if iterations < 0:
        raise UserInputError(f"iterations must be at least 0, got {iterations}")
    if not 0.0 < lp_norm <= 1.0:
        raise UserInputError(f"lp_norm must be in (0, 1], got {lp_norm}")
    if not beta > 0.0:
        raise UserInputError(f"beta must be positive, got {beta}")
    if not kappa >= 1.0:
        raise UserInputError(f"kappa must be at least 1, got {kappa}")
    grid = QuantGrid(bits=bits, symmetric=False, group_size=group_size)
    out_features, in_features = W.shape
    check_group_size(in_features, group_size)
    group = group_size or in_features
    dtype = resolve_scale_dtype(W, scale_dtype)
    rows = W.detach().float().reshape(-1, group)  # (out * n_groups, group)
    start_scale, start_zero = compute_qparams(rows, bits, False, scale_dtype=dtype)  # (n, 1)
    scale, zero, _ = hqq_optimize(
        rows,
        start_scale,
        start_zero,
        bits,
        iterations=iterations,
        lp_norm=lp_norm,
        beta=beta,
        kappa=kappa,
        early_stop=early_stop,
    )
    stored = scale.to(dtype)
    eps = torch.full_like(stored, torch.finfo(dtype).eps)
    stored = torch.where(stored > 0, stored, eps)
    zero_levels = zero.to(torch.int8)
    _, error = _levels_and_error(rows, stored, zero_levels, bits)
    _, start_error = _levels_and_error(rows, start_scale, start_zero, bits)
    keep = error <= start_error  # (n, 1)
    final_scale = torch.where(keep, stored, start_scale)
    final_zero = torch.where(keep, zero_levels, start_zero)
    return quantize_groups(rows, final_scale, final_zero, grid, out_features)


# ---------------------------------------------------------------------------------------------
# Orchestration.
# ---------------------------------------------------------------------------------------------


def _rel_error(reference: Tensor, approx: Tensor) -> float:
    return float((approx.float() - reference).norm() / reference.norm().clamp_min(1e-12))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def apply_hqq(model: nn.Module, config: HQQConfig, ctx: QuantizeContext) -> QuantizationOutcome:
    """HQQ on every targeted linear, one at a time on ``ctx.device``; the model stays
    fake-quantized (its weights are the dequantized integers the checkpoint holds)."""
    plan = plan_grids(model, config, allow_asymmetric=True)
    quantized: dict[str, QuantizedWeight] = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with torch.no_grad():
        for name, (module, grid) in plan.items():
            weight = module.weight
            w = weight.detach().to(ctx.device, torch.float32)  # (out, in)
            qw = hqq_quantize(
                w,
                grid.bits,
                grid.group_size,
                iterations=config.iterations,
                lp_norm=config.lp_norm,
                beta=config.beta,
                kappa=config.kappa,
                early_stop=config.early_stop,
                scale_dtype=weight.dtype,
            )
            deq = qw.dequantize()  # (out, in) in the weight's dtype, as the loader computes it
            # The starting grid alone (round-to-nearest), for the report.
            rtn = rtn_quantize(w, grid, scale_dtype=weight.dtype).dequantize()
            rel, rtn_rel = _rel_error(w, deq), _rel_error(w, rtn)
            weight.copy_(deq.to(weight.device, weight.dtype))
            assert qw.zero is not None
            quantized[name] = QuantizedWeight(
                q=qw.q.cpu(), scale=qw.scale.cpu(), zero=qw.zero.cpu(), grid=qw.grid
            )
            rows.append(
                {
                    "name": name,
                    "bits": grid.bits,
                    "rel_error": rel,
                    "sqnr_db": sqnr_db(rel),
                    "rtn_rel_error": rtn_rel,
                    "rtn_sqnr_db": sqnr_db(rtn_rel),
                }
            )
    mean_sqnr = _mean([r["sqnr_db"] for r in rows if math.isfinite(r["sqnr_db"])])
    mean_rtn = _mean([r["rtn_sqnr_db"] for r in rows if math.isfinite(r["rtn_sqnr_db"])])
    group = f"groups of {config.group_size}" if config.group_size else "per-channel scales"
    step = (
        f"HQQ: {config.bits}-bit asymmetric integer weights, {group}; half-quadratic fit of "
        f"integer zero points and scales (lp {config.lp_norm}, beta {config.beta}, kappa "
        f"{config.kappa}, at most {config.iterations} steps"
        + (", early stopping" if config.early_stop else "")
        + ")"
    )
    if mean_sqnr is not None and mean_rtn is not None:
        step += (
            f"; mean weight SQNR {mean_sqnr:.2f} dB vs {mean_rtn:.2f} dB for round-to-nearest "
            "on the same grid"
        )

    return QuantizationOutcome(
        model=model,
        writer=compressed_writer(model, quantized),
        format=FORMAT,
        steps=[step],
        report={
            "layers": len(quantized),
            "hqq_seconds": round(time.perf_counter() - started, 3),
            "sensitivity_kind": "relative weight error (data-free; HQQ vs RTN on the same grid)",
            "sensitivity": sensitivity_table(rows, limit=len(rows)),
            "mean_rel_error": _mean([r["rel_error"] for r in rows]),
            "mean_rtn_rel_error": _mean([r["rtn_rel_error"] for r in rows]),
        },
    )


def check_hqq(model: nn.Module, config: HQQConfig) -> None:
    """What `apply_hqq` refuses, from shapes alone: a group size that does not divide a layer's
    width, targeted Conv1D layers, and several grids (bits overrides) with an asymmetric one,
    which transformers cannot load."""
    plan_grids(model, config, allow_asymmetric=True)


register_method("hqq", HQQConfig, needs_calibration=False, check=check_hqq)(apply_hqq)
