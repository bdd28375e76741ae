"""Reports say how sure they are, and long work says how far it has got (issue 13, items 7-8).

* Timings carry min/median/max in every rendering, the load average is recorded, and a speed
  ratio whose two [min, max] ranges overlap reads "within noise" rather than a number.
* A model's reported peak memory does not include an earlier model still held by the process,
  so it does not depend on the order in which models are evaluated.
* Progress is logged (not drawn) when stderr is not a terminal, at a bounded rate, and not at
  all when disabled; the pipeline names each stage before it runs.

Nothing is downloaded and no wall-clock value is asserted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_tiny_llama
from swiss_knife.config import CompressionConfig, EvaluationConfig, validate_dict
from swiss_knife.evaluation import EvaluationReport, comparison_rows, evaluate, write_reports
from swiss_knife.evaluation.compare import WITHIN_NOISE, timing_ratio, within_noise
from swiss_knife.evaluation.memory import model_peak_bytes, parameter_bytes
from swiss_knife.evaluation.report import markdown_report, terminal_table
from swiss_knife.evaluation.speed import DEFAULT_REPEATS, measure_speed
from swiss_knife.pipeline import run_recipe
from swiss_knife.progress import Progress, track

MB = 1_000_000


def timing(median: float, low: float, high: float, repeats: int = 3) -> dict[str, Any]:
    return {"median_ms": median, "min_ms": low, "max_ms": high, "repeats": repeats}


def speed_report(name: str, decode: dict[str, Any], prefill: dict[str, Any]) -> EvaluationReport:
    batch = {
        "batch_size": 1,
        "prompt_len": 16,
        "new_tokens": 4,
        "prefill": prefill,
        "decode_per_token": decode,
        "prefill_tokens_per_s": 16 / (prefill["median_ms"] / 1e3),
        "decode_tokens_per_s": 1 / (decode["median_ms"] / 1e3),
    }
    speed = {
        "device": "cpu",
        "dtype": "float32",
        "threads": 2,
        "warmup": 1,
        "repeats": decode["repeats"],
        "batches": [batch],
        "load_avg_before": [1.0, 1.0, 1.0],
        "load_avg_after": [1.2, 1.0, 1.0],
        "cpu_count": 2,
    }
    return EvaluationReport(name=name, source=None, eval_data=None, metrics={"speed": speed})


# --------------------------------------------------------------------------- within noise


def test_within_noise_is_range_overlap() -> None:
    base = timing(40.0, 35.0, 50.0)
    assert within_noise(base, timing(9.3, 8.0, 36.0)) is True  # ranges overlap
    assert within_noise(base, timing(9.3, 8.0, 10.0)) is False  # clearly apart
    assert within_noise(base, timing(50.0, 50.0, 60.0)) is True  # touching counts as overlap
    assert within_noise(timing(9.3, 8.0, 10.0), base) is False  # symmetric
    # One repeat (or a report without a range) cannot be judged either way.
    assert within_noise(base, timing(9.3, 9.3, 9.3, repeats=1)) is None
    assert within_noise(base, {"median_ms": 9.3, "repeats": 3}) is None
    assert within_noise(None, base) is None
    ratio, noise = timing_ratio(base, timing(10.0, 8.0, 36.0))
    assert ratio == pytest.approx(4.0) and noise is True


def test_overlapping_ratio_is_printed_as_within_noise(tmp_path: Path) -> None:
    # The demo's case: a 4.29x "speed-up" whose runs overlap the baseline's.
    base = speed_report("fp32", timing(40.0, 30.0, 60.0), timing(200.0, 190.0, 210.0))
    noisy = speed_report("w4", timing(9.32, 9.0, 45.0), timing(100.0, 95.0, 105.0))
    rows = comparison_rows([base, noisy])
    assert rows[1]["decode_x"] == pytest.approx(40.0 / 9.32)
    assert rows[1]["decode_x_within_noise"] is True
    assert rows[1]["prefill_x_within_noise"] is False  # 200 [190-210] vs 100 [95-105]
    assert rows[0]["decode_x_within_noise"] is None  # the baseline is not judged

    table = terminal_table(rows)
    markdown = markdown_report([base, noisy], "t")
    paths = write_reports(tmp_path, [base, noisy])
    html = paths["html"].read_text(encoding="utf-8")
    for text in (table, markdown, html):
        assert WITHIN_NOISE in text
        assert "4.29" not in text
        assert "2.00" in text  # the prefill ratio is beyond the noise: shown as a number
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["rows"][1]["decode_x_within_noise"] is True

    # Apart: the number is shown.
    fast = speed_report("w4", timing(9.32, 9.0, 10.0), timing(100.0, 95.0, 105.0))
    assert "4.29" in terminal_table(comparison_rows([base, fast]))
    # A single run cannot be judged, and the table says so instead of pretending.
    single = speed_report("w4", timing(9.32, 9.32, 9.32, 1), timing(100.0, 100.0, 100.0, 1))
    assert "4.29 (spread unknown)" in terminal_table(comparison_rows([base, single]))


def test_ratio_timed_on_a_busy_machine_is_marked() -> None:
    base = speed_report("fp32", timing(40.0, 30.0, 60.0), timing(200.0, 190.0, 210.0))
    fast = speed_report("w4", timing(9.32, 9.0, 10.0), timing(100.0, 95.0, 105.0))
    fast.metrics["speed"]["load_avg_after"] = [4.0, 2.0, 1.0]  # twice the 2 CPUs' worth
    rows = comparison_rows([base, fast])
    assert rows[1]["speed_ratio_busy"] is True and rows[0]["speed_busy"] is False
    table = terminal_table(rows)
    assert "4.29 (busy)" in table and "2.00 (busy)" in table
    assert "'(busy)'" in table  # explained under the table
    assert "busy machine" in markdown_report([base, fast], "t")


# --------------------------------------------------------------------------- min/median/max


def test_defaults_time_at_least_three_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    import swiss_knife.demo as demo

    assert DEFAULT_REPEATS >= 3
    assert EvaluationConfig().speed.repeats >= 3
    monkeypatch.setattr(demo, "dense_demo_model", lambda out: out / "model")
    monkeypatch.setattr(
        demo, "_demo_texts", lambda out: ({"source": "e.txt"}, {"source": "c.txt"}, "note")
    )
    for quick in (True, False):
        recipes, _ = demo.demo_recipes(Path("/nonexistent"), quick=quick)
        assert all(recipe.evaluation.speed.repeats >= 3 for _, recipe in recipes)


def test_reports_show_min_median_max_and_load(tmp_path: Path) -> None:
    model = make_tiny_llama(seed=0)
    config = validate_dict(
        EvaluationConfig,
        {
            "perplexity": {"window": 32, "max_windows": 2},
            "speed": {"prompt_len": 8, "new_tokens": 2, "warmup": 0},
        },
        "test",
    )
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    report = evaluate(model, None, config, tokens=tokens, name="tiny")
    speed = report.metrics["speed"]
    decode = speed["batches"][0]["decode_per_token"]
    assert decode["repeats"] == 3 and len(decode["samples_ms"]) == 3
    assert decode["min_ms"] <= decode["median_ms"] <= decode["max_ms"]
    assert decode["min_ms"] == pytest.approx(min(decode["samples_ms"]), abs=1e-3)
    if hasattr(os, "getloadavg"):
        assert len(speed["load_avg_before"]) == 3 and len(speed["load_avg_after"]) == 3

    paths = write_reports(tmp_path, [report])
    range_cell = re.compile(r"\d+\.\d+ \[\d+\.\d+–\d+\.\d+\]")  # median [min–max]
    markdown = paths["markdown"].read_text(encoding="utf-8")
    html = paths["html"].read_text(encoding="utf-8")
    table = terminal_table(comparison_rows([report]))
    for text in (markdown, html, table):
        assert len(range_cell.findall(text)) >= 2, text  # prefill and decode
        assert "median [min–max]" in text
    for text in (markdown, html):
        assert "load average" in text
        assert "peak memory" in text and "not counted" in text  # the method is documented
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    stored = data["reports"][0]["metrics"]["speed"]["batches"][0]["prefill"]
    assert {"min_ms", "median_ms", "max_ms", "samples_ms"} <= set(stored)
    assert "load_avg_at_write" in data


def test_multi_batch_throughput_table_has_ranges() -> None:
    result = measure_speed(
        make_tiny_llama(seed=0), batch_sizes=(1, 2), prompt_len=8, new_tokens=2, warmup=0
    )
    report = EvaluationReport("tiny", None, None, metrics={"speed": result.to_dict()})
    markdown = markdown_report([report], "t")
    section = markdown.split("### Throughput of tiny")[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 2
    assert all(line.count("[") == 2 for line in rows)


# --------------------------------------------------------------------------- memory


def test_memory_does_not_include_earlier_models() -> None:
    # A: ~140 MB of fp32 weights (untied embeddings of a 32k vocabulary); B: a few KB.
    big = make_tiny_llama(
        seed=0,
        vocab_size=32_000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    small = make_tiny_llama(seed=1)
    big_weights = sum(parameter_bytes(big))
    assert big_weights > 120 * MB
    config = validate_dict(
        EvaluationConfig,
        {
            "perplexity": {"window": 32, "max_windows": 2},
            "speed": {"prompt_len": 8, "new_tokens": 2, "warmup": 0},
            "agreement": {"enabled": False},
        },
        "test",
    )
    tokens = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(0))

    def peak(model: torch.nn.Module) -> tuple[int, dict[str, Any]]:
        memory = evaluate(model, None, config, tokens=tokens).metrics["memory"]
        value = model_peak_bytes(memory)
        assert value is not None
        return value, memory

    # Both orders in one process; `big` stays alive throughout, as a baseline model does in
    # `compare` (and its 140 MB are in the process's RSS while `small` is measured).
    small_first, _ = peak(small)
    big_peak, _ = peak(big)
    small_after, memory = peak(small)
    assert memory["baseline_bytes"] > big_weights  # the process does hold the big model
    # Generous margins: a few MB of interpreter noise is fine, the big model's weights are not.
    assert small_first < 40 * MB
    assert small_after < 40 * MB
    assert abs(small_after - small_first) < 30 * MB
    assert big_peak >= big_weights
    row = comparison_rows(
        [
            EvaluationReport(
                "big", None, None, {"memory": {**memory, "model_peak_bytes": big_peak}}
            ),
            EvaluationReport("small", None, None, {"memory": memory}),
        ]
    )
    assert row[1]["peak_mem_mb"] < 40 < row[0]["peak_mem_mb"]


def test_old_reports_derive_the_model_peak() -> None:
    old = {"peak_bytes": 900, "baseline_bytes": 700, "parameter_bytes": 50, "buffer_bytes": 5}
    assert model_peak_bytes(old) == 255
    assert model_peak_bytes({"peak_bytes": 1}) is None


# --------------------------------------------------------------------------- progress


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "swiss_knife.progress"]


def test_progress_logs_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="swiss_knife")
    assert list(track(range(1000), "crunching", unit="item")) == list(range(1000))
    lines = progress_lines(caplog)
    assert lines[0] == "crunching: item 0/1000 (0%)"
    assert lines[-1].startswith("crunching: item 1000/1000 (100%)")
    assert any(line.startswith("crunching: item 500/1000 (50%)") for line in lines)
    assert len(lines) <= 12  # start, every tenth, end


def test_progress_unknown_total_interval_and_postfix(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="swiss_knife")
    with Progress("training", unit="step", interval_s=0.0) as bar:
        for _ in range(3):
            bar.update()
            bar.set_postfix({"loss": "1.23"})
    lines = progress_lines(caplog)
    assert lines[0] == "training: step 0"
    assert lines[-1].startswith("training: step 3") and lines[-1].endswith("loss=1.23")
    assert len(lines) == 4


def test_progress_disabled_or_quiet_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="swiss_knife")
    assert sum(track(range(10), "quiet", enabled=False)) == 45
    caplog.set_level(logging.WARNING, logger="swiss_knife")
    assert sum(track(range(10), "warnings only")) == 45
    assert progress_lines(caplog) == []


def test_importing_progress_stays_cheap() -> None:
    code = (
        "import sys, swiss_knife.progress; "
        "print(sorted(m for m in ('torch', 'tqdm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_logs_progress_when_stderr_is_a_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    log = tmp_path / "run.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "swiss_knife.cli", "evaluate", str(tiny_llama_dir),
        "--eval-data", str(text), "--window", "32", "--max-windows", "8", "--batch-size", "1",
        "--prompt-len", "8", "--new-tokens", "2", "--warmup", "0",
    ]  # fmt: skip
    with log.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, env=env, timeout=300)
    logged = log.read_text(encoding="utf-8")
    assert done.returncode == 0, logged
    assert "INFO swiss_knife.progress: perplexity: batch 0/8 (0%)" in logged
    assert "INFO swiss_knife.progress: perplexity: batch 8/8 (100%)" in logged
    assert "INFO swiss_knife.progress: speed: run 3/3 (100%)" in logged
    assert "\r" not in logged  # no bar redrawn into the log
    # The model is named before its measurements start.
    first = logged.index("measuring perplexity")
    assert logged.index("perplexity: batch 0/8") > first

    quiet = subprocess.run([*command, "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and "swiss_knife.progress" not in quiet.stderr


def test_pipeline_names_each_stage_before_it_runs(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = validate_dict(
        CompressionConfig,
        {
            "model": {"path": str(tiny_llama_dir), "device": "cpu"},
            "evaluation": {"perplexity": {"enabled": False}, "speed": {"enabled": False}},
            "evaluate_original": False,
            "stages": [{"type": "cast", "dtype": "bf16", "name": "half"}],
        },
        "test",
    )
    caplog.set_level(logging.INFO, logger="swiss_knife")
    run_recipe(recipe, tmp_path / "run", progress=True)
    messages = [r.getMessage() for r in caplog.records]
    start = messages.index("stage 1/1: half (cast)")
    assert messages.index("evaluating half") > start


def test_distillation_steps_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from swiss_knife.compression.distillation.api import distill
    from swiss_knife.config import DistillConfig

    cfg = validate_dict(
        DistillConfig,
        {"seq_len": 16, "batch_size": 2, "max_steps": 20, "eval_every": 0, "save_every": 0},
        "test",
    )
    stream = torch.randint(4, 128, (2000,), generator=torch.Generator().manual_seed(0))
    teacher = make_tiny_llama(seed=0)
    caplog.set_level(logging.INFO, logger="swiss_knife")
    distill(teacher, make_tiny_llama(seed=1), cfg, train_data=stream, output_dir=tmp_path)
    lines = [line for line in progress_lines(caplog) if line.startswith("distill:")]
    assert lines[0] == "distill: step 0/20 (0%)"
    assert lines[-1].startswith("distill: step 20/20 (100%)")
    assert "loss=" in lines[-1]
    assert 3 <= len(lines) <= 12
