"""Layer reduction: selection by block influence, index and position; reload, generate, errors.

Tiny random models (no downloads); the CLI runs in a subprocess exactly as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import SMALL_EVALUATION, VOCAB, assert_user_error, build, sk
from swiss_knife.arch import get_arch, get_blocks, get_module, num_layers
from swiss_knife.calibration import block_io_scores
from swiss_knife.compression.layers import (
    explicit_indices,
    importance_table,
    reduce_layers,
    removal_count,
    select_by_importance,
    select_by_position,
)
from swiss_knife.compression.pruning.structured import _weight_out_in
from swiss_knife.config import CalibrationSettings, CompressionConfig, LayerReductionConfig
from swiss_knife.config import validate_dict as validate
from swiss_knife.errors import ConfigError, UnsupportedArchitectureError, UserInputError
from swiss_knife.models import read_manifest, save_model

pytestmark = pytest.mark.usefixtures("single_thread")

CAL = CalibrationSettings(num_samples=4, seq_len=16, batch_size=4)


def calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def inputs() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(inputs()).logits
        return out


def reduction(**kwargs: Any) -> LayerReductionConfig:
    return LayerReductionConfig(calibration=CAL, **kwargs)


def reload_equal(model: nn.Module, outcome: Any, tmp_path: Path) -> nn.Module:
    out = save_model(model, tmp_path / "reduced", writer=outcome.writer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(reloaded) - logits(model)).abs().max().item() <= 1e-5
    return reloaded


def make_identity(model: nn.Module, index: int) -> None:
    """Block `index` adds nothing to the residual stream: zero its attention and MLP outputs."""
    spec = get_arch(model)
    block = get_blocks(model)[index]
    with torch.no_grad():
        for name in (spec.o_proj, spec.mlp_down):
            module = get_module(block, name)
            _weight_out_in(module).zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


# --------------------------------------------------------------------------- pure selection


def test_positions_respect_protected_blocks() -> None:
    assert select_by_position(8, 2, "last", 1, 1) == [5, 6]
    assert select_by_position(8, 2, "first", 1, 1) == [1, 2]
    assert select_by_position(8, 3, "evenly", 1, 1) == [2, 4, 6]
    assert select_by_position(8, 6, "evenly", 1, 1) == [1, 2, 3, 4, 5, 6]
    assert select_by_position(4, 2, "last", 0, 0) == [2, 3]


def test_importance_picks_the_lowest_unprotected_scores() -> None:
    scores = [0.01, 0.5, 0.2, 0.3, 0.1, 0.02]
    # Block 0 and 5 score lowest but are protected by keep_first=1 / keep_last=1.
    assert select_by_importance(scores, 2, 1, 1) == [2, 4]
    assert select_by_importance(scores, 2, 0, 0) == [0, 5]


def test_explicit_indices_are_normalised_and_checked() -> None:
    config = reduction(layers=[-2, 2], keep_last=0)
    assert explicit_indices(6, config) == [2, 4]
    assert removal_count(6, config) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": [6]}, "out of range for a 6-layer model"),
        ({"layers": [0, 1, 2, 3, 4, 5], "keep_first": 0, "keep_last": 0}, "cannot remove all 6"),
        ({"layers": [0]}, r"\[0\] are protected by keep_first=1"),
        ({"layers": [-1]}, r"\[5\] are protected"),
        ({"num_layers_to_remove": 6}, "at least one must remain"),
        ({"num_layers_to_remove": 5}, "only 4 are candidates"),
        ({"num_layers_to_keep": 6}, "leaves nothing to remove"),
        # A block named twice would remove fewer blocks than listed.
        ({"layers": [2, 2]}, "layer 2 is listed twice"),
        ({"layers": [3, -3]}, "layers 3 and -3 both name block 3 of the 6-layer model"),
    ],
)
def test_impossible_counts_and_indices(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        removal_count(6, reduction(**kwargs))


def test_the_config_demands_exactly_one_target() -> None:
    with pytest.raises(ConfigError, match="exactly one of"):
        validate(LayerReductionConfig, {"num_layers_to_remove": 1, "layers": [2]})
    with pytest.raises(ConfigError, match="exactly one of"):
        validate(LayerReductionConfig, {})


def test_importance_table_lists_every_block() -> None:
    table = importance_table([0.3, 0.1, 0.2], [1], 3)
    lines = table.splitlines()
    assert len(lines) == 4 and "block influence" in lines[0]
    assert lines[2].split() == ["1", "0.1000", "1", "yes"]


# --------------------------------------------------------------------------- on models


def test_an_identity_block_is_removed_first_and_changes_nothing(tmp_path: Path) -> None:
    model = build("llama", num_hidden_layers=4)
    make_identity(model, 2)
    before = logits(model)
    scores = block_io_scores(model, calibration())
    assert scores[2] == pytest.approx(0.0, abs=1e-6)
    outcome = reduce_layers(model, reduction(num_layers_to_remove=1), calibration=calibration())
    assert outcome.removed == [2]
    assert model.config.num_hidden_layers == 3 and len(get_blocks(model)) == 3
    # Without the block that did nothing the model computes exactly what it did.
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=0)
    report = outcome.report
    assert [row["removed"] for row in report["block_importance"]] == [False, False, True, False]
    assert report["block_importance"][1]["block_influence"] == pytest.approx(scores[1], abs=1e-6)
    assert report["params_after"] < report["params_before"]
    reload_equal(model, outcome, tmp_path)


@pytest.mark.parametrize(
    ("model_type", "kwargs", "removed"),
    [
        ("llama", {"num_layers_to_keep": 2, "selection": "last"}, [1, 2]),
        ("qwen2", {"layers": [1]}, [1]),
        ("gemma3_text", {"layers": [0], "keep_first": 0}, [0]),
        ("phi3", {"num_layers_to_remove": 1, "selection": "first"}, [1]),
        ("gpt2", {"num_layers_to_remove": 2, "selection": "evenly", "keep_first": 0}, [0, 2]),
        ("opt", {"layers": [-2]}, [2]),
        ("gpt_neox", {"num_layers_to_remove": 1, "selection": "importance"}, None),
    ],
)
def test_reduced_models_reload_and_generate(
    model_type: str, kwargs: dict[str, Any], removed: list[int] | None, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = {"num_hidden_layers": 4} if model_type != "gpt2" else {"n_layer": 4}
    if model_type in ("qwen2", "gemma3_text"):
        overrides["layer_types"] = ["full_attention", "sliding_attention"] * 2
    model = build(model_type, **overrides)
    layer_types = getattr(model.config, "layer_types", None)
    outcome = reduce_layers(model, reduction(**kwargs), calibration=calibration())
    if removed is not None:
        assert outcome.removed == removed
    assert num_layers(model) == 4 - len(outcome.removed)
    if layer_types is not None:
        kept = [t for i, t in enumerate(layer_types) if i not in outcome.removed]
        assert model.config.layer_types == kept
    reloaded = reload_equal(model, outcome, tmp_path)
    assert AutoConfig.from_pretrained(tmp_path / "reduced").to_dict()[
        get_arch(model).config_num_layers
    ] == num_layers(model)
    prompt = inputs()[:1, :5]
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        theirs = reloaded.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert ours.shape == (1, 10) and torch.equal(ours, theirs)


def test_importance_without_calibration_is_refused_before_any_work() -> None:
    model = build("llama", num_hidden_layers=4)
    with pytest.raises(UserInputError, match="needs calibration data"):
        reduce_layers(model, reduction(num_layers_to_remove=1))
    assert len(get_blocks(model)) == 4


def test_index_dependent_gpt2_only_loses_its_last_blocks() -> None:
    model = build("gpt2", n_layer=4, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        reduce_layers(model, reduction(num_layers_to_remove=1), calibration=calibration())
    with pytest.raises(UnsupportedArchitectureError, match="only the last blocks"):
        reduce_layers(model, reduction(layers=[1]))
    outcome = reduce_layers(model, reduction(num_layers_to_remove=2, selection="last", keep_last=0))
    assert outcome.removed == [2, 3] and model.config.n_layer == 2


def test_unknown_architecture_is_refused() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="supported model types"):
        reduce_layers(model, reduction(num_layers_to_remove=1, selection="last"))


# --------------------------------------------------------------------------- recipe and CLI


def test_reduce_layers_stage_in_a_recipe(
    tiny_llama_dir: Path,
    eval_text: Path,
    tmp_path: Path,
) -> None:
    from swiss_knife.pipeline import run_recipe

    recipe = validate(
        CompressionConfig,
        {
            "model": {"path": str(tiny_llama_dir), "device": "cpu"},
            "data": {"eval": str(eval_text)},
            "evaluation": SMALL_EVALUATION,
            "stages": [
                {
                    "type": "reduce_layers",
                    "num_layers_to_remove": 1,
                    "keep_first": 0,
                    "calibration": {"num_samples": 2, "seq_len": 16},
                }
            ],
        },
        "test recipe",
    )
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    stage_dir = result.final_model_dir
    assert stage_dir is not None
    manifest = read_manifest(stage_dir)
    assert manifest is not None
    table = manifest["stage_report"]["block_importance"]
    assert len(table) == 2 and all(row["block_influence"] is not None for row in table)
    assert sum(row["removed"] for row in table) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(stage_dir)
    assert reloaded.config.num_hidden_layers == 1


def test_cli_reduce_layers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "out"
    result = sk(
        "reduce-layers",
        tiny_llama_dir,
        "--num-layers-to-remove",
        "1",
        "--keep-first",
        "0",
        "--calibration-data",
        text,
        "--num-samples",
        "2",
        "--seq-len",
        "16",
        "--output-dir",
        out,
        "--json",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_layers_after"] == 1 and len(summary["block_importance"]) == 2
    manifest = read_manifest(out)
    assert manifest is not None and manifest["stage_report"]["removed"] == summary["removed"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1

    # Refused in one line before any model is loaded: the count does not fit.
    error = assert_user_error(
        sk("reduce-layers", tiny_llama_dir, "--layers", "5", "--output-dir", tmp_path / "x", "-q")
    )
    assert "out of range for a 2-layer model" in error
    error = assert_user_error(
        sk("reduce-layers", tiny_llama_dir, "--num-layers-to-remove", "1", "--output-dir", out)
    )
    assert "needs --calibration-data" in error


def test_cli_help_has_examples() -> None:
    result = sk("reduce-layers", "--help")
    assert result.returncode == 0
    assert "swiss-knife reduce-layers" in result.stdout.split("examples:")[1]
