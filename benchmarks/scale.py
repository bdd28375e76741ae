"""Scale: Llama-3-8B-shaped checkpoints streamed through the engine, peak memory and time.

What is measured
----------------
The script writes checkpoints shaped like Llama-3-8B (hidden 4096, MLP 14336, 32 heads, 8
key/value heads, vocab 128256, bf16, one safetensors shard per block plus one for the embeddings
and head, random weights of std 0.02) with 2, 4, 8 and all 32 blocks, one size at a time, and
deletes each once measured (the free disk is checked first: the 32-block model takes 16 GB).
On each size the command line runs as a user runs it, one command after another, each in its
own process:

* ``quantize --method rtn --bits 4 --group-size 128`` (streamed: the default, in bf16),
* ``prune --method wanda --sparsity 0.5 --dtype fp32`` (streamed, computed and saved in fp32:
  this CPU has no native bf16 matmuls, and one bf16 pass over an 8B block takes about a minute
  where an fp32 pass takes seconds),
* ``quantize --method gptq --bits 4 --group-size 128 --dtype fp32`` (streamed, 2 blocks),
* ``evaluate --stream on --dtype fp32 --no-speed`` (perplexity block by block over 4 windows
  of 128 tokens: the 32-block model is 32 GB in fp32, more than this machine's memory),
* the same RTN and evaluate with ``--stream off`` (the whole model loaded) on the sizes that
  fit; the report checks that streamed and whole-model perplexities are equal.

Calibration: 2 windows of 128 tokens of WikiText-2 valid (a character tokenizer saved with the
checkpoint; the ids are only inputs here). *Peak RSS* is the process's ``VmHWM`` (imports, the
embeddings, every block, the save): not ``ru_maxrss``, which Linux carries over from the parent
across exec. *Seconds* is the wall time of the whole command.

Floors (issue 16): peak RSS grows by less than 10 % from 2 to 8 blocks; the full 8B model is
quantized with RTN and pruned with Wanda with peak RSS under 4 GiB.

Not measured here (left for later): SparseGPT, and llm-compressor's GPTQ on these checkpoints.

Usage::

    python benchmarks/scale.py                 # 2, 4, 8, 32 blocks; writes RESULTS.md
    python benchmarks/scale.py --blocks 2,4 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "assets" / "corpora" / "wikitext-2-pytorch-examples" / "valid.txt"
SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# The calibration set is small: this CPU has no native bf16 matmuls, so every bf16 block pass
# of an 8B block is slow; the memory of a streamed walk does not depend on it beyond the
# activations (2 x 128 tokens x 4096 x 2 bytes).
CALIB = ["--num-samples", "2", "--seq-len", "128"]
FP32 = ["--dtype", "fp32"]
EVAL = ["evaluate", "--eval-data", str(CORPUS), "--window", "128", "--max-windows", "4",
        "--no-speed", *FP32]  # fmt: skip
# (label, argv after the model, which block counts, stream mode)
RUNS: list[tuple[str, list[str], tuple[int, ...], str]] = [
    ("RTN W4 g128", ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "128"],
     (2, 4, 8, 32), "auto"),
    ("Wanda 50 %, fp32", ["prune", "--method", "wanda", "--sparsity", "0.5", *CALIB, *FP32],
     (2, 4, 8, 32), "auto"),
    ("GPTQ W4 g128, fp32", ["quantize", "--method", "gptq", "--bits", "4", "--group-size",
                            "128", *CALIB, *FP32], (2,), "auto"),
    ("evaluate, fp32", EVAL, (2, 4, 8, 32), "on"),
    ("RTN W4 g128, whole model", ["quantize", "--method", "rtn", "--bits", "4",
                                  "--group-size", "128"], (2, 4, 8), "off"),
    ("evaluate, fp32, whole model", EVAL, (2, 4), "off"),
]  # fmt: skip

WORKER = """
import json, sys, time
started = time.perf_counter()
from swiss_knife import cli
code = cli.main(sys.argv[1:])
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"code": code, "peak": peak, "seconds": time.perf_counter() - started}))
"""


def block_bytes() -> int:
    h, m, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"]
    head_dim = h // SHAPE["num_attention_heads"]
    params = 2 * h * h + 2 * h * kv * head_dim + 3 * h * m + 2 * h
    return params * 2


def outside_bytes() -> int:
    return (2 * SHAPE["vocab_size"] * SHAPE["hidden_size"] + SHAPE["hidden_size"]) * 2


def write_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (ids far below the vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(CORPUS.read_text(encoding="utf-8")[:200_000]) | {" "})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    # BPE without merges splits every word into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def write_checkpoint(folder: Path, blocks: int) -> None:
    """The 8B-shaped checkpoint with `blocks` blocks, one shard per block."""
    from transformers import LlamaConfig

    from swiss_knife.streaming import INDEX_NAME, write_safetensors

    folder.mkdir(parents=True)
    config = LlamaConfig(num_hidden_layers=blocks, dtype="bfloat16", **SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    write_tokenizer(folder)
    h, m = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = SHAPE["num_key_value_heads"] * (h // SHAPE["num_attention_heads"])
    shapes = {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h),
        "mlp.down_proj.weight": (h, m),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    count = blocks + 1

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    for index in range(blocks):
        shard = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        tensors = {f"model.layers.{index}.{k}": rand(s) for k, s in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{index}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        total += write_safetensors(folder / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    shard = f"model-{count:05d}-of-{count:05d}.safetensors"
    rest = {
        "model.embed_tokens.weight": rand((SHAPE["vocab_size"], h)),
        "lm_head.weight": rand((SHAPE["vocab_size"], h)),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    total += write_safetensors(folder / shard, rest)
    weight_map.update(dict.fromkeys(rest, shard))
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index_data, indent=1), encoding="utf-8")


def run(model: Path, argv: list[str], stream: str, out: Path) -> dict[str, Any]:
    if argv[0] == "evaluate":
        where = ["--output", str(out)]
    else:
        where = ["--output-dir", str(out)]
        if "--num-samples" in argv:
            where += ["--calibration-data", str(CORPUS)]
    cmd = [sys.executable, "-c", WORKER, argv[0], str(model), *argv[1:], *where,
           "--stream", stream, "-q", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"code"')]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if argv[0] == "evaluate":
        metrics = json.loads((out / "report.json").read_text())["reports"][0]["metrics"]
        result["streamed"] = metrics["streamed"]
        result["perplexity"] = metrics["perplexity"]["perplexity"]
    else:
        result["streamed"] = (out / "model.safetensors.index.json").is_file()
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="2,4,8,32", help="comma list of block counts")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go")
    parser.add_argument(
        "--calibrated-max",
        type=int,
        default=32,
        help="run the calibrated methods (Wanda, GPTQ) only on models of at most this many "
        "blocks (an 8B block pass takes about a minute on 2 cores without native bf16)",
    )
    args = parser.parse_args()
    sizes = [int(b) for b in args.blocks.split(",")]
    root = Path(tempfile.mkdtemp(prefix="sk-scale-", dir=args.workdir))
    need = (max(sizes) * block_bytes() + outside_bytes()) * 3.2  # + an fp32 output
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"needs {need / 1e9:.1f} GB free in {root.parent}, has {free / 1e9:.1f}")
    load_start = os.getloadavg()
    rows: list[tuple[str, int, str, dict[str, Any]]] = []
    try:
        for blocks in sizes:
            folder = root / f"llama3-8b-shape-{blocks}"
            started = time.perf_counter()
            write_checkpoint(folder, blocks)
            print(f"{blocks} blocks: checkpoint written in {time.perf_counter() - started:.0f} s",
                  flush=True)  # fmt: skip
            for label, argv, counts, stream in RUNS:
                if blocks not in counts or (
                    blocks > args.calibrated_max and "--num-samples" in argv
                ):
                    continue
                result = run(folder, argv, stream, root / "out")
                rows.append((label, blocks, stream, result))
                print(f"  {label}: peak {result['peak'] / 2**30:.2f} GiB, "
                      f"{result['seconds']:.0f} s, streamed {result['streamed']}", flush=True)  # fmt: skip
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_end = os.getloadavg()
    lines = section(rows, sizes, load_start, load_end)
    print("\n".join(lines))
    if not args.no_write:
        write_section("scale", "\n".join(lines))


def section(
    rows: list[tuple[str, int, str, dict[str, Any]]],
    sizes: list[int],
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float],
) -> list[str]:
    gib = 2**30
    lines = [
        "## Scale: Llama-3-8B-shaped checkpoints streamed block by block (`benchmarks/scale.py`)",
        "",
        f"Run {dt.date.today()} on {os.cpu_count()} CPU cores, one command after another, each "
        f"in its own process, nothing else running; load average {load_start[0]:.2f} at the "
        f"start, {load_end[0]:.2f} at the end. Checkpoint: bf16, hidden 4096, MLP 14336, 32/8 "
        f"heads, vocab 128256; one block is {block_bytes() / 1e9:.2f} GB, embeddings + head "
        f"{outside_bytes() / 1e9:.2f} GB (twice that in fp32). Calibration: 2 x 128 tokens.",
        "",
        "| command | blocks | checkpoint (GB, bf16) | streamed | peak RSS (GiB) | seconds |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for label, blocks, _, result in rows:
        size = (blocks * block_bytes() + outside_bytes()) / 1e9
        lines.append(
            f"| {label} | {blocks} | {size:.1f} | {'yes' if result['streamed'] else 'no'} | "
            f"{result['peak'] / gib:.2f} | {result['seconds']:.0f} |"
        )
    lines.append("")
    by = {(label, blocks): result for label, blocks, _, result in rows}
    for blocks in sizes:
        streamed = by.get(("evaluate, fp32", blocks))
        whole = by.get(("evaluate, fp32, whole model", blocks))
        if streamed and whole:
            same = "equal" if streamed["perplexity"] == whole["perplexity"] else "DIFFERENT"
            lines.append(f"- Perplexity on {blocks} blocks, streamed {streamed['perplexity']:.6g}"
                         f" vs whole model {whole['perplexity']:.6g}: {same}")  # fmt: skip
    for label in ("RTN W4 g128", "Wanda 50 %, fp32", "GPTQ W4 g128, fp32", "evaluate, fp32"):
        if (label, 2) in by and (label, 8) in by:
            growth = by[label, 8]["peak"] / by[label, 2]["peak"] - 1
            verdict = "met" if growth < 0.10 else "NOT met"
            lines.append(f"- Floor, {label}: peak RSS 2 -> 8 blocks {growth:+.1%} (< 10 %): "
                         f"{verdict}")  # fmt: skip
    for label in ("RTN W4 g128", "Wanda 50 %, fp32"):
        if (label, 32) in by:
            peak = by[label, 32]["peak"] / gib
            verdict = "met" if peak < 4 else "NOT met"
            lines.append(f"- Floor, {label} on all 32 blocks (16 GB): peak RSS {peak:.2f} GiB "
                         f"(< 4 GiB): {verdict}")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
