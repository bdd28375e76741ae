"""`quantize(model, Config, calibration=...)`: one verb for every method in the registry.

Checks that apply to every method run here, before any work: the config's method is registered,
the model is not already quantized, calibration data is present when the method needs it and has
the right shape, and the device can run the method.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import CalibrationSettings, DataConfig
from ...data import load_token_stream, sample_calibration
from ...errors import DataError, UserInputError
from .base import QuantizationOutcome, QuantizeContext, get_method

logger = logging.getLogger(__name__)


def is_quantized(model: nn.Module) -> str | None:
    """The quantization method a model already carries, or None for a float model."""
    if getattr(model, "hf_quantizer", None) is not None:
        return str(getattr(model, "quantization_method", None) or "quantized")
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
        return str(method or getattr(qconfig, "quant_method", "quantized"))
    return None


def calibration_samples(
    source: DataConfig | str,
    tokenizer: Any,
    settings: CalibrationSettings,
    *,
    max_positions: int | None = None,
) -> torch.Tensor:
    """Seeded calibration windows (num_samples, seq_len) from a text source.

    A seq_len above the model's `max_position_embeddings` is refused when it was asked for (the
    windows would not be what the recipe records); the default (512) shrinks to the limit.
    """
    seq_len = fit_seq_len(settings, max_positions)
    stream = load_token_stream(source, tokenizer)
    if stream.numel() < seq_len:
        raise DataError(
            f"calibration text has {stream.numel()} tokens, fewer than one window of {seq_len}"
        )
    return sample_calibration(stream, settings.num_samples, seq_len, settings.seed)


def fit_seq_len(settings: CalibrationSettings, max_positions: int | None) -> int:
    """The calibration window length for a model taking `max_positions` tokens (None: any)."""
    seq_len = settings.seq_len
    if max_positions is None or seq_len <= max_positions:
        return seq_len
    if "seq_len" in settings.model_fields_set:
        raise UserInputError(
            f"calibration seq_len {seq_len} exceeds the {max_positions} positions the model "
            f"takes (max_position_embeddings); use a seq_len of at most {max_positions}"
        )
    logger.info("calibration windows of %d tokens, the model's position limit", max_positions)
    return max_positions


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


def model_calibration_samples(
    model: nn.Module, source: DataConfig | str, tokenizer: Any, settings: CalibrationSettings
) -> torch.Tensor:
    """`calibration_samples` with windows no longer than the model's position limit."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return calibration_samples(source, tokenizer, settings, max_positions=limit)


def quantize(
    model: nn.Module,
    config: Any,
    *,
    calibration: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    tokenizer: Any | None = None,
    source_dir: str | Path | None = None,
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
    if info.needs_calibration:
        if calibration is None:
            raise UserInputError(
                f"method {method!r} needs calibration data: pass --calibration-data "
                "(or data.calibration in a recipe)"
            )
        if calibration.dtype != torch.long or calibration.dim() != 2 or calibration.numel() == 0:
            raise UserInputError(
                "calibration must be a non-empty LongTensor (num_samples, seq_len)"
            )
    target = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = QuantizeContext(
        calibration=calibration,
        device=target,
        progress=progress,
        source_dir=Path(source_dir) if source_dir is not None else None,
        tokenizer=tokenizer,
    )
    started = time.perf_counter()
    outcome = info.apply(model, config, ctx)
    outcome.report.setdefault("method", method)
    outcome.report["seconds"] = round(time.perf_counter() - started, 3)
    return outcome
