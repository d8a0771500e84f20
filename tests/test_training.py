"""main.py end to end on a generated ImageFolder: 2-process gloo runs, resume, eval, fine-tune, logs."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, make_image_folder, run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']
FAST = ['--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--mixup', '0', '--cutmix', '0',
        '--reprob', '0', '--aa', 'none', '--shift-aug', '0.1', '--eval-crop-ratio', '1.0', '--warmup-epochs', '1',
        '--lr', '2e-3', '--unscale-lr', '--print-freq', '5', '--data-set', 'IMNET']


def run(args, launcher='python', nproc=2, env=None, check=True, timeout=240):
    """Run main.py (plain, `torch.distributed.launch --use_env`, or torchrun) and return the process; with
    launcher='here', main.main() in this process (helpers.run_main), returned the same way."""
    if launcher == 'here':
        code, out, err = run_main(args, env)
        proc = subprocess.CompletedProcess(['main.py', *map(str, args)], code, out, err)
        if check and code != 0:
            raise AssertionError(f'exit {code}\n{out[-3000:]}\n{err[-3000:]}')
        return proc
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env or {}))
    if launcher == 'launch':
        cmd = [sys.executable, '-m', 'torch.distributed.launch', f'--nproc_per_node={nproc}',
               '--master_port', str(free_port()), '--use_env', 'main.py']
    elif launcher == 'torchrun':
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
               '--master_port', str(free_port()), 'main.py']
    else:
        cmd = [sys.executable, 'main.py']
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def eval_summary(stdout):
    """(top-1, loss) of the last '* Acc@1 ... loss ...' line."""
    acc1, loss = re.findall(r'\* Acc@1 ([\d.]+) Acc@5 [\d.]+ loss ([\d.]+)', stdout)[-1]
    return float(acc1), float(loss)


def log_epochs(out):
    return [json.loads(line)['epoch'] for line in (Path(out) / 'log.txt').read_text().splitlines()]


def eval_accuracy(stdout):
    return float(re.findall(r'Accuracy of the network on the \d+ test images: ([\d.]+)%', stdout)[-1])


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """Two epochs with `torch.distributed.launch --use_env`, then one more with --auto_reload under torchrun."""
    out = tmp_path_factory.mktemp('run')
    common = ['--model', 'attnscale_tiny_12', *TINY, *FAST, '--data-path', data, '--output_dir', out]
    first = run(common + ['--epochs', '2', '--auto_reload'], launcher='launch')
    again = run(common + ['--epochs', '3', '--auto_reload'], launcher='torchrun')
    return out, first, again


@pytest.mark.slow
def test_launch_training_writes_logs_and_checkpoints(trained):
    out, first, _ = trained
    assert 'number of params:' in first.stdout and 'number of GFLOPs:' in first.stdout
    assert re.search(r'Epoch: \[1\] \[\s*0/\d+\]  eta: \d+:\d\d:\d\d', first.stdout)
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert set(ckpt) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'max_accuracy', 'args',
                         'classes'}
    assert ckpt['classes'] == ['class_00', 'class_01', 'class_02', 'class_03']
    assert isinstance(ckpt['args'], dict) and ckpt['args']['model'] == 'attnscale_tiny_12'
    assert (out / 'best_checkpoint.pth').exists() and (out / 'checkpoint.prev.pth').exists()
    entry = json.loads((out / 'log.txt').read_text().splitlines()[0])
    assert {'train_loss', 'train_lr', 'test_acc1', 'test_acc5', 'test_loss', 'epoch', 'n_parameters'} <= set(entry)


@pytest.mark.slow
def test_auto_reload_continues_at_the_next_epoch(trained):
    out, _, again = trained
    assert 'distributed init (rank 0/2' in again.stdout  # torchrun's 2 processes
    assert 'training continues at epoch 2' in again.stdout
    assert 'Epoch: [0]' not in again.stdout and 'Epoch: [2]' in again.stdout
    assert log_epochs(out) == [0, 1, 2]
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 2


@pytest.mark.slow
def test_lr_schedule_matches_the_official_stepping(trained):
    """Epoch e trains at lr(e-1): epochs 0 and 1 both at the warmup LR, and resuming changes nothing."""
    out, _, _ = trained
    lrs = [json.loads(line)['train_lr'] for line in (out / 'log.txt').read_text().splitlines()]
    assert lrs[0] == lrs[1] == pytest.approx(1e-6)
    assert lrs[2] > 1e-4  # the cosine phase starts only at epoch 2


@pytest.mark.slow
def test_dist_eval_matches_single_process_accuracy_and_warns_about_padding(trained, data, tmp_path):
    """--dist-eval on 2 processes: 20 validation images split 10 + 10 give the accuracy of the one-process
    evaluation logged by training; 19 images are padded to 20 (DistributedSampler), which the run announces."""
    out, _, _ = trained
    last = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    common = ['--model', 'attnscale_tiny_12', *TINY, *FAST, '--eval', '--dist-eval', '--resume', out / 'checkpoint.pth']
    even = run(common + ['--data-path', data], launcher='launch')
    acc1, acc5 = re.findall(r'\* Acc@1 ([\d.]+) Acc@5 ([\d.]+)', even.stdout)[-1]
    assert float(acc1) == pytest.approx(last['test_acc1'], abs=1e-3)
    assert float(acc5) == pytest.approx(last['test_acc5'], abs=1e-3)
    assert 'does not divide' not in even.stdout

    odd = tmp_path / 'odd'
    shutil.copytree(data, odd)
    sorted((odd / 'val' / 'class_00').iterdir())[0].unlink()
    padded = run(common + ['--data-path', odd], launcher='launch')
    assert 'Warning: the validation set does not divide by the number of processes; distributed evaluation pads ' \
           'it with repeated images' in padded.stdout
    assert 'Accuracy of the network on the 19 test images' in padded.stdout


@pytest.mark.slow
def test_tensorboard_holds_the_expected_tags(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = trained
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/loss',
            'lambda/attnscale/block0', 'lambda/attnscale/block1'} <= tags
    assert [e.step for e in acc.Scalars('test/acc1')][-3:] == [0, 1, 2]


@pytest.mark.slow
def test_launch_without_use_env_passes_local_rank_and_eval_resume_reproduces_the_last_test_accuracy(trained, data):
    out, _, _ = trained
    last = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
                           '--master_port', str(free_port()), 'main.py', '--model', 'attnscale_tiny_12', *TINY, *FAST,
                           '--data-path', str(data), '--eval', '--resume', str(out / 'checkpoint.pth')], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'Accuracy of the network on the 20 test images' in proc.stdout
    assert eval_accuracy(proc.stdout) == pytest.approx(last['test_acc1'], abs=0.05)


@pytest.mark.slow
def test_cait_finetune_from_a_module_prefixed_baseline(data, tmp_path):
    """Both add-ons on a CaiT checkpoint whose keys carry DDP's `module.` prefix: before any step the add-on model
    evaluates exactly as the baseline, and fine-tuning writes the add-on's gains (FeatScale with 2 processes,
    AttnScale in one)."""
    import timm
    import models  # noqa: F401  (registers the variants)
    kwargs = dict(depth=2, img_size=32, patch_size=8, num_classes=4)
    baseline = timm.create_model('cait_XXS24_224', **kwargs)
    path = tmp_path / 'cait_baseline.pth'
    torch.save({'model': {f'module.{k}': v for k, v in baseline.state_dict().items()}}, path)
    cait = ['--model-kwargs', 'depth=2', 'patch_size=8', *FAST, '--data-path', data]
    base = run(['--model', 'cait_XXS24_224', *cait, '--eval', '--resume', path], launcher='here')
    for variant, launcher, gain in (('attnscale_cait_XXS24_224', 'here', 'attn.lamb'),
                                    ('featscale_cait_XXS24_224', 'launch', 'lamb1')):
        tuned = run(['--model', variant, *cait, '--eval', '--resume', path], launcher='here')
        assert 'add-on parameters start at zero' in tuned.stdout
        losses = [re.findall(r'\* Acc@1 ([\d.]+) Acc@5 [\d.]+ loss ([\d.]+)', p.stdout)[-1] for p in (base, tuned)]
        assert losses[0] == losses[1]  # before any step, the add-on model computes the baseline
        out = tmp_path / variant
        run(['--model', variant, *cait, '--epochs', '1', '--output_dir', out, '--resume', path, '--auto_reload'],
            launcher=launcher)
        assert log_epochs(out) == [0]
        state = torch.load(out / 'checkpoint.pth', weights_only=True)['model']
        assert any(k.endswith(gain) for k in state)


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(data, tmp_path):
    proc = run(['--model', 'deit_tiny_12', *TINY, *FAST, '--data-path', data, '--output_dir', tmp_path,
                '--epochs', '1', '--lr', '1e30', '--warmup-epochs', '0'], launcher='launch', check=False)
    assert proc.returncode != 0
    assert re.search(r'error: loss is (nan|inf) at epoch 0; lower --lr', proc.stderr)


@pytest.mark.parametrize('name,flags,train', [
    pytest.param('bfloat16', ['--amp-dtype', 'bfloat16'], ['--amp-dtype', 'bfloat16'], id='bfloat16'),
    pytest.param('compile', ['--compile'], ['--compile', '--compile-backend', 'aot_eager'], id='compile',
                 marks=pytest.mark.slow)])
def test_bfloat16_and_compile_train_and_evaluate(data, tmp_path, name, flags, train):
    """A training epoch and an evaluation with the flag: the checkpoint holds the plain model's keys, and its
    evaluation with the flag agrees with the float32 eager one (bfloat16: to bfloat16's precision).

    bfloat16 trains in one process, which logs its one epoch, starts no process group and, with
    --no-log-tensorboard, writes no event file. --compile trains on 2 processes: the DDP module is compiled
    (timm's order) and the checkpoint still has plain keys; that run traces through aot_eager, the evaluation
    compiles with the default backend (inductor), whose code must give the eager accuracy and loss."""
    common = ['--model', 'attnscale_tiny_12', *TINY, *FAST, '--data-path', data, '--no-model-ema',
              '--no-log-tensorboard']
    out = tmp_path / name
    proc = run(common + ['--epochs', '1', '--output_dir', out, *train],
               launcher='launch' if name == 'compile' else 'here', timeout=500)
    stats = json.loads((out / 'log.txt').read_text())
    assert stats['epoch'] == 0 and math.isfinite(stats['train_loss']) and math.isfinite(stats['test_loss'])
    assert ('distributed init (rank 0/2' in proc.stdout) == (name == 'compile')
    assert not list(out.glob('events.out.tfevents.*'))
    state = torch.load(out / 'checkpoint.pth', weights_only=True)['model']
    assert 'blocks.0.attn.lamb' in state and not any(k.startswith('_orig_mod.') for k in state)
    resume = ['--eval', '--resume', out / 'checkpoint.pth']
    acc_ref, loss_ref = eval_summary(run(common + resume, launcher='here').stdout)
    acc, loss = eval_summary(run(common + resume + flags, launcher='python' if name == 'compile' else 'here',
                                 timeout=400).stdout)
    if name == 'compile':
        assert acc == acc_ref and abs(loss - loss_ref) <= 1e-3
    else:
        assert abs(loss - loss_ref) <= 0.05


def test_evaluate_under_bfloat16_autocast_computes_in_bfloat16():
    import timm
    import engine
    import models  # noqa: F401  (registers the variants)
    torch.manual_seed(0)
    model = timm.create_model('attnscale_tiny_12', depth=2, img_size=32, patch_size=8, num_classes=4)
    loader = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))]
    fp32, bf16 = (engine.evaluate(loader, model, torch.device('cpu'), dtype) for dtype in (torch.float32,
                                                                                           torch.bfloat16))
    assert bf16['loss'] != fp32['loss'] and abs(bf16['loss'] - fp32['loss']) < 0.05
