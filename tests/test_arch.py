"""Checks the architecture table against tiny random models built from each supported config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
)
from transformers.pytorch_utils import Conv1D

from conftest import TINY_CONFIGS, VOCAB, build
from swiss_knife.arch import (
    ARCH_SPECS,
    ArchSpec,
    attention_geometry,
    block_linears,
    drop_blocks,
    find_module,
    get_arch,
    get_blocks,
    get_module,
    hidden_size,
    intermediate_size,
    is_parallel_residual,
    is_pre_norm,
    iter_target_linears,
    linear_in_out,
    num_layers,
    supported_model_types,
)
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny matmuls, one thread


def tokens(length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))


def expected_linear_names(spec: ArchSpec) -> list[str]:
    attention = [spec.qkv_proj] if spec.qkv_proj else [spec.q_proj, spec.k_proj, spec.v_proj]
    return [*(n for n in attention if n), spec.o_proj, *spec.mlp_up, spec.mlp_down]


def test_every_supported_type_has_a_tiny_config() -> None:
    assert sorted(TINY_CONFIGS) == supported_model_types()


def test_each_model_type_maps_to_exactly_one_spec() -> None:
    listed = [model_type for spec in ARCH_SPECS for model_type in spec.model_types]
    assert len(listed) == len(set(listed))
    for spec in ARCH_SPECS:
        for model_type in spec.model_types:
            assert get_arch(AutoConfig.for_model(model_type)) is spec
        # Exactly one of: three separate projections, or one fused projection.
        separate = (spec.q_proj, spec.k_proj, spec.v_proj)
        if spec.qkv_proj is None:
            assert all(separate) and spec.qkv_layout == "separate"
        else:
            assert not any(separate) and spec.qkv_layout != "separate"
        assert spec.fused_gate_up == (len(spec.mlp_up) == 1 and spec.mlp_gated)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_paths_resolve_and_shapes_agree(model_type: str) -> None:
    model = build(model_type)
    spec = get_arch(model)
    config = model.config
    hidden = hidden_size(config, spec)
    inter = intermediate_size(config, spec)
    heads, kv_heads, head_dim = attention_geometry(config, spec)
    linear_type = Conv1D if spec.linear_kind == "conv1d" else nn.Linear

    blocks = get_blocks(model)
    assert len(blocks) == num_layers(config) == 2
    for path in spec.embeddings:
        assert isinstance(get_module(model, path), nn.Embedding)
    assert spec.final_norm is not None
    assert get_module(model, spec.final_norm).weight.shape == (hidden,)
    lm_head = get_module(model, spec.lm_head)
    assert isinstance(lm_head, nn.Linear)
    assert linear_in_out(lm_head) == (hidden, VOCAB)
    if spec.config_num_kv_heads is not None:
        assert kv_heads < heads, "the tiny config should exercise grouped-query attention"

    for block in blocks:
        assert isinstance(get_module(block, spec.attn), nn.Module)
        assert isinstance(get_module(block, spec.mlp_act), nn.Module)
        for norm in (spec.attn_norm, spec.mlp_norm):
            assert norm is not None
            assert get_module(block, norm).weight.shape == (hidden,)

        linears = block_linears(block, spec)
        assert list(linears) == expected_linear_names(spec)
        assert all(type(m) is linear_type for m in linears.values())
        shapes = {name: linear_in_out(m) for name, m in linears.items()}
        if spec.qkv_proj:
            assert shapes[spec.qkv_proj] == (hidden, (heads + 2 * kv_heads) * head_dim)
        else:
            assert spec.q_proj and spec.k_proj and spec.v_proj
            assert shapes[spec.q_proj] == (hidden, heads * head_dim)
            assert shapes[spec.k_proj] == (hidden, kv_heads * head_dim)
            assert shapes[spec.v_proj] == (hidden, kv_heads * head_dim)
        assert shapes[spec.o_proj] == (heads * head_dim, hidden)
        up_width = 2 * inter if spec.fused_gate_up else inter
        for name in spec.mlp_up:
            assert shapes[name] == (hidden, up_width)
        assert shapes[spec.mlp_down] == (inter, hidden)

    logits = model(tokens()).logits
    assert logits.shape == (1, 6, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_linears_run_in_listed_order_and_norms_feed_them(model_type: str) -> None:
    model = build(model_type)
    spec = get_arch(model)
    block = get_blocks(model)[0]
    linears = block_linears(block, spec)
    calls: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    norm_outputs: dict[str, torch.Tensor] = {}
    handles = []

    def record_input(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            calls.append(name)
            inputs.setdefault(name, args[0])

        return hook

    def record_output(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            norm_outputs.setdefault(name, output)

        return hook

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(record_input(name)))
    for norm in (spec.attn_norm, spec.mlp_norm):
        assert norm is not None
        handles.append(get_module(block, norm).register_forward_hook(record_output(norm)))
    with torch.no_grad():
        model(tokens())
    for handle in handles:
        handle.remove()

    assert calls == list(linears)
    # AWQ folds input scales into these norms, so their outputs must be exactly what the
    # attention input projections and the MLP input projections read.
    assert is_pre_norm(model.config, spec)
    first_attn = next(iter(linears))
    assert torch.equal(norm_outputs[spec.attn_norm], inputs[first_attn])
    assert spec.mlp_norm is not None
    for name in spec.mlp_up:
        assert torch.equal(norm_outputs[spec.mlp_norm], inputs[name])


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma2", "gpt2"])
def test_norm_weight_offset_matches_the_norm(model_type: str) -> None:
    model = build(model_type)
    spec = get_arch(model)
    norm: Any = get_module(get_blocks(model)[0], spec.attn_norm)
    x = torch.randn(2, 3, hidden_size(model.config))
    with torch.no_grad():
        norm.weight.fill_(0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
        out = norm(x)
    centred = x - x.mean(-1, keepdim=True) if spec.norm_kind == "layernorm" else x
    unit = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, unit * (0.5 + spec.norm_weight_offset), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_iter_target_linears_uses_full_names(model_type: str) -> None:
    model = build(model_type)
    spec = get_arch(model)
    named = list(iter_target_linears(model, spec))
    per_block = len(expected_linear_names(spec))
    assert len(named) == 2 * per_block
    for name, module in named:
        assert name.startswith(f"{spec.blocks}.")
        assert model.get_submodule(name) is module
    with_head = list(iter_target_linears(model, include_lm_head=True))
    assert with_head[-1] == (spec.lm_head, model.get_submodule(spec.lm_head))
    assert len(with_head) == len(named) + 1


def test_attention_geometry_reads_explicit_head_dim_and_gqa() -> None:
    assert attention_geometry(AutoConfig.for_model("qwen3", **TINY_CONFIGS["qwen3"])) == (4, 2, 24)
    assert attention_geometry(AutoConfig.for_model("phi3", **TINY_CONFIGS["phi3"])) == (4, 2, 16)
    assert attention_geometry(AutoConfig.for_model("gpt2", **TINY_CONFIGS["gpt2"])) == (4, 4, 16)
    # GPT-2 leaves n_inner unset: the MLP is 4 * n_embd wide.
    assert intermediate_size(AutoConfig.for_model("gpt2", **TINY_CONFIGS["gpt2"])) == 256


def test_linear_in_out_handles_conv1d_and_rejects_others() -> None:
    assert linear_in_out(Conv1D(nf=12, nx=5)) == (5, 12)
    assert linear_in_out(nn.Linear(5, 12)) == (5, 12)
    with pytest.raises(TypeError):
        linear_in_out(nn.Embedding(3, 4))


def test_config_dependent_flags() -> None:
    assert is_parallel_residual(build("gpt_neox"))
    assert not is_parallel_residual(build("gpt_neox", use_parallel_residual=False))
    assert not is_parallel_residual(build("llama"))
    post_norm_opt = build("opt", do_layer_norm_before=False)
    spec = get_arch(post_norm_opt)
    assert not is_pre_norm(post_norm_opt)
    # OPT-350m-style checkpoints have no final norm at all.
    assert find_module(post_norm_opt, spec.final_norm) is None
    assert find_module(post_norm_opt, None) is None


class _FooConfig(PretrainedConfig):
    model_type = "foo"


@pytest.mark.parametrize(
    ("subject", "model_type"),
    [
        (BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)), "bert"),
        (_FooConfig(), "foo"),
    ],
)
def test_unknown_model_type_lists_supported_types(subject: Any, model_type: str) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_arch(subject)
    message = str(info.value)
    assert repr(model_type) in message
    assert ", ".join(supported_model_types()) in message
    assert info.value.exit_code == 2


def test_wrong_model_class_is_reported_as_unsupported_layout() -> None:
    base = LlamaModel(LlamaConfig(**TINY_CONFIGS["llama"]))
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.layers"):
        get_blocks(base)


def _layer_indices(model: nn.Module) -> list[list[int]]:
    """Every integer `layer_idx` stored inside each block (attention modules, some layers)."""
    per_block = []
    for block in get_blocks(model):
        found = [getattr(m, "layer_idx", None) for m in block.modules()]
        per_block.append([idx for idx in found if isinstance(idx, int)])
    return per_block


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dropped", [-1, 0])
def test_drop_blocks_keeps_model_usable(model_type: str, dropped: int, tmp_path: Path) -> None:
    model = build(model_type)
    spec = get_arch(model)
    blocks = get_blocks(model)
    survivor = blocks[1 - dropped % 2]
    lists_before = {
        attr: list(getattr(model.config, attr))
        for attr in spec.per_layer_config_lists
        if getattr(model.config, attr, None) is not None
    }

    drop_blocks(model, [dropped])

    assert get_blocks(model) is blocks
    assert list(blocks) == [survivor]
    assert num_layers(model.config) == 1
    assert all(idx == [0] * len(idx) for idx in _layer_indices(model))
    for attr, values in lists_before.items():
        assert getattr(model.config, attr) == [values[1 - dropped % 2]]
    if hasattr(model.config, "validate"):
        model.config.validate()

    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
        )
    assert generated.shape == (1, ids.shape[1] + 3)

    # The rewritten config must describe the weights: a save/load round trip gives the same model.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(get_blocks(reloaded)) == 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)


def test_drop_blocks_rejects_bad_indices() -> None:
    model = build("llama")
    with pytest.raises(UserInputError, match="out of range"):
        drop_blocks(model, [2])
    with pytest.raises(UserInputError, match="at least one"):
        drop_blocks(model, [0, -1])
    drop_blocks(model, [])
    assert len(get_blocks(model)) == 2


def test_drop_blocks_refuses_index_dependent_gpt2() -> None:
    model = build("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        drop_blocks(model, [0])
    # Dropping the last block leaves the other indices unchanged, so it stays exact.
    drop_blocks(model, [1])
    assert len(get_blocks(model)) == 1
