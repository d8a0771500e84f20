"""The official Swin models with AttnScale / FeatScale: manifests, official details, official-layout checkpoints."""
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import timm
import torch

import models
from models.checkpoint import CheckpointError, load_checkpoint, model_state, to_model_layout
from models.swin import swin_flops

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / 'tests/reference/manifests').glob('*swin*.json'))


def test_six_swin_manifests_are_present():
    assert len(MANIFESTS) == 6


def official_to_timm(key):
    """The official (Microsoft) Swin key of a parameter, in timm's layout, written out independently."""
    key = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', key)
    return re.sub(r'^head\.', 'head.fc.', key)


@pytest.mark.parametrize('manifest', MANIFESTS, ids=[m.stem for m in MANIFESTS])
def test_official_manifest(manifest):
    ref = json.loads(manifest.read_text())
    with torch.device('meta'):
        model = timm.create_model(ref['model'])
    official = {k: torch.empty(s, device='meta') for k, s in ref['state_dict']}
    buffers = set(ref['buffers'])
    expected = {official_to_timm(k): list(v.shape) for k, v in official.items() if k not in buffers}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert {k: list(v.shape) for k, v in to_model_layout(model, official).items()} == expected
    assert sum(p.numel() for p in model.parameters()) == ref['n_parameters']
    assert swin_flops(model) == ref['official_flops']
    if ref['model'].split('_')[0] in models.ADDONS:
        assert model.flops() == ref['official_flops']


def test_official_details():
    model = models.create_model('featscale_swin_small_patch4_window7_224')
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and {m.eps for m in norms} == {1e-5}
    assert model.pretrained_cfg['crop_pct'] == 0.875 and model.pretrained_cfg['classifier'] == 'head.fc'
    rates = [b.drop_path1.drop_prob for s in model.layers for b in s.blocks if hasattr(b.drop_path1, 'drop_prob')]
    assert rates[-1] == pytest.approx(0.3) and rates == sorted(rates) and len(rates) == 23  # 24 blocks, first 0
    assert {b.attn.attn_drop.p for s in model.layers for b in s.blocks} == {0.}
    drop_paths = {n: timm.create_model(f'attnscale_swin_{n}_patch4_window7_224', device='meta')
                  .layers[-1].blocks[-1].drop_path1.drop_prob for n in ('tiny', 'base')}
    assert drop_paths == {'tiny': pytest.approx(0.2), 'base': pytest.approx(0.5)}


def official_state(name, seed=0):
    """A random state dict in the official layout of `name` (manifest keys and shapes, buffers included)."""
    ref = json.loads((ROOT / f'tests/reference/manifests/{name}.json').read_text())
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.zeros(s, dtype=torch.long) if k.endswith('relative_position_index') else torch.randn(s, generator=gen))
            for k, s in ref['state_dict']}


def test_official_layout_loads_strictly_into_every_entry_point(tmp_path):
    name = 'attnscale_swin_tiny_patch4_window7_224'
    state = official_state(name)
    model = models.create_model(name)
    assert models.load_state_dict(model, state) == []
    own = model.state_dict()
    for k, v in state.items():
        if 'relative_position_index' not in k and 'attn_mask' not in k:
            assert torch.equal(own[official_to_timm(k)], v), k
    path = tmp_path / 'official.pth'
    torch.save({'model': state}, path)
    hub = torch.hub.load(str(ROOT), name, source='local', checkpoint=str(path))
    assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), own.values()))


def test_plain_swin_checkpoint_starts_an_addon_model_at_zero():
    state = {k: v for k, v in official_state('swin_tiny_patch4_window7_224').items()}
    model = models.create_model('featscale_swin_tiny_patch4_window7_224')
    absent = models.load_state_dict(model, state, allow_missing_addons=True)
    assert len(absent) == 2 * 12 and all(k.endswith(('lamb1', 'lamb2')) for k in absent)
    plain = models.create_model('swin_tiny_patch4_window7_224', addon='attnscale')
    assert len(models.load_state_dict(plain, state, allow_missing_addons=True)) == 12


def _save_official_trainer_checkpoint(path, state):
    """What the official Swin trainer writes: its yacs CfgNode pickled (a fake yacs module stands in for it)."""
    yacs, config = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):  # yacs' CfgNode: a dict with its flags in __dict__
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__['__immutable__'] = False
            self.__dict__['__deprecated_keys__'] = set()

    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    config.CfgNode, yacs.config = CfgNode, config
    sys.modules.update({'yacs': yacs, 'yacs.config': config})
    try:
        cfg = CfgNode({'MODEL': CfgNode({'TYPE': 'attnscale', 'DROP_PATH_RATE': 0.3}), 'TRAIN': CfgNode({'EPOCHS': 300})})
        torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {},
                    'max_accuracy': 81.2, 'epoch': 299, 'config': cfg}, path)
    finally:
        del sys.modules['yacs'], sys.modules['yacs.config']


def test_official_trainer_checkpoint_is_read_safely(tmp_path):
    name = 'attnscale_swin_tiny_patch4_window7_224'
    path = tmp_path / 'ckpt_epoch_299.pth'
    _save_official_trainer_checkpoint(path, official_state(name))
    ckpt = load_checkpoint(str(path))
    assert ckpt['config']['MODEL']['TYPE'] == 'attnscale' and ckpt['epoch'] == 299
    assert 'optimizer' not in ckpt and 'lr_scheduler' not in ckpt  # another trainer's state: resumed as weights
    models.load_state_dict(models.create_model(name), model_state(ckpt))
    with pytest.raises(CheckpointError, match=r'pickles objects of the module yacs, which is not installed'):
        load_checkpoint(str(path), allow_unsafe=True)


def test_fused_swin_windows_with_attnscale_match_the_explicit_path_in_eval():
    model = models.create_model('attnscale_swin_tiny_patch4_window7_224', img_size=112, num_classes=3).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('.lamb'):
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        models.set_fused_attn(model, True)
        fused = model(x)
        models.set_fused_attn(model, False)
        torch.testing.assert_close(fused, model(x), rtol=1e-5, atol=1e-5)


def test_diagnostics_follow_every_swin_block(tmp_path, capsys):
    """analyze.py on Swin (timm's, with --addon): HF ratio and patch cosine of every block's map, the lambdas;
    no per-window attention metrics or token spectrum (see diagnostics.py)."""
    import analyze
    from helpers import make_image_folder
    root = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=1, val_per_class=2, size=56)
    argv = ['--model', 'swin_tiny_patch4_window7_224', '--addon', 'attnscale', '--model-kwargs', 'embed_dim=16',
            'depths=(2,2)', 'num_heads=(1,2)', '--input-size', '56', '--eval-crop-ratio', '1.0',
            '--data-path', str(root), '--num-images', '4', '--batch-size', '2', '--device', 'cpu',
            '--output_dir', str(tmp_path / 'out')]
    assert analyze.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out' / 'hf_ratio.png'}" in printed and 'attention_cosine.png' not in printed
    entry = json.loads((tmp_path / 'out' / 'diagnostics.json').read_text())['models'][0]
    assert (entry['depth'], entry['num_tokens'], entry['frequencies']) == (4, 49, None)
    assert set(entry['metrics']) == {'hf_dc_features', 'hf_total_features', 'patch_cosine'}
    assert len(entry['metrics']['patch_cosine']['values']) == 5  # X_0 (14 x 14 patches) .. X_4 (7 x 7)
    assert entry['addon_params']['attnscale_lambda']['values'] == [[0.], [0.], [0., 0.], [0., 0.]]
    assert printed.splitlines()[-1].split()[-1] == 'n/a'


@pytest.mark.parametrize('img_size', [56, 64])  # 64: 16 x 16 and 8 x 8 maps, padded to whole 7 x 7 windows
def test_featscale_fused_after_the_window_merge_matches_the_plain_block(img_size, monkeypatch):
    """While gradients are recorded, a FeatScale Swin block runs the attention's output projection after the
    windows are merged and shifted back, fused with FeatScale; per window then FeatScale over the map gives
    the same logits and gradients (fp32: 1e-5 and 1e-4), also on maps padded to whole windows (eval: no drop
    path)."""
    torch.manual_seed(0)
    model = models.create_model('featscale_swin_tiny_patch4_window7_224', img_size=img_size, num_classes=3).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('.lamb1', '.lamb2')):
                p.normal_(0, 0.3)
    x = torch.randn(2, 3, img_size, img_size)
    runs, blocks = [], models.plugin.self_attention_blocks(model)
    for fused in (True, False):
        monkeypatch.setattr(models.plugin.FeatScaleProjection, 'featscale_fused', lambda self, on=fused: on)
        calls = []  # the projection as a module runs per window only on the plain path
        hooks = [b.attn.proj.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape)) for b in blocks]
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls))
        for h in hooks:
            h.remove()
    (logits, grads, fused_calls), (plain_logits, plain_grads, plain_calls) = runs
    windows = math.ceil(img_size / 4 / 7) ** 2  # of stage 0, per image
    assert fused_calls == [] and len(plain_calls) == len(blocks) and plain_calls[0][:2] == (2 * windows, 49)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():  # atol: float32 rounding of the tensor's largest entry
        scale = plain_grads[n].abs().max().item()
        torch.testing.assert_close(g, plain_grads[n], rtol=1e-4, atol=1e-6 * max(scale, 1.), msg=n)
