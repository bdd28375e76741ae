"""Pruning tensor math: masks with exact counts, N:M, SparseGPT's properties, OWL, schedules, and
the sparse-bitmask tensors.

SparseGPT is checked against properties that hold for any Hessian (its loss identity, the
ordering optimal least squares <= SparseGPT < zeroing the same weights, the count and pattern of
its masks), not only against the identity Hessian, where it degenerates to magnitude pruning.
"""

from __future__ import annotations

import itertools
import math

import numpy
import pytest
import torch

from swiss_knife.compression.distillation.losses import ForwardKL
from swiss_knife.compression.pruning.gradual import sparsity_schedule
from swiss_knife.compression.pruning.masks import (
    global_topk_masks,
    layer_topk_mask,
    magnitude_scores,
    nm_mask,
    prune_count,
    row_topk_mask,
    satisfies_nm,
    sparsity_of,
    wanda_scores,
)
from swiss_knife.compression.pruning.owl import outlier_ratio, owl_sparsities, round_to_grid
from swiss_knife.compression.pruning.sparse_format import (
    bitmask_compress,
    bitmask_decompress,
    pack_bitmask,
    unpack_bitmask,
)
from swiss_knife.compression.pruning.sparsegpt import refit_kept_weights, sparsegpt_prune
from swiss_knife.errors import ModelLoadError

pytestmark = pytest.mark.usefixtures("single_thread")


def gaussian(out: int = 64, inp: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def correlated_inputs(inp: int = 96, tokens: int = 768, seed: int = 0) -> torch.Tensor:
    """X = Z @ A with per-channel magnitudes spread like LLM activations (a few loud channels)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, inp, generator=generator)
    a = torch.randn(inp, inp, generator=generator) / inp**0.5
    loudness = torch.exp(torch.randn(inp, generator=generator))
    return (z @ a) * loudness  # (tokens, in)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]  # (in, in), the engine's running-mean convention


def output_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return float((X @ (W - Q).T).norm() / (X @ W.T).norm())


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize(("numel", "sparsity", "count"), [(10, 0.5, 5), (5, 0.5, 3), (7, 0.0, 0)])
def test_prune_count_rounds_half_up(numel: int, sparsity: float, count: int) -> None:
    assert prune_count(numel, sparsity) == count


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_prune_count_rejects_sparsity_outside_the_unit_interval(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        prune_count(10, sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_row_and_layer_masks_prune_exact_counts(sparsity: float) -> None:
    W = gaussian()
    scores = magnitude_scores(W)
    rows = row_topk_mask(scores, sparsity)
    assert ((~rows).sum(dim=1) == prune_count(W.shape[1], sparsity)).all()
    layer = layer_topk_mask(scores, sparsity)
    assert int((~layer).sum()) == prune_count(W.numel(), sparsity)
    # The pruned weights are the smallest ones: every kept score beats every pruned one.
    if sparsity > 0:
        assert scores[layer].min() >= scores[~layer].max()
        kept_min = torch.where(rows, scores, torch.inf).min(dim=1).values
        pruned_max = torch.where(rows, -torch.inf, scores).max(dim=1).values
        assert (kept_min >= pruned_max).all()


def test_wanda_scores_weight_by_channel_norm() -> None:
    W = torch.tensor([[1.0, -2.0, 3.0]])
    norm = torch.tensor([3.0, 1.0, 0.5])
    assert torch.equal(wanda_scores(W, norm), torch.tensor([[3.0, 2.0, 1.5]]))
    # Per row, the large weight on a quiet channel goes first.
    assert row_topk_mask(wanda_scores(W, norm), 1 / 3).tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="act_norm"):
        wanda_scores(W, torch.ones(4))


def test_ties_keep_the_count_exact_and_the_choice_repeatable() -> None:
    scores = torch.ones(2, 4)
    rows = row_topk_mask(scores, 0.5)
    assert ((~rows).sum(dim=1) == 2).all() and torch.equal(rows, row_topk_mask(scores, 0.5))
    layer = layer_topk_mask(scores, 0.25)
    assert int((~layer).sum()) == 2 and torch.equal(layer, layer_topk_mask(scores, 0.25))


def test_global_masks_rank_across_layers_with_an_exact_count() -> None:
    small = gaussian(16, 32, seed=1) * 0.1
    large = gaussian(16, 32, seed=2)
    scores = {"small": magnitude_scores(small), "large": magnitude_scores(large)}
    masks = global_topk_masks(scores, 0.5)
    total = small.numel() + large.numel()
    assert sum(int((~m).sum()) for m in masks.values()) == prune_count(total, 0.5)
    # The quiet layer loses far more than half, the loud one far less.
    assert sparsity_of(small * masks["small"]) > 0.85
    assert sparsity_of(large * masks["large"]) < 0.15
    # Exact even when the threshold falls inside a run of ties.
    tied = {"a": torch.zeros(3, 4), "b": torch.ones(2, 4)}
    masks = global_topk_masks(tied, 0.1)
    assert int((~masks["a"]).sum()) == prune_count(20, 0.1) and masks["b"].all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_of_every_m(n: int, m: int) -> None:
    scores = magnitude_scores(gaussian(8, 32))
    keep = nm_mask(scores, n, m)
    assert (keep.reshape(8, -1, m).sum(dim=2) == n).all()
    assert satisfies_nm(scores * keep, n, m)
    assert sparsity_of(scores * keep) == pytest.approx(1 - n / m)
    # Within each group the kept scores are the largest.
    groups = scores.reshape(8, -1, m)
    kept = torch.where(keep.reshape(8, -1, m), groups, torch.inf).min(dim=2).values
    pruned = torch.where(keep.reshape(8, -1, m), -torch.inf, groups).max(dim=2).values
    assert (kept >= pruned).all()


def test_nm_checks() -> None:
    with pytest.raises(ValueError, match="multiple of M=8"):
        nm_mask(torch.ones(2, 12), 4, 8)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.ones(2, 8), 4, 4)
    W = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert satisfies_nm(W, 2, 4) is False
    assert satisfies_nm(W, 3, 4) is True
    assert satisfies_nm(W, 2, 3) is False  # 8 inputs are not groups of 3


# ----------------------------------------------------------------------------- SparseGPT


def test_sparsegpt_with_the_identity_hessian_is_magnitude_pruning() -> None:
    # Without correlations between inputs there is nothing to compensate: the mask is the
    # smallest |w| and the kept weights are untouched.
    W = gaussian()
    result = sparsegpt_prune(W, torch.eye(W.shape[1]), sparsity=0.5, block_size=W.shape[1])
    assert torch.equal(result.keep, layer_topk_mask(magnitude_scores(W), 0.5))
    assert torch.equal(result.weight, W * result.keep)


@pytest.mark.parametrize(
    ("sparsity", "nm"), [(0.5, None), (0.3, None), (0.75, None), (None, (2, 4)), (None, (4, 8))]
)
def test_sparsegpt_loss_is_the_damped_quadratic_error(
    sparsity: float | None, nm: tuple[int, int] | None
) -> None:
    W, X = gaussian(), correlated_inputs()
    H = hessian(X)
    damp = 0.01
    result = sparsegpt_prune(W, H, sparsity=sparsity, nm=nm, block_size=32, damp=damp)
    damped = H + damp * H.diagonal().mean() * torch.eye(H.shape[0])
    D = (W - result.weight).double()
    assert result.loss == pytest.approx(float(torch.trace(D @ damped.double() @ D.T)), rel=1e-3)


@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.7, None), (None, (2, 4))])
def test_sparsegpt_sits_between_optimal_least_squares_and_zeroing(
    sparsity: float | None, nm: tuple[int, int] | None
) -> None:
    W, X = gaussian(), correlated_inputs()
    result = sparsegpt_prune(W, hessian(X), sparsity=sparsity, nm=nm, damp=1e-4)
    keep = result.keep
    # Exact zeros exactly where the mask says, and the kept weights were updated.
    assert torch.equal(result.weight != 0, keep)
    assert not torch.equal(result.weight, W * keep)
    # Best possible weights for this mask: least squares per row over the kept columns.
    optimal = torch.zeros_like(W)
    target = X @ W.T  # (tokens, out)
    for row in range(W.shape[0]):
        cols = keep[row].nonzero().squeeze(1)
        solution = torch.linalg.lstsq(X[:, cols].double(), target[:, row].double()).solution
        optimal[row, cols] = solution.float()
    best = output_error(X, W, optimal)
    ours = output_error(X, W, result.weight)
    zeroed = output_error(X, W, W * keep)
    assert best <= ours * 1.0001 and ours < 0.95 * zeroed


def damped_masked_optimum(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float
) -> tuple[torch.Tensor, float]:
    """The exact minimiser of tr((Q - W) H_d (Q - W)^T) with Q zero off `keep`, row by row."""
    Hd = (H + damp * H.diagonal().mean() * torch.eye(H.shape[0])).double()
    best = torch.zeros_like(W, dtype=torch.float64)
    for row in range(W.shape[0]):
        kept, pruned = keep[row], ~keep[row]
        w = W[row].double()
        solve = torch.linalg.solve(Hd[kept][:, kept], Hd[kept][:, pruned] @ w[pruned])
        best[row, kept] = w[kept] + solve
    D = best - W.double()
    return best.float(), float(torch.trace(D @ Hd @ D.T))


def damped_loss(W: torch.Tensor, H: torch.Tensor, Q: torch.Tensor, damp: float) -> float:
    Hd = (H + damp * H.diagonal().mean() * torch.eye(H.shape[0])).double()
    D = (Q - W).double()
    return float(torch.trace(D @ Hd @ D.T))


@pytest.mark.parametrize(("sparsity", "nm"), [(0.5, None), (0.7, None), (None, (2, 4))])
def test_refit_lowers_sparsegpt_loss_towards_the_masked_optimum(
    sparsity: float | None, nm: tuple[int, int] | None
) -> None:
    W, X = gaussian(), correlated_inputs()
    H, damp = hessian(X), 0.01
    plain = sparsegpt_prune(W, H, sparsity=sparsity, nm=nm, damp=damp)
    _, optimum = damped_masked_optimum(W, H, plain.keep, damp)
    previous = plain.loss
    for iterations in (1, 3, 10):
        refit = sparsegpt_prune(
            W, H, sparsity=sparsity, nm=nm, damp=damp, refit_iterations=iterations
        )
        # Same mask, exact zeros, and the reported losses are the true objective.
        assert torch.equal(refit.keep, plain.keep)
        assert torch.equal(refit.weight != 0, refit.keep)
        assert refit.sparsegpt_loss == pytest.approx(plain.loss, rel=1e-6)
        assert refit.loss == pytest.approx(damped_loss(W, H, refit.weight, damp), rel=1e-3)
        # More steps, lower loss, never below the exact optimum for the mask.
        assert optimum * (1 - 1e-4) <= refit.loss < previous
        previous = refit.loss
    # On this 96-input problem SparseGPT leaves a real gap that the refit mostly closes.
    assert plain.loss > 1.05 * optimum
    assert previous - optimum < 0.1 * (plain.loss - optimum)


def test_refit_converges_to_the_masked_least_squares_weights() -> None:
    W, X = gaussian(out=8, inp=32), correlated_inputs(inp=32, tokens=256)
    H, damp = hessian(X), 0.01
    plain = sparsegpt_prune(W, H, sparsity=0.5, damp=damp)
    best, optimum = damped_masked_optimum(W, H, plain.keep, damp)
    # Conjugate gradients solve a row's n-variable problem in at most n steps (here 16).
    weight, before, after = refit_kept_weights(
        W, H, plain.weight, plain.keep, damp=damp, iterations=40
    )
    assert before == pytest.approx(plain.loss, rel=1e-4)
    assert after == pytest.approx(optimum, rel=1e-3)
    torch.testing.assert_close(weight, best, rtol=1e-3, atol=1e-3)


def test_refit_keeps_dead_inputs_zero_and_w_unchanged() -> None:
    W, X = gaussian(), correlated_inputs()
    X[:, 5] = 0.0  # an input no token activates
    H = hessian(X)
    original = W.clone()
    result = sparsegpt_prune(W, H, sparsity=0.5, refit_iterations=5)
    assert torch.equal(W, original)
    assert torch.equal(result.weight[:, 5], torch.zeros(W.shape[0]))
    assert torch.isfinite(result.weight).all()
    assert result.loss <= result.sparsegpt_loss


def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs() -> None:
    W, X = gaussian(), correlated_inputs()
    norm = X.square().sum(dim=0).sqrt()
    for sparsity, nm in ((0.5, None), (None, (2, 4))):
        ours = sparsegpt_prune(W, hessian(X), sparsity=sparsity, nm=nm).weight
        wanda_keep = (
            nm_mask(wanda_scores(W, norm), *nm)
            if nm
            else row_topk_mask(wanda_scores(W, norm), sparsity or 0)
        )
        magnitude_keep = (
            nm_mask(magnitude_scores(W), *nm)
            if nm
            else layer_topk_mask(magnitude_scores(W), sparsity or 0)
        )
        errors = [output_error(X, W, Q) for Q in (ours, W * wanda_keep, W * magnitude_keep)]
        assert errors[0] < errors[1] < errors[2], errors


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_sparsegpt_unstructured_count_is_exact_for_any_block_size(sparsity: float) -> None:
    W, X = gaussian(out=7, inp=45), correlated_inputs(inp=45)
    for block_size in (1, 8, 45, 128):
        result = sparsegpt_prune(W, hessian(X), sparsity=sparsity, block_size=block_size)
        assert int((~result.keep).sum()) == prune_count(W.numel(), sparsity)


def test_sparsegpt_nm_pattern_with_blocks_that_are_not_multiples_of_m() -> None:
    W, X = gaussian(inp=96), correlated_inputs(inp=96)
    result = sparsegpt_prune(W, hessian(X), nm=(4, 8), block_size=20)
    assert satisfies_nm(result.weight, 4, 8)
    assert (result.keep.reshape(W.shape[0], -1, 8).sum(dim=2) == 4).all()


def test_sparsegpt_dead_inputs_and_argument_checks() -> None:
    W, X = gaussian(), correlated_inputs()
    X[:, 5] = 0.0
    result = sparsegpt_prune(W, hessian(X), sparsity=0.5)
    assert (result.weight[:, 5] == 0).all()
    assert torch.isfinite(result.weight).all()
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_prune(W, hessian(X))
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_prune(W, hessian(X), sparsity=0.5, nm=(2, 4))
    with pytest.raises(ValueError, match="H must be"):
        sparsegpt_prune(W, torch.eye(3), sparsity=0.5)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(gaussian(inp=90), torch.eye(90), nm=(4, 8))
    # Inputs are not modified.
    before = W.clone()
    sparsegpt_prune(W, hessian(X), sparsity=0.5)
    assert torch.equal(W, before)


# ----------------------------------------------------------------------------- OWL


def test_outlier_ratio_pools_a_blocks_scores() -> None:
    quiet = torch.ones(4, 4)
    loud = torch.ones(4, 4)
    loud[0, 0] = 100.0
    # Pooled mean is (31 + 100) / 32; only the 100 is above 5x that.
    assert outlier_ratio([quiet, loud], 5.0) == pytest.approx(1 / 32)
    assert outlier_ratio([quiet], 5.0) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        outlier_ratio([quiet], 0.0)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_owl_keeps_the_weighted_mean_and_stays_within_lambda(target: float) -> None:
    generator = torch.Generator().manual_seed(0)
    ratios = (torch.rand(12, generator=generator) * 0.05).tolist()
    sizes = [1000 * (1 + i % 3) for i in range(12)]
    lam = 0.08
    out = owl_sparsities(ratios, sizes, target, lam)
    mean = sum(s * n for s, n in zip(out, sizes, strict=True)) / sum(sizes)
    assert mean == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in out)
    assert max(out) - min(out) > lam  # the allocation really varies
    # More outliers, less pruning.
    order = sorted(range(12), key=lambda i: ratios[i])
    assert all(out[a] >= out[b] for a, b in itertools.pairwise(order))


def test_owl_degenerate_cases() -> None:
    assert owl_sparsities([0.01, 0.01], [10, 10], 0.5, 0.08) == [0.5, 0.5]
    assert owl_sparsities([0.01, 0.03], [10, 10], 0.5, 0.0) == [0.5, 0.5]
    # Where target + lambda would reach 1, sparsities stay below 1 and the mean still holds.
    out = owl_sparsities([0.0, 0.1, 0.2], [1, 1, 1], 0.95, 0.08)
    assert all(s < 1 for s in out) and sum(out) / 3 == pytest.approx(0.95)


def test_round_to_grid_snaps_and_keeps_the_total() -> None:
    sparsities = [0.431, 0.569, 0.5]
    sizes = [64 * 64, 64 * 64, 128 * 64]
    widths = [64, 64, 64]
    snapped = round_to_grid(sparsities, sizes, widths, 0.5)
    assert all(abs(s * 64 - round(s * 64)) < 1e-9 for s in snapped)
    assert all(abs(a - b) < 1 / 64 for a, b in zip(snapped, sparsities, strict=True))
    total = sum(s * n for s, n in zip(snapped, sizes, strict=True))
    assert total == pytest.approx(0.5 * sum(sizes), abs=64)


# ----------------------------------------------------------------------------- schedules


def test_cubic_and_linear_schedules() -> None:
    cubic = sparsity_schedule(0.8, 4, "cubic")
    assert cubic[-1] == 0.8 and cubic == sorted(cubic)
    assert cubic[0] == pytest.approx(0.8 * (1 - 0.75**3))
    # Cubic front-loads the pruning: each step removes less than the one before.
    gaps = [b - a for a, b in zip([0.0, *cubic], cubic, strict=False)]
    assert gaps == sorted(gaps, reverse=True)
    assert sparsity_schedule(0.6, 3, "linear") == pytest.approx([0.2, 0.4, 0.6])
    assert sparsity_schedule(0.5, 1) == [0.5]
    with pytest.raises(ValueError, match="steps"):
        sparsity_schedule(0.5, 0)


def test_gradual_distillation_loss() -> None:
    # Gradual pruning distils with `ForwardKL` over every position: T^2 KL(teacher || student).
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator)
    assert float(ForwardKL(2.0)(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11, generator=generator)
    t = 3.0
    p = torch.softmax(other / t, dim=-1)
    expected = (p * (p.log() - torch.log_softmax(logits / t, dim=-1))).sum(-1).mean() * t**2
    assert float(ForwardKL(t)(logits, other)) == pytest.approx(float(expected), rel=1e-5)


# ----------------------------------------------------------------------------- bitmask


def test_bitmask_packing_matches_numpy_little_endian_bits() -> None:
    generator = torch.Generator().manual_seed(0)
    for cols in (1, 8, 13, 64):
        bits = torch.rand(5, cols, generator=generator) > 0.5
        packed = pack_bitmask(bits)
        expected = numpy.packbits(bits.numpy(), axis=-1, bitorder="little")
        assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(cols / 8))
        assert torch.equal(packed, torch.from_numpy(expected))
        assert torch.equal(unpack_bitmask(packed, cols), bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_round_trip_is_exact(dtype: torch.dtype) -> None:
    W = gaussian(16, 40).to(dtype)
    W = W * layer_topk_mask(magnitude_scores(W), 0.6)
    tensors = bitmask_compress(W)
    assert tensors["compressed"].numel() == int(torch.count_nonzero(W))
    assert tensors["compressed"].dtype == dtype and tensors["row_offsets"][0] == 0
    assert torch.equal(tensors["row_offsets"][1:], (W != 0).sum(dim=1).cumsum(0)[:-1])
    assert torch.equal(bitmask_decompress(tensors), W)
    broken = {**tensors, "compressed": tensors["compressed"][:-1]}
    with pytest.raises(ModelLoadError, match="corrupt"):
        bitmask_decompress(broken)
