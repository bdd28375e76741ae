"""The `distill` command and the `distill` recipe stage, end to end on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import corpus, sk
from swiss_knife.cli import main as cli_main
from swiss_knife.config import CompressionConfig, validate_dict
from swiss_knife.errors import ConfigError
from swiss_knife.pipeline import run_recipe
from swiss_knife.samples import sample_text

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one thread

FAST = ["--seq-len", "32", "--batch-size", "4", "--eval-windows", "4", "--log-every", "1"]


@pytest.fixture
def train_text(tmp_path: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(corpus(200), encoding="utf-8")
    return path


def test_help_shows_examples() -> None:
    result = sk("distill", "--help")
    assert result.returncode == 0
    assert "--student-from-teacher" in result.stdout and "examples:" in result.stdout
    assert "accelerate launch" in result.stdout


def main(*args: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The command line in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_trains_resumes_and_refuses_bad_input(
    tiny_llama_dir: Path,
    train_text: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocess, like this one, on one thread
    out = tmp_path / "out"
    args = [
        "distill",
        "--teacher",
        tiny_llama_dir,
        "--student-from-teacher",
        "remove:1",
        "--train-data",
        train_text,
        "--output-dir",
        out,
        "--device",
        "cpu",
        *FAST,
    ]
    run = [*args, "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--json"]
    # Once through the installed entry point, exactly as a user runs it...
    done = sk(*run)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 4 and summary["kept_blocks"] == [1]
    assert summary["tokens"] == 4 * 4 * 32
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert student.config.num_hidden_layers == 1

    # ...then in this process. Resuming with other settings is refused before any training.
    code, stdout, stderr = main(
        *args, "--max-steps", "4", "--learning-rate", "1", "--resume", "-q", capsys=capsys
    )
    assert code == 2 and stderr.count("error:") == 1, stderr
    assert "another run (settings differ)" in stderr and "Traceback" not in stderr
    # The same settings resume: nothing left to do, the final student is unchanged.
    code, stdout, stderr = main(*run, "--resume", capsys=capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["resumed_from"].endswith("step-00000004")
    reloaded = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    for key, value in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    for bad, message in (
        (["--train-data", empty, "--student-from-teacher", "remove:1"], "holds no text"),
        (["--train-data", train_text, "--student-from-teacher", "cut:3"], "remove:N"),
        (["--train-data", train_text], "--student MODEL or --student-from-teacher"),
        (
            ["--train-data", train_text, "--student-from-teacher", "remove:1", "--max-steps", "0"],
            "--max-steps 0",
        ),
    ):
        code, _, stderr = main(
            "distill",
            "--teacher",
            tiny_llama_dir,
            *bad,
            "--output-dir",
            tmp_path / "bad",
            "-q",
            capsys=capsys,
        )
        assert code == 2 and message in stderr, (bad, stderr)
        assert not (tmp_path / "bad").exists()


SMALL_EVALUATION: dict[str, Any] = {
    "perplexity": {"window": 32, "max_windows": 2},
    "speed": {"enabled": False},
    "agreement": {"window": 32, "max_windows": 2},
}


def test_recipe_reduces_distils_quantizes_and_resumes(
    tiny_llama_dir: Path, train_text: Path, tmp_path: Path
) -> None:
    # The shipped sample's stages, shrunk to the tiny model.
    sample = yaml.safe_load(sample_text("distill.yaml"))
    types = [s["type"] for s in sample["stages"]]
    assert types == ["reduce_layers", "distill", "quantize", "evaluate"]
    # The tiny model has two blocks: drop the first by position (no block is protected).
    reduce_stage = {
        **sample["stages"][0],
        "num_layers_to_remove": 1,
        "selection": "first",
        "keep_first": 0,
        "calibration": {"num_samples": 4, "seq_len": 32},
    }
    distill_stage = {
        **sample["stages"][1],
        "train_data": str(train_text),
        "max_steps": 6,
        "warmup_steps": 1,
        "batch_size": 4,
        "grad_accum": 1,
        "seq_len": 32,
        "mixed_precision": "no",
        "eval_every": 3,
        "eval_windows": 4,
        "save_every": 3,
    }
    assert distill_stage["student"] == "current"
    quantize_stage = {
        **sample["stages"][2],
        "group_size": 16,
        "calibration": {"num_samples": 4, "seq_len": 32},
    }
    recipe = validate_dict(
        CompressionConfig,
        {
            "model": {"path": str(tiny_llama_dir), "device": "cpu"},
            "data": {"eval": str(train_text), "calibration": str(train_text)},
            "evaluation": SMALL_EVALUATION,
            "stages": [reduce_stage, distill_stage, quantize_stage, {"type": "evaluate"}],
        },
        "test recipe",
    )
    out = tmp_path / "run"
    result = run_recipe(recipe, out, progress=False)
    assert [r.name for r in result.reports] == [
        "original",
        "reduce",
        "distill",
        "gptq-w4",
        "03-evaluate",
    ]
    stage_dir = out / "stages" / "distill"
    manifest = json.loads((stage_dir / "swiss_knife.json").read_text(encoding="utf-8"))
    assert manifest["stage_report"]["steps"] == 6
    assert any("distilled from the original model" in step for step in manifest["steps"])
    assert json.loads((stage_dir / "config.json").read_text())["num_hidden_layers"] == 1
    assert (out / "distill" / "distill" / "metrics.jsonl").is_file()
    assert result.reports[2].metrics["perplexity"]["perplexity"] > 1

    again = run_recipe(recipe, out, progress=False)
    assert {"reduce", "distill", "gptq-w4"} <= set(again.resumed_stages)

    both_current = {**distill_stage, "teacher": "current", "student_from_teacher": None}
    stages = validate_dict(CompressionConfig, {"model": "m", "stages": [both_current]}, "x").stages
    clash = recipe.model_copy(update={"stages": stages, "evaluate_original": False})
    with pytest.raises(ConfigError, match="both the model entering"):
        run_recipe(clash, tmp_path / "clash", progress=False)
