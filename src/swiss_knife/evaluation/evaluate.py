"""One evaluation of one model: the metrics an `EvaluationConfig` asks for, in a fixed order.

Each metric lives in its own module; this file only decides which to run and on what data, and
records how long each took, so a report can always say what was measured and how.

Memory is measured around each piece of work that runs only this model (perplexity, BLEU, speed,
the harness), each from a baseline read just before it, after unused memory is released (see
``memory``). Agreement is left out because it also runs the reference model. The model's peak is
its weights and buffers plus the largest of those increases, so it neither includes an earlier
model still in memory nor depends on the order in which models are evaluated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import EvaluationConfig, PerplexityConfig
from ..errors import UserInputError
from .generation import agreement, bleu, load_prompt_references
from .harness import run_harness
from .memory import PeakMemory, parameter_bytes
from .perplexity import eval_mode, max_positions, perplexity
from .size import model_size
from .speed import measure_speed

logger = logging.getLogger(__name__)

#: How the report's memory numbers are measured, stored with them.
MEMORY_METHOD_NOTE = (
    "peak memory = the model's weights and buffers + the largest increase of {counter} over a "
    "baseline read just before each of its own measurements (perplexity, BLEU, speed, harness; "
    "agreement also runs the reference model and is left out), after one short warm-up pass "
    "and after freeing unused memory; memory held before (earlier models, the reference) is "
    "not counted"
)


@dataclass
class EvaluationReport:
    """Everything measured about one model, as plain data."""

    name: str
    source: str | None
    eval_data: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "eval_data": self.eval_data,
            "metrics": self.metrics,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        return cls(
            name=data["name"],
            source=data.get("source"),
            eval_data=data.get("eval_data"),
            metrics=dict(data.get("metrics", {})),
            seconds=dict(data.get("seconds", {})),
        )


def _warm_up(model: Any, device: torch.device) -> None:
    """One short, unmeasured forward pass before any memory baseline is read.

    The first forward pass in a process initialises things once for all models (thread pools,
    kernel and primitive caches, lazy buffers); without this, their megabytes would be charged
    to whichever model a process happens to evaluate first.
    """
    length = min(8, max_positions(model) or 8)
    try:
        with torch.no_grad(), eval_mode(model):
            model(input_ids=torch.zeros((1, length), dtype=torch.long, device=device))
    except Exception as exc:  # a model that needs other inputs: measure without the warm-up
        logger.debug("memory warm-up skipped: %s", exc)


_T = TypeVar("_T")


@dataclass
class _Timer:
    """Runs one model's measurements, timing each into the report and, when only this model
    runs, recording its memory increase over a baseline read just before it."""

    name: str
    device: torch.device
    memory: bool
    report: EvaluationReport
    increases: dict[str, int] = field(default_factory=dict)
    process: dict[str, int] = field(default_factory=dict)

    def __call__(self, key: str, fn: Callable[[], _T], *, own: bool = True) -> _T:
        """Run one measurement, timing it and (when only this model runs) its memory."""
        logger.info("%s: measuring %s", self.name, key)
        start = time.perf_counter()
        if own and self.memory:
            with PeakMemory(self.device) as peak:
                result = fn()
            self.increases[key] = peak.increase_bytes
            self.process.setdefault("baseline_bytes", peak.baseline_bytes)
            self.process["peak_bytes"] = max(self.process.get("peak_bytes", 0), peak.peak_bytes)
        else:
            result = fn()
        self.report.seconds[key] = round(time.perf_counter() - start, 4)
        return result


def perplexity_stream(
    tokens: torch.Tensor, config: PerplexityConfig, limit: int | None
) -> torch.Tensor:
    """The head of `tokens` that the perplexity measurement reads: enough for exactly
    `config.max_windows` windows at its stride (all of it when that is None), counted with the
    window perplexity() will use, clamped to a context of `limit` positions. The llama.cpp path
    cuts a GGUF's stream with it too, so both runtimes score the same windows."""
    if config.max_windows is None:
        return tokens
    used = min(config.window, limit) if limit is not None else config.window
    step = min(config.stride or config.window, used)
    return tokens[: used + step * (config.max_windows - 1)]


def _measure_perplexity(
    timed: _Timer,
    model: Any,
    tokens: torch.Tensor | None,
    config: EvaluationConfig,
    progress: bool,
) -> dict[str, Any]:
    """Perplexity on `tokens`, cut to `max_windows` windows when the config sets it."""
    ppl_cfg = config.perplexity
    if tokens is None:
        raise UserInputError("perplexity needs evaluation text: pass --eval-data")
    window = ppl_cfg.window
    stride = ppl_cfg.stride or window
    stream = perplexity_stream(tokens, ppl_cfg, max_positions(model))
    result = timed(
        "perplexity",
        lambda: perplexity(
            model,
            stream,
            window=window,
            stride=stride,
            batch_size=ppl_cfg.batch_size,
            progress=progress,
        ),
    )
    return result.to_dict()


def _measure_agreement(
    timed: _Timer,
    model: Any,
    reference: Any,
    tokens: torch.Tensor | None,
    config: EvaluationConfig,
    progress: bool,
) -> dict[str, Any]:
    """KL divergence and top-1 agreement with `reference` (its memory is not this model's)."""
    agr = config.agreement
    if tokens is None:
        raise UserInputError("agreement with the original needs evaluation text")
    result = timed(
        "agreement",
        lambda: agreement(
            reference,
            model,
            tokens,
            window=agr.window,
            batch_size=agr.batch_size,
            max_windows=agr.max_windows,
            progress=progress,
        ),
        own=False,
    )
    return result.to_dict()


def _measure_bleu(
    timed: _Timer, model: Any, tokenizer: Any | None, config: EvaluationConfig, progress: bool
) -> dict[str, Any]:
    """BLEU of greedy continuations of the config's prompts against their references."""
    if tokenizer is None:
        raise UserInputError("BLEU needs a tokenizer, and this model has none")
    assert config.bleu.references is not None
    pairs = load_prompt_references(config.bleu.references)
    result = timed(
        "bleu",
        lambda: bleu(
            model,
            tokenizer,
            pairs,
            max_new_tokens=config.bleu.max_new_tokens,
            batch_size=config.bleu.batch_size,
            progress=progress,
        ),
    )
    return result.to_dict()


def _measure_speed(
    timed: _Timer, model: Any, config: EvaluationConfig, progress: bool
) -> dict[str, Any]:
    """Prefill and decode throughput at the config's batch sizes."""
    sp = config.speed
    result = timed(
        "speed",
        lambda: measure_speed(
            model,
            batch_sizes=tuple(sp.batch_sizes),
            prompt_len=sp.prompt_len,
            new_tokens=sp.new_tokens,
            warmup=sp.warmup,
            repeats=sp.repeats,
            seed=config.seed,
            progress=progress,
        ),
    )
    return result.to_dict()


def _memory_metrics(
    model: Any, device: torch.device, method: str, timed: _Timer, streamed: bool
) -> dict[str, Any]:
    """The model's peak memory (weights, buffers and the largest measured increase), with the
    process's own numbers for reference and how they were measured. A streamed model holds
    only its buffers between measurements: the blocks, embeddings and head it reads on the way
    are in the increase."""
    params, buffers = parameter_bytes(model)
    if streamed:
        params = 0
        buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    increase = max(timed.increases.values(), default=0)
    note = MEMORY_METHOD_NOTE.format(
        counter="allocated CUDA memory"
        if method == "cuda_max_allocated"
        else "process RSS (sampled every 5 ms)"
    )
    if streamed:
        note += (
            "; the model was streamed from disk one block at a time, so its weights are "
            "counted in the increase as far as they were in memory at once"
        )
    return {
        "device": str(device),
        "method": method,
        "model_peak_bytes": params + buffers + increase,
        "parameter_bytes": params,
        "buffer_bytes": buffers,
        "increase_bytes": increase,
        "increase_bytes_by_metric": timed.increases,
        # The process as a whole, for reference: these do depend on what else it holds.
        "peak_bytes": timed.process.get("peak_bytes", 0),
        "baseline_bytes": timed.process.get("baseline_bytes", 0),
        "streamed": streamed,
        "note": note,
    }


def streamed_unsupported(config: EvaluationConfig, reference: Any | None = None) -> list[str]:
    """The measurements `config` asks for that need the whole model in memory (a model
    streamed from disk gives perplexity, size and memory only)."""
    wanted = []
    if config.speed.enabled:
        wanted.append("speed")
    if config.bleu.references:
        wanted.append("BLEU")
    if config.harness.tasks:
        wanted.append("the harness")
    if reference is not None and config.agreement.enabled:
        wanted.append("agreement with a reference")
    return wanted


def _check_streamable(config: EvaluationConfig, reference: Any | None) -> None:
    wanted = streamed_unsupported(config, reference)
    if wanted:
        raise UserInputError(
            f"{', '.join(wanted)} needs the whole model in memory, and this model is streamed "
            "from disk (it measures perplexity, size and memory)"
        )


def evaluate(
    model: Any,
    tokenizer: Any | None,
    config: EvaluationConfig | None = None,
    *,
    tokens: torch.Tensor | None = None,
    reference: Any | None = None,
    weights_path: str | Path | None = None,
    name: str = "model",
    source: str | None = None,
    eval_data: str | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Measure a model as `config` says.

    tokens: the evaluation text as one 1-D token stream (perplexity and agreement need it).
    reference: the original model, for KL divergence and top-1 agreement.
    weights_path: the checkpoint on disk, for size and bits per weight.
    """
    from ..streaming import stream_of

    config = config or EvaluationConfig()
    torch.manual_seed(config.seed)
    report = EvaluationReport(name=name, source=source, eval_data=eval_data)
    stream = stream_of(model)
    if stream is not None:
        _check_streamable(config, reference)
        device = stream.device
    else:
        device = next(model.parameters()).device

    method = "cuda_max_allocated" if device.type == "cuda" else "rss_sampled"
    if config.memory and stream is None:
        _warm_up(model, device)
    timed = _Timer(name, device, config.memory, report)

    metrics = report.metrics
    if config.perplexity.enabled:
        metrics["perplexity"] = _measure_perplexity(timed, model, tokens, config, progress)
    if config.agreement.enabled and reference is not None:
        metrics["agreement"] = _measure_agreement(timed, model, reference, tokens, config, progress)
    if config.bleu.references:
        metrics["bleu"] = _measure_bleu(timed, model, tokenizer, config, progress)
    if config.speed.enabled:
        metrics["speed"] = _measure_speed(timed, model, config, progress)
    if config.harness.tasks:
        h = config.harness
        metrics["harness"] = timed(
            "harness",
            lambda: run_harness(
                model, tokenizer, list(h.tasks), batch_size=h.batch_size, limit=h.limit
            ),
        )
    if config.size:
        metrics["size"] = model_size(model, weights_path).to_dict()
    if config.memory:
        metrics["memory"] = _memory_metrics(model, device, method, timed, stream is not None)
    metrics["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    metrics["device"] = str(device)
    metrics["streamed"] = stream is not None
    metrics["runtime"] = "transformers"  # evaluation.llama_cpp writes "llama.cpp"
    return report
