"""The `swiss-knife` command through its real entry point: help, exit codes, errors, outputs.

Every case runs `python -m swiss_knife.cli` in a subprocess, exactly as a user would, offline.
Cases that load a model (and so import torch and transformers) are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import assert_user_error, sk

SUBCOMMANDS = [
    "evaluate",
    "compare",
    "distill",
    "run",
    "create-configs",
    "validate",
    "device-info",
    "demo",
]

# Small evaluation settings for the tiny random model (max_position_embeddings 128).
SMALL_EVAL = [
    "--window",
    "32",
    "--max-windows",
    "2",
    "--prompt-len",
    "8",
    "--new-tokens",
    "4",
    "--repeats",
    "1",
    "--warmup",
    "0",
]


@pytest.fixture
def bf16_copy_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path / "tiny-llama-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- help and version


def test_top_level_help() -> None:
    result = sk("--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str) -> None:
    result = sk(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: swiss-knife {command}" in result.stdout
    assert "examples:" in result.stdout
    assert f"swiss-knife {command}" in result.stdout.split("examples:")[1]
    assert result.stderr == ""


def test_version() -> None:
    from swiss_knife import __version__

    result = sk("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"swiss-knife {__version__}"


# --------------------------------------------------------------------------- argparse usage errors


@pytest.mark.parametrize(
    "args",
    [
        [],  # no command
        ["frobnicate"],  # unknown command
        ["evaluate"],  # missing model
        ["compare", "a"],  # no compressed model
        ["compare", "a", "b"],  # --eval-data is required
        ["evaluate", "m", "--window", "big"],
        ["evaluate", "m", "--dtype", "int3"],
        ["evaluate", "m", "--device", "tpu"],
        ["evaluate", "m", "--speed-batch-sizes", "1,x"],
        ["evaluate", "m", "--split-documents", "chapter"],
        ["run", "recipe.yaml", "--bogus"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = sk(*args)
    # One line naming the problem and where the usage is, not argparse's whole usage block.
    line = assert_user_error(result)
    assert line.endswith("--help)"), line


# --------------------------------------------------------------------------- bad input: one line


def test_missing_model_path_and_quiet(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    loud = sk("evaluate", missing, "--no-speed")
    line = assert_user_error(loud, quiet=False)
    assert "not found" in line and "no-such-model" in line
    # Logs go to stderr before the error, which is the last thing said.
    assert "INFO swiss_knife: loading" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == line
    assert loud.stdout == ""
    # -q keeps only warnings and results: the error line is all of stderr.
    quiet = sk("evaluate", missing, "--no-speed", "-q")
    assert assert_user_error(quiet, quiet=True) == line


def test_a_file_that_is_not_a_model(eval_text: Path) -> None:
    line = assert_user_error(sk("evaluate", eval_text, "--no-speed", "-q"))
    assert "not a model" in line


@pytest.mark.slow
def test_missing_eval_data_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    line = assert_user_error(sk("evaluate", tiny_llama_dir, "--eval-data", missing, "-q"))
    assert "not found" in line
    assert "missing.txt" in line


@pytest.mark.slow
def test_empty_eval_data_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    line = assert_user_error(sk("evaluate", tiny_llama_dir, "--eval-data", empty, "-q"))
    assert "no text" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_requested_without_a_gpu(tiny_llama_dir: Path) -> None:
    line = assert_user_error(sk("evaluate", tiny_llama_dir, "--device", "cuda", "-q"))
    assert "cuda" in line.lower()


def test_validate_bad_recipe_lists_every_problem(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "model: some/model\n"
        "evaluation:\n  perplexity: {window: 1}\n"
        "stages:\n  - type: cast\n    dtyp: bf16\n  - type: prune_all\n",
        encoding="utf-8",
    )
    result = sk("validate", recipe)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:")
    assert "3 problem" in lines[0]
    assert sum(line.startswith("error:") for line in lines) == 1
    detail = "\n".join(lines[1:])
    assert "evaluation.perplexity.window" in detail
    assert "stages[0].dtyp" in detail and "'dtype'" in detail
    assert "stages[1]" in detail and "prune_all" in detail
    assert result.stdout == ""


def test_validate_unparsable_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: [unclosed\n", encoding="utf-8")
    line = assert_user_error(sk("validate", recipe, "-q"))
    assert "not valid YAML: line 2" in line


def test_validate_missing_recipe_file(tmp_path: Path) -> None:
    line = assert_user_error(sk("validate", tmp_path / "nope.yaml", "-q"))
    assert "not found" in line


def test_validate_without_recipe_or_schema() -> None:
    line = assert_user_error(sk("validate", "-q"))
    assert "--schema" in line


def test_run_into_a_non_empty_directory_that_is_not_a_run(tmp_path: Path, eval_text: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(tmp_path / "model"),
                "data": {"eval": str(eval_text)},
                "stages": [{"type": "cast"}],
            }
        ),
        encoding="utf-8",
    )
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work", encoding="utf-8")
    for extra in ([], ["--overwrite"]):
        line = assert_user_error(sk("run", recipe, "--output-dir", target, "-q", *extra))
        assert "precious" in line
        assert "not empty" in line
    assert (target / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    assert sorted(p.name for p in target.iterdir()) == ["thesis.tex"]


# --------------------------------------------------------------------------- validate, schema, configs


def test_validate_schema_prints_json() -> None:
    result = sk("validate", "--schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "Swiss Knife recipe"
    assert "stages" in schema["properties"]
    assert "model" in schema["required"]


def test_create_configs_then_validate_each_sample(tmp_path: Path) -> None:
    out = tmp_path / "configs"
    result = sk("create-configs", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    written = sorted(out.glob("*.yaml"))
    assert {p.name for p in written} >= {"cast.yaml", "evaluate.yaml", "pipeline.yaml"}
    assert sorted(result.stdout.split()) == sorted(str(p) for p in written)
    for sample in written:
        checked = sk("validate", sample)
        assert checked.returncode == 0, checked.stderr
        assert "valid" in checked.stdout
        as_json = sk("validate", sample, "--json")
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout)["valid"] is True
    pipeline = json.loads(sk("validate", out / "pipeline.yaml", "--json").stdout)
    assert pipeline["stages"] == ["quantize", "evaluate"]
    # A second time refuses to replace the files; --overwrite replaces them.
    assert_user_error(sk("create-configs", "--output-dir", out, "-q"))
    assert sk("create-configs", "--output-dir", out, "--overwrite").returncode == 0


def test_device_info_json() -> None:
    result = sk("device-info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["cpu"]["cores_logical"] >= 1
    assert info["default_device"] in ("cpu", "cuda", "mps")
    assert info["versions"]["torch"] and torch.__version__.startswith(info["versions"]["torch"])
    assert isinstance(info["cuda"], list)


# --------------------------------------------------------------------------- evaluate and compare


@pytest.mark.slow
def test_evaluate_json(tiny_llama_dir: Path, eval_text: Path) -> None:
    result = sk("evaluate", tiny_llama_dir, "--eval-data", eval_text, *SMALL_EVAL, "--json", "-q")
    assert result.returncode == 0, result.stderr
    # Quiet: no INFO logs and no library progress bars ("Loading weights") on stderr.
    assert "INFO" not in result.stderr
    assert "Loading weights" not in result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == "tiny-llama"
    assert report["eval_data"] == str(eval_text)
    metrics = report["metrics"]
    ppl = metrics["perplexity"]
    assert ppl["window"] == 32
    assert ppl["num_windows"] == 2
    assert ppl["tokens_scored"] == 2 * 31
    # A random model over a 128-token vocabulary: far from perfect, but finite.
    assert 1.0 < ppl["perplexity"] < 1000.0
    assert metrics["size"]["num_params"] > 0
    assert metrics["size"]["disk_bytes"] > 0
    assert 30 < metrics["size"]["bits_per_weight"] < 40  # fp32 weights plus headers
    batch = metrics["speed"]["batches"][0]
    assert batch["batch_size"] == 1
    assert batch["prompt_len"] == 8
    assert batch["new_tokens"] == 4
    assert batch["decode_tokens_per_s"] > 0
    assert metrics["dtype"] == "float32"
    assert "agreement" not in metrics  # no --reference


@pytest.mark.slow
def test_compare_writes_reports(
    tiny_llama_dir: Path, bf16_copy_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    report_dir = tmp_path / "reports"
    result = sk(
        "compare",
        tiny_llama_dir,
        bf16_copy_dir,
        "--eval-data",
        eval_text,
        *SMALL_EVAL,
        "--report-dir",
        report_dir,
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert "tiny-llama-bf16" in result.stdout
    for name in ("report.json", "report.md", "report.html"):
        assert (report_dir / name).is_file(), name
        assert str(report_dir / name) in result.stdout
    data = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    original, compressed = data["rows"]
    assert original["name"] == "tiny-llama"
    assert compressed["name"] == "tiny-llama-bf16"
    assert original["dtype"] == "float32" and compressed["dtype"] == "bfloat16"
    # bf16 weights take half the bytes on disk.
    assert 1.8 < compressed["size_x"] < 2.1
    assert original["ppl_delta_pct"] == 0
    assert abs(compressed["ppl_delta_pct"]) < 1
    # Agreement is measured against the original, for the compressed model only.
    assert original["top1_agreement_pct"] is None
    assert 90 <= compressed["top1_agreement_pct"] <= 100
    assert 0 <= compressed["kl_mean"] < 1e-3
    markdown = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "| tiny-llama-bf16 |" in markdown
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert "<svg" in page
    assert "tiny-llama-bf16" in page


# --------------------------------------------------------------------------- failure handling in main()


def test_unexpected_failure_is_exit_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from swiss_knife import cli

    def boom(args: Any) -> int:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    assert cli.main(["validate", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: RuntimeError: disk on fire (run with -v for the traceback)"
    ]
    # -v shows the traceback.
    assert cli.main(["validate", "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_error_without_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from swiss_knife import cli
    from swiss_knife.errors import DataError

    def fail(args: Any) -> int:
        raise DataError()

    monkeypatch.setattr(cli, "cmd_validate", fail)
    assert cli.main(["validate", "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: DataError"]


def test_demo_recipes_are_valid_and_chain_reduce_distill_quantize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every demo variant is a valid recipe; distillation trains on calibration text only."""
    from swiss_knife import demo

    monkeypatch.setattr(demo, "dense_demo_model", lambda out: tmp_path / "model-fp32")
    monkeypatch.setattr(demo, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(demo, "python_docstring_text", lambda max_chars=0: "a. b. c.\n\n" * 50)
    for quick in (True, False):
        recipes, _notes = demo.demo_recipes(tmp_path, quick=quick)
        names = [name for name, _ in recipes]
        assert names[:2] == ["bf16", "gptq-w4-g32"]
        # The GPTQ variant ends in a GGUF file holding its own integers (Q4_0's grid).
        gptq = dict(recipes)["gptq-w4-g32"]
        assert [stage.type for stage in gptq.stages] == ["quantize", "export"]
        assert gptq.stages[0].grid == "gguf:q4_0" and gptq.stages[0].group_size == 32
        assert gptq.stages[1].tensor_type == "auto"
        assert "sparsegpt-2of4" in names and names[-1] == "reduce-distill-gptq"
        assert len(set(names)) == len(names)
        chain = dict(recipes)["reduce-distill-gptq"]
        assert [stage.type for stage in chain.stages] == ["reduce_layers", "distill", "quantize"]
        distill_stage: Any = chain.stages[1]
        calibration = chain.data.calibration
        assert distill_stage.train_data == calibration and calibration != chain.data.eval
        assert [recipe.evaluate_original for _, recipe in recipes].count(True) == 1
