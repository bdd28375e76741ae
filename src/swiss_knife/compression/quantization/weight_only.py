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
from ...config import (
    CalibrationSettings,
    IntWeightConfig,
)
from ...errors import UserInputError
from ..metrics import sensitivity_table, sqnr_db
from .base import QuantizationOutcome, QuantizeContext, register_method
from .compressed_tensors_format import compressed_writer, plan_grids
from .gptq import gptq_quantize
from .grid import QuantGrid, QuantizedWeight
from .rtn import rtn_quantize


class RTNConfig(IntWeightConfig):
    """Round-to-nearest weight-only quantization, optionally with a clipping-range search."""

    method: Literal["rtn"] = "rtn"
    clip_search: bool = Field(default=False, description="Search the range that minimises error.")


class GPTQConfig(IntWeightConfig):
    """GPTQ (Frantar et al. 2022): second-order weight-only quantization on calibration data."""

    method: Literal["gptq"] = "gptq"
    # The defaults are the most accurate settings measured on SmolLM2-135M W4 g64
    # (benchmarks/RESULTS.md, quantization): activation order with static groups and an
    # error-minimising clip range, every linear of a block observed in one pass.
    act_order: bool = Field(default=True, description="Quantize columns by decreasing H diag.")
    static_groups: bool = Field(
        default=True, description="Fix group scales before the updates (needed with act_order)."
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
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    @model_validator(mode="after")
    def _act_order_export(self) -> GPTQConfig:
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ValueError(
                "act_order with groups needs static_groups: true (the saved format needs "
                "contiguous groups)"
            )
        return self


FORMAT = "compressed-tensors/pack-quantized"


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _describe(config: RTNConfig | GPTQConfig) -> str:
    group = f"groups of {config.group_size}" if config.group_size else "per-channel scales"
    grid = "symmetric" if config.symmetric else "asymmetric"
    return f"{config.bits}-bit {grid} integer weights, {group}"


def _apply_rtn(model: nn.Module, config: RTNConfig, ctx: QuantizeContext) -> QuantizationOutcome:
    plan = plan_grids(model, config, allow_asymmetric=False)
    quantized: dict[str, QuantizedWeight] = {}
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, (module, grid) in plan.items():
            weight = _weight(module)
            w = weight.detach().float()  # (out, in)
            qw = rtn_quantize(w, grid, clip_search=config.clip_search, scale_dtype=weight.dtype)
            deq = qw.dequantize().to(weight.dtype)
            rel = float((deq.float() - w).norm() / w.norm().clamp_min(1e-12))
            weight.copy_(deq)
            quantized[name] = qw
            rows.append(
                {"name": name, "bits": grid.bits, "rel_error": rel, "sqnr_db": sqnr_db(rel)}
            )
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


class GPTQCalibrator(BlockCalibrator):
    """Collects each targeted linear's input Hessian and solves it with GPTQ."""

    stop_after_group = True  # only the group's inputs are needed

    def __init__(self, plan: Mapping[str, tuple[nn.Module, QuantGrid]], config: GPTQConfig):
        self.plan = plan
        self.config = config
        self.observers: dict[str, HessianObserver] = {}
        self.quantized: dict[str, QuantizedWeight] = {}
        # The input last folded into a Hessian and its observer. q/k/v (and gate/up) read the
        # very same tensor, so they share one Hessian instead of accumulating three equal ones.
        # Holding the tensor keeps its memory from being reused by another input meanwhile.
        self._last: tuple[torch.Tensor, HessianObserver] | None = None
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
        weight = _weight(module)
        cfg = self.config
        qw, loss = gptq_quantize(
            weight.detach().float(),  # (out, in)
            observer.hessian,  # (in, in)
            self.plan[name][1],
            block_size=cfg.block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            static_groups=cfg.static_groups,
            clip_search=cfg.clip_search,
            scale_dtype=weight.dtype,
        )
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


def _apply_gptq(model: nn.Module, config: GPTQConfig, ctx: QuantizeContext) -> QuantizationOutcome:
    if ctx.calibration is None:
        raise UserInputError("gptq needs calibration data: pass --calibration-data")
    plan = plan_grids(model, config, allow_asymmetric=False)
    calibrator = GPTQCalibrator(plan, config)
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
    missing = set(plan) - set(calibrator.quantized)
    if missing:
        raise UserInputError(
            f"{len(missing)} targeted layer(s) never ran during calibration (e.g. "
            f"{sorted(missing)[0]}); they cannot be quantized with GPTQ"
        )
    extras = [
        "activation order" if config.act_order else None,
        "static groups" if config.static_groups else None,
        "clip search" if config.clip_search else None,
        "true sequential" if config.true_sequential else None,
    ]
    steps = [
        f"GPTQ: {_describe(config)}, damp {config.damp}"
        + "".join(f", {e}" for e in extras if e)
        + f"; calibrated on {report.num_samples} x {report.seq_len} tokens"
    ]
    return QuantizationOutcome(
        model=model,
        writer=compressed_writer(model, calibrator.quantized),
        format=FORMAT,
        steps=steps,
        report={
            "layers": len(calibrator.quantized),
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
    plan_grids(model, config, allow_asymmetric=False)


register_method("rtn", RTNConfig, needs_calibration=False, check=_check)(_apply_rtn)
register_method("gptq", GPTQConfig, needs_calibration=True, check=_check)(_apply_gptq)
