"""The pruning registry and the contract every pruning method fulfils.

Same shape as the quantization registry: a method is `apply(model, config, ctx) -> PruneOutcome`,
registered with `@register_method("name", ConfigClass, needs_calibration=...)`; the registry
refuses duplicates and the CLI's `--method` choices come from it.
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
class PruneContext:
    """What a method may use besides the model and its config."""

    calibration: torch.Tensor | None = None  # (num_samples, seq_len) token ids, or None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    # Token stream for fine-tuning between the steps of a gradual schedule, or None.
    train_tokens: torch.Tensor | None = None


@dataclass
class PruneOutcome:
    """A pruned model, how to save it, and what the method measured on the way."""

    model: nn.Module
    writer: Callable[[Path], None]  # writes config.json + weights into a directory
    format: str  # "dense", "compressed-tensors/sparse-bitmask", "dense/structured"
    steps: list[str] = field(default_factory=list)  # for the model card, in words
    report: dict[str, Any] = field(default_factory=dict)  # per-layer sparsity, errors, timings


MethodFn = Callable[[nn.Module, Any, PruneContext], PruneOutcome]


def register_method(
    name: str, config_class: type, *, needs_calibration: bool | Callable[[Any], bool]
) -> Callable[[MethodFn], MethodFn]:
    """Register a pruning method in the one registry (see swiss_knife.registry)."""
    return registry.register("prune", name, config_class, needs_calibration=needs_calibration)


def get_method(name: str) -> registry.Method:
    return registry.get("prune", name)


def method_names() -> list[str]:
    return registry.names("prune")
