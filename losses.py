"""Training losses: the base criterion chosen from the flags, and DeiT's distillation wrapper around it."""
import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

DISTILLATION_TYPES = ('none', 'soft', 'hard')


def build_criterion(args, mixup_active: bool) -> torch.nn.Module:
    """The base criterion, selected as in the official script.

    Mixup/CutMix targets are dense, so they need SoftTargetCrossEntropy; otherwise label smoothing CE when
    `args.smoothing > 0`, else plain CE. `args.bce_loss` (default False) uses timm's BinaryCrossEntropy instead
    (DeiT III), which takes the targets as they come: class indices become one-hot rows smoothed by
    `args.smoothing` (off value smoothing / C, on value 1 - smoothing + smoothing / C); Mixup's soft rows (already
    smoothed by Mixup) are used unchanged. `args.bce_target_thresh` (default None) then sets every target above
    it to 1 and the rest to 0.
    """
    if getattr(args, 'bce_loss', False):
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else args.smoothing,
                                  target_threshold=getattr(args, 'bce_target_thresh', None))
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


class DistillationLoss(torch.nn.Module):
    """`base_criterion` on the class-token output, mixed with a distillation loss on the dist-token output.

    loss = (1 - alpha) * base + alpha * distill, where distill is, against the teacher's logits on the same
    inputs (computed without gradients):
      * 'soft': KL(softmax(teacher / tau) || softmax(student / tau)), summed, * tau^2 / numel (DeiT);
      * 'hard': cross-entropy with the teacher's argmax as label.
    With 'none' it returns the base loss only, and the teacher is never run.
    """

    def __init__(self, base_criterion: torch.nn.Module, teacher_model, distillation_type: str, alpha: float,
                 tau: float):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'unknown distillation type {distillation_type!r}; '
                             f'choose one of {", ".join(DISTILLATION_TYPES)}')
        if distillation_type != 'none' and teacher_model is None:
            raise ValueError(f'--distillation-type {distillation_type} needs a teacher model (--teacher-model)')
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        """`outputs` is the student's logits, or a `(cls_logits, dist_logits)` tuple from a distilled model."""
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none':
            return base_loss
        if outputs_kd is None:
            raise ValueError(f'--distillation-type {self.distillation_type} needs a model that returns a '
                             f'(class-token, dist-token) tuple of logits, such as a *_distilled_* DeiT')
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            distillation_loss = soft_distillation(outputs_kd, teacher_outputs, self.tau)
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft distillation: summed KL divergence at temperature `tau`, * tau^2 / student_logits.numel()."""
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction='sum', log_target=True)
    return kl * (tau * tau) / student_logits.numel()
