"""Dynamic int8 ("dynamic"): torchao int8 weights, activations quantized per token at run time.

Method: every targeted ``nn.Linear`` gets a torchao ``Int8Tensor`` weight, symmetric per output
channel (scale ``absmax / 127.5``). With ``Int8DynamicActivationInt8WeightConfig`` (the default)
each forward also quantizes its input per token (one scale per row, computed on the fly from that
row's absmax) and multiplies int8 x int8 with int32 accumulation, the W8A8 "dynamic" scheme of
LLM.int8 (Dettmers et al. 2022, without the fp16 outlier split) and ZeroQuant (Yao et al. 2022,
per-token activations, per-channel weights). No calibration data: per-token scales follow each
token, so outlier tokens cost nothing, but an outlier *channel* still sets its token's scale.
``weight_only=True`` uses ``Int8WeightOnlyConfig`` instead: activations stay float and the int8
weight is converted to float inside every matmul (W8A16).

Backend: torchao >= 0.18 (tested with 0.18.0 on torch 2.13.0 CPU). The PyPI wheel's compiled
extensions (``_C_mxfp8``, ``_C_cutlass_90a``) link against CUDA libraries and fail to load on a
CPU-only torch; torchao logs that and carries on. The int8 configs used here never touch them:
their CPU path is pure PyTorch plus ``torch._int_mm`` (oneDNN int8 GEMM; torchao takes the
u8 x s8 VNNI route on AVX512-VNNI CPUs without AMX), so they work on CPU. ``torch.ao.quantization``
is deprecated and not used.

Saving: the torchao tensors are flattened by torchao's safetensors support into
``_weight_qdata`` / ``_weight_scale`` tensors plus JSON metadata, and ``config.json`` carries a
transformers ``TorchAoConfig`` (``quant_type`` = the torchao config object, serialized by
``torchao.core.config.config_to_dict``; ``modules_to_not_convert`` = every linear left float, so
that loading does not quantize layers the targets excluded, e.g. ``lm_head``). The in-memory model
gets the same ``hf_quantizer`` that ``from_pretrained`` attaches, so ``save_pretrained`` writes
exactly that and a plain ``AutoModelForCausalLM.from_pretrained(dir)`` (torchao installed)
rebuilds the same ``Int8Tensor`` weights: the tests require identical logits.

Costs: quantizing is one pass over the weights (O(params), no data). Memory: 1 byte per weight
plus one float32 scale per output channel. Speed on CPU (prefill of 128 tokens, batch 1, one
thread, torch 2.13 on an AVX512-VNNI VM; full table in `static_int8`): a random Llama 1024 wide
runs 96 ms against 258 ms in fp32 (2.7x faster: real int8 GEMMs), but stories260K (64 wide) runs
7.6 ms against 2.9 ms, because quantizing every activation row with eager PyTorch ops costs more
than such small matmuls. Weight-only gains nothing on CPU speed (the weight is converted back to
float in every call); it saves memory.

Conv1D layers (GPT-2) are refused: torchao's int8 tensors implement ``F.linear`` (Conv1D runs
``addmm`` on an (in, out) weight) and transformers' torchao loader only quantizes ``nn.Linear``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ...config import QuantizeBase
from ...errors import MissingDependencyError, UserInputError
from ...targeting import TargetSpec, resolve_linear_targets
from ..metrics import weight_sqnr_db
from .base import QuantizationOutcome, QuantizeContext, register_method


class DynamicInt8Config(QuantizeBase):
    """torchao int8: int8 weights; activations quantized per token at run time (or kept float)."""

    method: Literal["dynamic"] = "dynamic"
    weight_only: bool = Field(
        default=False, description="Keep activations in float (int8 weight-only)."
    )


FORMAT = "torchao"
INSTALL_HINT = "pip install 'torchao>=0.18'"


@contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """Silence the import-time warnings torchao emits on a CPU-only torch.

    The PyPI wheel ships CUDA-only extensions that cannot load without CUDA libraries, and torch
    notes that torchao registers an Enum with pytree; neither affects the int8 configs used here,
    and both would otherwise print on every run. Only these two loggers, only during the import.
    """
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def import_torchao() -> Any:
    """The ``torchao.quantization`` module, or `MissingDependencyError` with the install hint."""
    try:
        with _quiet_torchao_import():
            import torchao.quantization as tq
    except ImportError as exc:
        raise MissingDependencyError(
            f"the 'dynamic' int8 method needs torchao: {INSTALL_HINT} ({exc})"
        ) from exc
    return tq


def torchao_config(weight_only: bool) -> Any:
    """The torchao config object for int8 dynamic-activation or weight-only quantization.

    ``set_inductor_config=False``: the default would change global torch.compile settings as a
    side effect of quantizing; nothing here compiles, and the saved config should not make every
    later load do it either.
    """
    tq = import_torchao()
    if weight_only:
        return tq.Int8WeightOnlyConfig(set_inductor_config=False)
    return tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _plan(model: nn.Module, config: DynamicInt8Config) -> dict[str, nn.Linear]:
    plan = resolve_linear_targets(
        model,
        TargetSpec(tuple(config.targets), tuple(config.ignore)),
        "torchao int8 tensors and transformers' torchao loader handle nn.Linear only",
    )
    for name, module in plan.items():
        if not module.weight.is_floating_point():
            raise UserInputError(f"{name} has a {module.weight.dtype} weight; it is not float")
    return plan


def _float_linears_left(model: nn.Module, quantized: set[str]) -> list[str]:
    """Every nn.Linear that stays float: the loader must not quantize them (lm_head, ignored)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in quantized
    ]


def attach_torchao_quantizer(model: Any, quant_type: Any, keep_float: list[str]) -> None:
    """Give the model what ``from_pretrained`` gives a loaded torchao model: a ``TorchAoConfig`` in
    its config and a ``TorchAoHfQuantizer``, so that ``save_pretrained`` flattens the torchao
    tensors into safetensors and the saved config reloads them."""
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    config = TorchAoConfig(quant_type=quant_type, modules_to_not_convert=keep_float)
    quantizer = TorchAoHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    # Sets config.quantization_config and marks the config quantized, as from_pretrained does.
    quantizer.postprocess_model(model)


def _writer(model: nn.Module) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        # The attached TorchAoHfQuantizer makes save_pretrained write torchao's flattened
        # safetensors (with the metadata that rebuilds Int8Tensor) and the TorchAoConfig.
        model.save_pretrained(directory)  # type: ignore[operator]

    return write


def apply_dynamic(
    model: nn.Module, config: DynamicInt8Config, ctx: QuantizeContext
) -> QuantizationOutcome:
    """Quantize the targeted linears in place with torchao int8; see the module docstring."""
    tq = import_torchao()
    plan = _plan(model, config)
    quant_type = torchao_config(config.weight_only)
    originals = {name: module.weight.detach().float().cpu() for name, module in plan.items()}
    names = set(plan)
    tq.quantize_(model, quant_type, filter_fn=lambda module, fqn: fqn in names)

    rows: list[dict[str, Any]] = []
    for name, module in plan.items():
        weight: Any = module.weight
        if not hasattr(weight, "dequantize") or not hasattr(weight, "qdata"):
            raise UserInputError(f"torchao did not quantize {name} ({type(weight).__name__})")
        approx = weight.dequantize(torch.float32).cpu()  # (out, in)
        rows.append({"name": name, "weight_sqnr_db": weight_sqnr_db(originals[name], approx)})
    del originals

    attach_torchao_quantizer(model, quant_type, _float_linears_left(model, names))
    activations = "float activations" if config.weight_only else "int8 per-token activations"
    sqnrs = [row["weight_sqnr_db"] for row in rows]
    return QuantizationOutcome(
        model=model,
        writer=_writer(model),
        format=FORMAT,
        steps=[
            f"torchao {type(quant_type).__name__}: int8 symmetric per-channel weights, "
            f"{activations}, {len(rows)} linear layers"
        ],
        report={
            "layers": len(rows),
            "torchao_config": type(quant_type).__name__,
            "min_weight_sqnr_db": min(sqnrs),
            "mean_weight_sqnr_db": sum(sqnrs) / len(sqnrs),
            "sensitivity_kind": "weight SQNR in dB (data-free; lower is worse)",
            "sensitivity": sorted(rows, key=lambda row: row["weight_sqnr_db"]),
        },
    )


register_method("dynamic", DynamicInt8Config, needs_calibration=False)(apply_dynamic)
