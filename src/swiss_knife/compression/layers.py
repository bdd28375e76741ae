"""Layer reduction: drop whole transformer blocks, chosen by importance, index or position.

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect") observes that many blocks of a trained LLM barely change the residual stream and
scores each block by its Block Influence, ``BI = 1 - mean_t cos(x_t, block(x)_t)`` between the
block's input and output hidden states on calibration text; the blocks with the lowest BI are
removed in one shot. Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers")
find the same with an angular distance, and that simply dropping the last blocks before the final
one is a strong baseline, which the ``last`` selection gives.

Selection:

* ``importance``: lowest BI, computed by the calibration engine (`block_io_scores`, one walk of the
  unmodified model: one forward pass over the calibration set per block);
* ``last`` / ``first`` / ``evenly``: by position, data-free;
* explicit ``layers``: exactly those indices (negative counts from the end).

``keep_first`` / ``keep_last`` protect the first and last blocks, which ShortGPT and Gromov et al.
find the most important (the first builds the token representation, the last prepares it for the
head); an explicit index inside them is refused rather than silently skipped.

The blocks are removed with `arch.drop_blocks`, which also rewrites the config (layer count and
per-layer lists such as ``layer_types``) and renumbers ``layer_idx`` so the KV cache works, so the
result saves and reloads with plain ``from_pretrained`` and generates. Memory: one block plus the
calibration activations while scoring; nothing is copied when dropping.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import registry
from ..arch import ArchSpec, drop_blocks, get_arch, get_blocks
from ..calibration import block_io_scores, spilled_to
from ..config import LayerReductionConfig
from ..errors import UnsupportedArchitectureError, UserInputError
from ..streaming import reading_only, stream_of
from .checkpoint import save_dense

logger = logging.getLogger(__name__)


@dataclass
class LayerReductionOutcome:
    """The reduced model, what was done in words, and the per-block importance table."""

    model: nn.Module
    removed: list[int]
    steps: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def writer(self, path: Path) -> None:
        """A plain save_pretrained: the rewritten config describes the model (for a streamed
        model, the kept blocks are copied from the source, renumbered)."""
        save_dense(self.model, path)


# ---------------------------------------------------------------------------------------------
# Choosing the blocks: pure functions of the block count and scores.
# ---------------------------------------------------------------------------------------------


def removal_count(total: int, config: LayerReductionConfig) -> int:
    """How many blocks the config asks to remove from a `total`-block model (validated)."""
    if config.layers is not None:
        return len(explicit_indices(total, config))
    if config.num_layers_to_keep is not None:
        if config.num_layers_to_keep >= total:
            raise UserInputError(
                f"num_layers_to_keep {config.num_layers_to_keep} leaves nothing to remove from "
                f"a {total}-layer model"
            )
        count = total - config.num_layers_to_keep
    else:
        assert config.num_layers_to_remove is not None  # the config demands exactly one target
        count = config.num_layers_to_remove
        if count >= total:
            raise UserInputError(
                f"cannot remove {count} of {total} layers; at least one must remain"
            )
    candidates = total - config.keep_first - config.keep_last
    if count > max(candidates, 0):
        raise UserInputError(
            f"cannot remove {count} of {total} layers while keeping the first {config.keep_first} "
            f"and the last {config.keep_last}: only {max(candidates, 0)} are candidates; "
            "lower keep_first/keep_last or remove fewer"
        )
    return count


def explicit_indices(total: int, config: LayerReductionConfig) -> list[int]:
    """The config's explicit indices, normalised to 0..total-1, sorted, checked."""
    assert config.layers is not None
    indices: set[int] = set()
    named: dict[int, int] = {}  # block -> the index that first named it
    for index in config.layers:
        if not -total <= index < total:
            raise UserInputError(
                f"layer index {index} is out of range for a {total}-layer model "
                f"(valid: 0..{total - 1}, or negative from the end)"
            )
        block = index % total
        if block in named:
            # Removing a block "twice" would silently remove fewer blocks than listed.
            if named[block] == index:
                raise UserInputError(f"layer {index} is listed twice; list each block once")
            raise UserInputError(
                f"layers {named[block]} and {index} both name block {block} of the "
                f"{total}-layer model (negative indices count from the end); list each block once"
            )
        named[block] = index
        indices.add(block)
    if len(indices) >= total:
        raise UserInputError(f"cannot remove all {total} layers; at least one must remain")
    protected = [
        i for i in sorted(indices) if i < config.keep_first or i >= total - config.keep_last
    ]
    if protected:
        raise UserInputError(
            f"layer(s) {protected} are protected by keep_first={config.keep_first} / "
            f"keep_last={config.keep_last} in a {total}-layer model; lower those to remove them"
        )
    return sorted(indices)


def select_by_position(
    total: int, count: int, selection: str, keep_first: int, keep_last: int
) -> list[int]:
    """`count` block indices among the unprotected ones: the last, the first, or spread evenly."""
    candidates = list(range(keep_first, total - keep_last))
    if selection == "last":
        return candidates[len(candidates) - count :]
    if selection == "first":
        return candidates[:count]
    if selection == "evenly":
        # The middle of each of `count` equal stretches of the candidates.
        step = len(candidates) / count
        return [candidates[int((i + 0.5) * step)] for i in range(count)]
    raise ValueError(f"not a positional selection: {selection!r}")


def select_by_importance(
    scores: list[float], count: int, keep_first: int, keep_last: int
) -> list[int]:
    """The `count` unprotected blocks with the lowest score (ties: the later block goes first)."""
    total = len(scores)
    candidates = range(keep_first, total - keep_last)
    ranked = sorted(candidates, key=lambda i: (scores[i], -i))
    return sorted(ranked[:count])


def importance_table(scores: list[float] | None, removed: list[int], total: int) -> str:
    """A plain-text table of every block: its Block Influence, its rank, and whether removed."""
    ranks: dict[int, int] = {}
    if scores is not None:
        for position, index in enumerate(sorted(range(total), key=lambda i: scores[i]), start=1):
            ranks[index] = position
    lines = ["layer  block influence  rank (1 = least important)  removed"]
    for index in range(total):
        score = f"{scores[index]:.4f}" if scores is not None else "—"
        rank = str(ranks[index]) if scores is not None else "—"
        mark = "yes" if index in removed else ""
        lines.append(f"{index:>5}  {score:>15}  {rank:>26}  {mark}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The verb.
# ---------------------------------------------------------------------------------------------


def _num_params(model: nn.Module) -> int:
    # Tied weights are one tensor: count each storage once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _data_free_choice(
    total: int, count: int, config: LayerReductionConfig, by_importance: bool
) -> tuple[list[int] | None, str]:
    """The blocks to remove when no scores are needed (explicit indices or by position), and
    how they were chosen, in words; (None, "") when they are chosen by importance."""
    if config.layers is not None:
        return explicit_indices(total, config), "explicit indices"
    if not by_importance:
        removed = select_by_position(
            total, count, config.selection, config.keep_first, config.keep_last
        )
        return removed, f"position ({config.selection})"
    return None, ""


def _check_index_dependent(
    model: nn.Module, spec: ArchSpec, total: int, removed: list[int] | None
) -> None:
    """Refuse anything but removing the last blocks of a model whose blocks compute differently
    at another index (`spec.index_dependent_flags` set in its config)."""
    flags = [flag for flag in spec.index_dependent_flags if getattr(model.config, flag, False)]
    if flags and (removed is None or removed != list(range(total - len(removed), total))):
        # Checked here, before any scoring; drop_blocks would refuse it too, but only later.
        raise UnsupportedArchitectureError(
            f"this {spec.name} model sets {', '.join(flags)}=True, so a block computes "
            "differently at another index: only the last blocks can be removed "
            "(selection 'last' with keep_last 0, or --layers naming the last blocks)"
        )


def _block_importance(
    scores: list[float] | None, removed: list[int], total: int
) -> list[dict[str, Any]]:
    """The report's per-block rows: index, Block Influence (if scored) and whether removed."""
    return [
        {
            "layer": index,
            "block_influence": None if scores is None else round(scores[index], 6),
            "removed": index in removed,
        }
        for index in range(total)
    ]


def reduce_layers(
    model: nn.Module,
    config: LayerReductionConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> LayerReductionOutcome:
    """Remove whole blocks from `model` in place as `config` says; the config is rewritten.

    `calibration` (num_samples, seq_len) token ids are required for ``selection="importance"``
    (unless explicit ``layers`` are given) and, when given for another selection, used only to
    report every block's Block Influence.
    """
    started = time.perf_counter()
    spec = get_arch(model)
    total = len(get_blocks(model, spec))
    count = removal_count(total, config)
    by_importance = config.layers is None and config.selection == "importance"
    if by_importance and calibration is None:
        raise UserInputError(
            "selection 'importance' needs calibration data: pass --calibration-data (or "
            "data.calibration in a recipe), or choose --selection last/first/evenly or --layers"
        )
    removed, how = _data_free_choice(total, count, config, by_importance)
    _check_index_dependent(model, spec, total, removed)

    scores: list[float] | None = None
    if calibration is not None:
        # The walk only scores; a streamed model's kept blocks are copied at the end.
        with spilled_to(config.calibration.spill_dir), reading_only(model):
            scores = block_io_scores(
                model,
                calibration,
                device=device,
                batch_size=config.calibration.batch_size,
                precision=config.calibration.precision,
                progress=progress,
            )
    if removed is None:
        assert scores is not None and calibration is not None
        removed = select_by_importance(scores, count, config.keep_first, config.keep_last)
        how = f"lowest ShortGPT block influence on {calibration.numel():,} calibration tokens"

    params_before = _num_params(model)
    drop_blocks(model, removed)
    params_after = _num_params(model)
    stream = stream_of(model)
    if stream is not None:
        stream.keep_blocks([i for i in range(total) if i not in removed])
    table = importance_table(scores, removed, total)
    steps = [
        f"removed {len(removed)} of {total} transformer blocks {removed} by {how}: "
        f"{total} -> {total - len(removed)} layers, parameters {params_before:,} -> "
        f"{params_after:,}"
    ]
    report: dict[str, Any] = {
        "arch": spec.name,
        "selection": "explicit" if config.layers is not None else config.selection,
        "num_layers_before": total,
        "num_layers_after": total - len(removed),
        "removed": removed,
        "params_before": params_before,
        "params_after": params_after,
        "block_importance": _block_importance(scores, removed, total),
        "importance_metric": "ShortGPT block influence: 1 - mean cos(block input, output)",
        "importance_table": table,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return LayerReductionOutcome(model=model, removed=removed, steps=steps, report=report)


registry.register(
    "reduce_layers",
    "reduce_layers",
    LayerReductionConfig,
    needs_calibration=lambda c: c.layers is None and c.selection == "importance",
)(reduce_layers)
