"""Worker for ``benchmarks/pruning.py``: prune one model with llm-compressor.

Runs inside the llm-compressor virtual environment (``.benchmarks-llmc``), never in the toolkit's
own environment: llm-compressor pins its own transformers. It loads the dense fp32 checkpoint,
calibrates on the exact token tensor the benchmark saved (``torch.save`` of a
``(num_samples, seq_len)`` LongTensor, the same ids Swiss Knife calibrates on), prunes with
``oneshot`` and saves a dense checkpoint (llm-compressor no longer writes sparse-compressed
checkpoints). It writes one JSON object (timings, memory, versions) to ``--result``.

Modifiers: ``WandaPruningModifier`` and ``SparseGPTModifier`` (its defaults: block size 128,
dampening 0.01) on every ``Linear`` of the decoder layers but ``lm_head``, at ``--sparsity``
unstructured or ``--mask-structure`` N:M; ``--owl`` adds ``sparsity_profile="owl"`` with
``owl_m`` / ``owl_lmbda``. Loading, timing, memory and saving are ``_llmc_quantize.run_oneshot``,
shared with the quantization worker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _llmc_quantize import run_oneshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True, help="torch.save'd ids")
    parser.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="0:0", help="N:M as llm-compressor spells it")
    parser.add_argument("--owl", action="store_true", help="OWL layer-wise sparsity")
    parser.add_argument("--owl-m", type=int, default=5)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    options: dict[str, object] = {
        "sparsity": args.sparsity,
        "mask_structure": args.mask_structure,
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],
    }
    if args.owl:
        options.update(sparsity_profile="owl", owl_m=args.owl_m, owl_lmbda=args.owl_lambda)
    modifier_class = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    # llm-compressor no longer writes sparse-compressed checkpoints: saved dense.
    run_oneshot(args, modifier_class(**options), with_data=True, save_compressed=False)


if __name__ == "__main__":
    main()
