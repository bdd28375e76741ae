"""Prefill and decode latency of a causal LM, measured the way serving cost is usually reported.

Method
------
Generation has two phases with very different cost profiles (see e.g. the vLLM paper, Kwon et
al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention",
and the Hugging Face "LLM inference optimization" docs):

* **Prefill**: one forward pass over the whole prompt, ``(batch, prompt_len)``, filling the KV
  cache. It is compute-bound, so it is reported as prompt tokens per second.
* **Decode**: one forward pass per new token, each over ``(batch, 1)`` and reading the whole
  cache. It is memory-bandwidth-bound, so it is reported as milliseconds per step and generated
  tokens per second.

For each batch size, every repeat runs a fresh prefill (timed) and then a hand-written greedy loop
of exactly ``new_tokens`` steps that reuses the prefill's cache (timed, divided by
``new_tokens``). The loop is written by hand instead of calling ``generate`` so that no logits
processors, stopping criteria or EOS handling add time or end the loop early. Prompts are random
token ids from a seeded generator, so runs are reproducible and independent of any tokenizer.

Timings use ``time.perf_counter``; on CUDA, ``torch.cuda.synchronize`` brackets each timed region
because kernels are launched asynchronously. ``warmup`` untimed repeats come first (allocator
warm-up, kernel selection, lazy initialisation). The median, the minimum and maximum (and the
10th/90th percentiles) over ``repeats`` are reported with every sample, so a report can show the
spread of each timing and tell a real difference from noise (see ``compare.timing_ratio``);
throughput is derived from the median. The number of intra-op CPU threads and the system load
average before and after the runs are recorded because CPU timings depend on both heavily: on a
loaded machine another process's work lands inside the timed regions.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from swiss_knife.errors import UserInputError
from swiss_knife.evaluation.perplexity import eval_mode, max_positions, model_device, vocab_size
from swiss_knife.progress import Progress

#: Timed repeats by default: the fewest that show a spread (min, median, max).
DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class Timing:
    """Summary of repeated wall-clock measurements, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    min_ms: float = float("nan")
    max_ms: float = float("nan")
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        values = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            median_ms=float(np.median(values)),
            p10_ms=float(np.percentile(values, 10)),
            p90_ms=float(np.percentile(values, 90)),
            repeats=len(values),
            min_ms=float(values.min()),
            max_ms=float(values.max()),
            samples_ms=[round(float(v), 4) for v in values],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchSpeed:
    """Prefill and per-token decode timing for one batch size."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill: Timing
    decode_per_token: Timing
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpeedResult:
    """Speed of one model on one device, for each requested batch size."""

    device: str
    dtype: str
    threads: int
    warmup: int
    repeats: int
    batches: list[BatchSpeed] = field(default_factory=list)
    #: 1, 5 and 15-minute system load averages before and after the runs (None where the OS
    #: has none), next to the number of CPUs: a load near or above it means shared cores.
    load_avg_before: list[float] | None = None
    load_avg_after: list[float] | None = None
    cpu_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; `repeats=True` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _cache_keyword(model: torch.nn.Module) -> str:
    """Name of the forward() argument that takes the KV cache.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name still works but warns
    and is scheduled for removal), so use whichever the model's signature declares.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def load_average() -> list[float] | None:
    """The system's 1, 5 and 15-minute load averages, or None where the OS does not keep them."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return [round(one, 2), round(five, 2), round(fifteen, 2)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_run(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    cache_kw: str,
    device: torch.device,
) -> tuple[float, float]:
    """Time one prefill and one ``new_tokens``-step greedy decode; return seconds for each."""
    _sync(device)
    start = time.perf_counter()
    output = model(input_ids=prompt, use_cache=True)
    next_tok = output.logits[:, -1].argmax(dim=-1, keepdim=True)  # (batch, 1)
    _sync(device)
    prefill_s = time.perf_counter() - start

    cache = _returned_cache(output)
    if cache is None:
        raise UserInputError(
            f"{type(model).__name__} returned no KV cache with use_cache=True; "
            "cannot time incremental decoding"
        )
    del output  # release the prompt-length logits before decoding

    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        # No EOS check on purpose: every run must do exactly `new_tokens` steps.
        step = model(input_ids=next_tok, use_cache=True, **{cache_kw: cache})
        cache = _returned_cache(step)
        next_tok = step.logits[:, -1].argmax(dim=-1, keepdim=True)  # (batch, 1)
    _sync(device)
    decode_s = time.perf_counter() - start
    return prefill_s, decode_s


def measure_speed(
    model: torch.nn.Module,
    *,
    batch_sizes: Sequence[int] = (1,),
    prompt_len: int = 128,
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = DEFAULT_REPEATS,
    seed: int = 0,
    progress: bool = False,
) -> SpeedResult:
    """Measure prefill and decode speed of ``model`` for each batch size in ``batch_sizes``."""
    if isinstance(batch_sizes, int) or len(batch_sizes) == 0:
        raise UserInputError(f"batch_sizes must be a non-empty sequence, got {batch_sizes!r}")
    sizes = [_check_int("batch size", b, 1) for b in batch_sizes]
    _check_int("prompt_len", prompt_len, 1)
    _check_int("new_tokens", new_tokens, 1)
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    limit = max_positions(model)
    if limit is not None and prompt_len + new_tokens > limit:
        raise UserInputError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    vocab = vocab_size(model)
    if vocab is None:
        raise UserInputError("the model config has no vocab_size; cannot build random prompts")

    device = model_device(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    cache_kw = _cache_keyword(model)
    generator = torch.Generator().manual_seed(seed)

    results: list[BatchSpeed] = []
    load_before = load_average()
    runs = Progress("speed", total=len(sizes) * (warmup + repeats), unit="run", enabled=progress)
    with eval_mode(model), runs:
        for batch in sizes:
            # Generated on the CPU generator so the prompts do not depend on the device.
            prompt = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
            prompt = prompt.to(device)  # (batch, prompt_len)
            for _ in range(warmup):
                _one_run(model, prompt, new_tokens, cache_kw, device)
                runs.update()
            prefill_ms: list[float] = []
            decode_ms: list[float] = []
            for _ in range(repeats):
                prefill_s, decode_s = _one_run(model, prompt, new_tokens, cache_kw, device)
                prefill_ms.append(prefill_s * 1e3)
                decode_ms.append(decode_s * 1e3 / new_tokens)
                runs.update()
            prefill = Timing.from_samples(prefill_ms)
            decode = Timing.from_samples(decode_ms)
            results.append(
                BatchSpeed(
                    batch_size=batch,
                    prompt_len=prompt_len,
                    new_tokens=new_tokens,
                    prefill=prefill,
                    decode_per_token=decode,
                    prefill_tokens_per_s=batch * prompt_len / (prefill.median_ms / 1e3),
                    decode_tokens_per_s=batch / (decode.median_ms / 1e3),
                )
            )

    return SpeedResult(
        device=str(device),
        dtype=dtype,
        threads=torch.get_num_threads(),
        warmup=warmup,
        repeats=repeats,
        batches=results,
        load_avg_before=load_before,
        load_avg_after=load_average(),
        cpu_count=os.cpu_count(),
    )
