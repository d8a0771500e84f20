"""Bad flags, wrong weights and misleading messages: each ends in one `error:` line that names the flag or the file,
exit status 2, and leaves every file that existed before as it was. Start-up checks fail before main.py prints
anything (its first line is the flags as JSON), so before the dataset is scanned."""
import argparse
import contextlib
import io
import math
import re
import shutil

import pytest
import torch

import main
import models
import startup
from failures import SMALL, TINY, assert_one_error, finished_run, small_data, snapshot
from helpers import make_image_folder, run_main


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return small_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def finished(data, tmp_path_factory):
    """A finished 1-epoch run: its output folder."""
    return finished_run(data, tmp_path_factory.mktemp('finished'), '--epochs', 1)


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run, for a test to try to harm."""
    return shutil.copytree(finished, tmp_path / 'run')


# ---------------------------------------------------------------------------------------------------------------
# 1. Every flag checked at start-up
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('flags,expected', [
    (['--epochs', 0], r'--epochs 0 must be at least 1; fix: pass a value >= 1$'),
    (['--clip-grad', -1], r'--clip-grad -1\.0 must be greater than 0; fix: pass e\.g\. 5\.0'),
    (['--drop-path', 1.5], r'--drop-path 1\.5 must be in \[0, 1\)'),
    (['--eval-crop-ratio', 1.2], r'--eval-crop-ratio 1\.2 must be in \(0, 1\]'),
    (['--sched', 'cosin'], r"--sched 'cosin' is not one of cosine, .* \(closest: cosine\)"),
    (['--device', 'cude'], r"--device 'cude' is not a device; fix: pass cpu, cuda or cuda:<index>"),
    (['--opt', 'adamx'], r"--opt 'adamx' is not one of \d+ names \(closest: adamax"),
    (['--opt', 'sgd', '--opt-betas', 0.9, 0.99], r'--opt-betas 0\.9 0\.99: --opt sgd has no betas'),
    (['--aa', 'rand-m9-bogus1'], r'--aa rand-m9-bogus1: timm does not accept it'),
    (['--train-interpolation', 'cubic'], r"--train-interpolation 'cubic' is not one of .*\(closest: bicubic\)"),
    (['--batch-size', 7], r'--batch-size 7: mixup/cutmix pair each image with another, so the batch must be even'),
    (['--input-size', 36], r'--input-size 36: deit_tiny_12 cuts images into 8 px patches, so the size must be a '
                           r'multiple of 8; fix: pass --input-size 32 or 40'),
    (['--input-size', 4], r'--input-size 4: .* multiple of 8; fix: pass --input-size 8'),
    (['--teacher-path', 'teacher.pth'], r'--teacher-path teacher\.pth has no effect without --distillation-type'),
    (['--src'], r'--src has no effect without --ThreeAugment'),
    (['--world_size', 2], r'--world_size 2 needs a launcher .*fix: torchrun --nproc_per_node'),
    (['--start_epoch', 2], r'--start_epoch 2 must be below --epochs 2'),
    (['--eval', '--throughput'], r'--eval and --throughput both choose what the run does'),
    (['--lr-noise', 0.1, 0.2, 0.3], r'--lr-noise 0\.1 0\.2 0\.3: give 1 value .* or 2 .*e\.g\. --lr-noise 0\.4 0\.9'),
    (['--cutmix-minmax', 0.8, 0.2], r'--cutmix-minmax 0\.8 0\.2: give 2 values MIN < MAX in \(0, 1\]'),
    (['--device', 'mps'], r'--device mps: main\.py runs on cpu or cuda; fix: pass --device cpu or --device cuda'),
    (['--device', 'cuda:0'], r'--device cuda but CUDA is not available; pass --device cpu'),
    (['--amp-dtype', 'float16'], r'--amp-dtype float16 needs CUDA; use bfloat16 or float32 on CPU'),
    (['--opt-betas', 0.9], r'--opt-betas 0\.9: --opt adamw takes 2 betas; fix: pass 2 values'),
    (['--sched', 'none'], r'--sched none: main\.py steps a schedule every epoch; fix: .*--sched constant'),
    (['--sched', 'plateau', '--sched-on-updates'], r'--sched plateau steps once an epoch .*fix: drop --sched-on-updates'),
    (['--model-kwargs', 'depth=1', 'num_classes=5'], r'--model-kwargs num_classes=5: main\.py sets num_classes from '
                                                     r'the data set \(its class count\); fix: drop it from --model-kwargs'),
    (['--model-kwargs', 'depth=1', 'foo=3'], r'--model-kwargs foo=3: deit_tiny_12 has no argument foo; fix: drop it'),
    (['--model-kwargs', 'depth=-1'], r'--model deit_tiny_12 --model-kwargs depth=-1: cannot be built \(RuntimeError: '
                                     r'.*\); fix: change --model-kwargs \(every size must be a positive number\)'),
    (['--pretrained'], r'--pretrained: deit_tiny_12 has no pretrained weights \(released: attnscale_small_12, .*\); '
                       r'fix: drop --pretrained, or pass the weights with --finetune <file>'),
    (['--distillation-type', 'hard', '--finetune', 'x.pth'], r'fine-tuning with distillation is not supported; drop '
                                                             r'--distillation-type or --finetune'),
    (['--distillation-type', 'hard'], r'--distillation-type needs --teacher-path \(weights are never downloaded\)'),
    (['--distillation-type', 'hard', '--teacher-path', 't.pth', '--teacher-model', 'regnety_16'],
     r"--teacher-model 'regnety_16' is not a timm model \(closest: regnety_160, "),
])
def test_a_bad_flag_is_one_line_before_anything_happens(data, run_dir, flags, expected):
    before = snapshot(run_dir, data)
    code, out, err = run_main([*TINY, '--data-path', data, '--output_dir', run_dir, '--auto_reload', '--epochs', 2,
                               *flags])
    assert_one_error(code, err, expected)
    assert out == ''  # failed before the run printed its flags, i.e. before the data was scanned
    assert snapshot(run_dir, data) == before


def test_flags_that_need_another_are_refused(data):
    for flags, expected in ((['--auto_reload'], r'--auto_reload has no effect without --output_dir'),
                            (['--eval'], r'--eval needs weights to evaluate; fix: pass --resume'),
                            (['--unsafe-load'], r'--unsafe-load has no effect without a checkpoint to load')):
        code, out, err = run_main([*TINY, '--data-path', data, '--epochs', 1, *flags])
        assert_one_error(code, err, expected)
        assert out == ''


def numeric_flags():
    parser = main.get_args_parser()
    return {a.dest: a for a in parser._actions if a.type in (int, float)}


def test_every_numeric_flag_has_a_range():
    assert set(numeric_flags()) == set(startup.RANGES)


@pytest.mark.parametrize('dest', sorted(startup.RANGES))
def test_every_numeric_flag_out_of_its_range_is_one_line(data, dest):
    accepted, action = startup.RANGES[dest], numeric_flags()[dest]
    step = 1 if action.type is int else 0.5
    bad = (accepted.low if accepted.low_open else accepted.low - step) if math.isfinite(accepted.low) else \
        (accepted.high if accepted.high_open else accepted.high + step)
    code, out, err = run_main([*TINY, '--data-path', data, '--epochs', 1, action.option_strings[0], bad])
    flag = action.option_strings[0]
    assert_one_error(code, err, rf'^error: {flag} {action.type(bad)}(: each value)? must be {re.escape(str(accepted))}')
    assert out == ''


def test_flags_without_effect_in_training_are_warned(data, tmp_path):
    code, out, err = run_main([*TINY, '--data-path', data, '--epochs', 1, '--decay-epochs', 5, '--dist-eval',
                               '--cooldown-epochs', 3])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith('warning:')]
    assert warnings == ['warning: --decay-epochs 5.0: no effect (--sched cosine does not use it)',
                        'warning: --cooldown-epochs 3: no effect (main.py trains exactly --epochs epochs, as DeiT does; '
                        'add the cool-down epochs to --epochs)',
                        'warning: --dist-eval: no effect in a single process']


def test_flags_without_effect_under_eval_are_warned(data, finished, tmp_path):
    code, out, err = run_main([*TINY, '--data-path', data, '--eval', '--resume', finished / 'checkpoint.pth',
                               '--lr', 0.1, '--output_dir', tmp_path / 'out'])
    assert code == 0, err
    assert 'warning: --lr 0.1: no effect with --eval (training flags)' in err.splitlines()
    assert f'warning: --output_dir {tmp_path}/out: --eval writes nothing there' in err.splitlines()
    assert 'Accuracy of the network on the 4 test images' in out


# ---------------------------------------------------------------------------------------------------------------
# 2. Never train or evaluate the wrong weights by accident
# ---------------------------------------------------------------------------------------------------------------

def checkpoint_of(tmp_path, name, **kwargs):
    model = models.create_model(name, **kwargs)
    path = tmp_path / f'{name}.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def test_finetune_from_another_model_is_refused(data, tmp_path):
    swin = checkpoint_of(tmp_path, 'swin_tiny_patch4_window7_224', img_size=32, embed_dim=24, depths=(1, 1),
                         num_heads=(1, 2), window_size=4, num_classes=2)
    before = snapshot(tmp_path)
    code, _, err = run_main([*TINY, '--data-path', data, '--epochs', 1, '--finetune', swin])
    assert_one_error(code, err, rf'--finetune {swin}: only 0% of the weights of deit_tiny_12 fit \(2 of 32 tensors; '
                                r'28 missing: cls_token, pos_embed, .*; it is a checkpoint of another model')
    assert snapshot(tmp_path) == before


def test_finetune_says_what_it_loaded(data, finished):
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(
        [str(a) for a in [*TINY, '--data-path', data, '--finetune', finished / 'checkpoint.pth', '--no-model-ema']])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main.prepare_model(args, 3, torch.device('cpu'))
    assert f'Fine-tuning from {finished}/checkpoint.pth: 30 of 32 tensors loaded (100.0% of the weights); newly ' \
           "initialised: ['head.weight', 'head.bias']; ignored: []" in out.getvalue()


def test_finetune_warns_when_most_of_the_checkpoint_is_unused(data, tmp_path):
    """A deeper CaiT checkpoint of the same width shares DeiT's block names (qkv, proj, mlp), so most of DeiT loads
    from it, but its further blocks, talking-heads projections, layer scales and class-attention blocks are left
    over: a warning says how much of it is unused."""
    cait = models.create_model('cait_xxs24_224', img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=2,
                               num_classes=2)
    path = tmp_path / 'cait.pth'
    torch.save({'model': cait.state_dict()}, path)
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(
        [str(a) for a in [*TINY, '--data-path', data, '--finetune', path, '--no-model-ema']])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        model, _ = main.prepare_model(args, 2, torch.device('cpu'))
    own = model.state_dict()
    used = sum(v.numel() for k, v in cait.state_dict().items() if k in own and own[k].shape == v.shape)
    unused = 1 - used / sum(v.numel() for v in cait.state_dict().values())
    assert unused > 0.5
    assert f'warning: --finetune {path}: {unused:.0%} of its weights are not used' in err.getvalue()


def test_eval_refuses_a_head_it_would_initialise(finished, tmp_path):
    three = make_image_folder(tmp_path / 'three', num_classes=3, train_per_class=1, val_per_class=1)
    before = snapshot(finished)
    code, out, err = run_main([*TINY, '--data-path', three, '--eval', '--finetune', finished / 'checkpoint.pth'])
    assert_one_error(code, err, rf'--eval --finetune {finished}/checkpoint\.pth: head\.weight, head\.bias would be '
                                r'evaluated at their random initialisation')
    assert 'Accuracy' not in out and snapshot(finished) == before


def test_checkpoints_store_class_names_and_eval_compares_them(data, finished, tmp_path):
    assert torch.load(finished / 'checkpoint.pth', weights_only=True)['classes'] == ['class_00', 'class_01']
    renamed = make_image_folder(tmp_path / 'renamed', num_classes=2, train_per_class=1, val_per_class=2)
    for split in ('train', 'val'):
        (renamed / split / 'class_00').rename(renamed / split / 'zebra')
    before = snapshot(finished)
    argv = [*TINY, '--data-path', renamed, '--eval', '--resume', finished / 'checkpoint.pth']
    code, out, err = run_main(argv)
    assert_one_error(code, err, rf'{finished}/checkpoint\.pth was trained on other classes than --data-path '
                                rf"{renamed} holds \(class 0 is 'class_00' there, 'class_01' here\); fix: .*"
                                r'--ignore-class-names')
    assert 'Accuracy' not in out and snapshot(finished) == before
    code, out, err = run_main(argv + ['--ignore-class-names'])  # the rare deliberate case
    assert code == 0 and 'used anyway (--ignore-class-names)' in err and 'Accuracy of the network' in out


# ---------------------------------------------------------------------------------------------------------------
# 6. Messages that name the real cause
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('flag', ['--resume', '--finetune'])
@pytest.mark.parametrize('content,kind', [(b'step,loss\n0,1.2\n', 'a text file'),
                                          (b'\x89PNG\r\n\x1a\n' + bytes(64), 'a PNG image')])
def test_a_file_that_is_no_checkpoint_is_called_so(data, tmp_path, flag, content, kind):
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    for unsafe in ([], ['--unsafe-load']):
        code, out, err = run_main([*TINY, '--data-path', data, '--epochs', 1, flag, path, *unsafe])
        line = assert_one_error(code, err, rf'{flag}: {path} is not a PyTorch checkpoint \(it is {kind}\); fix: pass '
                                           r'a \.pth file')
        assert 'pickled' not in line and out == ''
    assert path.read_bytes() == content


def test_mismatches_name_the_checkpoints_class_count_and_input_size(finished, tmp_path):
    three = make_image_folder(tmp_path / 'three', num_classes=3, train_per_class=1, val_per_class=1)
    ckpt = finished / 'checkpoint.pth'
    before = snapshot(finished)
    code, _, err = run_main([*TINY, '--data-path', three, '--eval', '--resume', ckpt])
    assert_one_error(code, err, rf'{ckpt} does not fit DeiT: it was trained for 2 classes, the model is built for 3')
    code, out, err = run_main([*TINY, '--data-path', three, '--eval', '--resume', ckpt, '--input-size', 48])
    assert_one_error(code, err, rf'{ckpt} does not fit DeiT: it was trained at input size 32 \(4x4 patches of 8 px\), '
                                r'the model is built for 48 \(6x6, --input-size\)')
    assert snapshot(finished) == before


def test_only_the_arguments_a_model_takes_are_passed(data, tmp_path):
    """resnet18 has no img_size: it trains (its drop_path_rate is passed); the add-on is refused for what it is."""
    code, out, err = run_main(['--model', 'resnet18', *SMALL, '--data-path', data, '--epochs', 1,
                               '--drop-path', 0.05, '--output_dir', tmp_path / 'resnet'])
    assert code == 0, err
    assert (tmp_path / 'resnet' / 'checkpoint.pth').is_file()
    code, out, err = run_main(['--model', 'resnet18', *SMALL, '--data-path', data, '--epochs', 1,
                               '--addon', 'attnscale'])
    assert_one_error(code, err, r'--addon attnscale: AttnScale/FeatScale cannot be installed in ResNet')


def test_a_model_without_blocks_is_not_blamed_on_the_addon(data):
    code, _, err = run_main([*TINY, '--data-path', data, '--epochs', 1, '--model-kwargs', 'depth=0'])
    line = assert_one_error(code, err, r'--model-kwargs depth=0: deit_tiny_12 has no attention blocks with these '
                                       r'arguments; fix: give it at least one block')
    assert 'AttnScale' not in line and 'add-on' not in line
