"""`swiss-knife prune` and the `prune` recipe stage: a real command-line run, the one-line errors
(exit 2) raised before any work, and a recipe that prunes, saves, evaluates and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from swiss_knife import cli
from swiss_knife.compression.pruning.masks import satisfies_nm
from swiss_knife.config import CompressionConfig, validate_dict
from swiss_knife.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(
        "\n\n".join(f"Story {i}: a small fox saw {i % 5} birds by the river." for i in range(60)),
        encoding="utf-8",
    )
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_prune_writes_a_loadable_sparse_model(
    tiny_llama_dir: Path, text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "swiss_knife.cli",
            "prune",
            str(tiny_llama_dir),
            "--method",
            "sparsegpt",
            "--pattern",
            "2:4",
            "--calibration-data",
            str(text),
            "--num-samples",
            "4",
            "--seq-len",
            "32",
            "--calibration-precision",
            "bf16",
            "--refit-iterations",
            "3",
            "--save-format",
            "sparse-bitmask",
            "--output-dir",
            str(out),
            "--json",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "compressed-tensors/sparse-bitmask"
    assert summary["overall_sparsity"] == pytest.approx(0.5)
    # The card tells readers to load it with Swiss Knife: plain transformers cannot decompress it.
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "swiss_knife.load_model" in card and 'from_pretrained("path' not in card
    assert summary["worst_layers"] and "rel_error" in summary["worst_layers"][0]
    assert any("does not speed up dense kernels" in step for step in summary["steps"])
    manifest = json.loads((out / "swiss_knife.json").read_text())
    assert manifest["recipe"]["prune"]["pattern"] == "2:4"
    assert manifest["recipe"]["prune"]["calibration"]["precision"] == "bf16"
    assert manifest["recipe"]["prune"]["refit_iterations"] == 3
    assert any("3 conjugate-gradient steps" in step for step in summary["steps"])
    assert "from_pretrained" in (out / "README.md").read_text()
    model = load_model(str(out), with_tokenizer=False).model
    layer = model.model.layers[0].mlp.down_proj.weight
    assert satisfies_nm(layer, 2, 4)


def test_cli_prune_prints_the_worst_layers(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    code, out, _ = run_cli(
        capsys,
        "prune",
        tiny_llama_dir,
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--show-layers",
        "3",
        "--output-dir",
        tmp_path / "m",
        "-q",
    )
    assert code == 0
    assert "sparsity 50.00% of the pruned layers" in out
    assert "worst layers (relative weight error (data-free))" in out
    assert out.count("rel error") == 3
    assert "does not speed up dense kernels" in out
    assert load_model(str(tmp_path / "m"), with_tokenizer=False).model is not None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "wanda", "--sparsity", "1.0"], "sparsity"),
        (["--method", "magnitude", "--pattern", "4:4"], "0 < N < M"),
        (["--method", "wanda"], "method 'wanda' needs --calibration-data"),
        (["--method", "sparsegpt", "--pattern", "2:4"], "needs --calibration-data"),
        (["--method", "magnitude", "--allocation", "owl"], "allocation 'owl'"),
        (["--method", "magnitude", "--gradual-steps", "2"], "--train-data"),
        (["--method", "magnitude", "--finetune-steps", "5"], "add --gradual-steps"),
        (["--method", "magnitude", "--mlp-ratio", "0.5"], "--mlp-ratio does not apply"),
        (["--sparsity", "0.5"], "--method"),
    ],
)
def test_cli_errors_before_any_work(
    capsys: pytest.CaptureFixture[str],
    tiny_llama_dir: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "never"
    code, _, err = run_cli(capsys, "prune", tiny_llama_dir, *extra, "--output-dir", out, "-q")
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_unknown_architectures_and_quantized_checkpoints(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Only config.json is read: no weights are loaded for either refusal.
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run_cli(
        capsys, "prune", bert, "--method", "magnitude", "--output-dir", tmp_path / "o", "-q"
    )
    assert code == 2 and "'bert' is not supported" in err
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text(
        json.dumps(
            {"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}
        )
    )
    code, _, err = run_cli(
        capsys, "prune", quantized, "--method", "magnitude", "--output-dir", tmp_path / "o", "-q"
    )
    assert code == 2 and "quantized (compressed-tensors)" in err


def test_prune_help_lists_the_methods_and_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    choices = out.split("--method {", 1)[1].split("}", 1)[0].split(",")
    assert sorted(choices) == ["magnitude", "sparsegpt", "structured", "wanda"]
    assert "--pattern 2:4" in out and "examples:" in out


def test_prune_stage_in_a_recipe_saves_evaluates_and_resumes(
    tiny_llama_dir: Path, text: Path, tmp_path: Path
) -> None:
    from swiss_knife.pipeline import run_recipe

    recipe = validate_dict(
        CompressionConfig,
        {
            "model": str(tiny_llama_dir),
            "data": {"eval": str(text), "calibration": str(text)},
            "evaluation": {
                "perplexity": {"window": 32, "max_windows": 2},
                "speed": {"enabled": False},
                "agreement": {"window": 32, "max_windows": 2},
            },
            "stages": [
                {
                    "type": "prune",
                    "name": "wanda",
                    "method": "wanda",
                    "sparsity": 0.5,
                    "allocation": "owl",
                    "save_format": "sparse-bitmask",
                    "calibration": {"num_samples": 4, "seq_len": 32},
                    "schedule": {"steps": 2, "finetune_steps": 2, "batch_size": 2, "seq_len": 32},
                },
            ],
        },
    )
    first = run_recipe(recipe, tmp_path / "run", progress=False)
    stage_dir = tmp_path / "run" / "stages" / "wanda"
    config = json.loads((stage_dir / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    manifest = json.loads((stage_dir / "swiss_knife.json").read_text())
    report = manifest["stage_report"]
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["owl"]["block_sparsity"] and len(report["gradual"]) == 2
    assert first.reports[-1].metrics["size"] is not None
    second = run_recipe(recipe, tmp_path / "run", progress=False)
    assert "wanda" in second.resumed_stages
    # The resumed model was read back through the sparse-bitmask loader, not random weights.
    assert second.reports[-1].metrics["perplexity"] == first.reports[-1].metrics["perplexity"]


def test_gradual_stage_needs_calibration_text_to_train_on(
    tiny_llama_dir: Path, text: Path, tmp_path: Path
) -> None:
    from swiss_knife.errors import ConfigError
    from swiss_knife.pipeline import run_recipe

    recipe = validate_dict(
        CompressionConfig,
        {
            "model": str(tiny_llama_dir),
            "data": {"eval": str(text)},
            "evaluate_original": False,
            "evaluation": {"perplexity": {"enabled": False}, "speed": {"enabled": False}},
            "stages": [{"type": "prune", "method": "magnitude", "schedule": {"steps": 2}}],
        },
    )
    with pytest.raises(ConfigError, match=r"data\.calibration"):
        run_recipe(recipe, tmp_path / "run", progress=False)


def test_structured_flags_build_the_structured_config() -> None:
    # The structured method lives in its own module; the command line only builds its config.
    from swiss_knife.config import StructuredPruneConfig

    args = cli.build_parser().parse_args(
        [
            "prune",
            "model",
            "--method",
            "structured",
            "--mlp-ratio",
            "0.3",
            "--head-ratio",
            "0.25",
            "--hidden-ratio",
            "0.1",
            "--importance",
            "magnitude",
            "--round-to",
            "8",
            "--num-samples",
            "16",
            "--output-dir",
            "out",
        ]
    )
    config = cli._prune_config(args)
    assert isinstance(config, StructuredPruneConfig)
    assert (config.mlp_ratio, config.head_ratio, config.hidden_ratio) == (0.3, 0.25, 0.1)
    assert config.importance == "magnitude" and config.round_to == 8
    assert config.calibration.num_samples == 16
