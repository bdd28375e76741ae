"""Unstructured and N:M pruning (magnitude, Wanda, SparseGPT): the orchestration around the math.

The criteria are pure functions (`masks.py`, `sparsegpt.py`, `owl.py`); this module decides which
linears (`targeting`), at which sparsity (uniform, or OWL's per-block allocation), feeds Wanda its
activation norms and SparseGPT its Hessians through the one calibration engine
(`calibration.run_calibration`: block after block, each block calibrated on the outputs of the
already-pruned blocks before it), optionally repeats all of it along a gradual schedule with
fine-tuning in between (`gradual.py`), and says how to save the result.

Costs on top of the tensor math (see each module): Wanda and SparseGPT need one forward pass per
block over the calibration set to observe, one to replay (``true_sequential`` observes four groups
per block instead of one), and the engine's error measurement recomputes each pruned linear's old
output once during the replay. Linears that read the same input (q/k/v, gate/up) share one
observer, so SparseGPT accumulates one ``in x in`` Hessian per distinct input, not per linear,
and factorises its inverse once for all the linears that read it (4 per Llama block, not 7).
OWL adds a pre-pass (one observe and one replay per block) on the unpruned model; a streamed
model reads its blocks twice, once for the pre-pass (which writes nothing) and once to prune them. Peak memory is
the engine's (one block plus the activations) plus one Hessian per distinct input of a block.

Sparsity is measured as exact zeros in the targeted weights. The pruned model is an ordinary
dense model with zeros: dense kernels multiply the zeros like any other weight, so it is neither
faster nor smaller in memory; only the sparse-bitmask checkpoint is smaller on disk.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ...arch import get_arch
from ...calibration import (
    BlockCalibrator,
    BlockContext,
    CalibrationReport,
    ChannelNormObserver,
    HessianObserver,
    run_calibration,
    same_tensor,
    sequential_groups,
)
from ...config import (
    CalibratedPruneConfig,
    CalibrationSettings,
    GradualSchedule,
    UnstructuredPruneConfig,
)
from ...errors import UserInputError
from ...streaming import for_each_block, inspect_blocks, nonzero_count, reading_only
from ...targeting import TargetSpec, resolve_targets
from ..checkpoint import dense_writer
from ..metrics import sensitivity_table
from .base import PruneContext, PruneOutcome, register_method
from .gradual import finetune_masked, sparsity_schedule
from .masks import (
    global_topk_masks,
    layer_topk_mask,
    magnitude_scores,
    nm_mask,
    row_topk_mask,
    satisfies_nm,
    wanda_scores,
)
from .owl import outlier_ratio, owl_sparsities, round_to_grid
from .sparse_format import save_sparse_bitmask
from .sparsegpt import sparsegpt_prune


class MagnitudePruneConfig(UnstructuredPruneConfig):
    """Magnitude pruning: zero the smallest |W|, per layer (or globally across layers)."""

    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "global"] = Field(
        default="layer", description="Rank weights within each layer or across all targets."
    )

    @model_validator(mode="after")
    def _global_is_unstructured(self) -> MagnitudePruneConfig:
        if self.scope == "global" and (self.pattern is not None or self.allocation != "uniform"):
            chosen = f"pattern {self.pattern}" if self.pattern else f"allocation {self.allocation}"
            raise ValueError(
                f"scope 'global' lets one ranking across all layers decide each layer's sparsity, "
                f"which {chosen} would override; use scope 'layer' with it"
            )
        return self


class WandaPruneConfig(CalibratedPruneConfig):
    """Wanda (Sun et al. 2023): zero the smallest |W_ij| * ||X_j|| per output row."""

    method: Literal["wanda"] = "wanda"


class SparseGPTPruneConfig(CalibratedPruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): second-order pruning that updates kept weights."""

    method: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(default=0.01, gt=0.0, lt=1.0, description="Hessian dampening.")
    block_size: int = Field(default=128, ge=1, description="Columns pruned together.")
    refit_iterations: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Conjugate-gradient steps that re-fit each layer's kept weights to its "
        "calibration inputs once SparseGPT has chosen the mask (0: the paper's algorithm).",
    )

    @field_validator("calibration", mode="after")
    @classmethod
    def _auto_precision(cls, value: CalibrationSettings) -> CalibrationSettings:
        # SparseGPT's default precision is `auto` (bf16 block passes where bf16 is native): its
        # fp32 Hessians from bf16-rounded activations gave the same perplexity as fp32 passes in
        # about 0.6x the time (benchmarks/RESULTS.md). An explicit precision is kept as given.
        if "precision" in value.model_fields_set:
            return value
        return value.model_copy(update={"precision": "auto"})


FORMAT_DENSE = "dense"
FORMAT_SPARSE = "compressed-tensors/sparse-bitmask"
NO_SPEEDUP = (
    "Unstructured sparsity does not speed up dense kernels: the zeros are stored and multiplied "
    "like any other weight, so this model runs at the original speed and memory in transformers "
    "(N:M 2:4 runs faster only on sparse tensor-core kernels, e.g. NVIDIA Ampere or newer "
    "through vLLM or TensorRT-LLM)"
)
SPARSE_LOAD_NOTE = (
    "Saved in the compressed-tensors sparse-bitmask layout (non-zero values + a 1-bit mask per "
    "weight) in sparse-bitmask.safetensors: load it with swiss_knife.load_model or "
    "swiss_knife.compression.pruning.sparse_format.load_sparse_bitmask. A plain "
    "AutoModelForCausalLM.from_pretrained refuses this folder (no model.safetensors): "
    "transformers 5.x with compressed-tensors >= 0.15 dropped sparse decompression and would "
    "initialise the pruned layers randomly; save_format dense loads anywhere"
)

Masks = dict[str, Tensor]

# ------------------------------------------------------------------------------- weights


def oriented(module: nn.Module) -> Tensor:
    """The module's weight as (out, in): a view, transposed for GPT-2's Conv1D (in, out)."""
    weight = weight_param(module)
    return weight.t() if isinstance(module, Conv1D) else weight


def weight_param(module: nn.Module) -> Tensor:
    """The weight parameter itself, in its storage orientation (for the optimizer and masks)."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def store(module: nn.Module, W: Tensor) -> None:
    """Write an (out, in) weight back into the module, in its orientation and dtype."""
    with torch.no_grad():
        oriented(module).copy_(W.to(oriented(module).dtype))


def stored_mask(module: nn.Module, keep: Tensor) -> Tensor:
    """An (out, in) keep mask in the module's storage orientation."""
    return keep.t() if isinstance(module, Conv1D) else keep


def plan_targets(model: nn.Module, config: UnstructuredPruneConfig) -> dict[str, nn.Module]:
    """Every targeted linear; every problem is found before any work starts."""
    targets = resolve_targets(model, TargetSpec(tuple(config.targets), tuple(config.ignore)))
    nm = config.nm
    if nm is not None:
        misfits: dict[int, list[str]] = {}
        for name, module in targets.items():
            width = oriented(module).shape[1]
            if width % nm[1]:
                misfits.setdefault(width, []).append(name)
        if misfits:
            shown = "; ".join(
                f"{len(names)} layer(s) with {width} inputs (e.g. {names[0]})"
                for width, names in misfits.items()
            )
            raise UserInputError(
                f"pattern {config.pattern} groups every {nm[1]} consecutive inputs, which does "
                f"not divide {shown}; ignore those layers or choose another M"
            )
    return targets


def _block_of(names: Mapping[str, nn.Module], model: nn.Module) -> dict[str, int]:

    prefix = get_arch(model).blocks + "."
    return {name: int(name[len(prefix) :].split(".", 1)[0]) for name in names}


# ------------------------------------------------------------------------------- observers


def wanda_observer() -> ChannelNormObserver:
    """Wanda's statistic alone: the sum over tokens of x^2 per input channel (no |x| means)."""
    return ChannelNormObserver(abs_mean=False)


class _SharedObservers:
    """One observer per distinct input: linears fed the same tensor (q/k/v, gate/up) share it.

    The engine calls `observe` once per linear per mini-batch; when a call receives the very
    tensor the previous call got (same storage, shape and strides; the previous input is held,
    so its memory cannot be reused by another tensor meanwhile), the previous call's observer
    is reused and not updated twice.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.by_name: dict[str, Any] = {}
        self._last: tuple[Tensor, Any] | None = None

    def observe(self, name: str, inp: Tensor) -> None:
        last = self._last
        same = last is not None and same_tensor(last[0], inp)
        observer = self.by_name.get(name)
        if observer is None:
            if same and last is not None:
                observer = last[1]
            else:
                observer = self.factory()
                observer.update(inp)
            self.by_name[name] = observer
        elif not (same and last is not None and last[1] is observer):
            observer.update(inp)
        self._last = (inp, observer)

    def pop(self, name: str) -> Any:
        return self.by_name.pop(name)

    def reads(self, observer: Any) -> bool:
        """Whether a linear not yet popped still reads `observer`'s input."""
        return any(other is observer for other in self.by_name.values())

    def release(self) -> None:
        self._last = None


class _OutlierCalibrator(BlockCalibrator):
    """OWL's pre-pass: the outlier ratio of each block's Wanda scores; changes nothing."""

    def __init__(self, targets: Mapping[str, nn.Module], threshold: float) -> None:
        self.targets = targets
        self.threshold = threshold
        self.observers = _SharedObservers(wanda_observer)
        self.scores: list[Tensor] = []
        self.ratios: dict[int, float] = {}

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        return sequential_groups(ctx, self.targets, true_sequential=False)

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self.observers.observe(name, inp)  # inp: (tokens, in)

    def solve(self, name: str, module: nn.Module) -> None:
        norm = self.observers.pop(name).l2_norm  # (in,)
        self.scores.append(wanda_scores(oriented(module), norm))

    def end_block(self, ctx: BlockContext) -> None:
        if self.scores:
            self.ratios[ctx.index] = outlier_ratio(self.scores, self.threshold)
        self.scores = []
        self.observers.release()


class _PruneCalibrator(BlockCalibrator):
    """Wanda or SparseGPT, block by block: observe the targeted linears, then prune them."""

    # Only a group's own inputs are needed: a pass may end once the group's linears have run
    # (saves most of the forward for the early groups under true_sequential).
    stop_after_group = True

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        sparsity: Mapping[str, float],
        config: WandaPruneConfig | SparseGPTPruneConfig,
        nm: tuple[int, int] | None,
        prior: Masks | None,
        keep_masks: bool,
    ) -> None:
        self.targets = targets
        self.sparsity = sparsity
        self.config = config
        self.nm = nm
        self.prior = prior
        self.keep_masks = keep_masks
        self.solved: set[str] = set()
        sparsegpt = isinstance(config, SparseGPTPruneConfig)
        self.observers = _SharedObservers(HessianObserver if sparsegpt else wanda_observer)
        # SparseGPT's inverse-Hessian factors, per shared observer (one per distinct input).
        self._factors: dict[int, dict[float, Tensor]] = {}
        self.keep: Masks = {}
        # True-sequential pruning needs only each linear's own inputs: when the calibration set
        # is one mini-batch, the engine prunes every linear just before it runs, one pass per
        # block.
        self.solve_during_pass = config.true_sequential

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        return sequential_groups(ctx, self.targets, true_sequential=self.config.true_sequential)

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self.observers.observe(name, inp)  # inp: (tokens, in)

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float]:
        observer = self.observers.pop(name)
        W = oriented(module)  # (out, in)
        metrics: dict[str, float] = {}
        if isinstance(self.config, SparseGPTPruneConfig):
            factors = self._factors.setdefault(id(observer), {})
            if not self.observers.reads(observer):
                del self._factors[id(observer)]  # the last linear reading this input
            result = sparsegpt_prune(
                W,
                observer.hessian,  # (in, in)
                sparsity=None if self.nm else self.sparsity[name],
                nm=self.nm,
                block_size=self.config.block_size,
                damp=self.config.damp,
                refit_iterations=self.config.refit_iterations,
                factors=factors,
            )
            pruned, keep = result.weight, result.keep
            metrics["sparsegpt_loss"] = result.loss
            if self.config.refit_iterations:
                metrics["refit_loss_reduction"] = (
                    1.0 - result.loss / result.sparsegpt_loss if result.sparsegpt_loss > 0 else 0.0
                )
        else:
            scores = wanda_scores(W, observer.l2_norm)  # (out, in)
            keep = select(scores, self.sparsity[name], self.nm, "row", self._prior(name))
            pruned = W * keep
        store(module, pruned)
        self.solved.add(name)
        if self.keep_masks:
            self.keep[name] = keep.cpu()
        metrics["sparsity"] = int((~keep).sum()) / keep.numel()
        return metrics

    def _prior(self, name: str) -> Tensor | None:
        return None if self.prior is None else self.prior.get(name)

    def end_block(self, ctx: BlockContext) -> None:
        self.observers.release()
        self._factors.clear()


# ------------------------------------------------------------------------------- selection


def select(
    scores: Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str, prior: Tensor | None
) -> Tensor:
    """The keep mask for (out, in) `scores`: N:M, or exact per-row / per-layer top-k.

    A `prior` keep mask (the previous step of a gradual schedule) forces its pruned weights to
    stay pruned, so the masks of successive steps are nested.
    """
    if prior is not None:
        scores = scores.masked_fill(~prior.to(scores.device), -1.0)
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_topk_mask(scores, sparsity) if scope == "row" else layer_topk_mask(scores, sparsity)


def _magnitude_step(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    sparsity: Mapping[str, float],
    config: MagnitudePruneConfig,
    nm: tuple[int, int] | None,
    prior: Masks | None,
    keep_masks: bool,
) -> tuple[Masks, dict[str, float]]:
    """Prune every target by |W|; returns ``(keep masks, relative weight error per layer)``.

    The masks are returned only with `keep_masks` (a gradual schedule needs them; they cost a
    byte per weight), else the dict is empty."""
    keep: Masks = {}
    kept: Masks = {}
    with torch.no_grad():
        if config.scope == "global" and nm is None:
            scores = {}
            for name, module in targets.items():
                s = magnitude_scores(oriented(module))  # (out, in)
                if prior is not None:
                    s.masked_fill_(~prior[name].to(s.device), -1.0)
                scores[name] = s
            level = next(iter(sparsity.values()))
            keep = global_topk_masks(scores, level)
            del scores
        errors: dict[str, float] = {}

        def prune_layers(names: list[str]) -> None:
            for name in names:
                module = targets[name]
                W = oriented(module)
                if name not in keep:  # per layer: select now, so one mask lives at a time
                    s = magnitude_scores(W)
                    prev = None if prior is None else prior.get(name)
                    keep[name] = select(s, sparsity[name], nm, "layer", prev)
                mask = keep.pop(name).to(W.device)
                reference = float(W.float().norm())
                removed = float((W.float() * ~mask).norm())  # ||W - W * keep||
                errors[name] = removed / reference if reference > 0 else 0.0
                store(module, W * mask)
                if keep_masks:
                    kept[name] = mask.cpu()

        # A streamed model (global scope is not streamed) reads one block at a time.
        for_each_block(model, targets, prune_layers)
    return kept, errors


# ------------------------------------------------------------------------------- allocation


def owl_ratios(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    config: UnstructuredPruneConfig,
    ctx: PruneContext,
) -> dict[int, float]:
    """OWL's outlier ratio of every block that holds targets, from a pre-pass on `model`."""
    if ctx.calibration is None:
        raise UserInputError("allocation 'owl' needs calibration data: pass --calibration-data")
    calibrator = _OutlierCalibrator(targets, config.owl_threshold)
    # A streamed model's pre-pass only reads: the pruning walk after it writes the blocks.
    with reading_only(model):
        run_calibration(
            model,
            ctx.calibration,
            calibrator,
            device=ctx.device,
            batch_size=config.calibration.batch_size,
            precision=config.calibration.precision,
            progress=ctx.progress,
            measure_error=False,
        )
    return calibrator.ratios


def block_sparsities(
    targets: Mapping[str, nn.Module],
    blocks: Mapping[str, int],
    level: float,
    config: UnstructuredPruneConfig,
    ratios: Mapping[int, float],
) -> dict[int, float]:
    """OWL's sparsity for each block at overall `level`.

    OWL's deviation scales with the level (``lambda x level / target``), so the steps of a gradual
    schedule keep the final allocation's shape.
    """
    order = sorted(ratios)
    sizes = dict.fromkeys(order, 0)
    for name, module in targets.items():
        sizes[blocks[name]] += oriented(module).numel()
    target = config.target_sparsity
    lam = config.owl_lambda * (level / target if target > 0 else 0.0)
    per_block = owl_sparsities([ratios[b] for b in order], [sizes[b] for b in order], level, lam)
    return dict(zip(order, per_block, strict=True))


def allocate(
    targets: Mapping[str, nn.Module],
    blocks: Mapping[str, int],
    level: float,
    config: UnstructuredPruneConfig,
    ratios: Mapping[int, float] | None,
) -> dict[str, float]:
    """Each target's sparsity at overall `level`: uniform, or OWL's per-block allocation snapped
    to what each layer's selection can prune exactly (`round_to_grid`)."""
    if ratios is None:
        return dict.fromkeys(targets, level)
    by_block = block_sparsities(targets, blocks, level, config, ratios)
    names = list(targets)
    # Wanda prunes the same count in every row, so its grid is the input width.
    per_row = isinstance(config, WandaPruneConfig)
    shapes = [oriented(targets[name]).shape for name in names]
    snapped = round_to_grid(
        [by_block[blocks[name]] for name in names],
        [rows * cols for rows, cols in shapes],
        [cols if per_row else rows * cols for rows, cols in shapes],
        level,
    )
    return dict(zip(names, snapped, strict=True))


# ------------------------------------------------------------------------------- reporting


def _params(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) over the model's unique parameters (tied weights once)."""
    unique = dict(model.named_parameters())
    total = sum(p.numel() for p in unique.values())
    count = sum(nonzero_count(model, name, p) for name, p in unique.items())
    return count, total


def _layer_rows(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    sparsity: Mapping[str, float],
    errors: Mapping[str, float | None],
) -> list[dict[str, Any]]:
    rows = []
    for name, module in targets.items():
        W = oriented(module)
        count = nonzero_count(model, f"{name}.weight", W)
        rows.append(
            {
                "name": name,
                "shape": list(W.shape),
                "target_sparsity": round(sparsity[name], 6),
                "sparsity": 1.0 - count / W.numel(),
                "nonzero": count,
                "params": W.numel(),
                "rel_error": errors.get(name),
            }
        )
    return rows


def _describe(config: UnstructuredPruneConfig) -> str:
    if config.pattern is not None:
        n, m = config.nm or (0, 0)
        return f"{config.pattern} semi-structured sparsity ({n} of every {m} inputs kept)"
    return f"{config.target_sparsity:.1%} unstructured sparsity"


_TITLES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}


def _method_step(config: UnstructuredPruneConfig, calibration: CalibrationReport | None) -> str:
    title = _TITLES[getattr(config, "method", "")]
    text = f"{title} pruning: {_describe(config)}"
    if isinstance(config, MagnitudePruneConfig):
        global_scope = config.scope == "global"
        text += ", ranked across all targeted layers" if global_scope else ", ranked per layer"
    elif isinstance(config, WandaPruneConfig):
        text += ", |W| x input-channel norm ranked within each output row"
    else:
        assert isinstance(config, SparseGPTPruneConfig)
        text += f", second-order updates (damp {config.damp}, blocks of {config.block_size})"
        if config.refit_iterations:
            text += (
                f", kept weights then re-fitted by {config.refit_iterations} conjugate-gradient "
                "steps"
            )
    if isinstance(config, WandaPruneConfig | SparseGPTPruneConfig) and config.true_sequential:
        text += ", true sequential"
    if calibration is not None:
        text += (
            f"; calibrated block by block on {calibration.num_samples} x {calibration.seq_len} "
            "tokens"
        )
    return text


# ------------------------------------------------------------------------------- the method


def _writer(
    model: nn.Module, names: list[str], config: UnstructuredPruneConfig
) -> Callable[[Path], None]:
    if config.save_format == "dense":
        return dense_writer(model)

    def sparse(directory: Path) -> None:
        save_sparse_bitmask(
            model,  # type: ignore[arg-type]
            names,
            directory,
            structure=config.pattern or "unstructured",
        )

    return sparse


class _Pruner:
    """One pruning pass at given per-layer sparsities, for the configured method."""

    def __init__(
        self,
        model: nn.Module,
        config: UnstructuredPruneConfig,
        ctx: PruneContext,
        targets: Mapping[str, nn.Module],
    ) -> None:
        self.model = model
        self.config = config
        self.ctx = ctx
        self.targets = targets
        self.calibration: CalibrationReport | None = None

    def __call__(
        self,
        sparsity: Mapping[str, float],
        nm: tuple[int, int] | None,
        prior: Masks | None,
        measure: bool,
        keep_masks: bool,
    ) -> tuple[Masks, dict[str, float | None]]:
        """Prune once; returns the keep masks (when `keep_masks`) and per-layer errors."""
        config = self.config
        if isinstance(config, MagnitudePruneConfig):
            keep, weight_errors = _magnitude_step(
                self.model, self.targets, sparsity, config, nm, prior, keep_masks
            )
            return keep, dict(weight_errors)
        assert isinstance(config, WandaPruneConfig | SparseGPTPruneConfig)
        if self.ctx.calibration is None:
            raise UserInputError(f"{config.method} needs calibration data")
        calibrator = _PruneCalibrator(self.targets, sparsity, config, nm, prior, keep_masks)
        report = run_calibration(
            self.model,
            self.ctx.calibration,
            calibrator,
            device=self.ctx.device,
            batch_size=config.calibration.batch_size,
            precision=config.calibration.precision,
            progress=self.ctx.progress,
            measure_error=measure,
        )
        self.calibration = report
        missing = set(self.targets) - calibrator.solved
        if missing:
            raise UserInputError(
                f"{len(missing)} targeted layer(s) never ran during calibration (e.g. "
                f"{sorted(missing)[0]}); they cannot be pruned with {config.method}"
            )
        errors = {r.name: r.rel_error for r in report.linears if r.name in self.targets}
        return calibrator.keep, errors


def _gradual(
    model: nn.Module,
    config: UnstructuredPruneConfig,
    ctx: PruneContext,
    targets: Mapping[str, nn.Module],
    pruner: _Pruner,
    sparsity_at: Callable[[float], dict[str, float]],
) -> tuple[Masks, dict[str, float | None], list[dict[str, Any]]]:
    schedule = config.schedule
    assert schedule is not None
    if ctx.train_tokens is None:
        raise UserInputError("a gradual schedule needs training text (train_tokens)")
    teacher = None
    if schedule.teacher == "original":
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
    levels = sparsity_schedule(config.target_sparsity, schedule.steps, schedule.kind)
    prior: Masks | None = None
    keep: Masks = {}
    errors: dict[str, float | None] = {}
    history: list[dict[str, Any]] = []
    for index, level in enumerate(levels):
        last = index == len(levels) - 1
        # Intermediate steps are unstructured; the pattern, when asked, is imposed at the end.
        nm = config.nm if last else None
        keep, errors = pruner(
            sparsity_at(level), nm, None if nm else prior, measure=last, keep_masks=True
        )
        masks = [
            (weight_param(module), stored_mask(module, keep[name]))
            for name, module in targets.items()
        ]
        losses = finetune_masked(
            model,
            masks,
            ctx.train_tokens,
            steps=schedule.finetune_steps,
            learning_rate=schedule.learning_rate,
            batch_size=schedule.batch_size,
            seq_len=schedule.seq_len,
            seed=schedule.seed + index,
            teacher=teacher,
            temperature=schedule.temperature,
            progress=ctx.progress,
            description=f"fine-tuning at {level:.1%}",
        )
        history.append(
            {
                "step": index + 1,
                "sparsity": level,
                "finetune_steps": len(losses),
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
            }
        )
        prior = keep
    del teacher
    return keep, errors, history


def _report_calibration(report: dict[str, Any], calibration: CalibrationReport) -> None:
    """Add the calibration pass's tokens, time, precision and per-block errors to `report`."""
    report["calibration_tokens"] = calibration.tokens
    report["calibration_seconds"] = round(calibration.seconds, 3)
    report["calibration_precision"] = calibration.precision
    report["blocks"] = [
        {"index": b.index, "rel_error": b.rel_error, "seconds": round(b.seconds, 3)}
        for b in calibration.blocks
    ]


def _report_refit(report: dict[str, Any], steps: list[str], calibration: CalibrationReport) -> None:
    """Add how much SparseGPT's re-fit lowered the layer loss (when it ran) to the report and
    the steps."""
    refits = [
        record.metrics["refit_loss_reduction"]
        for record in calibration.linears
        if "refit_loss_reduction" in record.metrics
    ]
    if refits:
        mean = sum(refits) / len(refits)
        report["refit_loss_reduction"] = {"mean": mean, "min": min(refits), "max": max(refits)}
        steps.append(
            f"Re-fit of the kept weights lowered SparseGPT's layer loss by {mean:.1%} on average "
            f"({min(refits):.1%} to {max(refits):.1%} over {len(refits)} layers)"
        )


def _report_owl(
    report: dict[str, Any],
    steps: list[str],
    config: UnstructuredPruneConfig,
    ratios: Mapping[int, float],
    per_block: Mapping[int, float],
    seconds: float,
) -> None:
    """Add OWL's outlier ratios and per-block sparsities to the report and the steps."""
    values = list(per_block.values())
    report["owl"] = {
        "outlier_ratios": {str(k): v for k, v in sorted(ratios.items())},
        "block_sparsity": {str(k): v for k, v in sorted(per_block.items())},
        "seconds": round(seconds, 3),
    }
    steps.append(
        f"OWL allocation: per-block sparsity {min(values):.1%} to {max(values):.1%} from the "
        f"outlier ratio of Wanda scores (threshold {config.owl_threshold} x mean, lambda "
        f"{config.owl_lambda}), {config.target_sparsity:.1%} over all targeted weights"
    )


def _report_gradual(
    report: dict[str, Any],
    steps: list[str],
    schedule: GradualSchedule,
    history: list[dict[str, Any]],
) -> None:
    """Add the gradual schedule's history to the report and describe it in the steps."""
    report["gradual"] = history
    loss = "KL to the unpruned model" if schedule.teacher == "original" else "LM loss"
    steps.append(
        f"Gradual: {schedule.steps} {schedule.kind} steps "
        + " -> ".join(f"{h['sparsity']:.1%}" for h in history)
        + f", each followed by {schedule.finetune_steps} AdamW steps (lr "
        f"{schedule.learning_rate:g}, {schedule.batch_size} x {schedule.seq_len} tokens, "
        f"{loss}) with the masks fixed"
    )


def apply(model: nn.Module, config: UnstructuredPruneConfig, ctx: PruneContext) -> PruneOutcome:
    """Prune `model` in place as `config` says (magnitude, wanda or sparsegpt)."""
    targets = plan_targets(model, config)
    blocks = _block_of(targets, model)
    started = time.perf_counter()
    ratios = owl_ratios(model, targets, config, ctx) if config.allocation == "owl" else None
    owl_seconds = time.perf_counter() - started

    def sparsity_at(level: float) -> dict[str, float]:
        return allocate(targets, blocks, level, config, ratios)

    pruner = _Pruner(model, config, ctx, targets)
    nm_ok: dict[str, bool] = {}
    if config.nm is not None:
        pattern = config.nm

        def check_nm(index: int, block: nn.Module) -> None:  # a streamed block, before it goes
            for name in [n for n, b in blocks.items() if b == index]:
                nm_ok[name] = satisfies_nm(oriented(targets[name]), *pattern)

        inspect_blocks(model, check_nm)
    history: list[dict[str, Any]] = []
    final = sparsity_at(config.target_sparsity)
    if config.schedule is None:
        _, errors = pruner(final, config.nm, None, measure=True, keep_masks=False)
    else:
        _, errors, history = _gradual(model, config, ctx, targets, pruner, sparsity_at)
    rows = _layer_rows(model, targets, final, errors)
    targeted = sum(r["params"] for r in rows)
    zeros = sum(r["params"] - r["nonzero"] for r in rows)
    nonzero, total = _params(model)
    nm = config.nm
    report: dict[str, Any] = {
        "layers": len(rows),
        "target_sparsity": config.target_sparsity,
        "pattern": config.pattern,
        "allocation": config.allocation,
        "overall_sparsity": zeros / max(targeted, 1),
        "targeted_params": targeted,
        "pruned_params": zeros,
        "nonzero_params": nonzero,
        "total_params": total,
        "model_sparsity": 1.0 - nonzero / max(total, 1),
        "sensitivity_kind": (
            "relative weight error (data-free)"
            if isinstance(config, MagnitudePruneConfig)
            else "relative output error on the calibration data"
        ),
        "sensitivity": sensitivity_table(rows, limit=len(rows)),
        "per_layer": rows,
        "speedup_note": NO_SPEEDUP,
    }
    if nm is not None:
        report["nm_pattern_ok"] = all(
            nm_ok[name] if name in nm_ok else satisfies_nm(oriented(module), *nm)
            for name, module in targets.items()
        )
    calibration = pruner.calibration
    if calibration is not None:
        _report_calibration(report, calibration)
    steps = [_method_step(config, calibration)]
    if calibration is not None:
        _report_refit(report, steps, calibration)
    if ratios is not None:
        per_block = block_sparsities(targets, blocks, config.target_sparsity, config, ratios)
        _report_owl(report, steps, config, ratios, per_block, owl_seconds)
    if config.schedule is not None:
        _report_gradual(report, steps, config.schedule, history)
    steps.append(
        f"{zeros:,} of {targeted:,} weights in {len(rows)} pruned layers are zero "
        f"({report['overall_sparsity']:.2%}); the model keeps {nonzero:,} non-zero parameters "
        f"of {total:,}"
    )
    steps.append(NO_SPEEDUP)
    if config.save_format == "sparse-bitmask":
        steps.append(SPARSE_LOAD_NOTE)
    return PruneOutcome(
        model=model,
        writer=_writer(model, list(targets), config),
        format=FORMAT_SPARSE if config.save_format == "sparse-bitmask" else FORMAT_DENSE,
        steps=steps,
        report=report,
    )


# Magnitude pruning is data-free, except that OWL's allocation ranks layers by activations.
register_method(
    "magnitude", MagnitudePruneConfig, needs_calibration=lambda c: c.allocation == "owl"
)(apply)
register_method("wanda", WandaPruneConfig, needs_calibration=True)(apply)
register_method("sparsegpt", SparseGPTPruneConfig, needs_calibration=True)(apply)
