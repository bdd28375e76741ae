"""Pruning: Swiss Knife's magnitude, Wanda and SparseGPT side by side with llm-compressor.

What is compared
----------------
The same two models and data as ``benchmarks/quantization.py`` (whose preparation, worker and
evaluation helpers this script imports): **SmolLM2-135M-Instruct** (its Q4_1 GGUF dequantised to
a dense fp32 checkpoint; perplexity on WikiText-2 raw test, calibration on seeded 512-token
windows of WikiText-2 valid) and **stories260K** (perplexity on the head of TinyStories
validation, calibration on the rest of that file).

Rows: Swiss Knife's ``prune(model, Config, calibration=ids)`` with magnitude (per layer), Wanda
and SparseGPT at 50 % unstructured and 2:4, and Wanda / SparseGPT with OWL's outlier-weighted
allocation (threshold 5, lambda 0.08) at 50 %; llm-compressor's ``WandaPruningModifier`` and
``SparseGPTModifier`` with the same settings (``benchmarks/_llmc_prune.py``, in its own virtual
environment because it pins its own transformers). Every calibrated method, ours and
llm-compressor's, gets the *same* token tensor (saved once with ``torch.save``). Both tools prune
every linear of the decoder blocks but ``lm_head``, one block after the other, each block
calibrated on the outputs of the already-pruned blocks before it, all linears of a block observed
in one pass (Swiss Knife's ``true_sequential`` is off, as llm-compressor's pipeline does it).

Two informational rows per method (no floor, their own aims) show Swiss Knife's faster walks at
50 %: ``precision: bf16`` (block passes under bf16 autocast, statistics and weights fp32) and
``true_sequential`` with the calibration set in one mini-batch, which the engine walks in one
pass per block (each linear pruned just before it runs, no replay pass).

Our SparseGPT differs from the paper's in two defaults, and its informational rows separate them:

* it re-fits each layer's kept weights once the paper's algorithm has chosen the mask
  (``refit_iterations: 5`` conjugate-gradient steps on the same damped least-squares objective,
  mask fixed); llm-compressor's modifier runs the paper's algorithm alone. "SparseGPT 50%, no
  refit" (``refit_iterations: 0``) is that algorithm in our code;
* its calibration precision defaults to ``auto``: the block passes run under bf16 autocast on
  CPUs with AVX-512 BF16 or AMX (this one has AVX-512 BF16) and GPUs with bf16 tensor cores, in
  fp32 elsewhere; Hessians, solves and weights stay fp32. "SparseGPT 50%, fp32 passes" pins fp32.
  The notes under each table say which rows ran bf16 passes. Wanda keeps fp32 passes by default.

Pruning outcomes move by 1-3 % in perplexity with float summation order alone (thread count,
bf16 rounding), so one calibration set decides little. ``--calib-seeds 0 1 2`` runs every
calibrated row, ours and llm-compressor's, once per calibration sampler seed (identical tensors
for both tools within a seed) and reports the mean perplexity (range in brackets) and the median
prune time; the floors compare those.

Structured pruning (MLP channels, attention heads) and layer reduction make physically smaller
models whose speed must be timed against the original with care; ``benchmarks/structured.py``
measures them (perplexity before healing, size, prefill/decode speedup). ``--structured`` runs it
after the rows above, in the same invocation, with the same models and counts.

How it is measured
------------------
* Each row is pruned in a fresh worker process (ours: this script with ``--worker``), which loads
  the dense checkpoint, prunes, and saves a dense checkpoint; ours then also saves the same model
  in the compressed-tensors sparse-bitmask layout for the size column (llm-compressor no longer
  writes sparse checkpoints). *Prune s* is the wall time of the ``prune(...)`` / ``oneshot(...)``
  call alone, with the CPU seconds (user + system, all threads) it used in brackets; *Peak RSS*
  the worker's whole-process peak resident memory (``VmHWM``: imports, model, pruning, the
  dense save; read before our extra sparse-bitmask copy).
* Evaluation runs in this process on the *saved* checkpoints reloaded with ``load_model``:
  perplexity (non-overlapping windows), sparsity measured on the reloaded weights (exact zeros in
  the block linears), prefill/decode speed (batch 1; unstructured sparsity is not expected to
  change it: the table shows it), size of the weight files. The sparse-bitmask copy is reloaded
  too and must equal the dense checkpoint weight for weight.
* The CPU is shared and its load varies: the load average is recorded before and after each
  prune call, and ours and llm-compressor's rows alternate so both see similar load.

Usage::

    python benchmarks/pruning.py --quick          # stories260K, small counts (smoke)
    python benchmarks/pruning.py --models smollm2 --calib-samples 64 --eval-windows 20
    python benchmarks/pruning.py --skip-llmc      # without llm-compressor
    python benchmarks/pruning.py --models smollm2 stories260k --calib-samples 16 \
        --eval-windows 10 --calib-seeds 0 1      # the RESULTS.md run, about 35 min
    python benchmarks/pruning.py --structured     # and then benchmarks/structured.py

The tables and the PASS/FAIL list of the floors are printed and written between the ``pruning``
markers of benchmarks/RESULTS.md (unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantization import (
    DEFAULT_VENV,
    PREPARE,
    T0,
    Case,
    Prepared,
    cpu_model,
    cpu_seconds,
    ensure_llmc_venv,
    fmt,
    llmc_versions_text,
    load_avg,
    log,
    matches,
    max_rss,
    num_parameters,
    pkg,
    run_logged,
    streamed_worker,
    verdict,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
LLMC_WORKER = REPO / "benchmarks" / "_llmc_prune.py"
MARK_START = "<!-- pruning:start -->"
MARK_END = "<!-- pruning:end -->"

SK = "Swiss Knife"
LLMC = "llm-compressor"
OWL_M, OWL_LAMBDA = 5, 0.08
# Perplexities within this relative difference count as equal in the "no worse" floors: the same
# algorithm run by both tools lands this close through float summation order alone (stories260K
# SparseGPT 2:4: 34.003986 vs 34.003983).
TIE = 1e-5


@dataclass(frozen=True)
class Variant:
    """One pruned model to build: which tool, which settings."""

    label: str
    tool: str
    family: str  # "dense", "50% unstructured", "2:4", "structured", "layers"
    kind: str  # "dense", "ours", "llmc"
    stage: dict[str, Any] | None = None  # ours: a recipe stage (type prune, reduce_layers, ...)
    llmc_args: tuple[str, ...] = ()  # llmc: worker flags
    role: str = ""  # the part it plays in the floors; ours and llm-compressor's share a role
    stream: bool = False  # ours: sk.compress_checkpoint(stream="on") from disk to disk


@dataclass
class Row:
    """Everything measured for one variant of one case."""

    variant: Variant
    ppl: float | None = None
    tokens_scored: int = 0
    sparsity: float | None = None  # measured: exact zeros in the block linears
    disk_bytes: int | None = None
    sparse_bytes: int | None = None  # the sparse-bitmask copy (ours, unstructured)
    sparse_exact: bool | None = None  # the sparse-bitmask copy reloads to the same weights
    prune_s: float | None = None
    cpu_s: float | None = None
    peak_rss: int | None = None
    load: tuple[float, float] | None = None
    prefill_tps: float | None = None
    decode_ms: float | None = None
    error: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)
    # With several calibration seeds: each seed's perplexity and prune time (ppl is their mean,
    # prune_s their median).
    seed_ppls: list[float] = field(default_factory=list)
    seed_times: list[float] = field(default_factory=list)


def calibrated(variant: Variant) -> bool:
    """Whether the variant's result depends on the calibration data."""
    if variant.kind == "llmc":
        return True
    return variant.kind == "ours" and (variant.stage or {}).get("method") != "magnitude"


def merge_seeds(runs: list[Row]) -> Row:
    """One row from the same variant run on several calibration seeds: mean perplexity,
    median prune time and CPU time, highest peak memory; the first run's other facts."""
    first = runs[0]
    failed = next((r for r in runs if r.error), None)
    if len(runs) == 1 or failed is not None:
        return failed or first
    ppls = [r.ppl for r in runs if r.ppl is not None]
    times = [r.prune_s for r in runs if r.prune_s is not None]
    cpus = [r.cpu_s for r in runs if r.cpu_s is not None]
    merged = dataclasses.replace(first)
    merged.ppl = statistics.fmean(ppls)
    merged.prune_s = statistics.median(times) if times else None
    merged.cpu_s = statistics.median(cpus) if cpus else None
    merged.peak_rss = max((r.peak_rss for r in runs if r.peak_rss is not None), default=None)
    merged.seed_ppls, merged.seed_times = ppls, times
    return merged


def variants(case: Case, *, include_llmc: bool) -> list[Variant]:
    """Every configuration run on ``case``, baseline first; llm-compressor next to its match."""
    calibration = {"num_samples": case.calib_samples, "seq_len": case.seq_len}

    def ours(label: str, family: str, role: str, stream: bool = False, **stage: Any) -> Variant:
        full = {"type": "prune", "calibration": calibration, **stage}
        return Variant(label, SK, family, "ours", stage=full, role=role, stream=stream)

    def peer(label: str, family: str, role: str, *flags: str) -> Variant:
        return Variant(label, LLMC, family, "llmc", llmc_args=flags, role=role)

    rows = [Variant("dense fp32", "—", "dense", "dense")]
    rows.append(ours("magnitude 50%", "50% unstructured", "magnitude-50", method="magnitude"))
    rows.append(ours("magnitude 2:4", "2:4", "magnitude-2:4", method="magnitude", pattern="2:4"))
    for method, title in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
        pairs = [
            (f"{title} 50%", "50% unstructured", f"{method}-50", {"sparsity": 0.5}, ()),
            (f"{title} 2:4", "2:4", f"{method}-2:4", {"pattern": "2:4"}, ("--mask-structure=2:4",)),
            (
                f"{title} 50% + OWL",
                "50% unstructured",
                f"{method}-owl",
                {
                    "sparsity": 0.5,
                    "allocation": "owl",
                    "owl_threshold": OWL_M,
                    "owl_lambda": OWL_LAMBDA,
                },
                ("--owl", f"--owl-m={OWL_M}", f"--owl-lambda={OWL_LAMBDA}"),
            ),
        ]
        for label, family, role, fields, flags in pairs:
            rows.append(ours(label, family, role, method=method, **fields))
            if include_llmc:
                rows.append(
                    peer(label, family, role, f"--method={method}", "--sparsity=0.5", *flags)
                )
        # The same 50 % settings streamed from disk to disk, one block in memory at a time (the
        # command line's default for a checkpoint on disk).
        rows.append(ours(f"{title} 50% streamed from disk", "50% unstructured",
                         f"{method}-50-streamed", stream=True, method=method, sparsity=0.5))  # fmt: skip
        # Informational (no floor): the two faster walks at 50 %. bf16 autocast for the block
        # passes; true-sequential with the whole calibration set in one mini-batch, which the
        # engine walks in one pass per block (each linear pruned just before it runs).
        fast = (
            ("bf16 passes", "bf16", {"calibration": {**calibration, "precision": "bf16"}}),
            (
                "true sequential, one pass",
                "onepass",
                {
                    "true_sequential": True,
                    "calibration": {**calibration, "batch_size": case.calib_samples},
                },
            ),
        )
        if method == "sparsegpt":
            # SparseGPT's default precision is auto (bf16 passes where bf16 is native), so its
            # informational rows are: the paper's algorithm without our conjugate-gradient re-fit
            # of the kept weights (what llm-compressor's modifier runs), fp32 passes, one pass.
            fast = (
                ("no refit", "norefit", {"refit_iterations": 0}),
                ("fp32 passes", "fp32", {"calibration": {**calibration, "precision": "fp32"}}),
                fast[1],
            )
        for suffix, tag, fields in fast:
            rows.append(
                ours(
                    f"{title} 50%, {suffix}",
                    "50% unstructured",
                    f"{method}-50-{tag}",
                    method=method,
                    sparsity=0.5,
                    **fields,
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Workers


def run_prune_stage(stage: dict[str, Any], model: Any, calibration: torch.Tensor) -> Any:
    """``prune()`` for a ``type: prune`` stage; returns its PruneOutcome."""
    from pydantic import TypeAdapter

    from swiss_knife.compression.pruning import prune
    from swiss_knife.config import PruneConfig

    config: Any = TypeAdapter(PruneConfig).validate_python(stage)
    return prune(model, config, calibration=calibration)


def worker_main(spec_file: Path) -> None:
    """Prune one model with Swiss Knife, save it dense (and sparse-bitmask when unstructured)."""
    started = time.perf_counter()
    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    from swiss_knife.compression.pruning.sparse_format import save_sparse_bitmask
    from swiss_knife.evaluation.memory import PeakMemory
    from swiss_knife.models import load_model, save_model

    stage = spec["stage"]
    if spec.get("stream"):
        result: dict[str, Any] = {"threads": torch.get_num_threads()}
        peak, _ = streamed_worker(spec, result)
        result.update(process_max_rss_bytes=max_rss(), save_seconds=0.0,
                      process_seconds=time.perf_counter() - started,
                      rss_before_bytes=peak.baseline_bytes, rss_peak_bytes=peak.peak_bytes)  # fmt: skip
        Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str) + "\n")
        return
    loaded = load_model(spec["model_dir"], dtype="fp32", device="cpu")
    calibration = torch.load(spec["calibration"])
    result = {"threads": torch.get_num_threads(), "max_rss_after_load_bytes": max_rss()}
    with PeakMemory("cpu") as peak:
        load, cpu = os.getloadavg()[0], cpu_seconds()
        start = time.perf_counter()
        outcome = run_prune_stage(stage, loaded.model, calibration)
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = cpu_seconds() - cpu
        result["loadavg_before_after"] = [load, os.getloadavg()[0]]
    save_start = time.perf_counter()
    save_model(outcome.model, spec["output_dir"], writer=outcome.writer, tokenizer=loaded.tokenizer)
    result["save_seconds"] = time.perf_counter() - save_start
    # Measured before the extra sparse-bitmask copy below, which llm-compressor does not make:
    # both peaks cover imports, model, pruning and one dense save.
    result["process_max_rss_bytes"] = max_rss()
    report = outcome.report
    if outcome.format == "dense" and "per_layer" in report:
        names = [row["name"] for row in report["per_layer"]]
        save_sparse_bitmask(outcome.model, names, spec["output_dir"] + "-sparse")
    result.update(
        steps=outcome.steps,
        format=outcome.format,
        report={
            k: report[k]
            for k in (
                "overall_sparsity",
                "calibration_seconds",
                "calibration_tokens",
                "calibration_precision",
                "owl",
            )
            if k in report
        },
        process_seconds=time.perf_counter() - started,
        rss_before_bytes=peak.baseline_bytes,
        rss_peak_bytes=peak.peak_bytes,
    )
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str) + "\n")


def prune_variant(
    variant: Variant, prepared: Prepared, out_dir: Path, args: argparse.Namespace, llmc: Path | None
) -> tuple[dict[str, Any] | None, str | None]:
    """Run the worker for ``variant``; ``(its JSON result, None)`` or ``(None, error)``."""
    result_file = out_dir.with_suffix(".json")
    log_file = out_dir.with_suffix(".log")
    if variant.kind == "llmc":
        assert llmc is not None
        command = [
            str(llmc),
            str(LLMC_WORKER),
            f"--model-dir={prepared.dense_dir}",
            f"--calibration={prepared.calibration_file}",
            *variant.llmc_args,
            f"--output-dir={out_dir}",
            f"--result={result_file}",
            f"--threads={args.threads}",
        ]
    else:
        spec = {
            "stage": variant.stage,
            "model_dir": str(prepared.dense_dir),
            "calibration": str(prepared.calibration_file),
            "output_dir": str(out_dir),
            "result": str(result_file),
            "threads": args.threads,
            "stream": variant.stream,
        }
        spec_file = out_dir.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(spec, indent=2))
        command = [args.ours_python, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    error = run_logged(command, log_file)
    if error is not None:
        return None, f"{error} (log: {log_file})"
    return json.loads(result_file.read_text()), None


# --------------------------------------------------------------------------------------------
# Evaluation


# Rows whose speed is measured: the baseline, and models that are physically smaller. Unstructured
# and N:M sparsity keep dense tensors and run the same kernels; on a shared CPU their timings
# would only show its noise.
SPEED_FAMILIES = ("dense", "structured", "layers")


def evaluate_pruned(
    path: Path, tokens: torch.Tensor, case: Case, args: argparse.Namespace, *, speed: bool
) -> dict[str, Any]:
    """Perplexity, measured sparsity, disk size (and speed) of the checkpoint in ``path``, and
    its state dict for the sparse-bitmask comparison."""
    from swiss_knife.arch import iter_target_linears
    from swiss_knife.evaluation.perplexity import perplexity
    from swiss_knife.evaluation.size import weight_files
    from swiss_knife.evaluation.speed import measure_speed
    from swiss_knife.models import load_model

    model = load_model(str(path), dtype="auto", device="cpu", with_tokenizer=False).model
    try:
        ppl = perplexity(model, tokens, window=case.seq_len, batch_size=args.eval_batch_size)
        zeros = total = 0
        for _, module in iter_target_linears(model):
            zeros += module.weight.numel() - int(torch.count_nonzero(module.weight))
            total += module.weight.numel()
        result: dict[str, Any] = {
            "ppl": ppl.perplexity,
            "tokens_scored": ppl.tokens_scored,
            "sparsity": zeros / max(total, 1),
            "disk_bytes": sum(f.stat().st_size for f in weight_files(path)),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        }
        if speed:
            timing = measure_speed(
                model,
                batch_sizes=(1,),
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                warmup=1,
                repeats=args.speed_repeats,
            ).batches[0]
            result["prefill_tps"] = timing.prefill_tokens_per_s
            result["decode_ms"] = timing.decode_per_token.median_ms
    finally:
        del model
        gc.collect()
    return result


def same_weights(path: Path, reference: dict[str, torch.Tensor]) -> bool:
    from swiss_knife.models import load_model

    model = load_model(str(path), dtype="auto", device="cpu", with_tokenizer=False).model
    state = model.state_dict()
    same = state.keys() == reference.keys() and all(
        torch.equal(state[k], reference[k]) for k in state
    )
    del model
    gc.collect()
    return same


def run_case(
    case: Case, args: argparse.Namespace, llmc: Path | None, root: Path
) -> tuple[list[Row], Prepared, int]:
    """Every variant of `case`; calibrated ones once per calibration seed, then merged."""
    runs: dict[str, list[Row]] = {}
    first: tuple[Prepared, int] | None = None
    for number, seed in enumerate(args.calib_seeds):
        seeded = dataclasses.replace(case, seed=seed)
        workdir = root / case.key / f"seed{seed}"
        rows, prepared, params = run_seed(seeded, args, llmc, workdir, first_seed=number == 0)
        first = first or (prepared, params)
        for row in rows:
            runs.setdefault(describe(row.variant), []).append(row)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    assert first is not None
    return [merge_seeds(group) for group in runs.values()], *first


def run_seed(
    case: Case, args: argparse.Namespace, llmc: Path | None, workdir: Path, *, first_seed: bool
) -> tuple[list[Row], Prepared, int]:
    """The variants of `case` on its calibration seed (after the first seed, only those whose
    result depends on the calibration data)."""
    from swiss_knife.evaluation.size import weight_files

    workdir.mkdir(parents=True)
    log(f"[{case.key}] seed {case.seed}: preparing the dense fp32 checkpoint and token tensors...")
    prepared = PREPARE[case.key](case, workdir)
    params = num_parameters(prepared.dense_dir)
    log(
        f"[{case.key}] {params:,} parameters; eval {tuple(prepared.eval_tokens.shape)}, "
        f"calibration {tuple(prepared.calibration.shape)}"
    )
    rows: list[Row] = []
    for index, variant in enumerate(variants(case, include_llmc=llmc is not None)):
        name = describe(variant)
        if args.only and variant.kind != "dense" and not matches(name, args.only):
            continue
        if not first_seed and not calibrated(variant):
            continue
        row = Row(variant)
        rows.append(row)
        path = prepared.dense_dir
        if variant.kind != "dense":
            out = workdir / f"p{index:02d}"
            log(f"[{case.key}] pruning: {name}")
            result, error = prune_variant(variant, prepared, out, args, llmc)
            if error is not None:
                row.error = f"pruning failed: {error}"
                log(f"    {row.error}")
                continue
            assert result is not None
            row.worker = result
            row.prune_s = result["seconds"]
            row.cpu_s = result.get("cpu_seconds")
            row.peak_rss = result["process_max_rss_bytes"]
            before, after = result["loadavg_before_after"]
            row.load = (float(before), float(after))
            log(
                f"    {row.prune_s:.1f} s ({row.cpu_s:.0f} CPU s), peak RSS "
                f"{row.peak_rss / 2**30:.2f} GiB, load {before:.1f} -> {after:.1f}"
            )
            path = out
        log(f"[{case.key}] evaluating: {name}")
        try:
            speed = variant.family in SPEED_FAMILIES
            measured = evaluate_pruned(path, prepared.eval_tokens, case, args, speed=speed)
            sparse = Path(str(path) + "-sparse")
            if sparse.is_dir():
                row.sparse_bytes = sum(f.stat().st_size for f in weight_files(sparse))
                row.sparse_exact = same_weights(sparse, measured["state"])
            del measured["state"]
        except Exception as exc:  # a checkpoint that does not reload is a result too
            row.error = f"reload/evaluation failed: {type(exc).__name__}: {exc}"[:600]
            log(f"    {row.error}")
            continue
        row.ppl = measured["ppl"]
        row.tokens_scored = measured["tokens_scored"]
        row.sparsity = measured["sparsity"]
        row.disk_bytes = measured["disk_bytes"]
        row.prefill_tps = measured.get("prefill_tps")
        row.decode_ms = measured.get("decode_ms")
        log(
            f"    ppl {row.ppl:.3f}, sparsity {row.sparsity:.2%}, "
            f"{row.disk_bytes / 1e6:.1f} MB dense"
            + (f", {row.sparse_bytes / 1e6:.1f} MB sparse-bitmask" if row.sparse_bytes else "")
        )
        if variant.kind != "dense" and not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(str(path) + "-sparse", ignore_errors=True)
    return rows, prepared, params


# --------------------------------------------------------------------------------------------
# Floors and reporting


def describe(variant: Variant) -> str:
    return f"{variant.tool}: {variant.label}" if variant.tool != "—" else variant.label


def by_role(rows: list[Row], role: str, tool: str) -> Row | None:
    return next(
        (r for r in rows if r.variant.role == role and r.variant.tool == tool and r.ppl), None
    )


def baseline(rows: list[Row]) -> Row:
    base = next(r for r in rows if r.variant.kind == "dense")
    if base.ppl is None:
        raise SystemExit(f"the dense baseline failed: {base.error}")
    return base


def floors(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    """``(check, passed or None when a row is missing, the numbers)`` for every floor and aim."""
    out: list[tuple[str, bool | None, str]] = []
    for role in (
        "wanda-50",
        "wanda-2:4",
        "sparsegpt-50",
        "sparsegpt-2:4",
        "wanda-owl",
        "sparsegpt-owl",
    ):
        ours, peer = by_role(rows, role, SK), by_role(rows, role, LLMC)
        check = f"{role}: perplexity ≤ llm-compressor's, in less wall time"
        if ours is None or peer is None:
            out.append((check, None, "missing row(s)"))
            continue
        assert ours.ppl and peer.ppl and ours.prune_s and peer.prune_s
        tie = peer.ppl < ours.ppl <= peer.ppl * (1 + TIE)
        ok = (ours.ppl <= peer.ppl or tie) and ours.prune_s < peer.prune_s
        numbers = (
            f"ppl {ours.ppl:.3f} vs {peer.ppl:.3f}"
            + (f" (equal within {TIE:.0e} relative)" if tie else "")
            + f"; {ours.prune_s:.1f} s vs "
            f"{peer.prune_s:.1f} s ({ours.prune_s / peer.prune_s:.2f}×); CPU s "
            f"{fmt(ours.cpu_s, '.0f')} vs {fmt(peer.cpu_s, '.0f')}"
        )
        if ours.seed_ppls:
            numbers += (
                f"; per seed ppl {', '.join(f'{p:.2f}' for p in ours.seed_ppls)} vs "
                f"{', '.join(f'{p:.2f}' for p in peer.seed_ppls)}, ours lower on "
                f"{sum(a < b for a, b in zip(ours.seed_ppls, peer.seed_ppls, strict=False))} "
                f"of {len(ours.seed_ppls)}"
            )
        out.append((check, ok, numbers))
    for pattern in ("50", "2:4"):
        magnitude = by_role(rows, f"magnitude-{pattern}", SK)
        for method in ("wanda", "sparsegpt"):
            row = by_role(rows, f"{method}-{pattern}", SK)
            check = f"ours: {method} {pattern} perplexity < magnitude {pattern}"
            if row is None or magnitude is None:
                out.append((check, None, "missing row(s)"))
                continue
            assert row.ppl and magnitude.ppl
            out.append((check, row.ppl < magnitude.ppl, f"{row.ppl:.3f} vs {magnitude.ppl:.3f}"))
    sparse = [r for r in rows if r.sparse_bytes is not None]
    check = "sparse-bitmask checkpoints are smaller than dense and reload to the same weights"
    if sparse:
        ok = all(r.sparse_exact and r.disk_bytes and r.sparse_bytes < r.disk_bytes for r in sparse)
        ratios = [r.sparse_bytes / r.disk_bytes for r in sparse if r.sparse_bytes and r.disk_bytes]
        out.append(
            (check, ok, f"{len(sparse)} rows, size ratio {min(ratios):.2f}–{max(ratios):.2f}")
        )
    else:
        out.append((check, None, "no sparse-bitmask copies"))
    # Aims: half llm-compressor's time and memory; better perplexity through OWL than its
    # uniform result.
    for method in ("wanda", "sparsegpt"):
        ours, peer = by_role(rows, f"{method}-50", SK), by_role(rows, f"{method}-50", LLMC)
        owl = by_role(rows, f"{method}-owl", SK)
        if not (
            ours and peer and ours.prune_s and peer.prune_s and ours.peak_rss and peer.peak_rss
        ):
            continue
        parts = {
            "time ≤ 0.5×": ours.prune_s <= 0.5 * peer.prune_s,
            "peak RSS ≤ 0.5×": ours.peak_rss <= 0.5 * peer.peak_rss,
        }
        numbers = (
            f"time {ours.prune_s:.1f} vs {peer.prune_s:.1f} s; peak RSS "
            f"{ours.peak_rss / 2**30:.2f} vs {peer.peak_rss / 2**30:.2f} GiB"
        )
        if owl is not None and owl.ppl and peer.ppl:
            parts["OWL ppl < its uniform ppl"] = owl.ppl < peer.ppl
            numbers += f"; ours with OWL {owl.ppl:.3f} vs its uniform {peer.ppl:.3f}"
        numbers += "; " + ", ".join(f"{k} {verdict(v)}" for k, v in parts.items())
        out.append(
            (f"Aim (not a floor): {method} 50% vs llm-compressor", all(parts.values()), numbers)
        )
        for tag, what in (
            ("norefit", "no refit"),
            ("fp32", "fp32 passes"),
            ("bf16", "bf16 passes"),
            ("onepass", "true sequential, one pass"),
        ):
            fast = by_role(rows, f"{method}-50-{tag}", SK)
            if fast is None or not (fast.ppl and fast.prune_s and fast.peak_rss):
                continue
            aims = {
                "time ≤ 0.5×": fast.prune_s <= 0.5 * peer.prune_s,
                "peak RSS ≤ 0.5×": fast.peak_rss <= 0.5 * peer.peak_rss,
                "ppl ≤ its ppl": fast.ppl <= peer.ppl,
            }
            out.append(
                (
                    f"Aim (not a floor): {method} 50%, {what}, vs llm-compressor",
                    all(aims.values()),
                    f"ppl {fast.ppl:.3f} vs {peer.ppl:.3f}; time {fast.prune_s:.1f} vs "
                    f"{peer.prune_s:.1f} s ({fast.prune_s / peer.prune_s:.2f}×); peak RSS "
                    f"{fast.peak_rss / 2**30:.2f} vs {peer.peak_rss / 2**30:.2f} GiB; "
                    + ", ".join(f"{k} {verdict(v)}" for k, v in aims.items()),
                )
            )
    return out


def table(rows: list[Row]) -> str:
    base = baseline(rows)
    assert base.ppl and base.prefill_tps and base.decode_ms
    head = (
        "| Method | Tool | Sparsity | Perplexity | Δ vs dense | Prune s (CPU s) | Peak RSS GiB "
        "| Disk MB dense | Disk MB sparse-bitmask | Prefill tok/s (×dense) "
        "| Decode ms/token (×dense) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(
                f"| {r.variant.label} | {r.variant.tool} | {short_error(r.error)} ||||||||\n"
            )
            continue
        assert r.ppl and r.disk_bytes
        change = "—" if r is base else f"{(r.ppl / base.ppl - 1) * 100:+.1f} %"
        ppl_cell = f"{r.ppl:.3f}"
        if r.seed_ppls:
            ppl_cell += f" ({min(r.seed_ppls):.2f}–{max(r.seed_ppls):.2f})"
        prune_cell = "—" if r.prune_s is None else f"{r.prune_s:.1f} ({fmt(r.cpu_s, '.0f')})"
        sparse_cell = "—"
        if r.sparse_bytes is not None:
            sparse_cell = f"{r.sparse_bytes / 1e6:.1f}" + ("" if r.sparse_exact else " (MISMATCH)")
        lines.append(
            f"| {r.variant.label} | {r.variant.tool} | {fmt(r.sparsity, '.2%')} | {ppl_cell} "
            f"| {change} | {prune_cell} "
            f"| {fmt(None if r.peak_rss is None else r.peak_rss / 2**30, '.2f')} "
            f"| {r.disk_bytes / 1e6:.1f} | {sparse_cell} "
            f"| {speed_cells(r, base)} |\n"
        )
    return head + "".join(lines)


KNOWN_FAILURES = {
    "Cannot invoke event before initializing": (
        "llm-compressor 0.14's OWL (`sparsity_profile='owl'`) fails before pruning: its "
        "outlier pre-pass runs the calibration pipeline from inside the modifier's "
        "initialisation, which fires lifecycle events the session refuses before it is "
        "initialised (ValueError: Cannot invoke event before initializing)."
    ),
}


def short_error(error: str) -> str:
    """The last line of a worker's error (the full text is in the JSON output and the log)."""
    last = error.split(" / ")[-1].split(" (log: ")[0]
    return f"failed: {last}" if last != error else error[:200]


def notes(rows: list[Row]) -> list[str]:
    """Footnotes explaining the failures seen before."""
    seen = {key for r in rows if r.error for key in KNOWN_FAILURES if key in r.error}
    lines = [f"- {KNOWN_FAILURES[key]}" for key in sorted(seen)]
    passes = {
        r.variant.label: r.worker.get("report", {}).get("calibration_precision")
        for r in rows
        if r.variant.kind == "ours"
    }
    bf16 = [label for label, precision in passes.items() if precision == "bf16-autocast"]
    if bf16:
        lines.append(
            "- Block passes under bf16 autocast (the resolved calibration precision; every other "
            f"row of ours ran them in float32): {', '.join(bf16)}."
        )
    return lines


def speed_cells(row: Row, base: Row) -> str:
    if row.prefill_tps is None or row.decode_ms is None:
        return "dense kernels, as dense | dense kernels, as dense"
    assert base.prefill_tps and base.decode_ms
    return (
        f"{row.prefill_tps:.0f} ({row.prefill_tps / base.prefill_tps:.2f}×) "
        f"| {row.decode_ms:.1f} ({base.decode_ms / row.decode_ms:.2f}×)"
    )


def case_section(
    case: Case, rows: list[Row], prepared: Prepared, params: int, seeds: list[int]
) -> str:
    n, length = prepared.calibration.shape
    lines = [
        f"### {case.title}",
        "",
        table(rows),
        f"- Perplexity: {prepared.eval_source}; {case.eval_windows} windows × {case.seq_len} "
        f"tokens, non-overlapping, {baseline(rows).tokens_scored:,} tokens scored.",
        f"- Calibration (identical token tensor for every calibrated row, ours and "
        f"llm-compressor's): {n} × {length} tokens of {prepared.calib_source}"
        + (
            f"; every calibrated row was run with sampler seeds {', '.join(map(str, seeds))}: "
            "its perplexity is the mean over seeds (range in brackets) and its prune time the "
            "median."
            if len(seeds) > 1
            else "."
        ),
        f"- {params:,} parameters; sparsity = exact zeros in the decoder-block linears of the "
        "reloaded checkpoint (embeddings, norms and the tied head stay dense).",
        "- Load average (1 min) before → after each prune call: "
        + "; ".join(
            f"{r.variant.tool} {r.variant.label} {r.load[0]:.1f} → {r.load[1]:.1f}"
            for r in rows
            if r.load is not None
        )
        + ".",
        *notes(rows),
        "",
        "Floors:",
        "",
        *(f"- {verdict(ok)}: {check} — {numbers}" for check, ok, numbers in floors(rows)),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pruning: Swiss Knife vs llm-compressor's Wanda and SparseGPT, side by side."
    )
    parser.add_argument("--quick", action="store_true", help="stories260K, small sample counts")
    parser.add_argument("--skip-llmc", action="store_true", help="do not run llm-compressor")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("smollm2", "stories260k"),
        default=None,
        help="models to run (default both; --quick: stories260k)",
    )
    parser.add_argument(
        "--calib-samples", type=int, default=None, help="calibration windows (128; --quick 16)"
    )
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="perplexity windows (40; --quick 8)"
    )
    parser.add_argument(
        "--calib-seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="run every calibrated row once per calibration sampler seed and report the mean "
        "perplexity and median time (default: 0)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--eval-batch-size", type=int, default=4, help="windows per forward")
    parser.add_argument("--prompt-len", type=int, default=128, help="speed: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="speed: decode steps")
    parser.add_argument(
        "--speed-repeats", type=int, default=None, help="timed speed runs (default 3; --quick 2)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="run only the variants whose 'Tool: label' contains one of these strings (one ending in $: ends with it)",
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llm-compressor venv")
    parser.add_argument(
        "--ours-python",
        default=sys.executable,
        help="Python that runs our workers (default: this one); samples.py passes the venv "
        "with Swiss Knife's base install only (quantization.ensure_base_venv)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep checkpoints and logs here")
    parser.add_argument("--json", type=Path, default=None, help="also write all rows as JSON")
    parser.add_argument(
        "--no-write", dest="write", action="store_false", help="do not update RESULTS.md"
    )
    parser.add_argument(
        "--structured",
        action="store_true",
        help="then run benchmarks/structured.py (structured pruning, layer reduction, speed)",
    )
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.calib_samples = args.calib_samples or (16 if quick else 128)
    args.eval_windows = args.eval_windows or (8 if quick else 40)
    args.speed_repeats = args.speed_repeats or (2 if quick else 3)
    args.models = args.models or (["stories260k"] if quick else ["smollm2", "stories260k"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    command = shlex.join(["python", "benchmarks/pruning.py", *sys.argv[1:]])
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    load_start = load_avg()
    started = dt.datetime.now().astimezone()
    titles = {
        "smollm2": "SmolLM2-135M-Instruct (WikiText-2)",
        "stories260k": "stories260K (TinyStories)",
    }
    cases = [
        Case(key, titles[key], None, args.eval_windows, args.calib_samples, args.seq_len)
        for key in args.models
    ]
    llmc = None if args.skip_llmc else ensure_llmc_venv(args.venv)
    log(f"load average at start (1/5/15 min): {load_start}")

    root_ctx = tempfile.TemporaryDirectory(prefix="sk-bench-prune-")
    root = Path(root_ctx.name)
    if args.keep is not None:
        root = args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
    results: list[tuple[Case, list[Row], Prepared, int]] = []
    try:
        for case in cases:
            rows, prepared, params = run_case(case, args, llmc, root)
            results.append((case, rows, prepared, params))
            print(f"\n{case.title}\n")
            print(table(rows))
            for check, ok, numbers in floors(rows):
                print(f"{verdict(ok)}: {check} — {numbers}")
            print()
    finally:
        root_ctx.cleanup()

    llmc_text = llmc_versions_text(
        r.worker for _, rows, _, _ in results for r in rows if r.variant.kind == "llmc"
    )
    details = [
        f"Command: `{command}`",
        f"Date: {started.strftime('%Y-%m-%d %H:%M %Z')}; wall time "
        f"{(time.perf_counter() - T0) / 60:.1f} min",
        f"Load average (1/5/15 min) at start: {load_start}; at end: {load_avg()}",
        f"Versions: swiss-knife {pkg('swiss-knife')}, torch {torch.__version__}, transformers "
        f"{pkg('transformers')}, compressed-tensors {pkg('compressed-tensors')}, Python "
        f"{platform.python_version()}; {llmc_text}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs visible, torch threads {args.threads} "
        "(workers too)",
        "Prune s: wall time of the `prune(...)` / `oneshot(...)` call, with its CPU seconds "
        "(user + system, all threads) in brackets. Peak RSS: the pruning worker's peak resident "
        "memory (imports, fp32 model, pruning, saving).",
        f"Speed: batch 1, {args.prompt_len}-token random prompt, {args.new_tokens} greedy decode "
        f"steps, median of {args.speed_repeats} runs after a warm-up, on the reloaded "
        "checkpoint; ×dense > 1 is faster. Not timed for unstructured and 2:4 rows: they keep "
        "dense tensors and run the very same kernels as the dense model (the quick run timed "
        "them and saw only the shared CPU's noise, 0.1× to 3× either way).",
        "Disk MB sparse-bitmask: the same pruned model saved with `save_format: sparse-bitmask` "
        "(compressed-tensors bitmask layout: non-zero values + 1 bit per weight), reloaded with "
        "`swiss_knife.load_model` and compared weight for weight with the dense checkpoint. "
        "transformers 5.24 with compressed-tensors 0.20 cannot load it with a plain "
        "`from_pretrained` (sparse decompression was removed in compressed-tensors 0.15).",
        f"llm-compressor: `WandaPruningModifier` / `SparseGPTModifier`, targets `Linear`, ignore "
        f"`lm_head`, `mask_structure` 2:4 for the 2:4 rows, `sparsity_profile='owl'` with "
        f"`owl_m={OWL_M}`, `owl_lmbda={OWL_LAMBDA}` for the OWL rows, its defaults otherwise "
        "(SparseGPT: block 128, dampening 0.01). Its OWL keeps the plain mean over blocks and "
        "can leave a block up to 2 lambda from the target; ours keeps every block within lambda "
        "and the parameter-weighted mean exact.",
        "Swiss Knife's SparseGPT rows use its defaults: the paper's algorithm (block 128, "
        "dampening 0.01), then 5 conjugate-gradient steps that re-fit each layer's kept weights "
        "to the same damped least-squares objective with the mask fixed (`refit_iterations`; "
        "the 'no refit' row switches that off), with calibration precision `auto` (bf16 block "
        "passes on this CPU; the 'fp32 passes' row pins fp32). Floors compare ours as a user "
        "gets it.",
        f"Perplexities within {TIE:.0e} relative count as equal in the floors (the same "
        "algorithm in both tools lands this close through float summation order).",
    ]
    section = "\n".join(
        [
            "## Pruning: Swiss Knife vs llm-compressor",
            "",
            "Produced by `benchmarks/pruning.py` (its docstring explains the method).",
            "",
            *(
                case_section(case, rows, prepared, params, args.calib_seeds)
                for case, rows, prepared, params in results
            ),
            *(f"- {line}" for line in details),
        ]
    )
    print("\n".join(details))
    if args.json is not None:
        payload = [
            {
                "case": case.key,
                "rows": [
                    {
                        "label": r.variant.label,
                        "tool": r.variant.tool,
                        "family": r.variant.family,
                        "stage": r.variant.stage,
                        "llmc_args": list(r.variant.llmc_args),
                        **{
                            k: getattr(r, k)
                            for k in (
                                "ppl",
                                "tokens_scored",
                                "sparsity",
                                "disk_bytes",
                                "sparse_bytes",
                                "sparse_exact",
                                "prune_s",
                                "cpu_s",
                                "peak_rss",
                                "load",
                                "prefill_tps",
                                "decode_ms",
                                "error",
                                "seed_ppls",
                                "seed_times",
                            )
                        },
                        "worker": r.worker,
                    }
                    for r in rows
                ],
                "floors": [{"check": c, "ok": ok, "numbers": n} for c, ok, n in floors(rows)],
            }
            for case, rows, _, _ in results
        ]
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.write:
        write_section(section, MARK_START, MARK_END)
        print("\nwrote the pruning section of benchmarks/RESULTS.md")
    failed = [
        check
        for _, rows, _, _ in results
        for check, ok, _ in floors(rows)
        if ok is False and not check.startswith("Aim")
    ]
    if args.structured:
        import structured

        forwarded = ["--models", *args.models, "--eval-windows", str(args.eval_windows)]
        if args.quick:
            forwarded.append("--quick")
        if not args.write:
            forwarded.append("--no-write")
        structured.main(forwarded)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
