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

from ...errors import UserInputError


@dataclass
class QuantizeContext:
    """What a method may use besides the model and its config."""

    calibration: torch.Tensor | None = None  # (num_samples, seq_len) token ids, or None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False
    source_dir: Path | None = None  # the model's directory on disk, when it has one
    tokenizer: Any | None = None


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


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_class: type
    apply: MethodFn
    needs_calibration: bool
    description: str
    check: CheckFn | None = None  # the problems `apply` would refuse, found from shapes alone


_METHODS: dict[str, MethodInfo] = {}


def register_method(
    name: str, config_class: type, *, needs_calibration: bool, check: CheckFn | None = None
) -> Callable[[MethodFn], MethodFn]:
    """Register a quantization method; a second registration of a name is an error.

    `check(model, config)` raises what `apply` would refuse about the model's shapes (a group
    size that does not divide a layer); it runs before any weights are read or text tokenised.
    """

    def decorator(fn: MethodFn) -> MethodFn:
        if name in _METHODS:
            raise ValueError(f"quantization method {name!r} is already registered")
        doc = (config_class.__doc__ or "").strip().splitlines()
        _METHODS[name] = MethodInfo(
            name, config_class, fn, needs_calibration, doc[0] if doc else "", check
        )
        return fn

    return decorator


def _load_builtin_methods() -> None:
    # Importing the modules runs their @register_method decorators; backends load lazily.
    from . import awq, bnb, dense, static_int8, torchao_int8, weight_only  # noqa: F401


def get_method(name: str) -> MethodInfo:
    _load_builtin_methods()
    if name not in _METHODS:
        raise UserInputError(
            f"unknown quantization method {name!r}; available: {', '.join(method_names())}"
        )
    return _METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return list(_METHODS)


def dense_writer(model: nn.Module) -> Callable[[Path], None]:
    """The writer for a model that saves as an ordinary dense checkpoint."""

    def write(directory: Path) -> None:
        model.save_pretrained(directory)  # type: ignore[operator]

    return write
