"""Round-to-nearest (RTN) weight quantization: the data-free baseline.

Every weight is rounded to the nearest level of its row's (or group's) grid, with min/max scales as
in compressed-tensors (see `grid.py`) or, with ``clip_search``, scales whose range is shrunk to
minimise ``sum |w - Q(w)|^norm`` per row/group (the MSE observer of llm-compressor and the ``mse``
option of the reference GPTQ quantizer). No calibration data is needed.

Cost: O(out * in) time and memory, times ``clip_grid`` with the clip search; no Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor

from swiss_knife.compression.quantization.grid import (
    QuantGrid,
    QuantizedWeight,
    check_group_size,
    fit_qparams,
    quantize_groups,
    resolve_scale_dtype,
)


def rtn_quantize(
    W: Tensor,
    grid: QuantGrid,
    *,
    clip_search: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.2,
    norm: float = 2.4,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantize ``W`` ``(out, in)`` to ``grid`` by rounding to nearest.

    Args:
        clip_search, clip_grid, max_shrink, norm: the per-row/group range search of
            `grid.fit_qparams`.
        scale_dtype: dtype the scales are stored in; defaults to ``W.dtype``. Use the dtype the
            model is saved in, so that the levels are chosen for the scale the checkpoint holds.

    Raises:
        UserInputError: when ``grid.group_size`` does not divide ``in`` (see `check_group_size`).
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    out_features, in_features = W.shape
    check_group_size(in_features, grid.group_size)
    group = grid.group_size or in_features
    n_groups = in_features // group
    # One row per (output channel, group): the groups of a row are contiguous columns.
    rows = W.detach().float().reshape(out_features * n_groups, group)  # (out * n_groups, group)
    scale, zero = fit_qparams(
        rows,
        grid,
        clip_search=clip_search,
        clip_grid=clip_grid,
        max_shrink=max_shrink,
        norm=norm,
        scale_dtype=resolve_scale_dtype(W, scale_dtype),
    )  # (out * n_groups, 1) each
    return quantize_groups(rows, scale, zero, grid, out_features)
