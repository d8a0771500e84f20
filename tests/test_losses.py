"""losses.py: criterion selection, the targets --bce-loss trains on, and DistillationLoss against hand-computed
values."""
import json
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import datasets
import models
from engine import train_one_epoch
from helpers import make_image_folder, run_main
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
    assert build_criterion(Namespace(smoothing=0.1, bce_loss=True, bce_target_thresh=0.2),
                           mixup_active=True).target_threshold == 0.2


# ---------------------------------------------------------------------------------------------------------------
# --bce-loss: the targets that reach binary_cross_entropy_with_logits
# ---------------------------------------------------------------------------------------------------------------

class RecordingCriterion(torch.nn.Module):
    """`criterion(samples, outputs, targets)` as main.py calls it (DistillationLoss's signature); keeps the targets."""

    def __init__(self, base):
        super().__init__()
        self.base, self.targets = base, []

    def forward(self, samples, outputs, targets):
        self.targets.append(targets.clone())
        return self.base(outputs, targets)


def one_epoch_targets(criterion, mixup_fn=None):
    """The targets train_one_epoch hands to the criterion, for one batch of labels [0, 1, 2, 0]."""
    labels = torch.tensor([0, 1, 2, 0])
    loader = [(torch.randn(4, 6), labels)]
    model = torch.nn.Linear(6, 3)
    recorder = RecordingCriterion(criterion)
    train_one_epoch(model, recorder, loader, torch.optim.SGD(model.parameters(), lr=0.1), torch.device('cpu'),
                    epoch=0, mixup_fn=mixup_fn, print_freq=100)
    return labels, recorder.targets[0]


def test_bce_without_mixup_trains_on_smoothed_one_hot_rows():
    """Class indices reach the criterion unchanged (no {0, 1} squashing: class 2 stays class 2), and BCE compares
    the logits with one-hot rows smoothed by --smoothing: off value 0.1 / 3, on value 0.9 + 0.1 / 3."""
    bce = build_criterion(Namespace(smoothing=0.1, bce_loss=True), mixup_active=False)
    labels, targets = one_epoch_targets(bce)
    assert torch.equal(targets, labels)
    logits = torch.randn(4, 3)
    rows = torch.full((4, 3), 0.1 / 3).scatter_(1, labels[:, None], 0.9 + 0.1 / 3)
    assert bce(logits, labels).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, rows).item())


def test_bce_with_mixup_and_smoothing_keeps_the_soft_targets():
    """Mixup's rows (two classes mixed, smoothed) reach BCE unchanged: they sum to 1 and are not all ones, as the
    old `targets.gt(0)` made them whenever label smoothing was on."""
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0., label_smoothing=0.1, num_classes=3)
    bce = build_criterion(Namespace(smoothing=0.1, bce_loss=True), mixup_active=True)
    labels, targets = one_epoch_targets(bce, mixup)
    assert targets.shape == (4, 3) and torch.allclose(targets.sum(1), torch.ones(4))
    assert targets.max() < 1 and targets.min() >= 0.1 / 3 - 1e-6
    logits = torch.randn(4, 3)
    assert bce(logits, targets).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, targets).item())


def test_bce_target_threshold_binarises_the_soft_targets():
    bce = build_criterion(Namespace(smoothing=0.1, bce_loss=True, bce_target_thresh=0.2), mixup_active=True)
    targets = torch.tensor([[0.7, 0.25, 0.05], [0.05, 0.05, 0.9]])
    logits = torch.randn(2, 3)
    hard = torch.tensor([[1., 1., 0.], [0., 0., 1.]])
    assert bce(logits, targets).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, hard).item())


def test_bce_run_learns_all_three_classes(tmp_path):
    """main.py --bce-loss on 3 classes: every validation image of every class is classified right, which the old
    squashing (class 0 -> all-zero target, classes 1 and 2 -> the same all-one target) could not reach."""
    data = make_image_folder(tmp_path / 'data', num_classes=3, train_per_class=16, val_per_class=4)
    out = tmp_path / 'out'
    code, stdout, err = run_main([
        '--model', 'deit_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8',
        '--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--mixup', '0', '--cutmix', '0',
        '--reprob', '0', '--aa', 'none', '--eval-crop-ratio', '1.0', '--no-model-ema', '--no-repeated-aug',
        '--warmup-epochs', '1', '--lr', '2e-3', '--unscale-lr', '--print-freq', '100', '--data-set', 'IMNET',
        '--no-log-tensorboard', '--bce-loss', '--smoothing', '0.1', '--epochs', '6', '--data-path', data,
        '--output_dir', out])
    assert code == 0, err
    args = Namespace(data_set='IMNET', data_path=str(data), input_size=32, eval_crop_ratio=1.0)
    val, num_classes = datasets.build_dataset(False, args)
    model = models.create_model('deit_tiny_12', num_classes=3, img_size=32, depth=2, embed_dim=48, num_heads=2,
                                patch_size=8)
    model.load_state_dict(torch.load(out / 'checkpoint.pth', weights_only=True)['model'])
    model.eval()
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    assert predicted == val.targets, (predicted, json.loads((out / 'log.txt').read_text().splitlines()[-1]))


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
