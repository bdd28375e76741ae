"""Runs killed with SIGKILL at seeded random moments, the way a crash or an OOM kill hits them.

What is promised, and checked here after every kill:
- no output that looks complete (it has our manifest) unless it is complete: it loads and equals
  the output of an uninterrupted run byte for byte;
- the input model and the data are untouched;
- the same command run again succeeds and writes the same bytes as an uninterrupted run;
- distillation resumed from its last checkpoint after a kill ends with exactly the weights of an
  uninterrupted run (bit-exact resume).

The kill moments are drawn from a seeded generator over the measured length of an uninterrupted
run, so they fall during start-up, calibration, the walk and the save. No timing is asserted.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import save_tiny_llama

pytestmark = pytest.mark.skipif(os.name != "posix", reason="uses SIGKILL")

MANIFEST = "swiss_knife.json"


def cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "swiss_knife.cli", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_to_end(command: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - started


def run_and_kill(command: list[str], after_s: float) -> int | None:
    """Start the command, SIGKILL it after `after_s` seconds; its exit code if it ended first."""
    child = subprocess.Popen(
        command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        child.wait(timeout=after_s)
        return child.returncode
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        return None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weights_of(directory: Path) -> dict[str, str]:
    """Hashes of the files that hold the model (the manifest's timestamps differ run to run)."""
    return {
        name: digest
        for name, digest in tree(directory).items()
        if name.endswith((".safetensors", "config.json")) and "/" not in name
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kills")
    model = save_tiny_llama(root / "tiny-llama", num_hidden_layers=3)
    text = root / "text.txt"
    paragraphs = [f"Story {i}: a fox jumps over {i % 7} lazy dogs by the river." for i in range(80)]
    text.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return {"root": root, "model": model, "text": text}


def check_no_false_complete(out: Path, reference: Path) -> None:
    """Either there is no finished-looking output, or it is the finished output."""
    if (out / MANIFEST).is_file():
        assert weights_of(out) == weights_of(reference)


@pytest.mark.parametrize(
    ("verb", "extra"),
    [
        ("quantize", ["--method", "gptq", "--bits", "4", "--group-size", "16"]),
        ("prune", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ],
)
def test_killed_compression_never_leaves_a_complete_looking_output(
    workspace: dict[str, Path], verb: str, extra: list[str]
) -> None:
    root, model, text = workspace["root"], workspace["model"], workspace["text"]
    before = tree(model), tree(root / "text.txt")
    reference = root / f"{verb}-reference"
    args = [verb, model, *extra, "--calibration-data", text, "--num-samples", "8"]
    args += ["--seq-len", "64", "-q"]
    length = run_to_end(cli(*args, "--output-dir", reference))
    rng = random.Random(f"{verb}-kills")
    out = root / f"{verb}-killed"
    for trial in range(4):
        # Spread over the whole run: start-up, loading, calibration, the walk, the save.
        after = length * (trial + rng.random()) / 4
        code = run_and_kill(cli(*args, "--output-dir", out, "--overwrite"), after)
        assert code in (None, 0), code
        check_no_false_complete(out, reference)
        assert (tree(model), tree(root / "text.txt")) == before
    # The same command again succeeds, leaves no work folders, and writes the same model.
    run_to_end(cli(*args, "--output-dir", out, "--overwrite"))
    assert weights_of(out) == weights_of(reference)
    assert not [p for p in root.iterdir() if p.name.startswith(f".{out.name}.")]


def test_killed_recipe_resumes_to_the_same_result(workspace: dict[str, Path]) -> None:
    root, model, text = workspace["root"], workspace["model"], workspace["text"]
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "\n".join(
            [
                f"model: {model}",
                f"data: {{eval: {text}, calibration: {text}}}",
                "evaluate_original: false",
                "evaluation:",
                "  perplexity: {window: 32, max_windows: 2}",
                "  speed: {enabled: false}",
                "  agreement: {enabled: false}",
                "stages:",
                "  - {type: prune, method: wanda, sparsity: 0.5, evaluate: false,"
                "     calibration: {num_samples: 8, seq_len: 64}}",
                "  - {type: quantize, method: gptq, bits: 4, group_size: 16, evaluate: true,"
                "     calibration: {num_samples: 8, seq_len: 64}}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    reference = root / "recipe-reference"
    length = run_to_end(cli("run", recipe, "--output-dir", reference, "-q"))
    finals = sorted(p.parent for p in reference.rglob(MANIFEST))
    assert len(finals) == 2
    out = root / "recipe-killed"
    rng = random.Random("recipe-kills")
    for trial in range(3):
        run_and_kill(
            cli("run", recipe, "--output-dir", out, "-q"), length * (trial + rng.random()) / 3
        )
        for stage in out.glob("*"):
            twin = reference / stage.name
            if (stage / MANIFEST).is_file() and twin.is_dir():
                assert weights_of(stage) == weights_of(twin)
    # Resuming (the default) finishes the run with the same stage outputs.
    run_to_end(cli("run", recipe, "--output-dir", out, "-q"))
    for final in finals:
        assert weights_of(out / final.relative_to(reference)) == weights_of(final)


def test_distillation_killed_after_a_checkpoint_resumes_bit_exact(
    workspace: dict[str, Path],
) -> None:
    root, model, text = workspace["root"], workspace["model"], workspace["text"]
    args = ["distill", "--teacher", model, "--student-from-teacher", "remove:1"]
    args += ["--train-data", text, "--max-steps", "8", "--save-every", "2", "--batch-size", "2"]
    args += ["--seq-len", "32", "--eval-every", "4", "--eval-windows", "2", "-q"]
    reference = root / "distill-reference"
    run_to_end(cli(*args, "--output-dir", reference))
    out = root / "distill-killed"
    child = subprocess.Popen(
        cli(*args, "--output-dir", out),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
        while not list((out / "checkpoints").glob("step-*")):
            assert child.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (out / "final" / MANIFEST).is_file()
    run_to_end(cli(*args, "--output-dir", out, "--resume"))
    assert weights_of(out / "final") == weights_of(reference / "final")
