"""GPTQ: quantize a linear layer's weight column by column, compensating each rounding error.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323).

For a layer ``y = x W^T`` with calibration inputs ``X`` ``(tokens, in)`` and ``H = X^T X``, GPTQ
minimises ``||X W^T - X Q^T||_F^2 = tr((W - Q) H (W - Q)^T)`` one input column at a time (the
Optimal Brain Quantization step): column ``j`` is rounded to the grid, and its error
``e = (w_j - q_j) / [U]_jj`` is spread over the columns not yet quantized,
``W[:, j+1:] -= e [U]_{j, j+1:}``, where ``U`` is the upper Cholesky factor of ``H^-1``, whose row
``j`` holds exactly the inverse-Hessian entries of the remaining columns that OBS needs. Each step
adds ``(w_j - q_j)^2 / [U]_jj^2`` to the objective; the sum of these terms is the returned loss,
which equals ``tr((W - Q) H_damped (W - Q)^T)`` with ``H_damped = H + damp * mean(diag H) * I``.

Details from the paper and its reference code (IST-DASLab/gptq):

- dead inputs (``H_jj = 0``, a column no calibration token activates) get ``H_jj = 1`` and a zero
  weight column: they cannot affect the output, and 0 is exactly on the grid;
- damping ``damp * mean(diag H)`` keeps the Cholesky factorisation stable;
- "lazy batch updates": within a block of ``block_size`` columns the rank-1 updates touch only the
  block; the rest of ``W`` is updated once per block with one matmul, so the O(out * in^2) work is
  mostly matrix-matrix and memory-bound traffic drops by the block size;
- group scales are fitted when the first column of a group is reached, on the already-updated
  weights (here blocks are aligned to groups so that every group is fitted with all the updates of
  the columns before it); ``static_groups`` fits every group up front on the original weights;
- ``act_order`` processes columns by decreasing ``H_jj`` (most activated inputs first, while the
  most columns remain to absorb their error). With groups fitted on the fly, a group is then a set
  of non-adjacent columns and the result carries a ``g_idx``; with ``static_groups`` the groups
  stay contiguous (``g_idx`` is None). transformers' compressed-tensors loader has no ``g_idx``
  (compressed-tensors dropped ``actorder="group"``; ``actorder="weight"`` is this static form), so
  an exportable act-order result needs ``static_groups=True`` or per-channel scales.

On symmetric grids an optional last step (`refit_symmetric_scales`, on by default for llama.cpp's
block grids) refits each row's group scales jointly with the integers fixed: the objective is a
quadratic in the scales once the integers are chosen, so its exact minimum is one small linear
solve per row.

Cost for ``W`` ``(out, in)``: O(in^3) for the Cholesky factorisations plus O(out * in^2) for the
updates; memory O(in^2) for ``H`` and its factor (float32, float64 on fallback) plus a float32
copy of ``W``. The per-column loop runs ``in`` small vector steps; everything else is blocked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from swiss_knife.compression.hessian import inverse_cholesky_upper
from swiss_knife.compression.quantization.gguf_grid import (
    QK_K,
    KGridScales,
    KQuantizedWeight,
    KSpec,
    check_k_width,
    k_round,
)
from swiss_knife.compression.quantization.grid import (
    QuantGrid,
    QuantizedWeight,
    check_group_size,
    fit_qparams,
    fit_weighted_symmetric,
    resolve_scale_dtype,
    scale_eps,
)
from swiss_knife.device import column_loop_threads
from swiss_knife.errors import UserInputError


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    grid: QuantGrid,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    scale_dtype: torch.dtype | None = None,
    weighted_scales: bool = False,
    refit_scales: bool = False,
    factors: Factors | None = None,
) -> tuple[QuantizedWeight, float]:
    """Quantize ``W`` ``(out, in)`` with GPTQ given the input Hessian ``H = X^T X`` ``(in, in)``.

    Args:
        block_size: columns per lazy batch update.
        damp: damping, relative to the mean of ``diag(H)``.
        act_order: process columns by decreasing ``diag(H)``.
        static_groups: fit every group's scale on the original weights before quantizing
            (keeps groups contiguous under ``act_order``, which the export needs).
        clip_search: fit scales with the MSE range search of `grid.fit_qparams`.
        scale_dtype: dtype the scales are stored in; defaults to ``W.dtype``.
        weighted_scales: (symmetric grids) fit scales by llama.cpp's importance-weighted search
            (`grid.fit_weighted_symmetric`) with ``diag(H)`` as the importance matrix, instead
            of the clip search.
        refit_scales: (symmetric grids, contiguous groups) once every integer is fixed, refit
            each row's group scales jointly to minimise ``tr((W - Q) H_damped (W - Q)^T)``
            (`refit_symmetric_scales`); a row keeps its old scales where the refit, rounded to
            the scale dtype, is not better.
        factors: a cache of the damped inverse Hessian's Cholesky factor for THIS ``H``
            (shared by the linears that read the same input: q/k/v, gate/up), filled on the
            first call and reused by the next; the factor depends only on ``H``, the damping
            and the column order, so the results are the same as without it.

    Returns:
        ``(result, loss)``: the quantized weight, in the original column order, and the summed
        OBS error ``tr((W - Q) H_damped (W - Q)^T)`` (see the module docstring).
    """
    # A layer's solve is tiny next to the calibration forward passes: a column loop of vector
    # ops and one (in, in) factorisation. On the CPU it runs on one thread, because every op of
    # a thread pool ends in a barrier, and on a busy machine that barrier waits for descheduled
    # threads: with 2 threads on 2 loaded cores, one 1536 x 576 layer took 6.5 s (1.9 s of it in
    # cholesky_inverse) against 0.12 s on one thread. GPU tensors are unaffected.
    with column_loop_threads(W.device):
        return _gptq_quantize(
            W,
            H,
            grid,
            block_size=block_size,
            damp=damp,
            act_order=act_order,
            static_groups=static_groups,
            clip_search=clip_search,
            scale_dtype=scale_dtype,
            weighted_scales=weighted_scales,
            refit_scales=refit_scales,
            factors=factors,
        )


# A cache of inverse-Hessian factors of one Hessian: (kind, damp, act order, static groups) -> U.
Factors = dict[tuple[Any, ...], Tensor]


def _factor(H: Tensor, damp: float, factors: Factors | None, key: tuple[Any, ...]) -> Tensor:
    """`inverse_cholesky_upper` of ``H`` (already in processing order), from `factors` when a
    linear with the same Hessian and settings has been solved before."""
    if factors is not None and key in factors:
        return factors[key]
    U, _ = inverse_cholesky_upper(H, damp, label="GPTQ")  # (in, in) upper triangular
    if factors is not None:
        factors[key] = U
    return U


def _check_arguments(W: Tensor, H: Tensor, grid: QuantGrid, block_size: int, damp: float) -> None:
    """Refuse shapes that do not match, a block size below 1, negative damping, and a group
    size that does not divide the input width."""
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    in_features = W.shape[1]
    if tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"H must be ({in_features}, {in_features}), got {tuple(H.shape)}")
    if block_size < 1:
        raise UserInputError(f"block_size must be at least 1, got {block_size}")
    if damp < 0:
        raise UserInputError(f"damp must be non-negative, got {damp}")
    check_group_size(in_features, grid.group_size)


def _float32_copies(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """float32 copies of ``W`` ``(out, in)`` and ``H`` ``(in, in)`` (on W's device), with every
    dead input (``H_jj = 0``) given ``H_jj = 1`` and a zero weight column."""
    W = W.detach().to(torch.float32, copy=True)  # (out, in)
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)  # (in, in)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def _initial_qparams(
    W: Tensor,
    fit: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]],
    group: int,
    sdtype: torch.dtype,
    fit_up_front: bool,
    importance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``(out, n_groups)`` scale and zero-point tensors, every group fitted on the original
    weights when `fit_up_front` (otherwise left to the column loop); ``importance`` ``(out,
    in)`` weights the fit when given."""
    out_features, in_features = W.shape
    n_groups = in_features // group
    scale = torch.empty(out_features, n_groups, dtype=sdtype, device=W.device)
    zero = torch.zeros(out_features, n_groups, dtype=torch.int8, device=W.device)
    if fit_up_front:
        rows = out_features * n_groups
        weights = None if importance is None else importance.reshape(rows, group)
        s, z = fit(W.reshape(rows, group), weights)  # (out * n_groups, 1)
        scale.copy_(s.reshape(out_features, n_groups))
        zero.copy_(z.reshape(out_features, n_groups))
    return scale, zero


def _step_groups(
    perm: Tensor | None, group: int, in_features: int, fit_up_front: bool
) -> list[int]:
    """Group of the column processed at each step: its original group when groups are fixed,
    else the step's position (a group is the next `group` columns in processing order)."""
    if fit_up_front and perm is not None:
        return (perm // group).tolist()
    return [j // group for j in range(in_features)]


def _in_original_order(
    Q: Tensor,
    perm: Tensor | None,
    scale: Tensor,
    zero: Tensor,
    grid: QuantGrid,
    group: int,
    fit_up_front: bool,
) -> QuantizedWeight:
    """The result with ``Q``'s columns back in their original order; groups fitted on the fly
    under act order become a ``g_idx`` unless every group stayed together."""
    in_features = Q.shape[1]
    g_idx: Tensor | None = None
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        if not fit_up_front:
            contiguous = torch.arange(in_features, device=Q.device) // group  # (in,)
            g_idx = contiguous[inverse]
            if torch.equal(g_idx, contiguous):  # the order kept every group together
                g_idx = None
    return QuantizedWeight(
        q=Q.to(torch.int8),
        scale=scale,
        zero=None if grid.symmetric else zero,
        grid=grid,
        g_idx=g_idx,
    )


def _gptq_quantize(
    W: Tensor,
    H: Tensor,
    grid: QuantGrid,
    *,
    block_size: int,
    damp: float,
    act_order: bool,
    static_groups: bool,
    clip_search: bool,
    scale_dtype: torch.dtype | None,
    weighted_scales: bool = False,
    refit_scales: bool = False,
    factors: Factors | None = None,
) -> tuple[QuantizedWeight, float]:
    """`gptq_quantize` itself, under the caller's thread setting."""
    _check_arguments(W, H, grid, block_size, damp)
    out_features, in_features = W.shape
    qmin, qmax = grid.qmin, grid.qmax
    group = grid.group_size or in_features
    n_groups = in_features // group
    sdtype = resolve_scale_dtype(W, scale_dtype)
    W, H = _float32_copies(W, H)
    # llama.cpp's importance weights: the column's importance (its mean squared input, the
    # Hessian diagonal up to a constant) times sqrt(mean(row^2) + w^2), on the original weights.
    importance: Tensor | None = None
    if weighted_scales and grid.symmetric:
        sigma2 = W.square().mean(dim=1, keepdim=True)  # (out, 1)
        importance = torch.diagonal(H).clamp_min(0).unsqueeze(0) * (sigma2 + W.square()).sqrt()

    def fit(columns: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        if weights is not None:
            return fit_weighted_symmetric(columns, weights, grid, scale_dtype=sdtype)
        return fit_qparams(columns, grid, clip_search=clip_search, scale_dtype=sdtype)

    # Per channel there is one group, fitted up front on the whole row, as in the reference code.
    fit_up_front = static_groups or n_groups == 1
    scale, zero = _initial_qparams(W, fit, group, sdtype, fit_up_front, importance)
    # The refit needs the original weights and Hessian (damped as the solve's), in original order.
    original = (W.clone(), _damped(H, damp)) if refit_scales and grid.symmetric else None

    perm: Tensor | None = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)  # (in,)
        W = W[:, perm]
        H = H[perm][:, perm]
        importance = None if importance is None else importance[:, perm]
    U = _factor(H, damp, factors, ("grid", damp, act_order))  # (in, in) upper triangular
    del H

    step_group = _step_groups(perm, group, in_features, fit_up_front)
    if not fit_up_front:
        # Align blocks to groups so a group never spans two blocks: its scale is then fitted on
        # weights that carry the updates of every earlier column.
        block_size = group if group >= block_size else (block_size // group) * group

    # float32 copies for the arithmetic; zero is 0 for symmetric grids.
    scale32 = scale.float()  # (out, n_groups)
    zero32 = zero.float()  # (out, n_groups)
    Q = torch.empty(out_features, in_features, dtype=torch.float32, device=W.device)
    loss = torch.zeros(out_features, dtype=torch.float64, device=W.device)

    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()  # (out, B)
        Err1 = torch.empty_like(W1)  # (out, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            j = i1 + i
            g = step_group[j]
            if not fit_up_front and j % group == 0:
                weights = None if importance is None else importance[:, j : j + group]
                s, z = fit(W1[:, i : i + group], weights)  # (out, 1) each
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                scale32[:, g], zero32[:, g] = s[:, 0].float(), z[:, 0].float()
            w = W1[:, i]  # (out,)
            s32, z32 = scale32[:, g], zero32[:, g]
            q = torch.clamp(torch.round(w / s32 + z32), qmin, qmax)  # (out,)
            Q[:, j] = q
            err = (w - (q - z32) * s32) / U1[i, i]  # (out,)
            # OBS update of the rest of the block; the columns after it wait for the block end.
            W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)  # lazy batch update
        loss += Err1.double().square().sum(dim=1)  # each column's (w - q)^2 / U_jj^2

    result = _in_original_order(Q, perm, scale, zero, grid, group, fit_up_front)
    if original is not None and result.g_idx is None:
        return refit_symmetric_scales(*original, result)
    return result, float(loss.sum())


def _damped(H: Tensor, damp: float) -> Tensor:
    """``H + damp * mean(diag H) * I``, the Hessian the solve minimises over (a new tensor)."""
    H = H.clone()
    diagonal = torch.diagonal(H)
    diagonal += damp * diagonal.mean()
    return H


# Bytes of the (rows, groups, in) intermediate the refit works through at a time.
REFIT_CHUNK_BYTES = 1 << 26


def refit_symmetric_scales(
    W: Tensor, H: Tensor, qw: QuantizedWeight
) -> tuple[QuantizedWeight, float]:
    """``qw`` with each row's group scales refitted, integers fixed, to minimise the layer's
    output error on the calibration inputs.

    With the integers ``q`` fixed, a row's dequantized weight ``sum_g s_g q_g`` (``q_g``: the
    row's integers in group ``g``, zero elsewhere) is linear in its scales, so
    ``(w - Q) H (w - Q)^T`` is a quadratic in ``s``: ``s^T A s - 2 b^T s + c`` with
    ``A_gh = q_g^T H q_h`` and ``b_g = q_g^T H w``. Its minimum solves ``A s = b``, a
    ``groups x groups`` system per row. GPTQ chose each scale before the error feedback moved
    the weights after it, and llama.cpp's search fits each block alone on a diagonal
    importance; the joint refit accounts for the correlations between groups that ``H`` holds.
    A small ridge towards the old scales keeps a group of all-zero integers (whose scale is
    free) where it was. The new scales are rounded to the stored dtype, and a row keeps its old
    ones unless its error drops. Returns the result and its ``tr((W - Q) H (W - Q)^T)``.

    Args:
        W: ``(out, in)`` float32 original weights; H: ``(in, in)`` float32 Hessian;
        qw: a symmetric result with contiguous groups (``g_idx`` None).

    Cost: O(out * in^2) multiply-adds (about one more GPTQ update pass) and ``out`` solves of
    ``groups x groups``; memory bounded by `REFIT_CHUNK_BYTES` plus two ``(out, in)`` copies.
    """
    if not qw.grid.symmetric or qw.g_idx is not None:
        raise ValueError("refit_symmetric_scales needs a symmetric result with contiguous groups")
    out_features, in_features = qw.q.shape
    n_groups = qw.scale.shape[1]
    size = in_features // n_groups
    q = qw.q.float()  # (out, in)
    old = qw.scale.double()  # (out, G)
    b = (q * (W @ H)).reshape(out_features, n_groups, size).sum(dim=2).double()  # (out, G)
    A = torch.empty(out_features, n_groups, n_groups, dtype=torch.float64, device=q.device)
    H_rows = H.reshape(n_groups, size, in_features)  # (G, size, in)
    rows = max(1, REFIT_CHUNK_BYTES // (4 * n_groups * in_features))
    for r1 in range(0, out_features, rows):
        r2 = min(r1 + rows, out_features)
        qc = q[r1:r2].reshape(r2 - r1, n_groups, size)  # (n, G, size)
        Z = torch.bmm(qc.transpose(0, 1), H_rows)  # (G, n, in): q_g^T H for every group g
        Z = Z.reshape(n_groups, r2 - r1, n_groups, size)  # (G, n, G, size)
        A[r1:r2] = torch.einsum("gnhs,nhs->ngh", Z, qc).double()
    ridge = 1e-6 * torch.diagonal(A, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)  # (out,)
    eye = torch.eye(n_groups, dtype=torch.float64, device=q.device)
    A += ridge[:, None, None] * eye
    scale = torch.linalg.solve(A, (b + ridge[:, None] * old).unsqueeze(2)).squeeze(2)
    eps = scale_eps(qw.scale.dtype)
    new_scale = scale.to(qw.scale.dtype)
    new_scale = torch.where(new_scale == 0, torch.full_like(new_scale, eps), new_scale)
    refit = QuantizedWeight(q=qw.q, scale=new_scale, zero=None, grid=qw.grid, g_idx=None)
    new_rows, old_rows = _row_errors(W, H, refit), _row_errors(W, H, qw)  # (out,) each
    better = new_rows < old_rows
    final = torch.where(better[:, None], new_scale, qw.scale)
    loss = float(torch.where(better, new_rows, old_rows).sum())
    return QuantizedWeight(q=qw.q, scale=final, zero=None, grid=qw.grid, g_idx=None), loss


def _row_errors(W: Tensor, H: Tensor, qw: QuantizedWeight) -> Tensor:
    """``(out,)`` float64: each row's ``(w - q) H (w - q)^T``."""
    E = W - qw.dequantize().float()  # (out, in)
    return ((E @ H) * E).double().sum(dim=1)


# ---------------------------------------------------------------------------------------------
# llama.cpp's K-quant grids (`gguf_grid`): two-level scales per super-block of 256 columns.
# ---------------------------------------------------------------------------------------------


def gptq_quantize_k(
    W: Tensor,
    H: Tensor,
    spec: KSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    factors: Factors | None = None,
) -> tuple[KQuantizedWeight, float]:
    """GPTQ on a llama.cpp K-quant grid (Q4_K, Q5_K, Q6_K): ``W`` ``(out, in)``, ``in`` a
    multiple of 256, with its input Hessian ``H`` ``(in, in)``.

    The OBS step is the one of `gptq_quantize`; the grid is `gguf_grid`'s. When the column loop
    enters a super-block (256 columns of every row), the super-block's sub-block scales and mins
    are fitted on its columns as the earlier columns' errors have left them (llama.cpp's
    reference search, `gguf_grid.fit_k_scales`, its least-squares weights multiplied by each
    column's ``H_jj`` as llama.cpp's importance matrix does), quantized to their 6-bit / int8
    codes and fp16 ``d``/``dmin``; its columns are then rounded on exactly that grid, each error
    fed forward. Blocks of the lazy update are whole super-blocks then, so a super-block's fit
    sees every earlier update. With ``static_groups`` every super-block is fitted up front on
    the original weights instead (measured worse on SmolLM2's down_proj layers; see
    `gguf_grid`).

    Args:
        act_order: process columns by decreasing ``diag(H)``; within each super-block (its
            grid is fitted when the loop enters it) unless ``static_groups``.
        static_groups: fit every super-block's grid up front on the original weights (then
            ``act_order`` orders all columns globally).

    Returns:
        ``(result, loss)`` as `gptq_quantize`: the levels in the original column order, and the
        summed OBS error.
    """
    with column_loop_threads(W.device):
        return _gptq_quantize_k(
            W,
            H,
            spec,
            block_size=block_size,
            damp=damp,
            act_order=act_order,
            static_groups=static_groups,
            factors=factors,
        )


def _k_order(H: Tensor, act_order: bool, static_groups: bool) -> Tensor | None:
    """The processing order: None (natural), by decreasing ``diag(H)`` over all columns (static
    grids), or by decreasing ``diag(H)`` within each super-block (grids fitted on entry)."""
    if not act_order:
        return None
    diag = torch.diagonal(H)
    if static_groups:
        return torch.argsort(diag, descending=True, stable=True)
    local = torch.argsort(diag.reshape(-1, QK_K), dim=1, descending=True, stable=True)
    offsets = torch.arange(0, diag.numel(), QK_K, device=H.device).unsqueeze(1)
    return (local + offsets).reshape(-1)


def _gptq_quantize_k(
    W: Tensor,
    H: Tensor,
    spec: KSpec,
    *,
    block_size: int,
    damp: float,
    act_order: bool,
    static_groups: bool,
    factors: Factors | None = None,
) -> tuple[KQuantizedWeight, float]:
    _check_arguments(W, H, QuantGrid(bits=4), block_size, damp)
    out_features, in_features = W.shape
    check_k_width(in_features, spec)
    W, H = _float32_copies(W, H)
    grid = KGridScales(spec, out_features, in_features, W.device)
    # Each column's diag(H), its summed squared input: llama.cpp's importance matrix.
    importance = torch.diagonal(H).clone()  # (in,), original order
    if static_groups:
        grid.fit(0, W, importance)
    perm = _k_order(H, act_order, static_groups)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    U = _factor(H, damp, factors, ("k", damp, act_order, static_groups))  # (in, in) upper
    del H
    column = perm if perm is not None else torch.arange(in_features, device=W.device)
    sub_of = (column // spec.sub).tolist()  # original sub-block of each processed column
    if not static_groups:
        # Whole super-blocks per lazy block: a super-block's fit sees every earlier update.
        block_size = QK_K if block_size <= QK_K else (block_size // QK_K) * QK_K
        # Columns of a super-block in their original order, from its processing order.
        restore = torch.argsort(column.reshape(-1, QK_K) % QK_K, dim=1)  # (n_super, 256)

    Q = torch.empty(out_features, in_features, dtype=torch.float32, device=W.device)
    loss = torch.zeros(out_features, dtype=torch.float64, device=W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()  # (out, B)
        Err1 = torch.empty_like(W1)  # (out, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            j = i1 + i
            if not static_groups and j % QK_K == 0:
                chunk = W1[:, i : i + QK_K][:, restore[j // QK_K]]  # (out, 256), original order
                grid.fit(j, chunk, importance[j : j + QK_K])
            w = W1[:, i]  # (out,)
            q, value = k_round(spec, w, *grid.column(sub_of[j]))
            Q[:, j] = q
            err = (w - value) / U1[i, i]  # (out,)
            W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)  # lazy batch update
        loss += Err1.double().square().sum(dim=1)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return grid.result(Q), float(loss.sum())
