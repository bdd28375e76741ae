"""Distillation losses, each an ``nn.Module`` on aligned tensors, and the weighted combination.

- `ForwardKL`: ``T^2 * KL(p_teacher || p_student)`` on logits softened by a temperature ``T``
  (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"). The ``T^2``
  keeps the gradient scale independent of ``T``. Minitron (Muralidharan et al. 2024, "Compact
  Language Models via Pruning and Knowledge Distillation"; Sreenivas et al. 2024, "LLM Pruning and
  Distillation in Practice") found forward KL on the logits alone the best recovery loss after
  pruning. It also takes the teacher as its top-k logits (`TopKLogits`): the teacher's
  distribution renormalised over its k most likely tokens, the student's log-probabilities over the
  whole vocabulary gathered at those tokens (so the loss stays non-negative).
- `ReverseKL`: ``T^2 * KL(p_student || p_teacher)``, mode-seeking (Gu et al. 2024, MiniLLM).
- `LabelCrossEntropy`: the usual next-token cross-entropy on labels.
- `HiddenStateLoss`: MSE or cosine distance between student and teacher hidden states for a
  list of (student, teacher) layer pairs, through a learned linear projection per pair when the
  widths differ (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020).
- `DistillationLoss`: ``alpha * CE + (1 - alpha) * KD + hidden_weight * hidden`` on the raw
  model outputs; it does the causal shift and masks positions whose label is -100 (padding).

Every term averages over the positions the mask keeps, in float32 whatever the model dtype.
Cost: the KL terms hold a few (batch, seq, vocab) float32 tensors, the largest activation of a
small model's training step; the top-k form needs only (batch, seq, k) from the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


class TopKLogits(NamedTuple):
    """The teacher's k largest logits per position and their token ids."""

    values: Tensor  # (batch, seq, k)
    indices: Tensor  # (batch, seq, k), int64 or int32


def _masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a (batch, seq) tensor over the positions where ``mask`` is true."""
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    # clamp: a batch of padding only gives 0, not NaN.
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim; 0 * log 0 terms count as 0."""
    p = log_p.exp()
    # xlogy-style guard: where p underflows to 0, its term is 0 even if log_q is -inf.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


class _SoftenedKL(nn.Module):
    """A KL divergence between the two models' distributions at temperature T."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature


class ForwardKL(_SoftenedKL):
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over kept positions."""

    def forward(
        self, student_logits: Tensor, teacher: Tensor | TopKLogits, mask: Tensor | None = None
    ) -> Tensor:
        t = self.temperature
        log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # (batch, seq, vocab)
        if isinstance(teacher, TopKLogits):
            log_p = F.log_softmax(teacher.values.float() / t, dim=-1)  # (batch, seq, k)
            log_q = log_q.gather(-1, teacher.indices.long())  # (batch, seq, k)
        else:
            log_p = F.log_softmax(teacher.float() / t, dim=-1)  # (batch, seq, vocab)
        return t * t * _masked_mean(_kl_rows(log_p, log_q), mask)


class ReverseKL(_SoftenedKL):
    """``T^2 * KL(softmax(student / T) || softmax(teacher / T))`` averaged over kept positions."""

    def forward(
        self, student_logits: Tensor, teacher: Tensor | TopKLogits, mask: Tensor | None = None
    ) -> Tensor:
        if isinstance(teacher, TopKLogits):
            raise TypeError("reverse KL needs the teacher's full logits, not its top-k")
        t = self.temperature
        log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # (batch, seq, vocab)
        log_p = F.log_softmax(teacher.float() / t, dim=-1)  # (batch, seq, vocab)
        return t * t * _masked_mean(_kl_rows(log_q, log_p), mask)


class LabelCrossEntropy(nn.Module):
    """Cross-entropy of the logits against labels; positions labelled -100 are ignored."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        # reduction="sum" / count rather than "mean": a batch without any label gives 0, not NaN.
        total = F.cross_entropy(
            logits.float().flatten(0, -2),  # (batch * seq, vocab)
            labels.flatten(),  # (batch * seq,)
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class HiddenStateLoss(nn.Module):
    """Distance between student and teacher hidden states over (student, teacher) layer pairs.

    ``layer_map`` indexes the models' ``hidden_states`` tuples (0 = embedding output, i = output
    of block i). When the widths differ, each pair gets a learned ``Linear(student, teacher)``
    (no bias) applied to the student state; the projections train with the student and are not
    part of the saved student. ``kind="mse"`` averages the squared error over positions and
    features; ``"cosine"`` averages ``1 - cos`` over positions. Pairs are averaged.
    """

    def __init__(
        self,
        layer_map: Sequence[tuple[int, int]],
        student_width: int,
        teacher_width: int,
        kind: str = "cosine",
    ) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"hidden-state loss must be 'mse' or 'cosine', got {kind!r}")
        if not layer_map:
            raise ValueError("hidden-state matching needs at least one (student, teacher) pair")
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        self.kind = kind
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False)
            for _ in self.layer_map
            if student_width != teacher_width
        )

    def forward(
        self,
        student_hidden: Sequence[Tensor],
        teacher_hidden: Sequence[Tensor],
        mask: Tensor | None = None,
    ) -> Tensor:
        terms = []
        for pair, (s, t) in enumerate(self.layer_map):
            student = student_hidden[s].float()  # (batch, seq, student_width)
            if len(self.projections):
                student = self.projections[pair](student)  # (batch, seq, teacher_width)
            teacher = teacher_hidden[t].float()  # (batch, seq, teacher_width)
            if self.kind == "mse":
                per_position = (student - teacher).pow(2).mean(-1)  # (batch, seq)
            else:
                per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # (batch, seq)
            terms.append(_masked_mean(per_position, mask))
        return torch.stack(terms).mean()


class DistillationLoss(nn.Module):
    """``alpha * CE + (1 - alpha) * KD + hidden_weight * hidden`` on unshifted model outputs.

    Takes what a causal LM returns for ``input_ids`` (logits and, when hidden-state matching is
    on, hidden states, both (batch, seq, ...)) and ``labels`` in the Hugging Face convention: the
    input ids themselves with -100 at padding. Logits at position i are scored against label
    i + 1 (CE) and against the teacher's logits at i (KD) wherever label i + 1 is not -100;
    hidden states are matched wherever label i is not -100. Returns the total and each term.
    """

    def __init__(
        self,
        *,
        kd: ForwardKL | ReverseKL | None,
        alpha: float,
        hidden: HiddenStateLoss | None = None,
        hidden_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if kd is None and alpha < 1.0:
            raise ValueError("without a KD loss alpha must be 1 (cross-entropy only)")
        if hidden_weight > 0 and hidden is None:
            raise ValueError("hidden_weight > 0 needs a HiddenStateLoss")
        self.kd = kd
        self.ce = LabelCrossEntropy()
        self.hidden = hidden if hidden_weight > 0 else None
        self.alpha = alpha
        self.hidden_weight = hidden_weight

    @property
    def needs_teacher_logits(self) -> bool:
        return self.kd is not None and self.alpha < 1.0

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden is not None

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | TopKLogits | None = None,
        student_hidden: Sequence[Tensor] | None = None,
        teacher_hidden: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = student_logits[:, :-1]  # (batch, seq - 1, vocab): predicts tokens 1..seq-1
        targets = labels[:, 1:]  # (batch, seq - 1)
        keep = targets != IGNORE_INDEX  # (batch, seq - 1)
        parts: dict[str, Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            parts["ce"] = self.ce(logits, targets)
            total = total + self.alpha * parts["ce"]
        if self.needs_teacher_logits:
            assert self.kd is not None
            if teacher_logits is None:
                raise ValueError("this loss needs the teacher's logits")
            if isinstance(teacher_logits, TopKLogits):
                teacher: Tensor | TopKLogits = TopKLogits(
                    teacher_logits.values[:, :-1], teacher_logits.indices[:, :-1]
                )
            else:
                teacher = teacher_logits[:, :-1]
            parts["kd"] = self.kd(logits, teacher, keep)
            total = total + (1.0 - self.alpha) * parts["kd"]
        if self.hidden is not None:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError("hidden-state matching needs both models' hidden states")
            parts["hidden"] = self.hidden(student_hidden, teacher_hidden, labels != IGNORE_INDEX)
            total = total + self.hidden_weight * parts["hidden"]
        return total, parts
