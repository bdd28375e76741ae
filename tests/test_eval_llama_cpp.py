"""`evaluate` and `compare` run GGUF files through llama.cpp (llama-cpp-python, optional).

The files are exported here with `export_gguf` from a tiny random Llama (and from stories260K
when the shared assets are present), and measured on the same token windows as the transformers
path: the perplexities must agree, agreement with the source must be near perfect, and the CLI
must say which runtime measured each row. Nothing here asserts a wall-clock time.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import STORIES, make_char_tokenizer, make_tiny_llama
from swiss_knife.cli import main as cli_main
from swiss_knife.config import EvaluationConfig
from swiss_knife.data import tokenize_documents
from swiss_knife.evaluation import comparison_rows, evaluate
from swiss_knife.export import export_gguf

pytestmark = pytest.mark.usefixtures("single_thread")

requires_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
STORIES_TEXT = STORIES.parents[0] / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"
INSTALL = "pip install 'swiss-knife[llama-cpp]'"

# Perplexity only: overlapping windows (stride < window) so the scored spans are exercised too.
PPL_ONLY = EvaluationConfig.model_validate(
    {
        "perplexity": {"window": 64, "stride": 48, "max_windows": 8},
        "speed": {"enabled": False},
        "agreement": {"enabled": False},
        "memory": False,
        "size": False,
    }
)
# Small settings for the CLI runs (the tiny model has 128 positions).
SMALL_EVAL = [
    *("--window", "32", "--max-windows", "3", "--prompt-len", "8", "--new-tokens", "4"),
    *("--repeats", "2", "--warmup", "0", "-q"),
]


def text_documents(count: int = 40) -> list[str]:
    return [
        f"Story {i}: the quick brown fox jumps over {i % 7} lazy dogs, and the cat sat on a mat."
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny random Llama folder, its f32 and q8_0 GGUF files, and the evaluation text."""
    root = tmp_path_factory.mktemp("llama-cpp")
    source = root / "tiny"
    model = make_tiny_llama()
    tokenizer = make_char_tokenizer()
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    files = {kind: root / f"tiny-{kind}.gguf" for kind in ("f32", "q8_0")}
    for kind, file in files.items():
        export_gguf(source, file, kind)
    text = root / "eval.txt"
    text.write_text("\n\n".join(text_documents()) + "\n", encoding="utf-8")
    tokens = tokenize_documents(text_documents(), tokenizer, add_bos=True)
    return {"dir": source, "model": model, "tokenizer": tokenizer, "text": text, "tokens": tokens}


def gguf(tiny: dict[str, Any], kind: str) -> Path:
    return Path(tiny["dir"]).parent / f"tiny-{kind}.gguf"


def run_cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- the API


@requires_llama_cpp
def test_perplexity_matches_transformers_on_the_same_windows(tiny: dict[str, Any]) -> None:
    from swiss_knife.evaluation.llama_cpp import evaluate_gguf

    tokens, tokenizer = tiny["tokens"], tiny["tokenizer"]
    expected = evaluate(tiny["model"], tokenizer, PPL_ONLY, tokens=tokens).metrics["perplexity"]
    f32 = evaluate_gguf(gguf(tiny, "f32"), tokenizer, PPL_ONLY, tokens=tokens).metrics
    q8 = evaluate_gguf(gguf(tiny, "q8_0"), tokenizer, PPL_ONLY, tokens=tokens).metrics
    for got in (f32["perplexity"], q8["perplexity"]):
        for key in ("tokens_scored", "num_windows", "window", "stride"):
            assert got[key] == expected[key], key
    assert expected["num_windows"] == 8 and expected["tokens_scored"] == 63 + 7 * 48
    assert f32["runtime"] == "llama.cpp" and f32["dtype"] == "f32" and q8["dtype"] == "q8_0"
    # Measured: transformers 129.0766, llama.cpp f32 129.0767, q8_0 129.0774 (+0.0006 %: the
    # random model's near-uniform outputs hardly move; stories260K below shows a real shift).
    assert f32["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"], rel=0.01)
    assert q8["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"], rel=0.005)


@requires_llama_cpp
def test_stories260k_f32_matches_transformers(tmp_path: Path) -> None:
    if not (STORIES / "config.json").is_file() or not STORIES_TEXT.is_file():
        pytest.skip("stories260K assets absent")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiss_knife.evaluation.llama_cpp import evaluate_gguf, load_gguf_tokenizer

    file, q8_file = tmp_path / "stories-f32.gguf", tmp_path / "stories-q8_0.gguf"
    export_gguf(STORIES, file, "f32")
    export_gguf(STORIES, q8_file, "q8_0")
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    documents = re.split(r"\n\s*\n", STORIES_TEXT.read_text(encoding="utf-8")[:40_000])
    tokens = tokenize_documents([d.strip() for d in documents if d.strip()], tokenizer)
    config = EvaluationConfig.model_validate(
        {**PPL_ONLY.model_dump(), "perplexity": {"window": 256, "max_windows": 6}}
    )
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    expected = evaluate(model, tokenizer, config, tokens=tokens).metrics["perplexity"]
    got = evaluate_gguf(file, tokenizer, config, tokens=tokens).metrics["perplexity"]
    q8 = evaluate_gguf(q8_file, tokenizer, config, tokens=tokens).metrics["perplexity"]
    assert got["tokens_scored"] == q8["tokens_scored"] == expected["tokens_scored"] == 6 * 255
    # Measured: transformers 3.8916, llama.cpp f32 3.8913 (-0.01 %), q8_0 3.8952 (+0.09 %).
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=0.01)
    assert 0.995 < q8["perplexity"] / expected["perplexity"] < 1.01
    assert q8["perplexity"] != got["perplexity"]  # the 8-bit weights do change the result
    # The tokenizer transformers builds from the file reads the text the same way.
    sample = "Once upon a time, there was a little girl named Lily."
    assert load_gguf_tokenizer(file)(sample).input_ids == tokenizer(sample).input_ids


@requires_llama_cpp
def test_agreement_speed_memory_and_size(tiny: dict[str, Any]) -> None:
    from swiss_knife.evaluation.llama_cpp import NO_BATCHING, evaluate_gguf

    config = EvaluationConfig.model_validate(
        {
            "perplexity": {"window": 32, "max_windows": 2},
            "agreement": {"window": 32, "max_windows": 3},
            "speed": {
                "batch_sizes": [1, 4],
                "prompt_len": 8,
                "new_tokens": 4,
                "repeats": 2,
                "warmup": 0,
            },
        }
    )
    file = gguf(tiny, "f32")
    report = evaluate_gguf(
        file, tiny["tokenizer"], config, tokens=tiny["tokens"], reference=tiny["model"]
    )
    m = report.metrics
    assert m["agreement"]["tokens"] == 3 * 32
    assert m["agreement"]["top1_agreement"] >= 0.99
    assert 0 <= m["agreement"]["kl_mean"] < 1e-3
    speed = m["speed"]
    assert speed["runtime"] == "llama.cpp" and speed["threads"] == 1
    (batch,) = speed["batches"]
    assert (batch["batch_size"], batch["prompt_len"], batch["new_tokens"]) == (1, 8, 4)
    assert batch["prefill"]["repeats"] == 2 and len(batch["decode_per_token"]["samples_ms"]) == 2
    assert batch["prefill_tokens_per_s"] > 0 and batch["decode_tokens_per_s"] > 0
    assert speed["not_measured"] == [{"batch_size": 4, "reason": NO_BATCHING}]
    size = m["size"]
    assert size["disk_bytes"] == file.stat().st_size and size["weight_files"] == [file.name]
    params = sum(p.numel() for p in tiny["model"].parameters())
    assert size["num_params"] == params
    assert 32 < size["bits_per_weight"] < 40  # f32 weights, plus the header and vocabulary
    memory = m["memory"]
    assert memory["runtime"] == "llama.cpp" and memory["model_peak_bytes"] > 0
    assert memory["model_peak_bytes"] >= memory["parameter_bytes"] > 0
    assert set(memory["rss_rise_bytes_by_metric"]) == {"perplexity", "speed"}
    # The table shows which runtime measured each row, beside the transformers baseline.
    baseline = evaluate(tiny["model"], tiny["tokenizer"], config, tokens=tiny["tokens"])
    rows = comparison_rows([baseline, report])
    assert [r["runtime"] for r in rows] == ["transformers", "llama.cpp"]
    assert rows[1]["top1_agreement_pct"] >= 99


def test_missing_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from swiss_knife.errors import MissingDependencyError
    from swiss_knife.evaluation import llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    assert not llama_cpp.llama_cpp_available()
    with pytest.raises(MissingDependencyError, match=re.escape(INSTALL)) as info:
        llama_cpp.evaluate_gguf("any.gguf")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the CLI


@requires_llama_cpp
def test_cli_evaluate_gguf_json_and_table(
    tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    file = gguf(tiny, "q8_0")
    code, out, err = run_cli(
        capsys, "evaluate", file, "--eval-data", tiny["text"], *SMALL_EVAL, "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    metrics = report["metrics"]
    assert report["name"] == file.name
    assert metrics["runtime"] == "llama.cpp" and metrics["dtype"] == "q8_0"
    ppl = metrics["perplexity"]
    assert (ppl["window"], ppl["num_windows"], ppl["tokens_scored"]) == (32, 3, 3 * 31)
    assert metrics["speed"]["batches"][0]["decode_tokens_per_s"] > 0

    code, out, err = run_cli(
        capsys, "evaluate", file, "--eval-data", tiny["text"], *SMALL_EVAL, "--no-speed"
    )
    assert code == 0, err
    header, _, row = out.splitlines()[:3]
    assert "runtime" in header and "perplexity" in header
    assert row.startswith(file.name) and "llama.cpp" in row and "q8_0" in row


@requires_llama_cpp
def test_cli_compare_original_with_its_gguf(
    tiny: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = gguf(tiny, "q8_0")
    args = ["compare", tiny["dir"], file, "--eval-data", tiny["text"], *SMALL_EVAL]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    original, compressed = json.loads(out)["rows"]
    assert (original["runtime"], compressed["runtime"]) == ("transformers", "llama.cpp")
    assert compressed["perplexity"] == pytest.approx(original["perplexity"], rel=0.02)
    assert compressed["top1_agreement_pct"] >= 95
    assert 3 < compressed["size_x"] < 4  # q8_0 (with its vocabulary) beside fp32 safetensors

    reports = tmp_path / "reports"
    code, out, err = run_cli(capsys, *args, "--no-speed", "--report-dir", reports)
    assert code == 0, err
    lines = out.splitlines()
    assert "runtime" in lines[0]
    assert "transformers" in lines[2] and "llama.cpp" in lines[3]
    assert "| llama.cpp |" in (reports / "report.md").read_text(encoding="utf-8")


@requires_llama_cpp
def test_cli_runtime_transformers_still_loads_the_gguf_there(
    tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", gguf(tiny, "f32"), "--eval-data", tiny["text"], *SMALL_EVAL, "--json"]
    code, out, err = run_cli(capsys, *args, "--no-speed", "--runtime", "transformers")
    assert code == 0, err
    assert json.loads(out)["metrics"]["runtime"] == "transformers"


def test_cli_without_the_package(
    tiny: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_llama_cpp(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    file = gguf(tiny, "f32")
    base = ["evaluate", file, "--eval-data", tiny["text"], *SMALL_EVAL, "--no-speed"]
    code, out, err = run_cli(capsys, *base, "--runtime", "llama.cpp")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and INSTALL in err

    # auto: the file is measured in transformers, with one line saying why.
    code, out, err = run_cli(capsys, *base, "--json")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "llama-cpp-python" in line]
    assert len(notes) == 1 and INSTALL in notes[0]
    assert json.loads(out)["metrics"]["runtime"] == "transformers"


def test_cli_runtime_llama_cpp_needs_a_gguf(
    tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys, "evaluate", tiny["dir"], "--eval-data", tiny["text"], "--runtime", "llama.cpp", "-q"
    )
    assert code == 2
    assert err.count("\n") == 1 and ".gguf" in err


@requires_llama_cpp
def test_cli_refuses_a_corrupt_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    code, out, err = run_cli(capsys, "evaluate", bad, "--no-perplexity", "--no-speed", "-q")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "invalid magic" in err and str(bad) in err
