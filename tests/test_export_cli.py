"""`swiss-knife export`, the recipe's `export` stage and `sk.export_gguf`, on a tiny random Llama.

The file format itself (types, grids, metadata, tokenizer) is checked in test_export_gguf.py;
here: the interfaces a user drives, their output in text and JSON, and their refusals.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import SMALL_EVALUATION
from swiss_knife.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tensor_types(path: Path) -> dict[str, str]:
    reader = GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def test_export_text_and_json(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny-q8_0.gguf"
    code, stdout, _ = run(capsys, "export", tiny_llama_dir, "--output-file", out, "-q")
    assert code == 0
    assert "parameters" in stdout and f"saved to {out}" in stdout
    assert tensor_types(out)["blk.0.attn_q.weight"] == "Q8_0"  # the default type
    # --json, a K-quant with a per-tensor override; replacing our own earlier file.
    code, stdout, _ = run(
        capsys,
        "export", tiny_llama_dir, "--output-file", out, "--type", "q4_0",
        "--type-override", "re:.*down_proj=q8_0", "--overwrite", "--json", "-q",
    )  # fmt: skip
    assert code == 0
    report = json.loads(stdout)
    assert report["type"] == "q4_0" and report["output_file"] == str(out)
    types = tensor_types(out)
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_auto_keeps_the_rtn_grid(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RTN 4-bit in groups of 32, then export --type auto: Q4_0 blocks with the same integers."""
    quantized = tmp_path / "rtn"
    code, _, _ = run(
        capsys, "quantize", tiny_llama_dir, "--method", "rtn", "--bits", "4",
        "--group-size", "32", "--output-dir", quantized, "-q",
    )  # fmt: skip
    assert code == 0
    out = tmp_path / "rtn.gguf"
    code, stdout, _ = run(
        capsys, "export", quantized, "--type", "auto", "--output-file", out, "--json", "-q"
    )
    assert code == 0
    report = json.loads(stdout)
    assert len(report["exact_tensors"]) == 14  # every linear of the two blocks
    assert tensor_types(out)["blk.1.ffn_up.weight"] == "Q4_0"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("exists", "exists; pass --overwrite"),
        ("not-ours", "not a GGUF file Swiss Knife wrote"),
        ("inside-model", "inside the model folder"),
        ("bad-override", "--type-override"),
        ("3-bit-auto", "3"),
        ("a-gguf-input", "already a GGUF file"),
        ("missing-model", "not found"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    out = tmp_path / "out.gguf"
    model: Path = tiny_llama_dir
    extra: list[Any] = []
    if case in ("exists", "a-gguf-input"):
        assert run(capsys, "export", tiny_llama_dir, "--output-file", out, "-q")[0] == 0
        if case == "a-gguf-input":
            model, out = out, tmp_path / "again.gguf"
    elif case == "not-ours":
        out.write_bytes(b"someone's notes")
        extra = ["--overwrite"]
    elif case == "inside-model":
        out = tiny_llama_dir / "model.gguf"
    elif case == "bad-override":
        extra = ["--type-override", "re:.*down_proj=q9_9"]
    elif case == "3-bit-auto":  # no llama.cpp block type holds a 3-bit grid
        model = tmp_path / "rtn3"
        code, _, _ = run(
            capsys, "quantize", tiny_llama_dir, "--method", "rtn", "--bits", "3",
            "--group-size", "32", "--output-dir", model, "-q",
        )  # fmt: skip
        assert code == 0
        extra = ["--type", "auto"]
    elif case == "missing-model":
        model = tmp_path / "nowhere"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    stamp = out.read_bytes() if out.is_file() else None
    code, _, stderr = run(capsys, "export", model, "--output-file", out, *extra, "-q")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing new, nothing left
    if stamp is not None:
        assert out.read_bytes() == stamp  # untouched


def test_recipe_export_stage_resumes(tiny_llama_dir: Path, eval_text: Path, tmp_path: Path) -> None:
    from swiss_knife.config import validate_dict
    from swiss_knife.pipeline import run_recipe
    from swiss_knife.recipe import CompressionConfig

    recipe = validate_dict(
        CompressionConfig,
        {
            "model": {"path": str(tiny_llama_dir), "device": "cpu"},
            "data": {"eval": str(eval_text)},
            "evaluation": SMALL_EVALUATION,
            "evaluate_original": True,
            "stages": [
                {"type": "quantize", "method": "rtn", "bits": 8, "group_size": 32},
                {"type": "export", "tensor_type": "auto", "evaluate": False},
            ],
        },
        "test recipe",
    )
    out = tmp_path / "run"
    first = run_recipe(recipe, out, progress=False)
    assert first.gguf_file == out.resolve() / "stages" / "01-export" / "model.gguf"
    assert set(tensor_types(first.gguf_file).values()) >= {"Q8_0", "F32"}
    manifest = json.loads((first.gguf_file.parent / "swiss_knife.json").read_text())
    assert manifest["stage_report"]["exact_tensors"]
    second = run_recipe(recipe, out, progress=False)
    assert "01-export" in second.resumed_stages


def test_api_export_of_an_in_memory_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import swiss_knife as sk

    model = sk.load(str(tiny_llama_dir), device="cpu")
    sk.quantize(model, sk.RTNConfig(bits=4, group_size=32))
    report = sk.export_gguf(model, tmp_path / "m.gguf", sk.GGUFExportConfig(tensor_type="auto"))
    assert len(report["exact_tensors"]) == 14
    reader = GGUFReader(tmp_path / "m.gguf")
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert q.tensor_type.name == "Q4_0" and np.asarray(q.data).size > 0
    with pytest.raises(sk.UserInputError, match="GGUFExportConfig"):
        sk.export_gguf(model, tmp_path / "x.gguf", sk.RTNConfig())


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
def test_recipe_measures_its_gguf_in_llama_cpp(
    tiny_llama_dir: Path, eval_text: Path, tmp_path: Path
) -> None:
    """quantize (RTN on Q8_0's grid) -> export auto, evaluated: the GGUF row runs in llama.cpp,
    on the same windows, close to the quantized model measured in transformers."""
    from swiss_knife.config import validate_dict
    from swiss_knife.pipeline import run_recipe
    from swiss_knife.recipe import CompressionConfig

    evaluation = {**SMALL_EVALUATION, "speed": {**SMALL_EVALUATION["speed"], "repeats": 1}}
    recipe = validate_dict(
        CompressionConfig,
        {
            "model": {"path": str(tiny_llama_dir), "device": "cpu"},
            "data": {"eval": str(eval_text)},
            "evaluation": evaluation,
            "stages": [
                {"type": "quantize", "method": "rtn", "bits": 8, "group_size": 32},
                {"type": "export", "tensor_type": "auto"},
            ],
        },
        "test recipe",
    )
    result = run_recipe(recipe, tmp_path / "run", progress=False)
    names = [r.name for r in result.reports]
    assert names == ["original", "00-quantize", "01-export"]
    quantized, exported = result.reports[1].metrics, result.reports[2].metrics
    assert exported["runtime"] == "llama.cpp" and quantized["runtime"] == "transformers"
    ours, theirs = quantized["perplexity"], exported["perplexity"]
    assert ours["tokens_scored"] == theirs["tokens_scored"]
    # The same integers in both runtimes: llama.cpp's f16 KV cache is the only difference.
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < 0.01
