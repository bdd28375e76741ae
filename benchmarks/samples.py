"""Calibration-set size: how time, peak memory and perplexity grow with the number of samples.

Ours against llm-compressor on SmolLM2-135M-Instruct for the three calibrated methods whose
floors the scaling issue sets (GPTQ W4 g64, SparseGPT 50 %, Wanda 50 %), at several calibration
sample counts (windows of 512 tokens; default 16, 64 and 128). Each count runs the rows of the
two side-by-side benchmarks, in their own worker processes and with their own measurement
(`benchmarks/quantization.py` and `benchmarks/pruning.py`, selected with ``--only``): peak RSS
of the worker (VmHWM: imports, model, method and save; the evaluation runs in the parent on the
saved folder), wall time of the method alone, perplexity on the same WikiText-2 test windows.
Ours runs twice: on the whole model loaded in memory, and streamed from disk to disk
(`sk.compress_checkpoint(stream="on")`, one block in memory at a time). One row runs at a
time; the load average is recorded before and after each. The floors (issue: streamed, at 64
and 128 samples, peak RSS at most 0.5x llm-compressor's, time at most 0.6x, perplexity no
worse) are checked for each count.

Usage::

    python benchmarks/samples.py                     # 16, 64, 128 samples; writes RESULTS.md
    python benchmarks/samples.py --samples 16 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from quantization import REPO, ensure_base_venv

HERE = Path(__file__).resolve().parent
# (method, script, our in-memory row, our streamed row, llm-compressor's row, time field); rows
# are matched by the end of "Tool: label" (see ``--only`` in the two scripts).
METHODS = (
    ("GPTQ W4 g64", "quantization.py",
     "Swiss Knife: GPTQ W4 g64 (defaults: act-order, static groups, clip search)$",
     "Swiss Knife: GPTQ W4 g64 streamed from disk (defaults)$",
     "llm-compressor: GPTQ W4 g64$", "quant_s"),
    ("SparseGPT 50%", "pruning.py", "Swiss Knife: SparseGPT 50%$",
     "Swiss Knife: SparseGPT 50% streamed from disk$", "llm-compressor: SparseGPT 50%$",
     "prune_s"),
    ("Wanda 50%", "pruning.py", "Swiss Knife: Wanda 50%$",
     "Swiss Knife: Wanda 50% streamed from disk$", "llm-compressor: Wanda 50%$", "prune_s"),
)  # fmt: skip
FLOOR_SAMPLES = (64, 128)
RSS_FLOOR, TIME_FLOOR = 0.5, 0.6


def log(message: str) -> None:
    print(f"[samples {dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def run_script(script: str, samples: int, only: list[str], out: Path, args: Any) -> list[Any]:
    """Run one side-by-side script on SmolLM2 for `only` rows; its JSON rows."""
    command = [
        sys.executable, str(HERE / script), "--models", "smollm2",
        "--calib-samples", str(samples), "--eval-windows", str(args.eval_windows),
        "--speed-repeats", "1", "--no-write", "--json", str(out), "--only", *only,
        "--ours-python", args.ours_python,
    ]  # fmt: skip
    log(shlex.join(command[1:]))
    # The script exits 1 when one of its own floors fails; its rows are written all the same.
    done = subprocess.run(command, check=False)
    if not out.is_file():
        raise SystemExit(f"{script} wrote no rows (exit {done.returncode})")
    cases = json.loads(out.read_text())
    return list(cases[0]["rows"])


def find(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for row in rows:
        if f"{row['tool']}: {row['label']}".endswith(name.rstrip("$")):
            return row
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def measure(args: Any, root: Path) -> dict[int, dict[str, tuple[dict[str, Any] | None, ...]]]:
    """Every count's rows: {samples: {method: (ours, theirs)}}."""
    found: dict[int, dict[str, tuple[dict[str, Any] | None, ...]]] = {}
    for samples in args.samples:
        found[samples] = {}
        for script in ("quantization.py", "pruning.py"):
            picked = [m for m in METHODS if m[1] == script and m[0] in args.methods]
            if not picked:
                continue
            only = [name for m in picked for name in m[2:5]
                    if args.in_memory or name != m[2]]  # fmt: skip
            rows = run_script(script, samples, only, root / f"{script}-{samples}.json", args)
            for method, _, ours, streamed, theirs, _ in picked:
                found[samples][method] = tuple(find(rows, n) for n in (ours, streamed, theirs))
        if args.write:
            write_section("samples", report(found, args))
    return found


def report(found: dict[int, dict[str, tuple[dict[str, Any] | None, ...]]], args: Any) -> str:
    lines = [
        "## Calibration-set size: ours vs llm-compressor at 16, 64 and 128 samples "
        "(`benchmarks/samples.py`)",
        "",
        f"Run {dt.date.today()} on {os.cpu_count()} CPU cores, SmolLM2-135M-Instruct, "
        f"{args.eval_windows} x 512 WikiText-2 test tokens scored, calibration windows of 512 "
        "tokens from WikiText-2 valid; one row at a time, nothing else heavy on the machine. "
        "Each method has three rows: ours on the whole model loaded in memory (`quantize()` / "
        "`prune()`), ours streamed from disk to disk (`sk.compress_checkpoint(stream=\"on\")`, "
        "the command line's default for a checkpoint on disk), and llm-compressor. Time: the "
        "method alone (calibration walk and solve; for the streamed row also the reading and "
        "writing of the checkpoint, which interleave with the walk); peak RSS: the worker "
        "process's VmHWM. Our workers run in "
        + ("a venv with Swiss Knife's base install only (`pip install -e .`, torch 2.13.0 CPU), "
           "as llm-compressor's run in a venv with its own install"
           if args.base_venv else "this interpreter's environment (dev extras included)")
        + ". Ratios are against llm-compressor. Command: `"
        + shlex.join(["python", *sys.argv]) + "`.",
        "",
        "| method | samples | run | s | time ratio | GiB | RSS ratio | ppl | load before → after |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    floors = []
    gib = 2.0**30
    for method, *_, time_field in (m for m in METHODS if m[0] in args.methods):
        for samples, by_method in found.items():
            ours, streamed, theirs = by_method.get(method, (None, None, None))
            base_t = None if theirs is None else theirs.get(time_field)
            base_r = None if theirs is None else theirs.get("peak_rss")
            for run, row in (("ours, in memory", ours), ("ours, streamed", streamed),
                             ("llm-compressor", theirs)):  # fmt: skip
                if row is None:
                    why = (
                        "not run (--no-in-memory)"
                        if not args.in_memory and run == "ours, in memory"
                        else "row missing"
                    )
                    lines.append(f"| {method} | {samples} | {run} | {why} | | | | | |")
                    continue
                t, r = row.get(time_field), row.get("peak_rss")
                lines.append(
                    f"| {method} | {samples} | {run} | {fmt(t, '.1f')} | "
                    f"{fmt(ratio(t, base_t), '.2f')}× | {fmt(r and r / gib, '.2f')} | "
                    f"{fmt(ratio(r, base_r), '.2f')}× | {fmt(row.get('ppl'), '.3f')} | "
                    f"{_load(row)} |"
                )
            if samples in FLOOR_SAMPLES:
                floors.append(
                    f"- {method}, {samples} samples: {_floor(streamed, theirs, time_field)}"
                )
    lines += ["", "Floors (issue 16: our streamed run, at 64 and 128 samples):", "", *floors]
    return "\n".join(lines)


def _floor(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, time_field: str) -> str:
    """PASS/FAIL of the three floors for one method and count."""
    if ours is None or theirs is None:
        return "not measured (row missing)"
    t_ratio = ratio(ours.get(time_field), theirs.get(time_field))
    r_ratio = ratio(ours.get("peak_rss"), theirs.get("peak_rss"))
    p_ours, p_theirs = ours.get("ppl"), theirs.get("ppl")
    if t_ratio is None or r_ratio is None or p_ours is None or p_theirs is None:
        return "not measured (a value is missing)"
    checks = [
        ("RSS", r_ratio <= RSS_FLOOR, f"{r_ratio:.2f}× (≤ {RSS_FLOOR}×)"),
        ("time", t_ratio <= TIME_FLOOR, f"{t_ratio:.2f}× (≤ {TIME_FLOOR}×)"),
        ("ppl", p_ours <= p_theirs, f"{p_ours:.3f} vs {p_theirs:.3f}"),
    ]
    return "; ".join(f"{what} {'PASS' if ok else 'FAIL'} {n}" for what, ok, n in checks)


def _load(row: dict[str, Any]) -> str:
    load = row.get("load")
    return "–" if not load else f"{load[0]:.1f} → {load[1]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS],
                        choices=[m[0] for m in METHODS], help="methods to run (default: all)")  # fmt: skip
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--no-in-memory", dest="in_memory", action="store_false",
                        help="skip our in-memory rows (the floors read the streamed ones)")  # fmt: skip
    parser.add_argument("--ours-venv", type=Path, default=REPO / ".benchmarks-sk",
                        help="venv with Swiss Knife's base install only, created on first use; "
                        "our workers run in it, as llm-compressor's run in its own venv")  # fmt: skip
    parser.add_argument("--ours-in-this-python", dest="base_venv", action="store_false",
                        help="run our workers in this interpreter (dev extras and all) instead")  # fmt: skip
    args = parser.parse_args()
    args.ours_python = str(ensure_base_venv(args.ours_venv)) if args.base_venv else sys.executable
    with tempfile.TemporaryDirectory(prefix="sk-bench-samples-") as root:
        found = measure(args, Path(root))
    print(report(found, args))


if __name__ == "__main__":
    main()
