"""`prune(model, Config, calibration=...)`: one verb for every pruning method in the registry.

Checks that apply to every method run here, before any work: the config's method is registered,
the model is not quantized (pruning rewrites float weights), calibration data is present when the
method needs it and has the right shape.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ...data import check_calibration
from ...errors import UserInputError
from ...models import is_quantized
from .base import PruneContext, PruneOutcome, get_method


def calibration_reason(config: Any) -> str | None:
    """Why a pruning config needs calibration text, in words, or None when it is data-free."""
    method = getattr(config, "method", None)
    info = get_method(str(method))
    if not info.needs_data(config):
        return None
    if info.needs_calibration:
        return f"method {method!r}"
    if getattr(config, "allocation", None) == "owl":
        return "allocation 'owl' (it ranks layers by activation outliers)"
    if getattr(config, "importance", None) == "activation":
        return "importance 'activation'"
    return None


def prune(
    model: nn.Module,
    config: Any,
    *,
    calibration: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    train_tokens: torch.Tensor | None = None,
) -> PruneOutcome:
    """Prune `model` in place as `config` says; returns the model and how to save it.

    `calibration` is a LongTensor (num_samples, seq_len) of token ids; methods that need data
    (wanda, sparsegpt, structured with activation importance) refuse to run without it.
    `train_tokens` is a 1-D token stream for the fine-tuning of a gradual schedule.
    """
    method = getattr(config, "method", None)
    info = get_method(str(method))
    if not isinstance(config, info.config_class):
        raise UserInputError(
            f"method {method!r} takes a {info.config_class.__name__}, got {type(config).__name__}"
        )
    already = is_quantized(model)
    if already is not None:
        raise UserInputError(
            f"the model is quantized ({already}); prune the float checkpoint, then quantize"
        )
    reason = calibration_reason(config)
    if reason is not None:
        check_calibration(calibration, reason)
    if getattr(config, "schedule", None) is not None and train_tokens is None:
        raise UserInputError(
            "a gradual schedule fine-tunes between steps and needs training text: pass "
            "--train-data (or data.calibration in a recipe)"
        )
    target = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = PruneContext(
        calibration=calibration,
        device=target,
        progress=progress,
        train_tokens=train_tokens,
    )
    started = time.perf_counter()
    outcome = info.apply(model, config, ctx)
    outcome.report.setdefault("method", method)
    outcome.report["seconds"] = round(time.perf_counter() - started, 3)
    return outcome
