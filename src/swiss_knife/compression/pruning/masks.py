"""Pruning criteria and masks: pure tensor math, no modules, no hooks.

Every function here works on a weight in ``(out_features, in_features)`` orientation (a GPT-2
``Conv1D`` weight is stored transposed; the orchestrator hands it over as ``weight.T``). A *keep
mask* is a boolean tensor of the weight's shape, True where the weight survives; ``W * keep`` is
the pruned weight.

Criteria (a larger score means more important):

- magnitude: ``|W_ij|`` (Han et al. 2015, "Learning both Weights and Connections for Efficient
  Neural Networks"); data-free, one pass over the weights.
- Wanda: ``|W_ij| * ||X_j||_2`` (Sun, Liu, Bair and Kolter 2023, "A Simple and Effective Pruning
  Approach for Large Language Models", arXiv:2306.11695), the weight times the L2 norm of input
  channel ``j`` over the calibration tokens. Wanda compares weights within each output row (its
  "per-output" comparison group), which the paper found better than per-layer ranking for LLMs.
  Cost beyond the forward passes: O(in) memory per linear for the norms, O(out * in) to score.

Selection with an exact count: `row_topk_mask`, `layer_topk_mask` and `global_topk_masks` prune
exactly ``prune_count(n, sparsity)`` weights of each row / layer / the whole set. Which of several
equal scores at the threshold goes is up to ``torch.topk`` (deterministic for given inputs on a
given device; the count is exact either way), except in `global_topk_masks`, which takes ties in
order. `nm_mask` keeps the N largest of every
M consecutive inputs of a row: the N:M semi-structured pattern (2:4 is what NVIDIA's sparse tensor
cores accelerate; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). Sorting costs
O(n log n) per selection; the global selection concatenates every score once (4 bytes per weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity prunes: round half up, so 0.5 of 5 prunes 3."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return min(numel, math.floor(sparsity * numel + 0.5))


def magnitude_scores(W: Tensor) -> Tensor:
    """|W| in float32, (out, in)."""
    return W.detach().abs().float()


def wanda_scores(W: Tensor, act_norm: Tensor) -> Tensor:
    """Wanda's |W_ij| * ||X_j||: ``W`` (out, in), ``act_norm`` (in,) -> (out, in) float32."""
    if act_norm.shape != (W.shape[1],):
        raise ValueError(f"act_norm must have shape ({W.shape[1]},), got {tuple(act_norm.shape)}")
    return W.detach().abs().float() * act_norm.float().unsqueeze(0)  # (out, in)


def prune_smallest(scores: Tensor, count: int) -> Tensor:
    """Keep mask of a 1-D score vector with its `count` smallest entries pruned."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        # topk without sorting its result: about 4x faster than a full sort on CPU.
        lowest = torch.topk(scores, count, largest=False, sorted=False).indices  # (count,)
        keep[lowest] = False
    return keep


def row_topk_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune the same number, ``prune_count(in, sparsity)``, of the lowest scores in every row."""
    count = prune_count(scores.shape[1], sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)  # (out, in)
    if count > 0:
        lowest = torch.topk(scores, count, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, lowest, False)  # lowest: (out, count)
    return keep


def layer_topk_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune exactly ``prune_count(numel, sparsity)`` of the lowest scores of the whole matrix."""
    count = prune_count(scores.numel(), sparsity)
    return prune_smallest(scores.reshape(-1), count).reshape(scores.shape)


def global_topk_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Prune exactly ``prune_count(total, sparsity)`` of the lowest scores across all tensors.

    The threshold is the k-th smallest score over the concatenation; scores equal to it are
    pruned in order (tensor order, then position) until the count is exact.
    """
    if not scores:
        return {}
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])  # (total,)
    count = prune_count(flat.numel(), sparsity)
    if count == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    threshold = torch.kthvalue(flat, count).values
    below = flat < threshold  # (total,)
    ties = torch.nonzero(flat == threshold).squeeze(1)  # (n_ties,)
    prune = below
    prune[ties[: count - int(below.sum())]] = True
    del flat
    masks: dict[str, Tensor] = {}
    offset = 0
    for name, s in scores.items():
        masks[name] = ~prune[offset : offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return masks


def check_nm_shape(in_features: int, m: int) -> None:
    if in_features % m:
        raise ValueError(f"{in_features} input channels are not a multiple of M={m}")


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive inputs of each row.

    ``scores`` (out, in) with ``in`` a multiple of ``m``; the result has exactly ``n`` True
    entries per group, so its sparsity is exactly ``1 - n / m``.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    out_features, in_features = scores.shape
    check_nm_shape(in_features, m)
    groups = scores.reshape(out_features, in_features // m, m)  # (out, groups, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, lowest, False)  # lowest: (out, groups, m - n)
    return keep.reshape(out_features, in_features)


def satisfies_nm(W: Tensor, n: int, m: int) -> bool:
    """Whether every group of `m` consecutive inputs of every row holds at most `n` non-zeros."""
    out_features, in_features = W.shape
    if in_features % m:
        return False
    nonzero = (W != 0).reshape(out_features, in_features // m, m).sum(dim=2)  # (out, groups)
    return bool((nonzero <= n).all())


def sparsity_of(W: Tensor) -> float:
    """Fraction of exact zeros."""
    return 1.0 - int(torch.count_nonzero(W)) / max(W.numel(), 1)


__all__ = [
    "check_nm_shape",
    "global_topk_masks",
    "layer_topk_mask",
    "magnitude_scores",
    "nm_mask",
    "prune_count",
    "prune_smallest",
    "row_topk_mask",
    "satisfies_nm",
    "sparsity_of",
    "wanda_scores",
]
