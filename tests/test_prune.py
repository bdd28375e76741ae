"""The prune verb for magnitude, Wanda and SparseGPT: registry, conformance of every method in both
save formats, exact sparsity and N:M patterns on Llama, GPT-2 and OPT, global magnitude, OWL,
gradual pruning, the checks made before any work, and Wanda/SparseGPT beating magnitude on the
trained stories260K model (skipped when the offline assets are absent).

The conformance table runs each method through prune -> forward -> save -> reload -> the same
logits. Dense checkpoints reload with a plain ``AutoModelForCausalLM.from_pretrained``;
sparse-bitmask ones with ``swiss_knife.models.load_model``, because transformers 5.x with
compressed-tensors >= 0.15 cannot decompress them and so must not find them (pinned by a test
below, so the day it can, the test says so; tests/test_plain_reload.py covers every format).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import VOCAB, build, make_tiny_llama
from swiss_knife.compression.pruning import gradual, prune
from swiss_knife.compression.pruning.base import get_method, method_names, register_method
from swiss_knife.compression.pruning.masks import prune_count, satisfies_nm, sparsity_of
from swiss_knife.compression.pruning.sparse_format import SPARSE_WEIGHTS_NAME, load_sparse_bitmask
from swiss_knife.compression.pruning.unstructured import oriented
from swiss_knife.config import (
    CalibrationSettings,
    CompressionConfig,
    GradualSchedule,
    MagnitudePruneConfig,
    PruneConfig,
    SparseGPTPruneConfig,
    WandaPruneConfig,
    validate_dict,
)
from swiss_knife.errors import ConfigError, UnsupportedArchitectureError, UserInputError
from swiss_knife.evaluation.size import weight_files
from swiss_knife.models import load_model, save_model
from swiss_knife.targeting import resolve_targets

CAL = CalibrationSettings(num_samples=4, seq_len=32, batch_size=4)
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
CONFIGS = {
    "magnitude": MagnitudePruneConfig,
    "wanda": WandaPruneConfig,
    "sparsegpt": SparseGPTPruneConfig,
}

pytestmark = pytest.mark.usefixtures("single_thread")


def calibration(num: int = 4, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (num, length), generator=torch.Generator().manual_seed(seed))


def inputs() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


def config(method: str, **fields: Any) -> Any:
    return CONFIGS[method](calibration=CAL, **fields)


def pruned_linears(model: nn.Module) -> dict[str, nn.Module]:
    return resolve_targets(model)


# ----------------------------------------------------------------------------- registry


def test_registry_matches_the_recipe_configs_and_the_cli() -> None:
    from swiss_knife.cli import build_parser

    union = typing.get_args(PruneConfig)[0]
    in_configs = [
        name
        for cls in typing.get_args(union)
        for name in typing.get_args(cls.model_fields["method"].annotation)
    ]
    assert set(UNSTRUCTURED) <= set(method_names()) <= set(in_configs)
    prune_help = build_parser()._subparsers._group_actions[0].choices["prune"]  # type: ignore[union-attr]
    method_action = next(a for a in prune_help._actions if a.dest == "method")
    assert list(method_action.choices) == in_configs == method_names()
    for name in UNSTRUCTURED:
        info = get_method(name)
        assert info.config_class is CONFIGS[name]
        assert info.needs_calibration == (name != "magnitude")


def test_registry_refuses_duplicates_and_names_the_choices() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("wanda", WandaPruneConfig, needs_calibration=True)(lambda m, c, x: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(UserInputError, match=r"available: .*sparsegpt"):
        get_method("lottery-ticket")


def test_method_order_does_not_depend_on_what_was_imported_first() -> None:
    """Help and messages list methods in module file order, whichever module loaded first."""
    script = (
        "import importlib, sys\n"
        "for module in sys.argv[1:]: importlib.import_module(module)\n"
        "from swiss_knife import registry\n"
        "print([registry.names(kind) for kind in ('quantize', 'prune')])\n"
    )
    first = (
        "swiss_knife.compression.quantization.gptq",
        "swiss_knife.compression.pruning.unstructured",
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, *pre], capture_output=True, text=True, check=True
        )
        for pre in ((), first)
    ]
    assert runs[0].stdout == runs[1].stdout


# ----------------------------------------------------------------------------- conformance


CONFORMANCE = [
    (method, fields, fmt)
    for method in UNSTRUCTURED
    for fields in ({"sparsity": 0.5}, {"pattern": "2:4"})
    for fmt in ("dense", "sparse-bitmask")
]


@pytest.mark.parametrize(
    ("method", "fields", "fmt"),
    CONFORMANCE,
    ids=[f"{m}-{f.get('pattern', 'unstructured')}-{fmt}" for m, f, fmt in CONFORMANCE],
)
def test_conformance(
    method: str, fields: dict[str, Any], fmt: str, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    dense = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    outcome = prune(model, config(method, save_format=fmt, **fields), calibration=calibration())
    ids = inputs()
    with torch.no_grad():
        ours = outcome.model(ids).logits
        reference = dense(ids).logits
    assert torch.isfinite(ours).all()
    cosine = nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.8, f"pruned model drifted too far from the dense one ({cosine:.3f})"

    out = save_model(
        outcome.model, tmp_path / "pruned", tokenizer=tiny_tokenizer, writer=outcome.writer
    )
    if fmt == "dense":
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert outcome.format == "dense"
    else:
        reloaded = load_model(str(out), with_tokenizer=False).model
        assert outcome.format == "compressed-tensors/sparse-bitmask"
        assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        again = reloaded(ids).logits
    assert torch.equal(again, ours)
    # Embeddings and the head are never pruned.
    assert torch.equal(reloaded.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    assert torch.equal(reloaded.lm_head.weight, dense.lm_head.weight)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_sparse_bitmask_round_trip_on_conv1d_and_opt(model_type: str, tmp_path: Path) -> None:
    # GPT-2 stores its linears transposed (Conv1D); OPT has biases and a projection pair.
    model = build(model_type)
    outcome = prune(
        model,
        config("sparsegpt", pattern="2:4", save_format="sparse-bitmask"),
        calibration=calibration(length=16),
    )
    out = save_model(model, tmp_path / model_type, writer=outcome.writer)
    reloaded = load_model(str(out), with_tokenizer=False).model
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for name, module in pruned_linears(reloaded).items():
        assert satisfies_nm(oriented(module), 2, 4), name


def test_sparse_bitmask_is_smaller_and_loads_as_a_plain_model(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    sizes = {}
    models = {}
    for fmt in ("dense", "sparse-bitmask"):
        model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
        outcome = prune(model, MagnitudePruneConfig(sparsity=0.5, save_format=fmt))
        out = save_model(model, tmp_path / fmt, tokenizer=tiny_tokenizer, writer=outcome.writer)
        sizes[fmt] = sum(p.stat().st_size for p in weight_files(out))
        models[fmt] = out
    # Half the block weights are gone: values + one bit per weight instead of fp32 zeros.
    assert sizes["sparse-bitmask"] < 0.85 * sizes["dense"]
    direct = load_sparse_bitmask(models["sparse-bitmask"])
    dense = AutoModelForCausalLM.from_pretrained(models["dense"])
    for (name, a), (_, b) in zip(
        direct.state_dict().items(), dense.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # The reloaded model saves again as an ordinary dense checkpoint.
    direct.save_pretrained(tmp_path / "resaved")
    AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")


def test_plain_from_pretrained_cannot_decompress_sparse_bitmask_in_these_versions(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    """transformers 5.x ignores `sparsity_config` since compressed-tensors 0.15 dropped the
    sparse compressors: given the tensors as ``model.safetensors`` it initialises the compressed
    layers randomly and only warns. The checkpoint therefore keeps them in
    ``sparse-bitmask.safetensors`` so that a plain load fails instead; with the file renamed back,
    the random layers show (if that stops, plain loading works again and the docs can say so)."""
    pytest.importorskip("compressed_tensors")
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    outcome = prune(model, MagnitudePruneConfig(save_format="sparse-bitmask"))
    out = save_model(model, tmp_path / "sparse", tokenizer=tiny_tokenizer, writer=outcome.writer)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)
    (out / SPARSE_WEIGHTS_NAME).rename(out / "model.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(plain.state_dict()[name], model.state_dict()[name])
    # Our loader reads the layout under either name.
    reloaded = load_model(str(out), with_tokenizer=False).model
    assert torch.equal(reloaded.state_dict()[name], model.state_dict()[name])


# ----------------------------------------------------------------------------- exact sparsity


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", UNSTRUCTURED)
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_exact_sparsity_per_layer_and_overall(
    model_type: str, method: str, sparsity: float
) -> None:
    model = build(model_type)
    before = copy.deepcopy(model.state_dict())
    outcome = prune(model, config(method, sparsity=sparsity), calibration=calibration(length=16))
    targets = pruned_linears(model)
    for name, module in targets.items():
        W = oriented(module)
        expected = (
            prune_count(W.shape[1], sparsity) * W.shape[0]  # Wanda: the same count in every row
            if method == "wanda"
            else prune_count(W.numel(), sparsity)
        )
        assert W.numel() - int(torch.count_nonzero(W)) == expected, name
    report = outcome.report
    assert report["overall_sparsity"] == pytest.approx(sparsity, abs=1e-9)
    assert report["layers"] == len(targets) == len(report["per_layer"])
    assert all(row["sparsity"] == pytest.approx(sparsity) for row in report["per_layer"])
    # Nothing outside the targets changed; the non-zero count covers the whole model.
    for key, value in model.state_dict().items():
        if not any(key.startswith(name + ".") for name in targets):
            assert torch.equal(value, before[key]), key
    nonzero = sum(
        int(torch.count_nonzero(p)) for p in {id(p): p for p in model.parameters()}.values()
    )
    assert report["nonzero_params"] == nonzero
    assert "does not speed up dense kernels" in " ".join(outcome.steps)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", UNSTRUCTURED)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_on_every_pruned_matrix(model_type: str, method: str, pattern: str) -> None:
    model = build(model_type)
    n, m = (int(x) for x in pattern.split(":"))
    outcome = prune(model, config(method, pattern=pattern), calibration=calibration(length=16))
    for name, module in pruned_linears(model).items():
        W = oriented(module)  # (out, in): groups run along the inputs, also for GPT-2's Conv1D
        assert satisfies_nm(W, n, m), name
        assert sparsity_of(W) == pytest.approx(1 - n / m), name
    assert outcome.report["nm_pattern_ok"] is True
    assert outcome.report["overall_sparsity"] == pytest.approx(1 - n / m)


def test_global_magnitude_ranks_across_layers() -> None:
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.05)  # a quiet layer
    outcome = prune(model, MagnitudePruneConfig(sparsity=0.5, scope="global"))
    rows = {r["name"]: r for r in outcome.report["per_layer"]}
    total = sum(r["params"] for r in rows.values())
    assert outcome.report["pruned_params"] == prune_count(total, 0.5)
    assert rows["model.layers.1.mlp.down_proj"]["sparsity"] > 0.95
    assert min(r["sparsity"] for r in rows.values()) < 0.5


# ----------------------------------------------------------------------------- OWL


@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_owl_keeps_overall_sparsity_and_varies_within_lambda(method: str) -> None:
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    with torch.no_grad():
        # Outliers in one block's weights: OWL should prune that block less.
        model.model.layers[2].self_attn.q_proj.weight[:, :4].mul_(40.0)
    lam = 0.1
    outcome = prune(
        model,
        config(method, sparsity=0.6, allocation="owl", owl_lambda=lam),
        calibration=calibration(),
    )
    report = outcome.report
    rows = report["per_layer"]
    total = sum(r["params"] for r in rows)
    # Exact to within one row of the narrowest layer (Wanda prunes whole-row counts).
    assert report["overall_sparsity"] == pytest.approx(0.6, abs=64 / total)
    blocks = {int(k): v for k, v in report["owl"]["block_sparsity"].items()}
    assert max(blocks.values()) - min(blocks.values()) > lam  # really non-uniform
    for row in rows:
        assert abs(row["sparsity"] - 0.6) <= lam + 1 / 64, row["name"]
    assert blocks[2] == min(blocks.values())
    ratios = report["owl"]["outlier_ratios"]
    assert ratios["2"] == max(ratios.values())


# ----------------------------------------------------------------------------- gradual


def test_gradual_raises_sparsity_with_masks_fixed_during_finetuning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    real = gradual.finetune_masked
    seen: list[dict[str, Any]] = []

    def spy(model: nn.Module, masks: Any, tokens: torch.Tensor, **kwargs: Any) -> list[float]:
        before = [weight.detach().clone() for weight, _ in masks]
        losses = real(model, masks, tokens, **kwargs)
        after = [weight.detach().clone() for weight, _ in masks]
        seen.append({"masks": [m.clone() for _, m in masks], "before": before, "after": after})
        return losses

    monkeypatch.setattr("swiss_knife.compression.pruning.unstructured.finetune_masked", spy)
    schedule = GradualSchedule(steps=3, finetune_steps=3, seq_len=16, batch_size=2)
    tokens = torch.randint(3, VOCAB, (2000,), generator=torch.Generator().manual_seed(3))
    outcome = prune(
        model, MagnitudePruneConfig(sparsity=0.6, schedule=schedule), train_tokens=tokens
    )
    levels = [step["sparsity"] for step in outcome.report["gradual"]]
    assert levels == sorted(levels) and levels[-1] == 0.6 and len(seen) == 3
    assert outcome.report["overall_sparsity"] == pytest.approx(0.6, abs=1e-3)
    for index, step in enumerate(seen):
        for mask, before, after in zip(step["masks"], step["before"], step["after"], strict=True):
            # Pruned weights stay exactly zero through fine-tuning; kept ones train.
            assert (after[~mask] == 0).all() and (before[~mask] == 0).all()
            assert not torch.equal(after[mask], before[mask])
        if index:
            # Each step keeps what the previous one pruned pruned.
            for previous, current in zip(seen[index - 1]["masks"], step["masks"], strict=True):
                assert not (current & ~previous).any()
    sparsity = [1 - torch.cat([m.flatten() for m in s["masks"]]).float().mean() for s in seen]
    assert sparsity == sorted(sparsity)


def test_gradual_with_the_original_as_teacher_and_an_nm_pattern() -> None:
    model = make_tiny_llama(seed=0, hidden_size=64, intermediate_size=128)
    schedule = GradualSchedule(
        steps=2, finetune_steps=2, seq_len=16, batch_size=2, teacher="original"
    )
    tokens = torch.randint(3, VOCAB, (1000,), generator=torch.Generator().manual_seed(3))
    outcome = prune(
        model,
        config("wanda", pattern="2:4", schedule=schedule),
        calibration=calibration(),
        train_tokens=tokens,
    )
    assert outcome.report["nm_pattern_ok"] is True
    assert all(satisfies_nm(oriented(m), 2, 4) for m in pruned_linears(model).values())
    losses = [step["loss_first"] for step in outcome.report["gradual"]]
    # KL to the unpruned model: small and non-negative, unlike a language-model loss.
    assert all(0 <= loss < 1 for loss in losses)
    assert "KL to the unpruned model" in " ".join(outcome.steps)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"method": "wanda", "sparsity": 1.0}, "sparsity"),
        ({"method": "wanda", "sparsity": -0.1}, "sparsity"),
        ({"method": "magnitude", "pattern": "4:4"}, "0 < N < M"),
        ({"method": "magnitude", "pattern": "2-4"}, "N:M"),
        ({"method": "wanda", "pattern": "2:4", "allocation": "owl"}, "owl"),
        ({"method": "magnitude", "scope": "global", "allocation": "owl"}, "global"),
        ({"method": "sparsegpt", "damp": 0}, "damp"),
        ({"method": "sparsegpt", "refit_iterations": -1}, "refit_iterations"),
        ({"method": "wanda", "refit_iterations": 5}, "refit_iterations"),
    ],
)
def test_bad_configs_are_rejected(stage: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_dict(CompressionConfig, {"model": "m", "stages": [{"type": "prune", **stage}]})


def test_checks_before_any_work() -> None:
    model = make_tiny_llama(hidden_size=64, intermediate_size=96)
    before = copy.deepcopy(model.state_dict())
    for cfg in (WandaPruneConfig(), SparseGPTPruneConfig(), MagnitudePruneConfig(allocation="owl")):
        with pytest.raises(UserInputError, match="needs calibration data"):
            prune(model, cfg)
    with pytest.raises(UserInputError, match="LongTensor"):
        prune(model, WandaPruneConfig(), calibration=torch.zeros(2, 8))
    with pytest.raises(UserInputError, match="training text"):
        prune(model, MagnitudePruneConfig(schedule=GradualSchedule()))
    # Groups of 8 do not divide an MLP width of 100: refused, naming the layers.
    odd = make_tiny_llama(hidden_size=64, intermediate_size=100)
    with pytest.raises(UserInputError, match=r"100 inputs .*down_proj"):
        prune(odd, MagnitudePruneConfig(pattern="4:8"))
    with pytest.raises(UserInputError, match="takes a"):
        prune(model, _mislabelled())
    model.config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(UserInputError, match="quantized"):
        prune(model, MagnitudePruneConfig())
    del model.config.quantization_config
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _mislabelled() -> Any:
    # A magnitude config object claiming to be wanda: the registry checks the class too.
    cfg = MagnitudePruneConfig()
    object.__setattr__(cfg, "method", "wanda")
    return cfg


def test_unknown_architecture_is_refused() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="supported model types"):
        prune(model, MagnitudePruneConfig())


# ----------------------------------------------------------------------------- trained model


def block_outputs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every transformer block's output hidden states on `ids`, (batch, seq, hidden) each."""
    from swiss_knife.arch import get_blocks

    outputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(
            lambda mod, args, out: outputs.append(
                (out if isinstance(out, torch.Tensor) else out[0]).detach()
            )
        )
        for block in get_blocks(model)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.integration
def test_wanda_and_sparsegpt_beat_magnitude_and_the_refit_helps_on_stories260k(
    stories_dir: Path, assets_dir: Path
) -> None:
    """Layer-output error: each block's output on held-out text, relative to the dense model's
    (the error accumulated up to that layer), averaged over the blocks; and perplexity."""
    from swiss_knife.config import DataConfig
    from swiss_knife.data import load_token_stream, sample_calibration
    from swiss_knife.evaluation.perplexity import perplexity

    text = assets_dir / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    tokenizer = load_model(str(stories_dir)).tokenizer
    stream = load_token_stream(DataConfig(source=str(text), split_documents="paragraph"), tokenizer)
    cal = sample_calibration(stream[:100_000], 16, 256, seed=0)
    held_out = stream[200_000 : 200_000 + 256 * 8].view(8, 256)
    reference = block_outputs(load_model(str(stories_dir), with_tokenizer=False).model, held_out)

    errors, ppl = {}, {}
    # "paper": SparseGPT without our re-fit of the kept weights (refit_iterations 0).
    for method in (*UNSTRUCTURED, "paper"):
        for pattern in (None, "2:4"):
            model = load_model(str(stories_dir), with_tokenizer=False).model
            settings = CalibrationSettings(num_samples=16, seq_len=256)
            extra = {"refit_iterations": 0} if method == "paper" else {}
            factory = CONFIGS["sparsegpt" if method == "paper" else method]
            cfg = factory(calibration=settings, sparsity=0.5, pattern=pattern, **extra)
            outcome = prune(model, cfg, calibration=cal)
            if method == "sparsegpt":
                # Every layer's loss went down with the re-fit, and the report says by how much.
                refit = outcome.report["refit_loss_reduction"]
                assert 0.0 <= refit["min"] <= refit["mean"] <= refit["max"] < 1.0
                assert refit["mean"] > 0.05
                assert any("Re-fit of the kept weights" in step for step in outcome.steps)
            ours = block_outputs(model, held_out)
            per_block = [
                float((a - b).norm() / b.norm()) for a, b in zip(ours, reference, strict=True)
            ]
            errors[method, pattern] = sum(per_block) / len(per_block)
            ppl[method, pattern] = perplexity(model, held_out.flatten()).perplexity
    for pattern in (None, "2:4"):
        assert errors["wanda", pattern] < errors["magnitude", pattern], errors
        assert errors["sparsegpt", pattern] < errors["magnitude", pattern], errors
        assert ppl["wanda", pattern] < ppl["magnitude", pattern], ppl
        assert ppl["sparsegpt", pattern] < ppl["magnitude", pattern], ppl
        # The re-fit lowers the accumulated output error and the perplexity.
        assert errors["sparsegpt", pattern] < errors["paper", pattern], errors
        assert ppl["sparsegpt", pattern] < ppl["paper", pattern], ppl


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bf16_calibration_passes_prune_the_same_share_nearly_the_same_weights(
    method: str,
) -> None:
    """precision bf16: exact sparsity, fp32 weights, and masks that differ from the fp32 walk's
    only where bf16 rounding of the activations reorders near-equal scores."""
    model = build("llama")
    reference = copy.deepcopy(model)
    prune(reference, config(method, sparsity=0.5), calibration=calibration(length=16))
    settings = {**CAL.model_dump(), "precision": "bf16"}
    cfg = CONFIGS[method](calibration=settings, sparsity=0.5)
    outcome = prune(model, cfg, calibration=calibration(length=16))
    assert outcome.report["calibration_precision"] == "bf16-autocast"
    assert outcome.report["overall_sparsity"] == pytest.approx(0.5, abs=1e-9)
    expected = pruned_linears(reference)
    agree = total = 0
    for name, module in pruned_linears(model).items():
        assert module.weight.dtype == torch.float32
        kept, kept_ref = oriented(module) != 0, oriented(expected[name]) != 0
        agree += int((kept == kept_ref).sum())
        total += kept.numel()
    assert agree / total > 0.9


def test_sparsegpt_calibration_precision_defaults_to_auto_unless_given() -> None:
    assert SparseGPTPruneConfig().calibration.precision == "auto"
    assert SparseGPTPruneConfig(calibration={"num_samples": 4}).calibration.precision == "auto"
    pinned = SparseGPTPruneConfig(calibration={"precision": "fp32"})
    assert pinned.calibration.precision == "fp32"
    # A saved config reloads to the same precision; the other methods keep fp32.
    again = SparseGPTPruneConfig.model_validate(pinned.model_dump())
    assert again.calibration.precision == "fp32"
    assert WandaPruneConfig().calibration.precision == "fp32"


def test_sparsegpt_factorises_each_shared_input_once(
    factorisations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """q/k/v share one inverse-Hessian factor and gate/up another (4 per Llama block, not 7),
    and the pruned weights are exactly those of a factorisation per linear."""
    from swiss_knife.compression.pruning import sparsegpt, unstructured

    shared = make_tiny_llama()
    separate = copy.deepcopy(shared)
    config = SparseGPTPruneConfig(sparsity=0.5, calibration=CalibrationSettings(seq_len=32))
    prune(shared, config, calibration=calibration())
    assert len(factorisations) == 4 * shared.config.num_hidden_layers

    def uncached(*args: Any, **kwargs: Any) -> Any:
        return sparsegpt.sparsegpt_prune(*args, **{**kwargs, "factors": None})

    monkeypatch.setattr(unstructured, "sparsegpt_prune", uncached)
    factorisations.clear()
    prune(separate, config, calibration=calibration())
    assert len(factorisations) == 7 * shared.config.num_hidden_layers
    for (name, a), (_, b) in zip(
        shared.state_dict().items(), separate.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
