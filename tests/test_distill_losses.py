"""Each distillation loss against a value worked out by hand on a two- or four-token vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from swiss_knife.compression.distillation.losses import (
    DistillationLoss,
    ForwardKL,
    HiddenStateLoss,
    LabelCrossEntropy,
    ReverseKL,
    TopKLogits,
)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


# Teacher logits (ln 3, 0) give p = (3/4, 1/4); student logits (0, 0) give q = (1/2, 1/2).
TEACHER = torch.tensor([[[math.log(3.0), 0.0]]])  # (1, 1, 2)
STUDENT = torch.zeros(1, 1, 2)


def test_forward_kl_at_temperature_one() -> None:
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert expected == pytest.approx(0.1308120, abs=1e-6)
    assert float(ForwardKL(1.0)(STUDENT, TEACHER)) == pytest.approx(expected, abs=1e-6)


def test_forward_kl_softens_and_scales_by_t_squared() -> None:
    # At T = 2 the teacher logits halve: p = (sqrt 3, 1) / (sqrt 3 + 1); q stays uniform.
    s3 = math.sqrt(3.0)
    p = [s3 / (s3 + 1), 1 / (s3 + 1)]
    expected = 4.0 * kl(p, [0.5, 0.5])
    assert expected == pytest.approx(0.145363, abs=1e-6)
    assert float(ForwardKL(2.0)(STUDENT, TEACHER)) == pytest.approx(expected, abs=1e-6)


def test_reverse_kl() -> None:
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(ReverseKL(1.0)(STUDENT, TEACHER)) == pytest.approx(expected, abs=1e-6)
    # Not symmetric: this is a different number from the forward KL.
    assert abs(expected - float(ForwardKL(1.0)(STUDENT, TEACHER))) > 0.01
    with pytest.raises(TypeError, match="full logits"):
        ReverseKL()(STUDENT, TopKLogits(TEACHER, torch.zeros(1, 1, 2, dtype=torch.long)))


def test_kl_is_zero_for_identical_and_masks_positions() -> None:
    logits = torch.randn(2, 3, 5)
    assert float(ForwardKL(1.5)(logits, logits.clone())) == pytest.approx(0.0, abs=1e-6)
    # Position (0, 0) differs, everything else agrees: masking it out leaves exactly 0, and
    # with it the mean is its KL divided by the 6 positions.
    teacher = logits.clone()
    teacher[0, 0] = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0])
    student = logits.clone()
    student[0, 0] = 0.0
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    assert float(ForwardKL()(student, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    z = math.exp(3.0) + 4
    p = [math.exp(3.0) / z] + [1 / z] * 4
    assert float(ForwardKL()(student, teacher)) == pytest.approx(kl(p, [0.2] * 5) / 6, abs=1e-6)


def test_forward_kl_from_top_k() -> None:
    # Teacher (2, 1, 0, -1), k = 2: p renormalised over tokens 0 and 1 = softmax(2, 1);
    # the student's uniform log-probabilities over all four tokens are ln 1/4.
    teacher = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    top = teacher.topk(2, dim=-1)
    topk = TopKLogits(top.values, top.indices)
    e = math.e
    p = [e / (e + 1), 1 / (e + 1)]
    expected = sum(pi * math.log(pi / 0.25) for pi in p)
    assert expected == pytest.approx(0.804093, abs=1e-5)
    assert float(ForwardKL()(torch.zeros(1, 1, 4), topk)) == pytest.approx(expected, abs=1e-6)
    # With k = the whole vocabulary it is the full forward KL.
    student = torch.randn(2, 3, 6)
    full = torch.randn(2, 3, 6)
    every = full.topk(6, dim=-1)
    assert float(ForwardKL(2.0)(student, TopKLogits(every.values, every.indices))) == (
        pytest.approx(float(ForwardKL(2.0)(student, full)), abs=1e-5)
    )


def test_label_cross_entropy_ignores_minus_100() -> None:
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # (1, 2, 2)
    labels = torch.tensor([[0, -100]])
    assert float(LabelCrossEntropy()(logits, labels)) == pytest.approx(-math.log(0.75), abs=1e-6)
    both = torch.tensor([[0, 1]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(LabelCrossEntropy()(logits, both)) == pytest.approx(expected, abs=1e-6)
    assert float(LabelCrossEntropy()(logits, torch.full((1, 2), -100))) == 0.0


def test_hidden_state_mse_and_cosine() -> None:
    student = (torch.tensor([[[1.0, 2.0]]]),)  # one state, (1, 1, 2)
    teacher = (torch.tensor([[[1.0, 0.0]]]),)
    mse = HiddenStateLoss([(0, 0)], 2, 2, "mse")
    assert float(mse(student, teacher)) == pytest.approx((0 + 4) / 2, abs=1e-6)
    cosine = HiddenStateLoss([(0, 0)], 2, 2, "cosine")
    assert float(cosine(student, teacher)) == pytest.approx(1 - 1 / math.sqrt(5), abs=1e-6)
    assert len(mse.projections) == 0  # same width: nothing to learn


def test_hidden_state_projection_when_widths_differ() -> None:
    loss = HiddenStateLoss([(1, 0), (0, 1)], 2, 3, "mse")
    assert len(loss.projections) == 2
    with torch.no_grad():
        loss.projections[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        loss.projections[1].weight.zero_()
    student = (torch.tensor([[[5.0, 5.0]]]), torch.tensor([[[1.0, 2.0]]]))  # states 0 and 1
    teacher = (torch.tensor([[[1.0, 2.0, 0.0]]]), torch.tensor([[[3.0, 0.0, 0.0]]]))
    # Pair (1, 0): W @ (1, 2) = (1, 2, 3) vs (1, 2, 0) -> 9 / 3 = 3.
    # Pair (0, 1): 0 vs (3, 0, 0) -> 9 / 3 = 3.
    value = loss(student, teacher)
    assert float(value.detach()) == pytest.approx(3.0, abs=1e-6)
    value.backward()
    assert loss.projections[0].weight.grad is not None  # the projections learn


def test_combined_loss_shifts_weights_and_masks() -> None:
    torch.manual_seed(0)
    student = torch.randn(1, 4, 5)
    teacher = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 3, 2, -100]])  # the last position is padding
    s_hidden = (torch.randn(1, 4, 2),)
    t_hidden = (torch.randn(1, 4, 2),)
    combined = DistillationLoss(
        kd=ForwardKL(2.0),
        alpha=0.25,
        hidden=HiddenStateLoss([(0, 0)], 2, 2, "mse"),
        hidden_weight=0.5,
    )
    total, parts = combined(student, labels, teacher, s_hidden, t_hidden)
    # Logits at 0, 1 predict labels 1, 2 (3 and 2); position 2 predicts padding: ignored.
    ce = LabelCrossEntropy()(student[:, :2], labels[:, 1:3])
    kd = ForwardKL(2.0)(student[:, :2], teacher[:, :2])
    hidden = ((s_hidden[0][:, :3] - t_hidden[0][:, :3]) ** 2).mean()
    assert float(parts["ce"]) == pytest.approx(float(ce), abs=1e-6)
    assert float(parts["kd"]) == pytest.approx(float(kd), abs=1e-6)
    assert float(parts["hidden"]) == pytest.approx(float(hidden), abs=1e-6)
    assert float(total) == pytest.approx(0.25 * float(ce) + 0.75 * float(kd) + 0.5 * float(hidden))


def test_combined_loss_configurations() -> None:
    logits = torch.randn(2, 3, 4)
    labels = torch.randint(0, 4, (2, 3))
    ce_only = DistillationLoss(kd=None, alpha=1.0)
    assert not ce_only.needs_teacher_logits and not ce_only.needs_hidden_states
    total, parts = ce_only(logits, labels)
    assert set(parts) == {"ce"} and float(total) == float(parts["ce"])
    with pytest.raises(ValueError, match="teacher's logits"):
        DistillationLoss(kd=ForwardKL(), alpha=0.0)(logits, labels)
    with pytest.raises(ValueError, match="alpha must be 1"):
        DistillationLoss(kd=None, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        ForwardKL(0.0)
