"""The quantize verb: registry, conformance of every method, error paths, recipes and the CLI.

The conformance table runs each registered method through apply -> forward -> save -> reload
with plain `AutoModelForCausalLM.from_pretrained` -> the same logits, on a tiny random Llama.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from swiss_knife.compression.quantization.api import quantize
from swiss_knife.compression.quantization.base import get_method, method_names, register_method
from swiss_knife.compression.quantization.compressed_tensors_format import load_compressed
from swiss_knife.config import (
    AWQConfig,
    BnB4bitConfig,
    BnB8bitConfig,
    CalibrationSettings,
    CompressionConfig,
    DynamicInt8Config,
    GPTQConfig,
    HalfPrecisionConfig,
    QuantizeConfig,
    RTNConfig,
    StaticInt8Config,
    validate_dict,
)
from swiss_knife.data import calibration_samples
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError
from swiss_knife.models import is_quantized, save_model

CAL = CalibrationSettings(num_samples=8, seq_len=32, batch_size=4)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (id, config, max |logit difference| between the in-memory model and its reload, backend)
CONFORMANCE: list[tuple[str, Any, float, str | None]] = [
    ("fp16", HalfPrecisionConfig(method="fp16"), 0.0, None),
    ("bf16", HalfPrecisionConfig(method="bf16"), 0.0, None),
    ("rtn-w4-g32", RTNConfig(bits=4, group_size=32), 1e-5, None),
    ("rtn-w8-channel-clip", RTNConfig(bits=8, group_size=None, clip_search=True), 1e-5, None),
    (
        "rtn-mixed",
        RTNConfig(bits=3, group_size=32, bits_overrides={"re:.*down_proj": 8}),
        1e-5,
        None,
    ),
    ("gptq-w4-g32", GPTQConfig(bits=4, group_size=32, calibration=CAL), 1e-5, None),
    (
        "gptq-actorder",
        GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True, calibration=CAL),
        1e-5,
        None,
    ),
    ("awq-w4-g32", AWQConfig(bits=4, group_size=32, calibration=CAL), 1e-5, None),
    ("8bit", BnB8bitConfig(), 1e-4, "bitsandbytes"),
    ("4bit-nf4", BnB4bitConfig(compute_dtype="fp32"), 1e-4, "bitsandbytes"),
    ("dynamic", DynamicInt8Config(), 1e-4, "torchao"),
    ("int8-weight-only", DynamicInt8Config(weight_only=True), 1e-4, "torchao"),
    ("static", StaticInt8Config(calibration=CAL), 1e-4, "compressed_tensors"),
]


def _default_row(name: str) -> tuple[str, Any, float, str | None]:
    """A conformance row for a registered method the table above does not name: its config's
    defaults, sized for the tiny model (a method without a row cannot exist)."""
    cls: Any = get_method(name).config_class
    fields = cls.model_fields
    settings: dict[str, Any] = {"method": name}
    if "group_size" in fields:
        settings["group_size"] = 32
    if "calibration" in fields:
        settings["calibration"] = CAL
    return (f"{name}-defaults", cls(**settings), 1e-4, None)


_NAMED = {config.method for _, config, _, _ in CONFORMANCE}
CONFORMANCE += [_default_row(name) for name in method_names() if name not in _NAMED]


def test_every_registered_method_has_a_conformance_row() -> None:
    assert {config.method for _, config, _, _ in CONFORMANCE} == set(method_names())


def _calibration() -> torch.Tensor:
    return torch.randint(4, 128, (8, 32), generator=torch.Generator().manual_seed(1))


def test_registry_matches_the_recipe_configs() -> None:
    union = typing.get_args(QuantizeConfig)[0]
    in_configs = [
        name
        for cls in typing.get_args(union)
        for name in typing.get_args(cls.model_fields["method"].annotation)
    ]
    assert sorted(method_names()) == sorted(in_configs)
    assert all(get_method(n).config_class.__name__.endswith("Config") for n in in_configs)


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("rtn", RTNConfig, needs_calibration=False)(lambda m, c, x: None)  # type: ignore[arg-type,return-value]


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(UserInputError, match=r"available: .*gptq"):
        get_method("int3-magic")


@pytest.mark.parametrize(
    ("case", "config", "tolerance", "backend"), CONFORMANCE, ids=[c[0] for c in CONFORMANCE]
)
def test_conformance(
    case: str,
    config: Any,
    tolerance: float,
    backend: str | None,
    tmp_path: Path,
    tiny_tokenizer: Any,
) -> None:
    if backend is not None and not _has(backend):
        pytest.skip(f"{backend} is not installed")
    torch.manual_seed(0)
    model = make_tiny_llama(seed=0, intermediate_size=64, hidden_size=64)
    dense = make_tiny_llama(seed=0, intermediate_size=64, hidden_size=64)
    info = get_method(config.method)
    outcome = quantize(
        model, config, calibration=_calibration() if info.needs_calibration else None
    )
    inputs = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = outcome.model(inputs).logits.float()
        reference = dense(inputs).logits
    assert torch.isfinite(ours).all()
    # Quantized, but still the same model: its logits stay close to the float model's.
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.9, f"{case}: cosine {cosine:.3f} with the float model"

    out = save_model(
        outcome.model, tmp_path / case, tokenizer=tiny_tokenizer, writer=outcome.writer
    )
    if getattr(config, "symmetric", True):
        reloaded = AutoModelForCausalLM.from_pretrained(out)
    else:
        # compressed-tensors 0.18-0.20 leave asymmetric zero points unpacked on transformers'
        # plain path; its dequantize-on-load path is the route (compressed_tensors_format.py).
        reloaded = load_compressed(out)
    with torch.no_grad():
        again = reloaded(inputs).logits.float()
    assert (again - ours).abs().max().item() <= tolerance + 1e-6
    # What a quantizer touches by default: never the head or the embeddings.
    head = reloaded.get_output_embeddings()
    assert head is None or isinstance(head.weight, torch.Tensor)


def test_already_quantized_model_is_refused(tmp_path: Path, tiny_tokenizer: Any) -> None:
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=64)
    outcome = quantize(model, RTNConfig(bits=4, group_size=32))
    out = save_model(outcome.model, tmp_path / "q", tokenizer=tiny_tokenizer, writer=outcome.writer)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert is_quantized(reloaded) is not None
    with pytest.raises(UserInputError, match="already quantized"):
        quantize(reloaded, RTNConfig(bits=4, group_size=32))


def test_methods_that_need_data_refuse_to_run_without_it() -> None:
    for config in (GPTQConfig(calibration=CAL), AWQConfig(calibration=CAL), StaticInt8Config()):
        with pytest.raises(UserInputError, match="needs calibration data"):
            quantize(make_tiny_llama(), config)
    with pytest.raises(UserInputError, match="LongTensor"):
        quantize(make_tiny_llama(), GPTQConfig(calibration=CAL), calibration=torch.zeros(2, 8))


def test_group_size_that_does_not_divide_names_layers_and_fits() -> None:
    model = make_tiny_llama(hidden_size=64, intermediate_size=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserInputError) as info:
        quantize(model, RTNConfig(bits=4, group_size=64))
    message = str(info.value)
    assert "96 inputs" in message and "down_proj" in message and "32" in message
    # Refused before any work: the weights are untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_targets_and_ignore_are_respected() -> None:
    model = make_tiny_llama(hidden_size=64, intermediate_size=64)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, RTNConfig(bits=2, group_size=32, ignore=["lm_head", "re:.*mlp.*"]))
    state = model.state_dict()
    assert torch.equal(
        state["model.layers.0.mlp.down_proj.weight"],
        original["model.layers.0.mlp.down_proj.weight"],
    )
    assert not torch.equal(
        state["model.layers.0.self_attn.q_proj.weight"],
        original["model.layers.0.self_attn.q_proj.weight"],
    )
    with pytest.raises(UserInputError, match=r"nothing|no "):
        quantize(make_tiny_llama(), RTNConfig(targets=["re:.*does_not_exist"]))


def test_conv1d_models_get_a_clear_error() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=64)
    )
    with pytest.raises(UnsupportedArchitectureError, match="Conv1D"):
        quantize(model, RTNConfig(bits=4, group_size=32))


def test_bits_out_of_range_rejected_by_the_config() -> None:
    from swiss_knife.errors import ConfigError

    with pytest.raises(ConfigError, match="bits"):
        validate_dict(
            CompressionConfig,
            {"model": "m", "stages": [{"type": "quantize", "method": "rtn", "bits": 9}]},
        )


def test_calibration_samples_are_seeded(tiny_tokenizer: Any, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    settings = CalibrationSettings(num_samples=4, seq_len=16, seed=3)
    a = calibration_samples(str(text), tiny_tokenizer, settings)
    b = calibration_samples(str(text), tiny_tokenizer, settings)
    assert a.shape == (4, 16) and torch.equal(a, b)
    # The default length shrinks to the model's positions; a length asked for is refused.
    clamped = calibration_samples(
        str(text), tiny_tokenizer, CalibrationSettings(), max_positions=32
    )
    assert clamped.shape[1] == 32
    with pytest.raises(UserInputError, match="seq_len 64 exceeds the 32 positions"):
        calibration_samples(
            str(text), tiny_tokenizer, CalibrationSettings(seq_len=64), max_positions=32
        )


@pytest.mark.integration
def test_gptq_beats_rtn_on_a_trained_model(stories_dir: Path, assets_dir: Path) -> None:
    from swiss_knife.config import DataConfig
    from swiss_knife.data import load_token_stream, sample_calibration
    from swiss_knife.evaluation.perplexity import perplexity
    from swiss_knife.models import load_model

    text = assets_dir / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    tokenizer = load_model(str(stories_dir)).tokenizer
    stream = load_token_stream(DataConfig(source=str(text), split_documents="paragraph"), tokenizer)
    calibration = sample_calibration(stream[:100_000], 32, 256, seed=0)
    evaluation = stream[200_000 : 200_000 + 512 * 20]
    results = {}
    for name, config in (
        ("rtn", RTNConfig(bits=3, group_size=None)),
        ("gptq", GPTQConfig(bits=3, group_size=None, calibration=CAL)),
    ):
        model = load_model(str(stories_dir), with_tokenizer=False).model
        outcome = quantize(model, config, calibration=calibration)
        results[name] = perplexity(outcome.model, evaluation).perplexity
    assert results["gptq"] < results["rtn"]


def test_quantize_stage_in_a_recipe_saves_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from swiss_knife.pipeline import run_recipe

    text = tmp_path / "text.txt"
    text.write_text("a small text for a tiny model to read. " * 100, encoding="utf-8")
    recipe = validate_dict(
        CompressionConfig,
        {
            "model": str(tiny_llama_dir),
            "data": {"eval": str(text)},
            "evaluation": {
                "perplexity": {"window": 32, "max_windows": 2},
                "speed": {"enabled": False},
                "agreement": {"window": 32, "max_windows": 2},
            },
            "stages": [
                {
                    "type": "quantize",
                    "method": "gptq",
                    "name": "gptq",
                    "bits": 4,
                    "group_size": 32,
                    "calibration": {"num_samples": 4, "seq_len": 32},
                },
            ],
        },
    )
    first = run_recipe(recipe, tmp_path / "run", progress=False)
    stage_dir = tmp_path / "run" / "stages" / "gptq"
    assert (stage_dir / "model.safetensors").is_file()
    config = json.loads((stage_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    manifest = json.loads((stage_dir / "swiss_knife.json").read_text())
    assert manifest["stage_report"]["sensitivity"]
    assert first.reports[-1].metrics["size"]["bits_per_weight"] < 32
    second = run_recipe(recipe, tmp_path / "run", progress=False)
    assert "gptq" in second.resumed_stages


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swiss_knife.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_cli_quantize_writes_a_loadable_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    done = _cli(
        "quantize",
        str(tiny_llama_dir),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--output-dir",
        str(out),
        "--json",
        "-q",
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"].startswith("compressed-tensors")
    assert (out / "swiss_knife.json").is_file() and (out / "README.md").is_file()
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_cli_quantize_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    done = _cli(
        "quantize", str(tiny_llama_dir), "--method", "gptq", "--output-dir", str(tmp_path / "q")
    )
    assert done.returncode == 2 and "calibration" in done.stderr and "Traceback" not in done.stderr
    done = _cli(
        "quantize",
        str(tiny_llama_dir),
        "--method",
        "rtn",
        "--act-order",
        "--output-dir",
        str(tmp_path / "q"),
    )
    assert done.returncode == 2 and "--act-order does not apply to --method rtn" in done.stderr
    assert not (tmp_path / "q").exists()


def test_gptq_shares_one_hessian_between_linears_reading_the_same_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """q/k/v (and gate/up) share a Hessian; the result equals accumulating one per linear."""
    from swiss_knife.compression.quantization import weight_only
    from swiss_knife.config import CalibrationSettings, GPTQConfig

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (4, 16))
    config = GPTQConfig(bits=4, group_size=None, calibration=CalibrationSettings(batch_size=2))
    shared_model = make_tiny_llama()
    separate_model = make_tiny_llama()
    separate_model.load_state_dict(shared_model.state_dict())
    updates: list[int] = []
    original_update = weight_only.HessianObserver.update

    def counting(self: Any, inp: torch.Tensor) -> None:
        updates.append(inp.shape[0])
        original_update(self, inp)

    monkeypatch.setattr(weight_only.HessianObserver, "update", counting)
    quantize(shared_model, config, calibration=ids)
    shared_updates = len(updates)
    updates.clear()
    monkeypatch.setattr(weight_only, "_same_tensor", lambda a, b: False)
    quantize(separate_model, config, calibration=ids)
    # Per block and batch: 4 Hessians (qkv, o, gate/up, down) instead of 7.
    assert shared_updates * 7 == len(updates) * 4
    for (name, a), (_, b) in zip(
        shared_model.state_dict().items(), separate_model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_gptq_cli_toggles_override_the_defaults() -> None:
    """GPTQ's defaults are on (act order, static groups, clip search) and off (true sequential);
    --no-X / --X flip each one, and a flag not given keeps the default."""
    from swiss_knife import cli

    def config(*flags: str) -> GPTQConfig:
        args = cli.build_parser().parse_args(
            ["quantize", "model", "--method", "gptq", "--output-dir", "out", *flags]
        )
        built = cli._quant_config(args)
        assert isinstance(built, GPTQConfig)
        return built

    default = config()
    assert (default.act_order, default.static_groups, default.clip_search) == (True, True, True)
    assert default.true_sequential is False
    flipped = config("--no-act-order", "--no-clip-search", "--true-sequential")
    assert (flipped.act_order, flipped.clip_search, flipped.true_sequential) == (False, False, True)
    assert flipped.static_groups is True
    assert config("--no-static-groups", "--no-act-order").static_groups is False


def test_true_sequential_gptq_in_one_pass_equals_the_group_passes() -> None:
    """With the calibration set in one mini-batch, true-sequential GPTQ quantizes each linear
    just before it runs (one pass per block): the same model as the group passes."""
    from swiss_knife.config import CalibrationSettings, GPTQConfig

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (4, 16))
    one_pass, grouped = make_tiny_llama(), make_tiny_llama()
    grouped.load_state_dict(one_pass.state_dict())
    reports = []
    for model, batch_size in ((one_pass, 4), (grouped, 1)):
        config = GPTQConfig(
            bits=4,
            group_size=None,
            true_sequential=True,
            calibration=CalibrationSettings(num_samples=4, seq_len=16, batch_size=batch_size),
        )
        reports.append(quantize(model, config, calibration=ids).report)
    # One pass has no original block output to compare with; the group passes do.
    assert all(block["rel_error"] is None for block in reports[0]["blocks"])
    assert all(block["rel_error"] is not None for block in reports[1]["blocks"])
    for (name, a), (_, b) in zip(
        one_pass.state_dict().items(), grouped.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_gptq_factorises_each_shared_input_once(factorisations: list[int]) -> None:
    """In a Llama block q/k/v read one input and gate/up another: GPTQ factorises 4 inverse
    Hessians per block (qkv, o, gate/up, down), not 7."""
    calls = factorisations
    model = make_tiny_llama()
    quantize(model, GPTQConfig(bits=4, group_size=16), calibration=_calibration())
    assert len(calls) == 4 * model.config.num_hidden_layers
