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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import EvaluationConfig
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
    config = config or EvaluationConfig()
    torch.manual_seed(config.seed)
    report = EvaluationReport(name=name, source=source, eval_data=eval_data)
    device = next(model.parameters()).device

    increases: dict[str, int] = {}
    process: dict[str, int] = {}
    method = "cuda_max_allocated" if device.type == "cuda" else "rss_sampled"
    if config.memory:
        _warm_up(model, device)

    def timed(key: str, fn: Any, *, own: bool = True) -> Any:
        """Run one measurement, timing it and (when only this model runs) its memory."""
        logger.info("%s: measuring %s", name, key)
        start = time.perf_counter()
        if own and config.memory:
            with PeakMemory(device) as peak:
                result = fn()
            increases[key] = peak.increase_bytes
            process.setdefault("baseline_bytes", peak.baseline_bytes)
            process["peak_bytes"] = max(process.get("peak_bytes", 0), peak.peak_bytes)
        else:
            result = fn()
        report.seconds[key] = round(time.perf_counter() - start, 4)
        return result

    ppl_cfg = config.perplexity
    if ppl_cfg.enabled:
        if tokens is None:
            raise UserInputError("perplexity needs evaluation text: pass --eval-data")
        window = ppl_cfg.window
        stride = ppl_cfg.stride or window
        stream = tokens
        if ppl_cfg.max_windows is not None:
            # Enough tokens for exactly max_windows windows at this stride, counted with the
            # window perplexity() will use (clamped to the model's context, with a warning).
            limit = max_positions(model)
            used = min(window, limit) if limit is not None else window
            step = min(stride, used)
            stream = tokens[: used + step * (ppl_cfg.max_windows - 1)]
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
        report.metrics["perplexity"] = result.to_dict()
    agr = config.agreement
    if agr.enabled and reference is not None:
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
        report.metrics["agreement"] = result.to_dict()
    if config.bleu.references:
        if tokenizer is None:
            raise UserInputError("BLEU needs a tokenizer, and this model has none")
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
        report.metrics["bleu"] = result.to_dict()
    if config.speed.enabled:
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
        report.metrics["speed"] = result.to_dict()
    if config.harness.tasks:
        h = config.harness
        report.metrics["harness"] = timed(
            "harness",
            lambda: run_harness(
                model, tokenizer, list(h.tasks), batch_size=h.batch_size, limit=h.limit
            ),
        )
    if config.size:
        report.metrics["size"] = model_size(model, weights_path).to_dict()
    if config.memory:
        params, buffers = parameter_bytes(model)
        increase = max(increases.values(), default=0)
        report.metrics["memory"] = {
            "device": str(device),
            "method": method,
            "model_peak_bytes": params + buffers + increase,
            "parameter_bytes": params,
            "buffer_bytes": buffers,
            "increase_bytes": increase,
            "increase_bytes_by_metric": increases,
            # The process as a whole, for reference: these do depend on what else it holds.
            "peak_bytes": process.get("peak_bytes", 0),
            "baseline_bytes": process.get("baseline_bytes", 0),
            "note": MEMORY_METHOD_NOTE.format(
                counter="allocated CUDA memory"
                if method == "cuda_max_allocated"
                else "process RSS (sampled every 5 ms)"
            ),
        }
    report.metrics["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    report.metrics["device"] = str(device)
    return report
