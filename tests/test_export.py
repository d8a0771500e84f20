"""scripts/export_weights.py writes a checkpoint as model.safetensors + config.json in timm's Hub format, which timm
reloads with the same logits; main.py (--resume, --eval --resume, --finetune) and analyze.py read .safetensors."""
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants

import models
from helpers import make_image_folder
from helpers import run_main as run_main_here
from models.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAME = 'attnscale_tiny_12'
MODEL_KWARGS = ['patch_size=8', 'depth=2']
LAMB = torch.tensor([0.5, -0.25, 1.0])

spec = importlib.util.spec_from_file_location('export_weights', ROOT / 'scripts' / 'export_weights.py')
export_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_weights)


def tiny_model(name=NAME, num_classes=4):
    return models.create_model(name, num_classes=num_classes, img_size=32, **models.parse_model_kwargs(MODEL_KWARGS))


@pytest.fixture
def checkpoint(tmp_path):
    """A main.py training checkpoint of a 4-class model with trained AttnScale lambdas and an EMA copy."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.blocks[-1].attn.lamb.copy_(LAMB)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path / 'checkpoint.pth'
    torch.save(dict(model=model.state_dict(), model_ema=ema, optimizer={}, lr_scheduler={}, epoch=7, scaler=None,
                    max_accuracy=50.0, args=dict(model=NAME, input_size=32, model_kwargs=MODEL_KWARGS, nb_classes=4)),
               path)
    return path, model, ema


def test_export_then_reload_gives_equal_logits(checkpoint, tmp_path, capsys):
    path, model, _ = checkpoint
    out = tmp_path / 'exported'
    assert export_weights.main(['--checkpoint', str(path), '--output', str(out)]) == 0
    assert capsys.readouterr().out == (f'wrote {out}/model.safetensors (model weights, 34 tensors) and '
                                       f'{out}/config.json ({NAME}, 4 classes)\n')
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert (config['architecture'], config['num_classes']) == (NAME, 4)
    assert {k: config['model_args'][k] for k in ('patch_size', 'depth', 'img_size', 'num_classes')} == \
        dict(patch_size=8, depth=2, img_size=[32, 32], num_classes=4)
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and config['pretrained_cfg']['num_classes'] == 4
    assert 'hf_hub_id' not in config['pretrained_cfg']

    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    by_folder = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    by_file = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')),
                                img_size=32, **models.parse_model_kwargs(MODEL_KWARGS)).eval()
    for reloaded in (by_folder, by_file):
        assert torch.equal(reloaded.blocks[-1].attn.lamb, LAMB)
        assert torch.equal(reloaded(x), expected)


def test_export_ema_weights(checkpoint, tmp_path):
    path, _, ema = checkpoint
    assert export_weights.main(['--checkpoint', str(path), '--output', str(tmp_path / 'ema'), '--ema']) == 0
    written = safetensors.torch.load_file(tmp_path / 'ema' / 'model.safetensors')
    assert written.keys() == ema.keys() and all(torch.equal(written[k], v) for k, v in ema.items())


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
    path, model, _ = checkpoint
    no_ema = tmp_path / 'no_ema.pth'
    torch.save({'model': model.state_dict(), 'model_ema': None, 'args': {'model': NAME}}, no_ema)
    for argv, message in (
            (['--checkpoint', str(path), '--model', 'featscale_tiny_12'], f'{path} does not fit DeiT (4 missing: '
                                                                           'blocks.0.lamb1, blocks.0.lamb2'),
            (['--checkpoint', str(no_ema), '--ema'], f'{no_ema} holds no EMA weights (model_ema); drop --ema'),
            (['--checkpoint', str(tmp_path / 'absent.pth')], 'absent.pth does not exist'),
            (['--checkpoint', str(path), '--model', 'attnscale_tiny_13'], "unknown model 'attnscale_tiny_13'")):
        assert export_weights.main(argv + ['--output', str(tmp_path / 'never')]) == 2
        err = capsys.readouterr().err
        assert err.startswith('export_weights.py: error: ') and message in err and err.count('\n') == 1, err
    assert not (tmp_path / 'never').exists()


def test_safetensors_files_read_like_checkpoints(checkpoint, tmp_path):
    _, model, _ = checkpoint
    path = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    state = load_checkpoint(str(path))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf'^checkpoint {path} is corrupt or truncated \(.*\); delete it'):
        load_checkpoint(str(path))


def test_finetune_from_safetensors_drops_a_head_of_another_size(checkpoint, tmp_path):
    import main
    _, model, _ = checkpoint
    path = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    target = tiny_model(num_classes=3)
    main.load_finetune(target, str(path), unsafe=False)
    assert torch.equal(target.blocks[-1].attn.lamb, LAMB) and target.head.weight.shape == (3, 192)
    assert torch.equal(target.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_analyze_reads_safetensors(checkpoint, tmp_path):
    import analyze
    _, model, _ = checkpoint
    path = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=1, val_per_class=2)
    argv = ['--model', NAME, '--model-kwargs', *MODEL_KWARGS, '--input-size', '32', '--resume', str(path),
            '--data-path', str(data), '--num-images', '2', '--batch-size', '2', '--device', 'cpu',
            '--output_dir', str(tmp_path / 'out')]
    assert analyze.main(argv) == 0
    entry = json.loads((tmp_path / 'out' / 'diagnostics.json').read_text())['models'][0]
    assert (entry['checkpoint'], entry['random_init'], entry['num_classes']) == (str(path), False, 4)
    assert entry['addon_params']['attnscale_lambda']['values'][-1] == LAMB.tolist()


# ---------------------------------------------------------------- main.py with an exported file

@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub offline in this process, as HF_HUB_OFFLINE=1 makes it in a new one: nothing downloads."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)


def run_main(args):
    """main.py with `args`, in this process (helpers.run_main); it must succeed."""
    code, out, err = run_main_here(args)
    assert code == 0, err[-3000:]
    return subprocess.CompletedProcess(['main.py', *map(str, args)], code, out, err)


@pytest.fixture
def exported(checkpoint, tmp_path, offline):
    path, _, _ = checkpoint
    assert export_weights.main(['--checkpoint', str(path), '--output', str(tmp_path / 'exported')]) == 0
    data = make_image_folder(tmp_path / 'data', num_classes=4, train_per_class=4, val_per_class=3, size=32)
    common = ['--model', NAME, '--model-kwargs', *MODEL_KWARGS, '--input-size', '32', '--data-path', data,
              '--data-set', 'IMNET', '--device', 'cpu', '--batch-size', '8', '--num_workers', '0', '--eval-crop-ratio',
              '1.0']
    return path, tmp_path / 'exported' / 'model.safetensors', common


def test_main_eval_resume_safetensors_equals_the_checkpoint(exported):
    path, weights, common = exported
    summary = r'\* Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+'
    results = [re.findall(summary, run_main(common + ['--eval', '--resume', f]).stdout) for f in (path, weights)]
    assert len(results[0]) == 1 and results[0] == results[1]


def test_main_resume_from_safetensors_trains_from_epoch_0(exported, tmp_path):
    _, weights, common = exported
    out = tmp_path / 'run'
    proc = run_main(common + ['--resume', weights, '--epochs', '1', '--output_dir', out, '--mixup', '0',
                              '--cutmix', '0', '--reprob', '0', '--aa', 'none', '--warmup-epochs', '0',
                              '--no-log-tensorboard'])
    assert f'Loaded weights from {weights}; it holds no training state, so training starts at epoch 0' in proc.stdout
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0]
