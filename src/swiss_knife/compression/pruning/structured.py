"""Structured pruning: remove whole MLP channels, attention heads and hidden channels.

Unstructured sparsity leaves every matrix its full shape, so dense kernels run exactly as fast as
before. Removing whole *structures* makes the matrices smaller, which is where the measured
speedups come from, and is how Minitron (Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation") and FLAP (An et al. 2024, "Fluctuation-based Adaptive
Structured Pruning for Large Language Models") compress LLMs:

* MLP channel j of a block: row j of gate/up (both halves of Phi-3's fused gate_up, GPT-2's Conv1D
  c_fc, OPT's fc1, NeoX's dense_h_to_4h) and column j of down_proj, together.
* Attention heads: rows of q/k/v (or of the fused qkv, in its "blocked" or "per_head" layout) and
  the matching o_proj input columns. Under grouped-query attention a key/value head serves
  ``heads / kv_heads`` query heads, so the unit removed is a whole group: the kv head and its query
  heads. ``num_key_value_groups`` stays the same and the KV cache shrinks with the heads.
* Hidden (residual) channels: the embedding columns, every norm over the hidden size, the input
  columns of every linear that reads the residual stream and the output rows of every linear that
  writes it, and the LM head's input columns. RMSNorm averages over the channels, so the kept
  norm weights are scaled by sqrt(d / d'): with the removed channels quiet, the kept channels are
  normalised exactly as before. Gemma's embedding scale sqrt(hidden_size) is recomputed from the
  config on reload, so its embedding is rescaled to match.

Importance, computed on the unpruned model before anything is cut:

* ``activation`` (Minitron, FLAP): one walk of the calibration engine over the text, observing
  - MLP channel j: ``mean_t |x_tj| * ||W_down[:, j]||`` at down_proj's input: the expected size
    of the channel's contribution to the block output (Minitron's mean activation, weighted by
    the column that carries it as FLAP and Wanda do);
  - head h: ``sqrt(sum_{j in h} E[x_j^2] * ||W_o[:, j]||^2)`` over the head's slice of o_proj's
    input: the size of the head's output after the projection; a key/value group scores the sum
    of its query heads;
  - hidden channel j: ``sum over the norms feeding attention and MLP of mean_t |norm(x)_tj|``
    (Minitron's embedding-channel importance from LayerNorm outputs).
* ``magnitude`` (data-free): products of the L2 norms of the weights a unit reads and writes (the
  norms of gate row, up row and down column for an MLP channel; of a head's value rows and output
  columns for a head; the embedding column times the mean norm weight for a hidden channel).

Every block keeps the SAME number of channels and heads (ranked within each block, removed in
equal count), rounded to a multiple of ``round_to``. That is what makes the result an ordinary
checkpoint: ``config.json`` has one ``intermediate_size`` and one ``num_attention_heads``, and
LLM-Pruner's (Ma et al. 2023) per-layer shapes are the reason its outputs do not load with
``from_pretrained``. The config is rewritten (``intermediate_size``, head counts and an explicit
``head_dim`` where the modeling code would otherwise derive hidden // heads) and the modules'
cached sizes follow, so the in-memory model computes what its saved checkpoint computes.

Not supported, refused before any work: removing heads where the architecture derives head_dim
from hidden // heads with no setting to pin it (GPT-2, OPT, GPT-NeoX), and removing hidden
channels there as well, since their attention width IS the hidden size.

Cost: activation importance is one forward pass of the calibration set per block plus the
engine's replay (two passes in all), holding one block plus the activations; statistics are two
float32 vectors per observed linear. Magnitude importance reads each weight once. Cutting copies
each pruned matrix once.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from huggingface_hub.errors import StrictDataclassError
from pydantic import Field
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ...arch import (
    ArchSpec,
    attention_geometry,
    find_module,
    get_arch,
    get_blocks,
    get_module,
    hidden_size,
    intermediate_size,
)
from ...calibration import BlockCalibrator, BlockContext, ChannelNormObserver, run_calibration
from ...config import (
    CalibrationSettings,
    PruneBase,
)
from ...errors import UnsupportedArchitectureError, UserInputError
from ...streaming import reading_only, walk_blocks
from ..checkpoint import dense_writer
from .base import PruneContext, PruneOutcome, register_method


class StructuredPruneConfig(PruneBase):
    """Remove whole attention heads and MLP channels, shrinking every layer alike."""

    method: Literal["structured"] = "structured"
    mlp_ratio: float = Field(
        default=0.25, ge=0.0, lt=1.0, description="Fraction of MLP intermediate channels removed."
    )
    head_ratio: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of attention heads removed (whole key/value groups under GQA).",
    )
    hidden_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Fraction of hidden (embedding) channels removed."
    )
    importance: Literal["activation", "magnitude"] = Field(
        default="activation",
        description="activation: mean activation magnitude on calibration text (Minitron/FLAP); "
        "magnitude: weight norms, data-free.",
    )
    round_to: int = Field(
        default=1, ge=1, description="Keep widths a multiple of this (e.g. 8 or 64 for kernels)."
    )
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)


logger = logging.getLogger(__name__)

QkvLayout = Literal["separate", "blocked", "per_head"]

# ---------------------------------------------------------------------------------------------
# Tensor math: counts, scores and index sets. No modules, no hooks.
# ---------------------------------------------------------------------------------------------


def kept_count(total: int, ratio: float, round_to: int = 1) -> int:
    """Units kept when `ratio` of `total` are removed: nearest multiple of `round_to`, <= total.

    May return 0; the caller turns that into an error naming what would be emptied.
    """
    if ratio <= 0.0:
        return total
    kept = round_to * math.floor(total * (1.0 - ratio) / round_to + 0.5)
    return min(kept, total)


def top_indices(scores: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` highest scores, ascending; on ties the lower index is kept."""
    order = torch.argsort(scores, descending=True, stable=True)  # (n,)
    return order[:keep].sort().values  # (keep,)


def mlp_activation_scores(abs_mean: Tensor, down_weight: Tensor) -> Tensor:
    """mean_t |x_tj| * ||W_down[:, j]||_2 per intermediate channel j.

    `abs_mean` (intermediate,) is down_proj's mean absolute input; `down_weight` is stored
    (hidden, intermediate), i.e. (out, in).
    """
    return abs_mean.float() * down_weight.float().norm(dim=0)  # (intermediate,)


def mlp_magnitude_scores(up_weights: Sequence[Tensor], down_weight: Tensor) -> Tensor:
    """Product of the L2 norms of each channel's input rows (gate, up) and its down column.

    `up_weights` are (intermediate, hidden) each; `down_weight` (hidden, intermediate).
    """
    score = down_weight.float().norm(dim=0)  # (intermediate,)
    for weight in up_weights:
        score = score * weight.float().norm(dim=1)  # (intermediate,)
    return score


def head_activation_scores(sq_mean: Tensor, o_weight: Tensor, head_dim: int) -> Tensor:
    """sqrt(sum_{j in head} E[x_j^2] * ||W_o[:, j]||^2) per query head.

    `sq_mean` (heads * head_dim,) is the mean square of o_proj's input per channel; `o_weight`
    is (hidden, heads * head_dim).
    """
    contribution = sq_mean.float() * o_weight.float().square().sum(dim=0)  # (heads * head_dim,)
    return contribution.view(-1, head_dim).sum(dim=1).sqrt()  # (heads,)


def head_magnitude_scores(
    v_weight: Tensor, o_weight: Tensor, heads: int, kv_heads: int, head_dim: int
) -> Tensor:
    """||W_v of the head's kv group||_F * ||W_o columns of the head||_F per query head.

    `v_weight` (kv_heads * head_dim, hidden); `o_weight` (hidden, heads * head_dim). The query
    and key weights only shape the attention pattern, not the size of what a head writes.
    """
    o_norm = o_weight.float().square().sum(dim=0).view(heads, head_dim).sum(dim=1)  # (heads,)
    v_norm = v_weight.float().square().sum(dim=1).view(kv_heads, head_dim).sum(dim=1)  # (kv,)
    return (o_norm * v_norm.repeat_interleave(heads // kv_heads)).sqrt()  # (heads,)


def group_scores(head_scores: Tensor, kv_heads: int) -> Tensor:
    """Score of each key/value group: the sum of its query heads' scores.

    Query head h uses kv head h // (heads / kv_heads) (transformers' ``repeat_kv``).
    """
    return head_scores.view(kv_heads, -1).sum(dim=1)  # (kv_heads,)


def head_channels(heads: Tensor, head_dim: int) -> Tensor:
    """Channel indices of the given heads in a (heads * head_dim) dimension, in head order."""
    offsets = torch.arange(head_dim, device=heads.device)  # (head_dim,)
    return (heads[:, None] * head_dim + offsets).flatten()  # (len(heads) * head_dim,)


def qkv_rows(
    layout: QkvLayout,
    keep_heads: Tensor,
    keep_kv: Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> Tensor:
    """Output rows of a fused qkv projection that belong to the kept heads.

    "blocked": [all q | all k | all v] with GQA-sized k and v blocks (Phi-3, GPT-2).
    "per_head": for each head [q | k | v] of head_dim each (GPT-NeoX views the output as
    (..., heads, 3 * head_dim) and chunks the last dimension); needs kv_heads == heads.
    """
    if layout == "blocked":
        q = head_channels(keep_heads, head_dim)
        k = heads * head_dim + head_channels(keep_kv, head_dim)
        v = (heads + kv_heads) * head_dim + head_channels(keep_kv, head_dim)
        return torch.cat([q, k, v])  # (kept_q + 2 * kept_kv) * head_dim
    if layout == "per_head":
        if kv_heads != heads:
            raise ValueError("a per-head fused qkv has one key/value head per query head")
        return head_channels(keep_heads, 3 * head_dim)  # (kept * 3 * head_dim,)
    raise ValueError(f"qkv_rows is for fused layouts, got {layout!r}")


def removed_fraction(scores: Tensor, keep: Tensor) -> float:
    """Share of the total importance held by the units that are not kept."""
    total = float(scores.sum())
    if total <= 0.0:
        return 0.0
    return 1.0 - float(scores[keep].sum()) / total


# ---------------------------------------------------------------------------------------------
# Module surgery: slice a linear's outputs or inputs, keeping Linear and Conv1D conventions.
# ---------------------------------------------------------------------------------------------


def _tensor(module: nn.Module, name: str) -> Tensor:
    """A module's parameter or buffer as a plain tensor (no autograd history)."""
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise UnsupportedArchitectureError(f"{type(module).__name__}.{name} is not a tensor")
    return value.data


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _weight_out_in(module: nn.Module) -> Tensor:
    """The weight as (out_features, in_features), whatever the layer stores."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.t() if isinstance(module, Conv1D) else weight


def slice_outputs(module: nn.Module, rows: Tensor) -> None:
    """Keep only output features `rows` of a Linear or Conv1D (weight and bias)."""
    weight = _tensor(module, "weight")
    rows = rows.to(weight.device)
    if isinstance(module, Conv1D):
        _replace(module, "weight", weight[:, rows])  # (in, kept): Conv1D stores (in, out)
        module.nf = len(rows)
    elif isinstance(module, nn.Linear):
        _replace(module, "weight", weight[rows])  # (kept, in)
        module.out_features = len(rows)
    else:
        raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        _replace(module, "bias", bias.data[rows])


def slice_inputs(module: nn.Module, cols: Tensor) -> None:
    """Keep only input features `cols` of a Linear or Conv1D (the bias is per output)."""
    weight = _tensor(module, "weight")
    cols = cols.to(weight.device)
    if isinstance(module, Conv1D):
        _replace(module, "weight", weight[cols])  # (kept, out)
        module.nx = len(cols)
    elif isinstance(module, nn.Linear):
        _replace(module, "weight", weight[:, cols])  # (out, kept)
        module.in_features = len(cols)
    else:
        raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def _refresh_ints(root: nn.Module, changes: dict[str, tuple[int, int]]) -> None:
    """Set int attributes that cache a config size (old -> new) on every submodule.

    Modeling code copies sizes such as ``num_key_value_heads`` (Phi-3 slices its fused qkv
    with it) or ``hidden_size`` onto modules at construction; a reload recomputes them from the
    rewritten config, so the in-memory model must carry the same values.
    """
    for module in root.modules():
        for attr, (old, new) in changes.items():
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(module, attr, new)


# ---------------------------------------------------------------------------------------------
# The plan: every count decided (and every impossible request refused) before any work.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    spec: ArchSpec
    num_blocks: int
    intermediate: int
    mlp_keep: int  # channels kept per block (== intermediate: MLP untouched)
    heads: int
    kv_heads: int
    head_dim: int
    groups_keep: int  # key/value groups kept per block (== kv_heads: attention untouched)
    hidden: int
    hidden_keep: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def prunes_mlp(self) -> bool:
        return self.mlp_keep < self.intermediate

    @property
    def prunes_heads(self) -> bool:
        return self.groups_keep < self.kv_heads

    @property
    def prunes_hidden(self) -> bool:
        return self.hidden_keep < self.hidden


def _plan(model: nn.Module, config: StructuredPruneConfig) -> _Plan:
    spec = get_arch(model)
    model_config = model.config
    if config.mlp_ratio == 0 and config.head_ratio == 0 and config.hidden_ratio == 0:
        raise UserInputError("nothing to prune: set mlp_ratio, head_ratio or hidden_ratio above 0")
    heads, kv_heads, head_dim = attention_geometry(model_config, spec)
    hidden = hidden_size(model_config, spec)
    intermediate = intermediate_size(model_config, spec)
    derived_head_dim = spec.config_head_dim is None
    for what, ratio in (("heads", config.head_ratio), ("hidden channels", config.hidden_ratio)):
        if ratio > 0 and derived_head_dim:
            raise UnsupportedArchitectureError(
                f"cannot remove {what} of a {spec.name} model: its modeling code derives "
                f"head_dim = hidden_size // num_attention_heads ({hidden} // {heads}) and has no "
                "head_dim setting, and its attention width is the hidden size, so the smaller "
                "model could not be described by its config; prune MLP channels (mlp_ratio) or "
                "remove layers instead"
            )
    if heads % kv_heads:
        raise UnsupportedArchitectureError(
            f"{heads} query heads do not split into {kv_heads} key/value groups"
        )

    mlp_keep = kept_count(intermediate, config.mlp_ratio, config.round_to)
    if mlp_keep == 0:
        raise UserInputError(
            f"mlp_ratio {config.mlp_ratio} with round_to {config.round_to} would remove all "
            f"{intermediate} MLP channels of every block; use a smaller ratio"
        )
    # Removal unit: a key/value group with its query heads (one head each without GQA).
    groups_keep = kept_count(kv_heads, config.head_ratio)
    if groups_keep == 0:
        unit = "key/value groups" if kv_heads < heads else "heads"
        raise UserInputError(
            f"head_ratio {config.head_ratio} would remove all {kv_heads} {unit} of every block "
            f"({heads} query heads, {kv_heads} key/value heads; whole groups are removed); "
            "use a smaller ratio"
        )
    hidden_keep = kept_count(hidden, config.hidden_ratio, config.round_to)
    if hidden_keep == 0:
        raise UserInputError(
            f"hidden_ratio {config.hidden_ratio} with round_to {config.round_to} would remove "
            f"all {hidden} hidden channels; use a smaller ratio"
        )
    plan = _Plan(
        spec=spec,
        num_blocks=len(get_blocks(model, spec)),
        intermediate=intermediate,
        mlp_keep=mlp_keep,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        groups_keep=groups_keep,
        hidden=hidden,
        hidden_keep=hidden_keep,
    )
    for what, ratio, total, kept, unit in (
        ("mlp_ratio", config.mlp_ratio, intermediate, mlp_keep, "MLP channels"),
        ("head_ratio", config.head_ratio, kv_heads, groups_keep, "key/value groups"),
        ("hidden_ratio", config.hidden_ratio, hidden, hidden_keep, "hidden channels"),
    ):
        if ratio > 0 and kept == total:
            # A request that silently does nothing is worse than a clear refusal.
            raise UserInputError(
                f"{what} {ratio} removes none of the {total} {unit} (after rounding"
                + (f" to a multiple of {config.round_to}" if unit != "key/value groups" else "")
                + "); use a larger ratio"
                + (", or remove MLP channels instead" if unit == "key/value groups" else "")
            )
    _check_shapes(model, plan)
    _check_loadable(model_config, plan)
    return plan


def _check_shapes(model: nn.Module, plan: _Plan) -> None:
    """Every block must have the shapes its config describes (refuse already-ragged models)."""
    spec = plan.spec
    qkv_width = (plan.heads + 2 * plan.kv_heads) * plan.head_dim
    for index, block in enumerate(get_blocks(model, spec)):
        down = _weight_out_in(get_module(block, spec.mlp_down))
        o_proj = _weight_out_in(get_module(block, spec.o_proj))
        expected = [
            (spec.mlp_down, down.shape[1], plan.intermediate),
            (spec.o_proj, o_proj.shape[1], plan.heads * plan.head_dim),
            (spec.o_proj, o_proj.shape[0], plan.hidden),
        ]
        if spec.qkv_proj is not None:
            qkv = _weight_out_in(get_module(block, spec.qkv_proj))
            expected.append((spec.qkv_proj, qkv.shape[0], qkv_width))
        for name, actual, wanted in expected:
            if actual != wanted:
                raise UnsupportedArchitectureError(
                    f"block {index} {name} has width {actual} where the config says {wanted}; "
                    "structured pruning needs a model whose config describes its shapes"
                )


# ---------------------------------------------------------------------------------------------
# Importance.
# ---------------------------------------------------------------------------------------------


def _attention_inputs(spec: ArchSpec) -> list[str]:
    return [n for n in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj) if n is not None]


class _ActivationStats(BlockCalibrator):
    """Observes, in one pass per block, the inputs that importance is computed from."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.observers: dict[str, ChannelNormObserver] = {}

    def relative_names(self) -> list[str]:
        spec, plan = self.plan.spec, self.plan
        names: list[str] = []
        if plan.prunes_mlp:
            names.append(spec.mlp_down)
        if plan.prunes_heads:
            names.append(spec.o_proj)
        if plan.prunes_hidden:
            # Their inputs are the outputs of the norms feeding attention and the MLP.
            names += [_attention_inputs(spec)[0], spec.mlp_up[0]]
        return names

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        # Nothing is rewritten during the walk, so every linear can be observed in one pass.
        return [[ctx.full_name(name) for name in self.relative_names()]]

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        self.observers.setdefault(name, ChannelNormObserver()).update(inp)

    def stats(self, index: int, relative: str) -> ChannelNormObserver:
        return self.observers[f"{self.plan.spec.blocks}.{index}.{relative}"]


def _up_weights(block: nn.Module, plan: _Plan) -> list[Tensor]:
    """The (intermediate, hidden) input weights of the MLP channels (gate and up when gated)."""
    spec = plan.spec
    weights = [_weight_out_in(get_module(block, name)) for name in spec.mlp_up]
    if spec.fused_gate_up:
        # Phi-3's gate_up_proj output is [gate | up], split with chunk(2).
        return list(weights[0].chunk(2, dim=0))
    return weights


def _v_weight(block: nn.Module, plan: _Plan) -> Tensor:
    """(kv_heads * head_dim, hidden) value weights of a block, whatever the qkv layout."""
    spec = plan.spec
    if spec.v_proj is not None:
        return _weight_out_in(get_module(block, spec.v_proj))
    assert spec.qkv_proj is not None
    fused = _weight_out_in(get_module(block, spec.qkv_proj))
    every_kv = torch.arange(plan.kv_heads)
    all_heads = torch.arange(plan.heads)
    rows = qkv_rows(spec.qkv_layout, all_heads, every_kv, plan.heads, plan.kv_heads, plan.head_dim)
    qkv = fused[rows.to(fused.device)]
    if spec.qkv_layout == "per_head":
        # (heads, 3 * head_dim, hidden) -> the last third of every head is its value.
        per_head = qkv.view(plan.heads, 3, plan.head_dim, -1)
        return per_head[:, 2].reshape(plan.heads * plan.head_dim, -1)
    return qkv[(plan.heads + plan.kv_heads) * plan.head_dim :]


def _norms(model: nn.Module, plan: _Plan) -> list[tuple[str, nn.Module]]:
    """Every norm over the residual stream (per block and final), by full name.

    Found by shape rather than by name so Gemma-2's sandwich norms are included; norms inside
    the attention (Qwen3's per-head q_norm/k_norm over head_dim) are left alone.
    """
    spec = plan.spec
    found: list[tuple[str, nn.Module]] = []
    attention_prefix = f".{spec.attn}."
    for name, module in model.named_modules():
        weight = getattr(module, "_parameters", {}).get("weight")
        if isinstance(module, nn.Linear | Conv1D | nn.Embedding) or weight is None:
            continue
        if weight.dim() != 1 or weight.shape[0] != plan.hidden:
            continue
        if attention_prefix in f".{name}.":
            continue
        found.append((name, module))
    return found


def _activation_stats(
    model: nn.Module, config: StructuredPruneConfig, ctx: PruneContext, plan: _Plan
) -> tuple[_ActivationStats | None, dict[str, Any]]:
    """The calibration walk of activation importance (None for magnitude importance), and the
    importance part of the report. On a streamed model the walk writes nothing: the blocks are
    cut in a second walk."""
    info: dict[str, Any] = {"kind": config.importance}
    if config.importance != "activation":
        return None, info
    assert ctx.calibration is not None  # prune() refuses activation importance without it
    stats = _ActivationStats(plan)
    with reading_only(model):
        report = run_calibration(
            model,
            ctx.calibration,
            stats,
            device=ctx.device,
            batch_size=config.calibration.batch_size,
            precision=config.calibration.precision,
            progress=ctx.progress,
            measure_error=False,
        )
    info["calibration_tokens"] = report.tokens
    info["calibration_seconds"] = round(report.seconds, 3)
    info["calibration_precision"] = report.precision
    return stats, info


def _block_scores(
    index: int, block: nn.Module, plan: _Plan, stats: _ActivationStats | None
) -> tuple[Tensor | None, Tensor | None]:
    """Block `index`'s MLP channel scores ``(intermediate,)`` and key/value group scores
    ``(kv_heads,)`` (None where that part is not pruned), from its unpruned weights and, for
    activation importance, the statistics of the calibration walk."""
    spec = plan.spec
    mlp: Tensor | None = None
    groups: Tensor | None = None
    if plan.prunes_mlp:
        down = _weight_out_in(get_module(block, spec.mlp_down))
        if stats is not None:
            abs_mean = stats.stats(index, spec.mlp_down).abs_mean
            mlp = mlp_activation_scores(abs_mean, down).cpu()
        else:
            mlp = mlp_magnitude_scores(_up_weights(block, plan), down).cpu()
    if plan.prunes_heads:
        o_weight = _weight_out_in(get_module(block, spec.o_proj))
        if stats is not None:
            observer = stats.stats(index, spec.o_proj)
            sq_mean = observer.sq_norm / max(observer.count, 1)
            per_head = head_activation_scores(sq_mean, o_weight, plan.head_dim)
        else:
            per_head = head_magnitude_scores(
                _v_weight(block, plan), o_weight, plan.heads, plan.kv_heads, plan.head_dim
            )
        groups = group_scores(per_head, plan.kv_heads).cpu()
    return mlp, groups


def _hidden_scores(model: nn.Module, plan: _Plan, stats: _ActivationStats | None) -> Tensor:
    spec = plan.spec
    if stats is not None:
        total = torch.zeros(plan.hidden)
        for index in range(plan.num_blocks):
            for relative in (_attention_inputs(spec)[0], spec.mlp_up[0]):
                total += stats.stats(index, relative).abs_mean.float().cpu()
        return total  # (hidden,)
    embedding = get_module(model, spec.embeddings[0]).weight
    assert isinstance(embedding, Tensor)
    norm_weights = [
        (module.weight.float() + spec.norm_weight_offset).abs().cpu()
        for _, module in _norms(model, plan)
        if isinstance(module.weight, Tensor)
    ]
    gain = torch.stack(norm_weights).mean(dim=0) if norm_weights else torch.ones(plan.hidden)
    return embedding.float().norm(dim=0).cpu() * gain  # (hidden,)


# ---------------------------------------------------------------------------------------------
# Cutting.
# ---------------------------------------------------------------------------------------------


def _prune_mlp(block: nn.Module, plan: _Plan, keep: Tensor) -> None:
    spec = plan.spec
    for name in spec.mlp_up:
        module = get_module(block, name)
        rows = torch.cat([keep, plan.intermediate + keep]) if spec.fused_gate_up else keep
        slice_outputs(module, rows)
    slice_inputs(get_module(block, spec.mlp_down), keep)


def _prune_heads(block: nn.Module, plan: _Plan, keep_groups: Tensor) -> Tensor:
    """Remove the key/value groups not in `keep_groups`; returns the kept query heads."""
    spec = plan.spec
    size = plan.group_size
    keep_heads = (keep_groups[:, None] * size + torch.arange(size)).flatten()  # (kept_q,)
    if spec.qkv_proj is not None:
        rows = qkv_rows(
            spec.qkv_layout, keep_heads, keep_groups, plan.heads, plan.kv_heads, plan.head_dim
        )
        slice_outputs(get_module(block, spec.qkv_proj), rows)
    else:
        assert spec.q_proj and spec.k_proj and spec.v_proj
        slice_outputs(get_module(block, spec.q_proj), head_channels(keep_heads, plan.head_dim))
        kv_rows = head_channels(keep_groups, plan.head_dim)
        slice_outputs(get_module(block, spec.k_proj), kv_rows)
        slice_outputs(get_module(block, spec.v_proj), kv_rows)
    slice_inputs(get_module(block, spec.o_proj), head_channels(keep_heads, plan.head_dim))
    return keep_heads


def _prune_hidden(model: nn.Module, plan: _Plan, keep: Tensor) -> None:
    spec = plan.spec
    ratio = plan.hidden / plan.hidden_keep
    head = get_module(model, spec.lm_head)
    tied: set[str] = set()
    embed_gain = 1.0
    for name in spec.embeddings:
        embedding = get_module(model, name)
        if not isinstance(embedding, nn.Embedding):
            raise UnsupportedArchitectureError(f"{name} is not an nn.Embedding")
        was_tied = head.weight is embedding.weight
        weight = embedding.weight.data[:, keep.to(embedding.weight.device)]  # (vocab, kept)
        scale = getattr(embedding, "embed_scale", None)
        if isinstance(scale, Tensor):
            # Gemma multiplies embeddings by sqrt(hidden_size), recomputed from the config on
            # reload: fold the change of that factor into the weights.
            gain = math.sqrt(ratio)
            new_scale = float(scale) / gain
            # A non-persistent buffer: assigning a tensor to a registered buffer name replaces it.
            embedding.register_buffer(
                "embed_scale",
                torch.tensor(new_scale, dtype=scale.dtype, device=scale.device),
                persistent=False,
            )
            if hasattr(embedding, "scalar_embed_scale"):
                cast(Any, embedding).scalar_embed_scale = new_scale
            weight = weight * gain
            if was_tied:
                embed_gain = gain
        _replace(embedding, "weight", weight)
        embedding.embedding_dim = plan.hidden_keep
        if was_tied:
            head.weight = embedding.weight
            tied.add(name)

    # RMSNorm divides by sqrt(mean of squares over the channels): with d' channels, sqrt(d/d')
    # keeps the kept channels' scale when the removed ones are quiet. LayerNorm is refused above.
    rms_gain = math.sqrt(ratio) if spec.norm_kind == "rmsnorm" else 1.0
    final_norm = find_module(model, spec.final_norm)
    for _, norm in _norms(model, plan):
        gain = rms_gain
        if norm is final_norm and embed_gain != 1.0:
            # The tied LM head got the embedding's gain: undo it before the head.
            gain /= embed_gain
        offset = spec.norm_weight_offset
        weight = _tensor(norm, "weight")
        weight = weight[keep.to(weight.device)]  # (kept,)
        _replace(norm, "weight", (weight + offset) * gain - offset)
        bias = getattr(norm, "bias", None)
        if isinstance(bias, Tensor):
            _replace(norm, "bias", bias.data[keep.to(bias.device)])
        if isinstance(norm, nn.LayerNorm):
            norm.normalized_shape = (plan.hidden_keep,)

    for block in get_blocks(model, spec):
        for name in _attention_inputs(spec):
            slice_inputs(get_module(block, name), keep)
        slice_outputs(get_module(block, spec.o_proj), keep)
        for name in spec.mlp_up:
            slice_inputs(get_module(block, name), keep)
        slice_outputs(get_module(block, spec.mlp_down), keep)
    if not tied:
        slice_inputs(head, keep)
    elif isinstance(head, nn.Linear):
        head.in_features = plan.hidden_keep


def _config_changes(plan: _Plan) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """New config values, and the (old, new) sizes that modules may have cached."""
    spec = plan.spec
    values: dict[str, int] = {}
    cached: dict[str, tuple[int, int]] = {}
    if plan.prunes_mlp:
        assert spec.config_intermediate is not None
        values[spec.config_intermediate] = plan.mlp_keep
        cached["intermediate_size"] = (plan.intermediate, plan.mlp_keep)
    if plan.prunes_heads or plan.prunes_hidden:
        assert spec.config_head_dim is not None
        # Pinned explicitly: hidden // heads no longer gives the head width.
        values[spec.config_head_dim] = plan.head_dim
    if plan.prunes_heads:
        new_heads = plan.groups_keep * plan.group_size
        values[spec.config_num_heads] = new_heads
        cached["num_heads"] = (plan.heads, new_heads)
        cached["num_attention_heads"] = (plan.heads, new_heads)
        if spec.config_num_kv_heads is not None:
            values[spec.config_num_kv_heads] = plan.groups_keep
            cached["num_key_value_heads"] = (plan.kv_heads, plan.groups_keep)
    if plan.prunes_hidden:
        values[spec.config_hidden] = plan.hidden_keep
        cached["hidden_size"] = (plan.hidden, plan.hidden_keep)
    return values, cached


def _check_loadable(config: Any, plan: _Plan) -> None:
    """Run the config class's own validators on the rewritten values, before any work.

    LlamaConfig and Gemma-2/3's configs refuse hidden_size % num_attention_heads != 0 on load
    even when head_dim is explicit, so some head counts cannot be saved loadably.
    """
    trial = copy.deepcopy(config)
    try:
        for attr, value in _config_changes(plan)[0].items():
            setattr(trial, attr, value)
        validate = getattr(trial, "validate", None)
        if callable(validate):
            validate()
    except (TypeError, ValueError, StrictDataclassError) as exc:
        cause = exc.__cause__ or exc
        hint = ""
        if plan.prunes_heads:
            fits = [
                f"{groups * plan.group_size} heads (head_ratio {1 - groups / plan.kv_heads:.3g})"
                for groups in range(1, plan.kv_heads)
                if plan.hidden_keep % (groups * plan.group_size) == 0
            ]
            hint = f"; counts that load: {', '.join(fits)}" if fits else ""
        raise UserInputError(
            f"the pruned model's config would not load with from_pretrained: "
            f"{type(config).__name__} refuses it ({cause}){hint}"
        ) from None


def _rewrite_config(model: nn.Module, plan: _Plan) -> None:
    values, cached = _config_changes(plan)
    for attr, value in values.items():
        setattr(model.config, attr, value)
    _refresh_ints(model, cached)


# ---------------------------------------------------------------------------------------------
# The method.
# ---------------------------------------------------------------------------------------------


def _num_params(model: nn.Module) -> int:
    # Tied weights are one tensor: count each storage once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _prune_block(
    index: int, block: nn.Module, plan: _Plan, mlp: Tensor | None, groups: Tensor | None
) -> dict[str, Any]:
    """Cut block `index`'s least important MLP channels and key/value groups (as planned, by
    the scores of `_block_scores`); returns its per-layer report row."""
    row: dict[str, Any] = {"layer": index}
    if plan.prunes_mlp:
        assert mlp is not None
        keep = top_indices(mlp, plan.mlp_keep)
        row["mlp_channels"] = plan.mlp_keep
        row["mlp_importance_removed"] = round(removed_fraction(mlp, keep), 4)
        _prune_mlp(block, plan, keep)
    if plan.prunes_heads:
        assert groups is not None
        keep_groups = top_indices(groups, plan.groups_keep)
        kept_heads = _prune_heads(block, plan, keep_groups)
        row["heads"] = len(kept_heads)
        row["kv_heads"] = plan.groups_keep
        removed = sorted(set(range(plan.kv_heads)) - set(keep_groups.tolist()))
        row["removed_kv_groups"] = removed
        row["head_importance_removed"] = round(removed_fraction(groups, keep_groups), 4)
    return row


def _summarize_removed_importance(
    per_layer: list[dict[str, Any]], importance: dict[str, Any]
) -> None:
    """Add the min/mean/max over blocks of the removed MLP and head importance to
    `importance`."""
    for key, field_name in (
        ("mlp", "mlp_importance_removed"),
        ("heads", "head_importance_removed"),
    ):
        values = [row[field_name] for row in per_layer if field_name in row]
        if values:
            importance[f"{key}_importance_removed"] = {
                "min": min(values),
                "mean": round(sum(values) / len(values), 4),
                "max": max(values),
            }


@register_method(
    "structured", StructuredPruneConfig, needs_calibration=lambda c: c.importance == "activation"
)
def apply_structured(
    model: nn.Module, config: StructuredPruneConfig, ctx: PruneContext
) -> PruneOutcome:
    """Remove MLP channels, whole key/value groups of heads and hidden channels, per config."""
    plan = _plan(model, config)
    params_before = _num_params(model)
    stats, importance = _activation_stats(model, config, ctx, plan)

    per_layer: list[dict[str, Any]] = []
    new_heads = plan.groups_keep * plan.group_size

    def cut(index: int, block: nn.Module) -> None:
        # A block's scores need only its own unpruned weights and statistics, so each block is
        # scored and cut in turn (a streamed model reads one block at a time).
        mlp, groups = _block_scores(index, block, plan, stats)
        per_layer.append(_prune_block(index, block, plan, mlp, groups))

    with torch.no_grad():
        walk_blocks(model, cut)
        if plan.prunes_hidden:
            hidden = _hidden_scores(model, plan, stats)
            hidden_keep_idx = top_indices(hidden, plan.hidden_keep)
            importance["hidden_importance_removed"] = round(
                removed_fraction(hidden, hidden_keep_idx), 4
            )
            _prune_hidden(model, plan, hidden_keep_idx)
    _rewrite_config(model, plan)
    params_after = _num_params(model)

    _summarize_removed_importance(per_layer, importance)
    steps = _describe(plan, config, importance)
    steps.append(
        f"parameters {params_before:,} -> {params_after:,} "
        f"({100 * (1 - params_after / params_before):.1f}% fewer)"
    )
    report: dict[str, Any] = {
        "arch": plan.spec.name,
        "params_before": params_before,
        "params_after": params_after,
        "mlp": {"before": plan.intermediate, "after": plan.mlp_keep},
        "attention": {
            "heads_before": plan.heads,
            "heads_after": new_heads,
            "kv_heads_before": plan.kv_heads,
            "kv_heads_after": plan.groups_keep,
            "head_dim": plan.head_dim,
        },
        "hidden": {"before": plan.hidden, "after": plan.hidden_keep},
        "per_layer": per_layer,
        "importance": importance,
    }

    return PruneOutcome(
        model=model,
        writer=dense_writer(model),
        format="dense/structured",
        steps=steps,
        report=report,
    )


def _describe(plan: _Plan, config: StructuredPruneConfig, importance: dict[str, Any]) -> list[str]:
    how = (
        f"by activation importance on {importance['calibration_tokens']:,} calibration tokens"
        if config.importance == "activation"
        else "by weight magnitude"
    )
    steps = []
    if plan.prunes_mlp:
        steps.append(
            f"removed MLP channels {how}: {plan.intermediate} -> {plan.mlp_keep} in each of "
            f"{plan.num_blocks} blocks"
        )
    if plan.prunes_heads:
        steps.append(
            f"removed attention heads {how} in whole key/value groups: {plan.heads} -> "
            f"{plan.groups_keep * plan.group_size} query heads, {plan.kv_heads} -> "
            f"{plan.groups_keep} key/value heads (head_dim {plan.head_dim}) in each block"
        )
    if plan.prunes_hidden:
        steps.append(f"removed hidden channels {how}: {plan.hidden} -> {plan.hidden_keep}")
    return steps
