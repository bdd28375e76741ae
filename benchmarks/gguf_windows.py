"""GGUF perplexity on many windows: is a small difference between two files real?

`benchmarks/gguf_export.py` scores every file on 16 windows of 512 tokens, where the files that
matter for the issue's floors differ by a few tenths of a percent. This script scores the files
of those floors on more windows of the same WikiText-2 test text (the first 16 are the main
table's), in llama.cpp, chunk by chunk (8 windows each), and reports each file's perplexity on
the first 16 windows and on all of them, and its paired difference with llama.cpp's file: the
mean over chunks of ``log ppl(ours) - log ppl(theirs)`` with its standard error, so that a
difference smaller than about two standard errors is reported as within noise.

Files (SmolLM2-135M-Instruct, 64 x 512 calibration tokens of WikiText-2 valid for GPTQ and
``llama-imatrix`` alike, as in `gguf_export.py`): llama.cpp's ``llama-quantize --imatrix`` at
each type, and ours GPTQ on the type's grid exported with ``auto``, with and without the scale
refit (``refit_scales``). llama.cpp's Q4_0 with an importance matrix is a mix (the first eighth
of the ffn_down layers on Q4_1); ours gets the same per-tensor types (GPTQ's
``grid_overrides``), and is also scored with every layer on Q4_0.

Usage::

    python benchmarks/gguf_windows.py --llama-cpp-bin DIR [--windows 128] [--types q4_0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_export as gb
import quantization as qbench
from _results import write_section

CHUNK = 8  # windows per chunk
MAIN_TABLE_WINDOWS = 16


def chunk_log_ppls(path: Path, tokenizer: Any, tokens: Any, windows: int) -> list[float]:
    """log perplexity of each chunk of `CHUNK` windows of 512 tokens, in llama.cpp."""
    from swiss_knife.config import EvaluationConfig
    from swiss_knife.evaluation.llama_cpp import evaluate_gguf

    config = EvaluationConfig.model_validate(
        {"perplexity": {"window": 512, "max_windows": None}, "speed": {"enabled": False},
         "agreement": {"enabled": False}, "memory": False}
    )  # fmt: skip
    values = []
    for start in range(0, windows * 512, CHUNK * 512):
        report = evaluate_gguf(path, tokenizer, config, tokens=tokens[start : start + CHUNK * 512],
                               name=path.stem, progress=False)  # fmt: skip
        values.append(math.log(report.metrics["perplexity"]["perplexity"]))
    return values


def paired(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """Mean and standard error over chunks of the difference in log perplexity."""
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
    return mean, math.sqrt(var / len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                        required=os.environ.get("LLAMA_CPP_BIN") is None)  # fmt: skip
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--types", nargs="+", default=["q4_0"], choices=("q4_0", "q8_0"))
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (x 512)")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args()
    if args.windows % CHUNK or args.windows < MAIN_TABLE_WINDOWS:
        raise SystemExit(f"--windows must be a multiple of {CHUNK}, at least {MAIN_TABLE_WINDOWS}")
    from swiss_knife.export import export_gguf
    from swiss_knife.models import load_model

    tools = gb.Tools(args.llama_cpp_bin)
    load_start = os.getloadavg()
    case = qbench.Case("smollm2", "SmolLM2-135M-Instruct", 32, args.windows, args.samples)
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sk-bench-gguf-windows-") as root:
        work = Path(root)
        prepared = qbench.PREPARE["smollm2"](case, work)
        tokenizer = load_model(str(prepared.dense_dir), dtype="fp32", device="cpu").tokenizer
        f16 = work / "f16.gguf"
        export_gguf(prepared.dense_dir, f16, type="f16")
        text = gb.calibration_text(prepared, tokenizer, work / "calibration.txt")
        imatrix = work / "imatrix.gguf"
        tools.imatrix(f16, text, int(prepared.calibration.shape[0]), imatrix)
        for kind in args.types:
            label = gb.LLAMA_NAMES[kind]
            theirs_path = work / f"llama-{kind}-imatrix.gguf"
            tools.quantize(f16, theirs_path, kind, imatrix)
            files = {f"llama.cpp {label} + imatrix": theirs_path}
            # llama.cpp's file is a mix (its Q4_0 + imatrix puts the first eighth of ffn_down
            # on Q4_1): ours gets the same per-tensor types, and is also scored pure.
            mix = gb.block_mix(theirs_path, kind)
            with_mix: dict[str, Any] = {"grid_overrides": mix} if mix else {}
            variants = [("", "", with_mix),
                        ("-norefit", " without scale refit", {"refit_scales": False, **with_mix})]  # fmt: skip
            if mix:
                variants.append(("-pure", f", every layer {label}", {}))
            for tag, words, extra in variants:
                name = f"ours GPTQ {label}{words}"
                gb.log(f"making {name}")
                files[name] = gb.calibrated("gptq", kind, prepared, work, [], {}, extra, tag)
            measured = {}
            for name, path in files.items():
                gb.log(f"{name}: {args.windows} windows in llama.cpp")
                measured[name] = chunk_log_ppls(path, tokenizer, prepared.eval_tokens,
                                                args.windows)  # fmt: skip
            theirs = measured[f"llama.cpp {label} + imatrix"]
            head = MAIN_TABLE_WINDOWS // CHUNK
            for name, values in measured.items():
                first = math.exp(sum(values[:head]) / head)
                every = math.exp(sum(values) / len(values))
                if values is theirs:
                    rows.append(f"| {name} | {first:.3f} | {every:.3f} | – |")
                    continue
                mean, se = paired(values, theirs)
                verdict = ("within noise" if abs(mean) < 2 * se else
                           "lower" if mean < 0 else "higher")  # fmt: skip
                rows.append(f"| {name} | {first:.3f} | {every:.3f} | {100 * mean:+.2f} % ± "
                            f"{100 * se:.2f} % ({verdict}) |")  # fmt: skip
    section = "\n".join([
        "## GGUF perplexity on more windows (`benchmarks/gguf_windows.py`)",
        "",
        f"Run {dt.date.today()}, `{shlex.join(['python', *sys.argv])}`; load average at start "
        f"{load_start[0]:.2f} (perplexity only: timings are not compared here). SmolLM2-135M-"
        f"Instruct on the first {args.windows} windows of 512 tokens of WikiText-2 test, in "
        f"llama.cpp, scored in chunks of {CHUNK} windows; {args.samples} x 512 calibration tokens "
        "for GPTQ and `llama-imatrix` alike. The last column is the mean over chunks of the "
        "difference in log perplexity with llama.cpp's file, ± its standard error.",
        "",
        f"| file | ppl, first {MAIN_TABLE_WINDOWS} windows (the main table's) | ppl, "
        f"{args.windows} windows | vs llama.cpp + imatrix |",
        "|---|---:|---:|---|",
        *rows,
    ])  # fmt: skip
    print(section)
    if args.write:
        write_section("gguf-windows", section)


if __name__ == "__main__":
    main()
