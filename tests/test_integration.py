"""End to end on a real pretrained model and real text: stories260K on TinyStories.

Uses the offline assets in ../shared/assets (karpathy's stories260K converted to a Hugging Face
Llama, and the head of the TinyStories validation split); skipped when they are absent.

Reference: stories260K scores perplexity 5.354 on this text cut into blank-line chunks, each
starting with BOS, scored in non-overlapping 512-token windows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REFERENCE_PPL = 5.354


@pytest.fixture(scope="module")
def stories_text(assets_dir: Path) -> Path:
    path = assets_dir / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
    if not path.is_file():
        pytest.skip(f"TinyStories text not found at {path}")
    return path


def swiss_knife(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script (or the module, when the script is not on PATH)."""
    script = shutil.which("swiss-knife")
    command = [script] if script else [sys.executable, "-m", "swiss_knife.cli"]
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        # One thread: the numbers do not depend on it, and on a small shared machine two OpenMP
        # threads competing with other work can be several times slower than one.
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        },
        timeout=600,
    )


def test_stories260k_perplexity_matches_the_reference(
    stories_dir: Path, stories_text: Path
) -> None:
    result = swiss_knife(
        "evaluate",
        stories_dir,
        "--eval-data",
        stories_text,
        "--split-documents",
        "paragraph",
        "--window",
        "512",
        "--max-windows",
        "0",  # the whole text
        "--no-speed",
        "--json",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    ppl = json.loads(result.stdout)["metrics"]["perplexity"]
    assert ppl["window"] == 512
    assert ppl["stride"] == 512
    assert ppl["num_windows"] >= 700  # about 385k tokens
    # Non-overlapping windows score all but their first token.
    full_windows = ppl["num_windows"] - 1
    assert full_windows * 511 < ppl["tokens_scored"] <= ppl["num_windows"] * 511
    assert 5.2 <= ppl["perplexity"] <= 5.5
    assert ppl["perplexity"] == pytest.approx(REFERENCE_PPL, rel=0.005)


def test_stories260k_bf16_cast_recipe(
    stories_dir: Path, stories_text: Path, tmp_path: Path
) -> None:
    recipe = {
        "model": {"path": str(stories_dir), "device": "cpu"},
        "data": {"eval": {"source": str(stories_text), "split_documents": "paragraph"}},
        "evaluation": {
            "perplexity": {"window": 512, "max_windows": 40},
            "agreement": {"window": 512, "max_windows": 10},
            "speed": {"enabled": False},
        },
        "stages": [{"type": "cast", "dtype": "bf16"}],
    }
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "run"
    result = swiss_knife("run", recipe_file, "--output-dir", out, "--json", "-q")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    original, cast = data["rows"]
    assert original["name"] == "original" and cast["name"] == "00-cast"
    assert original["dtype"] == "float32" and cast["dtype"] == "bfloat16"
    assert original["tokens_scored"] == cast["tokens_scored"] == 40 * 511
    assert 4 < original["perplexity"] < 7
    assert abs(cast["ppl_delta_pct"]) < 1.0
    assert cast["top1_agreement_pct"] > 95.0
    assert cast["kl_mean"] < 0.01
    assert 1.9 < cast["size_x"] < 2.1
    assert Path(data["final_model"]) == (out / "stages" / "00-cast").resolve()
    assert (out / "report.html").is_file()
