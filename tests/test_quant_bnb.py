"""bitsandbytes 8-bit and 4-bit: quality against the dense model, faithful saving, targeting, errors.

Tolerances were measured with bitsandbytes 0.50.2 on an AVX-512 BF16 CPU (seed-0 tiny Llama,
hidden 64, intermediate 128): cosine similarity of the logits to the dense model's is 0.99997 for
8-bit, 0.9963 for NF4 and 0.9901 for FP4 without double quantization; a reload of the saved
checkpoint reproduces the in-memory logits exactly. On stories260K (8 windows of 256 tokens) the
perplexity ratio to fp32 is 0.997 for 8-bit and 1.060 for NF4 (attention layers only: the MLP
shapes stay dense on CPU, see the module notes).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import ASSETS, make_tiny_llama
from swiss_knife.compression.quantization import bnb as bnb_method
from swiss_knife.compression.quantization.base import QuantizationOutcome, QuantizeContext
from swiss_knife.config import BnB4bitConfig, BnB8bitConfig
from swiss_knife.errors import MissingDependencyError, UserInputError
from swiss_knife.models import save_model

requires_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason=f"bitsandbytes is not installed ({bnb_method.PIP_INSTALL})",
)
STORIES_TEXT = ASSETS / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny matmuls, one thread


def tiny(**overrides: Any) -> Any:
    """Hidden 64 and intermediate 128 suit every bitsandbytes kernel (blocks of 64, tiles of 32)."""
    settings: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128}
    settings.update(overrides)
    return make_tiny_llama(seed=0, **settings)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def run(model: Any, config: BnB8bitConfig | BnB4bitConfig, **ctx: Any) -> QuantizationOutcome:
    apply = bnb_method.apply_8bit if isinstance(config, BnB8bitConfig) else bnb_method.apply_4bit
    return apply(model, config, QuantizeContext(**ctx))  # type: ignore[arg-type]


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def save_and_reload(outcome: QuantizationOutcome, directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    save_model(outcome.model, directory, writer=outcome.writer)
    return AutoModelForCausalLM.from_pretrained(directory)


def quantized_names(model: nn.Module) -> set[str]:
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return {name for name, module in model.named_modules() if isinstance(module, kinds)}


# --------------------------------------------------------------------------- quality and saving

CASES = [
    pytest.param(BnB8bitConfig(), 0.9995, id="int8-threshold6"),
    pytest.param(BnB8bitConfig(threshold=0.0), 0.9995, id="int8-no-outliers"),
    pytest.param(BnB4bitConfig(), 0.99, id="nf4-double-bf16"),
    # Without double quantization bitsandbytes itself would save transposed scales after a CPU
    # forward pass; the snapshot writer must still produce a faithful checkpoint.
    pytest.param(
        BnB4bitConfig(quant_type="fp4", double_quant=False, compute_dtype="fp32"),
        0.98,
        id="fp4-fp32",
    ),
]


@requires_bnb
@pytest.mark.parametrize(("config", "min_cosine"), CASES)
def test_quantize_forward_save_reload(
    config: BnB8bitConfig | BnB4bitConfig, min_cosine: float, ids: torch.Tensor, tmp_path: Path
) -> None:
    dense = tiny()
    dense_logits = logits(dense, ids)
    dense.save_pretrained(tmp_path / "dense")

    outcome = run(dense, config)
    assert outcome.format == "bitsandbytes"
    assert outcome.report["quantized_layers"] == 14  # 7 linears x 2 blocks
    assert quantized_names(outcome.model) == {
        name for name, m in dense.named_modules() if isinstance(m, nn.Linear) and "layers" in name
    }
    q_logits = logits(outcome.model, ids)
    similarity = cosine(q_logits, dense_logits)
    assert min_cosine < similarity < 0.999999, similarity  # close, but really quantized
    logits(outcome.model, ids[:, :1])  # a one-token (decode-shaped) pass works too

    # The LM head is not a target: it stays an ordinary dense layer with the original weights.
    assert type(outcome.model.lm_head) is nn.Linear
    torch.testing.assert_close(outcome.model.lm_head.weight, dense.lm_head.weight)

    out = tmp_path / "quantized"
    reloaded = save_and_reload(outcome, out)  # saved after the forward passes above
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes"
    assert saved["llm_int8_skip_modules"] == ["lm_head"]
    if isinstance(config, BnB8bitConfig):
        assert saved["load_in_8bit"] and saved["llm_int8_threshold"] == config.threshold
    else:
        assert saved["load_in_4bit"] and saved["bnb_4bit_quant_type"] == config.quant_type
        assert saved["bnb_4bit_use_double_quant"] == config.double_quant
    assert quantized_names(reloaded) == quantized_names(outcome.model)
    assert type(reloaded.lm_head) is nn.Linear
    torch.testing.assert_close(logits(reloaded, ids), q_logits, rtol=0, atol=1e-6)
    assert weight_bytes(out) < 0.5 * weight_bytes(tmp_path / "dense")


@requires_bnb
def test_quantized_weights_are_smaller_than_fp32(tmp_path: Path) -> None:
    # Linears dominate this model (embeddings and LM head are a small share), so the ratio shows
    # the storage cost per weight: ~1 byte for int8, ~0.5 for 4-bit, against 4 for fp32.
    dense = tiny(vocab_size=128, intermediate_size=512, hidden_size=256, num_attention_heads=4)
    dense.save_pretrained(tmp_path / "dense")
    fp32 = weight_bytes(tmp_path / "dense")
    sizes = {}
    for name, config in (("8bit", BnB8bitConfig()), ("4bit", BnB4bitConfig())):
        outcome = run(dense, config)
        save_model(outcome.model, tmp_path / name, writer=outcome.writer)
        sizes[name] = weight_bytes(tmp_path / name) / fp32
    assert sizes["8bit"] < 0.33 and sizes["4bit"] < 0.2, sizes


# --------------------------------------------------------------------------- targeting


@requires_bnb
def test_ignore_patterns_stay_dense(ids: torch.Tensor, tmp_path: Path) -> None:
    dense = tiny()
    config = BnB8bitConfig(ignore=["lm_head", "re:.*down_proj", "model.layers.1.self_attn.q_proj"])
    outcome = run(dense, config)
    kept = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    kept.add("model.layers.1.self_attn.q_proj")
    assert set(outcome.report["dense_linears"]) == kept | {"lm_head"}
    assert not kept & quantized_names(outcome.model)
    assert len(quantized_names(outcome.model)) == 14 - 3
    modules = dict(outcome.model.named_modules())
    for name in kept:
        assert type(modules[name]) is nn.Linear
        torch.testing.assert_close(modules[name].weight, dense.get_submodule(name).weight)

    reloaded = save_and_reload(outcome, tmp_path / "out")
    assert quantized_names(reloaded) == quantized_names(outcome.model)
    torch.testing.assert_close(logits(reloaded, ids), logits(outcome.model, ids), rtol=0, atol=1e-6)


@requires_bnb
def test_targets_select_a_subset() -> None:
    outcome = run(tiny(), BnB4bitConfig(targets=[r"re:.*self_attn\.[qkvo]_proj"]))
    assert quantized_names(outcome.model) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"
    }


@requires_bnb
def test_cpu_4bit_leaves_misfit_shapes_dense(ids: torch.Tensor, tmp_path: Path) -> None:
    # intermediate 172 (stories260K's): gate/up have 172 rows (not a multiple of the kernel's
    # 32-row tile) and down_proj 172 columns (not a multiple of the 64-weight block).
    dense = tiny(intermediate_size=172)
    outcome = run(dense, BnB4bitConfig())
    mlp = {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert set(outcome.report["left_dense"]) == mlp
    assert "172 output rows" in outcome.report["left_dense"]["model.layers.0.mlp.gate_proj"]
    assert "172 input columns" in outcome.report["left_dense"]["model.layers.0.mlp.down_proj"]
    assert "left dense" in outcome.steps[0]
    assert quantized_names(outcome.model) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"
    }
    assert cosine(logits(outcome.model, ids), logits(dense, ids)) > 0.99
    reloaded = save_and_reload(outcome, tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids), logits(outcome.model, ids), rtol=0, atol=1e-6)

    # 8-bit has no shape constraint on CPU: every linear is quantized.
    assert run(dense, BnB8bitConfig()).report["quantized_layers"] == 14


# --------------------------------------------------------------------------- errors


def _no_work(model: Any) -> Any:
    """Make any attempt to start the work (saving the dense model) fail the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the error should have been raised before any work")

    model.save_pretrained = refuse
    return model


def test_missing_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'bitsandbytes>="):
        run(_no_work(tiny()), BnB4bitConfig())


@requires_bnb
def test_too_old_bitsandbytes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.42.0")
    with pytest.raises(MissingDependencyError, match=r"0\.42\.0 is too old.*pip install"):
        run(_no_work(tiny()), BnB8bitConfig())


@requires_bnb
def test_already_quantized_model_is_refused() -> None:
    quantized = run(tiny(), BnB8bitConfig()).model
    with pytest.raises(UserInputError, match=r"already quantized \(bitsandbytes\)"):
        run(_no_work(quantized), BnB4bitConfig())


@requires_bnb
def test_unsupported_device_is_refused() -> None:
    with pytest.raises(UserInputError, match=r"cannot run on device 'meta'; it supports .*cpu"):
        run(_no_work(tiny()), BnB8bitConfig(), device=torch.device("meta"))


@requires_bnb
def test_cpu_4bit_with_no_fitting_layer_is_refused() -> None:
    config = BnB4bitConfig(targets=["re:.*mlp\\..*"])
    with pytest.raises(UserInputError, match=r"none of the 6 targeted layers can be 4-bit on CPU"):
        run(_no_work(tiny(intermediate_size=172)), config)


@requires_bnb
def test_bad_patterns_and_non_hf_models_are_refused() -> None:
    with pytest.raises(UserInputError, match="matches no module"):
        run(_no_work(tiny()), BnB8bitConfig(ignore=["lm_head", "model.layers.7.mlp.up_proj"]))
    with pytest.raises(UserInputError, match="needs a Hugging Face model"):
        run(nn.Sequential(nn.Linear(64, 64)), BnB8bitConfig())


# --------------------------------------------------------------------------- the real tiny model


@requires_bnb
def test_stories260k_perplexity_stays_close(stories_dir: Path) -> None:
    if not STORIES_TEXT.is_file():
        pytest.skip(f"evaluation text not found at {STORIES_TEXT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiss_knife.data import load_token_stream
    from swiss_knife.evaluation.perplexity import perplexity

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    dense = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    stream = load_token_stream(str(STORIES_TEXT), tokenizer, max_tokens=8 * 256 + 1)
    base = perplexity(dense, stream, window=256).perplexity

    ratios = {}
    for name, config in (("8bit", BnB8bitConfig()), ("nf4", BnB4bitConfig())):
        outcome = run(dense, config)
        ratios[name] = perplexity(outcome.model, stream, window=256).perplexity / base
    # Measured: 0.997 (8-bit) and 1.060 (NF4 on the 20 attention projections; MLPs stay dense).
    assert 0.98 < ratios["8bit"] < 1.02, ratios
    assert 1.0 < ratios["nf4"] < 1.15, ratios
