"""Recipes through the Python API: stages, checkpoints, manifests, reports, resume, overwrite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import SMALL_EVALUATION
from swiss_knife.config import CompressionConfig, validate_dict
from swiss_knife.data import load_token_stream
from swiss_knife.errors import OutputExistsError, UserInputError
from swiss_knife.evaluation.perplexity import perplexity
from swiss_knife.models import cast_model
from swiss_knife.pipeline import PipelineResult, run_recipe

ALL_STAGES = ["original", "00-cast", "01-evaluate"]


def make_recipe(model_dir: Path, eval_text: Path | None, **changes: Any) -> CompressionConfig:
    data: dict[str, Any] = {
        "model": {"path": str(model_dir), "device": "cpu"},
        "data": {"eval": str(eval_text)} if eval_text is not None else {},
        "evaluation": SMALL_EVALUATION,
        "stages": [{"type": "cast", "dtype": "bf16"}, {"type": "evaluate"}],
    }
    data.update(changes)
    return validate_dict(CompressionConfig, data, "test recipe")


def run(recipe: CompressionConfig, out: Path, **kwargs: Any) -> PipelineResult:
    return run_recipe(recipe, out, progress=False, **kwargs)


def weights(directory: Path) -> Path:
    return directory / "stages" / "00-cast" / "model.safetensors"


def stored_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}  # noqa: SIM118


def logits_of(model: Any) -> torch.Tensor:
    input_ids = torch.arange(4, 36).remainder(128).unsqueeze(0)  # (1, 32)
    with torch.inference_mode():
        return model(input_ids=input_ids).logits  # (1, 32, vocab)


# --------------------------------------------------------------------------- one full run


def test_cast_then_evaluate(tiny_llama_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = run(make_recipe(tiny_llama_dir, eval_text), out)

    assert result.output_dir == out.resolve()
    assert [r.name for r in result.reports] == ALL_STAGES
    assert result.resumed_stages == []
    stage_dir = out.resolve() / "stages" / "00-cast"
    assert result.final_model_dir == stage_dir

    # The stage is an ordinary checkpoint: plain transformers loads it, in bf16, and it computes
    # exactly what casting the original in memory computes.
    reloaded = AutoModelForCausalLM.from_pretrained(stage_dir).eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert stored_dtypes(stage_dir / "model.safetensors") == {"BF16"}
    plain_cast = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval().to(torch.bfloat16)
    saved_state = reloaded.state_dict()
    for key, tensor in plain_cast.state_dict().items():
        if key in saved_state:  # every weight, bit for bit
            assert torch.equal(saved_state[key], tensor), key
    in_memory = cast_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), "bf16")
    expected = logits_of(in_memory)
    assert expected.dtype == torch.bfloat16
    torch.testing.assert_close(logits_of(reloaded), expected, rtol=0, atol=0)
    loaded_in_bf16 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    torch.testing.assert_close(logits_of(loaded_in_bf16.eval()), expected, rtol=0, atol=0)
    # A plain .to(bf16) also rounds RoPE's inv_freq, so it is only close.
    torch.testing.assert_close(logits_of(plain_cast), expected, rtol=0.05, atol=0.01)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert not torch.equal(logits_of(original).to(torch.bfloat16), expected)  # it did change
    # What the run measured is the model that was saved.
    tokens = load_token_stream(str(eval_text), AutoTokenizer.from_pretrained(stage_dir))
    measured = perplexity(reloaded, tokens[: 2 * 32], window=32)
    assert result.reports[1].metrics["perplexity"]["perplexity"] == measured.perplexity
    tokenizer = AutoTokenizer.from_pretrained(stage_dir)
    assert (
        tokenizer("cat")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_llama_dir)("cat")["input_ids"]
    )

    # The manifest says what was done, from what, with which library versions, and what it measured.
    manifest = json.loads((stage_dir / "swiss_knife.json").read_text(encoding="utf-8"))
    assert manifest["source_model"] == str(tiny_llama_dir)
    assert manifest["chain"]["model"]["path"] == str(tiny_llama_dir)
    assert manifest["chain"]["data"]["eval"]["source"] == str(eval_text)
    assert [s["type"] for s in manifest["chain"]["stages"]] == ["cast"]
    assert manifest["chain"]["stages"][0]["dtype"] == "bf16"
    assert manifest["stage"]["type"] == "cast"
    assert any("bf16" in step and "float32" in step for step in manifest["steps"])
    assert manifest["versions"]["torch"]
    assert manifest["versions"]["transformers"]
    assert manifest["metrics"]["perplexity"]["window"] == 32
    assert manifest["metrics"]["perplexity"]["num_windows"] == 2
    assert manifest["metrics"]["dtype"] == "bfloat16"
    assert 0.9 <= manifest["metrics"]["agreement"]["top1_agreement"] <= 1.0
    assert manifest["evaluation"]["name"] == "00-cast"

    # The model card has Hugging Face metadata with tags, the steps and the measured results.
    card = (stage_dir / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert {"swiss-knife", "compressed", "cast"} <= set(front["tags"])
    assert front["library_name"] == "transformers"
    assert "base_model" not in front  # a local path is not a hub id
    assert "## Measured results" in card
    assert "| original |" in card and "| 00-cast |" in card

    # Every evaluation is in the reports; the recipe and the evaluations are saved for resuming.
    assert set(result.report_paths) == {"json", "markdown", "html"}
    for path in result.report_paths.values():
        assert path.is_file() and path.parent == out.resolve()
    report = json.loads(result.report_paths["json"].read_text(encoding="utf-8"))
    assert [row["name"] for row in report["rows"]] == ALL_STAGES
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["original"]["top1_agreement_pct"] is None
    assert rows["00-cast"]["top1_agreement_pct"] >= 90
    assert 1.9 < rows["00-cast"]["size_x"] < 2.1
    # The explicit evaluate stage measures the same bf16 model, from its checkpoint on disk.
    assert rows["01-evaluate"]["perplexity"] == rows["00-cast"]["perplexity"]
    assert rows["01-evaluate"]["disk_mb"] == rows["00-cast"]["disk_mb"]
    assert "<svg" in result.report_paths["html"].read_text(encoding="utf-8")
    assert "| 00-cast |" in result.report_paths["markdown"].read_text(encoding="utf-8")
    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert validate_dict(CompressionConfig, saved) == make_recipe(tiny_llama_dir, eval_text)
    assert (out / "evaluations" / "original.json").is_file()
    assert (out / "evaluations" / "01-evaluate.json").is_file()
    assert not list(out.rglob("*.partial-*"))  # no leftovers of the atomic save


# --------------------------------------------------------------------------- resume and overwrite


def test_second_run_resumes(tiny_llama_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = make_recipe(tiny_llama_dir, eval_text)
    first = run(recipe, out)
    stamp = weights(out).stat().st_mtime_ns

    second = run(recipe, out)
    assert second.resumed_stages == ALL_STAGES
    assert weights(out).stat().st_mtime_ns == stamp
    assert [r.to_dict() for r in second.reports] == [r.to_dict() for r in first.reports]
    assert second.final_model_dir == first.final_model_dir


def test_changing_the_cast_dtype_reruns_the_stage(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run(make_recipe(tiny_llama_dir, eval_text), out)
    assert stored_dtypes(weights(out)) == {"BF16"}

    changed = make_recipe(
        tiny_llama_dir, eval_text, stages=[{"type": "cast", "dtype": "fp16"}, {"type": "evaluate"}]
    )
    result = run(changed, out)
    # The baseline does not depend on the stages; everything after the change is redone.
    assert result.resumed_stages == ["original"]
    assert stored_dtypes(weights(out)) == {"F16"}
    manifest = json.loads((weights(out).parent / "swiss_knife.json").read_text(encoding="utf-8"))
    assert manifest["stage"]["dtype"] == "fp16"
    assert [r.metrics["dtype"] for r in result.reports] == ["float32", "float16", "float16"]
    # Changed back: bf16 again, not a stale fp16 checkpoint.
    back = run(make_recipe(tiny_llama_dir, eval_text), out)
    assert back.resumed_stages == ["original"]
    assert stored_dtypes(weights(out)) == {"BF16"}


def test_changing_the_evaluation_reevaluates_but_keeps_the_model(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run(make_recipe(tiny_llama_dir, eval_text), out)
    stamp = weights(out).stat().st_mtime_ns

    evaluation = {**SMALL_EVALUATION, "perplexity": {"window": 16, "max_windows": 3}}
    result = run(make_recipe(tiny_llama_dir, eval_text, evaluation=evaluation), out)
    # The compressed model is reused, but no stale measurement is.
    assert weights(out).stat().st_mtime_ns == stamp
    assert "00-cast" in result.resumed_stages
    assert "original" not in result.resumed_stages
    assert "01-evaluate" not in result.resumed_stages
    for report in result.reports:
        assert report.metrics["perplexity"]["window"] == 16, report.name
        assert report.metrics["perplexity"]["num_windows"] == 3, report.name
    manifest = json.loads((weights(out).parent / "swiss_knife.json").read_text(encoding="utf-8"))
    assert manifest["metrics"]["perplexity"]["window"] == 16


def test_overwrite_starts_again(tiny_llama_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = make_recipe(tiny_llama_dir, eval_text)
    run(recipe, out)
    (out / "stray.txt").write_text("left from before", encoding="utf-8")

    result = run(recipe, out, overwrite=True)
    assert result.resumed_stages == []
    assert not (out / "stray.txt").exists()  # the old run was deleted first
    assert stored_dtypes(weights(out)) == {"BF16"}
    assert [r.name for r in result.reports] == ALL_STAGES


def test_existing_run_without_resume_is_refused(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    recipe = make_recipe(tiny_llama_dir, eval_text)
    run(recipe, out)
    stamp = weights(out).stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(recipe, out, resume=False)
    assert weights(out).stat().st_mtime_ns == stamp


def test_a_run_of_another_model_is_not_resumed(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run(make_recipe(tiny_llama_dir, eval_text), out)
    other = make_recipe(
        tiny_llama_dir, eval_text, model={"path": str(tiny_llama_dir), "dtype": "bf16"}
    )
    with pytest.raises(OutputExistsError, match="another model"):
        run(other, out)


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    recipe = make_recipe(tiny_llama_dir, eval_text)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="no Swiss Knife run"):
            run(recipe, out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_output_inside_the_input_model_is_refused(tiny_llama_dir: Path, eval_text: Path) -> None:
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    with pytest.raises(OutputExistsError, match="over the input"):
        run(make_recipe(tiny_llama_dir, eval_text), tiny_llama_dir / "out")
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before


def test_runs_are_reproducible(tiny_llama_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    recipe = make_recipe(tiny_llama_dir, eval_text)
    a = run(recipe, tmp_path / "a")
    b = run(recipe, tmp_path / "b")
    assert weights(tmp_path / "a").read_bytes() == weights(tmp_path / "b").read_bytes()
    for left, right in zip(a.reports, b.reports, strict=True):
        assert left.metrics["perplexity"] == right.metrics["perplexity"]
        assert left.metrics.get("agreement") == right.metrics.get("agreement")


# --------------------------------------------------------------------------- registry and options


CALIBRATION = {"num_samples": 4, "seq_len": 32}


@pytest.mark.parametrize(
    ("verb", "flags", "stage"),
    [
        ("quantize", ["--method", "rtn", "--bits", "4", "--group-size", "32"],
         {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}),
        ("prune", ["--method", "wanda", "--sparsity", "0.5"],
         {"type": "prune", "method": "wanda", "sparsity": 0.5, "calibration": CALIBRATION}),
        ("reduce-layers", ["--num-layers-to-remove", "1", "--keep-first", "0"],
         {"type": "reduce_layers", "num_layers_to_remove": 1, "keep_first": 0,
          "calibration": CALIBRATION}),
    ],
)  # fmt: skip
def test_a_verb_and_its_recipe_stage_write_the_same_weights(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path, verb: str, flags: list[str],
    stage: dict[str, Any],
) -> None:  # fmt: skip
    """The command-line verbs and the recipe runner share one stage runner: the same config and
    text give byte-identical tensors either way (calibrated methods included)."""
    from safetensors.torch import load_file

    from swiss_knife.cli import main

    calibration = ["--calibration-data", str(eval_text), "--num-samples", "4", "--seq-len", "32"]
    direct = tmp_path / "direct"
    code = main(
        [verb, str(tiny_llama_dir), *flags, *calibration, "--output-dir", str(direct), "-q"]
    )
    assert code == 0
    recipe = make_recipe(
        tiny_llama_dir,
        eval_text,
        data={"eval": str(eval_text), "calibration": str(eval_text)},
        evaluate_original=False,
        stages=[{**stage, "evaluate": False},
                {"type": "evaluate"}],
    )  # fmt: skip
    run(recipe, tmp_path / "run")
    stage_dir = next((tmp_path / "run" / "stages").iterdir())
    # The verb streams its output block by block (one shard per block), the recipe does not.
    ours = {
        k: v for f in sorted(direct.glob("*.safetensors")) for k, v in load_file(str(f)).items()
    }
    theirs = load_file(str(next(stage_dir.glob("*.safetensors"))))
    assert (direct / "model.safetensors.index.json").is_file()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_without_evaluating_the_original(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = run(
        make_recipe(tiny_llama_dir, eval_text, evaluate_original=False, stages=[{"type": "cast"}]),
        out,
    )
    assert [r.name for r in result.reports] == ["00-cast"]
    assert not (out / "evaluations" / "original.json").exists()
    # Agreement still compares with the original model, held in memory.
    assert result.reports[0].metrics["agreement"]["top1_agreement"] >= 0.9
    report = json.loads(result.report_paths["json"].read_text(encoding="utf-8"))
    assert [row["name"] for row in report["rows"]] == ["00-cast"]
    # The card does not compare the model with itself.
    card = (out / "stages" / "00-cast" / "README.md").read_text(encoding="utf-8")
    assert card.count("| 00-cast |") == 1
    assert "| original |" not in card


def test_stage_without_evaluation(tiny_llama_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = make_recipe(tiny_llama_dir, eval_text, stages=[{"type": "cast", "evaluate": False}])
    result = run(recipe, out)
    assert [r.name for r in result.reports] == ["original"]
    assert stored_dtypes(weights(out)) == {"BF16"}
    manifest = json.loads((weights(out).parent / "swiss_knife.json").read_text(encoding="utf-8"))
    assert manifest["metrics"] == {}
    assert "evaluation" not in manifest
    card = (weights(out).parent / "README.md").read_text(encoding="utf-8")
    assert "## Measured results" not in card  # nothing measured about this model
    assert "cast weights from float32 to bf16" in card
    assert run(recipe, out).resumed_stages == ["original", "00-cast"]


def test_perplexity_without_eval_data_is_a_clear_error(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match=r"data\.eval") as caught:
        run(make_recipe(tiny_llama_dir, None), out)
    assert "perplexity" in str(caught.value)
    assert not out.exists()  # refused before writing anything


def test_without_eval_data_and_perplexity_off(tiny_llama_dir: Path, tmp_path: Path) -> None:
    evaluation = {**SMALL_EVALUATION, "perplexity": {"enabled": False}}
    result = run(make_recipe(tiny_llama_dir, None, evaluation=evaluation), tmp_path / "run")
    assert [r.name for r in result.reports] == ALL_STAGES
    for report in result.reports:
        assert "perplexity" not in report.metrics
        assert "agreement" not in report.metrics  # needs text too; skipped, not an error
        assert report.metrics["speed"]["batches"][0]["new_tokens"] == 4


# --------------------------------------------------------------------------- evaluate()


def test_max_windows_counts_windows_of_the_clamped_length(tiny_llama_dir: Path) -> None:
    """A window longer than the model's context is clamped; max_windows still means windows."""
    from transformers import AutoModelForCausalLM

    from swiss_knife.config import EvaluationConfig
    from swiss_knife.evaluation import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()  # 128 positions
    config = validate_dict(
        EvaluationConfig,
        {"perplexity": {"window": 1024, "max_windows": 2}, "speed": {"enabled": False}},
    )
    tokens = torch.randint(0, 128, (5000,), generator=torch.Generator().manual_seed(0))
    report = evaluate(model, None, config, tokens=tokens)
    ppl = report.metrics["perplexity"]
    assert ppl["window"] == 128
    assert ppl["num_windows"] == 2
    assert ppl["tokens_scored"] == 2 * 127
