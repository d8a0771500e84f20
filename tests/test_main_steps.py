"""The steps of main.run, in this process: arguments never change, the learning-rate rule, weight-decay groups,
fine-tuning, --throughput, loaders, and checkpoint I/O (each file read once on resume, best_checkpoint.pth not
serialised a second time)."""
import argparse
import contextlib
import copy
import io
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F

import main
import utils
from helpers import make_image_folder

TINY = ['--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']
FAST = ['--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--mixup', '0', '--cutmix', '0',
        '--reprob', '0', '--aa', 'none', '--eval-crop-ratio', '1.0', '--warmup-epochs', '1', '--print-freq', '100',
        '--data-set', 'IMNET', '--no-log-tensorboard', '--device', 'cpu']


def parse(argv) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args([str(a) for a in argv])


def run_main(args):
    """main.main(args) here: (exit status, stdout, stderr); the SIGTERM handler it installs is undone."""
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main.main(args)
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


def test_scaled_lr_is_deits_linear_rule():
    args = argparse.Namespace(lr=5e-4, batch_size=64, unscale_lr=False)
    assert main.scaled_lr(args, 8) == pytest.approx(5e-4)  # 64 x 8 = 512: the paper's setting
    assert main.scaled_lr(args, 2) == pytest.approx(1.25e-4)
    assert main.scaled_lr(argparse.Namespace(lr=5e-4, batch_size=256, unscale_lr=False), 16) == pytest.approx(4e-3)
    assert main.scaled_lr(argparse.Namespace(lr=5e-4, batch_size=256, unscale_lr=True), 16) == 5e-4


def test_main_never_changes_args_so_a_requeued_run_scales_the_lr_once(data, monkeypatch):
    """A submitit job requeued before its first checkpoint calls main(args) again with the same object: it must
    train at the same learning rate, not at the rate scaled twice."""
    seen = []
    build_optimizer = main.build_optimizer

    def spy(args, model, lr):
        seen.append(lr)
        return build_optimizer(args, model, lr)
    monkeypatch.setattr(main, 'build_optimizer', spy)
    args = parse(['--model', 'deit_tiny_12', *TINY, *FAST, '--data-path', data, '--epochs', 1, '--lr', 5e-4])
    parsed = copy.deepcopy(vars(args))
    for _ in range(2):
        code, out, err = run_main(args)
        assert code == 0, err
        assert 'learning rate: 7.8125e-06 (--lr 0.0005 x 8 x 1 / 512)' in out
        assert vars(args) == parsed
    assert seen == [pytest.approx(5e-4 * 8 / 512)] * 2


def test_weight_decay_spares_every_lambda_and_the_tokens():
    """AdamW groups: every AttnScale/FeatScale lambda, pos_embed, cls_token (dist_token), biases and norms get no
    weight decay; every other weight gets --weight-decay."""
    import models  # noqa: F401  (registers the variants)
    args = parse(['--weight-decay', '0.05'])
    kwargs = dict(depth=2, embed_dim=48, num_heads=2, patch_size=8, img_size=32, num_classes=4)
    for name in ('attnscale_tiny_12', 'featscale_tiny_12', 'deit_tiny_distilled_patch16_224'):
        model = main.models.create_model(name, **kwargs)
        optimizer = main.build_optimizer(args, model, 1e-3)
        decay = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
        by_name = {n: decay[id(p)] for n, p in model.named_parameters()}
        assert len(by_name) == len(decay)  # every parameter is optimised, once
        no_decay = {n for n, wd in by_name.items() if wd == 0}
        lambdas = {n for n in by_name if re.search(r'\.(lamb|lamb1|lamb2)$', n)}
        assert lambdas == ({'blocks.0.attn.lamb', 'blocks.1.attn.lamb'} if name.startswith('attnscale') else
                           {'blocks.0.lamb1', 'blocks.0.lamb2', 'blocks.1.lamb1', 'blocks.1.lamb2'}
                           if name.startswith('featscale') else set())
        tokens = {'pos_embed', 'cls_token'} | ({'dist_token'} if 'distilled' in name else set())
        assert lambdas | tokens <= no_decay
        assert no_decay == {n for n, p in model.named_parameters() if p.ndim <= 1} | tokens
        assert {wd for n, wd in by_name.items() if n not in no_decay} == {0.05}
        assert 'blocks.0.attn.qkv.weight' not in no_decay and 'head.weight' not in no_decay


def test_finetune_resizes_pos_embed_and_drops_a_head_of_another_size(tmp_path, data):
    """A 32 px, 10-class checkpoint fine-tuned at 48 px on 4 classes: the 4x4 position grid is resized to 6x6
    (bicubic, class token kept), the head starts afresh, every other weight comes from the checkpoint."""
    source = main.models.create_model('attnscale_tiny_12', depth=2, embed_dim=48, num_heads=2, patch_size=8,
                                      img_size=32, num_classes=10)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / 'source.pth'
    torch.save({'model': source.state_dict()}, path)
    args = parse(['--model', 'attnscale_tiny_12', *TINY, *FAST, '--input-size', 48, '--data-path', data,
                  '--finetune', path, '--no-model-ema'])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        model, _ = main.prepare_model(args, 4, torch.device('cpu'))
    assert "Removing key head.weight from the fine-tune checkpoint" in out.getvalue()
    assert "newly initialised: ['head.weight', 'head.bias']" in out.getvalue()
    fresh = main.models.create_model('attnscale_tiny_12', depth=2, embed_dim=48, num_heads=2, patch_size=8,
                                     img_size=48, num_classes=4)
    assert model.head.weight.shape == (4, 48) and not torch.equal(model.head.weight[:4], source.head.weight[:4])
    assert torch.equal(model.head.bias, fresh.head.bias)  # zeros, as initialised
    grid = source.pos_embed[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode='bicubic', antialias=True).permute(0, 2, 3, 1)  # timm's
    assert model.pos_embed.shape == (1, 37, 48)
    assert torch.equal(model.pos_embed[:, :1], source.pos_embed[:, :1])
    torch.testing.assert_close(model.pos_embed[:, 1:], expected.reshape(1, 36, 48), atol=1e-5, rtol=1e-5)
    own = model.state_dict()
    for key, value in source.state_dict().items():
        if key not in ('pos_embed', 'head.weight', 'head.bias'):
            assert torch.equal(own[key], value), key

    code, out, err = run_main(argparse.Namespace(**dict(vars(args), eval=True)))  # --eval refuses the new head
    assert code == 2 and 'head.weight, head.bias would be evaluated at their random initialisation' in err, err
    assert 'Accuracy of the network' not in out and 'Removing key head.bias' in out


def test_training_state_saves_and_restores_the_same_entries(data):
    """TrainingState is the one definition of a checkpoint: what state_dict() writes, load_state_dict() (plus the
    model weights, which restore() loads) puts back, entry for entry."""
    def state_for(args):
        with contextlib.redirect_stdout(io.StringIO()):
            model, ema = main.prepare_model(args, 4, torch.device('cpu'))
            optimizer, scheduler, _ = main.build_optimization(args, model, torch.float32, steps_per_epoch=4)
        return main.TrainingState(model, ema, optimizer, scheduler, None, run_args=dict(vars(args), world_size=1))
    args = parse(['--model', 'attnscale_tiny_12', *TINY, *FAST, '--data-path', data])
    torch.manual_seed(0)
    saved = state_for(args)
    saved.model(torch.randn(2, 3, 32, 32)).sum().backward()
    saved.optimizer.step()
    saved.model_ema.update(saved.model)
    saved.lr_scheduler.step(3)
    saved.epoch, saved.max_accuracy = 3, 42.5
    ckpt = saved.state_dict(resume_step=2)
    assert set(ckpt) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'max_accuracy',
                         'args', 'resume_step'}
    torch.manual_seed(1)
    restored = state_for(args)
    restored.model.load_state_dict(ckpt['model'])
    restored.load_state_dict(ckpt)
    again = restored.state_dict(resume_step=2)
    assert (again['epoch'], again['max_accuracy'], again['args']) == (3, 42.5, ckpt['args'])
    assert again['lr_scheduler'] == ckpt['lr_scheduler']
    for part in ('model', 'model_ema'):
        assert all(torch.equal(again[part][k], v) for k, v in ckpt[part].items()), part
    for a, b in zip(again['optimizer']['state'].values(), ckpt['optimizer']['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert again['optimizer']['param_groups'] == ckpt['optimizer']['param_groups']


def test_throughput_measures_inference_on_one_validation_batch(data, tmp_path):
    out_dir = tmp_path / 'out'
    code, out, err = run_main(parse(['--model', 'deit_tiny_12', *TINY, *FAST, '--data-path', data, '--throughput',
                                     '--output_dir', out_dir]))
    assert code == 0, err
    rate = re.findall(r'^batch_size 12 throughput ([\d.]+) images/s$', out, re.M)  # int(1.5 x --batch-size)
    assert len(rate) == 1 and float(rate[0]) > 0
    assert 'Start training' not in out and 'Accuracy of the network' not in out
    assert not list(out_dir.iterdir())  # nothing written


def test_validation_workers_do_not_persist(data):
    args = parse(['--model', 'deit_tiny_12', *FAST, '--data-path', data, '--num_workers', 2])
    loaders = main.build_data(args)
    assert loaders.loader_train.persistent_workers and loaders.loader_train.num_workers == 2
    assert not loaders.loader_val.persistent_workers and loaders.loader_val.num_workers == 2
    assert loaders.loader_val.batch_size == 12 and loaders.steps_per_epoch == 6  # 48 images / 8


def test_resume_reads_each_checkpoint_once_and_best_is_the_written_file(data, tmp_path, monkeypatch):
    saves, loads = [], []
    torch_save, torch_load = torch.save, torch.load
    monkeypatch.setattr(torch, 'save', lambda obj, f, *a, **k: saves.append(getattr(f, 'name', f))
                        or torch_save(obj, f, *a, **k))
    monkeypatch.setattr(torch, 'load', lambda f, *a, **k: loads.append(str(f)) or torch_load(f, *a, **k))
    common = ['--model', 'deit_tiny_12', *TINY, *FAST, '--data-path', data, '--output_dir', tmp_path,
              '--auto_reload', '--lr', '2e-3', '--unscale-lr']
    code, out, err = run_main(parse(common + ['--epochs', 1]))
    assert code == 0, err
    assert [os.path.basename(s).split('.tmp.')[0] for s in saves] == ['checkpoint.pth']  # best: no second write
    best, latest = tmp_path / 'best_checkpoint.pth', tmp_path / 'checkpoint.pth'
    assert os.path.samefile(best, latest)  # a hard link to the file just written

    saves.clear()
    code, out, err = run_main(parse(common + ['--epochs', 2]))
    assert code == 0, err
    assert 'training continues at epoch 1' in out
    assert loads == [str(latest)]  # read once, by this (only) rank
    assert torch_load(tmp_path / 'checkpoint.prev.pth', weights_only=True)['epoch'] == 0
    if (tmp_path / 'best_checkpoint.prev.pth').exists():  # epoch 1 improved: best moved on with it
        assert os.path.samefile(best, latest)
    else:
        assert os.path.samefile(best, tmp_path / 'checkpoint.prev.pth')


def test_publish_copy_links_or_copies_atomically_and_keeps_the_previous_file(tmp_path, monkeypatch):
    src, dst = tmp_path / 'checkpoint.pth', tmp_path / 'best_checkpoint.pth'
    src.write_bytes(b'epoch 0')
    utils.publish_copy(str(src), str(dst))
    assert os.path.samefile(src, dst)

    def no_links(a, b):
        raise OSError(95, 'Operation not supported')
    monkeypatch.setattr(os, 'link', no_links)
    src.unlink()
    src.write_bytes(b'epoch 1')
    utils.publish_copy(str(src), str(dst))
    assert dst.read_bytes() == b'epoch 1' and not os.path.samefile(src, dst)
    assert (tmp_path / 'best_checkpoint.prev.pth').read_bytes() == b'epoch 0'
    assert {p.name for p in tmp_path.iterdir()} == {'best_checkpoint.pth', 'best_checkpoint.prev.pth',
                                                    'checkpoint.pth'}  # no temporary file left
