"""A table of bad inputs across every verb: each must exit 2 with one `error:` line.

Every case runs the real command line (in this process, to keep the table fast) against one
shared workspace, and checks what a user relies on: exit code 2, exactly one line on stderr that
starts with `error:` and no traceback, and nothing written, changed or deleted anywhere in the
workspace (the input model, the data, a folder of someone else's files, the output path).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import save_tiny_llama
from swiss_knife.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_thread")

CAL = ["--num-samples", "4", "--seq-len", "32"]
EVAL = ["--window", "32", "--max-windows", "2", "--repeats", "3", "--warmup", "0"]
EVAL += ["--prompt-len", "8", "--new-tokens", "4"]

# (id, arguments). Names in braces are paths in the workspace; {out} never exists beforehand.
CASES: list[tuple[str, list[str]]] = [
    # --- no command, unknown command
    ("no-command", []),
    ("unknown-command", ["squash", "{model}"]),
    # --- quantize: the model
    (
        "quantize-missing-model",
        ["quantize", "{missing}", "--method", "bf16", "--output-dir", "{out}"],
    ),
    (
        "quantize-model-is-a-file",
        ["quantize", "{afile}", "--method", "bf16", "--output-dir", "{out}"],
    ),
    (
        "quantize-folder-without-config",
        ["quantize", "{noconfig}", "--method", "bf16", "--output-dir", "{out}"],
    ),
    (
        "quantize-broken-config-json",
        ["quantize", "{brokenconfig}", "--method", "bf16", "--output-dir", "{out}"],
    ),
    (
        "quantize-config-without-weights",
        ["quantize", "{noweights}", "--method", "bf16", "--output-dir", "{out}"],
    ),
    (
        "quantize-missing-gguf-file",
        [
            "quantize",
            "{model}",
            "--gguf-file",
            "nope.gguf",
            "--method",
            "bf16",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "quantize-no-cuda",
        ["quantize", "{model}", "--device", "cuda", "--method", "bf16", "--output-dir", "{out}"],
    ),
    # --- quantize: method and values
    (
        "quantize-unknown-method",
        ["quantize", "{model}", "--method", "int3", "--output-dir", "{out}"],
    ),
    ("quantize-no-method", ["quantize", "{model}", "--output-dir", "{out}"]),
    ("quantize-no-output-dir", ["quantize", "{model}", "--method", "bf16"]),
    (
        "quantize-bits-zero",
        ["quantize", "{model}", "--method", "rtn", "--bits", "0", "--output-dir", "{out}"],
    ),
    (
        "quantize-bits-nine",
        ["quantize", "{model}", "--method", "rtn", "--bits", "9", "--output-dir", "{out}"],
    ),
    (
        "quantize-bits-not-a-number",
        ["quantize", "{model}", "--method", "rtn", "--bits", "four", "--output-dir", "{out}"],
    ),
    (
        "quantize-negative-group",
        ["quantize", "{model}", "--method", "rtn", "--group-size", "-5", "--output-dir", "{out}"],
    ),
    (
        "quantize-group-does-not-fit",
        ["quantize", "{model}", "--method", "rtn", "--group-size", "24", "--output-dir", "{out}"],
    ),
    (
        "quantize-bad-bits-override",
        [
            "quantize",
            "{model}",
            "--method",
            "rtn",
            "--bits-override",
            "down_proj",
            "--group-size",
            "16",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "quantize-bad-target-regex",
        [
            "quantize",
            "{model}",
            "--method",
            "rtn",
            "--group-size",
            "16",
            "--targets",
            "re:[",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "quantize-target-matches-nothing",
        [
            "quantize",
            "{model}",
            "--method",
            "rtn",
            "--group-size",
            "16",
            "--targets",
            "re:nothing_here",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "quantize-negative-damp",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--damp",
            "-1",
            "--calibration-data",
            "{text}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "quantize-bad-smoothquant-alpha",
        [
            "quantize",
            "{model}",
            "--method",
            "static",
            "--smoothquant-alpha",
            "strong",
            "--calibration-data",
            "{text}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "quantize-bits-on-bf16",
        ["quantize", "{model}", "--method", "bf16", "--bits", "3", "--output-dir", "{out}"],
    ),
    (
        "quantize-bad-compute-dtype",
        [
            "quantize",
            "{model}",
            "--method",
            "4bit",
            "--compute-dtype",
            "fp8",
            "--output-dir",
            "{out}",
        ],
    ),
    # --- quantize: calibration data
    (
        "gptq-without-data",
        ["quantize", "{model}", "--method", "gptq", "--group-size", "16", "--output-dir", "{out}"],
    ),
    (
        "gptq-missing-data",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            "{missing}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "gptq-empty-data",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            "{empty}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "gptq-binary-data",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            "{binary}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "gptq-jsonl-without-field",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            "{jsonl}",
            "--field",
            "body",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "gptq-zero-samples",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            "{text}",
            "--num-samples",
            "0",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "gptq-seq-len-above-positions",
        [
            "quantize",
            "{model}",
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            "{text}",
            "--seq-len",
            "100000",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "awq-bad-precision",
        [
            "quantize",
            "{model}",
            "--method",
            "awq",
            "--calibration-precision",
            "fp8",
            "--calibration-data",
            "{text}",
            "--output-dir",
            "{out}",
        ],
    ),
    # --- quantize: the output path
    (
        "quantize-output-is-the-model",
        ["quantize", "{model}", "--method", "bf16", "--output-dir", "{model}"],
    ),
    (
        "quantize-output-inside-the-model",
        ["quantize", "{model}", "--method", "bf16", "--output-dir", "{model}/out"],
    ),
    (
        "quantize-output-is-a-file",
        ["quantize", "{model}", "--method", "bf16", "--output-dir", "{afile}"],
    ),
    (
        "quantize-output-under-a-file",
        ["quantize", "{model}", "--method", "bf16", "--output-dir", "{afile}/sub/out"],
    ),
    (
        "quantize-output-not-empty",
        ["quantize", "{model}", "--method", "bf16", "--output-dir", "{thesis}"],
    ),
    (
        "quantize-overwrite-foreign-folder",
        ["quantize", "{model}", "--method", "bf16", "--output-dir", "{thesis}", "--overwrite"],
    ),
    # --- quantize: --config files
    (
        "quantize-config-missing",
        ["quantize", "{model}", "--config", "{missing}", "--output-dir", "{out}"],
    ),
    (
        "quantize-config-bad-yaml",
        ["quantize", "{model}", "--config", "{badyaml}", "--output-dir", "{out}"],
    ),
    (
        "quantize-config-unknown-key",
        ["quantize", "{model}", "--config", "{quantconfig}", "--output-dir", "{out}"],
    ),
    (
        "quantize-config-python-tag",
        ["quantize", "{model}", "--config", "{pythontag}", "--output-dir", "{out}"],
    ),
    # --- prune
    (
        "prune-sparsity-above-one",
        ["prune", "{model}", "--method", "magnitude", "--sparsity", "1.5", "--output-dir", "{out}"],
    ),
    (
        "prune-negative-sparsity",
        [
            "prune",
            "{model}",
            "--method",
            "magnitude",
            "--sparsity",
            "-0.1",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-pattern-n-above-m",
        ["prune", "{model}", "--method", "magnitude", "--pattern", "5:4", "--output-dir", "{out}"],
    ),
    (
        "prune-pattern-not-n-m",
        ["prune", "{model}", "--method", "magnitude", "--pattern", "half", "--output-dir", "{out}"],
    ),
    (
        "prune-sparsity-contradicts-pattern",
        [
            "prune",
            "{model}",
            "--method",
            "magnitude",
            "--sparsity",
            "0.7",
            "--pattern",
            "2:4",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-wanda-without-data",
        ["prune", "{model}", "--method", "wanda", "--output-dir", "{out}"],
    ),
    (
        "prune-structured-with-sparsity",
        [
            "prune",
            "{model}",
            "--method",
            "structured",
            "--sparsity",
            "0.5",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-structured-ratio-above-one",
        [
            "prune",
            "{model}",
            "--method",
            "structured",
            "--mlp-ratio",
            "1.5",
            "--importance",
            "magnitude",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-unknown-save-format",
        [
            "prune",
            "{model}",
            "--method",
            "magnitude",
            "--save-format",
            "zip",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-zero-gradual-steps",
        [
            "prune",
            "{model}",
            "--method",
            "magnitude",
            "--gradual-steps",
            "0",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-refit-with-wanda",
        [
            "prune",
            "{model}",
            "--method",
            "wanda",
            "--refit-iterations",
            "3",
            "--calibration-data",
            "{text}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "prune-output-is-the-model",
        ["prune", "{model}", "--method", "magnitude", "--output-dir", "{model}"],
    ),
    (
        "prune-overwrite-foreign-folder",
        ["prune", "{model}", "--method", "magnitude", "--output-dir", "{thesis}", "--overwrite"],
    ),
    # --- reduce-layers
    (
        "reduce-all-layers",
        [
            "reduce-layers",
            "{model}",
            "--selection",
            "last",
            "--num-layers-to-remove",
            "3",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "reduce-more-than-all",
        [
            "reduce-layers",
            "{model}",
            "--selection",
            "last",
            "--num-layers-to-remove",
            "10",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "reduce-index-out-of-range",
        ["reduce-layers", "{model}", "--layers", "7", "--output-dir", "{out}"],
    ),
    (
        "reduce-same-block-twice",
        ["reduce-layers", "{model}", "--layers", "1,-2", "--output-dir", "{out}"],
    ),
    (
        "reduce-layers-not-numbers",
        ["reduce-layers", "{model}", "--layers", "one", "--output-dir", "{out}"],
    ),
    (
        "reduce-importance-without-data",
        ["reduce-layers", "{model}", "--num-layers-to-remove", "1", "--output-dir", "{out}"],
    ),
    (
        "reduce-remove-and-keep",
        [
            "reduce-layers",
            "{model}",
            "--selection",
            "last",
            "--num-layers-to-remove",
            "1",
            "--num-layers-to-keep",
            "2",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "reduce-overwrite-foreign-folder",
        [
            "reduce-layers",
            "{model}",
            "--selection",
            "last",
            "--num-layers-to-remove",
            "1",
            "--output-dir",
            "{thesis}",
            "--overwrite",
        ],
    ),
    # --- evaluate
    ("evaluate-missing-data", ["evaluate", "{model}", "--eval-data", "{missing}", *EVAL]),
    ("evaluate-empty-data", ["evaluate", "{model}", "--eval-data", "{empty}", *EVAL]),
    ("evaluate-three-tokens", ["evaluate", "{model}", "--eval-data", "{tinytext}", *EVAL]),
    ("evaluate-window-one", ["evaluate", "{model}", "--eval-data", "{text}", "--window", "1"]),
    (
        "evaluate-zero-batch-size",
        ["evaluate", "{model}", "--eval-data", "{text}", "--speed-batch-sizes", "0"],
    ),
    ("evaluate-missing-model", ["evaluate", "{missing}", "--eval-data", "{text}", *EVAL]),
    (
        "evaluate-missing-reference",
        ["evaluate", "{model}", "--eval-data", "{text}", "--reference", "{missing}", *EVAL],
    ),
    (
        "evaluate-output-inside-model",
        ["evaluate", "{model}", "--eval-data", "{text}", "--output", "{model}/reports", *EVAL],
    ),
    (
        "evaluate-output-under-a-file",
        ["evaluate", "{model}", "--eval-data", "{text}", "--output", "{afile}/reports", *EVAL],
    ),
    # --- compare
    ("compare-one-model", ["compare", "{model}", "--eval-data", "{text}", *EVAL]),
    ("compare-missing-model", ["compare", "{model}", "{missing}", "--eval-data", "{text}", *EVAL]),
    (
        "compare-report-inside-model",
        [
            "compare",
            "{model}",
            "{model}",
            "--eval-data",
            "{text}",
            "--report-dir",
            "{model}/reports",
            *EVAL,
        ],
    ),
    (
        "compare-report-dir-is-a-file",
        [
            "compare",
            "{model}",
            "{model}",
            "--eval-data",
            "{text}",
            "--report-dir",
            "{afile}",
            *EVAL,
        ],
    ),
    # --- run
    ("run-missing-recipe", ["run", "{missing}", "--output-dir", "{out}"]),
    ("run-bad-yaml", ["run", "{badyaml}", "--output-dir", "{out}"]),
    ("run-unknown-key", ["run", "{unknownkey}", "--output-dir", "{out}"]),
    ("run-python-tag", ["run", "{pythontag}", "--output-dir", "{out}"]),
    ("run-unknown-stage", ["run", "{unknownstage}", "--output-dir", "{out}"]),
    ("run-missing-model", ["run", "{recipemissingmodel}", "--output-dir", "{out}"]),
    (
        "run-overwrite-foreign-folder",
        ["run", "{recipe}", "--output-dir", "{thesis}", "--overwrite"],
    ),
    (
        "run-output-holds-the-recipe",
        ["run", "{recipe}", "--output-dir", "{recipes}", "--overwrite"],
    ),
    # --- distill
    (
        "distill-missing-train-data",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "remove:1",
            "--train-data",
            "{missing}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "distill-no-student",
        ["distill", "--teacher", "{model}", "--train-data", "{text}", "--output-dir", "{out}"],
    ),
    (
        "distill-bad-student-spec",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "shrink:lots",
            "--train-data",
            "{text}",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "distill-seq-len-above-positions",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "remove:1",
            "--train-data",
            "{text}",
            "--seq-len",
            "100000",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "distill-output-inside-teacher",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "remove:1",
            "--train-data",
            "{text}",
            "--output-dir",
            "{model}/student",
        ],
    ),
    (
        "distill-zero-steps",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "remove:1",
            "--train-data",
            "{text}",
            "--max-steps",
            "0",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "distill-negative-learning-rate",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "remove:1",
            "--train-data",
            "{text}",
            "--learning-rate",
            "-1",
            "--output-dir",
            "{out}",
        ],
    ),
    (
        "distill-foreign-folder",
        [
            "distill",
            "--teacher",
            "{model}",
            "--student-from-teacher",
            "remove:1",
            "--train-data",
            "{text}",
            "--output-dir",
            "{thesis}",
            "--overwrite",
        ],
    ),
    # --- create-configs and validate
    ("create-configs-into-a-file", ["create-configs", "--output-dir", "{afile}"]),
    ("create-configs-under-a-file", ["create-configs", "--output-dir", "{afile}/configs"]),
    ("create-configs-existing", ["create-configs", "--output-dir", "{recipes}"]),
    ("validate-missing", ["validate", "{missing}"]),
    ("validate-bad-yaml", ["validate", "{badyaml}"]),
    ("validate-unknown-key", ["validate", "{unknownkey}"]),
    ("validate-python-tag", ["validate", "{pythontag}"]),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its content (folders hash to 'dir')."""
    snapshot: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if "__pycache__" in key:
            continue
        snapshot[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = save_tiny_llama(root / "tiny-llama", num_hidden_layers=3)
    paths = {"root": root, "model": model}

    def write(name: str, content: str | bytes) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    text = "\n\n".join(f"Story {i}: a fox jumps over {i % 7} lazy dogs." for i in range(60))
    paths["text"] = write("text.txt", text + "\n")
    paths["tinytext"] = write("tiny.txt", "hi.")
    paths["empty"] = write("empty.txt", "")
    paths["binary"] = write("binary.txt", bytes(range(256)) * 8)
    paths["jsonl"] = write("data.jsonl", '{"text": "a fox"}\n{"text": "a dog"}\n')
    paths["afile"] = write("notes.txt", "my notes\n")
    paths["thesis"] = write("thesis/thesis.txt", "years of work\n").parent
    paths["noconfig"] = write("noconfig/README.md", "not a model\n").parent
    paths["brokenconfig"] = write("brokenconfig/config.json", "{").parent
    write("brokenconfig/model.safetensors", (model / "model.safetensors").read_bytes())
    paths["noweights"] = write(
        "noweights/config.json", (model / "config.json").read_text(encoding="utf-8")
    ).parent
    paths["badyaml"] = write("bad.yaml", "stages: [\n  - {type: quantize\n")
    paths["unknownkey"] = write("unknown.yaml", f"model: {model}\nflavour: spicy\nstages: []\n")
    paths["quantconfig"] = write("quant.yaml", "method: rtn\nbits: 4\nflavour: spicy\n")
    paths["pythontag"] = write("tag.yaml", "!!python/object/apply:os.system ['echo owned']\n")
    paths["unknownstage"] = write(
        "stage.yaml", f"model: {model}\nstages:\n  - {{type: melt, method: hot}}\n"
    )
    paths["recipemissingmodel"] = write(
        "nomodel.yaml",
        f"model: {root / 'no-such-model'}\nevaluate_original: false\nstages:\n"
        "  - {type: quantize, method: bf16, evaluate: false}\n",
    )
    paths["recipe"] = write(
        "recipes/recipe.yaml",
        f"model: {model}\nevaluate_original: false\nstages:\n"
        "  - {type: quantize, method: bf16, evaluate: false}\n",
    )
    paths["recipes"] = paths["recipe"].parent
    write("recipes/pipeline.yaml", "# my own edits\n")
    paths["missing"] = root / "does-not-exist"
    return paths


@pytest.mark.parametrize(("case", "template"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    workspace: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    template: list[str],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names: dict[str, Any] = {k: str(v) for k, v in workspace.items()}
    names["out"] = str(workspace["root"] / f"out-{case}")
    args = [part.format(**names) for part in template]
    before = _tree(workspace["root"])
    code = cli_main([*args, "-q"] if args and args[0] in _VERBS else args)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines == errors, captured.err
    assert REASONS[case] in errors[0], errors[0]
    assert _tree(workspace["root"]) == before


_VERBS = {"quantize", "prune", "reduce-layers", "evaluate", "compare", "run", "distill"}
_VERBS |= {"create-configs", "validate"}


def test_the_table_is_large_and_covers_every_verb() -> None:
    assert len(CASES) >= 60
    assert len({case for case, _ in CASES}) == len(CASES)
    verbs = {template[0] for _, template in CASES if template}
    assert verbs >= _VERBS


# What each refusal must be about: a phrase of its one line, so a case cannot pass by failing
# for some other reason (a typo in the case, a flag the tiny model cannot take).
REASONS: dict[str, str] = {
    "no-command": "required: COMMAND",
    "unknown-command": "invalid choice: 'squash'",
    "quantize-missing-model": "model path not found",
    "quantize-model-is-a-file": "is a file, not a model",
    "quantize-folder-without-config": "no config.json",
    "quantize-broken-config-json": "not a valid JSON",
    "quantize-config-without-weights": "no weight files",
    "quantize-missing-gguf-file": "GGUF file 'nope.gguf' not found",
    "quantize-no-cuda": "no CUDA GPU",
    "quantize-unknown-method": "invalid choice: 'int3'",
    "quantize-no-method": "give --method",
    "quantize-no-output-dir": "required: --output-dir",
    "quantize-bits-zero": "--bits 0",
    "quantize-bits-nine": "--bits 9",
    "quantize-bits-not-a-number": "invalid int value: 'four'",
    "quantize-negative-group": "--group-size -5",
    "quantize-group-does-not-fit": "fitting group sizes 2, 4, 8, 16",
    "quantize-bad-bits-override": "expected PATTERN=BITS",
    "quantize-bad-target-regex": "not a valid regular expression",
    "quantize-target-matches-nothing": "matches no module",
    "quantize-negative-damp": "--damp -1.0",
    "quantize-bad-smoothquant-alpha": "--smoothquant-alpha",
    "quantize-bits-on-bf16": "--bits does not apply to --method bf16",
    "quantize-bad-compute-dtype": "invalid choice: 'fp8'",
    "gptq-without-data": "needs --calibration-data",
    "gptq-missing-data": "data file not found",
    "gptq-empty-data": "holds no text",
    "gptq-binary-data": "not valid utf-8",
    "gptq-jsonl-without-field": "no field 'body'",
    "gptq-zero-samples": "--num-samples 0",
    "gptq-seq-len-above-positions": "--seq-len 100000 exceeds the 128 positions",
    "awq-bad-precision": "invalid choice: 'fp8'",
    "quantize-output-is-the-model": "over the input",
    "quantize-output-inside-the-model": "over the input",
    "quantize-output-is-a-file": "is a file",
    "quantize-output-under-a-file": "is a file, not a folder",
    "quantize-output-not-empty": "pass --overwrite",
    "quantize-overwrite-foreign-folder": "did not write",
    "quantize-config-missing": "config file not found",
    "quantize-config-bad-yaml": "not valid YAML: line 2",
    "quantize-config-unknown-key": "unknown key 'flavour'",
    "quantize-config-python-tag": "loaded safely",
    "prune-sparsity-above-one": "--sparsity 1.5",
    "prune-negative-sparsity": "--sparsity -0.1",
    "prune-pattern-n-above-m": "0 < N < M",
    "prune-pattern-not-n-m": "'N:M'",
    "prune-sparsity-contradicts-pattern": "contradicts --pattern 2:4",
    "prune-wanda-without-data": "needs --calibration-data",
    "prune-structured-with-sparsity": "--sparsity does not apply to --method structured",
    "prune-structured-ratio-above-one": "--mlp-ratio 1.5",
    "prune-unknown-save-format": "invalid choice: 'zip'",
    "prune-zero-gradual-steps": "--gradual-steps 0",
    "prune-refit-with-wanda": "--refit-iterations does not apply to --method wanda",
    "prune-output-is-the-model": "over the input",
    "prune-overwrite-foreign-folder": "did not write",
    "reduce-all-layers": "at least one must remain",
    "reduce-more-than-all": "cannot remove 10 of 3",
    "reduce-index-out-of-range": "out of range",
    "reduce-same-block-twice": "both name block 1",
    "reduce-layers-not-numbers": "comma-separated integers",
    "reduce-importance-without-data": "needs --calibration-data",
    "reduce-remove-and-keep": "not allowed with",
    "reduce-overwrite-foreign-folder": "did not write",
    "evaluate-missing-data": "data file not found",
    "evaluate-empty-data": "holds no text",
    "evaluate-three-tokens": "fewer than one perplexity window",
    "evaluate-window-one": "--window 1: input should be greater than or equal to 2",
    "evaluate-zero-batch-size": "--speed-batch-sizes 0: input should be greater than or equal to 1",
    "evaluate-missing-model": "model path not found",
    "evaluate-missing-reference": "model path not found",
    "evaluate-output-inside-model": "--output: refusing",
    "evaluate-output-under-a-file": "is a file, not a folder",
    "compare-one-model": "required: compressed",
    "compare-missing-model": "model path not found",
    "compare-report-inside-model": "--report-dir: refusing",
    "compare-report-dir-is-a-file": "is a file",
    "run-missing-recipe": "config file not found",
    "run-bad-yaml": "not valid YAML",
    "run-unknown-key": "unknown key 'flavour'",
    "run-python-tag": "loaded safely",
    "run-unknown-stage": "'melt'",
    "run-missing-model": "model path not found",
    "run-overwrite-foreign-folder": "holds no Swiss Knife run",
    "run-output-holds-the-recipe": "over the input",
    "distill-missing-train-data": "data file not found",
    "distill-no-student": "--student-from-teacher",
    "distill-bad-student-spec": "'shrink:lots'",
    "distill-seq-len-above-positions": "--seq-len 100000 exceeds the 128 positions",
    "distill-output-inside-teacher": "--output-dir: refusing",
    "distill-zero-steps": "--max-steps 0",
    "distill-negative-learning-rate": "--learning-rate -1",
    "distill-foreign-folder": "holds no distillation run",
    "create-configs-into-a-file": "is a file",
    "create-configs-under-a-file": "is a file, not a folder",
    "create-configs-existing": "pass --overwrite",
    "validate-missing": "config file not found",
    "validate-bad-yaml": "not valid YAML",
    "validate-unknown-key": "unknown key 'flavour'",
    "validate-python-tag": "loaded safely",
}


def test_every_case_names_its_reason() -> None:
    assert set(REASONS) == {case for case, _ in CASES}


# --------------------------------------------------------------------------- operating-system errors
# Tests run as root in CI, where permission bits do not stop anything; the errors a user without
# the permission gets are raised where the operating system would raise them.


def _denied(path: Path) -> PermissionError:
    return PermissionError(13, "Permission denied", str(path))


def test_unreadable_data_file_is_bad_input(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = workspace["text"]
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.resolve() == text.resolve():
            raise _denied(self)
        return real(self)

    before = _tree(workspace["root"])
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = workspace["root"] / "out-unreadable"
    code = cli_main(
        [
            "quantize",
            str(workspace["model"]),
            "--method",
            "gptq",
            "--group-size",
            "16",
            "--calibration-data",
            str(text),
            "--output-dir",
            str(out),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    monkeypatch.undo()
    assert code == 2
    assert err == f"error: cannot use {text}: permission denied"
    assert _tree(workspace["root"]) == before


def test_unwritable_output_folder_is_refused_before_work(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from swiss_knife import paths

    locked = workspace["root"] / "locked"
    real = paths.os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    locked.mkdir()
    try:
        before = _tree(workspace["root"])
        code = cli_main(
            [
                "quantize",
                str(workspace["model"]),
                "--method",
                "bf16",
                "--output-dir",
                str(locked / "out"),
                "-q",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err == f"error: cannot create {locked / 'out'}: no permission to write in {locked}"
        assert _tree(workspace["root"]) == before
    finally:
        locked.rmdir()


def test_permission_error_during_the_save_is_one_line(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error the early checks could not foresee (a folder made read-only mid-run) still
    exits 2 with the path, and leaves no partial output behind."""
    from swiss_knife import models

    out = workspace["root"] / "out-denied"

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise _denied(out)

    monkeypatch.setattr(models, "replace_dir", refuse)
    before = _tree(workspace["root"])
    code = cli_main(
        ["quantize", str(workspace["model"]), "--method", "bf16", "--output-dir", str(out), "-q"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: cannot use {out}: permission denied"
    assert _tree(workspace["root"]) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_real_read_only_folder_as_a_user(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    locked = workspace["root"] / "really-locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = cli_main(
            [
                "quantize",
                str(workspace["model"]),
                "--method",
                "bf16",
                "--output-dir",
                str(locked / "out"),
                "-q",
            ]
        )
        assert code == 2
        assert "no permission to write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
        locked.rmdir()
