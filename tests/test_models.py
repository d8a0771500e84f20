"""Model registry, official checkpoint layout, and the AttnScale / FeatScale numerics."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from helpers import assert_same_outputs_and_grads

MANIFESTS_DIR = Path(__file__).resolve().parent / 'reference/manifests'
MANIFESTS = sorted(p for p in MANIFESTS_DIR.glob('*.json') if 'swin' not in p.name)  # DeiT and CaiT
BIG = ('base_24', 'cait_S36', 'cait_M36', 'cait_M48')  # built on the meta device (shapes only)


def build(name, device='cpu', **kwargs):
    with torch.device(device):
        return timm.create_model(name, **kwargs)


def test_reference_manifests_are_present():
    assert len(MANIFESTS) == 42, f'expected the 42 DeiT/CaiT manifests under {MANIFESTS_DIR}'


def test_registry_lists_every_variant():
    names = models.list_variants()
    # DeiT t/s/b x 12/24 x 3 kinds, our_* aliases, CaiT, Swin t/s/b x 2 add-ons
    assert len(names) == len(set(names)) == 6 * 3 + 4 + 10 * 3 + 6
    for n in ('attnscale_small_12', 'featscale_base_24', 'deit_tiny_12', 'our_small_24',
              'cait_XXS24_224', 'attnscale_cait_S24_224', 'featscale_cait_M48',
              'attnscale_swin_small_patch4_window7_224', 'featscale_swin_base_patch4_window7_224'):
        assert n in names and timm.is_model(n)


@pytest.mark.slow  # every name: 58 models
@pytest.mark.parametrize('name', models.list_variants())
def test_every_variant_forwards(name):
    device = 'meta' if any(b in name for b in BIG) else 'cpu'
    model = build(name, device, num_classes=7, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    if device == 'cpu':
        assert torch.isfinite(out).all()


@pytest.mark.slow  # every manifest: 42 models
@pytest.mark.parametrize('manifest', MANIFESTS, ids=[m.stem for m in MANIFESTS])
def test_official_manifest(manifest):
    ref = json.loads(manifest.read_text())
    model = build(ref['model'], 'meta')
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: s for k, s in ref['state_dict']}
    assert sum(p.numel() for p in model.parameters()) == ref['n_parameters']
    assert model.flops() == ref['official_flops']


def _zero_addon_pair(baseline, variant, **kwargs):
    base = build(baseline, **kwargs).eval()
    model = build(variant, **kwargs).eval()
    absent = models.load_state_dict(model, base.state_dict(), allow_missing_addons=True)
    assert absent and all(k.split('.')[-1] in ('lamb', 'lamb1', 'lamb2') for k in absent)
    return base, model


@pytest.mark.parametrize('baseline,variant', [
    ('deit_tiny_12', 'attnscale_tiny_12'), ('deit_tiny_12', 'featscale_tiny_12'),
    ('cait_XXS24_224', 'attnscale_cait_XXS24_224'), ('cait_XXS24_224', 'featscale_cait_XXS24_224')])
@pytest.mark.parametrize('fused', [True, False])
def test_zero_lambda_equals_baseline(baseline, variant, fused):
    base, model = _zero_addon_pair(baseline, variant, img_size=64, num_classes=5)
    for m in list(base.modules()) + list(model.modules()):
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(base(x), model(x))


def _randomize_addons(model, std=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if models.checkpoint.ADDON_KEY.search(n):
                p.normal_(0, std)


@pytest.mark.parametrize('name', ['attnscale_tiny_12', 'featscale_tiny_12', 'featscale_cait_XXS24_224',
                                  'attnscale_cait_XXS24_224'])
def test_nonzero_lambda_changes_output(name):
    kwargs = dict(init_values=0.5) if 'cait' in name else {}  # LayerScale 1e-5 would hide any change
    model = build(name, img_size=64, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        _randomize_addons(model)
        after = model(x)
    assert (before - after).abs().max() > 1e-3


def test_fused_path_matches_explicit_path_with_gradients():
    fused = build('attnscale_tiny_12', img_size=64, num_classes=5)
    _randomize_addons(fused)
    explicit = build('attnscale_tiny_12', img_size=64, num_classes=5)
    explicit.load_state_dict(fused.state_dict())
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    assert_same_outputs_and_grads(fused, explicit, torch.randn(4, 3, 64, 64))
    assert any(p.grad.abs().sum() > 0 for n, p in fused.named_parameters() if n.endswith('attn.lamb'))


def test_fused_path_is_taken_only_without_attention_dropout():
    model = build('attnscale_tiny_12', img_size=32, attn_drop_rate=0.5)
    seen = []
    model.blocks[0].attn.attn_probe.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(1, 3, 32, 32)
    model.train()(x)
    assert len(seen) == 1  # explicit path: dropout acts on the scaled map
    model.eval()(x)
    assert len(seen) == 1  # eval: fused path, no map materialised


def _official_deit_block(blk, x):
    """The released DeiT block, written out from the reference notes."""
    attn, H = blk.attn, blk.attn.num_heads
    B, N, C = x.shape
    h = blk.norm1(x)
    q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    A = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(dim=-1)
    if attn.lamb is not None:
        A_dc = torch.full_like(A, 1. / N)
        A = A_dc + (1 + attn.lamb.view(H, 1, 1)) * (A - A_dc)
    y = attn.proj((A @ v).transpose(1, 2).reshape(B, N, C))
    if blk.lamb1 is not None:
        y_dc = y.mean(dim=1, keepdim=True)
        y = y + 2 * (blk.lamb1 * y_dc + blk.lamb2 * (y - y_dc))  # the released code's doubling
    x = x + y
    return x + blk.mlp(blk.norm2(x))


def _official_cait_block(blk, x):
    attn, H = blk.attn, blk.attn.num_heads
    B, N, C = x.shape
    q, k, v = attn.qkv(blk.norm1(x)).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    A = (q * (C // H) ** -0.5) @ k.transpose(-2, -1)
    A = attn.proj_l(A.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
    A = attn.proj_w(A.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if attn.lamb is not None:
        A_dc = torch.full_like(A, 1. / N)
        A = A_dc + (1 + attn.lamb.view(H, 1, 1)) * (A - A_dc)
    y = attn.proj((A @ v).transpose(1, 2).reshape(B, N, C))
    if blk.lamb1 is not None:
        y_dc = y.mean(dim=1, keepdim=True)
        y = y + blk.lamb1 * y_dc + blk.lamb2 * (y - y_dc)
    x = x + blk.gamma_1 * y
    return x + blk.gamma_2 * blk.mlp(blk.norm2(x))


@pytest.mark.parametrize('name,reference,tokens', [
    ('attnscale_tiny_12', _official_deit_block, 17), ('featscale_tiny_12', _official_deit_block, 17),
    ('attnscale_cait_XXS24_224', _official_cait_block, 16), ('featscale_cait_XXS24_224', _official_cait_block, 16)])
def test_blocks_follow_the_official_semantics(name, reference, tokens):
    model = build(name, img_size=64, init_values=0.5) if 'cait' in name else build(name, img_size=64)
    _randomize_addons(model)
    model.eval()
    x = torch.randn(2, tokens, model.embed_dim)
    with torch.no_grad():
        for blk in model.blocks[:2]:
            torch.testing.assert_close(blk(x), reference(blk, x), rtol=1e-5, atol=1e-5)


def test_cait_class_attention_stage_has_no_addons():
    for name in ('attnscale_cait_XXS24_224', 'featscale_cait_XXS24_224'):
        model = build(name, 'meta')
        assert not [n for n, _ in model.blocks_token_only.named_parameters() if 'lamb' in n]


def test_addon_parameter_counts_match_the_paper():
    count = {n: sum(p.numel() for k, p in build(n, 'meta').named_parameters() if 'lamb' in k)
             for n in ('attnscale_small_12', 'featscale_small_12')}
    assert count == {'attnscale_small_12': 72, 'featscale_small_12': 9216}


def test_timm_conventions_and_other_image_sizes():
    model = build('featscale_tiny_12', img_size=96, num_classes=4)
    assert model.pos_embed.shape == (1, 37, 192)
    assert model.no_weight_decay() >= {'pos_embed', 'cls_token'}
    assert model.pretrained_cfg['input_size'] == (3, 224, 224) and model.pretrained_cfg['crop_pct'] == 0.875
    x = torch.randn(2, 3, 96, 96)
    feats = model.forward_features(x)
    assert feats.shape == (2, 37, 192) and model.forward_head(feats).shape == (2, 4)
    model.reset_classifier(9)
    assert model(x).shape == (2, 9) and model.num_features == 192
    cait = build('cait_XXS24_224', img_size=96)
    assert cait.pos_embed.shape == (1, 36, 192)


def test_drop_rate_has_the_official_meaning():
    deit = build('deit_tiny_12', 'meta', drop_rate=0.2)
    assert deit.pos_drop.p == 0.2 and deit.blocks[0].attn.proj_drop.p == 0.2 and deit.head_drop.p == 0.
    cait = build('cait_XXS24_224', 'meta', drop_rate=0.2)
    assert cait.pos_drop.p == 0.2 and cait.blocks[0].mlp.drop1.p == 0.2 and cait.head_drop.p == 0.


def test_stochastic_depth_rules():
    deit = build('deit_tiny_12', 'meta', drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, 'drop_prob', 0.) for b in deit.blocks]
    assert rates[0] == 0. and abs(rates[-1] - 0.1) < 1e-7 and rates == sorted(rates)
    cait = build('cait_XXS24_224', 'meta', drop_path_rate=0.05)
    assert {b.drop_path.drop_prob for b in cait.blocks} == {0.05}


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'attnscale_smal_12'.*closest: attnscale_small_12"):
        models.create_model('attnscale_smal_12')


def test_checkpoint_of_another_model_names_the_keys():
    model = build('attnscale_tiny_12', 'meta')
    state = build('featscale_tiny_12', 'meta').state_dict()
    with pytest.raises(models.checkpoint.CheckpointError) as e:
        models.load_state_dict(model, state)
    msg = str(e.value)
    assert '12 missing: blocks.0.attn.lamb' in msg and '24 unexpected: blocks.0.lamb1' in msg
    assert '--model' in msg


def test_module_prefixed_checkpoint_loads(tmp_path):
    base = build('cait_XXS24_224', img_size=32)
    path = tmp_path / 'cait.pth'
    torch.save({'model': {'module.' + k: v for k, v in base.state_dict().items()}}, path)
    model = build('featscale_cait_XXS24_224', img_size=32)
    absent = models.load_state_dict(model, models.checkpoint.model_state(models.load_checkpoint(str(path))),
                                    allow_missing_addons=True)
    assert len(absent) == 48
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, base.blocks[3].attn.qkv.weight, rtol=0, atol=0)


def test_torch_hub_local(tmp_path):
    root = Path(__file__).resolve().parents[1]
    model = torch.hub.load(str(root), 'attnscale_tiny_12', source='local', num_classes=3, img_size=32)
    path = tmp_path / 'w.pth'
    torch.save({'model': model.state_dict()}, path)
    again = torch.hub.load(str(root), 'attnscale_tiny_12', source='local', num_classes=3, img_size=32,
                           checkpoint=str(path))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), again.eval()(x))
