"""Quantization tensor math: grids, round-to-nearest with clip search, and GPTQ.

Quality is asserted as thresholds (SQNR in dB, output-error ratios) measured on seeded random
data and set a little below the measured values, so a regression in the math shows up as a
failure while harmless float noise does not.
"""

from __future__ import annotations

import logging

import pytest
import torch

from swiss_knife.compression.quantization.gptq import gptq_quantize
from swiss_knife.compression.quantization.grid import (
    QuantGrid,
    QuantizedWeight,
    check_group_size,
    compute_qparams,
    dequantize,
    fitting_group_sizes,
    quantize,
)
from swiss_knife.compression.quantization.rtn import rtn_quantize
from swiss_knife.errors import UserInputError

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny matmuls, one thread


def gaussian(out: int = 256, inp: int = 512, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=generator)


def sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - wq.float()).pow(2).sum()))


def correlated_inputs(inp: int = 256, tokens: int = 1024, seed: int = 0) -> torch.Tensor:
    """X = Z @ A with per-channel magnitudes spread like LLM activations (a few loud channels)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, inp, generator=generator)
    a = torch.randn(inp, inp, generator=generator) / inp**0.5
    loudness = torch.exp(torch.randn(inp, generator=generator))
    return (z @ a) * loudness  # (tokens, in)


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(UserInputError, match="bits"):
        QuantGrid(bits)
    with pytest.raises(UserInputError, match="bits"):
        compute_qparams(gaussian(4, 8), bits, True)


def test_bad_group_size_and_non_integer_bits() -> None:
    with pytest.raises(UserInputError, match="bits"):
        QuantGrid(True)  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="group_size"):
        QuantGrid(4, group_size=0)


def test_group_size_must_divide_the_width() -> None:
    # SmolLM2's hidden size 576 is not a multiple of 128: the error names the sizes that fit.
    assert fitting_group_sizes(576) == [2, 4, 8, 16, 32, 64]
    # Any divisor fits; a width with no power-of-two divisor gets them all, a prime width none.
    assert fitting_group_sizes(172) == [2, 4]
    assert fitting_group_sizes(1001) == [7, 11, 13, 77, 91, 143]
    assert fitting_group_sizes(97) == []
    with pytest.raises(UserInputError, match=r"16, 32, 64, or per-channel"):
        check_group_size(576, 128)
    with pytest.raises(UserInputError, match="128 does not divide"):
        rtn_quantize(gaussian(8, 576), QuantGrid(4, group_size=128))
    with pytest.raises(UserInputError):
        gptq_quantize(gaussian(8, 576), torch.eye(576), QuantGrid(4, group_size=128))
    check_group_size(576, 64)
    check_group_size(576, None)


def test_conventions_match_compressed_tensors_int_grid() -> None:
    # int4: signed levels [-8, 7]; symmetric scale = absmax / 7.5; asymmetric zero is a level.
    w = torch.tensor([[-1.5, 0.0, 0.75, 1.5]])
    scale, zero = compute_qparams(w, 4, symmetric=True)
    assert scale.item() == pytest.approx(1.5 / 7.5)
    assert zero.item() == 0
    q = quantize(w, scale, zero, 4, symmetric=True)
    assert q.tolist() == [[-8, 0, 4, 7]]  # +absmax -> 7.5 -> rounds to 8 -> clamped to 7
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5]])  # all positive: the range is widened to include 0
    scale, zero = compute_qparams(w, 4, symmetric=False)
    assert scale.item() == pytest.approx(3.5 / 15)
    assert zero.item() == -8
    q = quantize(w, scale, zero, 4, symmetric=False)
    assert q.min() >= -8 and q.max() == 7
    assert dequantize(q, scale, zero)[0, -1].item() == pytest.approx(3.5)


def test_clip_ratio_shrinks_the_range_per_row() -> None:
    w = gaussian(3, 64)
    ratio = torch.tensor([[1.0], [0.9], [0.8]])
    scale, zero = compute_qparams(w, 4, symmetric=False, clip_ratio=ratio)
    for row in range(3):
        s, z = compute_qparams(w[row : row + 1], 4, False, clip_ratio=float(ratio[row]))
        assert torch.equal(scale[row], s[0]) and torch.equal(zero[row], z[0])
    full, _ = compute_qparams(w, 4, symmetric=True)
    shrunk, _ = compute_qparams(w, 4, symmetric=True, clip_ratio=0.5)
    torch.testing.assert_close(shrunk, full * 0.5)


def test_zero_is_exact_and_all_zero_rows_survive() -> None:
    w = gaussian(4, 64)
    w[1] = 0.0
    w[2, ::3] = 0.0
    for symmetric in (True, False):
        qw = rtn_quantize(w, QuantGrid(4, symmetric, 16))
        wq = qw.dequantize()
        assert torch.isfinite(wq).all()
        assert (wq[1] == 0).all() and (wq[2, ::3] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_quantized_weight_shapes_and_levels(symmetric: bool, group_size: int | None) -> None:
    w = gaussian(48, 128).to(torch.bfloat16)
    grid = QuantGrid(3, symmetric, group_size)
    qw = rtn_quantize(w, grid)
    n_groups = 1 if group_size is None else 128 // group_size
    assert qw.q.shape == (48, 128) and qw.q.dtype == torch.int8
    assert qw.scale.shape == (48, n_groups) and qw.scale.dtype == torch.bfloat16
    if symmetric:
        assert qw.zero is None
    else:
        assert qw.zero is not None and qw.zero.shape == (48, n_groups)
        assert qw.zero.dtype == torch.int8
    assert qw.g_idx is None
    assert int(qw.q.min()) >= grid.qmin and int(qw.q.max()) <= grid.qmax
    wq = qw.dequantize()
    assert wq.shape == (48, 128) and wq.dtype == torch.bfloat16
    # Every group holds at most 2^bits distinct values.
    groups = wq.float().reshape(48 * n_groups, -1)
    assert max(len(row.unique()) for row in groups) <= 2**grid.bits
    # Quantizing the dequantized weight again is a fixed point.
    again = quantize(wq.float(), qw.scale.repeat_interleave(128 // n_groups, 1), None, 3, True)
    if symmetric:
        assert torch.equal(again, qw.q)


def test_quantized_weight_validates_shapes() -> None:
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="scale"):
        QuantizedWeight(q, torch.ones(4, 2), None, QuantGrid(4, True, 2))
    with pytest.raises(ValueError, match="zero"):
        QuantizedWeight(q, torch.ones(4, 1), None, QuantGrid(4, False, None))


# ----------------------------------------------------------------------------- RTN

# Measured on gaussian() (256 x 512, seed 0), min/max scales, with compressed-tensors' grid:
# 8-bit per channel 42.6 (sym) / 43.2 (asym); g128: 4-bit 19.1 / 19.9, 3-bit 12.5 / 13.3,
# 2-bit 5.16 / 5.94.
SQNR_FLOORS = [
    (8, None, True, 42.0),
    (8, None, False, 42.7),
    (4, 128, True, 18.7),
    (4, 128, False, 19.5),
    (3, 128, True, 12.1),
    (3, 128, False, 12.9),
    (2, 128, True, 5.0),
    (2, 128, False, 5.6),
]


@pytest.mark.parametrize(("bits", "group_size", "symmetric", "floor"), SQNR_FLOORS)
def test_rtn_sqnr(bits: int, group_size: int | None, symmetric: bool, floor: float) -> None:
    w = gaussian()
    db = sqnr_db(w, rtn_quantize(w, QuantGrid(bits, symmetric, group_size)).dequantize())
    assert db > floor


def test_each_bit_is_worth_about_6_db() -> None:
    w = gaussian()
    db = {b: sqnr_db(w, rtn_quantize(w, QuantGrid(b, True, 128)).dequantize()) for b in (3, 8)}
    per_bit = (db[8] - db[3]) / 5
    assert 5.5 < per_bit < 7.0  # uniform quantization: 20 log10(2) = 6.02 dB per bit


@pytest.mark.parametrize("norm", [2.0, 2.4])
@pytest.mark.parametrize(
    "grid",
    [QuantGrid(4, True, None), QuantGrid(4, False, 64), QuantGrid(3, True, 32), QuantGrid(8)],
)
def test_clip_search_never_increases_the_error(grid: QuantGrid, norm: float) -> None:
    w = gaussian(128, 256, seed=1)
    group = grid.group_size or 256

    def row_errors(qw: QuantizedWeight) -> torch.Tensor:
        diff = (w - qw.dequantize().float()).reshape(-1, group)  # (rows * groups, group)
        return diff.abs().pow(norm).sum(dim=1)

    plain = row_errors(rtn_quantize(w, grid))
    clipped = row_errors(rtn_quantize(w, grid, clip_search=True, norm=norm))
    assert (clipped <= plain * (1 + 1e-6)).all()
    if grid.bits <= 4:
        assert clipped.sum() < 0.97 * plain.sum()  # and at low bits it clearly helps


def test_clip_search_gains_at_4_bits() -> None:
    w = gaussian()
    grid = QuantGrid(4, True, None)
    plain = sqnr_db(w, rtn_quantize(w, grid).dequantize())
    clipped = sqnr_db(w, rtn_quantize(w, grid, clip_search=True).dequantize())
    assert clipped > plain + 1.0  # measured 17.9 -> 19.2 dB


def test_asymmetric_beats_symmetric_on_skewed_weights() -> None:
    generator = torch.Generator().manual_seed(2)
    w = torch.rand(256, 512, generator=generator) + 0.2  # all positive: half a symmetric grid idles
    sym = sqnr_db(w, rtn_quantize(w, QuantGrid(4, True, 128)).dequantize())
    asym = sqnr_db(w, rtn_quantize(w, QuantGrid(4, False, 128)).dequantize())
    assert asym > sym + 4.0  # about one bit (6 dB) better


# ----------------------------------------------------------------------------- GPTQ


def output_error(x: torch.Tensor, w: torch.Tensor, qw: QuantizedWeight) -> float:
    return float((x @ (w - qw.dequantize().float()).T).norm())


# Measured ratios ||X(W - Q_gptq)^T|| / ||X(W - Q_rtn)^T||: 0.81-0.90 in natural order, 0.50-0.53
# with act_order (the loud input channels go first).
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize(
    ("act_order", "static_groups", "max_ratio"),
    [(False, False, 0.92), (True, False, 0.56), (True, True, 0.56)],
)
def test_gptq_beats_rtn_on_output_error(
    bits: int, group_size: int | None, act_order: bool, static_groups: bool, max_ratio: float
) -> None:
    x = correlated_inputs()
    w = gaussian(128, 256, seed=3)
    grid = QuantGrid(bits, True, group_size)
    qw, _ = gptq_quantize(w, x.T @ x, grid, act_order=act_order, static_groups=static_groups)
    ratio = output_error(x, w, qw) / output_error(x, w, rtn_quantize(w, grid))
    assert ratio < max_ratio


@pytest.mark.parametrize(
    "grid", [QuantGrid(4, True, None), QuantGrid(4, False, 32), QuantGrid(3, True, 64)]
)
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_with_identity_hessian_is_rtn(grid: QuantGrid, clip_search: bool) -> None:
    # H = I: no input is correlated with another, so there is no error to propagate.
    w = gaussian(64, 128, seed=4)
    qw, _ = gptq_quantize(w, torch.eye(128), grid, act_order=True, clip_search=clip_search)
    ref = rtn_quantize(w, grid, clip_search=clip_search)
    assert torch.equal(qw.q, ref.q)
    assert torch.equal(qw.scale, ref.scale)
    assert qw.g_idx is None


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_loss_is_the_damped_quadratic_error(act_order: bool) -> None:
    x = correlated_inputs()
    w = gaussian(64, 256, seed=5)
    h = x.T @ x
    qw, loss = gptq_quantize(w, h, QuantGrid(4, False, 64), act_order=act_order, damp=0.01)
    delta = w - qw.dequantize().float()
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(256)
    assert loss == pytest.approx(float(torch.trace(delta @ damped @ delta.T)), rel=1e-3)


def test_gptq_dead_inputs_become_zero_columns() -> None:
    x = correlated_inputs()
    x[:, [3, 100, 200]] = 0.0  # inputs that no calibration token activates
    w = gaussian(32, 256, seed=6)
    qw, loss = gptq_quantize(w, x.T @ x, QuantGrid(4, True, 32))
    wq = qw.dequantize()
    assert torch.isfinite(wq).all() and loss > 0
    assert (wq[:, [3, 100, 200]] == 0).all()


def test_gptq_act_order_g_idx_semantics() -> None:
    x = correlated_inputs()
    w = gaussian(32, 256, seed=7)
    h = x.T @ x
    qw, _ = gptq_quantize(w, h, QuantGrid(4, False, 64), act_order=True)
    assert qw.g_idx is not None and qw.g_idx.shape == (256,)
    # Every group has group_size members, assigned in decreasing order of H's diagonal.
    assert torch.bincount(qw.g_idx).tolist() == [64, 64, 64, 64]
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert (qw.g_idx[order[:64]] == 0).all() and (qw.g_idx[order[-64:]] == 3).all()
    assert qw.zero is not None
    manual = (qw.q.float() - qw.zero[:, qw.g_idx].float()) * qw.scale[:, qw.g_idx]
    assert torch.equal(qw.dequantize(), manual)
    # With static groups the groups stay contiguous: no g_idx.
    static, _ = gptq_quantize(w, h, QuantGrid(4, False, 64), act_order=True, static_groups=True)
    assert static.g_idx is None


def test_gptq_singular_hessian_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    x = correlated_inputs(inp=128, tokens=16)  # rank 16 < 128: H is singular
    w = gaussian(16, 128, seed=8)
    with caplog.at_level(logging.WARNING):
        qw, loss = gptq_quantize(w, x.T @ x, QuantGrid(4, True, None), damp=0.0)
    assert torch.isfinite(qw.dequantize()).all() and loss >= 0
    assert "not positive definite" in caplog.text


def test_gptq_rejects_mismatched_hessian() -> None:
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(gaussian(8, 16), torch.eye(8), QuantGrid(4))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_shared_factors_give_the_same_result(
    act_order: bool, factorisations: list[int]
) -> None:
    """Two weights that read the same input (q and k) solved with one cached factorisation
    give exactly what two separate solves give; the factorisation runs once."""
    calls = factorisations
    x = gaussian(300, 64)
    h = x.T @ x
    grid = QuantGrid(4, False, 32)
    q, k = gaussian(48, 64), gaussian(16, 64)
    alone = [gptq_quantize(w, h, grid, act_order=act_order) for w in (q, k)]
    assert len(calls) == 2
    factors: dict[tuple[object, ...], torch.Tensor] = {}
    shared = [gptq_quantize(w, h, grid, act_order=act_order, factors=factors) for w in (q, k)]
    assert len(calls) == 3 and len(factors) == 1
    for (a, loss_a), (b, loss_b) in zip(alone, shared, strict=True):
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and loss_a == loss_b


def test_large_factorisations_get_the_threads_a_column_loop_took() -> None:
    """Inside a column loop (one thread) an inverse-Hessian factorisation of at least
    FACTOR_THREADS_MIN rows runs on the threads the caller had; a small one stays on one."""
    from swiss_knife.device import (
        FACTOR_THREADS_MIN,
        column_loop_threads,
        factorisation_threads,
        intra_op_threads,
    )

    cpu = torch.device("cpu")
    with intra_op_threads(2):
        with column_loop_threads(cpu):
            assert torch.get_num_threads() == 1
            with factorisation_threads(FACTOR_THREADS_MIN, cpu):
                assert torch.get_num_threads() == 2
            with factorisation_threads(FACTOR_THREADS_MIN - 1, cpu):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with factorisation_threads(FACTOR_THREADS_MIN, cpu):  # outside a column loop: as is
            assert torch.get_num_threads() == 2
    with intra_op_threads(1), factorisation_threads(FACTOR_THREADS_MIN, cpu):
        assert torch.get_num_threads() == 1
