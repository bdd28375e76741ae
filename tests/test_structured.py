"""Structured pruning: real shapes, rewritten configs, exact reloads, and importance that works.

Tiny random models of several architectures (no downloads): every pruned model must reload with
plain `AutoModelForCausalLM.from_pretrained` and give the logits of the in-memory model; removing
channels or heads that contribute nothing must leave the outputs unchanged; GQA groups go whole.
The trained stories260K model (skipped when absent) checks that activation importance beats
random choices.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_CONFIGS, VOCAB, build
from swiss_knife.arch import attention_geometry, get_arch, get_blocks, get_module, hidden_size
from swiss_knife.compression.pruning import prune
from swiss_knife.compression.pruning.base import get_method
from swiss_knife.compression.pruning.structured import (
    _weight_out_in,
    kept_count,
    qkv_rows,
    top_indices,
)
from swiss_knife.config import CalibrationSettings, StructuredPruneConfig
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError
from swiss_knife.models import save_model

pytestmark = pytest.mark.usefixtures("single_thread")

CAL = CalibrationSettings(num_samples=4, seq_len=16, batch_size=4)
# Architectures whose head_dim is pinned by the config (heads and hidden channels can go) and
# the ones that derive it from hidden // heads (only MLP channels can go).
PINNED = ["llama", "phi3", "gemma", "gemma2", "qwen3"]
DERIVED = ["gpt2", "opt", "gpt_neox"]


def calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def inputs() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids if ids is not None else inputs()).logits
        return out


def config_for(**kwargs: Any) -> StructuredPruneConfig:
    return StructuredPruneConfig(calibration=CAL, **kwargs)


def run_prune(model: nn.Module, config: StructuredPruneConfig) -> Any:
    data = calibration() if config.importance == "activation" else None
    return prune(model, config, calibration=data)


def reload_equal(outcome: Any, tmp_path: Path) -> nn.Module:
    """Save with save_model + the outcome's writer; plain from_pretrained gives equal logits."""
    out = save_model(outcome.model, tmp_path / "pruned", writer=outcome.writer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    diff = (logits(reloaded) - logits(outcome.model)).abs().max().item()
    assert diff <= 1e-5, f"reloaded logits differ by {diff}"
    return reloaded


# --------------------------------------------------------------------------- pure math


def test_kept_count_rounds_to_multiples_and_never_exceeds_the_total() -> None:
    assert kept_count(96, 0.25) == 72
    assert kept_count(96, 0.3, round_to=16) == 64  # 67.2 -> nearest multiple of 16
    assert kept_count(172, 0.25, round_to=8) == 128  # 129 -> 128
    assert kept_count(100, 0.01, round_to=64) == 100  # 99 -> 128, capped at the total
    assert kept_count(4, 0.9) == 0  # the caller turns this into an error
    assert kept_count(7, 0.0) == 7


def test_top_indices_keeps_the_highest_in_index_order_and_lower_index_on_ties() -> None:
    scores = torch.tensor([0.5, 2.0, 0.1, 2.0, 1.0])
    assert top_indices(scores, 3).tolist() == [1, 3, 4]
    assert top_indices(torch.ones(4), 2).tolist() == [0, 1]


def test_blocked_qkv_rows_follow_phi3_split() -> None:
    # Phi-3: q = qkv[:H*d], k = next KV*d, v = last KV*d.
    heads, kv_heads, head_dim = 4, 2, 3
    rows = qkv_rows("blocked", torch.tensor([2, 3]), torch.tensor([1]), heads, kv_heads, head_dim)
    assert rows.tolist() == [6, 7, 8, 9, 10, 11, 15, 16, 17, 21, 22, 23]


def test_per_head_qkv_rows_match_gpt_neox_attention() -> None:
    """The rows of head h are what GPT-NeoX's own view/chunk reads as that head's q, k, v."""
    model = build("gpt_neox")
    attention = get_blocks(model)[0].attention
    heads, _, head_dim = attention_geometry(model)
    x = torch.randn(1, 5, hidden_size(model))
    with torch.no_grad():
        out = attention.query_key_value(x)  # (1, 5, 3 * hidden)
    # As in GPTNeoXAttention.forward: view (..., heads, 3 * head_dim), then chunk(3) per head.
    q, k, v = out.view(1, 5, heads, 3 * head_dim).chunk(3, dim=-1)
    for head in range(heads):
        rows = qkv_rows(
            "per_head", torch.tensor([head]), torch.tensor([head]), heads, heads, head_dim
        )
        picked = out[..., rows]  # (1, 5, 3 * head_dim)
        expected = torch.cat([q[:, :, head], k[:, :, head], v[:, :, head]], dim=-1)
        assert torch.equal(picked, expected)


# --------------------------------------------------------------------------- shapes, config, reload


def _allowed(model_type: str) -> dict[str, float]:
    if model_type in DERIVED:
        return {"mlp_ratio": 0.25}
    return {"mlp_ratio": 0.25, "head_ratio": 0.5, "hidden_ratio": 0.25}


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
@pytest.mark.parametrize("model_type", [*PINNED, *DERIVED])
def test_pruned_shapes_config_and_reload(model_type: str, importance: str, tmp_path: Path) -> None:
    model = build(model_type)
    spec = get_arch(model)
    heads, kv_heads, head_dim = attention_geometry(model)
    hidden = hidden_size(model)
    ratios = _allowed(model_type)
    outcome = run_prune(model, config_for(importance=importance, **ratios))

    from swiss_knife.arch import intermediate_size

    intermediate = TINY_CONFIGS[model_type].get("intermediate_size") or 4 * hidden
    if model_type == "opt":
        intermediate = TINY_CONFIGS["opt"]["ffn_dim"]
    assert intermediate_size(model) == round(intermediate * 0.75)
    new_heads, new_kv, new_head_dim = attention_geometry(model)
    assert new_head_dim == head_dim
    if "head_ratio" in ratios:
        # 2 key/value groups of 2 query heads: half the groups go, with their query heads.
        assert (new_heads, new_kv) == (heads // 2, kv_heads // 2)
        assert hidden_size(model) == round(hidden * 0.75)
        assert model.config.head_dim == head_dim  # pinned: hidden // heads no longer holds
    else:
        assert (new_heads, new_kv) == (heads, kv_heads)
        assert hidden_size(model) == hidden
    for block in get_blocks(model):
        down = _weight_out_in(get_module(block, spec.mlp_down))
        o_proj = _weight_out_in(get_module(block, spec.o_proj))
        assert tuple(down.shape) == (hidden_size(model), intermediate_size(model))
        assert tuple(o_proj.shape) == (hidden_size(model), new_heads * head_dim)

    report = outcome.report
    assert report["params_after"] < report["params_before"]
    assert report["params_after"] == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values()
    )
    assert len(report["per_layer"]) == len(get_blocks(model))
    assert all(row["mlp_channels"] == intermediate_size(model) for row in report["per_layer"])
    assert 0.0 < report["importance"]["mlp_importance_removed"]["mean"] < 1.0
    assert outcome.format == "dense/structured" and outcome.steps
    reloaded = reload_equal(outcome, tmp_path)
    assert type(reloaded) is type(model)


def test_tied_embeddings_stay_tied_after_hidden_pruning(tmp_path: Path) -> None:
    model = build("llama", tie_word_embeddings=True)
    outcome = run_prune(model, config_for(mlp_ratio=0.0, hidden_ratio=0.25))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (VOCAB, 48)
    reloaded = reload_equal(outcome, tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_generate_after_reload(tmp_path: Path) -> None:
    model = build("llama")
    outcome = run_prune(model, config_for(mlp_ratio=0.5, head_ratio=0.5))
    reloaded = reload_equal(outcome, tmp_path)
    prompt = inputs()[:1, :5]
    with torch.no_grad():
        ours = outcome.model.generate(prompt, max_new_tokens=6, do_sample=False)
        theirs = reloaded.generate(prompt, max_new_tokens=6, do_sample=False)
    assert ours.shape == (1, 11) and torch.equal(ours, theirs)


def test_round_to_keeps_widths_multiples(tmp_path: Path) -> None:
    model = build("llama")
    run_prune(model, config_for(mlp_ratio=0.3, hidden_ratio=0.3, round_to=16))
    assert model.config.intermediate_size == 64 and model.config.hidden_size == 48


def test_registered_under_structured() -> None:
    info = get_method("structured")
    assert info.config_class is StructuredPruneConfig and not info.needs_calibration


# --------------------------------------------------------------------------- zero importance


def _zero_mlp_channels(model: nn.Module, channels: list[int]) -> None:
    """Make MLP channels contribute nothing: zero their down_proj input columns."""
    spec = get_arch(model)
    with torch.no_grad():
        for block in get_blocks(model):
            _weight_out_in(get_module(block, spec.mlp_down))[:, channels] = 0.0


def _zero_kv_group(model: nn.Module, group: int) -> None:
    """Make one key/value group contribute nothing: zero o_proj's columns of its query heads."""
    spec = get_arch(model)
    heads, kv_heads, head_dim = attention_geometry(model)
    size = heads // kv_heads
    columns = slice(group * size * head_dim, (group + 1) * size * head_dim)
    with torch.no_grad():
        for block in get_blocks(model):
            _weight_out_in(get_module(block, spec.o_proj))[:, columns] = 0.0


def _zero_hidden_channels(model: nn.Module, channels: list[int]) -> None:
    """Keep residual channels at zero: no embedding, attention or MLP output writes them."""
    spec = get_arch(model)
    with torch.no_grad():
        for name in spec.embeddings:
            get_module(model, name).weight[:, channels] = 0.0
        for block in get_blocks(model):
            for name in (spec.o_proj, spec.mlp_down):
                _weight_out_in(get_module(block, name))[channels] = 0.0


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma", "gpt2", "opt", "gpt_neox"])
def test_removing_dead_mlp_channels_changes_nothing(model_type: str, importance: str) -> None:
    model = build(model_type)
    _zero_mlp_channels(model, [0, 5, 17, 40, 41, 60])
    before = logits(model)
    intermediate = get_arch(model).mlp_down
    width = _weight_out_in(get_module(get_blocks(model)[0], intermediate)).shape[1]
    run_prune(model, config_for(mlp_ratio=6 / width, importance=importance))
    assert _weight_out_in(get_module(get_blocks(model)[0], intermediate)).shape[1] == width - 6
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma", "qwen3"])
def test_removing_a_dead_kv_group_changes_nothing(model_type: str, importance: str) -> None:
    model = build(model_type)
    _zero_kv_group(model, 1)
    before = logits(model)
    outcome = run_prune(model, config_for(mlp_ratio=0.0, head_ratio=0.5, importance=importance))
    assert all(row["removed_kv_groups"] == [1] for row in outcome.report["per_layer"])
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma", "gemma2"])
def test_removing_dead_hidden_channels_changes_nothing(model_type: str) -> None:
    # RMSNorm's epsilon is added to the mean square over the channels, so with fewer channels
    # it weighs slightly more; make it negligible to test the surgery itself exactly.
    model = build(model_type, rms_norm_eps=1e-12, tie_word_embeddings=True)
    _zero_hidden_channels(model, [3, 10, 11, 30, 50, 63, 20, 7])
    before = logits(model)
    run_prune(model, config_for(mlp_ratio=0.0, hidden_ratio=8 / 64))
    assert hidden_size(model) == 56
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=1e-5)


def test_gqa_groups_go_whole_with_their_query_heads() -> None:
    # 8 query heads in 4 groups of 2; make group 2 the weakest in every block. (A hidden size
    # of 96 keeps 6 heads loadable: LlamaConfig wants hidden_size % heads == 0.)
    model = build("llama", hidden_size=96, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    original = copy.deepcopy(model)
    _zero_kv_group(model, 2)
    outcome = run_prune(model, config_for(mlp_ratio=0.0, head_ratio=0.25))
    assert attention_geometry(model) == (6, 3, 8)
    for old, new in zip(get_blocks(original), get_blocks(model), strict=True):
        # Kept query heads 0,1,2,3,6,7 (groups 0, 1, 3); kept kv heads 0, 1, 3.
        q_rows = [r for h in (0, 1, 2, 3, 6, 7) for r in range(h * 8, h * 8 + 8)]
        kv_rows = [r for g in (0, 1, 3) for r in range(g * 8, g * 8 + 8)]
        assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[q_rows])
        assert torch.equal(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight[kv_rows])
        assert torch.equal(new.self_attn.v_proj.weight, old.self_attn.v_proj.weight[kv_rows])
        assert new.self_attn.num_key_value_groups == 2
    assert outcome.report["attention"]["kv_heads_after"] == 3


# --------------------------------------------------------------------------- errors, before any work


def _unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("model_type", "overrides", "kwargs", "error", "match"),
    [
        ("llama", {}, {"head_ratio": 0.9}, UserInputError, r"remove all 2 key/value groups"),
        (
            "llama",
            {"num_key_value_heads": 1},
            {"head_ratio": 0.9},
            UserInputError,
            "all 1 key/value groups",
        ),
        (
            "llama",
            {"num_key_value_heads": 1},
            {"head_ratio": 0.25},
            UserInputError,
            "removes none of the 1 key/value groups",
        ),
        ("llama", {}, {"mlp_ratio": 0.001}, UserInputError, "removes none of the 96 MLP"),
        ("llama", {}, {"mlp_ratio": 0.9, "round_to": 64}, UserInputError, "all 96 MLP channels"),
        ("llama", {}, {"mlp_ratio": 0.0}, UserInputError, "nothing to prune"),
        ("gpt2", {}, {"head_ratio": 0.25}, UnsupportedArchitectureError, "head_dim"),
        ("opt", {}, {"hidden_ratio": 0.25}, UnsupportedArchitectureError, "hidden channels"),
        ("gpt_neox", {}, {"head_ratio": 0.5}, UnsupportedArchitectureError, "mlp_ratio"),
    ],
)
def test_impossible_requests_are_refused_before_any_work(
    model_type: str, overrides: dict[str, Any], kwargs: dict[str, Any], error: type, match: str
) -> None:
    model = build(model_type, **overrides)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        run_prune(model, config_for(importance="magnitude", **kwargs))
    assert _unchanged(model, state)


def test_head_counts_that_transformers_would_refuse_to_load_are_refused() -> None:
    # LlamaConfig validates hidden_size % num_attention_heads == 0 even with head_dim set:
    # 6 heads of a 64-wide model would save but never load again.
    model = build("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    with pytest.raises(
        UserInputError,
        match=r"would not load.*counts that load: 2 heads .*4 heads \(head_ratio 0.5\)",
    ):
        run_prune(model, config_for(mlp_ratio=0.0, head_ratio=0.25, importance="magnitude"))
    # Mistral's config has no such rule, so the same cut is fine there.
    mistral = build("mistral", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    run_prune(mistral, config_for(mlp_ratio=0.0, head_ratio=0.25, importance="magnitude"))
    assert attention_geometry(mistral) == (6, 3, 8)


def test_activation_importance_needs_calibration() -> None:
    with pytest.raises(UserInputError, match="needs calibration data"):
        prune(build("llama"), config_for(importance="activation"))


def test_unknown_architecture_is_refused() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="supported model types"):
        prune(model, config_for(importance="magnitude"))


def test_a_model_whose_shapes_disagree_with_its_config_is_refused() -> None:
    model = build("llama")
    model.config.intermediate_size = 80  # the modules still have 96 channels
    with pytest.raises(UnsupportedArchitectureError, match="width 96 where the config says 80"):
        run_prune(model, config_for(importance="magnitude"))


# --------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """stories260K with scored TinyStories tokens and disjoint calibration windows."""
    from swiss_knife.config import DataConfig
    from swiss_knife.data import load_token_stream, sample_calibration
    from swiss_knife.models import load_model

    text = stories_dir.parent / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    if not text.is_file():
        pytest.skip(f"{text} is absent")
    loaded = load_model(str(stories_dir), dtype="fp32", device="cpu")
    stream = load_token_stream(
        DataConfig(source=str(text), split_documents="paragraph"), loaded.tokenizer
    )
    scored = stream[: 16 * 256].view(16, 256)
    samples = sample_calibration(stream[16 * 256 :], 16, 256, seed=0)
    return loaded.model, scored, samples


def _loss(model: nn.Module, scored: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(scored, labels=scored).loss)


@pytest.mark.parametrize(
    "ratios",
    [{"mlp_ratio": 0.25}, {"mlp_ratio": 0.0, "hidden_ratio": 0.25}],
    ids=["mlp-25", "hidden-25"],
)
def test_activation_importance_beats_random_choices(
    stories: tuple[nn.Module, torch.Tensor, torch.Tensor],
    ratios: dict[str, float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from swiss_knife.compression.pruning import structured

    base, scored, samples = stories
    ours = copy.deepcopy(base)
    prune(ours, StructuredPruneConfig(**ratios), calibration=samples)
    ours_loss = _loss(ours, scored)

    real_top = structured.top_indices
    random_losses = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)

        def random_top(scores: torch.Tensor, keep: int, g: torch.Generator = generator) -> Any:
            return real_top(torch.rand(scores.shape, generator=g), keep)

        monkeypatch.setattr(structured, "top_indices", random_top)
        other = copy.deepcopy(base)
        prune(other, StructuredPruneConfig(importance="magnitude", **ratios))
        random_losses.append(_loss(other, scored))
    monkeypatch.setattr(structured, "top_indices", real_top)
    assert ours_loss < min(random_losses), (ours_loss, random_losses)
    assert ours_loss > _loss(base, scored)  # it is a real cut, not a no-op


def test_pruned_stories_reloads_with_from_pretrained(
    stories: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    base, scored, samples = stories
    model = copy.deepcopy(base)
    config = StructuredPruneConfig(mlp_ratio=0.5, head_ratio=0.5, round_to=8)
    outcome = prune(model, config, calibration=samples)
    out = save_model(model, tmp_path / "s", writer=outcome.writer)
    saved = AutoConfig.from_pretrained(out)
    assert (saved.intermediate_size, saved.num_attention_heads, saved.num_key_value_heads) == (
        88,
        4,
        2,
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = scored[:2, :64]
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)
