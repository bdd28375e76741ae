"""Gradual pruning: a sparsity schedule, and fine-tuning with the masks held fixed.

Zhu and Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model
compression" (arXiv:1710.01878): instead of removing every weight at once, raise the sparsity in
``T`` steps along ``s_t = s_f (1 - (1 - t / T)^3)`` (fast at first, while many redundant weights
remain, slower near the target) and train between steps so the network recovers. `prune()` calls
the chosen criterion at each ``s_t`` and `finetune_masked` in between.

`finetune_masked` trains every parameter with AdamW on windows of a token stream, with the plain
language-model loss or, given a teacher (the unpruned model), distillation's `ForwardKL`
(Hinton et al. 2015: KL divergence between temperature-softened distributions, scaled by ``T^2``
so its gradients keep their size as ``T`` changes), over every position. Each step is the
distillation loop's `optimizer_step`. Pruned weights stay exactly zero: their gradients are
masked before each update (so AdamW's moments never move them) and the masks are applied again
after it (float round-off).

Cost per optimizer step: one forward and backward pass over ``batch_size x seq_len`` tokens (plus
a forward of the teacher); memory: the model, its gradients and AdamW's two moments (4x the
parameters in float32), plus a frozen copy of the model when distilling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from swiss_knife.data import token_windows
from swiss_knife.errors import DataError

from ..distillation.loop import optimizer_step
from ..distillation.losses import ForwardKL

ScheduleKind = Literal["cubic", "linear"]


def sparsity_schedule(target: float, steps: int, kind: ScheduleKind = "cubic") -> list[float]:
    """The sparsity after each of `steps` pruning steps; increasing, the last equals `target`.

    cubic: ``target * (1 - (1 - t / steps)^3)`` (Zhu & Gupta 2017, starting from 0);
    linear: ``target * t / steps``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    levels = []
    for t in range(1, steps + 1):
        fraction = t / steps
        done = 1.0 - (1.0 - fraction) ** 3 if kind == "cubic" else fraction
        levels.append(target * done)
    levels[-1] = target  # exact, whatever the float rounding of the curve
    return levels


def _unfreeze(model: nn.Module) -> tuple[list[nn.Parameter], list[bool]]:
    """Make every floating-point parameter of `model` trainable; returns them and their
    previous `requires_grad` flags, to restore afterwards."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    return params, flags


def _finetune_loss(
    model: nn.Module, kl: ForwardKL | None, teacher: nn.Module | None, batch: Tensor
) -> Tensor:
    """The loss on `batch` (batch, seq_len): the language-model loss, or with a teacher the KL
    divergence from its logits over every position."""
    if kl is None:
        loss: Tensor = model(input_ids=batch, labels=batch, use_cache=False).loss
        return loss
    assert teacher is not None
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits
    logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq_len, vocab)
    return kl(logits, target)


@torch.no_grad()
def _mask_gradients(keep: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Zero the gradients of pruned weights, so AdamW's moments never move them."""
    for weight, mask in keep:
        if weight.grad is not None:
            weight.grad.mul_(mask)


@torch.no_grad()
def _mask_weights(keep: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Re-apply the keep masks after an update (float round-off must not revive a weight)."""
    for weight, mask in keep:
        weight.mul_(mask)


def finetune_masked(
    model: nn.Module,
    masks: Sequence[tuple[Tensor, Tensor]],
    tokens: Tensor,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    teacher: nn.Module | None = None,
    temperature: float = 2.0,
    progress: bool = False,
    description: str = "fine-tuning",
) -> list[float]:
    """Train `model` for `steps` AdamW steps on windows of `tokens`, keeping pruned weights zero.

    `masks` pairs each pruned weight (a parameter of `model`) with its keep mask of the same
    shape. `tokens` is a 1-D stream cut into ``seq_len`` windows; each step draws `batch_size`
    of them at seeded random positions. Returns the loss of every step. The model is left in
    eval mode; `teacher` (if any) is only run forward.
    """
    from swiss_knife.progress import track

    if steps == 0:
        return []
    if tokens.dim() != 1:
        raise DataError(f"training tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    windows = token_windows(tokens, seq_len)  # (num_windows, seq_len)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params, flags = _unfreeze(model)
    keep = [(weight, mask.to(device=weight.device, dtype=weight.dtype)) for weight, mask in masks]
    kl = ForwardKL(temperature) if teacher is not None else None
    # No weight decay: it would only shrink the kept weights toward the pruned ones' zero.
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    optimizer.zero_grad(set_to_none=True)  # optimizer_step needs clear gradients
    losses: list[float] = []

    def loss_fn(batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = _finetune_loss(model, kl, teacher, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"fine-tuning diverged (loss {value}); lower the learning rate"
            )
        losses.append(value)
        return loss, {}

    model.train()
    try:
        with torch.enable_grad():
            for _ in track(range(steps), description, unit="step", enabled=progress):
                rows = torch.randint(0, windows.shape[0], (batch_size,), generator=generator)
                batch = windows[rows].to(device)  # (batch, seq_len)
                optimizer_step(
                    optimizer,
                    [batch],
                    loss_fn,
                    after_backward=lambda: _mask_gradients(keep),
                    after_update=lambda: _mask_weights(keep),
                )
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return losses


__all__ = ["finetune_masked", "sparsity_schedule"]
