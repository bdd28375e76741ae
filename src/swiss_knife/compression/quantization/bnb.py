"""bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4/FP4) quantization through transformers.

Methods
-------
``8bit`` is LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", arXiv:2208.07339): every weight row is stored as int8 with one absmax scale;
at run time each activation row is quantized to int8 too, except the feature columns holding a
value above ``threshold``, which are multiplied in 16-bit against the dequantized weight columns
(the "outlier decomposition"). ``threshold: 0`` turns the decomposition off (plain W8A8).

``4bit`` is the storage format of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", arXiv:2305.14314): weights in blocks of 64 with one absmax per block, rounded to
the 16 levels of NF4 (quantiles of a normal distribution) or FP4; double quantization stores the
block scales themselves as 8-bit (blocks of 256), about 0.37 fewer bits per weight. Weights are
dequantized on the fly and multiplied in ``compute_dtype``.

Both are data-free. They go through transformers' own integration (``BitsAndBytesConfig``), so the
saved folder is an ordinary bitsandbytes checkpoint: its config.json carries the
quantization_config and plain ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

How
---
1. The in-memory dense model is saved to a temporary folder (it may have no folder of its own, or
   earlier stages may have changed it since it was loaded).
2. It is reloaded with ``quantization_config=BitsAndBytesConfig(...)`` onto the target device;
   bitsandbytes quantizes while loading. Every linear that ``targets``/``ignore`` do not select is
   listed in ``llm_int8_skip_modules`` and stays dense, the LM head included.
3. The quantized model is saved at once to a second temporary folder, before any forward pass
   (see the CPU notes: on some CPUs the first forward repacks 4-bit weights lossily), and the model
   handed back for evaluation is reloaded from that folder. The writer copies the folder, so the
   evaluated model is, by construction, what a reload of the saved checkpoint computes.

Costs: quantization itself is one pass over the weights with no data, but the round trips write
the dense checkpoint and then the quantized one to temporary folders, and peak memory holds the
dense model plus its quantized copy. Storage per quantized weight: 8 bits plus one fp32 scale per
row for 8-bit; 4 bits plus 0.5 bit of fp32 block scales for 4-bit, or about 0.13 bit with double
quantization. Layers left dense keep their dtype. Speed depends on the kernels: LLM.int8 trades
speed for memory (the outlier decomposition and the per-token activation quantization cost time);
4-bit dequantizes on the fly, which pays off when decoding is memory-bound.

Device support, measured with bitsandbytes 0.50.2, torch 2.13 (CPU build), transformers 5.24
----------------------------------------------------------------------------------------------
- CPU works for both methods, from bitsandbytes 0.48.1 on (``MIN_VERSION`` says why not before).
  ``bitsandbytes.supported_torch_devices`` lists cpu, cuda, xpu, hpu, npu and mps; only the CPU
  was tested here.
- 8-bit on CPU: the int8 matmul is ``torch._int_mm`` when torch reports AVX-512, otherwise an fp32
  matmul; activations are cast to fp16 before their int8 quantization, as on CUDA (bitsandbytes
  logs that on every call for fp32/bf16 models, which this module silences). Any shape works.
- 4-bit on CPUs with AVX-512 BF16 (a path present in 0.49.2, absent in 0.48.2): in eval mode the
  first forward repacks each weight for a fused kernel that computes in bf16 whatever
  ``compute_dtype`` says (other CPUs and CUDA honour it), keeps the block scales in bf16, and
  asserts ``out_features % 32 == 0`` and ``in_features % 64 == 0`` (an AssertionError or a reshape
  error otherwise). Saving after that repacking is lossy: with double quantization the scales are
  re-quantized, and without it they are written transposed (wrong for any layer wider than one
  block). Other CPUs dequantize and use a plain matmul, for any shape.
  Hence, for a CPU target device, layers whose shape the fused kernel refuses stay dense (reported
  as ``left_dense``) so that the checkpoint runs on every CPU, and the checkpoint is written before
  any forward pass. (stories260K: hidden 64, intermediate 172, so gate/up_proj (172 rows) and
  down_proj (172 columns) stay dense on CPU and only the attention projections are 4-bit.)
- On import, bitsandbytes 0.50.2 on an AVX-512 BF16 CPU logs "Failed to load CPU gemm_4bit_forward
  from kernels-community": it tries an optional Hub kernel package (``kernels``) and falls back to
  its own bundled CPU kernel, which is what was measured here.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.version import Version
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...config import QuantizeBase
from ...errors import MissingDependencyError, SwissKnifeError, UserInputError
from ...models import DTYPES
from ...targeting import LINEAR_TYPES, TargetSpec, resolve_targets
from .base import QuantizationOutcome, QuantizeContext, register_method


class BnB8bitConfig(QuantizeBase):
    """bitsandbytes LLM.int8 (Dettmers et al. 2022): int8 weights, fp16 outlier columns."""

    method: Literal["8bit"] = "8bit"
    threshold: float = Field(
        default=6.0, ge=0.0, description="Activation magnitude above which a column stays fp16."
    )


class BnB4bitConfig(QuantizeBase):
    """bitsandbytes 4-bit (QLoRA, Dettmers et al. 2023): NF4 or FP4 blocks of 64 weights."""

    method: Literal["4bit"] = "4bit"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(default=True, description="Quantize the block scales too.")
    compute_dtype: Literal["fp32", "fp16", "bf16"] = "bf16"


logger = logging.getLogger(__name__)

FORMAT = "bitsandbytes"
# Measured on CPU: 0.46.1-0.48.0 compute garbage with 8-bit (0.48.0 is bitsandbytes#1775, a
# regression for pre-quantized int8 checkpoints, which is how the evaluated model is loaded) and
# 0.46.1 refuses FP4; this module's tests pass with 0.48.1, 0.48.2, 0.49.2, 0.50.0 and 0.50.2.
# (transformers 5 itself refuses anything below 0.46.1.)
MIN_VERSION = "0.48.1"
PIP_INSTALL = f"pip install 'bitsandbytes>={MIN_VERSION}'"
BLOCK_SIZE = 64  # bitsandbytes' 4-bit block (Params4bit's default; BitsAndBytesConfig has no knob)
CPU_ROW_TILE = 32  # rows per tile of the fused AVX-512 BF16 4-bit kernel (`block_n`)


# --------------------------------------------------------------------------- checks


def _import_bitsandbytes() -> Any:
    """The bitsandbytes module, or MissingDependencyError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError(
            f"bitsandbytes quantization needs the bitsandbytes package: {PIP_INSTALL}"
        ) from exc
    except Exception as exc:  # a broken install (e.g. a mismatched native library)
        raise MissingDependencyError(
            f"bitsandbytes is installed but failed to import ({type(exc).__name__}: {exc}); "
            f"reinstall it: {PIP_INSTALL}"
        ) from exc
    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(MIN_VERSION):
        raise MissingDependencyError(
            f"bitsandbytes {version} is too old (8-bit gives wrong results on CPU before "
            f"{MIN_VERSION}): {PIP_INSTALL}"
        )
    return bitsandbytes


def _check_model(model: nn.Module) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise UserInputError(
            "bitsandbytes quantization needs a Hugging Face model (a PreTrainedModel), got "
            f"{type(model).__name__}"
        )
    existing = getattr(model.config, "quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None or existing is not None:
        method = (
            existing.get("quant_method")
            if isinstance(existing, dict)
            else getattr(existing, "quant_method", None)
        )
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        raise UserInputError(
            f"the model is already quantized ({method or 'unknown method'}); bitsandbytes "
            "quantizes dense weights, so start from the dense (fp32/fp16/bf16) model"
        )


def _check_device(bnb: Any, device: torch.device) -> None:
    supported = set(getattr(bnb, "supported_torch_devices", {"cuda"}))
    if device.type not in supported:
        raise UserInputError(
            f"bitsandbytes {bnb.__version__} cannot run on device {device.type!r}; "
            f"it supports {', '.join(sorted(supported))}"
        )


def _features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or GPT-2 Conv1D (whose weight is (in, out))."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(module, Conv1D):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


def _cpu_4bit_misfit(module: nn.Module) -> str | None:
    """What about this layer's shape the fused CPU 4-bit kernel refuses, or None."""
    out_features, in_features = _features(module)
    problems = []
    if out_features % CPU_ROW_TILE:
        problems.append(f"{out_features} output rows are not a multiple of {CPU_ROW_TILE}")
    if in_features % BLOCK_SIZE:
        problems.append(f"{in_features} input columns are not a multiple of {BLOCK_SIZE}")
    return " and ".join(problems) or None


def _plan(
    model: nn.Module, config: BnB8bitConfig | BnB4bitConfig, device: torch.device
) -> tuple[list[str], list[str], dict[str, str]]:
    """(layers to quantize, linears to keep dense, {target left dense: why}); no work done yet."""
    targets = resolve_targets(model, TargetSpec(tuple(config.targets), tuple(config.ignore)))
    # transformers converts exactly `nn.Linear` and Conv1D; a subclass would silently stay dense.
    odd = [
        f"{name} ({type(module).__name__})"
        for name, module in targets.items()
        if type(module) is not nn.Linear and not isinstance(module, Conv1D)
    ]
    if odd:
        shown = ", ".join(odd[:3]) + (", ..." if len(odd) > 3 else "")
        raise UserInputError(
            f"bitsandbytes converts only nn.Linear and Conv1D layers; targeted layers of other "
            f"types: {shown}; exclude them with `ignore`"
        )
    left_dense: dict[str, str] = {}
    if isinstance(config, BnB4bitConfig) and device.type == "cpu":
        for name, module in targets.items():
            misfit = _cpu_4bit_misfit(module)
            if misfit is not None:
                left_dense[name] = f"bitsandbytes' CPU 4-bit kernel refuses it: {misfit}"
        if left_dense and len(left_dense) == len(targets):
            example, reason = next(iter(left_dense.items()))
            raise UserInputError(
                f"none of the {len(targets)} targeted layers can be 4-bit on CPU (e.g. {example}: "
                f"{reason}); quantize for a CUDA device, or use the 8bit method"
            )
    quantize = [name for name in targets if name not in left_dense]
    chosen = set(quantize)
    keep = [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, LINEAR_TYPES) and name not in chosen
    ]
    return quantize, keep, left_dense


# --------------------------------------------------------------------------- quantization


class _DropCastNotice(logging.Filter):
    """Drops bitsandbytes' per-call notice that fp32/bf16 activations are cast to fp16.

    LLM.int8 always quantizes activations from fp16; bitsandbytes logs that once per layer per
    forward pass, which buries every other message during an evaluation.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _silence_cast_notice() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropCastNotice())


def _device_map(device: torch.device) -> dict[str, str]:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": str(device)}


def _snapshot_writer(snapshot: tempfile.TemporaryDirectory[str]) -> Callable[[Path], None]:
    """A writer that copies the checkpoint saved right after quantization.

    The closure keeps the TemporaryDirectory alive; it is deleted with the outcome.
    """

    def write(directory: Path) -> None:
        shutil.copytree(snapshot.name, directory, dirs_exist_ok=True)

    return write


def _bnb_config(config: BnB8bitConfig | BnB4bitConfig, keep: list[str]) -> Any:
    """transformers' BitsAndBytesConfig for `config`, with the `keep` linears left dense."""
    from transformers import BitsAndBytesConfig

    common: dict[str, Any] = {"llm_int8_skip_modules": keep}
    if isinstance(config, BnB8bitConfig):
        _silence_cast_notice()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.threshold, **common)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=DTYPES[config.compute_dtype],
        **common,
    )


def _round_trip(
    model: nn.Module, bnb_config: Any, device: torch.device
) -> tuple[Any, tempfile.TemporaryDirectory[str]]:
    """Quantize by reloading a dense save of `model` with `bnb_config`, save the result at once
    to a snapshot folder and reload it from there (see the module notes).

    Returns the reloaded model, in eval mode, and the snapshot folder (the caller owns it).
    """
    model_cls: Any = type(model)
    dtype = next(model.parameters()).dtype  # non-target layers keep the model's dtype
    device_map = _device_map(device)
    snapshot = tempfile.TemporaryDirectory(prefix="swiss-knife-bnb-")
    try:
        with tempfile.TemporaryDirectory(prefix="swiss-knife-dense-") as dense_dir:
            model.save_pretrained(dense_dir)  # type: ignore[operator]
            quantized = model_cls.from_pretrained(
                dense_dir, quantization_config=bnb_config, dtype=dtype, device_map=device_map
            )
        # Saved before any forward pass can repack the weights (see the module notes).
        quantized.save_pretrained(snapshot.name)
        del quantized
        quantized = model_cls.from_pretrained(snapshot.name, device_map=device_map)
    except BaseException:
        snapshot.cleanup()
        raise
    quantized.eval()
    return quantized, snapshot


def _check_conversion(
    bnb: Any,
    quantized: nn.Module,
    quantize: list[str],
    keep: list[str],
    left_dense: dict[str, str],
    snapshot: tempfile.TemporaryDirectory[str],
) -> set[str]:
    """The layers bitsandbytes converted; refuses (deleting the snapshot) any meant to stay
    dense, and adds the targets transformers kept dense to `left_dense`, with a warning."""
    converted = {
        name
        for name, module in quantized.named_modules()
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    }
    wrongly = sorted(set(keep) & converted)
    if wrongly:  # bitsandbytes matches skip names as prefixes/regexes/suffixes: never trust it
        snapshot.cleanup()
        raise SwissKnifeError(f"bitsandbytes quantized layers meant to stay dense: {wrongly[:3]}")
    for name in quantize:
        if name not in converted:  # e.g. a model class's _keep_in_fp32_modules
            left_dense[name] = "kept dense by transformers (the model keeps it in fp32)"
    if left_dense:
        logger.warning(
            "%d targeted layer(s) stay dense, e.g. %s: %s",
            len(left_dense),
            *next(iter(left_dense.items())),
        )
    return converted


def _step(
    config: BnB8bitConfig | BnB4bitConfig,
    converted: set[str],
    left_dense: dict[str, str],
    fused_cpu: bool,
) -> str:
    """What was done, in words, for the outcome's steps."""
    step = f"bitsandbytes {_describe(config)} ({len(converted)} linear layers)"
    if left_dense:
        step += (
            f"; {len(left_dense)} targeted layer(s) left dense ({next(iter(left_dense.values()))})"
        )
    if fused_cpu:
        step += "; this CPU's fused 4-bit kernel computes in bf16"
    return step


def _quantize(
    model: nn.Module,
    config: BnB8bitConfig | BnB4bitConfig,
    ctx: QuantizeContext,
) -> QuantizationOutcome:
    """Quantize `model` with bitsandbytes as `config` says (see the module notes)."""
    bnb = _import_bitsandbytes()
    _check_model(model)
    _check_device(bnb, ctx.device)
    quantize, keep, left_dense = _plan(model, config, ctx.device)
    bnb_config = _bnb_config(config, keep)
    quantized, snapshot = _round_trip(model, bnb_config, ctx.device)
    converted = _check_conversion(bnb, quantized, quantize, keep, left_dense, snapshot)

    fused_cpu = bool(
        isinstance(config, BnB4bitConfig)
        and ctx.device.type == "cpu"
        and getattr(bnb.functional, "has_avx512bf16", lambda: False)()
    )
    return QuantizationOutcome(
        model=quantized,
        writer=_snapshot_writer(snapshot),
        format=FORMAT,
        steps=[_step(config, converted, left_dense, fused_cpu)],
        report={
            "bitsandbytes": bnb.__version__,
            "quantized_layers": len(converted),
            "dense_linears": keep + sorted(name for name in left_dense if name not in keep),
            "left_dense": left_dense,
            "cpu_fused_4bit_kernel": fused_cpu,
        },
    )


def _describe(config: BnB8bitConfig | BnB4bitConfig) -> str:
    if isinstance(config, BnB8bitConfig):
        outliers = (
            f"activation columns above {config.threshold:g} kept in fp16"
            if config.threshold > 0
            else "no outlier decomposition"
        )
        return f"LLM.int8: int8 weights with one scale per row, {outliers}"
    scales = "double-quantized scales" if config.double_quant else "fp32 scales"
    return (
        f"4-bit {config.quant_type.upper()}: blocks of {BLOCK_SIZE} weights, {scales}, "
        f"compute in {config.compute_dtype}"
    )


@register_method("8bit", BnB8bitConfig, needs_calibration=False)
def apply_8bit(
    model: nn.Module, config: BnB8bitConfig, ctx: QuantizeContext
) -> QuantizationOutcome:
    """LLM.int8 through transformers' bitsandbytes integration."""
    return _quantize(model, config, ctx)


@register_method("4bit", BnB4bitConfig, needs_calibration=False)
def apply_4bit(
    model: nn.Module, config: BnB4bitConfig, ctx: QuantizeContext
) -> QuantizationOutcome:
    """NF4/FP4 (QLoRA's format) through transformers' bitsandbytes integration."""
    return _quantize(model, config, ctx)
