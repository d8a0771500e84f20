"""The add-ons in timm's zoo beyond ViT, CaiT and Swin, one tiny real instance per adapter (code path):

- zero gains compute timm's own model bit for bit, in eval mode, on the fused and the explicit attention path;
- non-zero gains (-1 among them) match the definitions computed independently on timm's plain model: every softmax
  map of a token-attention module replaced by A' = (1 + lamb) A - lamb A_dc (A_dc = 1/N_k, or 1/N_valid on the valid
  keys under a padding mask), and the attention branch's output y by y + lamb1 DC[y] + lamb2 HF[y] (DC over the
  image's tokens), written out here in float64 with no code of models/;
- the fused forms (attention kernel, add-ons through the projection) equal the plain formulas (A' formed on the
  explicit map, FeatScale after the projection), outputs and every gradient; gradients are finite at lamb = -1.
"""
import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from timm.models import byobnet, maxxvit, mobilevit, mvitv2, volo
from timm.models.byobnet import ByoBlockCfg
from timm.models.vision_transformer import ResPostBlock
from torch.overrides import TorchFunctionMode

import diagnostics
import models
from models.plugin import install, self_attention_blocks
from models.token_attention import NOT_TOKEN_ATTENTION, token_attention_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
from gain_precision import explicit_formula  # noqa: E402  (A' on the explicit map, FeatScale after the projection)

ADDON = ('lamb', 'lamb1', 'lamb2')


def image(size):
    return lambda batch: torch.randn(batch, 3, size, size)


def naflex_batch(batch, patch=8, grid=(4, 4), valid=(16, 10)):
    """NaFlexViT's dict input: flattened patches, their coordinates, and padding (the last images' patches past
    `valid[i]` are padding)."""
    n = grid[0] * grid[1]
    coord = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij'), -1).view(n, 2)
    keep = torch.arange(n)[None] < torch.tensor([valid[i % len(valid)] for i in range(batch)])[:, None]
    return dict(patches=torch.randn(batch, n, patch * patch * 3), patch_coord=coord.expand(batch, n, 2),
                patch_valid=keep)


# name: (timm model, its kwargs, input, where FeatScale's branch output is: (block attribute, layout))
FAMILIES = {
    'eva': ('eva02_tiny_patch14_224', dict(img_size=28, depth=2), image(28), ('attn', 'nlc')),
    'eva-post-norm-separate-qkv': ('eva02_tiny_patch14_224', dict(img_size=28, depth=2, use_post_norm=True,
                                                                  qkv_fused=False), image(28), ('norm1', 'nlc')),
    'rope-grouped-query': ('vit_small_patch16_rope_224', dict(img_size=32, depth=2, embed_dim=64, num_heads=4,
                                                             qkv_fused=False, num_kv_heads=2, init_values=.5),
                           image(32), ('attn', 'nlc')),
    'qwen3-vl': ('qwen3_vit_306m', dict(img_size=32, depth=2, embed_dim=64, num_heads=2), image(32), ('attn', 'nlc')),
    'deepseek': ('deepseek_vit_412m', dict(img_size=28, depth=2, embed_dim=64, num_heads=2), image(28),
                 ('attn', 'nlc')),
    'beit': ('beit_base_patch16_224', dict(img_size=32, depth=2, embed_dim=64, num_heads=2), image(32),
             ('attn', 'nlc')),
    'relpos-vit': ('vit_relpos_small_patch16_224', dict(img_size=32, depth=2, embed_dim=64, num_heads=2), image(32),
                   ('attn', 'nlc')),
    'relpos-vit-res-post': ('vit_relpos_small_patch16_rpn_224', dict(img_size=32, depth=2, embed_dim=64, num_heads=2),
                            image(32), ('norm1', 'nlc')),
    'vit-res-post': ('vit_tiny_patch16_224', dict(img_size=32, depth=2, block_fn='ResPostBlock'), image(32),
                     ('norm1', 'nlc')),
    'naflexvit-padding': ('naflexvit_base_patch16_gap', dict(depth=2, embed_dim=64, num_heads=2, patch_size=8,
                                                         init_values=0.5),
                          naflex_batch, ('attn', 'nlc')),
    'pit': ('pit_ti_224', dict(img_size=32, patch_size=8, stride=4, base_dims=(16, 16), depth=(1, 1), heads=(1, 2)),
            image(32), ('attn', 'nlc')),  # timm's blocks inside pooling stages
    'mobilevit': (lambda: tiny_mobilevit(), {}, image(32), ('attn', 'nlc')),  # timm's blocks over unfolded patches
    'crossvit': ('crossvit_tiny_240', dict(img_size=48, img_scale=(1., 1.), depth=((1, 1, 0),), embed_dim=(32, 64),
                                           num_heads=(2, 2)), image(48), ('attn', 'nlc')),
    'swinv2': ('swinv2_tiny_window8_256', dict(img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                                               window_size=4), image(32), ('norm1', 'nhwc')),  # shifted windows
    'swinv2-cr': ('swinv2_cr_tiny_ns_224', dict(img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                                               window_size=4), image(32), ('norm1', 'nhwc')),
    'maxvit': (lambda: tiny_maxvit('maxvit_rmlp_nano_rw'), {}, image(32), ('_partition_attn', 'nhwc')),
    'maxvit-tf': (lambda: tiny_maxvit('maxvit_tiny_tf'), {}, image(32), ('_partition_attn', 'nhwc')),
    'coatnet': (lambda: tiny_maxvit('coatnet_rmlp_nano_rw', ('C', 'T'), depths=(1, 2)), {}, image(32),
                ('attn', 'nchw')),
    'volo': (lambda: volo.VOLO(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2),
                                img_size=32, stem_hidden_dim=16), {}, image(32), ('attn', 'nhwc')),
    'pvt-v2': ('pvt_v2_b0', dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2),
                                 sr_ratios=(2, 2, 1, 1)), image(32), ('attn', 'nlc')),
    'pvt-v2-pooled-keys': ('pvt_v2_b2_li', dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                                                num_heads=(1, 2, 2, 2)), image(32), ('attn', 'nlc')),
    'twins': ('twins_svt_small', dict(img_size=32, depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                                      num_heads=(1, 2, 2, 2), wss=(3, 3, 3, 3), sr_ratios=(2, 2, 1, 1)),
              image(32), ('attn', 'nlc')),  # local windows (zero-padded) and global sub-sampled keys
    'mvitv2': (lambda: mvitv2.MultiScaleVit(replace(mvitv2.model_cfgs['mvitv2_tiny'], depths=(1, 2), embed_dim=32,
                                                    num_heads=1), img_size=32), {}, image(32), ('attn', 'nlc')),
    'levit': ('levit_128s', dict(img_size=128, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 2, 2),
                                 depth=(1, 1, 1)), image(128), (('attn', 'attn_downsample'), 'nlc')),  # 2 x 2 last
    'levit-conv': ('levit_conv_128s', dict(img_size=128, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 2, 2),
                                           depth=(1, 1, 1)), image(128), (('attn', 'attn_downsample'), 'nchw')),
}


def tiny_maxvit(name, block_type=('M', 'M'), depths=(1, 1)):
    """A two-stage MaxViT / CoAtNet of timm's config `name`, 2 x 2 partitions."""
    cfg = maxxvit.model_cfgs[name]
    cfg = replace(cfg, embed_dim=(32, 32), depths=depths, block_type=block_type, stem_width=16,
                  transformer_cfg=replace(cfg.transformer_cfg, dim_head=16, window_size=(2, 2), grid_size=(2, 2)))
    return maxxvit.MaxxVit(cfg, img_size=32)


def tiny_mobilevit():
    """MobileViT v1 (timm's `mobilevit_xxs` layout): a stride-2 bottleneck, then a MobileViT block of two timm
    blocks over the 8 x 8 map unfolded into 2 x 2 patches."""
    bottle = dict(type='bottle', d=1, gs=1, br=2., block_kwargs=dict(bottle_in=True, linear_out=True))
    vit = dict(transformer_dim=32, transformer_depth=2, patch_size=2, num_heads=2)
    cfg = replace(mobilevit.model_cfgs['mobilevit_xxs'], stem_chs=8, num_features=32, blocks=(
        ByoBlockCfg(c=16, s=2, **bottle),
        (ByoBlockCfg(c=16, s=2, **bottle),
         ByoBlockCfg(type='mobilevit', d=1, c=16, s=1, gs=None, br=1., block_kwargs=vit))))
    return byobnet.ByobNet(cfg, num_classes=5)


def build(family):
    """The family's tiny model, 5 classes, eval mode, its norms' scales random (LeViT's, Swin V2's start at zero)."""
    name, kwargs, _, _ = FAMILIES[family]
    kwargs = dict(kwargs)
    if kwargs.get('block_fn') == 'ResPostBlock':
        kwargs['block_fn'] = ResPostBlock
    torch.manual_seed(0)
    if callable(name):
        model = name()
        model.reset_classifier(5)
    else:
        model = timm.create_model(name, num_classes=5, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def inputs(family, batch=2):
    torch.manual_seed(1)
    return FAMILIES[family][2](batch)


def cast(x, dtype):
    if isinstance(x, dict):
        return {k: cast(v, dtype) for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def with_addon(base, addon):
    model = copy.deepcopy(base)
    return install(model, attn_scale=addon in ('attnscale', 'both'), feat_scale=addon in ('featscale', 'both'))


def random_gains(model, seed=2):
    """Gains in [-1, 1], the first of each at exactly -1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit('.', 1)[-1] in ADDON:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1)
                p.view(-1)[0] = -1.
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit('.', 1)[-1] in ADDON}


@pytest.mark.parametrize('family', FAMILIES)
def test_zero_gains_compute_timms_model_bit_for_bit(family):
    """Each add-on adds only its gains to the state dict and, at zero, computes timm's logits bit for bit on both
    attention paths, in eval mode, without and with gradients recorded (where the projections run fused)."""
    base = build(family)
    x = inputs(family)
    for addon in models.ADDONS:
        model = models.apply_addon(copy.deepcopy(base), addon)
        gains = [n for n, _ in model.named_parameters() if n.rsplit('.', 1)[-1] in ADDON]
        assert len(gains) == len(self_attention_blocks(model)) * (1 if addon == 'attnscale' else 2)
        assert set(base.state_dict()) == set(model.state_dict()) - set(gains)
        for fused in (True, False):
            for m in (base, model):
                models.set_fused_attn(m, fused)
            with torch.no_grad():
                assert torch.equal(base(x), model(x)), (addon, fused)
            assert torch.equal(base(x), model(x)), (addon, fused)


class Definitions(TorchFunctionMode):
    """On timm's plain model: inside each token-attention module that has AttnScale gains, every softmax map A is
    replaced by (1 + lamb) A - lamb A_dc (per head, on axis -3)."""

    def __init__(self, model, gains, valid_keys=None):
        super().__init__()
        self.current, self.valid_keys = None, valid_keys
        modules = dict(model.named_modules())
        for name, lamb in gains.items():
            owner, key = name.rsplit('.', 1)
            if key == 'lamb':
                m = modules[owner]
                m.register_forward_pre_hook(lambda m, a, lamb=lamb: setattr(self, 'current', lamb))
                m.register_forward_hook(lambda m, a, o: setattr(self, 'current', None))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.current is None or getattr(func, '__name__', '') != 'softmax':
            return out
        lamb = self.current.view(-1, 1, 1)
        n_k = out.shape[-1]
        if self.valid_keys is not None and n_k == self.valid_keys.shape[-1]:
            valid = self.valid_keys.double().view(out.shape[0], *[1] * (out.dim() - 2), n_k)
            a_dc = valid / valid.sum(-1, keepdim=True)
        else:
            a_dc = torch.full_like(out, 1. / n_k)
        return (1 + lamb) * out - lamb * a_dc


def written_out_featscale(y, lamb1, lamb2, layout, valid=None):
    """y + lamb1 DC[y] + lamb2 (y - DC[y]), DC the mean over the image's tokens (the valid ones)."""
    if layout == 'nchw':
        return written_out_featscale(y.permute(0, 2, 3, 1), lamb1, lamb2, 'nhwc').permute(0, 3, 1, 2)
    tokens = y.reshape(y.shape[0], -1, y.shape[-1])
    if valid is None:
        dc = tokens.mean(dim=1, keepdim=True)
    else:
        w = valid.double().unsqueeze(-1)
        dc = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    return (tokens + lamb1 * dc + lamb2 * (tokens - dc)).view(y.shape)


def featscale_hooks(model, gains, where, valid=None):
    """Hooks on the modules (or wraps of the methods) of `model` whose output is the attention branch's output:
    FeatScale written out on it."""
    attr, layout = where
    modules = dict(model.named_modules())
    for name, lamb1 in gains.items():
        owner, key = name.rsplit('.', 1)
        if key != 'lamb1':
            continue
        lamb2 = gains[f'{owner}.lamb2']

        def hook(m, args, out, lamb1=lamb1, lamb2=lamb2):
            if isinstance(out, tuple):
                return (written_out_featscale(out[0], lamb1, lamb2, layout, valid),) + out[1:]
            return written_out_featscale(out, lamb1, lamb2, layout, valid)
        names = (attr,) if isinstance(attr, str) else attr
        target = next(getattr(modules[owner], a) for a in names if hasattr(modules[owner], a))
        if isinstance(target, torch.nn.Module):
            target.register_forward_hook(hook)
        else:  # a method of the block (MaxViT's partitioned attention): wrapped on the instance
            setattr(modules[owner], attr, lambda *args, f=target, h=hook: h(None, args, f(*args)))


def valid_tokens(model, x):
    """(B, N) valid tokens of a NaFlexViT batch: the prefix tokens and the valid patches."""
    if not isinstance(x, dict):
        return None
    prefix = torch.ones(x['patch_valid'].shape[0], model.num_prefix_tokens, dtype=torch.bool)
    return torch.cat([prefix, x['patch_valid']], dim=1)


@pytest.mark.parametrize('addon', models.ADDONS)
@pytest.mark.parametrize('family', FAMILIES)
def test_gains_match_the_written_out_definitions(family, addon):
    base = build(family).double()
    model = with_addon(base, addon)
    gains = random_gains(model)
    x = cast(inputs(family), torch.float64)
    models.set_fused_attn(base, False)
    valid = valid_tokens(base, x)
    with torch.no_grad():
        got, plain = model(x), base(x)
        featscale_hooks(base, gains, FAMILIES[family][3], valid)
        with Definitions(base, gains, valid):
            expected = base(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * scale)
    assert (got - plain).abs().max() > 1e-7 * scale  # the gains act, by far more than the tolerance


@pytest.mark.parametrize('addon', models.ADDONS)
@pytest.mark.parametrize('family', FAMILIES)
def test_fused_forms_equal_the_plain_formulas_with_finite_gradients(family, addon):
    """In float64, so that the comparison is of the formulas, not of float32 rounding (which train-mode batch norms
    amplify)."""
    model = with_addon(build(family).double(), addon).train()
    random_gains(model)
    plain = explicit_formula(model)
    x = cast(inputs(family, batch=3), torch.float64)
    outs = []
    for m in (model, plain):
        torch.manual_seed(3)  # the same dropout masks where timm keeps dropout in its position MLPs
        out = m(x)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-12)
    scale = max(q.grad.abs().max().item() for q in plain.parameters() if q.grad is not None)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10 * scale, msg=n)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.rsplit('.', 1)[-1] in ADDON)


@pytest.mark.parametrize('addon', models.ADDONS)
def test_padded_tokens_never_reach_the_valid_ones(addon):
    """NaFlexViT with non-zero gains: DC[v] and DC[y] run over the valid tokens only, so whatever the padded patches
    hold, the logits stay the same (as in timm's model), while a valid patch changes them."""
    base = build('naflexvit-padding')
    model = with_addon(base, addon)
    random_gains(model)
    x = inputs('naflexvit-padding')
    padded, valid = dict(x), dict(x)
    padded['patches'] = torch.where(x['patch_valid'][..., None], x['patches'], 100 * torch.randn_like(x['patches']))
    valid['patches'] = x['patches'].clone()
    valid['patches'][:, 0] += 1
    assert not x['patch_valid'].all()
    with torch.no_grad():
        for m in (base, model):
            assert torch.equal(m(padded), m(x))
            assert (m(valid) - m(x)).abs().max() > 1e-4
        assert (model(x) - base(x)).abs().max() > 1e-5


@pytest.mark.parametrize('family', ['crossvit', 'volo'])
def test_one_query_attention_gets_no_gains(family):
    """CrossViT's cross-attention (one branch's class token to the other branch) and VOLO's class attention have one
    query per image: no token-to-token map, so neither they nor their blocks take gains; every token-attention
    module does."""
    base = build(family)
    one_query = [n for n, m in base.named_modules() if isinstance(m, tuple(NOT_TOKEN_ATTENTION))]
    attentions = [n for n, _ in token_attention_modules(base)]
    assert len(one_query) >= 1 and len(attentions) >= 2
    for addon in models.ADDONS:
        model = models.apply_addon(copy.deepcopy(base), addon)
        gains = [n.rsplit('.', 1) for n, _ in model.named_parameters() if n.rsplit('.', 1)[-1] in ADDON]
        owners = {owner for owner, _ in gains}
        assert not any(o == q or q.startswith(o + '.') for o in owners for q in one_query)
        if addon == 'attnscale':
            assert sorted(owners) == sorted(attentions)
        else:
            assert len(gains) == 2 * len(attentions)


def test_featscale_only_where_attnscale_is_undefined():
    """XCiT's cross-covariance attention has no token-to-token map: AttnScale is refused in one line that says why,
    with the model untouched; FeatScale installs on every XCA block (not on the class-attention blocks), computes
    timm's logits bit for bit at zero gains (both attention paths), matches y + lamb1 DC[y] + lamb2 HF[y] written
    out on the XCA branch (gains -1 among them), with finite gradients for every gain."""
    torch.manual_seed(0)
    base = timm.create_model('xcit_nano_12_p16_224', img_size=32, depth=2, cls_attn_layers=1, num_classes=5).eval()
    x = image(32)(2)
    with pytest.raises(ValueError, match=r'^AttnScale cannot be installed in Xcit: its attention mixes channels or '
                                         r'runs a linear attention: no token-to-token map, so A_dc is undefined; '
                                         r'FeatScale can \(--addon featscale\)$'):
        models.apply_addon(base, 'attnscale')
    assert not any(n.rsplit('.', 1)[-1] in ADDON for n, _ in base.named_parameters())
    model = models.apply_addon(copy.deepcopy(base), 'featscale')
    gains = [n for n, _ in model.named_parameters() if n.rsplit('.', 1)[-1] in ADDON]
    assert gains == [f'blocks.{i}.{g}' for i in range(2) for g in ('lamb1', 'lamb2')]
    for fused in (True, False):
        models.set_fused_attn(base, fused)
        models.set_fused_attn(model, fused)
        with torch.no_grad():
            assert torch.equal(base(x), model(x)), fused
    base, model = base.double(), model.double()
    values = random_gains(model)
    got = model(x.double())
    got.square().mean().backward()
    with torch.no_grad():
        plain = base(x.double())
        featscale_hooks(base, values, ('attn', 'nlc'))
        expected = base(x.double())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got - plain).abs().max() > 1e-6
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n in gains)
    with torch.no_grad():  # analyze.py: no maps to read, the tokens before and after each block
        found = diagnostics.probe(model.eval(), x.double())
    assert [t.shape for t in found['tokens']] == [(2, 4, 128)] * 3 and not found['attn']
