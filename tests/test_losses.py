"""losses.py: criterion selection and DistillationLoss against hand-computed values."""
import math
from argparse import Namespace

import pytest
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from losses import DistillationLoss, build_criterion


class FixedTeacher(torch.nn.Module):
    """Returns fixed logits whatever the input, and counts its calls."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.logits


def test_build_criterion_selection():
    assert isinstance(build_criterion(Namespace(smoothing=0.1), mixup_active=True), SoftTargetCrossEntropy)
    smooth = build_criterion(Namespace(smoothing=0.1), mixup_active=False)
    assert isinstance(smooth, LabelSmoothingCrossEntropy) and smooth.smoothing == 0.1
    assert type(build_criterion(Namespace(smoothing=0.0), mixup_active=False)) is torch.nn.CrossEntropyLoss
    bce = build_criterion(Namespace(smoothing=0.1, bce_loss=True), mixup_active=True)
    assert isinstance(bce, BinaryCrossEntropy) and bce.smoothing == 0.0
    assert build_criterion(Namespace(smoothing=0.1, bce_loss=True), mixup_active=False).smoothing == 0.1


def test_none_returns_base_loss_and_skips_teacher():
    outputs, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    teacher = FixedTeacher(torch.zeros(2, 2))
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'none', alpha=0.5, tau=1.0)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert loss(None, outputs, labels).item() == pytest.approx(expected, rel=1e-6)
    assert loss(None, (outputs, torch.zeros(2, 2)), labels).item() == pytest.approx(expected, rel=1e-6)
    assert teacher.calls == 0


def test_soft_distillation_matches_hand_computation():
    cls_out = torch.tensor([[1.0, 0.0, -1.0]])
    dist_out = torch.tensor([[0.0, 0.0, 0.0]])
    teacher_logits = torch.tensor([[2.0, 0.0, 0.0]])
    tau, alpha = 2.0, 0.25
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(teacher_logits), 'soft', alpha, tau)
    value = loss(torch.zeros(1, 3, 4, 4), (cls_out, dist_out), torch.tensor([0]))

    p = [math.exp(1.0), 1.0, 1.0]  # teacher softmax at tau=2: logits / 2 = (1, 0, 0)
    p = [v / sum(p) for v in p]
    kl = sum(pi * math.log(pi / (1 / 3)) for pi in p)  # student at tau=2 is uniform
    distill = kl * tau * tau / 3  # numel of the dist output
    base = -math.log(math.exp(1.0) / (math.exp(1.0) + 1 + math.exp(-1.0)))
    assert value.item() == pytest.approx((1 - alpha) * base + alpha * distill, rel=1e-5)


def test_hard_distillation_uses_teacher_argmax():
    cls_out = torch.tensor([[0.0, 3.0]])
    dist_out = torch.tensor([[1.0, 0.0]])
    teacher = FixedTeacher(torch.tensor([[0.0, 5.0]]))  # argmax 1
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'hard', alpha=0.5, tau=1.0)
    value = loss(torch.zeros(1, 3), (cls_out, dist_out), torch.tensor([1]))
    base = math.log(1 + math.exp(-3.0))
    distill = math.log(1 + math.exp(1.0))
    assert value.item() == pytest.approx(0.5 * base + 0.5 * distill, rel=1e-6)
    assert teacher.calls == 1


def test_alpha_weighting_endpoints():
    cls_out, dist_out = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    teacher = FixedTeacher(torch.randn(4, 5))
    base = torch.nn.functional.cross_entropy(cls_out, labels)
    only_base = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.0, tau=1.0)
    assert torch.allclose(only_base(None, (cls_out, dist_out), labels), base)
    only_distill = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'hard', alpha=1.0, tau=1.0)
    expected = torch.nn.functional.cross_entropy(dist_out, teacher.logits.argmax(1))
    assert torch.allclose(only_distill(None, (cls_out, dist_out), labels), expected)


def test_teacher_gets_no_gradient_and_student_does():
    teacher = torch.nn.Linear(3, 2)
    student_dist = torch.randn(2, 2, requires_grad=True)
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5, tau=3.0)
    loss(torch.randn(2, 3), (torch.randn(2, 2), student_dist), torch.tensor([0, 1])).backward()
    assert teacher.weight.grad is None and student_dist.grad is not None


def test_errors():
    with pytest.raises(ValueError, match='needs a model that returns a .class-token, dist-token. tuple'):
        DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(torch.zeros(1, 2)), 'soft', 0.5, 1.0)(
            None, torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown distillation type 'kl'"):
        DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'kl', 0.5, 1.0)
    with pytest.raises(ValueError, match='needs a teacher model'):
        DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'hard', 0.5, 1.0)
