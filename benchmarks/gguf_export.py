"""GGUF: Swiss Knife's calibrated export against llama.cpp's own quantizer, both run in llama.cpp.

What is compared
----------------
The two models of ``benchmarks/quantization.py`` (its ``prepare_*`` functions: SmolLM2-135M-Instruct
dequantised to a dense fp32 folder and scored on WikiText-2 test; stories260K scored on the head of
TinyStories validation), at three llama.cpp types, Q8_0, Q4_0 and Q4_K_M:

* **transformers fp32 and bf16**, the speed baselines (fp32 is also the reference for agreement);
* **llama.cpp's quantizer**, the ``llama-quantize`` tool built from the llama.cpp that
  llama-cpp-python 0.3.36 vendors, on our f16 GGUF: each type without and with an importance
  matrix that ``llama-imatrix`` (same build) computes on the calibration tokens Swiss Knife uses
  (decoded to text, one 512-token chunk per sample);
* **ours, RTN**: ``swiss-knife export --type`` of the float model (llama.cpp's reference rounding);
* **ours, GPTQ** on the type's exact grid (``--grid gguf:q8_0``, ``gguf:q4_0``; for Q4_K_M
  ``gguf:q4_k`` with a ``bits_overrides`` entry for every layer that llama.cpp's Q4_K_M file puts
  on 6 bits), then ``export --type auto``, which writes GPTQ's own integers;
* **ours, AWQ** on ``gguf:q8_0`` and ``gguf:q4_0`` (AWQ has no K grids), then ``auto``.

For Q4_K_M every file holds the same type per tensor as llama.cpp's own Q4_K_M file (the script
reads that file's types and gives them to our export; it checks that they match): on these models
most matrices are 576 or 64 wide, which 256 does not divide, so llama.cpp (and we) fall back to
Q5_0 (Q8_0 for the 6-bit ones) there and use Q4_K/Q6_K only where 256 divides the width.

How it is measured
------------------
Every GGUF file is measured by ``swiss_knife.evaluation.llama_cpp.evaluate_gguf`` in llama.cpp
(llama-cpp-python): perplexity on exactly the token windows the transformers baseline is scored
on (non-overlapping 512-token windows, tokenised once by the Hugging Face tokenizer), KL and top-1
agreement with the fp32 model, prefill and decode speed at batch size 1 (median [min-max] of the
repeats after a warm-up), memory and size. *Make s* is the wall time that made the file (for
GPTQ and AWQ: the method, the save and the export). Rows run one after another in this process;
the load average is recorded at the start and the end. Timings are only compared where nothing
else ran. The floors of the issue are checked at the end of each model's section.

Usage::

    python benchmarks/gguf_export.py --llama-cpp-bin DIR   # DIR holds llama-quantize, llama-imatrix
    python benchmarks/gguf_export.py --quick               # stories260K only, fewer windows (smoke)
    python benchmarks/gguf_export.py --no-write            # print only

Without ``--llama-cpp-bin`` (or ``LLAMA_CPP_BIN``) llama.cpp's quantizer runs through the Python
binding and the importance-matrix rows are left out. Build the tools from the sdist's vendored
llama.cpp: ``cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-quantize
llama-imatrix``. The tables are written between the ``gguf`` markers of benchmarks/RESULTS.md.
(The script is not called ``gguf.py``: run as a script, that name would shadow the ``gguf``
package it uses.)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantization as qbench
from _results import write_section

TYPES = ("q8_0", "q4_0", "q4_k_m")
LLAMA_NAMES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
GRIDS = {"q8_0": "gguf:q8_0", "q4_0": "gguf:q4_0", "q4_k_m": "gguf:q4_k"}
# A llama.cpp tensor type -> the bits of the Q4_K family GPTQ is given for that tensor (a Q5_0
# or Q8_0 tensor is Q4_K's or Q6_K's fallback on a width 256 does not divide).
K_MIX_BITS = {"q4_k": 4, "q5_0": 4, "q5_k": 5, "q5_1": 5, "q6_k": 6, "q8_0": 6}
# GGUF tensor names of the llama architecture -> our module names.
GGUF_MODULES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip
FLOATS = {"F32", "F16", "BF16"}


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


def threads() -> int:
    return torch.get_num_threads()


def module_of(gguf_name: str) -> str | None:
    """``blk.3.ffn_down.weight`` -> ``model.layers.3.mlp.down_proj`` (None for non-matrices)."""
    parts = gguf_name.split(".")
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens"
    if gguf_name == "output.weight":
        return "lm_head"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_MODULES:
        return f"model.layers.{parts[1]}.{GGUF_MODULES[parts[2]]}"
    return None


def tensor_types(path: Path) -> dict[str, str]:
    """Our module name -> GGUF type (lower case) for every quantized matrix of a file."""
    from gguf import GGUFReader

    found = {}
    for tensor in GGUFReader(path).tensors:
        module = module_of(tensor.name)
        if module is not None and tensor.tensor_type.name not in FLOATS:
            found[module] = tensor.tensor_type.name.lower()
    return found


def block_mix(path: Path, kind: str) -> dict[str, str]:
    """GPTQ's grid overrides for the block layers llama.cpp's file puts on another type than
    `kind`: with an importance matrix its Q4_0 (Q5_0) puts the first eighth of the ffn_down
    layers on Q4_1 (Q5_1), "to guard against craziness" (``llama-quant.cpp``)."""
    return {m: f"gguf:{t}" for m, t in tensor_types(path).items()
            if m.startswith("model.layers.") and t != kind}  # fmt: skip


@dataclass
class Tools:
    """llama.cpp's command-line tools, or None for the Python binding without imatrix."""

    bin_dir: Path | None

    def run(self, *args: str) -> None:
        assert self.bin_dir is not None
        done = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")

    def quantize(self, source: Path, target: Path, kind: str, imatrix: Path | None) -> None:
        name = LLAMA_NAMES[kind]
        if self.bin_dir is None:  # the binding runs the same function, without imatrix
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.nthread = threads()
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(target).encode(), ctypes.byref(params)
            )
            if code != 0:
                raise RuntimeError(f"llama_model_quantize returned {code} for {name}")
            return
        extra = ["--imatrix", str(imatrix)] if imatrix else []
        self.run("llama-quantize", *extra, str(source), str(target), name, str(threads()))

    def imatrix(self, model: Path, text: Path, chunks: int, out: Path) -> None:
        self.run(
            "llama-imatrix", "-m", str(model), "-f", str(text), "-o", str(out), "-c", "512",
            "-b", "512", "--chunks", str(chunks), "-t", str(threads()), "--no-ppl",
        )  # fmt: skip


def calibration_text(prepared: Any, tokenizer: Any, path: Path) -> Path:
    """The calibration windows Swiss Knife uses, decoded, one per paragraph."""
    windows = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in
               prepared.calibration]  # fmt: skip
    path.write_text("\n\n".join(windows) + "\n", encoding="utf-8")
    return path


def calibrated(method: str, kind: str, prepared: Any, work: Path, ignore: list[str],
               k_mix: dict[str, str], extra: dict[str, Any] | None = None,
               tag: str = "") -> Path:  # fmt: skip
    """GPTQ or AWQ on ``kind``'s llama.cpp grid (with the `extra` settings), saved, exported
    with auto (and, for Q4_K_M, the embedding's type of llama.cpp's file); the GGUF path."""
    import swiss_knife as sk

    model = sk.load(str(prepared.dense_dir), dtype="fp32", device="cpu")
    calibration = {"num_samples": int(prepared.calibration.shape[0]),
                   "seq_len": int(prepared.calibration.shape[1])}  # fmt: skip
    settings: dict[str, Any] = {"grid": GRIDS[kind], "ignore": ["lm_head", *ignore],
                                "calibration": calibration}  # fmt: skip
    overrides: dict[str, str] = {}
    if kind == "q4_k_m":
        settings["bits_overrides"] = {m: K_MIX_BITS[t] for m, t in k_mix.items()
                                      if m.startswith("model.layers.") and K_MIX_BITS[t] != 4}  # fmt: skip
        overrides = {m: t for m, t in k_mix.items() if not m.startswith("model.layers.")}
    if ignore:  # layers no block divides: f16, as llama.cpp's quantizer falls back to
        overrides.update({pattern: "f16" for pattern in ignore})
    settings.update(extra or {})
    config = sk.GPTQConfig(**settings) if method == "gptq" else sk.AWQConfig(**settings)
    sk.quantize(model, config, calibration=prepared.calibration)
    folder = sk.save(model, work / f"{method}-{kind}{tag}")
    out = work / f"{method}-{kind}{tag}.gguf"
    sk.export_gguf(folder, out, sk.GGUFExportConfig(tensor_type="auto", type_overrides=overrides))
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


@dataclass
class CaseRun:
    """The rows of one model as they are made: reports, make times, type checks."""

    case: Any
    prepared: Any
    work: Path
    quick: bool
    tools: Tools
    reports: list[Any] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loaded: Any = None

    def measure(self, name: str, path: Path) -> None:
        from swiss_knife.evaluation.llama_cpp import evaluate_gguf

        log(f"{self.case.key}: {name} in llama.cpp")
        self.reports.append(
            evaluate_gguf(path, self.loaded.tokenizer, evaluation_config(self.quick),
                          tokens=self.prepared.eval_tokens, reference=self.loaded.model,
                          name=name, progress=False)
        )  # fmt: skip

    def make(self, name: str, how: str, path: Path, fn: Callable[[], Any]) -> Path:
        log(f"{self.case.key}: making {name}")
        _, seconds = timed(fn)
        self.made.append(f"| {name} | {how} | {seconds} |")
        self.measure(name, path)
        return path

    def check_types(self, name: str, path: Path, want: dict[str, str], file: str) -> None:
        got = tensor_types(path)
        differ = sorted(m for m in set(want) | set(got) if want.get(m) != got.get(m))
        same = "the same tensor types as" if not differ else f"{len(differ)} tensor types unlike"
        self.notes.append(f"{name}: {same} llama.cpp's {file} file" +
                          (f" (e.g. {differ[0]}: {got.get(differ[0])} vs {want.get(differ[0])})"
                           if differ else ""))  # fmt: skip


def baselines(run: CaseRun) -> None:
    """fp32 and bf16 in transformers: the rows every GGUF is compared with."""
    from swiss_knife.evaluation import evaluate
    from swiss_knife.models import load_model

    config = evaluation_config(run.quick)
    run.loaded = load_model(str(run.prepared.dense_dir), dtype="fp32", device="cpu")
    for dtype in ("fp32", "bf16"):
        log(f"{run.case.key}: {dtype} in transformers")
        model = (
            run.loaded.model
            if dtype == "fp32"
            else load_model(
                str(run.prepared.dense_dir), dtype=dtype, device="cpu", with_tokenizer=False
            ).model
        )
        run.reports.append(
            evaluate(model, run.loaded.tokenizer, config, tokens=run.prepared.eval_tokens,
                     name=f"{dtype} (transformers)", weights_path=run.prepared.dense_dir,
                     progress=False)
        )  # fmt: skip
        del model
        gc.collect()


def run_case(run: CaseRun) -> None:
    """Every row of one model."""
    from swiss_knife.export import export_gguf

    baselines(run)
    dense, work, tools = run.prepared.dense_dir, run.work, run.tools
    f16 = run.make("ours f16", "`swiss-knife export --type f16`", work / "f16.gguf",
                   lambda: export_gguf(dense, work / "f16.gguf", type="f16"))  # fmt: skip
    imatrix = None
    if tools.bin_dir is not None:
        text = calibration_text(run.prepared, run.loaded.tokenizer, work / "calibration.txt")
        chunks = int(run.prepared.calibration.shape[0])
        imatrix = work / "imatrix.gguf"
        _, seconds = timed(lambda: tools.imatrix(f16, text, chunks, imatrix))
        run.made.append(f"| (importance matrix) | `llama-imatrix`, {chunks} x 512 tokens | "
                        f"{seconds} |")  # fmt: skip
    # stories260K's down_proj reads 172 channels, which no group of 32 divides: it stays float
    # for GPTQ and AWQ, and auto keeps it f32 (llama.cpp's quantizer falls back on it too).
    ignore = ["re:.*down_proj"] if run.case.key == "stories260k" else []
    for kind in TYPES:
        label = LLAMA_NAMES[kind]
        theirs = work / f"llama-{kind}.gguf"
        run.make(f"llama.cpp {label}", "`llama-quantize` from ours f16", theirs,
                 lambda k=kind, t=theirs: tools.quantize(f16, t, k, None))  # fmt: skip
        their_imatrix = work / f"llama-{kind}-imatrix.gguf"
        if imatrix is not None:
            run.make(f"llama.cpp {label} + imatrix", "`llama-quantize --imatrix` from ours f16",
                     their_imatrix, lambda k=kind, p=their_imatrix: tools.quantize(f16, p, k, imatrix))  # fmt: skip
        k_mix = tensor_types(theirs) if kind == "q4_k_m" else {}
        # Q4_0 with an importance matrix is a mix (a few ffn_down layers on Q4_1): GPTQ and RTN
        # get the same per-tensor types as the file they are compared with.
        mix = block_mix(their_imatrix, kind) if imatrix is not None and not k_mix else {}
        path = work / f"rtn-{kind}.gguf"
        rtn_type, overrides = ("q4_k", [f"{m}={t}" for m, t in k_mix.items()]) if k_mix else (
            kind, [f"{m}={t.removeprefix('gguf:')}" for m, t in mix.items()] or None)  # fmt: skip
        run.make(f"ours RTN {label}", f"`swiss-knife export --type {rtn_type}`"
                 + (" + llama.cpp's per-tensor types" if k_mix or mix else ""), path,
                 lambda t=rtn_type, p=path, o=overrides: export_gguf(dense, p, type=t,
                                                                      overrides=o))  # fmt: skip
        methods = ("gptq", "awq") if kind != "q4_k_m" else ("gptq",)
        for method in methods:
            name = f"ours {method.upper()} {label}"
            # AWQ takes one grid for every layer: its Q4_0 stays pure.
            extra = {"grid_overrides": mix} if mix and method == "gptq" else {}
            path = run.make(name, f"{method.upper()} `--grid {GRIDS[kind]}`"
                            + (" + llama.cpp's imatrix file's per-tensor types" if extra else "")
                            + ", save, `export --type auto`", work / f"{method}-{kind}.gguf",
                            lambda m=method, k=kind, x=k_mix, e=extra: calibrated(
                                m, k, run.prepared, work, ignore, x, e))  # fmt: skip
            if k_mix:
                run.check_types(name, path, k_mix, "Q4_K_M")
            elif extra:
                run.check_types(name, path, tensor_types(their_imatrix), f"{label} + imatrix")
        if k_mix:
            run.check_types(f"ours RTN {label}", work / f"rtn-{kind}.gguf", k_mix, "Q4_K_M")


def floors(reports: list[Any]) -> list[str]:
    """The issue's floors and aim, checked on one model's rows."""
    by_name = {r.name: r for r in reports}

    def ppl(name: str) -> float | None:
        report = by_name.get(name)
        value = report.metrics.get("perplexity", {}).get("perplexity") if report else None
        return None if value is None else float(value)

    def decode(name: str) -> dict[str, float]:
        return dict(by_name[name].metrics["speed"]["batches"][0]["decode_per_token"])

    def size(name: str) -> float:
        return float(by_name[name].metrics["size"]["disk_bytes"]) / 1e6

    lines = []
    for kind in TYPES:
        label = LLAMA_NAMES[kind]
        theirs = ppl(f"llama.cpp {label} + imatrix")
        ours = [(v, m) for m in ("GPTQ", "AWQ") if (v := ppl(f"ours {m} {label}")) is not None]
        if theirs is None or not ours:
            lines.append(f"- {label}: no importance-matrix row (run with --llama-cpp-bin)")
            continue
        value, method = min(ours)
        verdict = "met" if value < theirs else "NOT met"
        if value >= theirs and abs(value / theirs - 1) < 5e-4:
            verdict = "NOT met (tied within 0.05 %)"
        lines.append(f"- Floor, {label}: ours {method} {value:.4f} vs llama.cpp + imatrix "
                     f"{theirs:.4f}: {verdict}")  # fmt: skip
    base = decode("fp32 (transformers)")
    ggufs = [r.name for r in reports if "transformers" not in r.name]
    worst = max(ggufs, key=lambda n: decode(n)["median_ms"])
    median_x = base["median_ms"] / decode(worst)["median_ms"]
    safe_x = base["min_ms"] / decode(worst)["max_ms"]
    verdict = "met" if safe_x >= 3 else "NOT met"
    lines.append(f"- Floor, decode >= 3x transformers fp32: slowest GGUF ({worst}) {median_x:.2f}x "
                 f"by medians, {safe_x:.2f}x fastest fp32 run vs slowest GGUF run: {verdict}")  # fmt: skip
    k_m = ppl("llama.cpp Q4_K_M + imatrix")
    candidates = [(v, n) for n in ("ours GPTQ Q4_0", "ours AWQ Q4_0", "ours GPTQ Q4_K_M")
                  if (v := ppl(n)) is not None]  # fmt: skip
    if k_m is not None and candidates:
        value, name = min(candidates)
        smaller = size(name) <= size("llama.cpp Q4_K_M + imatrix")
        verdict = "met" if value < k_m and smaller else "not met"
        lines.append(f"- Aim, a 4-bit file of ours below llama.cpp Q4_K_M + imatrix ({k_m:.3f}, "
                     f"{size('llama.cpp Q4_K_M + imatrix'):.2f} MB): {name} {value:.3f}, "
                     f"{size(name):.2f} MB: {verdict}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="stories260K only, fewer windows")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--models", default=None, help="comma list: smollm2,stories260k")
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                        help="folder with llama.cpp's llama-quantize and llama-imatrix")  # fmt: skip
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (x 512)")
    args = parser.parse_args()
    from swiss_knife.evaluation.compare import comparison_rows
    from swiss_knife.evaluation.llama_cpp import llama_cpp_available
    from swiss_knife.evaluation.report import markdown_table

    if not llama_cpp_available():
        raise SystemExit("llama-cpp-python is not installed: pip install 'swiss-knife[llama-cpp]'")
    tools = Tools(Path(args.llama_cpp_bin) if args.llama_cpp_bin else None)
    keys = (args.models or ("stories260k" if args.quick else "smollm2,stories260k")).split(",")
    titles = {"smollm2": "SmolLM2-135M-Instruct", "stories260k": "stories260K"}
    windows = {"smollm2": 8 if args.quick else 16, "stories260k": 8 if args.quick else 16}
    samples = 16 if args.quick else args.samples
    load_start = os.getloadavg()
    log(f"load average at start (1/5/15 min): {load_start}")
    sections = [
        "## GGUF in llama.cpp: Swiss Knife's calibrated export vs llama.cpp's quantizer "
        "(`benchmarks/gguf_export.py`)",
        "",
        f"Run {dt.date.today()} on {os.cpu_count()} CPU cores, torch and llama.cpp threads "
        f"{threads()}, one row after another with no other heavy job on the machine; load "
        f"average at start {load_start[0]:.2f}. llama.cpp: the tools and the Python binding "
        "of llama-cpp-python 0.3.36's vendored llama.cpp"
        + ("" if tools.bin_dir else " (binding only: no importance-matrix rows)")
        + ".",
    ]
    with tempfile.TemporaryDirectory(prefix="sk-bench-gguf-") as root:
        for key in keys:
            case = qbench.Case(key, titles[key], 32, windows[key], samples)
            work = Path(root) / key
            work.mkdir()
            run = CaseRun(case, qbench.PREPARE[key](case, work), work, args.quick, tools)
            run_case(run)
            gc.collect()
            sections += [
                "", f"### {case.title}", "",
                f"Scored: {run.prepared.eval_source}; calibration (GPTQ, AWQ and llama-imatrix): "
                f"{run.prepared.calib_source} ({int(run.prepared.calibration.shape[0])} x "
                f"{int(run.prepared.calibration.shape[1])} tokens). Ratios are against fp32 in "
                "transformers.",
                "", markdown_table(comparison_rows(run.reports)), "",
                "| file | made by | make s |", "|---|---|---:|", *run.made, "",
                *[f"- {note}" for note in run.notes], *floors(run.reports),
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
