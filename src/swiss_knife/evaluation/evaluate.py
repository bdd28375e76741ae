"""One evaluation of one model: the metrics an `EvaluationConfig` asks for, in a fixed order.

Each metric lives in its own module; this file only decides which to run and on what data, and
records how long each took, so a report can always say what was measured and how.
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
from .memory import PeakMemory
from .perplexity import max_positions, perplexity
from .size import model_size
from .speed import measure_speed

logger = logging.getLogger(__name__)


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

    def timed(key: str, fn: Any) -> Any:
        start = time.perf_counter()
        result = fn()
        report.seconds[key] = round(time.perf_counter() - start, 4)
        return result

    with PeakMemory(device) as peak:
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
        from .memory import parameter_bytes

        params, buffers = parameter_bytes(model)
        report.metrics["memory"] = {
            "device": str(device),
            "method": peak.method,
            "peak_bytes": peak.peak_bytes,
            "baseline_bytes": peak.baseline_bytes,
            "parameter_bytes": params,
            "buffer_bytes": buffers,
        }
    report.metrics["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    report.metrics["device"] = str(device)
    return report
