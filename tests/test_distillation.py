"""--distillation-type with a model that has a distillation head (timm's deit_*_distilled_*), a tiny teacher
checkpoint made here (timm's regnety_002, the family of DeiT's teacher), and the start-up error for a model
without a distillation head."""
import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import main
from helpers import free_port, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2',
           'patch_size=8']
FAST = ['--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--mixup', '0', '--cutmix', '0',
        '--reprob', '0', '--aa', 'none', '--eval-crop-ratio', '1.0', '--warmup-epochs', '0', '--lr', '2e-3',
        '--unscale-lr', '--print-freq', '100', '--data-set', 'IMNET', '--no-log-tensorboard', '--device', 'cpu']


def parse(argv) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args([str(a) for a in argv])


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> Path:
    """A regnety_002 checkpoint that predicts class 2 for every image (zero classifier weights, bias 5 on class 2)."""
    model = timm.create_model('regnety_002', num_classes=4)
    with torch.no_grad():
        model.head.fc.weight.zero_()
        model.head.fc.bias.copy_(torch.tensor([0., 0., 5., 0.]))
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def distill_args(data, teacher, *extra):
    return parse([*STUDENT, *FAST, '--data-path', data, '--teacher-model', 'regnety_002', '--teacher-path', teacher,
                  *extra])


def test_hard_distillation_trains_the_dist_head_on_the_teacher_labels(data, teacher):
    """The criterion main.py builds: alpha 1, hard: the loss is the cross-entropy of the distillation head's
    logits against the teacher's argmax (class 2 for every image), the class head is not used. In evaluation the
    model returns the average of its two heads, as DeiT evaluates."""
    args = distill_args(data, teacher, '--distillation-type', 'hard', '--distillation-alpha', '1.0',
                        '--no-model-ema')
    with contextlib.redirect_stdout(io.StringIO()):
        loaders = main.build_data(args)
        model, _ = main.prepare_model(args, loaders.nb_classes, torch.device('cpu'))
        criterion = main.build_training_criterion(args, loaders, torch.device('cpu'))
    assert model.distilled_training and not criterion.teacher_model.training
    assert not any(p.requires_grad for p in criterion.teacher_model.parameters())
    images, labels = next(iter(loaders.loader_train))
    model.train()
    cls_logits, dist_logits = model(images)
    loss = criterion(images, (cls_logits, dist_logits), labels)
    assert loss.item() == pytest.approx(F.cross_entropy(dist_logits, torch.full_like(labels, 2)).item(), rel=1e-6)
    model.eval()
    with torch.no_grad():
        averaged = model(images)
        features = model.forward_features(images)
    assert torch.allclose(averaged, (model.head(features[:, 0]) + model.head_dist(features[:, 1])) / 2, atol=1e-6)


@pytest.mark.slow
def test_soft_distillation_two_processes_one_epoch(data, teacher, tmp_path):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port', str(free_port()),
           'main.py', *STUDENT, *FAST, '--data-path', data, '--teacher-model', 'regnety_002', '--teacher-path', teacher,
           '--distillation-type', 'soft', '--distillation-tau', '2.0', '--epochs', '1', '--output_dir', out]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [entry] = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert entry['epoch'] == 0 and math.isfinite(entry['train_loss']) and 0 <= entry['test_acc1'] <= 100
    state = torch.load(out / 'checkpoint.pth', weights_only=True)['model']
    assert {'dist_token', 'head_dist.weight', 'head.weight'} <= set(state)
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in state)


def test_a_model_without_a_distillation_head_fails_before_reading_data(teacher, tmp_path):
    missing = tmp_path / 'no_data_here'
    args = parse(['--model', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', *FAST, '--data-path', missing,
                  '--distillation-type', 'soft', '--teacher-model', 'regnety_002', '--teacher-path', teacher])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main.main(args)
    assert e.value.code == 2
    assert err.getvalue().strip() == (
        'error: --distillation-type soft needs a model with a distillation head, such as '
        'deit_tiny_distilled_patch16_224; attnscale_tiny_12 has none: pick a *_distilled_* model or drop '
        '--distillation-type')


def test_a_teacher_checkpoint_is_loaded_safely(data, tmp_path):
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': argparse.ArgumentParser}, evil)  # a class: refused by weights_only
    args = distill_args(data, evil, '--distillation-type', 'hard', '--epochs', '1')
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        main.main(args)
    assert err.getvalue().startswith(f'error: checkpoint {evil} was refused by the safe loader')
