"""compressed-tensors pack-quantized export: bit packing, config, and reload through transformers.

The round trips build tiny random Llamas, quantize every block linear, save with
`save_compressed`, reload with `AutoModelForCausalLM.from_pretrained` (symmetric grids) or
`load_compressed` (any grid), and require the reloaded weights to equal
`QuantizedWeight.dequantize()` bit for bit and the logits to match the in-memory fake-quantized
model. Tests that need the `compressed-tensors` package skip when it is absent.
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama
from swiss_knife.compression.quantization.compressed_tensors_format import (
    check_config_covers,
    infer_config_groups,
    load_compressed,
    pack_int32,
    pack_state_dict,
    quantization_config_dict,
    save_compressed,
    unpack_int32,
    unpack_weight,
)
from swiss_knife.compression.quantization.gptq import gptq_quantize
from swiss_knife.compression.quantization.grid import (
    QuantGrid,
    QuantizedWeight,
    compute_qparams,
    quantize,
)
from swiss_knife.compression.quantization.rtn import rtn_quantize
from swiss_knife.errors import UserInputError

requires_ct = pytest.mark.skipif(
    find_spec("compressed_tensors") is None, reason="compressed-tensors is not installed"
)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny matmuls, one thread


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }


def rtn_all(model: nn.Module, grid_for: Any) -> dict[str, QuantizedWeight]:
    return {
        name: rtn_quantize(module.weight, grid_for(name))
        for name, module in block_linears(model).items()
    }


def fake_quantize(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Replace every quantized weight by its dequantized value, in place."""
    with torch.no_grad():
        for name, qw in quantized.items():
            model.get_submodule(name).weight.copy_(qw.dequantize())


def tokens(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 128, (n, length), generator=torch.Generator().manual_seed(0))


def assert_same_model(
    reloaded: nn.Module, reference: nn.Module, quantized: dict[str, QuantizedWeight]
) -> None:
    x = tokens()
    with torch.no_grad():
        expected = reference(x).logits
        got = reloaded(x).logits  # the first forward decompresses any still-packed weights
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for name, qw in quantized.items():
        weight = reloaded.get_submodule(name).weight
        assert torch.equal(weight, qw.dequantize()), name


# ----------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_roundtrip(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    for shape in [(5, 37), (64, 96), (3, 1)]:
        levels = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=generator)
        levels = levels.to(torch.int8)
        for dim in (0, 1):
            packed = pack_int32(levels, bits, dim)
            assert packed.dtype == torch.int32
            expected_words = math.ceil(shape[dim] * bits / 32)
            assert packed.shape[dim] == expected_words and packed.shape[1 - dim] == shape[1 - dim]
            assert torch.equal(unpack_int32(packed, bits, shape[dim], dim), levels)


@requires_ct
@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_matches_compressed_tensors(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    generator = torch.Generator().manual_seed(10 + bits)
    levels = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (24, 70), generator=generator)
    levels = levels.to(torch.int8)
    for dim in (0, 1):
        assert torch.equal(pack_int32(levels, bits, dim), pack_to_int32(levels, bits, dim))


@requires_ct
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_and_dequantize_match_compressed_tensors(symmetric: bool) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="channel")
    scale, zero = compute_qparams(w, 4, symmetric)
    ct_scale, ct_zero = calculate_qparams(
        w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args
    )
    torch.testing.assert_close(scale, ct_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero, ct_zero)
    qw = rtn_quantize(w, QuantGrid(4, symmetric, None))
    assert torch.equal(qw.dequantize(), ct_dequantize(qw.q, qw.scale, qw.zero, args))
    assert torch.equal(qw.q, quantize(w, scale, zero, 4, symmetric))


# ----------------------------------------------------------------------------- config


@requires_ct
def test_config_dict_is_valid_compressed_tensors() -> None:
    from compressed_tensors.quantization import QuantizationConfig

    groups = [(["re:.*mlp.*"], QuantGrid(4, True, 32)), (["re:.*self_attn.*"], QuantGrid(8))]
    config = quantization_config_dict(groups, ["lm_head"], actorder=True)
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    parsed = QuantizationConfig.model_validate(config)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.strategy, weights.group_size) == (4, "group", 32)
    assert weights.actorder == "weight"
    weights = parsed.config_groups["group_1"].weights
    assert (weights.strategy, weights.group_size) == ("channel", None)
    assert parsed.ignore == ["lm_head"]


def test_config_must_select_exactly_the_quantized_modules() -> None:
    model = make_tiny_llama()
    quantized = rtn_all(model, lambda _: QuantGrid(4, True, 16))
    groups, ignore = infer_config_groups(model, quantized)
    assert groups == [(["Linear"], QuantGrid(4, True, 16))] and ignore == ["lm_head"]
    check_config_covers(model, quantized, groups, ignore)
    with pytest.raises(UserInputError, match="lm_head: selected by a config group"):
        check_config_covers(model, quantized, groups, [])
    with pytest.raises(UserInputError, match="but its config group says"):
        check_config_covers(model, quantized, [(["Linear"], QuantGrid(8))], ignore)
    partial = dict(list(quantized.items())[1:])
    with pytest.raises(UserInputError, match="not quantized"):
        check_config_covers(model, partial, groups, ignore)


def test_act_order_with_g_idx_is_refused() -> None:
    model = make_tiny_llama()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    x = x * torch.linspace(0.1, 3.0, 32)  # distinct channel scales: a non-trivial order
    name = "model.layers.0.self_attn.q_proj"
    weight = model.get_submodule(name).weight
    qw, _ = gptq_quantize(weight, x.T @ x, QuantGrid(4, True, 16), act_order=True)
    assert qw.g_idx is not None
    with pytest.raises(UserInputError, match="static_groups"):
        pack_state_dict(model, {name: qw})


def test_packed_state_dict_layout() -> None:
    model = make_tiny_llama()
    quantized = rtn_all(model, lambda _: QuantGrid(4, False, 16))
    state = pack_state_dict(model, quantized)
    name = "model.layers.0.mlp.down_proj"  # (32, 64)
    assert f"{name}.weight" not in state
    assert state[f"{name}.weight_packed"].shape == (32, 64 * 4 // 32)
    assert state[f"{name}.weight_packed"].dtype == torch.int32
    assert state[f"{name}.weight_scale"].shape == (32, 4)
    assert state[f"{name}.weight_zero_point"].shape == (32 * 4 // 32, 4)
    assert state[f"{name}.weight_shape"].tolist() == [32, 64]
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)
    prefix = f"{name}."
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    back = unpack_weight(own, QuantGrid(4, False, 16))
    assert torch.equal(back.dequantize(), quantized[name].dequantize())


# ----------------------------------------------------------------------------- reload


GRIDS = [
    QuantGrid(4, True, 32),
    QuantGrid(4, True, None),
    QuantGrid(8, True, None),
    QuantGrid(2, True, 64),
    QuantGrid(4, False, 32),
    QuantGrid(4, False, None),
    QuantGrid(8, False, 32),
    QuantGrid(3, False, 32),
]


@requires_ct
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_reload_reproduces_fake_quantized_model(tmp_path: Path, grid: QuantGrid) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    quantized = rtn_all(model, lambda _: grid)
    save_compressed(model, quantized, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"]
    fake_quantize(model, quantized)
    if grid.symmetric:
        # Plain from_pretrained: packed on load, decompressed at the first forward.
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
        assert not any(info.values()), info
        assert_same_model(reloaded, model, quantized)
    # Asymmetric needs dequantize-on-load with compressed-tensors >= 0.18 (module docstring).
    assert_same_model(load_compressed(tmp_path), model, quantized)


@requires_ct
def test_reload_bf16_mixed_grids_and_tied_embeddings(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    model = model.to(torch.bfloat16)

    def grid_for(name: str) -> QuantGrid:
        return QuantGrid(8, True, None) if "self_attn" in name else QuantGrid(4, True, 32)

    quantized = rtn_all(model, grid_for)
    assert all(qw.scale.dtype == torch.bfloat16 for qw in quantized.values())
    save_compressed(model, quantized, tmp_path / "ct")
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied to the embeddings, re-tied on load
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2
    fake_quantize(model, quantized)
    # The reference goes through a plain save and reload too: a bf16 model built in memory keeps
    # its rotary buffers in bf16, while a loaded one computes them in fp32.
    model.save_pretrained(tmp_path / "plain")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for reloaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct"),
        load_compressed(tmp_path / "ct"),
    ):
        assert reloaded.dtype == torch.bfloat16
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        x = tokens()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x).logits, reference(x).logits, atol=0, rtol=0)
        for name, qw in quantized.items():
            assert torch.equal(reloaded.get_submodule(name).weight, qw.dequantize()), name


def test_mixed_grids_with_an_asymmetric_one_are_refused(tmp_path: Path) -> None:
    model = make_tiny_llama()

    def grid_for(name: str) -> QuantGrid:
        return QuantGrid(8, False, None) if "self_attn" in name else QuantGrid(4, True, 16)

    with pytest.raises(UserInputError, match="asymmetric"):
        save_compressed(model, rtn_all(model, grid_for), tmp_path)


@requires_ct
def test_load_compressed_returns_dense_weights_before_any_forward(tmp_path: Path) -> None:
    model = make_tiny_llama()
    quantized = rtn_all(model, lambda _: QuantGrid(4, True, 16))
    save_compressed(model, quantized, tmp_path)
    reloaded = load_compressed(tmp_path)
    for name, qw in quantized.items():
        assert torch.equal(reloaded.get_submodule(name).weight, qw.dequantize()), name


@requires_ct
def test_reload_gptq_act_order_static_groups(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    generator = torch.Generator().manual_seed(0)
    quantized = {}
    for name, module in block_linears(model).items():
        width = module.in_features
        x = torch.randn(512, width, generator=generator) * torch.rand(width, generator=generator)
        quantized[name], _ = gptq_quantize(
            module.weight, x.T @ x, QuantGrid(4, True, 32), act_order=True, static_groups=True
        )
    save_compressed(model, quantized, tmp_path, actorder=True)
    fake_quantize(model, quantized)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path), model, quantized)


@requires_ct
def test_partial_last_group_does_not_load(tmp_path: Path) -> None:
    """Why `check_group_size` refuses width 192 with group 128: a checkpoint holding a partial
    last group (2 scales for 192 columns) cannot be loaded by the installed compressed-tensors."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden_size=192, intermediate_size=256)
    with pytest.raises(UserInputError, match="group sizes that fit: 2, 4, 8, 16, 32, 64"):
        rtn_all(model, lambda _: QuantGrid(4, True, 128))

    # Write such a checkpoint by hand (the exporter refuses to) and try to load it.
    state = dict(model.state_dict())
    for name, module in block_linears(model).items():
        out, width = module.weight.shape
        del state[f"{name}.weight"]
        levels = torch.zeros(out, width, dtype=torch.int8)
        state[f"{name}.weight_packed"] = pack_int32(levels, 4)
        state[f"{name}.weight_scale"] = torch.ones(out, math.ceil(width / 128))
        state[f"{name}.weight_shape"] = torch.tensor([out, width])
    config = quantization_config_dict([(["Linear"], QuantGrid(4, True, 64))], ["lm_head"])
    config["config_groups"]["group_0"]["weights"]["group_size"] = 128
    model.config.quantization_config = config
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises((ValueError, RuntimeError)):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        reloaded(tokens())
