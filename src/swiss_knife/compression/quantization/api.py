"""`quantize(model, Config, calibration=...)`: one verb for every method in the registry.

Checks that apply to every method run here, before any work: the config's method is registered,
the model is not already quantized, calibration data is present when the method needs it and has
the right shape, and the device can run the method. The calibration windows themselves come from
`swiss_knife.data.calibration_samples`, shared with pruning and layer reduction.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ...data import check_calibration
from ...errors import UserInputError
from ...models import is_quantized
from .base import QuantizationOutcome, QuantizeContext, get_method


def check_quantize(model: nn.Module, config: Any) -> None:
    """Refuse, from the model's shapes alone, what `quantize` would refuse about them (a group
    size that does not divide a layer's width, ...): the model may sit on the meta device."""
    info = get_method(str(getattr(config, "method", None)))
    _refuse_quantized(model)
    if info.check is not None:
        info.check(model, config)


def _refuse_quantized(model: nn.Module) -> None:
    already = is_quantized(model)
    if already is not None:
        raise UserInputError(
            f"the model is already quantized ({already}); start from the float checkpoint"
        )


def quantize(
    model: nn.Module,
    config: Any,
    *,
    calibration: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> QuantizationOutcome:
    """Quantize `model` in place as `config` says; returns the model and how to save it.

    `calibration` is a LongTensor (num_samples, seq_len) of token ids; methods that need data
    (gptq, awq, static) refuse to run without it.
    """
    method = getattr(config, "method", None)
    info = get_method(str(method))
    if not isinstance(config, info.config_class):
        raise UserInputError(
            f"method {method!r} takes a {info.config_class.__name__}, got {type(config).__name__}"
        )
    _refuse_quantized(model)
    if info.needs_data(config):
        check_calibration(calibration, f"method {method!r}")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = QuantizeContext(
        calibration=calibration,
        device=target,
        progress=progress,
    )
    started = time.perf_counter()
    outcome = info.apply(model, config, ctx)
    outcome.report.setdefault("method", method)
    outcome.report["seconds"] = round(time.perf_counter() - started, 3)
    return outcome
