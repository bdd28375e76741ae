"""One prepared check of the CUDA paths: every quantization method on a GPU, with timings.

Run on a machine with a CUDA GPU (CI never does):

    python benchmarks/gpu_check.py --model DIR --text FILE --out DIR

Part 1, quality: the real stories260K model (a trained Llama) is quantized on the GPU by every
method in the registry; for each, the wall time, perplexity on TinyStories windows against fp32,
and whether the saved checkpoint reloads to the same logits.

Part 2, speed: a randomly initialised Llama with SmolLM2-135M's shapes (weights do not matter for
timing) in bf16: prefill and per-token decode latency for bf16 and each quantized format, and the
wall time of GPTQ W4 g64 on 64 x 512 calibration tokens.

Every step is isolated: a failure is recorded with its message and the check goes on. Results go
to `gpu_check.json` and `gpu_check.md` in `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from swiss_knife.compression.quantization.api import quantize
from swiss_knife.compression.quantization.base import get_method
from swiss_knife.config import (
    AWQConfig,
    BnB4bitConfig,
    BnB8bitConfig,
    CalibrationSettings,
    DataConfig,
    DynamicInt8Config,
    GPTQConfig,
    HalfPrecisionConfig,
    RTNConfig,
    StaticInt8Config,
)
from swiss_knife.data import load_token_stream, sample_calibration
from swiss_knife.device import library_versions
from swiss_knife.evaluation.perplexity import perplexity
from swiss_knife.evaluation.speed import measure_speed
from swiss_knife.models import save_model

CAL = CalibrationSettings(num_samples=32, seq_len=256, batch_size=8)
QUALITY = [
    ("bf16", HalfPrecisionConfig(method="bf16")),
    ("8bit", BnB8bitConfig()),
    ("4bit-nf4", BnB4bitConfig()),
    ("dynamic-w8a8", DynamicInt8Config()),
    ("int8-weight-only", DynamicInt8Config(weight_only=True)),
    ("static-w8a8", StaticInt8Config(calibration=CAL)),
    ("rtn-w4-channel", RTNConfig(bits=4, group_size=None)),
    ("gptq-w4-channel", GPTQConfig(bits=4, group_size=None, calibration=CAL)),
    ("awq-w4-channel", AWQConfig(bits=4, group_size=None, calibration=CAL)),
]
SPEED = [
    ("8bit", BnB8bitConfig()),
    ("4bit-nf4", BnB4bitConfig()),
    ("dynamic-w8a8", DynamicInt8Config()),
    ("int8-weight-only", DynamicInt8Config(weight_only=True)),
]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def quality(
    model_dir: Path, text: Path, device: torch.device, windows: int
) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = load_token_stream(DataConfig(source=str(text), split_documents="paragraph"), tokenizer)
    half = stream.numel() // 2
    calibration = sample_calibration(stream[:half], CAL.num_samples, CAL.seq_len, seed=0)
    evaluation = stream[half : half + 256 * windows]
    base = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    fp32 = perplexity(base, evaluation, window=256).perplexity
    rows: list[dict[str, Any]] = [{"method": "fp32", "perplexity": fp32, "ratio": 1.0}]
    probe = evaluation[:128].view(2, 64).to(device)
    for name, config in QUALITY:
        row: dict[str, Any] = {"method": name}
        try:
            model = copy.deepcopy(base)
            needs = get_method(config.method).needs_calibration
            _sync()
            start = time.perf_counter()
            outcome = quantize(
                model, config, calibration=calibration if needs else None, device=device
            )
            _sync()
            row["seconds"] = round(time.perf_counter() - start, 3)
            row["perplexity"] = perplexity(outcome.model, evaluation, window=256).perplexity
            row["ratio"] = row["perplexity"] / fp32
            with torch.no_grad():
                ours = outcome.model(probe).logits.float()
            with tempfile.TemporaryDirectory() as tmp:
                saved = save_model(outcome.model, Path(tmp) / "q", writer=outcome.writer)
                reloaded = AutoModelForCausalLM.from_pretrained(saved, device_map=str(device))
                with torch.no_grad():
                    again = reloaded(probe).logits.float()
                row["reload_max_diff"] = (again - ours).abs().max().item()
            row["format"] = outcome.format
        except Exception as exc:
            row["error"] = _error(exc)
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def smollm2_shaped(device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def speed(device: torch.device, batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def timed(name: str, model: Any) -> None:
        result = measure_speed(
            model, batch_sizes=batch_sizes, prompt_len=128, new_tokens=64, warmup=2, repeats=5
        )
        for b in result.batches:
            rows.append(
                {
                    "method": name,
                    "batch": b.batch_size,
                    "prefill_ms": b.prefill.median_ms,
                    "decode_ms_per_token": b.decode_per_token.median_ms,
                    "decode_tokens_per_s": b.decode_tokens_per_s,
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    base = smollm2_shaped(device)
    timed("bf16", base)
    for name, config in SPEED:
        try:
            outcome = quantize(copy.deepcopy(base), config, device=device)
            timed(name, outcome.model)
        except Exception as exc:
            rows.append({"method": name, "error": _error(exc)})
            traceback.print_exc()
    try:
        model = copy.deepcopy(base)
        calibration = torch.randint(0, 49152, (64, 512), generator=torch.Generator().manual_seed(0))
        _sync()
        start = time.perf_counter()
        config = GPTQConfig(bits=4, group_size=64, calibration=CalibrationSettings(batch_size=16))
        outcome = quantize(model, config, calibration=calibration, device=device)
        _sync()
        rows.append(
            {"method": "gptq-w4-g64 quantization time", "seconds": time.perf_counter() - start}
        )
        timed("gptq-w4-g64 (fake-quant bf16)", outcome.model)
    except Exception as exc:
        rows.append({"method": "gptq-w4-g64", "error": _error(exc)})
        traceback.print_exc()
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"GPU check on {result['device_name']} ({result['date']})", ""]
    lines += ["| method | seconds | perplexity | vs fp32 | reload max diff | note |"]
    lines += ["|---|---:|---:|---:|---:|---|"]
    for r in result["quality"]:
        lines.append(
            f"| {r['method']} | {r.get('seconds', '')} | {r.get('perplexity', float('nan')):.4f} | "
            f"{r.get('ratio', float('nan')):.4f} | {r.get('reload_max_diff', '')} | "
            f"{r.get('error', r.get('format', ''))} |"
        )
    lines += ["", "| model (SmolLM2-135M shapes, bf16) | batch | prefill ms | decode ms/token |"]
    lines += ["|---|---:|---:|---:|"]
    for r in result["speed"]:
        if "batch" in r:
            lines.append(
                f"| {r['method']} | {r['batch']} | {r['prefill_ms']:.2f} | "
                f"{r['decode_ms_per_token']:.2f} |"
            )
        else:
            lines.append(f"| {r['method']} | | {r.get('seconds', '')} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="stories260K-hf directory")
    parser.add_argument("--text", type=Path, required=True, help="tinystories_val.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": library_versions(),
        "torch": torch.__version__,
    }
    result["quality"] = quality(args.model, args.text, device, args.windows)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    result["speed"] = [] if args.skip_speed else speed(device, (1, 8))
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
