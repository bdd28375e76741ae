"""HQQ: its tensor math (better SQNR than round-to-nearest on the same asymmetric grid, integer
levels and zero points, determinism), its config and registration, apply -> save -> reload with
the same logits and the same stored weights, the checks made before any work, and HQQ beating
round-to-nearest in perplexity on the real stories260K model (skipped when the assets are absent).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from conftest import make_tiny_llama, requires_ct
from swiss_knife.compression.metrics import weight_sqnr_db
from swiss_knife.compression.quantization.api import check_quantize, quantize
from swiss_knife.compression.quantization.base import get_method
from swiss_knife.compression.quantization.grid import QuantGrid, compute_qparams, level_range
from swiss_knife.compression.quantization.hqq import (
    HQQConfig,
    check_hqq,
    hqq_optimize,
    hqq_quantize,
    shrink_lp,
)
from swiss_knife.compression.quantization.rtn import rtn_quantize
from swiss_knife.errors import UserInputError
from swiss_knife.models import save_model

pytestmark = pytest.mark.usefixtures("single_thread")


def heavy_tailed(out: int = 128, inp: int = 256, seed: int = 0) -> torch.Tensor:
    """Student-t weights (4 degrees of freedom) at the scale of an LLM's linear layers."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((out, inp)) * 0.02


def group_sq_errors(W: torch.Tensor, approx: torch.Tensor, group: int) -> torch.Tensor:
    return (W.float() - approx.float()).reshape(-1, group).square().sum(dim=1)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- the math


def test_shrink_lp_is_soft_thresholding_for_p_1() -> None:
    x = torch.linspace(-1.0, 1.0, 41)
    expected = torch.sign(x) * (x.abs() - 0.25).clamp_min(0.0)
    torch.testing.assert_close(shrink_lp(x, beta=4.0, lp_norm=1.0), expected)


def test_shrink_lp_for_p_below_1_zeroes_small_entries_and_shrinks_large_ones() -> None:
    x = torch.tensor([0.0, 1e-3, -1e-3, 0.05, -0.5, 2.0, -4.0])
    beta, p = 10.0, 0.7
    out = shrink_lp(x, beta, p)
    assert torch.isfinite(out).all()
    # Threshold |x| = beta^(-1/(2-p)): about 0.17 for beta 10, p 0.7.
    threshold = beta ** (-1.0 / (2.0 - p))
    small = x.abs() <= threshold
    assert torch.equal(out[small], torch.zeros_like(out[small]))
    assert (out[~small].sign() == x[~small].sign()).all()
    assert (out.abs() <= x.abs()).all()
    # Far above the threshold the shrinkage |x|^(p-1)/beta vanishes relative to |x|.
    assert float((x[-1] - out[-1]).abs()) == pytest.approx(4.0 ** (p - 1.0) / beta, rel=1e-5)


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bits", [4, 3])
def test_hqq_beats_rtn_asymmetric_on_heavy_tailed_weights(bits: int, group_size: int) -> None:
    W = heavy_tailed()
    hqq = hqq_quantize(W, bits, group_size).dequantize()
    rtn = rtn_quantize(W, QuantGrid(bits, symmetric=False, group_size=group_size)).dequantize()
    gain = weight_sqnr_db(W, hqq) - weight_sqnr_db(W, rtn)
    assert gain > 0.15, f"HQQ gains only {gain:.3f} dB over RTN at {bits} bits, g{group_size}"
    # No group ends worse than its round-to-nearest start.
    hqq_err = group_sq_errors(W, hqq, group_size)
    rtn_err = group_sq_errors(W, rtn, group_size)
    assert (hqq_err <= rtn_err * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_and_zero_points_are_integers_on_the_grid(bits: int) -> None:
    W = heavy_tailed(32, 128, seed=1)
    qw = hqq_quantize(W, bits, 32)
    qmin, qmax = level_range(bits)
    assert qw.grid == QuantGrid(bits, symmetric=False, group_size=32)
    assert qw.q.dtype == torch.int8 and qw.zero is not None and qw.zero.dtype == torch.int8
    # Unsigned codes 0 .. 2^b - 1, stored offset by 2^(b-1) as compressed-tensors packs them.
    codes = qw.q.int() - qmin
    assert int(codes.min()) >= 0 and int(codes.max()) <= (1 << bits) - 1
    assert int(qw.zero.min()) >= qmin and int(qw.zero.max()) <= qmax
    assert qw.scale.shape == (32, 4) and (qw.scale > 0).all()
    # What is stored dequantizes to (q - z) * s per group.
    expected = (qw.q.float().reshape(32, 4, 32) - qw.zero.float()[..., None]) * qw.scale[..., None]
    torch.testing.assert_close(qw.dequantize(), expected.reshape(32, 128), rtol=0, atol=0)


def test_hqq_is_deterministic() -> None:
    W = heavy_tailed(seed=2)
    first, second = hqq_quantize(W, 4, 64), hqq_quantize(W.clone(), 4, 64)
    assert torch.equal(first.q, second.q)
    assert torch.equal(first.scale, second.scale)
    assert first.zero is not None and second.zero is not None
    assert torch.equal(first.zero, second.zero)


@pytest.mark.parametrize("group_size", [16, None])
def test_zero_iterations_is_round_to_nearest_on_the_asymmetric_grid(
    group_size: int | None,
) -> None:
    W = heavy_tailed(16, 64, seed=3)
    hqq = hqq_quantize(W, 4, group_size, iterations=0)
    rtn = rtn_quantize(W, QuantGrid(4, symmetric=False, group_size=group_size))
    assert torch.equal(hqq.q, rtn.q) and torch.equal(hqq.scale, rtn.scale)
    assert hqq.zero is not None and rtn.zero is not None and torch.equal(hqq.zero, rtn.zero)


def test_early_stopping_ends_when_the_error_stops_decreasing() -> None:
    W = heavy_tailed(64, 128, seed=4)
    rows = W.reshape(-1, 32)
    scale, zero = compute_qparams(rows, 4, False)
    _, _, stopped = hqq_optimize(rows, scale, zero, 4, iterations=200)
    _, _, full = hqq_optimize(rows, scale, zero, 4, iterations=30, early_stop=False)
    assert 1 <= stopped < 200
    assert full == 30


def test_bf16_weights_get_bf16_scales_and_stay_at_least_as_good_as_rtn() -> None:
    W = heavy_tailed(seed=5).to(torch.bfloat16)
    hqq = hqq_quantize(W, 4, 32)
    rtn = rtn_quantize(W, QuantGrid(4, symmetric=False, group_size=32))
    assert hqq.scale.dtype == torch.bfloat16
    reference = W.float()
    assert weight_sqnr_db(reference, hqq.dequantize()) > weight_sqnr_db(reference, rtn.dequantize())
    assert (
        group_sq_errors(reference, hqq.dequantize(), 32)
        <= group_sq_errors(reference, rtn.dequantize(), 32) * (1 + 1e-6)
    ).all()


def test_all_zero_and_constant_groups_stay_exact() -> None:
    W = heavy_tailed(4, 64, seed=6)
    W[0] = 0.0
    W[1, :32] = 0.01
    qw = hqq_quantize(W, 4, 32)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(64))
    torch.testing.assert_close(deq[1, :32], W[1, :32], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lp_norm": 0.0}, "lp_norm"),
        ({"lp_norm": 1.5}, "lp_norm"),
        ({"beta": 0.0}, "beta"),
        ({"kappa": 0.5}, "kappa"),
        ({"iterations": -1}, "iterations"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        hqq_quantize(heavy_tailed(4, 32), 4, 16, **settings)


def test_group_size_that_does_not_divide_is_refused() -> None:
    with pytest.raises(UserInputError, match="does not divide"):
        hqq_quantize(heavy_tailed(4, 48), 4, 32)


# ----------------------------------------------------------------------------- config, registry


def test_config_defaults_bounds_and_frozen() -> None:
    config = HQQConfig()
    assert (config.method, config.symmetric) == ("hqq", False)
    assert (config.iterations, config.lp_norm, config.beta, config.kappa) == (20, 0.7, 10.0, 1.01)
    for field in ("iterations", "lp_norm", "beta", "kappa", "early_stop", "symmetric"):
        assert HQQConfig.model_fields[field].description, field
    for bad in (
        {"symmetric": True},
        {"lp_norm": 0.0},
        {"lp_norm": 1.2},
        {"beta": 0.0},
        {"kappa": 0.9},
        {"iterations": -1},
        {"itterations": 5},
    ):
        with pytest.raises(ValidationError):
            HQQConfig(**bad)
    with pytest.raises(ValidationError):
        config.bits = 3  # type: ignore[misc]


def test_registered_as_a_data_free_method() -> None:
    info = get_method("hqq")
    assert info.config_class is HQQConfig
    assert not info.needs_calibration
    assert info.check is check_hqq


# ----------------------------------------------------------------------------- orchestration


def _weight_file(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


@requires_ct
def test_quantize_save_reload_gives_the_same_logits_and_weights(tmp_path: Path) -> None:
    from swiss_knife.compression.quantization.compressed_tensors_format import (
        load_compressed,
        unpack_weight,
    )

    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    original = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    outcome = quantize(model, HQQConfig(bits=4, group_size=32))
    assert outcome.model is model and outcome.format == "compressed-tensors/pack-quantized"
    assert outcome.report["layers"] == 14  # 7 linears in each of 2 blocks; lm_head ignored
    for row in outcome.report["sensitivity"]:
        assert row["sqnr_db"] >= row["rtn_sqnr_db"] - 1e-9, row
    assert outcome.report["mean_rel_error"] < outcome.report["mean_rtn_rel_error"]
    assert outcome.steps[0].startswith("HQQ: 4-bit asymmetric integer weights, groups of 32")
    assert not torch.equal(logits(model, ids), logits(original, ids))

    out = save_model(model, tmp_path / "hqq", writer=outcome.writer)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["format"], config["ignore"]) == ("pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (4, False, 32)

    # The stored integers dequantize to exactly the weights the in-memory model computes with.
    stored = _weight_file(out)
    grid = QuantGrid(4, symmetric=False, group_size=32)
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and isinstance(module, nn.Linear):
            tensors = {
                key.removeprefix(f"{name}."): value
                for key, value in stored.items()
                if key.startswith(f"{name}.weight_")
            }
            assert torch.equal(unpack_weight(tensors, grid).dequantize(), module.weight), name

    reloaded = load_compressed(out).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)


@requires_ct
def test_plain_from_pretrained_of_the_asymmetric_checkpoint(tmp_path: Path) -> None:
    """The brief is a plain `from_pretrained`; compressed-tensors 0.18 to 0.20 cannot do it for
    any asymmetric grid (RTN's and AWQ's included). This passes once the installed version can,
    and reports the known failure until then."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    outcome = quantize(model, HQQConfig(bits=4, group_size=32))
    out = save_model(model, tmp_path / "hqq", writer=outcome.writer)
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    except RuntimeError as exc:  # size mismatch on the packed weight_zero_point
        pytest.xfail(f"plain from_pretrained cannot load asymmetric zero points: {exc}"[:200])
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)


@requires_ct
def test_bf16_model_reloads_to_the_same_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from swiss_knife.compression.quantization.compressed_tensors_format import load_compressed

    # Loaded as a user loads a bf16 model (rotary tables stay float32, as on reload).
    make_tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "fp32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    outcome = quantize(model, HQQConfig(bits=4, group_size=16))
    out = save_model(model, tmp_path / "bf16", writer=outcome.writer)
    reloaded = load_compressed(out).eval()
    assert reloaded.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


def test_misfit_group_size_and_mixed_grids_are_refused_before_any_work() -> None:
    model = make_tiny_llama(hidden_size=64, intermediate_size=96)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(UserInputError, match="does not divide"):
        quantize(model, HQQConfig(bits=4, group_size=64))  # 96-wide down_proj
    # Several grids with an asymmetric one would not load in transformers.
    with pytest.raises(UserInputError, match="asymmetric"):
        quantize(model, HQQConfig(bits=4, group_size=32, bits_overrides={"re:.*down_proj": 8}))
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name
    # The same from shapes alone, on the meta device.
    with torch.device("meta"):
        meta = make_tiny_llama(hidden_size=64, intermediate_size=96)
    with pytest.raises(UserInputError, match="fitting group sizes 2, 4, 8, 16, 32"):
        check_quantize(meta, HQQConfig(bits=4, group_size=64))
    check_quantize(meta, HQQConfig(bits=4, group_size=32))


def test_runs_on_the_requested_device_and_leaves_integers_on_the_cpu() -> None:
    model = make_tiny_llama()
    outcome = quantize(model, HQQConfig(bits=3, group_size=None), device="cpu")
    assert outcome.report["layers"] == 14
    assert all(row["rel_error"] > 0 for row in outcome.report["sensitivity"])


# ----------------------------------------------------------------------------- stories260K


def _fake_quantize_rtn(model: nn.Module, config: HQQConfig) -> nn.Module:
    """The same layers on the same asymmetric grid, rounded to nearest (min/max)."""
    from swiss_knife.compression.quantization.compressed_tensors_format import plan_grids

    baseline = copy.deepcopy(model)
    with torch.no_grad():
        for _, (module, grid) in plan_grids(baseline, config, allow_asymmetric=True).items():
            module.weight.copy_(rtn_quantize(module.weight, grid).dequantize())
    return baseline


@pytest.mark.integration
@pytest.mark.parametrize("bits", [4, 3])
def test_hqq_beats_rtn_asymmetric_on_stories260k(
    stories_dir: Path, assets_dir: Path, bits: int
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiss_knife.config import DataConfig
    from swiss_knife.data import load_token_stream
    from swiss_knife.evaluation.perplexity import perplexity

    text = assets_dir / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    if not text.is_file():
        pytest.skip(f"{text} not found")
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    stream = load_token_stream(DataConfig(source=str(text), split_documents="paragraph"), tokenizer)
    evaluation = stream[: 512 * 20]
    base = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    # down_proj reads 172 = 4 x 43 channels, which groups of 32 do not divide: left in float
    # on both sides.
    config = HQQConfig(bits=bits, group_size=32, ignore=["lm_head", "re:.*down_proj"])
    rtn = _fake_quantize_rtn(base, config)
    hqq = quantize(copy.deepcopy(base), config).model
    ppl = {
        name: perplexity(model, evaluation, window=512).perplexity
        for name, model in (("fp32", base), ("rtn", rtn), ("hqq", hqq))
    }
    assert ppl["fp32"] < ppl["hqq"] < ppl["rtn"], ppl
