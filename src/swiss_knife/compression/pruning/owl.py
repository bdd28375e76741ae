"""OWL: outlier-weighted layerwise sparsity, as pure math on scores.

Yin et al. 2023, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity" (arXiv:2310.05175). LLM layers differ in how many *outlier* weights they
hold, measured on Wanda scores ``|W_ij| * ||X_j||``: the Layerwise Outlier Distribution ``D_l`` of
block ``l`` is the fraction of its scores above ``threshold x`` the mean score of the block (all of
its targeted linears together; the paper uses threshold M = 5). Blocks with more outliers should
be pruned less. OWL maps ``D_l`` linearly onto sparsities ``target +- lambda``.

Differences from the reference code, both so the guarantees in the config hold:

- the reference min-max scales ``D`` to ``[0, 2 lambda]`` and subtracts the mean, which can put a
  block up to ``2 lambda`` away from the target; here every block stays within ``lambda``;
- the reference keeps the *plain* mean over blocks; here the mean weighted by each block's
  number of targeted parameters equals the target exactly (they agree when blocks are alike).

`owl_sparsities` does it with a shift ``c`` solved by bisection:
``s_l = clip(target + lambda (1 - 2 u_l) + c, target - lambda, target + lambda)`` where ``u_l`` is
``D_l`` min-max normalised to [0, 1]; the weighted mean of ``s`` is continuous and increasing in
``c``, and spans the target, so a shift that meets it exactly exists.

Cost: the scores of one block at a time (one float32 copy of its targeted weights), computed in a
pre-pass over the calibration data on the dense model (`unstructured.py` runs it through the
calibration engine: one forward and one replay per block).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Sparsities stay strictly below 1: a layer must keep at least some weights.
_MAX_SPARSITY = 1.0 - 1e-6


def outlier_ratio(scores: Sequence[Tensor], threshold: float) -> float:
    """Fraction of all entries of `scores` above ``threshold x`` their common mean (OWL's D_l).

    `scores` are the Wanda scores of one block's linears, each (out, in); they are pooled as
    one set, without concatenating them.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    total = sum(s.numel() for s in scores)
    if total == 0:
        raise ValueError("no scores")
    mean = sum(float(s.double().sum()) for s in scores) / total
    above = sum(int((s > threshold * mean).sum()) for s in scores)
    return above / total


def owl_sparsities(
    ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float
) -> list[float]:
    """Per-block sparsities from outlier ratios: more outliers, less pruning.

    Every sparsity lies in ``[target - lam, target + lam]`` (and in [0, 1)), and
    ``sum(s_l * sizes_l) / sum(sizes)`` equals `target` (to float precision). Equal ratios, or
    ``lam = 0``, give `target` everywhere.
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("need one size per ratio, and at least one block")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    if lam < 0:
        raise ValueError(f"lambda must be non-negative, got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    weights = torch.tensor(sizes, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if lam == 0 or spread == 0:
        return [target] * len(ratios)
    u = (r - r.min()) / spread  # (blocks,) in [0, 1]
    low, high = max(0.0, target - lam), min(_MAX_SPARSITY, target + lam)
    raw = target + lam * (1 - 2 * u)  # (blocks,)

    def weighted_mean(shift: float) -> float:
        s = (raw + shift).clamp(low, high)
        return float((s * weights).sum() / weights.sum())

    # The mean is low + ... at shift -(2 lam + 1) and high at +(2 lam + 1): bisect between them.
    lo, hi = -(2 * lam + 1), 2 * lam + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if weighted_mean(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    result = (raw + (lo + hi) / 2).clamp(low, high)
    return [float(x) for x in result]


def round_to_grid(
    sparsities: Sequence[float], sizes: Sequence[int], steps: Sequence[int], target: float
) -> list[float]:
    """Snap each layer's sparsity to a multiple of ``1 / steps_l`` so the layers together prune
    as close as possible to ``round(target x sum(sizes))`` weights.

    ``steps_l`` is how finely layer ``l``'s selection can prune: its input width for a per-row
    selection (Wanda prunes the same count in every row), its size for a per-layer one. Each
    layer's sparsity is floored to its grid, then layers with the largest remainders take one
    more grid step while that brings the total closer to the target, so no layer moves by a
    full step.
    """
    if not len(sparsities) == len(sizes) == len(steps):
        raise ValueError("need one size and one step per sparsity")
    goal = math.floor(target * sum(sizes) + 0.5)
    units = [math.floor(s * step + 1e-9) for s, step in zip(sparsities, steps, strict=True)]
    pruned = sum(u * size // step for u, size, step in zip(units, sizes, steps, strict=True))
    remainders = [s * step - u for s, step, u in zip(sparsities, steps, units, strict=True)]
    for index in sorted(range(len(units)), key=lambda i: -remainders[i]):
        gain = sizes[index] // steps[index]
        if units[index] + 1 < steps[index] and abs(pruned + gain - goal) < abs(pruned - goal):
            units[index] += 1
            pruned += gain
    return [u / step for u, step in zip(units, steps, strict=True)]


__all__ = ["outlier_ratio", "owl_sparsities", "round_to_grid"]
