"""int8 W8A8: torchao "dynamic" and compressed-tensors "static" (with SmoothQuant).

Every round trip quantizes a tiny random model in memory, saves it with
`swiss_knife.models.save_model(..., writer=outcome.writer)`, reloads it with a plain
`AutoModelForCausalLM.from_pretrained(dir)` and requires the reloaded logits to equal the in-memory
ones bit for bit. SmoothQuant folding must leave the float model's function unchanged, and must
lower the activation quantization error of a model with outlier channels. On the real stories260K
checkpoint both methods keep perplexity within 2% of fp32. Tests skip when torchao /
compressed-tensors are not installed.
"""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch import Tensor

from conftest import TINY_CONFIGS, VOCAB, build, make_tiny_llama
from swiss_knife.compression.quantization.base import QuantizeContext
from swiss_knife.compression.quantization.static_int8 import (
    apply_static,
    block_mappings,
    fake_quantize_activation,
    smooth_model,
    smoothing_scales,
)
from swiss_knife.config import CalibrationSettings, DynamicInt8Config, StaticInt8Config
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError
from swiss_knife.models import save_model

HAS_TORCHAO = find_spec("torchao") is not None
HAS_CT = find_spec("compressed_tensors") is not None
requires_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
requires_ct = pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")

# Every architecture family in the table except GPT-2 (Conv1D, refused by both methods).
FAMILIES = sorted(t for t in TINY_CONFIGS if t != "gpt2")


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny matmuls, one thread


def tokens(num: int, seq: int = 16, seed: int = 0) -> Tensor:
    return torch.randint(3, VOCAB, (num, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(input_ids=ids, use_cache=False).logits
        return out


def reload(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    noise = (reference.double() - approx.double()).square().sum()
    return float(10 * torch.log10(reference.double().square().sum() / noise))


def weights_of(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every module's weight, by module name."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), Tensor)
    }


def static_config(alpha: float | None = 0.5, **kwargs: Any) -> StaticInt8Config:
    return StaticInt8Config(
        smoothquant_alpha=alpha, calibration=CalibrationSettings(batch_size=4), **kwargs
    )


def block_linear_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    ]


# ----------------------------------------------------------------------------- dynamic (torchao)


@requires_torchao
@pytest.mark.parametrize("weight_only", [False, True])
def test_dynamic_round_trip_reloads_identical_logits(tmp_path: Path, weight_only: bool) -> None:
    from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic

    model = make_tiny_llama()
    originals = weights_of(model)
    lm_head = model.lm_head.weight.detach().clone()
    ids = tokens(2)
    outcome = apply_dynamic(model, DynamicInt8Config(weight_only=weight_only), QuantizeContext())
    before = logits(outcome.model, ids)
    assert outcome.format == "torchao"

    out = save_model(outcome.model, tmp_path / "q", writer=outcome.writer)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "torchao"
    expected = "Int8WeightOnlyConfig" if weight_only else "Int8DynamicActivationInt8WeightConfig"
    assert qconfig["quant_type"]["default"]["_type"] == expected
    assert "lm_head" in qconfig["modules_to_not_convert"]

    reloaded = reload(out)
    assert torch.equal(logits(reloaded, ids), before)
    for name in block_linear_names(model):
        weight = reloaded.get_submodule(name).weight
        assert type(weight).__name__ == "Int8Tensor", name
        # Symmetric per-channel int8 of a Gaussian-ish matrix: about 40 dB.
        assert sqnr_db(originals[name], weight.dequantize(torch.float32)) > 35, name
    assert outcome.report["min_weight_sqnr_db"] > 35
    # The head is left alone (default ignore) and reloads as a plain float parameter.
    assert type(reloaded.lm_head.weight) is nn.Parameter
    assert torch.equal(reloaded.lm_head.weight, lm_head)


@requires_torchao
def test_dynamic_quantizes_activations_per_token() -> None:
    """The int8 x int8 product equals per-token activation / per-channel weight quantization."""
    from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic

    model = make_tiny_llama()
    linear = model.model.layers[0].mlp.down_proj
    w = linear.weight.detach().clone()  # (out, in)
    apply_dynamic(model, DynamicInt8Config(), QuantizeContext())
    x = torch.randn(5, w.shape[1])
    # A loud token must not change the other tokens' results: scales are per row.
    x[0] *= 100.0

    def quant(t: Tensor) -> tuple[Tensor, Tensor]:
        scale = t.abs().amax(dim=1, keepdim=True) / 127.5  # (rows, 1)
        # torchao multiplies by the reciprocal (quantize_affine); dividing rounds a few ties
        # the other way.
        return torch.clamp(torch.round(t * (1.0 / scale)), -128, 127), scale

    xq, xs = quant(x)
    wq, ws = quant(w)
    expected = (xq @ wq.T) * xs * ws.T  # (tokens, out)
    with torch.no_grad():
        got = linear(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        alone = linear(x[1:])
    torch.testing.assert_close(alone, got[1:], rtol=1e-5, atol=1e-6)


@requires_torchao
def test_dynamic_ignored_layer_stays_float_after_reload(tmp_path: Path) -> None:
    from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic

    model = make_tiny_llama()
    kept = "model.layers.0.self_attn.q_proj"
    original = model.get_submodule(kept).weight.detach().clone()
    config = DynamicInt8Config(ignore=["lm_head", kept])
    outcome = apply_dynamic(model, config, QuantizeContext())
    ids = tokens(2)
    before = logits(outcome.model, ids)
    reloaded = reload(save_model(outcome.model, tmp_path / "q", writer=outcome.writer))
    weight = reloaded.get_submodule(kept).weight
    assert type(weight) is nn.Parameter
    assert torch.equal(weight, original)
    assert torch.equal(logits(reloaded, ids), before)


# ----------------------------------------------------------------------------- static (W8A8)


@requires_ct
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_static_round_trip_reloads_identical_logits(tmp_path: Path, alpha: float | None) -> None:
    model = make_tiny_llama()
    originals = weights_of(model)
    ids = tokens(2, seed=5)
    outcome = apply_static(model, static_config(alpha), QuantizeContext(calibration=tokens(6)))
    before = logits(outcome.model, ids)
    assert outcome.format == "compressed-tensors/int-quantized"

    out = save_model(outcome.model, tmp_path / "q", writer=outcome.writer)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "int-quantized"
    group = qconfig["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["weights"] | {"group_size": None} == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "channel",
        "group_size": None,
        "dynamic": False,
    }
    assert group["input_activations"]["strategy"] == "tensor"
    assert group["input_activations"]["dynamic"] is False
    assert qconfig["ignore"] == ["lm_head"]

    tensors = load_file(str(out / "model.safetensors"))
    names = block_linear_names(model)
    for name in names:
        q = tensors[f"{name}.weight"]
        scale = tensors[f"{name}.weight_scale"]
        assert q.dtype == torch.int8
        assert scale.shape == (q.shape[0], 1)
        assert tensors[f"{name}.input_scale"].shape == (1,)
        assert float(tensors[f"{name}.input_scale"]) > 0
        if alpha is None:
            # Without smoothing the weights are the original ones on an int8 grid.
            assert sqnr_db(originals[name], q.float() * scale) > 35, name
    assert outcome.report["min_weight_sqnr_db"] > 35
    assert "lm_head.weight_scale" not in tensors

    reloaded = reload(out)
    assert torch.equal(logits(reloaded, ids), before)
    assert torch.equal(reloaded.lm_head.weight, originals["lm_head"])
    assert torch.equal(model.lm_head.weight, originals["lm_head"])


@requires_ct
@pytest.mark.parametrize("model_type", FAMILIES)
def test_static_and_dynamic_reload_on_every_family(tmp_path: Path, model_type: str) -> None:
    ids = tokens(2, seq=12)
    model = build(model_type)
    outcome = apply_static(model, static_config(0.5), QuantizeContext(calibration=tokens(4)))
    before = logits(outcome.model, ids)
    reloaded = reload(save_model(outcome.model, tmp_path / "s", writer=outcome.writer))
    assert torch.equal(logits(reloaded, ids), before)
    if HAS_TORCHAO:
        from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic

        model = build(model_type)
        outcome = apply_dynamic(model, DynamicInt8Config(), QuantizeContext())
        before = logits(outcome.model, ids)
        reloaded = reload(save_model(outcome.model, tmp_path / "d", writer=outcome.writer))
        assert torch.equal(logits(reloaded, ids), before)


@requires_ct
def test_static_bf16_round_trip(tmp_path: Path) -> None:
    from swiss_knife.models import cast_model

    model = cast_model(make_tiny_llama(), "bf16")
    ids = tokens(2)
    outcome = apply_static(model, static_config(0.5), QuantizeContext(calibration=tokens(4)))
    before = logits(outcome.model, ids)
    assert before.dtype == torch.bfloat16
    reloaded = reload(save_model(outcome.model, tmp_path / "q", writer=outcome.writer))
    assert torch.equal(logits(reloaded, ids), before)


@requires_ct
def test_reloaded_model_fake_quantizes_activations(tmp_path: Path) -> None:
    """transformers + compressed-tensors on CPU apply the static input scales at run time."""
    model = make_tiny_llama()
    outcome = apply_static(model, static_config(None), QuantizeContext(calibration=tokens(4)))
    reloaded = reload(save_model(outcome.model, tmp_path / "q", writer=outcome.writer))
    ids = tokens(2)
    before = logits(reloaded, ids)
    with torch.no_grad():
        # A coarser grid on one layer's input must change the output if it is used at all.
        reloaded.model.layers[0].mlp.down_proj.input_scale.mul_(20.0)
    assert not torch.equal(logits(reloaded, ids), before)


@requires_ct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_matches_compressed_tensors(dtype: torch.dtype) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor")
    x = (torch.randn(3, 7, 64) * 4).to(dtype)
    scale = torch.tensor([x.float().abs().max() / 127.5 * 0.7], dtype=dtype)  # some clipping
    assert torch.equal(fake_quantize_activation(x, scale), fake_quantize(x, scale, None, args))


def test_static_without_calibration_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="calibration"):
        apply_static(make_tiny_llama(), static_config(), QuantizeContext(calibration=None))


def test_dynamic_without_torchao_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic
    from swiss_knife.errors import MissingDependencyError

    # A None entry makes `import torchao.quantization` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(MissingDependencyError, match="pip install 'torchao"):
        apply_dynamic(make_tiny_llama(), DynamicInt8Config(), QuantizeContext())


def test_gpt2_conv1d_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="Conv1D"):
        apply_static(build("gpt2"), static_config(), QuantizeContext(calibration=tokens(2)))
    if HAS_TORCHAO:
        from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic

        with pytest.raises(UnsupportedArchitectureError, match="Conv1D"):
            apply_dynamic(build("gpt2"), DynamicInt8Config(), QuantizeContext())


def test_writer_refuses_a_model_changed_after_quantization(tmp_path: Path) -> None:
    model = make_tiny_llama()
    outcome = apply_static(model, static_config(None), QuantizeContext(calibration=tokens(2)))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
    with pytest.raises(UserInputError, match="changed after quantization"):
        save_model(outcome.model, tmp_path / "q", writer=outcome.writer)


# ----------------------------------------------------------------------------- SmoothQuant


def test_smoothing_scales_formula_and_dead_channels() -> None:
    act = torch.tensor([4.0, 0.0, 9.0, 1.0])
    wmax = torch.tensor([1.0, 2.0, 4.0, 0.0])
    s = smoothing_scales(act, wmax, alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.5, 1.0]))
    # alpha = 1 moves everything into the weights: X / s has absmax 1 in every live channel.
    s1 = smoothing_scales(act, wmax, alpha=1.0)
    torch.testing.assert_close((act / s1)[[0, 2]], torch.ones(2))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_smoothing_is_exact_in_float(model_type: str) -> None:
    model = build(model_type)
    with torch.no_grad():
        # Non-trivial norm weights (random init leaves them at 1 or 0) and one outlier channel.
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.add_(torch.rand(param.shape, generator=torch.Generator().manual_seed(3)))
                param[1] += 8.0
    ids = tokens(2, seq=12, seed=7)
    reference = logits(model, ids)
    state = smooth_model(model, tokens(4, seq=12), alpha=0.5, batch_size=2)
    assert state.smoothed, "nothing was smoothed"
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)


def test_smoothing_folds_where_the_math_allows() -> None:
    """Norms feed q/k/v and gate/up; v_proj rows absorb o_proj's scales (GQA-shared) and up_proj
    rows absorb down_proj's; fused layouts (Phi-3, GPT-NeoX) only smooth at the norms."""
    from swiss_knife.arch import block_linears, get_arch, get_blocks
    from swiss_knife.calibration import BlockContext
    from swiss_knife.models import cast_model

    def sources(model: nn.Module) -> dict[str, tuple[str, int]]:
        spec = get_arch(model)
        block = get_blocks(model)[0]
        prefix = f"{spec.blocks}.0"
        ctx = BlockContext(
            index=0,
            num_blocks=1,
            prefix=prefix,
            block=block,
            linears={f"{prefix}.{k}": v for k, v in block_linears(block, spec).items()},
            spec=spec,
            config=model.config,
            device=torch.device("cpu"),
        )
        return {
            reader.removeprefix(prefix + "."): (m.source.removeprefix(prefix + "."), m.group)
            for reader, m in block_mappings(ctx).items()
        }

    llama = sources(build("llama"))  # 4 query heads share 2 kv heads
    assert llama == {
        "self_attn.q_proj": ("input_layernorm", 1),
        "self_attn.k_proj": ("input_layernorm", 1),
        "self_attn.v_proj": ("input_layernorm", 1),
        "self_attn.o_proj": ("self_attn.v_proj", 2),
        "mlp.gate_proj": ("post_attention_layernorm", 1),
        "mlp.up_proj": ("post_attention_layernorm", 1),
        "mlp.down_proj": ("mlp.up_proj", 1),
    }
    assert set(sources(build("phi3"))) == {"self_attn.qkv_proj", "mlp.gate_up_proj"}
    assert set(sources(build("gpt_neox"))) == {"attention.query_key_value", "mlp.dense_h_to_4h"}
    # Post-norm OPT: the norms do not feed the linears, only v_proj -> out_proj remains.
    assert set(sources(build("opt", do_layer_norm_before=False))) == {"self_attn.out_proj"}
    # Gemma's (1 + w) norms keep no precision when folded in bf16; only the linears absorb scales.
    gemma_bf16 = cast_model(build("gemma"), "bf16")
    assert set(sources(gemma_bf16)) == {"self_attn.o_proj", "mlp.down_proj"}
    assert len(sources(build("gemma"))) == 7


def outlier_llama() -> nn.Module:
    """A tiny Llama whose norms emit one huge channel: the case SmoothQuant targets."""
    model = make_tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 60.0
            layer.post_attention_layernorm.weight[7] *= 60.0
    return model


def activation_errors(model: nn.Module, ids: Tensor) -> dict[str, float]:
    """||Q(x) - x|| / ||x|| of every quantized linear's input, with its own static scale."""
    errors: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "input_scale"):

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0]
                scale = mod.input_scale
                assert isinstance(scale, Tensor)
                err = (fake_quantize_activation(x, scale) - x).norm() / x.norm()
                errors[name] = float(err)

            # prepend: see the input before the module's own fake-quantization hook.
            handles.append(module.register_forward_pre_hook(hook, prepend=True))
    try:
        logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return errors


def test_smoothquant_lowers_activation_error_with_outlier_channels() -> None:
    ids, calibration = tokens(4, seq=32, seed=11), tokens(8, seq=32, seed=12)
    reference = logits(outlier_llama(), ids)
    results = {}
    for alpha in (None, 0.5):
        model = outlier_llama()
        apply_static(model, static_config(alpha), QuantizeContext(calibration=calibration))
        act = activation_errors(model, ids)
        out = float((logits(model, ids) - reference).norm() / reference.norm())
        results[alpha] = (sum(act.values()) / len(act), out)
    (act_plain, out_plain), (act_smooth, out_smooth) = results[None], results[0.5]
    assert act_smooth < 0.8 * act_plain, results
    assert out_smooth < 0.5 * out_plain, results


# ----------------------------------------------------------------------------- stories260K


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_stories260k_perplexity_within_two_percent(
    stories_dir: Path, method: str, tmp_path: Path
) -> None:
    """Real weights and text; the checkpoint ties lm_head to the embeddings, which must survive
    the save and reload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiss_knife.data import load_token_stream, sample_calibration
    from swiss_knife.evaluation.perplexity import perplexity

    if method == "dynamic" and not HAS_TORCHAO:
        pytest.skip("torchao is not installed")
    text = stories_dir.parent / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    if not text.is_file():
        pytest.skip(f"TinyStories text not found at {text}")
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    stream = load_token_stream(str(text), tokenizer, max_tokens=6 * 256 + 20_000)
    evaluation = stream[: 6 * 256]  # six 256-token windows
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    base = perplexity(model, evaluation, window=256).perplexity
    if method == "dynamic":
        from swiss_knife.compression.quantization.torchao_int8 import apply_dynamic

        outcome = apply_dynamic(model, DynamicInt8Config(), QuantizeContext())
    else:
        calibration = sample_calibration(stream[6 * 256 :], 8, 256, seed=0)
        outcome = apply_static(model, static_config(0.5), QuantizeContext(calibration=calibration))
    quantized = perplexity(model, evaluation, window=256).perplexity
    assert abs(quantized / base - 1) < 0.02, (base, quantized)

    if method == "static" and not HAS_CT:
        return
    reloaded = reload(save_model(outcome.model, tmp_path / "q", writer=outcome.writer))
    window = evaluation[:256].unsqueeze(0)  # (1, 256)
    assert torch.equal(logits(reloaded, window), logits(model, window))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_model_size_counts_torchao_tensors() -> None:
    """Size metrics work on torchao's quantized tensor subclasses (count_nonzero is not defined)."""
    pytest.importorskip("torchao")
    from conftest import make_tiny_llama
    from swiss_knife.compression.quantization.api import quantize
    from swiss_knife.config import DynamicInt8Config
    from swiss_knife.evaluation.size import model_size

    model = quantize(
        make_tiny_llama(hidden_size=64, intermediate_size=64), DynamicInt8Config()
    ).model
    size = model_size(model)
    assert 0 < size.nonzero_params <= size.num_params
