"""AWQ: its tensor math, exact scale folding on every supported architecture, apply -> forward ->
save -> reload with plain `from_pretrained`, the checks made before any work, and AWQ beating
round-to-nearest on the real stories260K model (skipped when the offline assets are absent).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from conftest import TINY_CONFIGS, VOCAB, build, requires_ct
from swiss_knife.arch import get_arch, get_blocks, iter_target_linears
from swiss_knife.compression.quantization.awq import (
    apply,
    apply_scales,
    awq_clip_search,
    awq_scale_search,
    awq_scales,
    block_stages,
    fold_scales_into_linear,
    fold_scales_into_norm,
    fold_scales_into_quantized,
    quantize_with_clip,
    relative_output_error,
    scaled_fake_quant,
)
from swiss_knife.compression.quantization.base import QuantizationOutcome, QuantizeContext
from swiss_knife.compression.quantization.grid import QuantGrid
from swiss_knife.compression.quantization.rtn import rtn_quantize
from swiss_knife.config import AWQConfig
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError
from swiss_knife.models import save_model

# Every model type in the architecture table except GPT-2 (Conv1D, which the export cannot store).
SUPPORTED = sorted(mt for mt in TINY_CONFIGS if mt != "gpt2")


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny matmuls on a shared 2-core machine are dominated by thread hand-off (see test_arch).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def calibration(num: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (num, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def run_awq(
    model: nn.Module, samples: torch.Tensor | None = None, **settings: Any
) -> QuantizationOutcome:
    config = AWQConfig(**{"bits": 4, "group_size": 32, **settings})
    return apply(model, config, QuantizeContext(calibration=samples))


def outlier_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (16, 64) and inputs (256, 64) whose first 4 channels are 20x larger: AWQ's case."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    X[:, :4] *= 20.0
    return W, X


# ----------------------------------------------------------------------------- tensor math


def test_scales_are_normalised_and_alpha_zero_is_plain_rtn() -> None:
    m = torch.tensor([0.01, 0.5, 2.0, 40.0])
    torch.testing.assert_close(awq_scales(m, 0.0), torch.ones(4))
    s = awq_scales(m, 0.7)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    assert torch.all(s[1:] > s[:-1]), "more salient channels get larger scales"
    assert float(awq_scales(torch.zeros(3), 1.0).min()) > 0, "dead channels keep a usable scale"


def test_scale_search_beats_rtn_on_outlier_channels() -> None:
    W, X = outlier_problem()
    grid = QuantGrid(bits=3, group_size=None)

    def loss(scales: torch.Tensor) -> float:
        W_q = scaled_fake_quant(W, scales, grid)
        return float((X @ (W_q - W).T).square().mean())

    result = awq_scale_search(X.abs().mean(dim=0), loss, grid=11)
    assert len(result.losses) == 11
    rtn_loss = float((X @ (rtn_quantize(W, grid).dequantize() - W).T).square().mean())
    assert result.losses[0] == pytest.approx(rtn_loss)  # alpha = 0 is RTN
    assert result.loss == min(result.losses)
    assert result.alpha > 0
    assert result.loss < 0.7 * rtn_loss


def test_scale_search_rejects_all_nan_and_a_single_point() -> None:
    with pytest.raises(UserInputError, match="non-finite"):
        awq_scale_search(torch.ones(4), lambda s: float("nan"), grid=3)
    with pytest.raises(UserInputError, match="2 grid points"):
        awq_scale_search(torch.ones(4), lambda s: 0.0, grid=1)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_into_norm_divides_its_output(offset: float) -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias, normed = (
        torch.randn(8, generator=g),
        torch.randn(8, generator=g),
        torch.randn(5, 8),
    )
    s = torch.rand(8, generator=g) + 0.5
    new_weight, new_bias = fold_scales_into_norm(weight, bias, s, offset)
    assert new_bias is not None
    expected = ((offset + weight) * normed + bias) / s
    torch.testing.assert_close((offset + new_weight) * normed + new_bias, expected)


def test_fold_into_linear_rows_and_into_a_quantized_grid() -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    rows, s = torch.tensor([3, 4, 5]), torch.tensor([2.0, 0.5, 4.0])
    new_weight, new_bias = fold_scales_into_linear(weight, bias, s, rows)
    assert new_bias is not None
    torch.testing.assert_close(new_weight[:3], weight[:3])
    torch.testing.assert_close(new_weight[3:], weight[3:] / s[:, None])
    torch.testing.assert_close(new_bias[3:], bias[3:] / s)

    for grid in (QuantGrid(4, group_size=4), QuantGrid(3, symmetric=False)):
        qw = rtn_quantize(weight, grid)
        folded = fold_scales_into_quantized(qw, s, rows)
        assert torch.equal(folded.q, qw.q), "the integer levels do not change"
        expected, _ = fold_scales_into_linear(qw.dequantize(), None, s, rows)
        torch.testing.assert_close(folded.dequantize(), expected)
        # Folding commutes with round-to-nearest (the scales here are powers of two, so even
        # the floats agree): v and up may be quantized before o and down fold into them.
        folded_float, _ = fold_scales_into_linear(weight, None, s, rows)
        requantized = rtn_quantize(folded_float, grid)
        assert torch.equal(requantized.q, qw.q)
        torch.testing.assert_close(requantized.dequantize(), folded.dequantize())


def test_output_error_from_the_hessian_equals_the_direct_one() -> None:
    W, X = outlier_problem()
    W_new = rtn_quantize(W, QuantGrid(3, group_size=16)).dequantize()
    direct = (X @ (W_new - W).T).norm() / (X @ W.T).norm()
    H = 2 * X.T @ X / X.shape[0]
    assert relative_output_error(H, W, W_new) == pytest.approx(float(direct), rel=1e-4)


def test_clip_search_lowers_output_error_and_never_raises_it() -> None:
    W, X = outlier_problem(seed=1)
    W[0, 5] = 12.0  # one weight outlier: clipping its row/group pays off
    for grid in (QuantGrid(3, group_size=16), QuantGrid(4, symmetric=False)):
        ratio = awq_clip_search(W, X, grid)
        assert ratio.shape == (16 * grid.num_groups(64), 1)
        assert float(ratio.max()) <= 1.0 and float(ratio.min()) >= 0.55 - 1e-6
        H = 2 * X.T @ X / X.shape[0]  # the calibration engine's Hessian
        clipped = relative_output_error(H, W, quantize_with_clip(W, grid, ratio).dequantize())
        plain = relative_output_error(H, W, quantize_with_clip(W, grid).dequantize())
        assert clipped < plain
        assert float(ratio.min()) < 1.0


# ----------------------------------------------------------------------------- folding per arch


def scale_every_group(model: nn.Module, seed: int = 0) -> dict[str, int]:
    """Fold random scales in [0.5, 2] into every scaling group; count the groups per stage."""
    spec = get_arch(model)
    g = torch.Generator().manual_seed(seed)
    counts: dict[str, int] = {}
    for block in get_blocks(model, spec):
        for stage in block_stages(spec, model.config, block):
            if stage.scaling is None:
                continue
            scales = torch.rand(stage.scaling.channels, generator=g) * 1.5 + 0.5
            apply_scales(block, stage.scaling, scales)
            counts[stage.name] = counts.get(stage.name, 0) + 1
    return counts


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_folding_is_exact_on_every_supported_architecture(model_type: str) -> None:
    model = build(model_type)
    ids = calibration(2, 12, seed=1)
    before = logits(model, ids)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    counts = scale_every_group(model)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)

    gelu_mlp = model_type == "gpt_neox"  # no scale passes a GELU
    expected = {"attn_in": 2, "attn_out": 2, "mlp_in": 2, **({} if gelu_mlp else {"mlp_out": 2})}
    assert counts == expected
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, original[name])}
    assert not any("embed" in name or "lm_head" in name or "wte" in name for name in changed)


def test_post_norm_opt_scales_only_between_linears() -> None:
    model = build("opt", do_layer_norm_before=False)
    stages = block_stages(get_arch(model), model.config, get_blocks(model)[0])
    unscaled = {stage.name: stage.unscaled_reason for stage in stages if stage.scaling is None}
    assert set(unscaled) == {"attn_in", "mlp_in"}
    assert all("post-norm" in (reason or "") for reason in unscaled.values())
    ids = calibration(2, 12, seed=1)
    before = logits(model, ids)
    assert scale_every_group(model) == {"attn_out": 2, "mlp_out": 2}
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)


def test_gpt2_is_refused_naming_the_supported_types() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"Conv1D.*llama"):
        run_awq(build("gpt2"), calibration())


# ----------------------------------------------------------------------------- apply and export


def check_reload(outcome: QuantizationOutcome, directory: Path, ids: torch.Tensor) -> None:
    """Save with the outcome's writer, reload with plain from_pretrained, compare."""
    from transformers import AutoModelForCausalLM

    expected = logits(outcome.model, ids)
    save_model(outcome.model, directory, writer=outcome.writer)
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-4, rtol=0)
    for name, module in iter_target_linears(outcome.model):
        assert torch.equal(reloaded.get_submodule(name).weight, module.weight), name


@requires_ct
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_apply_forward_save_reload_same_logits(model_type: str, tmp_path: Path) -> None:
    model = build(model_type)
    original = copy.deepcopy(model)
    ids = calibration(2, 12, seed=1)
    outcome = run_awq(model, calibration())

    assert outcome.model is model
    assert outcome.format == "compressed-tensors/pack-quantized"
    targets = [name for name, _ in iter_target_linears(model)]
    rows = outcome.report["sensitivity"]
    assert sorted(row["name"] for row in rows) == sorted(targets)
    assert all(0 < row["rel_error"] < 1 and 0 < row["rtn_rel_error"] < 1 for row in rows)
    assert [r["rel_error"] for r in rows] == sorted((r["rel_error"] for r in rows), reverse=True)
    assert {s["stage"] for s in outcome.report["scales"]} >= {"attn_in", "attn_out", "mlp_in"}
    assert len(outcome.report["blocks"]) == 2
    # Quantized, but close: the model still computes roughly what it did.
    drift = (logits(model, ids) - logits(original, ids)).norm() / logits(original, ids).norm()
    assert 0 < float(drift) < 0.5
    # Embeddings, final norm and LM head are untouched; no hook is left behind.
    spec = get_arch(model)
    for path in (*spec.embeddings, spec.lm_head, spec.final_norm):
        assert path is not None
        assert torch.equal(model.get_submodule(path).weight, original.get_submodule(path).weight), (
            path
        )
    assert not any(m._forward_hooks for m in model.modules())
    check_reload(outcome, tmp_path / "awq", ids)


@requires_ct
def test_targets_ignore_and_bits_overrides(tmp_path: Path) -> None:
    model = build("llama")
    original = copy.deepcopy(model)
    outcome = run_awq(
        model,
        calibration(),
        ignore=["lm_head", "re:.*o_proj"],
        bits_overrides={"re:.*down_proj": 8},
    )
    bits = {row["name"]: row["bits"] for row in outcome.report["sensitivity"]}
    assert not any("o_proj" in name for name in bits)
    assert {b for name, b in bits.items() if "down_proj" in name} == {8}
    assert {b for name, b in bits.items() if "down_proj" not in name} == {4}
    # o_proj is not a target, so v -> o is not searched and o_proj keeps its exact weights.
    assert "attn_out" not in {s["stage"] for s in outcome.report["scales"]}
    for index in range(2):
        name = f"model.layers.{index}.self_attn.o_proj"
        assert torch.equal(model.get_submodule(name).weight, original.get_submodule(name).weight)
    check_reload(outcome, tmp_path / "mixed", calibration(2, 12, seed=1))


@requires_ct
def test_asymmetric_grid_round_trips_through_load_compressed(tmp_path: Path) -> None:
    from swiss_knife.compression.quantization.compressed_tensors_format import load_compressed

    model = build("qwen3")
    ids = calibration(2, 12, seed=1)
    outcome = run_awq(model, calibration(), bits=3, symmetric=False, group_size=None)
    expected = logits(model, ids)
    save_model(model, tmp_path / "asym", writer=outcome.writer)
    reloaded = load_compressed(tmp_path / "asym").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-4, rtol=0)


@requires_ct
def test_bf16_model_reloads_to_the_same_logits(tmp_path: Path) -> None:
    # Scales, folded norms and folded v/up grid scales are all rounded to bf16; the in-memory
    # model must hold exactly what the checkpoint holds.
    from transformers import AutoModelForCausalLM

    # Loaded the way a user loads a bf16 model (`.to(bfloat16)` would also round the rotary
    # tables, which from_pretrained keeps in float32, and the logits would differ for that).
    build("llama").save_pretrained(tmp_path / "fp32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    outcome = run_awq(model, calibration(), bits=4, group_size=16)
    check_reload(outcome, tmp_path / "bf16", calibration(2, 12, seed=1))


def test_group_size_is_checked_before_any_work() -> None:
    model = build("llama")  # hidden 64, intermediate 96
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(UserInputError) as info:
        run_awq(model, calibration(), group_size=64)
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj" in message and "96 inputs" in message
    assert "fitting group sizes 2, 4, 8, 16, 32" in message
    assert all(torch.equal(p, state[name]) for name, p in model.named_parameters())


def test_search_token_budget_records_whole_first_batches() -> None:
    from swiss_knife.calibration import run_calibration
    from swiss_knife.compression.quantization.awq import AWQCalibrator, plan_awq_grids

    model = build("llama")
    grids = plan_awq_grids(model, AWQConfig(bits=4, group_size=32))
    calibrator = AWQCalibrator(
        grids, grid_points=5, clip_search=True, total_tokens=64, search_tokens=20
    )
    recorded: list[int] = []
    solve_stage = calibrator._solve_stage

    def spy(state: Any) -> None:
        recorded.append(sum(ref.shape[0] * ref.shape[1] for _, _, ref in state.calls))
        solve_stage(state)

    calibrator._solve_stage = spy  # type: ignore[method-assign]
    # Batches of 2 x 16 = 32 tokens: a budget of 20 keeps the first batch only.
    run_calibration(model, calibration(4, 16), calibrator, batch_size=2)
    calibrator.close()
    assert recorded == [32, 0, 32, 0] * 2  # attention and MLP stages; v->o and down use H
    assert sorted(calibrator.quantized) == sorted(grids)


def test_calibration_is_required() -> None:
    with pytest.raises(UserInputError, match="calibration"):
        run_awq(build("llama"), None)


# ----------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="module")
def stories(stories_dir: Path, assets_dir: Path) -> dict[str, Any]:
    """The real model, calibration windows from the first half of the TinyStories text, and
    evaluation text from the second half (never seen during calibration)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiss_knife.data import load_token_stream, sample_calibration

    text = assets_dir / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    if not text.is_file():
        pytest.skip(f"{text} not found")
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    stream = load_token_stream(str(text), tokenizer, max_tokens=40_000)
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    return {
        "model": model,
        "calibration": sample_calibration(stream[:20_000], 16, 128, seed=0),
        "eval": stream[20_000:],
    }


def rtn_model(model: nn.Module, grid: QuantGrid) -> nn.Module:
    baseline = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in iter_target_linears(baseline):
            module.weight.copy_(rtn_quantize(module.weight, grid).dequantize())
    return baseline


@pytest.mark.integration
@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_stories260k(stories: dict[str, Any], bits: int) -> None:
    from swiss_knife.evaluation.perplexity import perplexity

    base, held_out = stories["model"], stories["eval"]
    # hidden 64 but intermediate 172 (= 4 x 43): per-channel scales are the grid that fits all.
    grid = QuantGrid(bits=bits, group_size=None)
    rtn = rtn_model(base, grid)
    awq = copy.deepcopy(base)
    outcome = run_awq(awq, stories["calibration"], bits=bits, group_size=None)

    rows = outcome.report["sensitivity"]
    awq_layer = statistics.mean(row["rel_error"] for row in rows)
    rtn_layer = statistics.mean(row["rtn_rel_error"] for row in rows)
    assert awq_layer < 0.9 * rtn_layer

    # On held-out windows: the logits move less from the float model's, and perplexity is lower.
    ids = held_out[: 8 * 128].view(8, 128)
    reference = logits(base, ids)

    def logit_error(model: nn.Module) -> float:
        return float((logits(model, ids) - reference).norm() / reference.norm())

    assert logit_error(awq) < logit_error(rtn)
    ppl = {
        name: perplexity(model, held_out, window=256).perplexity
        for name, model in (("fp32", base), ("rtn", rtn), ("awq", awq))
    }
    assert ppl["fp32"] < ppl["awq"] < ppl["rtn"], ppl
