"""The quantization registry and the contract every method module fulfils.

A method is a function `apply(model, config, ctx) -> QuantizationOutcome`, registered with
`@register_method("name", ConfigClass, needs_calibration=...)`. The registry refuses duplicates, and
the CLI's `--method` choices come from it. A method module imports its optional backend
(bitsandbytes, torchao, ...) inside `apply`, so listing the methods stays cheap.

The outcome carries the model to evaluate (in memory, quantized or fake-quantized so that it
computes what the saved checkpoint will compute) and a `writer` that saves the checkpoint files
(config.json with its quantization_config, weights) into a directory; `save_model` calls it inside
its atomic temporary folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import registry


@dataclass
class QuantizeContext:
    """What a method may use besides the model and its config."""

    calibration: torch.Tensor | None = None  # (num_samples, seq_len) token ids, or None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False


@dataclass
class QuantizationOutcome:
    """A quantized model, how to save it, and what the method measured on the way."""

    model: nn.Module
    writer: Callable[[Path], None]  # writes config.json + weights into a directory
    format: str  # "dense", "compressed-tensors/pack-quantized", "bitsandbytes", "torchao", ...
    steps: list[str] = field(default_factory=list)  # for the model card, in words
    report: dict[str, Any] = field(default_factory=dict)  # sensitivity, timings, ...


MethodFn = Callable[[nn.Module, Any, QuantizeContext], QuantizationOutcome]
# Checks a config against a model's shapes only (it may sit on the meta device): no weights read.
CheckFn = Callable[[nn.Module, Any], None]


def register_method(
    name: str,
    config_class: type,
    *,
    needs_calibration: bool | Callable[[Any], bool],
    check: CheckFn | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register a quantization method in the one registry (see swiss_knife.registry).

    `check(model, config)` raises what `apply` would refuse about the model's shapes (a group
    size that does not divide a layer); it runs before any weights are read or text tokenised.
    """
    return registry.register(
        "quantize", name, config_class, needs_calibration=needs_calibration, check=check
    )


def get_method(name: str) -> registry.Method:
    return registry.get("quantize", name)


def method_names() -> list[str]:
    return registry.names("quantize")
