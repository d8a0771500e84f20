"""The add-ons on timm's other families through the repository's tools: main.py --addon trains and evaluates one
(two processes), --pretrained starts from timm's weights (a local Hugging Face cache) with the gains at zero,
analyze.py reports the HF ratio and lambda per block, benchmark.py prices NAME+addon."""
import json

import pytest
import timm
import torch

import models
from helpers import make_image_folder
from test_hub import cache, offline, publish  # noqa: F401  (fixtures: an empty offline cache, no network)

SWINV2 = ['--model', 'swinv2_tiny_window8_256', '--model-kwargs', 'embed_dim=16', 'depths=(2,2)', 'num_heads=(1,2)',
          'window_size=4']
EVA = dict(img_size=28, depth=2, embed_dim=48, num_heads=2)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


@pytest.mark.slow
def test_main_addon_trains_and_evaluates_swin_v2_with_two_processes(data, tmp_path):
    """--addon attnscale on timm's Swin V2 with the launcher: every block's lambda in the checkpoint and trained,
    and --eval --resume gives the last epoch's accuracy."""
    from test_training import FAST, eval_accuracy, run
    out = tmp_path / 'run'
    common = [*SWINV2, '--addon', 'attnscale', *FAST, '--data-path', data]
    run(common + ['--epochs', '2', '--output_dir', out], launcher='launch')
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    lambdas = {k: v for k, v in ckpt['model'].items() if k.endswith('attn.lamb')}
    assert ckpt['args']['addon'] == 'attnscale' and len(lambdas) == 4
    assert all(v.abs().sum() > 0 for v in lambdas.values())
    logs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    proc = run(common + ['--eval', '--resume', out / 'checkpoint.pth'], launcher='launch')
    assert eval_accuracy(proc.stdout) == pytest.approx(logs[-1]['test_acc1'], abs=0.05)


def test_pretrained_takes_timms_weights_with_the_gains_at_zero(cache):
    """`create_model(..., addon=..., pretrained=True)` (main.py --pretrained --addon) of an EVA-02: exactly the
    weights in timm's Hub repository (here a local cache) plus zero gains, so timm's own logits bit for bit."""
    torch.manual_seed(3)
    weights = timm.create_model('eva02_tiny_patch14_224', **EVA).state_dict()
    publish(cache, 'timm/eva02_tiny_patch14_224.mim_in22k', {'model.safetensors': weights})
    plain = timm.create_model('eva02_tiny_patch14_224', pretrained=True, **EVA).eval()
    x = torch.randn(2, 3, 28, 28)
    for addon in models.ADDONS:
        model = models.create_model('eva02_tiny_patch14_224', addon=addon, pretrained=True, **EVA).eval()
        state = model.state_dict()
        gains = [k for k in state if k.rsplit('.', 1)[-1] in ('lamb', 'lamb1', 'lamb2')]
        assert len(gains) == (2 if addon == 'attnscale' else 4) and all(not state[k].any() for k in gains)
        assert all(torch.equal(state[k], v) for k, v in weights.items())
        with torch.no_grad():
            assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize('name,kwargs,size,image_wide', [
    ('eva02_tiny_patch14_224', ['depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=4'], 16, True),
    ('pvt_v2_b0', ['depths=(1,1,1,1)', 'embed_dims=(16,16,32,32)', 'num_heads=(1,1,2,2)'], 64, False),
])
def test_analyze_reports_hf_ratio_and_lambda_per_block(name, kwargs, size, image_wide, tmp_path, capsys):
    """analyze.py --addon attnscale on an EVA (one image-wide stage: maps and spectra too) and a PVT-v2 (four
    stages of other sizes: the tokens' metrics) : one value per block, the lambdas of every block."""
    import analyze
    root = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=1, val_per_class=2, size=size)
    argv = ['--model', name, '--addon', 'attnscale', '--model-kwargs', *kwargs, '--input-size', str(size),
            '--eval-crop-ratio', '1.0', '--data-path', str(root), '--num-images', '4', '--batch-size', '2',
            '--device', 'cpu', '--output_dir', str(tmp_path / 'out')]
    assert analyze.main(argv) == 0
    printed = capsys.readouterr().out
    entry = json.loads((tmp_path / 'out' / 'diagnostics.json').read_text())['models'][0]
    depth = 2 if image_wide else 4
    assert entry['depth'] == depth and len(entry['metrics']['hf_dc_features']['values']) == depth + 1
    assert len(entry['addon_params']['attnscale_lambda']['values']) == depth
    assert ('attention_cosine' in entry['metrics']) == image_wide
    assert (f"wrote {tmp_path / 'out' / 'attention_cosine.png'}" in printed) == image_wide


def test_benchmark_prices_a_new_family_with_each_addon(tmp_path, capsys):
    """benchmark.py NAME+plain / NAME+attnscale / NAME+featscale on a two-stage MaxViT (--cost: the GPU cost of a
    training step from the ops it dispatches): the add-ons cost ops and bytes, no change in the model's own FLOPs
    beyond a few small products."""
    import benchmark
    out = tmp_path / 'cost.json'
    name = 'maxvit_rmlp_pico_rw_256'
    assert benchmark.main(['--models', f'{name}+plain', f'{name}+attnscale', f'{name}+featscale', '--img-size', '64',
                           '--batch-size', '2', '--num-classes', '10', '--dtype', 'bfloat16', '--cost', 'h100',
                           '--model-kwargs', 'embed_dim=(32,32)', 'depths=(1,1)', 'block_type=("M","M")',
                           '--json', str(out)]) == 0
    summary = json.loads(out.read_text())['summary']
    plain = summary[f'{name}+plain']['train']
    for addon in ('attnscale', 'featscale'):
        s = summary[f'{name}+{addon}']['train']
        assert s['ops'] > plain['ops'] and s['bytes'] > plain['bytes']
        assert plain['flops'] <= s['flops'] < 1.01 * plain['flops']
    assert f'{name}+attnscale' in capsys.readouterr().out
