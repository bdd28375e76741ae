"""Factorisation threads: the inverse-Hessian factorisation of GPTQ and SparseGPT, on one thread
and on every thread.

What is measured
----------------
GPTQ and SparseGPT walk a layer's columns one by one, with one intra-op thread on the CPU (a
thread pool's barriers cost more than the tiny vector ops gain). Before the walk they factorise
the damped inverse Hessian (`compression.hessian.inverse_cholesky_upper`: a Cholesky
factorisation, its inverse, and a second Cholesky: about (4/3) n^3 operations for an n-wide
input). For an 8B model's down projection (n = 14336) that is 4 x 10^12 operations per layer.
Since this change a factorisation of at least `device.FACTOR_THREADS_MIN` rows gets back the
threads the column loop took (`device.factorisation_threads`).

This script times the factorisation of a random well-conditioned Hessian (X^T X of 2n random
rows) of each size, alternately on one thread and on every thread, `--repeats` times each in
the same process, and reports medians with their min-max range, the ratio of the medians, and
the load average before and after. A ratio whose ranges overlap is reported as within noise.

Usage::

    python benchmarks/factorisation.py                    # writes RESULTS.md
    python benchmarks/factorisation.py --sizes 576,4096 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section
from swiss_knife.compression.hessian import inverse_cholesky_upper
from swiss_knife.device import FACTOR_THREADS_MIN, intra_op_threads


def hessian(n: int) -> torch.Tensor:
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(n))
    return (x.T @ x) / (2 * n)


def timed(H: torch.Tensor, threads: int) -> float:
    with intra_op_threads(threads):
        started = time.perf_counter()
        inverse_cholesky_upper(H, 0.01, label="bench")
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="576,1536,2048,4096,8192", help="comma list of n")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    every = os.cpu_count() or 1
    load_start = os.getloadavg()
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        H = hessian(n)
        timed(H, every)  # warm-up: allocations, thread pool
        one: list[float] = []
        all_: list[float] = []
        for _ in range(args.repeats):
            one.append(timed(H, 1))
            all_.append(timed(H, every))
        rows.append((n, one, all_))
        print(f"n={n}: 1 thread {statistics.median(one):.3f} s, {every} threads "
              f"{statistics.median(all_):.3f} s", flush=True)  # fmt: skip
    load_end = os.getloadavg()
    lines = [
        "## Factorisation threads (`benchmarks/factorisation.py`)",
        "",
        f"Run {dt.date.today()} on {every} CPU cores, nothing else running; load average "
        f"{load_start[0]:.2f} before, {load_end[0]:.2f} after. `inverse_cholesky_upper` of an n x n "
        f"Hessian, {args.repeats} runs each, alternating; median (min-max) seconds. Factorisations "
        f"of n >= {FACTOR_THREADS_MIN} now run on every thread inside the column loops.",
        "",
        f"| n | 1 thread | {every} threads | speed-up |",
        "|---:|---:|---:|---|",
    ]
    for n, one, all_ in rows:
        ratio = statistics.median(one) / statistics.median(all_)
        overlap = min(one) <= max(all_) and min(all_) <= max(one)
        verdict = "within noise" if overlap else f"{ratio:.2f}x"
        lines.append(
            f"| {n} | {statistics.median(one):.3f} ({min(one):.3f}-{max(one):.3f}) | "
            f"{statistics.median(all_):.3f} ({min(all_):.3f}-{max(all_):.3f}) | {verdict} |"
        )
    print("\n".join(lines))
    if not args.no_write:
        write_section("factorisation", "\n".join(lines))


if __name__ == "__main__":
    main()
