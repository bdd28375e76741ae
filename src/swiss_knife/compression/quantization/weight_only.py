"""Weight-only integer methods, RTN and GPTQ: the orchestration around the tensor math.

`rtn_quantize` and `gptq_quantize` (pure functions in `rtn.py` / `gptq.py`) do the math; this
module decides which linears, with which grid, feeds GPTQ its Hessians through the one calibration
engine (`calibration.run_calibration`), keeps the model fake-quantized in memory (its weights are
the dequantized integers, so evaluation measures exactly what the checkpoint will compute) and
saves the integers in the compressed-tensors pack-quantized format, which
`AutoModelForCausalLM.from_pretrained` loads (compressed-tensors installed) and vLLM serves.

Costs. RTN: one pass over the weights, no data. GPTQ: per linear an (in, in) float32 Hessian and
its Cholesky factorisation, O(in^3 + out * in^2 / block) time; peak memory one block on the compute
device plus the calibration activations (samples x seq_len x hidden).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ...calibration import (
    BlockCalibrator,
    BlockContext,
    HessianObserver,
    run_calibration,
    sequential_groups,
)
from ...calibration import same_tensor as _same_tensor
from ...config import CalibrationSettings
from ...errors import UserInputError
from ...streaming import for_each_block
from ..metrics import sensitivity_table, sqnr_db
from .base import QuantizationOutcome, QuantizeContext, register_method
from .compressed_tensors_format import compressed_writer, plan_grids, stream_packed
from .gguf_grid import (
    BLOCK_GRIDS,
    GRID_FILE,
    K_FALLBACK,
    GGUFMixConfig,
    KSpec,
    block_scale_dtype,
    fallback_blocks,
    gguf_grid_writer,
    is_block_grid,
    is_k_grid,
    plan_gguf_grids,
    rtn_quantize_k,
    uses_sidecar,
)
from .gptq import Factors, gptq_quantize, gptq_quantize_k
from .grid import QuantGrid, QuantizedWeight
from .rtn import rtn_quantize


class RTNConfig(GGUFMixConfig):
    """Round-to-nearest weight-only quantization, optionally with a clipping-range search."""

    method: Literal["rtn"] = "rtn"
    clip_search: bool = Field(default=False, description="Search the range that minimises error.")


class GPTQConfig(GGUFMixConfig):
    """GPTQ (Frantar et al. 2022): second-order weight-only quantization on calibration data."""

    method: Literal["gptq"] = "gptq"
    # The defaults are the most accurate settings measured on SmolLM2-135M W4 g64
    # (benchmarks/RESULTS.md, quantization): activation order with static groups and an
    # error-minimising clip range, every linear of a block observed in one pass.
    act_order: bool = Field(default=True, description="Quantize columns by decreasing H diag.")
    static_groups: bool = Field(
        default=True,
        description="Fix group scales before the updates (needed with act_order); off by "
        "default on K grids, whose super-blocks are fitted as the column loop enters them.",
    )
    damp: float = Field(default=0.01, gt=0.0, lt=1.0, description="Hessian dampening.")
    block_size: int = Field(default=128, ge=1, description="Columns updated together.")
    true_sequential: bool = Field(
        default=False,
        description="Observe q/k/v, o, MLP-in and MLP-out in turn, each group seeing the "
        "quantized groups before it (up to 4 passes per block instead of 1).",
    )
    clip_search: bool = Field(
        default=True, description="Search the clipping range per group (MSE, as in AWQ)."
    )
    weighted_scales: bool = Field(
        default=True,
        description="On llama.cpp's symmetric block grids (gguf:q4_0, q5_0, q8_0, and a K "
        "grid's fallback layers): choose each block's scale by llama.cpp's importance-weighted "
        "search, the Hessian diagonal as importance matrix, instead of the clip search.",
    )
    refit_scales: bool = Field(
        default=True,
        description="On llama.cpp's symmetric block grids: once a layer's integers are fixed, "
        "refit each row's block scales jointly to minimise the layer's output error.",
    )
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    @model_validator(mode="before")
    @classmethod
    def _k_grid_fits_on_entry(cls, data: Any) -> Any:
        # A K grid's super-block stays whole under act order (columns are ordered within it),
        # so its scales can be fitted on the error-updated weights; on SmolLM2's down_proj
        # layers that beat fitting up front (see gguf_grid), so it is the default there.
        if isinstance(data, dict) and is_k_grid(str(data.get("grid"))):
            data = {"static_groups": False, **data}
        return data

    @model_validator(mode="after")
    def _act_order_export(self) -> GPTQConfig:
        # Without static groups a K grid orders columns within each super-block instead, and
        # fits each super-block's scales as the column loop enters it (gptq_quantize_k).
        if (
            self.act_order
            and self.group_size is not None
            and not self.static_groups
            and not is_k_grid(self.grid)
        ):
            raise ValueError(
                "act_order with groups needs static_groups: true (the saved format needs "
                "contiguous groups)"
            )
        return self


FORMAT = "compressed-tensors/pack-quantized"
# A K grid (gguf_grid): a dense checkpoint of the exact values plus the GGUF block sidecar.
FORMAT_K = "dense+gguf-grid"


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _describe(config: RTNConfig | GPTQConfig) -> str:
    if is_k_grid(config.grid):
        kind = config.grid.removeprefix("gguf:").upper()
        fallback = K_FALLBACK[config.grid].removeprefix("gguf:").upper()
        return (
            f"llama.cpp {kind} grid (super-blocks of 256 with quantized sub-block scales; "
            f"{fallback}, llama.cpp's fallback, where 256 does not divide a layer's width)"
        ) + _overrides_note(config)
    group = f"groups of {config.group_size}" if config.group_size else "per-channel scales"
    grid = "symmetric" if config.symmetric else "asymmetric"
    text = f"{config.bits}-bit {grid} integer weights, {group}"
    if is_block_grid(config.grid):
        text += f" (llama.cpp {config.grid.removeprefix('gguf:').upper()} grid, fp16 scales)"
    return text + _overrides_note(config)


def _overrides_note(config: RTNConfig | GPTQConfig) -> str:
    """How the step line names the grid overrides, or nothing without any."""
    if not config.grid_overrides:
        return ""
    pairs = ", ".join(f"{p} on {g.removeprefix('gguf:').upper()}"
                      for p, g in config.grid_overrides.items())  # fmt: skip
    return f"; overrides: {pairs}"


def _plan(model: nn.Module, config: RTNConfig | GPTQConfig) -> dict[str, tuple[nn.Linear, Any]]:
    """The targeted linears with their grids (a `QuantGrid`, or a `KSpec` for a K type)."""
    if uses_sidecar(config):
        return dict(plan_gguf_grids(model, config))
    # One asymmetric block grid (gguf:q4_1, q5_1) loads through load_compressed, as AWQ's does.
    asymmetric = is_block_grid(config.grid) and not BLOCK_GRIDS[config.grid][1]
    return dict(plan_grids(model, config, allow_asymmetric=asymmetric))


def _on_gguf_blocks(config: RTNConfig | GPTQConfig) -> bool:
    """Whether the method's integer-grid layers are llama.cpp 32-weight blocks (a block grid,
    or a K grid's fallback layers)."""
    return is_block_grid(config.grid) or is_k_grid(config.grid)


def _scale_dtype(config: RTNConfig | GPTQConfig, weight_dtype: torch.dtype) -> torch.dtype:
    """Where scales are rounded: the model's dtype, or fp16 on llama.cpp's blocks."""
    return block_scale_dtype(weight_dtype) if _on_gguf_blocks(config) else weight_dtype


def _weighted(config: GPTQConfig, grid: QuantGrid) -> bool:
    """Whether GPTQ fits ``grid``'s scales by llama.cpp's weighted search (symmetric blocks)."""
    return config.weighted_scales and _on_gguf_blocks(config) and grid.symmetric


def _stored(qw: QuantizedWeight, weight_dtype: torch.dtype) -> QuantizedWeight:
    """`qw` with its scales in the model's dtype, in which the checkpoint stores them (the
    fp16 scales of a block grid widen exactly); unchanged when they already are."""
    if qw.scale.dtype == weight_dtype:
        return qw
    return QuantizedWeight(qw.q, qw.scale.to(weight_dtype), qw.zero, qw.grid, qw.g_idx)


def _scale_note(config: GPTQConfig, plan: Mapping[str, tuple[nn.Module, Any]]) -> str | None:
    """How GPTQ's step line names the scale search of its integer-grid layers (K layers search
    their own super-block scales): llama.cpp's weighted search, the clip search, or none."""
    grids = [grid for _, grid in plan.values() if isinstance(grid, QuantGrid)]
    words = {
        "llama.cpp's weighted scale search" if _weighted(config, grid) else "clip search"
        for grid in grids
        if _weighted(config, grid) or config.clip_search
    }
    if not words:
        return None
    text = " and ".join(sorted(words))
    return f"{text} on the {len(grids)} fallback layer(s)" if is_k_grid(config.grid) else text


def _grid_report(config: RTNConfig | GPTQConfig, blocks: Mapping[str, Any]) -> dict[str, Any]:
    kinds = Counter(kind for kind, _ in blocks.values())
    return {"grid": config.grid, "file": GRID_FILE, "types": dict(kinds)}


def _apply_rtn(model: nn.Module, config: RTNConfig, ctx: QuantizeContext) -> QuantizationOutcome:
    if uses_sidecar(config):
        return _apply_rtn_k(model, config)
    plan = _plan(model, config)
    quantized: dict[str, QuantizedWeight] = {}
    rows: list[dict[str, Any]] = []
    stream_packed(model, quantized)

    def quantize_layers(names: list[str]) -> None:
        for name in names:
            module, grid = plan[name]
            weight = _weight(module)
            w = weight.detach().float()  # (out, in)
            qw = rtn_quantize(
                w,
                grid,
                clip_search=config.clip_search,
                scale_dtype=_scale_dtype(config, weight.dtype),
            )
            qw = _stored(qw, weight.dtype)
            deq = qw.dequantize().to(weight.dtype)
            rel = float((deq.float() - w).norm() / w.norm().clamp_min(1e-12))
            weight.copy_(deq)
            quantized[name] = qw
            rows.append(
                {"name": name, "bits": grid.bits, "rel_error": rel, "sqnr_db": sqnr_db(rel)}
            )

    with torch.no_grad():
        for_each_block(model, plan, quantize_layers)
    steps = [f"RTN: {_describe(config)}" + (", clip search" if config.clip_search else "")]
    return QuantizationOutcome(
        model=model,
        writer=compressed_writer(model, quantized),
        format=FORMAT,
        steps=steps,
        report={
            "layers": len(quantized),
            "sensitivity_kind": "relative weight error (data-free)",
            "sensitivity": sensitivity_table(rows, limit=len(rows)),
        },
    )


def _apply_rtn_k(model: nn.Module, config: RTNConfig) -> QuantizationOutcome:
    """RTN on a K grid: each linear's super-block scales fitted on its own weights."""
    plan = plan_gguf_grids(model, config)
    blocks: dict[str, tuple[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, (module, spec) in plan.items():
            weight = _weight(module)
            w = weight.detach().float()  # (out, in)
            if isinstance(spec, KSpec):
                kq = rtn_quantize_k(w, spec)
                deq = kq.dequantize()  # float32, bit for bit what llama.cpp decodes
                blocks[name] = (spec.kind, kq.to_blocks())
            else:  # a layer 256 does not divide: llama.cpp's fallback block type
                qw = rtn_quantize(
                    w,
                    spec,
                    clip_search=config.clip_search,
                    scale_dtype=_scale_dtype(config, weight.dtype),
                )
                kind, data, deq = fallback_blocks(qw)
                blocks[name] = (kind, data)
            rel = float((deq - w).norm() / w.norm().clamp_min(1e-12))
            weight.copy_(deq.to(weight.dtype))
            rows.append(
                {"name": name, "bits": spec.bits, "rel_error": rel, "sqnr_db": sqnr_db(rel)}
            )
    return QuantizationOutcome(
        model=model,
        writer=gguf_grid_writer(model, blocks),
        format=FORMAT_K,
        steps=[f"RTN: {_describe(config)}"],
        report={
            "layers": len(blocks),
            "gguf_grid": _grid_report(config, blocks),
            "sensitivity_kind": "relative weight error (data-free)",
            "sensitivity": sensitivity_table(rows, limit=len(rows)),
        },
    )


class GPTQCalibrator(BlockCalibrator):
    """Collects each targeted linear's input Hessian and solves it with GPTQ."""

    stop_after_group = True  # only the group's inputs are needed

    def __init__(self, plan: Mapping[str, tuple[nn.Module, QuantGrid | KSpec]], config: GPTQConfig):
        self.plan = plan
        self.config = config
        self.observers: dict[str, HessianObserver] = {}
        self.quantized: dict[str, QuantizedWeight] = {}
        # K grids: module -> (GGUF type, block bytes), for the sidecar.
        self.blocks: dict[str, tuple[str, Any]] = {}
        # The input last folded into a Hessian and its observer. q/k/v (and gate/up) read the
        # very same tensor, so they share one Hessian instead of accumulating three equal ones.
        # Holding the tensor keeps its memory from being reused by another input meanwhile.
        self._last: tuple[torch.Tensor, HessianObserver] | None = None
        # Per shared Hessian (by observer), its inverse factor: q/k/v (and gate/up) then cost
        # one factorisation instead of three (two). Dropped once its last linear is solved.
        self._factors: dict[int, Factors] = {}
        # True-sequential GPTQ needs only each linear's own inputs: with the calibration set in
        # one mini-batch the engine quantizes every linear just before it runs (one pass).
        self.solve_during_pass = config.true_sequential

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        return sequential_groups(ctx, self.plan, true_sequential=self.config.true_sequential)

    def observe(self, name: str, module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> None:
        # inp: (tokens, in)
        last = self._last
        if last is not None and _same_tensor(last[0], inp):
            if name not in self.observers:
                self.observers[name] = last[1]
            if self.observers[name] is last[1]:
                return  # already folded in for the linear that saw it first
        observer = self.observers.setdefault(name, HessianObserver())
        observer.update(inp)
        self._last = (inp, observer)

    def end_block(self, ctx: BlockContext) -> None:
        self._last = None

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float]:
        observer = self.observers.pop(name)
        factors = self._factors.setdefault(id(observer), {})
        if not any(other is observer for other in self.observers.values()):
            del self._factors[id(observer)]  # the last linear reading this input
        weight = _weight(module)
        cfg = self.config
        grid = self.plan[name][1]
        if isinstance(grid, KSpec):
            return self._solve_k(name, weight, observer, grid, factors)
        qw, loss = gptq_quantize(
            weight.detach().float(),  # (out, in)
            observer.hessian,  # (in, in)
            grid,
            block_size=cfg.block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            # the sidecar's block layers are written as contiguous blocks of 32
            static_groups=cfg.static_groups or uses_sidecar(cfg),
            clip_search=cfg.clip_search,
            scale_dtype=_scale_dtype(cfg, weight.dtype),
            weighted_scales=_weighted(cfg, grid),
            refit_scales=cfg.refit_scales and _on_gguf_blocks(cfg) and grid.symmetric,
            factors=factors,
        )
        if uses_sidecar(cfg):  # a block layer of a K grid or of a mix: GGUF block bytes
            kind, data, values = fallback_blocks(qw)
            with torch.no_grad():
                weight.copy_(values.to(weight.device, weight.dtype))
            self.blocks[name] = (kind, data)
            return {"gptq_loss": float(loss)}
        qw = _stored(qw, weight.dtype)
        with torch.no_grad():
            weight.copy_(qw.dequantize().to(weight.dtype))
        # The integers leave the compute device: only one block's worth lives there at a time.
        self.quantized[name] = QuantizedWeight(
            q=qw.q.cpu(),
            scale=qw.scale.cpu(),
            zero=None if qw.zero is None else qw.zero.cpu(),
            grid=qw.grid,
            g_idx=None if qw.g_idx is None else qw.g_idx.cpu(),
        )
        return {"gptq_loss": float(loss)}

    def _solve_k(
        self,
        name: str,
        weight: torch.Tensor,
        observer: HessianObserver,
        spec: KSpec,
        factors: Factors,
    ) -> Mapping[str, float]:
        cfg = self.config
        kq, loss = gptq_quantize_k(
            weight.detach().float(),  # (out, in)
            observer.hessian,  # (in, in)
            spec,
            block_size=cfg.block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            static_groups=cfg.static_groups,
            factors=factors,
        )
        with torch.no_grad():
            weight.copy_(kq.dequantize().to(weight.dtype))
        # The bytes leave the compute device: only one block's worth lives there at a time.
        self.blocks[name] = (spec.kind, kq.to_blocks())
        return {"gptq_loss": float(loss)}


def _apply_gptq(model: nn.Module, config: GPTQConfig, ctx: QuantizeContext) -> QuantizationOutcome:
    if ctx.calibration is None:
        raise UserInputError("gptq needs calibration data: pass --calibration-data")
    plan = _plan(model, config)
    calibrator = GPTQCalibrator(plan, config)
    stream_packed(model, calibrator.quantized)
    started = time.perf_counter()
    report = run_calibration(
        model,
        ctx.calibration,
        calibrator,
        device=ctx.device,
        batch_size=config.calibration.batch_size,
        precision=config.calibration.precision,
        progress=ctx.progress,
    )
    rows = [
        {
            "name": r.name,
            "bits": plan[r.name][1].bits,
            "rel_error": r.rel_error,
            "sqnr_db": sqnr_db(r.rel_error),
            "gptq_loss": r.metrics.get("gptq_loss"),
        }
        for r in report.linears
        if r.name in plan
    ]
    missing = set(plan) - set(calibrator.quantized) - set(calibrator.blocks)
    if missing:
        raise UserInputError(
            f"{len(missing)} targeted layer(s) never ran during calibration (e.g. "
            f"{sorted(missing)[0]}); they cannot be quantized with GPTQ"
        )
    extras = [
        "activation order" if config.act_order else None,
        "static groups" if config.static_groups else None,
        _scale_note(config, plan),
        "true sequential" if config.true_sequential else None,
    ]
    steps = [
        f"GPTQ: {_describe(config)}, damp {config.damp}"
        + "".join(f", {e}" for e in extras if e)
        + f"; calibrated on {report.num_samples} x {report.seq_len} tokens"
    ]
    if calibrator.blocks:
        writer, layout = gguf_grid_writer(model, calibrator.blocks), FORMAT_K
        grid_report = {"gguf_grid": _grid_report(config, calibrator.blocks)}
    else:
        writer, layout = compressed_writer(model, calibrator.quantized), FORMAT
        grid_report = {}
    return QuantizationOutcome(
        model=model,
        writer=writer,
        format=layout,
        steps=steps,
        report={
            "layers": len(calibrator.quantized) + len(calibrator.blocks),
            **grid_report,
            "calibration_seconds": round(time.perf_counter() - started, 3),
            "calibration_tokens": report.tokens,
            "calibration_precision": report.precision,
            "sensitivity_kind": "relative output error on the calibration data",
            "sensitivity": sensitivity_table(rows, limit=len(rows)),
            "blocks": [
                {"index": b.index, "rel_error": b.rel_error, "seconds": b.seconds}
                for b in report.blocks
            ],
        },
    )


def _check(model: nn.Module, config: RTNConfig | GPTQConfig) -> None:
    _plan(model, config)


register_method("rtn", RTNConfig, needs_calibration=False, check=_check)(_apply_rtn)
register_method("gptq", GPTQConfig, needs_calibration=True, check=_check)(_apply_gptq)
