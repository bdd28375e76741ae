"""Worker for ``benchmarks/quantization.py``: quantize one model with llm-compressor.

Runs inside the llm-compressor virtual environment (``.benchmarks-llmc``), never in the
toolkit's own environment: llm-compressor pins its own transformers. It loads a dense fp32
checkpoint, calibrates on the exact token tensor the benchmark saved (``torch.save`` of a
``(num_samples, seq_len)`` LongTensor, the same ids Swiss Knife calibrates on), quantizes with
``oneshot`` and saves the compressed-tensors checkpoint. It writes one JSON object (timings,
memory, versions) to ``--result``.

Schemes: ``gptq`` is ``GPTQModifier`` and ``rtn`` is ``QuantizationModifier`` (round to nearest,
min-max scales), both on every ``Linear`` but ``lm_head``, ``--bits``-bit symmetric integer
weights in groups of ``--group-size`` (0: one scale per output channel), activations left in
float. GPTQ keeps llm-compressor's defaults (``actorder="static"``, ``dampening_frac=0.01``,
``block_size=128``).

Memory: a daemon thread samples this process's resident set size every 5 ms while ``oneshot``
runs (the same method as ``swiss_knife.evaluation.memory.PeakMemory``); ``VmHWM`` gives the
whole process's peak (imports, load, quantize and save). Not ``ru_maxrss``: Linux carries the
parent's high-water mark into a child's ``ru_maxrss`` across fork/vfork + exec.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from importlib.metadata import version
from pathlib import Path

STARTED = time.perf_counter()


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil needed)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """Peak resident memory of this process so far, in bytes (``VmHWM``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


class PeakRSS:
    """Peak RSS while the ``with`` body runs, sampled every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True, help="torch.save'd ids")
    parser.add_argument("--method", choices=("gptq", "rtn"), required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64, help="0: per output channel")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=True,
        strategy="group" if args.group_size else "channel",
        group_size=args.group_size or None,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    groups = {"group_0": scheme}
    if args.method == "gptq":
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    run_oneshot(args, recipe, with_data=args.method == "gptq", save_compressed=True)


def run_oneshot(
    args: argparse.Namespace, recipe: object, *, with_data: bool, save_compressed: bool
) -> None:
    """Load ``args.model_dir`` in fp32, run ``oneshot(recipe)`` on the saved calibration ids
    (when `with_data`), save to ``args.output_dir`` and write the timings and memory to
    ``args.result``. Shared by the quantization and pruning workers."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    loaded = time.perf_counter()
    after_load = max_rss()

    ids = torch.load(args.calibration)  # (num_samples, seq_len)
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    with PeakRSS() as peak:
        load, times = os.getloadavg()[0], os.times()
        start = time.perf_counter()
        oneshot(
            model=model,
            dataset=dataset if with_data else None,
            recipe=recipe,
            num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]),
            shuffle_calibration_samples=False,
            batch_size=1,
        )
        seconds = time.perf_counter() - start
        after = os.times()
        cpu_seconds = after.user + after.system - times.user - times.system
        load_after = os.getloadavg()[0]
    after_compress = max_rss()

    save_start = time.perf_counter()
    model.save_pretrained(args.output_dir, save_compressed=save_compressed)
    save_seconds = time.perf_counter() - save_start

    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "loadavg_before_after": [load, load_after],
        "import_seconds": imported - STARTED,
        "load_seconds": loaded - imported,
        "save_seconds": save_seconds,
        "process_seconds": time.perf_counter() - STARTED,
        "rss_before_bytes": peak.baseline,
        "rss_peak_bytes": peak.peak,
        "max_rss_after_load_bytes": after_load,
        "max_rss_after_quantize_bytes": after_compress,
        "process_max_rss_bytes": max_rss(),
        "threads": torch.get_num_threads(),
        "calibration_shape": list(ids.shape),
        "recipe": repr(recipe),
        "versions": {
            name: version(name)
            for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")
        },
    }
    args.result.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
