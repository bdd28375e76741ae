"""GGUF: Swiss Knife's export against llama.cpp's own quantizer, both run in llama.cpp.

What is compared
----------------
The two models of ``benchmarks/quantization.py`` (its ``prepare_*`` functions: SmolLM2-135M-Instruct
dequantised to a dense fp32 folder and scored on WikiText-2 test; stories260K scored on the head of
TinyStories validation), each:

* **fp32 in transformers** (the baseline every row is compared with, and the reference for
  agreement);
* **ours**: ``swiss-knife export`` of the fp32 folder to f16, q8_0, q4_0 and q4_k; and GPTQ
  W4 in groups of 32 (symmetric: llama.cpp's Q4_0 grid, calibrated on the benchmark's calibration
  tensor) exported with ``--type auto``, which writes GPTQ's own integers into Q4_0 blocks;
* **llama.cpp's quantizer** (``llama_model_quantize`` of the same llama.cpp build, the function
  behind ``llama-quantize``) from our f16 file to Q8_0, Q4_0 and Q4_K_S (the file type our q4_k
  is tagged with: Q4_K matrices, a Q6_K output head).

How it is measured
------------------
Every GGUF file is measured by ``swiss_knife.evaluation.llama_cpp.evaluate_gguf`` in llama.cpp
(llama-cpp-python): perplexity on exactly the token windows the transformers baseline is scored
on (non-overlapping 512-token windows, tokenised once by the Hugging Face tokenizer), KL and top-1
agreement with the fp32 model, prefill and decode speed at batch size 1 (median [min-max] of the
repeats after a warm-up), memory and size. *Make s* is the wall time of the export or quantize
call (for the GPTQ row, GPTQ plus export). Rows run one after another in this process; the load
average is recorded at the start and the end. Timings are only compared where nothing else ran.

Usage::

    python benchmarks/gguf_export.py                 # both models
    python benchmarks/gguf_export.py --quick         # stories260K only, fewer windows (smoke)
    python benchmarks/gguf_export.py --no-write      # print only

The tables are written between the ``gguf`` markers of benchmarks/RESULTS.md. (The script is not
called ``gguf.py``: run as a script, that name would shadow the ``gguf`` package it uses.)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantization as qbench
from _results import write_section

OURS_TYPES = ("f16", "q8_0", "q4_0", "q4_k")
# llama.cpp file types for its own quantizer, by our type name.
LLAMA_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
               "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_S"}  # fmt: skip


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


def llama_quantize(source: Path, target: Path, kind: str) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs) on a GGUF file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_TYPES[kind])
    params.nthread = torch.get_num_threads()
    code = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if code != 0:
        raise RuntimeError(f"llama_model_quantize returned {code} for {kind}")


def gptq_auto(prepared: Any, work: Path, ignore: list[str]) -> Path:
    """GPTQ on Q4_0's grid (`--grid gguf:q4_0`), saved, then exported with auto."""
    import swiss_knife as sk

    model = sk.load(str(prepared.dense_dir), dtype="fp32", device="cpu")
    samples = int(prepared.calibration.shape[0])
    config = sk.GPTQConfig(
        grid="gguf:q4_0",  # 4-bit symmetric, groups of 32, fp16 scales: Q4_0 exactly
        ignore=["lm_head", *ignore],
        calibration={"num_samples": samples, "seq_len": int(prepared.calibration.shape[1])},
    )
    sk.quantize(model, config, calibration=prepared.calibration)
    folder = sk.save(model, work / "gptq-g32")
    out = work / "gptq-g32-auto.gguf"
    sk.export_gguf(folder, out, sk.GGUFExportConfig(tensor_type="auto"))
    return out


def evaluation_config(quick: bool) -> Any:
    from swiss_knife.config import EvaluationConfig

    return EvaluationConfig.model_validate(
        {
            "perplexity": {"window": 512, "max_windows": None},
            "speed": {"batch_sizes": [1], "prompt_len": 128, "new_tokens": 32,
                      "repeats": 3 if quick else 5, "warmup": 1},
            "agreement": {"window": 512, "max_windows": 2 if quick else 4},
        }
    )  # fmt: skip


def run_case(case: Any, prepared: Any, work: Path, quick: bool) -> tuple[list[Any], list[str]]:
    """Every row of one model: (reports, make-time lines)."""
    from swiss_knife.evaluation import evaluate
    from swiss_knife.evaluation.llama_cpp import evaluate_gguf
    from swiss_knife.export import export_gguf
    from swiss_knife.models import load_model

    config = evaluation_config(quick)
    loaded = load_model(str(prepared.dense_dir), dtype="fp32", device="cpu")
    tokens = prepared.eval_tokens
    log(f"{case.key}: fp32 in transformers")
    reports = [
        evaluate(loaded.model, loaded.tokenizer, config, tokens=tokens, name="fp32 (transformers)",
                 weights_path=prepared.dense_dir, progress=False)
    ]  # fmt: skip
    made: list[str] = []

    def measure(name: str, path: Path) -> None:
        log(f"{case.key}: {name} in llama.cpp")
        reports.append(
            evaluate_gguf(path, loaded.tokenizer, config, tokens=tokens, reference=loaded.model,
                          name=name, progress=False)
        )  # fmt: skip

    files: dict[str, Path] = {}
    for kind in OURS_TYPES:
        path = work / f"ours-{kind}.gguf"
        _, seconds = timed(lambda k=kind, p=path: export_gguf(prepared.dense_dir, p, type=k))
        files[kind] = path
        made.append(f"| ours {kind} | `swiss-knife export --type {kind}` | {seconds} |")
        measure(f"ours {kind}", path)
    for kind in LLAMA_TYPES:
        path = work / f"llama-{kind}.gguf"
        _, seconds = timed(lambda k=kind, p=path: llama_quantize(files["f16"], p, k))
        label = LLAMA_TYPES[kind].removeprefix("LLAMA_FTYPE_MOSTLY_")
        made.append(f"| llama.cpp {label} | `llama_model_quantize` from ours f16 | {seconds} |")
        measure(f"llama.cpp {label}", path)
    # stories260K's down_proj reads 172 channels, which no group of 32 divides: it stays float
    # for GPTQ, and auto keeps it f32 (llama.cpp's quantizer falls back on those rows too).
    ignore = ["re:.*down_proj"] if case.key == "stories260k" else []
    path, seconds = timed(lambda: gptq_auto(prepared, work, ignore))
    how = "GPTQ, save, `export --type auto`" + (" (down_proj float)" if ignore else "")
    made.append(f"| ours GPTQ g32 -> auto (Q4_0) | {how} | {seconds} |")
    measure("ours GPTQ g32 auto", path)
    return reports, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="stories260K only, fewer windows")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--models", default=None, help="comma list: smollm2,stories260k")
    args = parser.parse_args()
    from swiss_knife.evaluation.compare import comparison_rows
    from swiss_knife.evaluation.llama_cpp import llama_cpp_available
    from swiss_knife.evaluation.report import markdown_table

    if not llama_cpp_available():
        raise SystemExit("llama-cpp-python is not installed: pip install 'swiss-knife[llama-cpp]'")
    keys = (args.models or ("stories260k" if args.quick else "smollm2,stories260k")).split(",")
    titles = {"smollm2": ("SmolLM2-135M-Instruct", 32), "stories260k": ("stories260K", 32)}
    windows = {"smollm2": 8 if args.quick else 20, "stories260k": 8 if args.quick else 16}
    load_start = os.getloadavg()
    log(f"load average at start (1/5/15 min): {load_start}")
    sections = [
        "## GGUF in llama.cpp: Swiss Knife export vs llama.cpp's quantizer (`benchmarks/gguf_export.py`)",
        "",
        f"Run {dt.date.today()} on {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, one row after another with no other heavy job on the "
        f"machine; load average at start {load_start[0]:.2f}.",
    ]
    with tempfile.TemporaryDirectory(prefix="sk-bench-gguf-") as root:
        for key in keys:
            case = qbench.Case(
                key, titles[key][0], titles[key][1], windows[key], 32 if args.quick else 128
            )
            work = Path(root) / key
            work.mkdir()
            prepared = qbench.PREPARE[key](case, work)
            reports, made = run_case(case, prepared, work, args.quick)
            gc.collect()
            sections += [
                "", f"### {case.title}", "",
                f"Scored: {prepared.eval_source}; GPTQ calibration: {prepared.calib_source} "
                f"({int(prepared.calibration.shape[0])} x {int(prepared.calibration.shape[1])} "
                "tokens). Ratios are against fp32 in transformers.",
                "", markdown_table(comparison_rows(reports)), "",
                "| file | made by | make s |", "|---|---|---:|", *made,
            ]  # fmt: skip
    load_end = os.getloadavg()
    sections += [
        "",
        f"Load average at the end: {load_end[0]:.2f} (1 min), {load_end[1]:.2f} (5 min).",
    ]
    text = "\n".join(sections)
    print(text)
    if not args.no_write:
        write_section("gguf", text)


if __name__ == "__main__":
    main()
