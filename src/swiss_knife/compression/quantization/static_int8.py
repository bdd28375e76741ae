"""Static W8A8 int8 ("static"): calibrated per-tensor activation scales, optional SmoothQuant.

Every targeted ``nn.Linear`` gets int8 weights (symmetric, one scale per output channel,
``absmax / 127.5`` as compressed-tensors computes it) and int8 inputs with ONE scale per tensor,
fixed ahead of time from calibration data: ``input_scale = max |x| / 127.5``, the absmax of the
layer's input over every calibration token (a min-max observer without averaging). At run time an
input is fake-quantized as ``round(clamp(x / s, -128, 127)) * s``. Static per-tensor scales are
what int8 GEMM kernels want (no per-token reduction before the matmul), but one outlier channel
stretches the scale of the whole tensor and rounds every ordinary channel to a few levels.

SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", arXiv:2211.10438) moves that difficulty into the weights: per input
channel ``j``, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (max over calibration tokens, and
over the rows of every linear reading ``X``); ``X / s`` then has flat channels and ``W * s``
absorbs the scale, so ``(X / s)(W * s)^T = X W^T`` exactly in real arithmetic. ``X / s`` costs
nothing at run time because ``1 / s`` is folded into whatever produced ``X``:

- attention input: ``attn_norm`` (its weight, and its bias for LayerNorm; Gemma's ``1 + w`` norms
  get ``w' = (1 + w) / s - 1``) feeds exactly q/k/v (or the fused qkv), per `arch`;
- MLP input: ``mlp_norm`` feeds exactly the MLP input linear(s) (gate/up, fused gate_up, fc1);
- ``o_proj`` input: the attention output is linear in V, so ``1 / s`` folds into the ROWS of
  ``v_proj`` (weight and bias). With grouped-query attention one V channel feeds one channel of
  every query head of its group, so ``s`` is shared across the group (max over the group's
  channels). Only for separate q/k/v projections (not Phi-3's fused qkv or GPT-NeoX's per-head
  layout, whose V rows are interleaved);
- ``down_proj`` input: ``act(gate(x)) * up(x)`` is linear in ``up``, so ``1 / s`` folds into the
  rows of ``up_proj``. Only for gated MLPs with separate gate and up (Llama, Gemma, Qwen,
  Mistral...); a plain ``fc2(act(fc1(x)))`` is not linear in fc1, and for fused gate_up the
  up half would need the interleaving handled, so those keep unsmoothed inputs.

Folding into a norm is skipped when the model is post-norm (OPT-350m: its norms do not feed the
linears), when the norm has no weight, and for Gemma's ``1 + w`` norms stored in 16 bits
(``w' = (1 + w) / s - 1`` lands near -1, where bf16 keeps almost no digits of ``1 + w'``). Scaling the rows of an int8 ``v_proj`` / ``up_proj`` that is already quantized keeps its
integers and divides its per-channel scales, so the order of the walk does not matter.

The walk is the shared calibration engine (`calibration.run_calibration`), true-sequential: each
group of linears ([q, k, v], [o], [gate, up], [down]) is observed on the outputs of the already
quantized groups and blocks before it (weights AND activations), then smoothed, given its input
scale and quantized. Post-smoothing input absmax follows from the observed per-channel absmax:
``max_j(max|X_j| / s_j)``, so one pass per group suffices.

Saved format: compressed-tensors ``int-quantized``, the W8A8 layout llm-compressor writes and
vLLM serves with its int8 ``scaled_mm`` kernels (vLLM itself is not run by the tests): per quantized linear ``weight`` int8 (out, in),
``weight_scale`` (out, 1) and ``input_scale`` (1,) in the model dtype; one config group
``targets: [Linear]`` with ``weights {num_bits 8, type int, symmetric, strategy channel}`` and
``input_activations {num_bits 8, type int, symmetric, strategy tensor, dynamic false}``, and the
float linears (``lm_head``...) in ``ignore``. Written by this module; compressed-tensors is only
needed to LOAD it.

What transformers 5.24 + compressed-tensors 0.20 do with it on CPU (checked by the tests): plain
``from_pretrained`` wraps every quantized linear's forward, decompresses the int8 weights to the
model dtype at the first forward (``q * weight_scale``), and DOES fake-quantize the inputs with
the static ``input_scale`` at run time (torch path: ``x / s``, clamp to [-128, 127], round, ``* s``,
in the model dtype). There is no int8 kernel on that path: it computes in float. The in-memory
model built here does exactly the same (dequantized weights, a forward pre-hook with the same ops
in the same dtype), and the reloaded logits equal the in-memory ones bit for bit.

Costs: calibration runs one forward pass per group and one replay per block over the calibration
set (5 passes per block for Llama), keeping the per-channel absmax of each group's input
((in,) float32 per linear) and the int8 levels of every quantized weight (1 byte per weight).

Speed, CPU, prefill of 128 tokens, batch 1, fp32, one thread, torch 2.13, measured on this
project's shared 2-core AVX512-VNNI VM (load average about 9 from other jobs, so the models were
timed interleaved and the minimum over 12-40 rounds is reported):

    model                        fp32     static    static     dynamic   dynamic
                                          in memory reloaded   (torchao) weight-only
    stories260K (64 wide)        2.9 ms   3.2 ms    4.8 ms     7.6 ms    3.2 ms
    Llama 1024 wide (MLP 2816),  258 ms   257 ms    271 ms     96 ms     267 ms
    4 layers, random weights

There is no int8 kernel behind "static" on CPU: both the in-memory model and the reloaded one
fake-quantize in float, so they are as fast as fp32 at best (the elementwise quantize-dequantize
of each input costs 13% on stories260K's tiny layers, nothing measurable at width 1024, and
compressed-tensors' forward wrapper adds another 5-50%). The format is meant for serving with vLLM
on a GPU, whose int8 ``scaled_mm`` kernels read half the weight bytes of fp16. For int8 speed on
CPU use "dynamic" (torchao's ``torch._int_mm`` path, 2.7x faster than fp32 at width 1024, slower
on tiny layers where its per-token quantization overhead dominates).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...arch import ArchSpec, attention_geometry, find_module, is_pre_norm
from ...calibration import BlockCalibrator, BlockContext, run_calibration, sequential_groups
from ...config import CalibrationSettings, Flag, QuantizeBase
from ...errors import UnsupportedArchitectureError, UserInputError
from ...streaming import save_as
from ...targeting import TargetSpec, resolve_linear_targets
from ..checkpoint import tied_duplicates, write_checkpoint
from ..metrics import weight_sqnr_db
from .base import QuantizationOutcome, QuantizeContext, register_method
from .grid import QuantGrid, QuantizedWeight
from .rtn import rtn_quantize


class StaticInt8Config(QuantizeBase):
    """int8 weights and int8 activations with scales calibrated on data (W8A8 static)."""

    method: Literal["static"] = "static"
    smoothquant_alpha: Annotated[
        float | None, Flag(none=("none", "off", "null"), metavar="ALPHA")
    ] = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="SmoothQuant migration strength; null disables smoothing.",
    )
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)


FORMAT = "compressed-tensors/int-quantized"
CT_FORMAT = "int-quantized"
INT8_CHANNEL = QuantGrid(bits=8, symmetric=True, group_size=None)
QMIN, QMAX = -128.0, 127.0
# Symmetric 8-bit scales map absmax to half of the 255 steps, as compressed-tensors does.
HALF_STEPS = 127.5
# SmoothQuant's reference code clamps scales from below by this.
MIN_SMOOTH_SCALE = 1e-5


# ---------------------------------------------------------------------------------------------
# Tensor math.
# ---------------------------------------------------------------------------------------------


def fake_quantize_activation(x: Tensor, scale: Tensor) -> Tensor:
    """Per-tensor symmetric int8 fake quantization, op for op as compressed-tensors 0.20 runs it
    on CPU (``_quantize_dequantize``): divide, clamp to [-128, 127], round, cast to the scale's
    dtype, multiply. The same order and dtypes give bit-identical results to a reloaded model."""
    q = torch.clamp(x / scale, QMIN, QMAX).round()
    return q.to(scale.dtype) * scale


def activation_scale(absmax: float, dtype: torch.dtype) -> Tensor:
    """The (1,) input scale for an observed absmax, in the dtype the checkpoint stores it in.

    A never-activated input gets the dtype's eps instead of 0, as compressed-tensors does, so the
    division stays finite.
    """
    value = absmax / HALF_STEPS
    if value == 0.0 or not math.isfinite(value):
        if not math.isfinite(value):
            raise UserInputError(f"calibration activations are not finite (absmax {absmax})")
        value = float(torch.finfo(dtype).eps)
    return torch.tensor([value], dtype=dtype)


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-channel ``s = max|X|^alpha / max|W|^(1 - alpha)``, (in,) float32.

    Channels that never activate or have all-zero weights keep ``s = 1``: their ratio carries no
    information, and a tiny ``s`` would blow up the folded norm weight for nothing.
    """
    act = act_absmax.float()
    wmax = weight_absmax.float()
    scales = act.pow(alpha) / wmax.clamp_min(MIN_SMOOTH_SCALE).pow(1.0 - alpha)
    scales = scales.clamp_min(MIN_SMOOTH_SCALE)
    dead = (act == 0) | (wmax == 0) | ~torch.isfinite(scales)
    return torch.where(dead, torch.ones_like(scales), scales)


class ChannelAbsMaxObserver:
    """Running max over tokens of |x[:, j]| per input channel: SmoothQuant's activation scales,
    and (its max) the per-tensor absmax of the static activation scale."""

    def __init__(self) -> None:
        self._value: Tensor | None = None
        self.tokens = 0

    def update(self, inp: Tensor) -> None:
        """Fold in inputs of shape (tokens, in_features)."""
        if inp.shape[0] == 0:
            return
        chunk = inp.detach().abs().amax(dim=0).float()  # (in_features,)
        self._value = chunk if self._value is None else torch.maximum(self._value, chunk)
        self.tokens += inp.shape[0]

    @property
    def value(self) -> Tensor:
        if self._value is None:
            raise RuntimeError("ChannelAbsMaxObserver has seen no inputs")
        return self._value


# ---------------------------------------------------------------------------------------------
# Where smoothing can be folded.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmoothMapping:
    """One smoothable activation: what produces it and which linears read it.

    ``kind`` "norm": ``source`` is a norm whose weight (and bias) absorb ``1 / s``; "rows":
    ``source`` is a linear whose output rows absorb it (``v_proj`` for ``o_proj``, ``up_proj``
    for ``down_proj``). ``group`` > 1 shares one scale across that many consecutive blocks of
    ``width`` reader channels (grouped-query attention: the query heads of one kv head).
    """

    kind: Literal["norm", "rows"]
    source: str
    readers: tuple[str, ...]
    group: int = 1
    width: int = 0


def _foldable_norm(module: nn.Module | None, offset: float) -> bool:
    """Whether ``1 / s`` can be folded into this norm's weight without losing precision.

    Gemma-style norms multiply by ``1 + w``; folding gives ``w' = (1 + w) / s - 1``, which for
    ``s`` > 1 lands near -1, where a 16-bit float has a spacing of 2^-8 (bf16) so ``1 + w'`` would
    keep only a few correct bits. Such norms are smoothed only in float32.
    """
    weight = getattr(module, "weight", None) if module is not None else None
    if not isinstance(weight, Tensor):
        return False
    return offset == 0.0 or weight.dtype in (torch.float32, torch.float64)


def block_mappings(ctx: BlockContext) -> dict[str, SmoothMapping]:
    """Reader full name -> the mapping that smooths its input, for the foldable activations of
    one block (module docstring). Readers of the same activation share one mapping object."""
    spec: ArchSpec = ctx.spec
    block = ctx.block
    mappings: list[SmoothMapping] = []
    pre_norm = ctx.config is None or is_pre_norm(ctx.config, spec)

    qkv = [p for p in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj) if p is not None]
    offset = spec.norm_weight_offset
    if pre_norm and _foldable_norm(find_module(block, spec.attn_norm), offset):
        mappings.append(
            SmoothMapping("norm", ctx.full_name(spec.attn_norm), tuple(map(ctx.full_name, qkv)))
        )
    mlp_norm = find_module(block, spec.mlp_norm)
    if pre_norm and spec.mlp_norm is not None and _foldable_norm(mlp_norm, offset):
        mappings.append(
            SmoothMapping(
                "norm", ctx.full_name(spec.mlp_norm), tuple(map(ctx.full_name, spec.mlp_up))
            )
        )

    v_proj = find_module(block, spec.v_proj)
    o_proj = find_module(block, spec.o_proj)
    if (
        spec.qkv_layout == "separate"
        and spec.v_proj is not None
        and ctx.config is not None
        and isinstance(v_proj, nn.Linear)
        and isinstance(o_proj, nn.Linear)
    ):
        heads, kv_heads, head_dim = attention_geometry(ctx.config, spec)
        if (
            heads % kv_heads == 0
            and v_proj.out_features == kv_heads * head_dim
            and o_proj.in_features == heads * head_dim
        ):
            mappings.append(
                SmoothMapping(
                    "rows",
                    ctx.full_name(spec.v_proj),
                    (ctx.full_name(spec.o_proj),),
                    group=heads // kv_heads,
                    width=head_dim,
                )
            )

    if spec.mlp_gated and not spec.fused_gate_up and len(spec.mlp_up) == 2:
        gate_name, up_name = spec.mlp_up
        up = find_module(block, up_name)
        down = find_module(block, spec.mlp_down)
        if (
            gate_name.endswith("gate_proj")
            and up_name.endswith("up_proj")
            and isinstance(up, nn.Linear)
            and isinstance(down, nn.Linear)
            and up.out_features == down.in_features
        ):
            mappings.append(
                SmoothMapping("rows", ctx.full_name(up_name), (ctx.full_name(spec.mlp_down),))
            )
    return {reader: mapping for mapping in mappings for reader in mapping.readers}


def _grouped(values: Tensor, mapping: SmoothMapping) -> Tensor:
    """Reader channels (heads * head_dim,) -> source channels (kv_heads * head_dim,), max over
    the query heads sharing each kv head; identity without grouping."""
    if mapping.group == 1:
        return values
    # Query head h reads kv head h // group (transformers' repeat_kv), channel h * width + d.
    return values.view(-1, mapping.group, mapping.width).amax(dim=1).reshape(-1)


def _ungrouped(values: Tensor, mapping: SmoothMapping) -> Tensor:
    """Source channels -> reader channels: each kv channel's value for every head of its group."""
    if mapping.group == 1:
        return values
    kv = values.view(-1, 1, mapping.width)
    return kv.expand(-1, mapping.group, mapping.width).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The calibrator.
# ---------------------------------------------------------------------------------------------


def _quantize_input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: fake-quantize the linear's input with its static ``input_scale``."""
    scale = module.input_scale
    assert isinstance(scale, Tensor)
    return (fake_quantize_activation(args[0], scale), *args[1:])


@dataclass
class LayerRecord:
    """What happened to one quantized linear."""

    name: str
    weight_sqnr_db: float
    input_absmax: float
    input_scale: float
    smoothed: bool


@dataclass
class SmoothRecord:
    """One smoothed activation: where the scales went and how much flatter the input became."""

    source: str
    readers: tuple[str, ...]
    absmax_before: float
    absmax_after: float
    scale_min: float
    scale_max: float


@dataclass
class StaticState:
    """Everything the writer needs, on the CPU: int8 levels and input scales per linear."""

    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    input_scales: dict[str, Tensor] = field(default_factory=dict)
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    smoothed: list[SmoothRecord] = field(default_factory=list)


class StaticInt8Calibrator(BlockCalibrator):
    """Smooths (optionally), calibrates and quantizes each group of linears in turn.

    With ``quantize=False`` it only applies SmoothQuant (exact in float): weights, activations
    and the model's function are unchanged up to rounding.
    """

    def __init__(
        self, plan: Mapping[str, nn.Linear], alpha: float | None, *, quantize: bool = True
    ) -> None:
        self.plan = plan
        self.alpha = alpha
        self.quantize = quantize
        self.state = StaticState()
        self._observers: dict[str, ChannelAbsMaxObserver] = {}
        self._mappings: dict[str, SmoothMapping] = {}
        self._group_of: dict[str, tuple[str, ...]] = {}
        self._prepared: dict[tuple[str, ...], tuple[float, bool]] = {}
        self._ctx: BlockContext | None = None

    stop_after_group = True  # only the group's inputs are observed

    def start_block(self, ctx: BlockContext) -> None:
        self._ctx = ctx
        self._mappings = block_mappings(ctx) if self.alpha is not None else {}

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        groups = sequential_groups(ctx, self.plan, true_sequential=True)
        self._group_of = {name: tuple(group) for group in groups for name in group}
        return groups

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self._observers.setdefault(name, ChannelAbsMaxObserver()).update(inp)  # (tokens, in)

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float]:
        group = self._group_of[name]
        if group not in self._prepared:
            self._prepared[group] = self._prepare(group)
        absmax, smoothed = self._prepared[group]
        assert isinstance(module, nn.Linear)
        weight = module.weight
        record = LayerRecord(name, math.inf, absmax, 0.0, smoothed)
        if self.quantize:
            with torch.no_grad():
                reference = weight.detach().float().clone()  # (out, in), smoothed float weight
                qw = rtn_quantize(reference, INT8_CHANNEL, scale_dtype=weight.dtype)
                weight.copy_(qw.dequantize().to(weight.dtype))
            scale = activation_scale(absmax, weight.dtype)
            module.register_buffer("input_scale", scale.to(weight.device), persistent=False)
            module.register_forward_pre_hook(_quantize_input_hook)
            record.weight_sqnr_db = weight_sqnr_db(reference, weight.detach())
            record.input_scale = float(scale)
            self.state.quantized[name] = QuantizedWeight(
                q=qw.q.cpu(), scale=qw.scale.cpu(), zero=None, grid=INT8_CHANNEL
            )
            self.state.input_scales[name] = scale.cpu()
        self.state.layers[name] = record
        return {"weight_sqnr_db": record.weight_sqnr_db, "input_absmax": absmax}

    def end_block(self, ctx: BlockContext) -> None:
        self._observers.clear()
        self._prepared.clear()
        self._ctx = None

    # ----------------------------------------------------------------------------- internals

    def _prepare(self, group: tuple[str, ...]) -> tuple[float, bool]:
        """Smooth the group's shared input if a mapping covers it; return its absmax after."""
        observed = [self._observers[n].value for n in group if n in self._observers]
        if not observed:
            raise UserInputError(
                f"{group[0]} never ran during calibration; it cannot get a static input scale"
            )
        act = torch.stack(observed).amax(dim=0)  # (in,): the members read the same input
        mapping = self._mappings.get(group[0])
        if mapping is None or self.alpha is None:
            return float(act.max()), False
        scales = self._smooth(mapping, act, self.alpha)  # (in,) on the reader side
        after = act / scales.to(act.device)
        self.state.smoothed.append(
            SmoothRecord(
                source=mapping.source,
                readers=mapping.readers,
                absmax_before=float(act.max()),
                absmax_after=float(after.max()),
                scale_min=float(scales.min()),
                scale_max=float(scales.max()),
            )
        )
        return float(after.max()), True

    def _module(self, full_name: str) -> nn.Module:
        ctx = self._ctx
        assert ctx is not None
        relative = full_name[len(ctx.prefix) + 1 :]
        module = find_module(ctx.block, relative)
        if module is None:
            raise UnsupportedArchitectureError(f"no module {full_name} to fold smoothing into")
        return module

    @torch.no_grad()
    def _smooth(self, mapping: SmoothMapping, act: Tensor, alpha: float) -> Tensor:
        """Fold ``1 / s`` into the source and ``s`` into every reader's columns; returns ``s``
        per reader input channel (in,)."""
        readers = [self._module(name) for name in mapping.readers]
        weights = [r.weight for r in readers if isinstance(r, nn.Linear)]
        if len(weights) != len(readers):
            raise UnsupportedArchitectureError(f"{mapping.readers}: smoothing needs nn.Linear")
        wmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
        act_src = _grouped(act, mapping)  # (source channels,)
        wmax_src = _grouped(wmax.to(act.device), mapping)
        s_src = smoothing_scales(act_src, wmax_src, alpha)  # (source channels,) float32
        s_read = _ungrouped(s_src, mapping)  # (in,)
        for w in weights:
            w.mul_(s_read.to(w.device, w.dtype))  # columns: W[:, j] * s_j
        source = self._module(mapping.source)
        if mapping.kind == "norm":
            self._fold_into_norm(source, s_src)
        else:
            self._fold_into_rows(mapping.source, source, s_src)
        return s_read

    def _fold_into_norm(self, norm: nn.Module, s: Tensor) -> None:
        ctx = self._ctx
        assert ctx is not None
        offset = ctx.spec.norm_weight_offset
        weight = norm.weight
        assert isinstance(weight, Tensor)
        s32 = s.to(weight.device)
        # The norm multiplies by (offset + w): Gemma's RMSNorm uses 1 + w.
        weight.copy_(((offset + weight.float()) / s32 - offset).to(weight.dtype))
        bias = getattr(norm, "bias", None)
        if isinstance(bias, Tensor):
            bias.copy_((bias.float() / s32).to(bias.dtype))

    def _fold_into_rows(self, name: str, linear: nn.Module, s: Tensor) -> None:
        assert isinstance(linear, nn.Linear)
        weight = linear.weight
        s32 = s.to(weight.device)
        done = self.state.quantized.get(name)
        if done is not None:
            # Already int8 per output channel: row j / s_j keeps the integers and divides the
            # row's scale, so the checkpoint and the in-memory weights stay consistent.
            scale = (done.scale.float() / s.cpu().unsqueeze(1)).to(done.scale.dtype)  # (out, 1)
            self.state.quantized[name] = QuantizedWeight(
                q=done.q, scale=scale, zero=None, grid=done.grid
            )
            weight.copy_(self.state.quantized[name].dequantize().to(weight.device, weight.dtype))
        else:
            weight.copy_((weight.float() / s32.unsqueeze(1)).to(weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.float() / s32).to(linear.bias.dtype))


# ---------------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------------


def quantization_config_dict(ignore: list[str]) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` for W8A8 int8 with static input scales."""
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                    "group_size": None,
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "tensor",
                    "dynamic": False,
                },
                "output_activations": None,
                "format": CT_FORMAT,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _float_linears_left(model: nn.Module, quantized: Mapping[str, Any]) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in quantized
    ]


def static_state_dict(model: nn.Module, state: StaticState) -> dict[str, Tensor]:
    """The tensors of the int-quantized checkpoint: the model's state with every quantized
    linear's weight as int8 levels, its per-channel scales and its input scale (tied duplicates
    dropped, all on the CPU; the blocks a streamed model wrote already stay meta)."""
    tensors = dict(model.state_dict())
    for name, qw in state.quantized.items():
        module = model.get_submodule(name)
        assert isinstance(module, nn.Linear)
        if qw.q.is_meta:  # a streamed block, written already
            continue
        dtype = module.weight.dtype
        current = qw.dequantize().to(dtype)
        if not torch.equal(current, module.weight.detach().cpu()):
            raise UserInputError(
                f"{name} changed after quantization; its int8 levels no longer match the model"
            )
        tensors[f"{name}.weight"] = qw.q.contiguous()  # (out, in) int8
        tensors[f"{name}.weight_scale"] = qw.scale.to(dtype).contiguous()  # (out, 1)
        tensors[f"{name}.input_scale"] = state.input_scales[name].to(dtype).reshape(1)  # (1,)
    for name in tied_duplicates(model, tensors):
        del tensors[name]
    return {
        name: tensor if tensor.is_meta else tensor.detach().to("cpu").contiguous()
        for name, tensor in tensors.items()
    }


def save_static_int8(model: nn.Module, state: StaticState, directory: Path) -> None:
    """Write the int-quantized checkpoint (config.json with its ``quantization_config``, the
    generation config, safetensors) into `directory`."""
    write_checkpoint(
        model,  # type: ignore[arg-type]
        quantization_config_dict(_float_linears_left(model, state.quantized)),
        static_state_dict(model, state),
        directory,
    )


def _stream_static(model: nn.Module, state: StaticState) -> None:
    """On a streamed model each finished block is written in its int8 form, then dropped."""

    def release(prefix: str) -> None:
        for name in [n for n in state.quantized if n.startswith(prefix)]:
            state.quantized[name] = state.quantized[name].to("meta")

    save_as(model, lambda: static_state_dict(model, state), release)


def _writer(model: nn.Module, state: StaticState) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        save_static_int8(model, state, directory)

    return write


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def plan_linears(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """The targeted linears; Conv1D (GPT-2) is refused before any work."""
    return resolve_linear_targets(
        model,
        TargetSpec(tuple(targets), tuple(ignore)),
        "the compressed-tensors int-quantized format stores nn.Linear weights only",
    )


def smooth_model(
    model: nn.Module,
    samples: Tensor,
    alpha: float = 0.5,
    *,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> StaticState:
    """Apply SmoothQuant to the float model in place (no quantization); its function is unchanged
    up to float rounding. Returns the per-activation scale records (``state.smoothed``)."""
    plan = plan_linears(model, targets or ["Linear", "Conv1D"], ignore or ["lm_head"])
    calibrator = StaticInt8Calibrator(plan, alpha, quantize=False)
    run_calibration(
        model, samples, calibrator, device=device, batch_size=batch_size, measure_error=False
    )
    return calibrator.state


def apply_static(
    model: nn.Module, config: StaticInt8Config, ctx: QuantizeContext
) -> QuantizationOutcome:
    """Calibrate, smooth and quantize the targeted linears in place; see the module docstring."""
    if ctx.calibration is None:
        raise UserInputError(
            "the 'static' method needs calibration data for its activation scales: pass "
            "--calibration-data (or data.calibration in a recipe)"
        )
    plan = plan_linears(model, list(config.targets), list(config.ignore))
    for name, module in plan.items():
        if hasattr(module, "input_scale"):
            raise UserInputError(f"{name} already has static activation quantization")
    calibrator = StaticInt8Calibrator(plan, config.smoothquant_alpha)
    started = time.perf_counter()
    _stream_static(model, calibrator.state)
    report = run_calibration(
        model,
        ctx.calibration,
        calibrator,
        device=ctx.device,
        batch_size=config.calibration.batch_size,
        precision=config.calibration.precision,
        progress=ctx.progress,
    )
    state = calibrator.state
    missing = sorted(set(plan) - set(state.quantized))
    if missing:
        raise UserInputError(
            f"{len(missing)} targeted layer(s) never ran during calibration (e.g. {missing[0]}); "
            "they cannot get static activation scales"
        )
    layers = [vars(state.layers[name]) for name in plan]
    sqnrs = [row["weight_sqnr_db"] for row in layers]
    alpha = config.smoothquant_alpha
    smooth_text = (
        f"SmoothQuant alpha {alpha} on {len(state.smoothed)} activations"
        if alpha is not None
        else "no smoothing"
    )
    return QuantizationOutcome(
        model=model,
        writer=_writer(model, state),
        format=FORMAT,
        steps=[
            "static W8A8: int8 symmetric per-channel weights, int8 per-tensor input scales "
            f"(absmax over {report.tokens} calibration tokens), {smooth_text}; "
            f"{len(state.quantized)} linear layers"
        ],
        report={
            "layers": len(state.quantized),
            "calibration_seconds": round(time.perf_counter() - started, 3),
            "calibration_tokens": report.tokens,
            "calibration_precision": report.precision,
            "smoothquant_alpha": alpha,
            "min_weight_sqnr_db": min(sqnrs),
            "mean_weight_sqnr_db": sum(sqnrs) / len(sqnrs),
            "sensitivity_kind": "weight SQNR in dB and input absmax per layer",
            "sensitivity": sorted(layers, key=lambda row: row["weight_sqnr_db"]),
            "smoothing": [vars(record) for record in state.smoothed],
            "blocks": [
                {"index": b.index, "rel_error": b.rel_error, "seconds": b.seconds}
                for b in report.blocks
            ],
        },
    )


register_method("static", StaticInt8Config, needs_calibration=True)(apply_static)
