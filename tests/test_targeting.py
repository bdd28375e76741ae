"""Target selection: pattern syntax, exclusions that are never targets, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch.nn as nn
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

from conftest import build
from swiss_knife.arch import iter_target_linears
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError
from swiss_knife.targeting import TargetSpec, match, resolve_overrides, resolve_targets


def names(model: Any, spec: TargetSpec | None = None, **kwargs: Any) -> list[str]:
    return list(resolve_targets(model, spec, **kwargs))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "opt", "gpt_neox"])
def test_default_spec_selects_every_block_linear_in_model_order(model_type: str) -> None:
    model = build(model_type)
    targets = resolve_targets(model)
    assert set(targets) == {name for name, _ in iter_target_linears(model)}
    # Model (registration) order, which is not always execution order: OPT registers k before
    # q, Phi-3 o_proj before qkv_proj. The calibration walk orders by `arch.block_linears`.
    registered = [name for name, _ in model.named_modules() if name in targets]
    assert list(targets) == registered
    assert all(model.get_submodule(name) is module for name, module in targets.items())
    assert "lm_head" not in targets


def test_regex_must_match_the_whole_name() -> None:
    model = build("llama")
    assert names(model, TargetSpec(targets=(r"re:.*\.q_proj",))) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    # fullmatch, not search: a bare suffix selects nothing, and the error names the pattern.
    with pytest.raises(UserInputError, match=r"'re:q_proj' matches no module"):
        resolve_targets(model, TargetSpec(targets=("re:q_proj",)))
    block_one = TargetSpec(targets=(r"re:model\.layers\.1\..*",))
    assert all(name.startswith("model.layers.1.") for name in names(model, block_one))
    assert len(names(model, block_one)) == 7


def test_exact_names_and_class_names() -> None:
    llama = build("llama")
    exact = TargetSpec(targets=("model.layers.1.mlp.down_proj",))
    assert names(llama, exact) == ["model.layers.1.mlp.down_proj"]
    gpt2 = build("gpt2")
    conv = names(gpt2, TargetSpec(targets=("Conv1D",)))
    assert len(conv) == 8 and all(isinstance(gpt2.get_submodule(n), Conv1D) for n in conv)
    # "Linear" is nn.Linear itself: GPT-2's blocks have none, and that alone is not an error
    # (the default spec lists both classes so one recipe fits every architecture).
    assert names(gpt2, TargetSpec(targets=("Linear", "Conv1D"))) == conv


def test_ignore_removes_matches() -> None:
    model = build("llama")
    spec = TargetSpec(ignore=(r"re:.*\.mlp\..*", "lm_head", "model.layers.0.self_attn.o_proj"))
    selected = names(model, spec)
    assert selected == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj",
    ]


def test_spec_validation_lists_every_problem() -> None:
    spec = TargetSpec(targets=["Linear"], ignore=["lm_head"])  # type: ignore[arg-type]
    assert spec.targets == ("Linear",) and spec.ignore == ("lm_head",)
    assert hash(spec) == hash(TargetSpec(targets=("Linear",)))
    with pytest.raises(UserInputError) as info:
        TargetSpec(targets=("re:(", ""), ignore=("re:",))
    message = str(info.value)
    assert "'re:('" in message and "not a valid regular expression" in message
    assert "non-empty string" in message
    assert "'re:' has an empty regular expression" in message
    with pytest.raises(UserInputError, match="must be a list"):
        TargetSpec(targets="Linear")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="targets is empty"):
        TargetSpec(targets=())


def test_match_function() -> None:
    linear = nn.Linear(2, 2)
    assert match("a.b.q_proj", linear, "Linear")
    assert match("a.b.q_proj", linear, "a.b.q_proj")
    assert match("a.b.q_proj", linear, r"re:a\..*proj")
    assert not match("a.b.q_proj", linear, "re:b.q_proj")
    assert not match("a.b.q_proj", None, "Linear")  # class names need the module
    assert not match("a.b.q_proj", linear, "Module")  # the class itself, not its bases
    with pytest.raises(UserInputError, match="regular expression"):
        match("x", linear, "re:[")


def test_tied_lm_head_is_never_a_target() -> None:
    gpt2 = build("gpt2")  # ties lm_head to transformer.wte
    with pytest.raises(UserInputError, match=r"lm_head shares its weight with .*transformer\.wte"):
        resolve_targets(gpt2, TargetSpec(targets=("lm_head",), ignore=()), within_blocks_only=False)
    # A class pattern that also matches the tied head simply leaves it out.
    everything = names(
        gpt2, TargetSpec(targets=("Linear", "Conv1D"), ignore=()), within_blocks_only=False
    )
    assert "lm_head" not in everything and len(everything) == 8


def test_untied_lm_head_only_outside_blocks_mode() -> None:
    model = build("llama", tie_word_embeddings=False)
    spec = TargetSpec(targets=("Linear",), ignore=())
    assert names(model, spec, within_blocks_only=False)[-1] == "lm_head"
    assert "lm_head" not in names(model, spec)
    with pytest.raises(UserInputError, match="outside the transformer blocks"):
        resolve_targets(model, TargetSpec(targets=("lm_head",), ignore=()))


def test_patterns_that_only_hit_non_targets_are_explained() -> None:
    model = build("llama")
    with pytest.raises(UserInputError, match="embeddings are never targets"):
        resolve_targets(model, TargetSpec(targets=(r"re:.*embed_tokens",)))
    with pytest.raises(UserInputError, match=r"LlamaMLP, not a Linear/Conv1D layer.*re:"):
        resolve_targets(model, TargetSpec(targets=("LlamaMLP",)))
    with pytest.raises(UserInputError, match="no layer to compress"):
        resolve_targets(model, TargetSpec(targets=("Linear",), ignore=(r"re:.*proj",)))
    with pytest.raises(UserInputError, match=r"ignore pattern 're:.*typo' matches no module"):
        resolve_targets(model, TargetSpec(ignore=("re:.*typo",)))
    with pytest.raises(UserInputError, match="'Lienar' matches no module"):
        resolve_targets(model, TargetSpec(targets=("Lienar",)))


def test_any_model_outside_blocks_mode_and_arch_error() -> None:
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    found = names(bert, TargetSpec(targets=("Linear",), ignore=()), within_blocks_only=False)
    assert "encoder.layer.0.attention.self.query" in found
    with pytest.raises(UnsupportedArchitectureError, match="'bert' is not supported"):
        resolve_targets(bert)


def test_resolve_overrides_first_match_wins() -> None:
    model = build("llama")
    targets = resolve_targets(model)
    bits = resolve_overrides(targets, {r"re:.*down_proj": 8, r"re:.*\.mlp\..*": 3, "Linear": 4})
    assert bits["model.layers.0.mlp.down_proj"] == 8
    assert bits["model.layers.0.mlp.gate_proj"] == 3
    assert bits["model.layers.1.self_attn.q_proj"] == 4
    assert list(bits) == list(targets)
    # Plain names: unmatched names are left to the caller's default.
    partial = resolve_overrides(list(targets), {r"re:.*o_proj": 8})
    assert partial == {"model.layers.0.self_attn.o_proj": 8, "model.layers.1.self_attn.o_proj": 8}


def test_resolve_overrides_rejects_dead_patterns() -> None:
    targets = resolve_targets(build("llama"))
    with pytest.raises(UserInputError, match=r"'re:\.\*typo' matches none"):
        resolve_overrides(targets, {"re:.*typo": 8})
    with pytest.raises(UserInputError, match=r"'re:.*down_proj' never applies.*'Linear'"):
        resolve_overrides(targets, {"Linear": 4, "re:.*down_proj": 8})
    with pytest.raises(UserInputError, match="regular expression"):
        resolve_overrides(targets, {"re:(": 8})
    # Class names need modules: with bare names "Linear" matches nothing.
    with pytest.raises(UserInputError, match="'Linear' matches none"):
        resolve_overrides(list(targets), {"Linear": 4})
