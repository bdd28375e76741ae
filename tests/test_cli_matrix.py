"""Every registered method of every verb, run through the command line as a user runs it.

The rows are generated from the registries (quantization and pruning methods, layer-reduction
selections, distillation losses), so a method added later is covered without editing this file:
each runs once with human-readable output and once with `--json`, must exit 0, print what it
promises, and leave an output that loads and runs. A method that needs extra flags to run on a
tiny model gets them from `EXTRA`; one that needs calibration data gets it from the registry.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import save_tiny_llama
from swiss_knife.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_thread")

CALIBRATION = ["--num-samples", "4", "--seq-len", "32"]
# Flags a method needs on the three-block, 32-wide test model (defaults are sized for real models);
# every method with a group size also gets one that divides the model's widths.
EXTRA: dict[tuple[str, str], list[str]] = {
    ("quantize", "4bit"): ["--compute-dtype", "fp32"],
    ("prune", "structured"): ["--mlp-ratio", "0.5", "--importance", "magnitude"],
    ("reduce-layers", "importance"): ["--num-layers-to-remove", "1"],
    ("reduce-layers", "last"): ["--num-layers-to-remove", "1"],
    ("reduce-layers", "first"): ["--num-layers-to-remove", "1"],
    ("reduce-layers", "evenly"): ["--num-layers-to-remove", "1"],
}
EVAL = ["--window", "32", "--max-windows", "2", "--prompt-len", "8", "--new-tokens", "4"]
EVAL += ["--repeats", "3", "--warmup", "0", "--speed-batch-sizes", "1", "--split-documents"]
EVAL += ["paragraph"]


def _quantize_rows() -> list[tuple[str, bool]]:
    from swiss_knife.compression.quantization.base import get_method, method_names

    return [(name, get_method(name).needs_calibration) for name in method_names()]


def _prune_rows() -> list[tuple[str, bool]]:
    from swiss_knife.compression.pruning.base import get_method, method_names

    return [(name, get_method(name).needs_calibration) for name in method_names()]


def _config_fields(verb: str, method: str) -> set[str]:
    from swiss_knife import registry

    kind = verb.replace("-", "_")
    if kind == "reduce_layers":
        return set()
    return set(registry.get(kind, method).config_class.model_fields)


def _selection_rows() -> list[tuple[str, bool]]:
    from swiss_knife.config import LayerReductionConfig

    choices = typing.get_args(LayerReductionConfig.model_fields["selection"].annotation)
    return [(name, name == "importance") for name in choices]


def _distill_losses() -> list[str]:
    from swiss_knife.config import DistillLossConfig

    return list(typing.get_args(DistillLossConfig.model_fields["kd"].annotation))


ROWS: list[tuple[str, str, bool]] = [
    *(("quantize", name, needs) for name, needs in _quantize_rows()),
    *(("prune", name, needs) for name, needs in _prune_rows()),
    *(("reduce-layers", name, needs) for name, needs in _selection_rows()),
]
MODES = ["text", "json"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    model = save_tiny_llama(root / "tiny-llama", num_hidden_layers=3)
    text = root / "text.txt"
    paragraphs = [
        f"Story {i}: the quick brown fox jumps over {i % 7} lazy dogs, and the cat sat on a mat."
        for i in range(60)
    ]
    text.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return {"root": root, "model": model, "text": text}


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_loads(directory: Path) -> None:
    """The output loads with our loader and gives finite logits."""
    from swiss_knife.models import load_model

    loaded = load_model(str(directory))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape[-1] == 128 and torch.isfinite(logits.float()).all()


def method_flag(verb: str) -> str:
    return "--selection" if verb == "reduce-layers" else "--method"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("verb", "method", "needs_data"), ROWS, ids=[f"{v}-{m}" for v, m, _ in ROWS]
)
def test_every_method_in_every_output_mode(
    workspace: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    verb: str,
    method: str,
    needs_data: bool,
    mode: str,
) -> None:
    out = workspace["root"] / f"{verb}-{method}-{mode}"
    args: list[Any] = [verb, workspace["model"], method_flag(verb), method, "--output-dir", out]
    args += EXTRA.get((verb, method), [])
    if "group_size" in _config_fields(verb, method):
        args += ["--group-size", "16"]
    if needs_data:
        args += ["--calibration-data", workspace["text"], *CALIBRATION]
    if mode == "json":
        args.append("--json")
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    if mode == "json":
        summary = json.loads(stdout)
        assert Path(summary["output_dir"]) == out.resolve()
    else:
        assert f"saved to {out.resolve()}" in stdout
        assert not stdout.lstrip().startswith("{")
    check_loads(out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", _distill_losses())
def test_distill_every_loss_in_every_output_mode(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], loss: str, mode: str
) -> None:
    out = workspace["root"] / f"distill-{loss}-{mode}"
    args: list[Any] = ["distill", "--teacher", workspace["model"], "--student-from-teacher"]
    args += ["remove:1", "--train-data", workspace["text"], "--output-dir", out, "--loss", loss]
    args += ["--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2"]
    if mode == "json":
        args.append("--json")
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    if mode == "json":
        assert json.loads(stdout)
    else:
        assert str(out.resolve()) in stdout
    finals = [p.parent for p in out.rglob("swiss_knife.json")]
    assert finals, list(out.rglob("*"))
    for directory in finals:
        check_loads(directory)


@pytest.mark.parametrize("mode", MODES)
def test_evaluate_compare_and_run_in_every_output_mode(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    model, text, root = workspace["model"], workspace["text"], workspace["root"]
    flags = ["--json"] if mode == "json" else []
    code, stdout, stderr = run(capsys, "evaluate", model, "--eval-data", text, *EVAL, *flags)
    assert code == 0, stderr
    if mode == "json":
        assert "perplexity" in json.dumps(json.loads(stdout))
    else:
        assert "perplexity" in stdout.lower()

    reports = root / f"compare-{mode}"
    code, stdout, stderr = run(
        capsys, "compare", model, model, "--eval-data", text, *EVAL, "--report-dir", reports, *flags
    )
    assert code == 0, stderr
    assert (reports / "report.md").is_file() or list(reports.glob("*.md")), list(reports.iterdir())

    recipe = root / f"recipe-{mode}.yaml"
    recipe.write_text(
        "\n".join(
            [
                f"model: {model}",
                f"data: {{eval: {text}, calibration: {text}}}",
                "evaluation:",
                "  perplexity: {window: 32, max_windows: 2}",
                "  speed: {enabled: false}",
                "  agreement: {enabled: false}",
                "stages:",
                "  - {type: prune, method: magnitude, sparsity: 0.25}",
                "  - {type: quantize, method: rtn, bits: 4, group_size: 16}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    code, stdout, stderr = run(capsys, "run", recipe, "--output-dir", root / f"run-{mode}", *flags)
    assert code == 0, stderr
    if mode == "json":
        final = json.loads(stdout)["final_model"]
        assert final
        check_loads(Path(final))
    else:
        assert "final model:" in stdout
