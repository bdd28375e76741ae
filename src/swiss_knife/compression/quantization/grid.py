"""Integer quantization grids: scales, zero points, quantize / dequantize, and `QuantizedWeight`.

Pure tensor math shared by round-to-nearest (`rtn.py`) and GPTQ (`gptq.py`). The conventions are
those of compressed-tensors (https://github.com/vllm-project/compressed-tensors,
`quantization/utils/helpers.py::calculate_qparams` and `quantization/lifecycle/forward.py`), the
format that transformers and vLLM load, so that exporting is a copy and not a conversion:

- ``b`` bits give signed integer levels ``[-2^(b-1), 2^(b-1) - 1]`` (int4: ``[-8, 7]``), kept in
  int8 storage;
- the observed range is widened to include 0 (``min <= 0 <= max``) so that 0 is exactly
  representable: zeroed (dead) input columns and padding stay exactly 0 after quantization;
- symmetric: ``zero = 0`` and ``scale = max(|min|, |max|) / ((2^b - 1) / 2)`` (int4: absmax / 7.5,
  so ``-absmax`` maps to -8 and ``+absmax`` to 7.5, which rounds to 8 and is clamped to 7: the
  full 16-level grid is used, one level more on the negative side);
- asymmetric: ``scale = (max - min) / (2^b - 1)`` and
  ``zero = round(clamp(qmin - min / scale, qmin, qmax))``, a signed integer level;
- a scale of exactly 0 (an all-zero row or group) becomes the scale dtype's eps;
- quantize: ``q = clamp(round(w / scale + zero), qmin, qmax)`` with round-half-to-even
  (``torch.round``);
- dequantize: ``(q - zero) * scale`` computed in the scale's dtype, the very operations the
  compressed-tensors decompressor runs at load time. A checkpoint written by
  `compressed_tensors_format` therefore reloads to exactly `QuantizedWeight.dequantize()`.

The optional clip search shrinks the observed ``[min, max]`` range per row (per output channel, or
per group) and keeps the shrink factor that minimises ``sum |w - Q(w)|^p``, as the ``mse`` option
of the reference GPTQ quantizer does (IST-DASLab/gptq, ``quant.py``: ``Quantizer.configure(
mse=True, norm=2.4, grid=100, maxshrink=.8)``, searched in ``find_params``) and llm-compressor's MSE observer (``observers/mse.py``,
``MovingAverageMSEObserver``: ``maxshrink=0.2, grid=100, norm=2.4``; our default
``clip_grid=20, max_shrink=0.2`` tries the same factors 1.00, 0.99, ..., 0.81, all of them,
without its early stop after 5 candidates that do not improve). Factor 1.0 is always a candidate,
so the search never increases that error. Cost: ``clip_grid`` quantize-dequantize passes over the tensor, O(clip_grid * numel)
time and O(numel) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from swiss_knife.errors import UserInputError

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int) -> None:
    """Raise `UserInputError` unless `bits` is an integer in [2, 8]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserInputError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def level_range(bits: int) -> tuple[int, int]:
    """The signed integer levels of a ``bits``-bit grid: ``(-2^(bits-1), 2^(bits-1) - 1)``."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def fitting_group_sizes(in_features: int) -> list[int]:
    """Group sizes that split ``in_features`` into at least two whole groups.

    The one rule the format has is that a group size divides the width (`check_group_size`;
    packing pads the words itself). The powers of two among the divisors are listed, being what
    quantized kernels (vLLM's Marlin/Machete) and most checkpoints use; a width with none (an
    odd one) gets all its divisors. Empty for a prime width: only per-channel scales fit.
    """
    divisors = [g for g in range(2, in_features // 2 + 1) if in_features % g == 0]
    powers = [g for g in divisors if g & (g - 1) == 0]
    return powers or divisors


def check_group_size(in_features: int, group_size: int | None) -> None:
    """Raise `UserInputError` if ``group_size`` does not split ``in_features`` into whole groups.

    A partial last group is NOT supported, because the checkpoint could not be loaded: with
    transformers 5.24, compressed-tensors 0.20 refuses to dequantize a row whose width is not a
    multiple of the group size ("tensor column shape must be divisible by the given group_size"),
    on both loading paths (0.17 only on the default one), and vLLM's grouped kernels need whole
    groups too. `tests/test_compressed_tensors_format.py` checks this against the installed
    version.
    """
    if group_size is None:
        return
    if in_features % group_size == 0:
        return
    fits = fitting_group_sizes(in_features)
    options = ", ".join(str(g) for g in fits)
    suggestion = f"group sizes that fit: {options}, or " if fits else "use "
    raise UserInputError(
        f"group size {group_size} does not divide the input width {in_features} of this layer "
        "(a partial last group cannot be loaded by compressed-tensors/transformers or served by "
        f"vLLM); {suggestion}per-channel scales (group_size=None)"
    )


@dataclass(frozen=True)
class QuantGrid:
    """An integer weight grid: bit width, symmetry and group size.

    ``group_size=None`` means one scale (and zero point) per output channel; otherwise every
    ``group_size`` consecutive input columns of a row share one.
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise UserInputError(
                f"group_size must be a positive integer or None (per channel), got "
                f"{self.group_size!r}"
            )

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def num_groups(self, in_features: int) -> int:
        """Scales per row for a layer ``in_features`` wide (checks that the groups are whole)."""
        check_group_size(in_features, self.group_size)
        return 1 if self.group_size is None else in_features // self.group_size


def resolve_scale_dtype(weight: Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype scales are stored in: ``scale_dtype``, else the weight's own floating dtype."""
    if scale_dtype is not None:
        return scale_dtype
    return weight.dtype if weight.is_floating_point() else torch.float32


def scale_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _qparams_from_range(
    xmin: Tensor,
    xmax: Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point from a float32 range that already contains 0: ``(rows, 1)`` each."""
    qmin, qmax = level_range(bits)
    steps = float((1 << bits) - 1)
    # Symmetric: the half-width of the range spans half the steps (int4: absmax / 7.5).
    scale = torch.maximum(-xmin, xmax) / (steps / 2) if symmetric else (xmax - xmin) / steps
    # Round the scale to its storage dtype first so that the levels below are chosen for the
    # scale the checkpoint will actually hold.
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, scale_eps(scale_dtype)), scale)
    if symmetric:
        zero = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    else:
        zero = torch.round(torch.clamp(qmin - xmin / scale.float(), qmin, qmax)).to(torch.int8)
    return scale, zero


def compute_qparams(
    w: Tensor,
    bits: int,
    symmetric: bool,
    clip_ratio: float | Tensor = 1.0,
    *,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Min/max scale and zero point of every row of ``w``, as compressed-tensors computes them.

    Args:
        w: ``(rows, cols)``: one row per output channel, or per (output channel, group).
        clip_ratio: shrinks the observed range ``[min, max]`` to ``ratio * [min, max]``; a float
            or a ``(rows, 1)`` tensor.
        scale_dtype: dtype of the returned scale (the dtype the checkpoint stores it in).

    Returns:
        ``scale`` ``(rows, 1)`` in ``scale_dtype`` and ``zero`` ``(rows, 1)`` int8 (all zeros
        when ``symmetric``).
    """
    check_bits(bits)
    w32 = w.detach().float()  # (rows, cols)
    xmin = torch.clamp(w32.amin(dim=1, keepdim=True), max=0.0)  # (rows, 1)
    xmax = torch.clamp(w32.amax(dim=1, keepdim=True), min=0.0)  # (rows, 1)
    if isinstance(clip_ratio, Tensor) or clip_ratio != 1.0:
        ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w32.device)
        xmin, xmax = xmin * ratio, xmax * ratio
    return _qparams_from_range(xmin, xmax, bits, symmetric, scale_dtype)


def quantize(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """Integer levels ``clamp(round(w / scale + zero), qmin, qmax)`` as int8.

    ``scale`` and ``zero`` broadcast against ``w`` (e.g. ``(rows, 1)`` for ``(rows, cols)``);
    ``zero`` is ignored when ``symmetric``.
    """
    qmin, qmax = level_range(bits)
    x = w.detach().float() / scale.float()
    if not symmetric and zero is not None:
        x = x + zero.float()
    return torch.clamp(torch.round(x), qmin, qmax).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """``(q - zero) * scale`` in the scale's dtype: the exact ops of compressed-tensors' loader."""
    x = q.to(scale.dtype)
    if zero is not None:
        x = x - zero.to(scale.dtype)
    return x * scale


def _lp_error(w: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, norm: float):
    """``sum |w - Q(w)|^norm`` of each row: ``(rows, 1)``."""
    wq = dequantize(quantize(w, scale, zero, bits, symmetric), scale, None if symmetric else zero)
    return (w - wq.float()).abs_().pow_(norm).sum(dim=1, keepdim=True)


def fit_qparams(
    w: Tensor,
    grid: QuantGrid,
    *,
    clip_search: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.2,
    norm: float = 2.4,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point for each row of ``w`` ``(rows, cols)``, optionally clip-searched.

    With ``clip_search`` the range of each row is shrunk by the factors
    ``1 - max_shrink * i / clip_grid`` for ``i = 0 .. clip_grid - 1`` and the factor with the
    smallest ``sum |w - Q(w)|^norm`` wins, independently per row. Factor 1.0 (plain min/max) is
    among the candidates, so the search never does worse than min/max on that error.
    """
    if clip_grid < 1:
        raise UserInputError(f"clip_grid must be at least 1, got {clip_grid}")
    if not 0.0 <= max_shrink < 1.0:
        raise UserInputError(f"max_shrink must be in [0, 1), got {max_shrink}")
    if norm <= 0:
        raise UserInputError(f"norm must be positive, got {norm}")
    w32 = w.detach().float()  # (rows, cols)
    xmin = torch.clamp(w32.amin(dim=1, keepdim=True), max=0.0)  # (rows, 1)
    xmax = torch.clamp(w32.amax(dim=1, keepdim=True), min=0.0)  # (rows, 1)
    bits, sym = grid.bits, grid.symmetric
    scale, zero = _qparams_from_range(xmin, xmax, bits, sym, scale_dtype)
    if not clip_search or clip_grid == 1 or max_shrink == 0.0:
        return scale, zero
    best = _lp_error(w32, scale, zero, bits, sym, norm)  # (rows, 1)
    # One candidate at a time over the whole tensor: memory stays O(numel), and the loop has
    # only clip_grid iterations.
    for i in range(1, clip_grid):
        ratio = 1.0 - max_shrink * i / clip_grid
        s, z = _qparams_from_range(xmin * ratio, xmax * ratio, bits, sym, scale_dtype)
        err = _lp_error(w32, s, z, bits, sym, norm)
        better = err < best  # (rows, 1)
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def fit_weighted_symmetric(
    w: Tensor, weights: Tensor, grid: QuantGrid, *, scale_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Scales for each row of ``w`` ``(rows, cols)`` on a symmetric grid by llama.cpp's
    importance-weighted search (``make_qx_quants`` in ``ggml-quants.c``, which its quantizer
    runs for Q4_0/Q5_0 with an importance matrix).

    For each row, the value of largest magnitude ``m`` is put on the extreme level ``qmin``
    (``-8`` for 4 bits: the scale ``m / qmin`` is negative when ``m`` is positive, so both
    signs reach the 16th level); candidate steps ``-(|qmin| + 0.1 i) / m`` for ``i`` in
    ``-9..9`` round the row, and for each the scale minimising ``sum weights * (w - s q)^2``
    is ``sum(weights w q) / sum(weights q^2)``; the candidate with the smallest weighted error
    wins. ``weights`` ``(rows, cols)`` are non-negative (llama.cpp: the importance of the
    column times ``sqrt(mean(row^2) + w^2)``).

    Returns ``scale`` ``(rows, 1)`` in ``scale_dtype`` (it may be negative) and a zero ``(rows,
    1)`` int8 zero point, as `fit_qparams` does for symmetric grids.
    """
    if not grid.symmetric:
        raise ValueError("fit_weighted_symmetric needs a symmetric grid")
    w32 = w.detach().float()  # (rows, cols)
    q32 = weights.detach().float()  # (rows, cols)
    qmin, qmax = grid.qmin, grid.qmax
    peak = w32.gather(1, w32.abs().argmax(dim=1, keepdim=True))  # (rows, 1), signed
    live = peak != 0
    safe_peak = torch.where(live, peak, torch.ones_like(peak))
    best_score = torch.full_like(peak, -1.0)
    best_scale = torch.zeros_like(peak)
    for i in [0, *range(-9, 0), *range(1, 10)]:
        inverse = -(abs(qmin) + 0.1 * i) / safe_peak  # (rows, 1)
        q = torch.clamp(torch.round(inverse * w32), qmin, qmax)  # (rows, cols)
        sum_qx = (q32 * w32 * q).sum(dim=1, keepdim=True)
        sum_q2 = (q32 * q * q).sum(dim=1, keepdim=True)
        # The weighted error at the optimal scale is sum(weights w^2) - sum_qx^2 / sum_q2.
        score = torch.where(sum_q2 > 0, sum_qx * sum_qx / sum_q2.clamp_min(1e-30), -1.0)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, sum_qx / sum_q2.clamp_min(1e-30), best_scale)
    eps = scale_eps(scale_dtype)
    best_scale = torch.where(live & (best_scale != 0), best_scale, torch.full_like(peak, eps))
    scale = best_scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    zero = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    return scale, zero


@dataclass
class QuantizedWeight:
    """A weight matrix on an integer grid, in the layout compressed-tensors stores.

    Attributes:
        q: ``(out, in)`` int8 integer levels in ``[grid.qmin, grid.qmax]``, in the original
            column order.
        scale: ``(out, n_groups)`` float; ``n_groups = in / group_size`` or 1 per channel.
        zero: ``(out, n_groups)`` int8 zero-point levels, or None when the grid is symmetric.
        grid: the grid the levels live on.
        g_idx: ``(in,)`` int64 group of every input column, or None when column ``c`` belongs to
            group ``c // group_size`` (always the case except for GPTQ with activation order and
            groups fixed on the fly). compressed-tensors' pack-quantized loader in
            transformers >= 5 has no ``g_idx``, so only ``g_idx=None`` can be exported.
    """

    q: Tensor
    scale: Tensor
    zero: Tensor | None
    grid: QuantGrid
    g_idx: Tensor | None = None

    def __post_init__(self) -> None:
        if self.q.ndim != 2:
            raise ValueError(f"q must be 2-D (out, in), got shape {tuple(self.q.shape)}")
        out_features, in_features = self.q.shape
        expected = (out_features, self.grid.num_groups(in_features))
        if tuple(self.scale.shape) != expected:
            raise ValueError(f"scale must have shape {expected}, got {tuple(self.scale.shape)}")
        if self.grid.symmetric != (self.zero is None):
            raise ValueError("zero must be None exactly when the grid is symmetric")
        if self.zero is not None and tuple(self.zero.shape) != expected:
            raise ValueError(f"zero must have shape {expected}, got {tuple(self.zero.shape)}")
        if self.g_idx is not None and tuple(self.g_idx.shape) != (in_features,):
            raise ValueError(f"g_idx must have shape ({in_features},)")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with its tensors on `device` ("meta" keeps only the shapes)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedWeight(
            self.q.to(device), self.scale.to(device), move(self.zero), self.grid, move(self.g_idx)
        )

    def dequantize(self) -> Tensor:
        """The ``(out, in)`` weight the grid represents, in the scale's dtype."""
        out_features, in_features = self.shape
        n_groups = self.scale.shape[1]
        if self.g_idx is not None:
            scale = self.scale.index_select(1, self.g_idx)  # (out, in)
            zero = None if self.zero is None else self.zero.index_select(1, self.g_idx)
            return dequantize(self.q, scale, zero)
        # Same reshape and broadcast as compressed-tensors' group path, hence the same bits.
        q = self.q.reshape(out_features, n_groups, in_features // n_groups)
        zero = None if self.zero is None else self.zero.unsqueeze(-1)
        return dequantize(q, self.scale.unsqueeze(-1), zero).reshape(out_features, in_features)


def quantize_groups(
    rows: Tensor, scale: Tensor, zero: Tensor, grid: QuantGrid, out_features: int
) -> QuantizedWeight:
    """Round a weight cut into one row per (output channel, group), ``(out * n_groups, group)``,
    with those rows' ``(out * n_groups, 1)`` scales and zero points: the `QuantizedWeight`
    ``(out, n_groups * group)`` that RTN and AWQ's clipped rounding return."""
    n_groups = rows.shape[0] // out_features
    in_features = n_groups * rows.shape[1]
    q = quantize(rows, scale, zero, grid.bits, grid.symmetric).reshape(out_features, in_features)
    return QuantizedWeight(
        q=q,
        scale=scale.reshape(out_features, n_groups),
        zero=None if grid.symmetric else zero.reshape(out_features, n_groups),
        grid=grid,
    )
