"""Worker for benchmarks/evaluation.py: lm-evaluation-harness rolling log-likelihood of one text.

Runs inside the benchmark's own virtual environment (the one that has ``lm-eval`` installed), so
lm-eval and its dependencies never enter the main environment. It loads a saved Hugging Face
checkpoint with ``AutoModelForCausalLM``, wraps it in lm-eval's ``HFLM`` and answers commands, one
per line on stdin, with one JSON object per line on stdout:

* on start-up: ``{"event": "ready", ...}`` with versions, thread count and the token ids lm-eval
  will score (their count and a SHA-256 of them), so the caller can check they match its own;
* ``score``: one timed ``HFLM.loglikelihood_rolling`` call on the text, reported as
  ``{"event": "score", "seconds": ..., "loglikelihood": ...}``;
* ``warmup``: the same call on the first ``--warmup-chars`` characters, untimed;
* ``quit`` (or end of input): exit.

Only the ``loglikelihood_rolling`` call is timed, not loading. lm-eval prints progress bars and
log lines; they are sent to stderr so stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO


def _token_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode("ascii")).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--text-file", type=Path, required=True, help="UTF-8 text to score")
    parser.add_argument("--max-length", type=int, required=True, help="HFLM max_length")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup-chars", type=int, default=2000)
    args = parser.parse_args()

    # Everything lm-eval or transformers print goes to stderr; results use the real stdout.
    out: TextIO = sys.stdout
    sys.stdout = sys.stderr

    def emit(payload: dict[str, Any]) -> None:
        out.write(json.dumps(payload) + "\n")
        out.flush()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    text = args.text_file.read_bytes().decode("utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )

    def rolling(string: str) -> float:
        request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(string,), idx=0)
        (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
        return float(loglikelihood)

    ids = lm.tok_encode(text)  # exactly what loglikelihood_rolling tokenises
    emit(
        {
            "event": "ready",
            "lm_eval": version("lm-eval"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "threads": torch.get_num_threads(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "max_length": lm.max_length,
            "prefix_token_id": lm.prefix_token_id,
            "tokens": len(ids),
            "token_sha256": _token_digest(ids),
        }
    )
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "warmup":
            rolling(text[: args.warmup_chars])
            emit({"event": "warmup"})
        elif command == "score":
            start = time.perf_counter()
            loglikelihood = rolling(text)
            seconds = time.perf_counter() - start
            emit({"event": "score", "seconds": seconds, "loglikelihood": loglikelihood})
        else:
            emit({"event": "error", "message": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
