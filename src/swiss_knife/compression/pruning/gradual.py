"""Gradual pruning: a sparsity schedule, and fine-tuning with the masks held fixed.

Zhu and Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model
compression" (arXiv:1710.01878): instead of removing every weight at once, raise the sparsity in
``T`` steps along ``s_t = s_f (1 - (1 - t / T)^3)`` (fast at first, while many redundant weights
remain, slower near the target) and train between steps so the network recovers. `prune()` calls
the chosen criterion at each ``s_t`` and `finetune_masked` in between.

`finetune_masked` trains every parameter with AdamW on windows of a token stream, with the plain
language-model loss or, given a teacher (the unpruned model), the distillation loss
`distillation_kl` (Hinton et al. 2015: KL divergence between temperature-softened
distributions, scaled by ``T^2`` so its gradients keep their size as ``T`` changes). Pruned
weights stay exactly zero: their gradients are masked before each step (so AdamW's moments never
move them) and the masks are applied again after it (weight decay, float round-off).

Cost per optimizer step: one forward and backward pass over ``batch_size x seq_len`` tokens (plus
a forward of the teacher); memory: the model, its gradients and AdamW's two moments (4x the
parameters in float32), plus a frozen copy of the model when distilling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swiss_knife.data import token_windows
from swiss_knife.errors import DataError

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


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over tokens.

    Both logits are ``(..., vocab)``; every leading position is one token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    # (tokens, vocab) -> mean over tokens of the per-token KL
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


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
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    keep = [(weight, mask.to(device=weight.device, dtype=weight.dtype)) for weight, mask in masks]
    # No weight decay: it would only shrink the kept weights toward the pruned ones' zero.
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    try:
        with torch.enable_grad():
            for _ in track(range(steps), description, unit="step", enabled=progress):
                rows = torch.randint(0, windows.shape[0], (batch_size,), generator=generator)
                batch = windows[rows].to(device)  # (batch, seq_len)
                if teacher is None:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                else:
                    with torch.no_grad():
                        target = teacher(input_ids=batch, use_cache=False).logits
                    logits = model(input_ids=batch, use_cache=False).logits
                    loss = distillation_kl(logits, target, temperature)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"fine-tuning diverged (loss {value}); lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for weight, mask in keep:
                        if weight.grad is not None:
                            weight.grad.mul_(mask)
                optimizer.step()
                with torch.no_grad():
                    for weight, mask in keep:
                        weight.mul_(mask)
                losses.append(value)
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return losses


__all__ = ["distillation_kl", "finetune_masked", "sparsity_schedule"]
