"""SparseGPT: prune a linear layer column by column, updating the kept weights to compensate.

Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023 (arXiv:2301.00774).

For a layer ``y = x W^T`` with calibration inputs ``X`` ``(tokens, in)`` and ``H = X^T X``,
SparseGPT approximately solves ``min ||X W^T - X Q^T||_F^2`` over ``Q`` with a sparsity mask. It
walks the input columns left to right like GPTQ (whose Optimal Brain Surgeon step it shares):
column ``j`` of the pruned weights is zeroed where the mask says so, and its error
``e = (w_j - q_j) / [U]_jj`` is spread over the columns not yet processed,
``W[:, j+1:] -= e [U]_{j, j+1:}``, where ``U`` is the upper Cholesky factor of ``H^-1`` (shared with
GPTQ: `compression.hessian.inverse_cholesky_upper`). The kept weights therefore change; that update is what makes
SparseGPT better than Wanda at high sparsity and with N:M patterns.

The mask is chosen as the walk goes ("adaptive mask selection"): at the start of each block of
``block_size`` columns, the OBS saliency ``w^2 / [U]_jj^2`` of the block's (already updated)
weights picks the weights to prune in that block; with an N:M pattern the saliency of each group
of M columns picks the ``M - N`` to prune when the walk reaches the group. Unlike the reference
code (a threshold per block, which prunes a few extra weights on ties), every block here prunes an
exact share of the layer's count, so the layer's sparsity is exactly ``prune_count(out * in, s)``.

Each step adds ``(w_j - q_j)^2 / [U]_jj^2`` per row to the objective; their sum, the returned
loss, equals ``tr((W - Q) H_d (W - Q)^T)`` with ``H_d = H + damp * mean(diag H) * I`` (the same
identity as GPTQ's: ``W - Q = Err U`` and ``U H_d U^T = I``).

**Re-fit of the kept weights** (`refit_kept_weights`, on by default in the pruning config with
5 steps). SparseGPT's updates are exact only for the columns still to the right of the one being
pruned: a weight pruned late cannot be compensated by the columns already walked, so for the mask
it chose the result is not the least-squares optimum. Once the mask is fixed, the best kept
weights solve one damped least-squares problem per row; a few steps of conjugate gradients from
SparseGPT's weights get most of the way (each step one ``(out, in) x (in, in)`` matmul, run on
every thread). On SmolLM2-135M this lowers the layer loss by about 19 % and the perplexity at 50 %
by 5-9 % for about 10 % more time (`benchmarks/RESULTS.md`). The idea of re-solving the kept
weights for a fixed mask follows Boža, "Fast and Effective Weight Update for Pruned Large Language
Models" (arXiv:2401.02938, 2024), which uses ADMM; conjugate gradients needs no
factorisation and converged faster here (fewer steps for the same loss).

Cost for ``W`` ``(out, in)``: O(in^3) for the factorisation plus O(out * in^2) for the updates
(lazy batch updates: rank-1 updates stay inside a block, the rest of ``W`` is updated once per
block with a matmul); memory O(in^2) float32 for ``H`` and ``U`` plus a float32 copy of ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from swiss_knife.compression.hessian import inverse_cholesky_upper
from swiss_knife.compression.pruning.masks import check_nm_shape, prune_count, prune_smallest
from swiss_knife.device import column_loop_threads
from swiss_knife.errors import UserInputError


@dataclass(frozen=True)
class SparseGPTResult:
    """The pruned weight, its keep mask and the OBS loss."""

    weight: Tensor  # (out, in) float32, exact zeros where `keep` is False
    keep: Tensor  # (out, in) bool
    loss: float  # tr((W - Q) H_d (W - Q)^T), see the module docstring
    sparsegpt_loss: float  # the same before the refit (equal to `loss` without one)


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    refit_iterations: int = 0,
    factors: dict[float, Tensor] | None = None,
) -> SparseGPTResult:
    """Prune ``W`` ``(out, in)`` with SparseGPT given the input Hessian ``H = X^T X`` ``(in, in)``.

    Give exactly one of `sparsity` (unstructured: that fraction of the layer pruned, exactly) or
    `nm` = ``(n, m)`` (keep ``n`` of every ``m`` consecutive inputs of each row). ``block_size``
    columns share one lazy batch update (rounded to a multiple of ``m`` with a pattern, so a group
    never spans two blocks); `damp` is relative to the mean of ``diag(H)``. ``refit_iterations``
    conjugate-gradient steps then re-fit the kept weights with the mask fixed
    (`refit_kept_weights`; 0: the paper's algorithm). Inputs no calibration
    token activated (``H_jj = 0``) get a zero weight column, as in GPTQ: they cannot affect the
    output. ``W`` and ``H`` are not modified. `factors` caches the damped inverse Hessian's
    Cholesky factor (by damping) for the linears that read the same input (q/k/v, gate/up):
    it depends only on ``H`` and the damping, so the results are the same as without it.

    On the CPU the column walk runs on one thread, as GPTQ's does (`column_loop_threads`): it is
    thousands of tiny vector ops, each of which would end in a thread-pool barrier. The
    factorisation of ``H`` and the re-fit are large dense kernels and use every thread.
    """
    result = _sparsegpt_prune(
        W, H, sparsity=sparsity, nm=nm, block_size=block_size, damp=damp, factors=factors
    )
    if refit_iterations <= 0:
        return result
    # Outside the single-thread section: the refit is a handful of large matmuls.
    weight, _, after = refit_kept_weights(
        W, H, result.weight, result.keep, damp=damp, iterations=refit_iterations
    )
    return SparseGPTResult(weight=weight, keep=result.keep, loss=after, sparsegpt_loss=result.loss)


def _sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    *,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    block_size: int,
    damp: float,
    factors: dict[float, Tensor] | None = None,
) -> SparseGPTResult:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    in_features = W.shape[1]
    if tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"H must be ({in_features}, {in_features}), got {tuple(H.shape)}")
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity or nm")
    if block_size < 1:
        raise UserInputError(f"block_size must be at least 1, got {block_size}")
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        check_nm_shape(in_features, m)
        block_size = max(m, block_size // m * m)
    # A contiguous copy: GPT-2's Conv1D weights arrive as a transposed view.
    W = W.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # (out, in)
    dead = (torch.diagonal(H) == 0).to(W.device)  # (in,)
    W[:, dead] = 0.0
    U = None if factors is None else factors.get(damp)
    if U is None:
        H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)  # (in, in)
        H[dead, dead] = 1.0
        U, _ = inverse_cholesky_upper(H, damp, label="SparseGPT")  # (in, in) upper triangular
        del H
        if factors is not None:
            factors[damp] = U
    return _walk(W, U, sparsity=sparsity, nm=nm, block_size=block_size)


def _walk(
    W: Tensor, U: Tensor, *, sparsity: float | None, nm: tuple[int, int] | None, block_size: int
) -> SparseGPTResult:
    """The column walk of `sparsegpt_prune`, in place on ``W`` (a float32 copy)."""
    out_features, in_features = W.shape

    keep = torch.ones(out_features, in_features, dtype=torch.bool, device=W.device)
    loss = torch.zeros(out_features, dtype=torch.float64, device=W.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()  # (out, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d = torch.diagonal(U1)  # (B,)
        keep1 = torch.ones(W1.shape, dtype=torch.bool, device=W.device)  # (out, B)
        # 1 / [U]_jj where column j's weight is pruned, 0 where it is kept: the column's error is
        # then one multiply, err = w * pruned_inv (w - q is w or 0).
        pruned_inv = torch.zeros_like(W1)  # (out, B)
        if nm is None:
            # This block's share of the layer's count: differences of the cumulative counts,
            # so the blocks add up to exactly `total`.
            assert sparsity is not None
            count = prune_count(out_features * i2, sparsity) - prune_count(
                out_features * i1, sparsity
            )
            saliency = (W1.square() / d.square().unsqueeze(0)).reshape(-1)  # (out * B,)
            keep1 = prune_smallest(saliency, count).reshape(W1.shape)
            pruned_inv = (~keep1) / d.unsqueeze(0)
        Err1 = torch.empty_like(W1)  # (out, B)
        # Only the column loop is single-threaded; the block-level kernels use every thread.
        with column_loop_threads(W.device):
            _walk_block(W1, U1, keep1, pruned_inv, Err1, nm)
        W1.mul_(keep1)
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)  # lazy batch update
        loss += Err1.double().square().sum(dim=1)
    total = float(loss.sum())
    return SparseGPTResult(weight=W, keep=keep, loss=total, sparsegpt_loss=total)


def _walk_block(
    W1: Tensor,
    U1: Tensor,
    keep1: Tensor,
    pruned_inv: Tensor,
    Err1: Tensor,
    nm: tuple[int, int] | None,
) -> None:
    """Walk one block's columns: each column's error into ``Err1`` and its OBS update of the
    columns after it in ``W1``; with an N:M pattern, each group's mask into ``keep1`` and
    ``pruned_inv`` when the walk reaches it. All in place; ``W1`` ``(out, B)``."""
    d = torch.diagonal(U1)  # (B,)
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            group = W1[:, i : i + m].square() / d[i : i + m].square().unsqueeze(0)  # (out, m)
            order = torch.sort(group, dim=1, stable=True).indices  # (out, m)
            keep1[:, i : i + m].scatter_(1, order[:, : m - n], False)
            pruned_inv[:, i : i + m] = (~keep1[:, i : i + m]) / d[i : i + m].unsqueeze(0)
        err = torch.mul(W1[:, i], pruned_inv[:, i], out=Err1[:, i])  # (out,)
        # OBS update of the rest of the block; the columns after it wait for the block end.
        # Column i itself is zeroed where pruned at the block end (nothing reads it again).
        W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)


def refit_kept_weights(
    W: Tensor, H: Tensor, Q: Tensor, keep: Tensor, *, damp: float, iterations: int
) -> tuple[Tensor, float, float]:
    """Re-fit the kept weights ``Q`` of a pruned ``W`` to the layer's inputs, mask fixed.

    Minimises ``tr((Q - W) H_d (Q - W)^T)`` over the weights ``keep`` marks, with
    ``H_d = H + damp * mean(diag H) * I`` (SparseGPT's objective), by `iterations` steps of
    conjugate gradients started from ``Q``, every row its own problem (its own step sizes), all
    rows in one matmul per step. Jacobi-preconditioned: the problem is solved in the scaled
    variables ``Q * sqrt(diag H_d)``, where the Hessian has a unit diagonal.

    Returns ``(weights, loss before, loss after)``; the weights are exactly zero where ``keep``
    is False and the loss never increases (each step lowers it by ``alpha * r^T r`` per row).
    Cost: ``iterations + 1`` matmuls of ``(out, in) x (in, in)``; no factorisation.
    """
    Hd = H.detach().to(device=W.device, dtype=torch.float32, copy=True)  # (in, in)
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd.diagonal().add_(damp * float(torch.diagonal(Hd).double().mean()))
    scale = torch.diagonal(Hd).sqrt()  # (in,)
    Hd.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))  # unit diagonal
    target = W.detach().to(torch.float32) * scale  # (out, in)
    target[:, dead] = 0.0  # SparseGPT zeroes inputs no token activated
    mask = keep.to(torch.float32)  # (out, in)
    Z = Q.detach().to(torch.float32) * scale  # (out, in)
    D = Z - target
    G = D @ Hd  # (out, in): half the gradient
    losses = (G * D).double().sum(dim=1)  # (out,)
    before = float(losses.sum())
    R = G.mul_(mask).neg_()  # residual: minus the half gradient on the kept weights
    P = R.clone()
    rr = (R * R).sum(dim=1)  # (out,)
    for _ in range(iterations):
        HP = (P @ Hd).mul_(mask)  # (out, in)
        curvature = (P * HP).sum(dim=1)  # (out,)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), 0.0)
        Z.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), HP, value=-1.0)
        losses -= (alpha * rr).double()
        rr_next = (R * R).sum(dim=1)
        beta = torch.where(rr > 0, rr_next / rr.clamp_min(1e-30), 0.0)
        P.mul_(beta.unsqueeze(1)).add_(R)
        rr = rr_next
    Z.div_(scale).mul_(mask)  # exact zeros on the pruned weights
    return Z, before, float(losses.clamp_min(0.0).sum())


__all__ = ["SparseGPTResult", "refit_kept_weights", "sparsegpt_prune"]
