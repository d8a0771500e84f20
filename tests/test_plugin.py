"""models.apply_addon on timm's own ViT, DeiT-III, distilled DeiT, CaiT and Swin: zero-gain identity, the
semantics at extreme gains against an independent computation, fused vs explicit paths, and the errors."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import ParallelScalingBlock

import models
from models.checkpoint import ADDON_KEY
from models.plugin import self_attention_blocks
from helpers import assert_same_outputs_and_grads

SWIN = dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4))  # stage 0: 14x14, shifted 7x7 windows
FAMILIES = {  # name: (create_model kwargs, input size)
    'vit_tiny_patch16_224': (dict(img_size=32, depth=3), 32),
    'deit3_small_patch16_224': (dict(img_size=32, depth=3, init_values=0.5), 32),  # layer scale
    'deit_tiny_distilled_patch16_224': (dict(img_size=32, depth=3), 32),
    'cait_xxs24_224': (dict(img_size=32, depth=3, init_values=0.5), 32),
    'swin_tiny_patch4_window7_224': (SWIN, 56),
}


def build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kwargs).eval()


def randomize_addons(model, std=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ADDON_KEY.search(n):
                p.normal_(0, std)


def set_gains(model, **values):
    with torch.no_grad():
        for n, p in model.named_parameters():
            key = n.rsplit('.', 1)[-1]
            if key in values:
                p.fill_(values[key])


@pytest.mark.parametrize('name', FAMILIES)
@pytest.mark.parametrize('addon', models.ADDONS)
@pytest.mark.parametrize('fused', [True, False])
def test_zero_gains_compute_the_base_model_bit_for_bit(name, addon, fused):
    kwargs, size = FAMILIES[name]
    base = build(name, **kwargs)
    model = models.apply_addon(copy.deepcopy(base), addon)
    for m in (base, model):
        models.set_fused_attn(m, fused)
    new_keys = set(model.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.state_dict()) and new_keys
    blocks = self_attention_blocks(model)
    expected = {f'{p}.attn.lamb' for p in _block_names(model, blocks)} if addon == 'attnscale' else \
        {f'{p}.{k}' for p in _block_names(model, blocks) for k in ('lamb1', 'lamb2')}
    assert new_keys == expected and all(not model.state_dict()[k].any() for k in new_keys)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(base(x), model(x))


def _block_names(model, blocks):
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks]


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])  # FeatScale: after the merge under grad
def test_registered_swin_names_compute_timms_swin_at_zero_gains(grad):
    base = build('swin_tiny_patch4_window7_224', img_size=56)
    x = torch.randn(2, 3, 56, 56)
    for name in ('attnscale_swin_tiny_patch4_window7_224', 'featscale_swin_tiny_patch4_window7_224'):
        model = build(name, img_size=56)
        assert models.load_state_dict(model, base.state_dict(), allow_missing_addons=True)
        with torch.set_grad_enabled(grad):
            assert torch.equal(base(x), model(x))


def _attention_inputs_and_outputs(model, x):
    """(input, output) of every self-attention module in one forward pass."""
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for b in self_attention_blocks(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize('name', FAMILIES)
@pytest.mark.parametrize('fused', [True, False])
def test_attnscale_at_minus_one_outputs_the_mean_of_v(name, fused):
    """lambda = -1: A' = 1/N everywhere, so each attention outputs proj(mean of v over the tokens it attends:
    the window for Swin, whatever its shift mask)."""
    kwargs, size = FAMILIES[name]
    model = models.apply_addon(build(name, **kwargs), 'attnscale')
    models.set_fused_attn(model, fused)
    set_gains(model, lamb=-1.)
    seen = _attention_inputs_and_outputs(model, torch.randn(2, 3, size, size))
    assert len(seen) == len(self_attention_blocks(model))
    for attn, inp, out in seen:
        B, N, C = inp.shape
        v = attn.qkv(inp).reshape(B, N, 3, C)[:, :, 2]  # heads are contiguous channel groups of v
        expected = attn.proj(v.mean(dim=1, keepdim=True)).expand(B, N, -1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', FAMILIES)
def test_featscale_lambda1_minus_one_removes_the_dc_of_the_branch(name):
    kwargs, size = FAMILIES[name]
    model = models.apply_addon(build(name, **kwargs), 'featscale')
    set_gains(model, lamb1=-1., lamb2=0.)
    swin = name.startswith('swin')
    blk = self_attention_blocks(model)[1]  # Swin: stage 0's shifted block, on a 14 x 14 map
    x = torch.randn(2, 14, 14, 32) if swin else torch.randn(2, 17 if 'cait' not in name else 16, model.embed_dim)
    with torch.no_grad():
        if swin:  # the branch over the whole map (window reverse, reverse shift done), all H*W tokens
            y = blk._attn(blk.norm1(x))
            h = x + (y - y.mean(dim=(1, 2), keepdim=True))
            expected = h + blk.mlp(blk.norm2(h))
        else:
            y = blk.attn(blk.norm1(x))
            cait = hasattr(blk, 'gamma_1')
            scale1 = (lambda t: blk.gamma_1 * t) if cait else blk.ls1
            scale2 = (lambda t: blk.gamma_2 * t) if cait else blk.ls2
            h = x + scale1(y - y.mean(dim=1, keepdim=True))
            expected = h + scale2(blk.mlp(blk.norm2(h)))
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'swin_tiny_patch4_window7_224'])
def test_fused_and_explicit_paths_agree_with_gradients(name):
    kwargs, size = FAMILIES[name]
    fused = models.apply_addon(build(name, **kwargs), 'attnscale')
    randomize_addons(fused)
    explicit = copy.deepcopy(fused)
    models.set_fused_attn(fused, True)
    models.set_fused_attn(explicit, False)
    assert_same_outputs_and_grads(fused, explicit, torch.randn(2, 3, size, size))
    lamb_grads = [p.grad for n, p in fused.named_parameters() if n.endswith('attn.lamb')]
    assert lamb_grads and all(g.abs().sum() > 0 for g in lamb_grads)
    if name.startswith('swin'):
        assert fused.layers[0].blocks[1].shift_size == (3, 3)  # the shifted, masked windows were on both paths


def test_cait_class_attention_and_official_deit_quirks():
    cait = models.apply_addon(build('cait_xxs24_224', img_size=32, depth=2), 'attnscale')
    assert not [n for n, _ in cait.blocks_token_only.named_parameters() if 'lamb' in n]
    assert [n for n, _ in cait.named_parameters() if 'lamb' in n] == ['blocks.0.attn.lamb', 'blocks.1.attn.lamb']
    # the registered DeiT keeps the released doubling: its base with --addon featscale is featscale_tiny_12
    ours = models.create_model('deit_tiny_12', addon='featscale', img_size=32)
    assert {b.feat_scale_repeat for b in ours.blocks} == {2.}
    plain = models.create_model('vit_tiny_patch16_224', addon='featscale', img_size=32)
    assert {b.feat_scale_repeat for b in plain.blocks} == {1.}


def test_unsupported_models_and_double_addons_fail_with_one_line():
    with pytest.raises(ValueError, match=r'cannot be installed in ResNet: it has no attention blocks; supported: '
                                         r'timm VisionTransformer'):
        models.apply_addon(timm.create_model('resnet10t'), 'attnscale')
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, block_fn=ParallelScalingBlock)
    with pytest.raises(ValueError, match=r'VisionTransformer: its ParallelScalingBlock \(blocks.0\) has no adapter'):
        models.apply_addon(vit, 'featscale')
    with pytest.raises(ValueError, match="unknown add-on 'attnscal'"):
        models.apply_addon(vit, 'attnscal')
    with pytest.raises(ValueError, match='already carries an add-on'):
        models.apply_addon(models.create_model('attnscale_tiny_12', img_size=32), 'featscale')
    with pytest.raises(ValueError) as e:
        models.create_model('attnscale_swin_tiny_patch4_window7_224', addon='featscale')
    assert str(e.value) == ('--addon featscale: attnscale_swin_tiny_patch4_window7_224 carries an add-on already; '
                            'drop --addon or pick a base model')


def test_addon_models_train_with_the_official_no_decay_set():
    """AdamW groups as timm builds them: every lambda, bias, norm and Swin's relative position tables undecayed."""
    from timm.optim import create_optimizer_v2
    model = models.create_model('featscale_swin_tiny_patch4_window7_224', addon=None, img_size=56)
    decay, no_decay = [], []
    names = {id(p): n for n, p in model.named_parameters()}
    for group in create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05).param_groups:
        (decay if group['weight_decay'] else no_decay).extend(names[id(p)] for p in group['params'])
    assert all(n.endswith('.weight') and 'norm' not in n for n in decay)
    assert {n for n in no_decay if 'lamb' in n} == {n for n in names.values() if 'lamb' in n}
    assert {n for n in names.values() if 'relative_position_bias_table' in n} <= set(no_decay)


# ---------------------------------------------------------------- main.py --addon

VIT = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    from helpers import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


@pytest.mark.slow
def test_main_addon_trains_and_evaluates_with_two_processes(data, tmp_path):
    """--addon on a timm ViT with the launcher: lambda in the checkpoint, per-update LR warm-up; --eval --resume (in this
    process) gives the logged accuracy."""
    from test_training import FAST, eval_accuracy, run
    out = tmp_path / 'run'
    common = [*VIT, '--addon', 'attnscale', *FAST, '--data-path', data]
    run(common + ['--epochs', '2', '--sched-on-updates', '--output_dir', out], launcher='launch')
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['args']['addon'] == 'attnscale' and ckpt['model']['blocks.1.attn.lamb'].abs().sum() > 0
    logs = [__import__('json').loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    steps = 48 // (2 * 8)  # updates per epoch; warm-up over the first epoch's updates, from 1e-6 to 2e-3
    assert logs[0]['train_lr'] == pytest.approx(sum(1e-6 + (2e-3 - 1e-6) * t / steps for t in range(steps)) / steps)
    proc = run(common + ['--eval', '--resume', out / 'checkpoint.pth'], launcher='here')
    assert eval_accuracy(proc.stdout) == pytest.approx(logs[-1]['test_acc1'], abs=0.05)


def test_main_addon_from_a_base_checkpoint_and_its_errors(data, tmp_path):
    from test_training import FAST, run
    base = timm.create_model('vit_tiny_patch16_224', depth=2, embed_dim=48, num_heads=2, patch_size=8, img_size=32,
                             num_classes=4)
    torch.save({'model': base.state_dict()}, tmp_path / 'base.pth')
    common = [*VIT, '--addon', 'featscale', *FAST, '--data-path', data, '--epochs', '1']
    resumed = run(common + ['--resume', tmp_path / 'base.pth'], launcher='here')
    assert f'Initialised from baseline checkpoint {tmp_path / "base.pth"}; 4 add-on parameters start at zero' in resumed.stdout
    tuned = run(common + ['--finetune', tmp_path / 'base.pth'], launcher='here')
    assert 'has no add-on parameters: they start at zero' in tuned.stdout
    bad = run(['--model', 'attnscale_tiny_12', '--addon', 'featscale', *FAST, '--data-path', data],
              launcher='here', check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith(
        '--addon featscale: attnscale_tiny_12 carries an add-on already; drop --addon or pick a base model')


def test_tensorboard_lambda_tags_name_swin_blocks():
    import main
    model = models.create_model('attnscale_swin_tiny_patch4_window7_224', img_size=56)
    tags = main.addon_lambdas(model)
    assert len(tags) == 12 and {'attnscale/layers.0.block0', 'attnscale/layers.2.block5'} <= set(tags)
    assert set(main.addon_lambdas(models.create_model('featscale_tiny_12', img_size=32))) == {
        f'featscale_{k}/block{i}' for k in ('dc', 'hf') for i in range(12)}
