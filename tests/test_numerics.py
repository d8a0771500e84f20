"""AttnScale / FeatScale numerics: bfloat16 and float16 autocast against a float64 reference of the official
formula (outputs and dL/dlamb at small lamb), the hand-written backward of AttnScale on the values,
TorchScript and torch.compile, and zero gains under autocast."""
import copy
import types

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from models import antioversmooth
from models.antioversmooth import attnscale, featscale
from models.fused import (affine_linear, attnscale_fused, attnscale_map, attnscale_qkv, attnscale_softmax,
                          attnscale_tokens, featscale_linear)
from test_models import _official_cait_block as official_cait_block  # the released blocks, written out
from test_models import _official_deit_block as official_deit_block

LOW = [torch.bfloat16, torch.float16]
ADDON = ('lamb', 'lamb1', 'lamb2')


def official_float64(model):
    """A float64 copy of `model` whose blocks run the official formula."""
    ref = copy.deepcopy(model).double()
    block = official_cait_block if 'cait' in type(model).__name__.lower() else official_deit_block
    for blk in ref.blocks:
        blk.forward = types.MethodType(block, blk)
    return ref


def loss_and_grads(model, x, y, dtype=None):
    """Logits and {name: gradient} of a cross-entropy step, under `dtype` autocast (None: float64)."""
    model.zero_grad()
    if dtype is None:
        logits = model(x.double())
        loss = F.cross_entropy(logits, y)
    else:
        with torch.autocast('cpu', dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def rel_err(a, ref) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def build(name, fused=True, lamb=None, **kwargs):
    kwargs = dict(depth=4, img_size=32, patch_size=8, num_classes=10, **kwargs)
    if 'cait' in name:
        kwargs.update(depth_token_only=1, init_values=0.5)  # LayerScale 1e-5 would hide the add-ons
    model = timm.create_model(name, **kwargs).train()
    models.set_fused_attn(model, fused)
    if lamb is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.split('.')[-1] in ADDON:
                    p.fill_(lamb)
    return model


CASES = [('deit_tiny_12', 'attnscale_tiny_12', True), ('deit_tiny_12', 'attnscale_tiny_12', False),
         ('deit_tiny_12', 'featscale_tiny_12', True), ('cait_XXS24_224', 'attnscale_cait_XXS24_224', False),
         ('cait_XXS24_224', 'featscale_cait_XXS24_224', False)]


def low_precision_errors(name, fused, dtype):
    """Relative errors (logits, dL/dlamb or, without add-ons, all gradients) of one cross-entropy step under
    `dtype` autocast against float64 of the official formula, at lamb = 1e-3 (early training), batch 8."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.manual_seed(1)  # the same weights for every model; the add-on's gains all 1e-3
    model = build(name, fused, lamb=1e-3)
    ref_logits, ref_grads = loss_and_grads(official_float64(model), x, y)
    logits, grads = loss_and_grads(model, x, y, dtype)
    keys = [n for n in grads if n.split('.')[-1] in ADDON] or list(grads)
    return rel_err(logits, ref_logits), rel_err(torch.cat([grads[k].flatten() for k in keys]),
                                                torch.cat([ref_grads[k].flatten() for k in keys]))


@pytest.mark.parametrize('dtype', LOW, ids=str)
@pytest.mark.parametrize('baseline,name,fused', CASES, ids=[f'{n}-{"fused" if f else "explicit"}' for _, n, f in CASES])
def test_low_precision_is_no_worse_than_the_baseline(baseline, name, fused, dtype, monkeypatch):
    """Logits as accurate as the plain model's; dL/dlamb as accurate as with the add-on's own arithmetic in
    float64, i.e. limited by the low-precision network around it (what the plain model has), not by the add-on.
    Before the gains stayed in float32, float16 fused AttnScale had 3.7x that error, CaiT's FeatScale 35x."""
    base_logits, _ = low_precision_errors(baseline, fused, dtype)
    logits, lamb_grads = low_precision_errors(name, fused, dtype)
    monkeypatch.setattr(antioversmooth, 'as_gain', lambda lamb, x: lamb.double())
    _, network_lamb_grads = low_precision_errors(name, fused, dtype)
    assert logits <= 1.25 * base_logits
    assert lamb_grads <= 1.5 * network_lamb_grads


def _dc_heavy(shape, dtype):
    """Tokens dominated by their mean, as in deep (oversmoothed) layers, exactly representable in `dtype`."""
    return (3. + 0.3 * torch.randn(shape)).to(dtype)


@pytest.mark.parametrize('dtype', LOW, ids=str)
def test_lambda_gradients_of_each_function_in_low_precision(dtype):
    """dL/dlamb of each function on low-precision activations, lamb = 1e-3 in float32, against float64 on
    the same values: 1 + lamb is not rounded and HF[x] is not lost to cancellation. (Before: relative errors
    of 5e-4 to 5e-2; now 1e-7 to 2e-6; 1e-3 for the forms that read HF back from their rounded output; 3e-3
    (bfloat16) and 4e-4 (float16) for the qkv projection's, formed from g^T HF[z], which the projection's
    product rounds as it rounds its own weight gradient.)"""
    torch.manual_seed(0)
    v, out, y = _dc_heavy((4, 3, 50, 16), dtype), _dc_heavy((4, 3, 50, 16), dtype), _dc_heavy((4, 50, 48), dtype)
    attn = torch.rand(4, 3, 50, 50).softmax(-1).to(dtype)

    def scaled_values(v, lamb):  # v' = the values of the projection of tokens z = v with weight [0; 0; I]
        z = v.transpose(1, 2).flatten(-2)
        qkv = attnscale_qkv(z, torch.cat([torch.zeros(96, 48), torch.eye(48)]).to(z.dtype), None, lamb, 3)
        return qkv[..., 96:].unflatten(-1, (3, 16)).transpose(1, 2)

    cases = {'attnscale_qkv': (scaled_values, v, 3), 'attnscale_fused': (lambda o, lamb: attnscale_fused(
        o, v.to(o.dtype), lamb), out, 3), 'attnscale_tokens': (lambda o, lamb: attnscale_tokens(
        o, v.to(o.dtype), lamb), out, 3), 'attnscale': (attnscale, attn, 3), 'attnscale_map': (attnscale_map, attn, 3),
        'featscale': (lambda t, lamb: featscale(t, lamb[:48], lamb[48:], 2.), y, 96)}
    for name, (fn, x, n) in cases.items():
        reads_back = name in ('attnscale_tokens', 'attnscale_map')  # HF from its rounded output
        tolerance = {'attnscale_qkv': 4e-3}.get(name, 2e-3 if reads_back else 1e-5)
        grads = {}
        for prec in (dtype, torch.float64):
            lamb = torch.full((n,), 1e-3, dtype=torch.float32 if prec != torch.float64 else prec, requires_grad=True)
            xp = x.to(prec).requires_grad_()
            result = fn(xp, lamb)
            assert result.dtype == prec, name
            torch.manual_seed(1)  # the same upstream gradient, exactly representable in `dtype`
            result.backward(torch.randn(result.shape).to(dtype).to(prec))
            grads[prec] = lamb.grad.double()
        assert rel_err(grads[dtype], grads[torch.float64]) < tolerance, name


@pytest.mark.parametrize('name', ['featscale_tiny_12', 'featscale_cait_XXS24_224', 'vit_tiny_patch16_224+featscale'])
def test_featscale_fused_with_the_projection_matches_the_plain_block(name, monkeypatch):
    """With gradients recorded, a FeatScale block runs its attention up to the projection and then
    `featscale_linear`; the same model through `attn` then `featscale` gives the same logits and gradients
    (fp32, 1e-5; DC[y] is formed from DC[z]). With dropout after the projection it takes the plain path."""
    torch.manual_seed(0)
    base, _, addon = name.partition('+')
    model = build(base, lamb=None) if not addon else models.apply_addon(build(base), addon)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.split('.')[-1] in ADDON:
                p.normal_(0, 0.3)
    x = torch.randn(4, 3, 32, 32)
    assert all(blk.featscale_fused() for blk in model.blocks)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(models.plugin.FeatScaleProjection, 'featscale_fused', lambda self, on=fused: on)
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits, grads), (plain_logits, plain_grads) = runs
    assert rel_err(logits, plain_logits) < 1e-6
    for n, g in grads.items():
        assert rel_err(g, plain_grads[n]) < 1e-5 or (g - plain_grads[n]).abs().max() < 1e-6, n
    monkeypatch.undo()
    model.blocks[0].attn.proj_drop.p = 0.1
    assert not model.blocks[0].featscale_fused() and model.blocks[1].featscale_fused()
    with torch.no_grad():
        assert not model.blocks[1].featscale_fused()


def _graph_nodes(tensor) -> set:
    """Names of the autograd nodes behind `tensor`."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize('name', ['deit_tiny_12', 'attnscale_tiny_12', 'featscale_tiny_12',
                                  'attnscale_swin_tiny_patch4_window7_224'])
def test_fused_addons_add_no_copy_to_the_backward_graph(name):
    """The fused add-ons run as their own autograd nodes: no in-place op on a view (CopySlices, which copies
    the whole qkv gradient in backward); ViT's AttnScale in the qkv projection, Swin's after the kernel."""
    swin = 'swin' in name
    model = models.create_model(name, img_size=56) if swin else build(name)
    models.set_fused_attn(model, True)
    nodes = _graph_nodes(model(torch.randn(2, 3, 56 if swin else 32, 56 if swin else 32)))
    assert 'CopySlices' not in nodes
    assert ('AttnScaleQKVBackward' in nodes) == ('attnscale' in name and not swin)
    assert ('AttnScaleTokensBackward' in nodes) == swin
    assert ('FeatScaleLinearBackward' in nodes) == ('featscale' in name)


@pytest.mark.parametrize('dtype', LOW, ids=str)
@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('name', ['attnscale_tiny_12', 'featscale_tiny_12'])
@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])  # FeatScale: fused with proj under grad
def test_zero_gains_are_bit_identical_under_autocast(name, fused, dtype, grad):
    torch.manual_seed(0)
    base = build('deit_tiny_12', fused).eval()
    model = build(name, fused).eval()
    models.load_state_dict(model, base.state_dict(), allow_missing_addons=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad), torch.autocast('cpu', dtype):
        assert torch.equal(base(x), model(x))


def test_function_gradients_in_float64():
    """The hand-written backwards of AttnScale in the qkv projection and of FeatScale with the output
    projection, against finite differences (with and without bias)."""
    z, qkv_weight, qkv_bias = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                               for shape in ((2, 5, 4), (18, 4), (18,)))
    lamb = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: attnscale_qkv(*t, 3), (z, qkv_weight, qkv_bias, lamb))
    assert torch.autograd.gradcheck(lambda z, w, a: attnscale_qkv(z, w, None, a, 3), (z, qkv_weight, lamb))
    out, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(attnscale_tokens, (out, v, lamb))
    logits = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attnscale_map, (logits.softmax(-1).detach().requires_grad_(), lamb))
    assert torch.autograd.gradcheck(attnscale_softmax, (logits, lamb))
    y = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    lamb1, lamb2 = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda y, a, b: featscale(y, a, b, 2.), (y, lamb1, lamb2))
    weight, bias = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((6, 4), (6,)))
    assert torch.autograd.gradcheck(lambda *t: featscale_linear(*t, 2.), (z, weight, bias, lamb1, lamb2))
    assert torch.autograd.gradcheck(lambda z, w, a, b: featscale_linear(z, w, None, a, b), (z, weight, lamb1, lamb2))
    z4 = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)  # more leading dimensions
    assert torch.autograd.gradcheck(lambda *t: attnscale_qkv(*t, 3), (z4, qkv_weight, qkv_bias, lamb))
    assert torch.autograd.gradcheck(lambda *t: featscale_linear(*t, 2.), (z4, weight, bias, lamb1, lamb2))


@pytest.mark.parametrize('dtype', [torch.float32, *LOW], ids=str)
def test_featscale_linear_is_featscale_of_the_projection(dtype):
    """Outputs and gradients at least as accurate as featscale(F.linear(...)) (against float64, autocast
    included), and nothing kept for backward but z (which the projection keeps anyway) and float32 DC[z]."""
    torch.manual_seed(0)
    z = torch.randn(4, 9, 16, requires_grad=True)
    weight, bias = torch.randn(24, 16, requires_grad=True), torch.randn(24, requires_grad=True)
    lamb1, lamb2 = (torch.randn(24).mul(0.3).requires_grad_() for _ in range(2))
    inputs, saved = (z, weight, bias, lamb1, lamb2), []
    with torch.autocast('cpu', dtype, enabled=dtype != torch.float32):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fused = featscale_linear(*inputs, 2.)
        plain = featscale(F.linear(z, weight, bias), lamb1, lamb2, 2.)
    kept = [t for t in saved if not any(t is p for p in (weight, bias, lamb1, lamb2))]
    assert [(tuple(t.shape), t.dtype) for t in kept] == [((4, 9, 16), dtype), ((4, 1, 16), torch.float32)]
    upstream = torch.randn(fused.shape).to(dtype)
    exact = featscale(F.linear(*(t.double() for t in inputs[:3])), lamb1.double(), lamb2.double(), 2.)
    assert fused.dtype == dtype and rel_err(fused.double(), exact) <= 1.1 * rel_err(plain.double(), exact) + 1e-7
    for a, b, ref in zip(*(torch.autograd.grad(out, inputs, upstream.to(out.dtype)) for out in (fused, plain, exact))):
        assert rel_err(a.double(), ref) <= 1.1 * rel_err(b.double(), ref) + 1e-7  # no less accurate


@pytest.mark.parametrize('dtype', [torch.float32, *LOW], ids=str)
def test_attnscale_tokens_is_the_correction_after_the_kernel_as_tokens(dtype):
    """attnscale_tokens gives attnscale_fused's numbers, bit for bit, in the (B, N, C) layout the projection
    takes, and keeps for backward only that output (which the projection keeps) and float32 DC[v]."""
    torch.manual_seed(0)
    out, v = (torch.randn(2, 3, 5, 4).to(dtype).requires_grad_() for _ in range(2))
    lamb, saved = torch.randn(3).mul(0.3).requires_grad_(), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        tokens = attnscale_tokens(out, v, lamb)
    assert tokens.shape == (2, 5, 12) and tokens.is_contiguous()
    assert torch.equal(tokens, attnscale_fused(out, v, lamb).transpose(1, 2).reshape(2, 5, 12))
    kept = [t for t in saved if t is not lamb]
    assert [(tuple(t.shape), t.dtype) for t in kept] == [((2, 5, 12), dtype), ((2, 3, 1, 4), torch.float32)]
    assert kept[0].untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()


@pytest.mark.parametrize('dtype', [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize('name', ['attnscale_map', 'attnscale_softmax'])
def test_attnscale_on_a_map_keeps_only_its_output(name, dtype):
    """attnscale_map and attnscale_softmax give attnscale's numbers (of the map, of its softmax), bit for bit,
    contiguous, and keep for backward only that output."""
    torch.manual_seed(0)
    x, lamb, saved = torch.rand(2, 3, 5, 5).to(dtype).transpose(-1, -2), torch.randn(3).requires_grad_(), []
    fn, expected = (attnscale_map, attnscale(x, lamb)) if name == 'attnscale_map' else \
        (attnscale_softmax, attnscale(x.softmax(-1), lamb))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scaled = fn(x.requires_grad_(), lamb)
    assert torch.equal(scaled, expected) and scaled.is_contiguous()
    kept = [t for t in saved if t is not lamb and t.numel() > 3]
    if name == 'attnscale_softmax' and dtype in LOW:  # run apart there: the softmax keeps A
        assert kept[0].untyped_storage().data_ptr() != scaled.untyped_storage().data_ptr()
    else:
        assert len(kept) == 1 and kept[0].untyped_storage().data_ptr() == scaled.untyped_storage().data_ptr()


@pytest.mark.parametrize('dtype', [torch.float32, *LOW], ids=str)
def test_attnscale_softmax_gradients_are_as_accurate_as_the_two_apart(dtype):
    """Against float64, dL/dlamb and dL/dlogits of attnscale_softmax are as accurate as those of softmax then
    attnscale (in float32 it recovers A from A'; in float16/bfloat16 it runs them apart)."""
    torch.manual_seed(0)
    logits, upstream = torch.randn(4, 3, 50, 50).to(dtype), torch.randn(4, 3, 50, 50).to(dtype)
    errors = {}
    for name, fn in (('fused', attnscale_softmax), ('apart', lambda t, lamb: attnscale(t.softmax(-1), lamb))):
        grads = {}
        for prec in (dtype, torch.float64):
            lamb = torch.full((3,), 1e-3, dtype=torch.float64 if prec == torch.float64 else torch.float32,
                              requires_grad=True)
            x = logits.to(prec).clone().requires_grad_()
            fn(x, lamb).backward(upstream.to(prec))
            grads[prec] = (lamb.grad.double(), x.grad.double())
        errors[name] = [rel_err(a, ref) for a, ref in zip(grads[dtype], grads[torch.float64])]
    for fused, apart in zip(errors['fused'], errors['apart']):
        assert fused <= 1.1 * apart + 1e-6


def test_values_form_equals_the_explicit_map():
    """A v' = A' v for row-stochastic A: the fused path's identity."""
    A = torch.rand(2, 3, 7, 7, dtype=torch.float64).softmax(-1)
    v, lamb = torch.randn(2, 3, 7, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = attnscale(A, lamb) @ v
    z, weight = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(36, 5, dtype=torch.float64)
    v_scaled = attnscale_qkv(z, weight, None, lamb, 3).unflatten(-1, (3, 3, 4)).permute(2, 0, 3, 1, 4)[2]
    v_plain = F.linear(z, weight).unflatten(-1, (3, 3, 4)).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close(A @ v_scaled, attnscale(A, lamb) @ v_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attnscale_fused(A @ v, v, lamb), expected, rtol=1e-12, atol=1e-12)


def _addon_block_inputs():
    torch.manual_seed(0)
    x, qkv_weight = torch.randn(2, 9, 24, requires_grad=True), (torch.randn(72, 24) / 24 ** 0.5).requires_grad_()
    lamb, lamb1, lamb2, bias = (torch.randn(n, requires_grad=True) for n in (3, 24, 24, 24))
    return x, qkv_weight, lamb, lamb1, lamb2, (torch.randn(24, 24) / 24 ** 0.5).requires_grad_(), bias


def _addon_block(x, qkv_weight, lamb, lamb1, lamb2, weight, bias):
    """Both add-ons as the fused attention path and the projections use them."""
    qkv = attnscale_qkv(x, qkv_weight, bias.repeat(3), lamb, 3)
    q, k, v = qkv.unflatten(-1, (3, 3, 8)).permute(2, 0, 3, 1, 4).unbind(0)
    z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 24)
    return featscale_linear(z, weight, bias, lamb1, lamb2, 2.)


def test_torch_compile_matches_eager():
    """Under torch.compile the same formulas run through autograd (no custom Functions there)."""
    inputs = _addon_block_inputs()
    grads = []
    for fn in (_addon_block, torch.compile(_addon_block, backend='aot_eager', fullgraph=True)):
        out = fn(*inputs)
        grads.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    for a, b in zip(*grads):  # the λ-gradients are sums over tokens, summed in another order under compile
        assert rel_err(a, b) < 1e-5


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    for name in ('attnscale_tiny_12', 'featscale_tiny_12'):
        model = build(name, lamb=0.3).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_zero_gains_leave_the_input_untouched_in_every_dtype():
    for dtype in (torch.float32, *LOW):
        x = torch.randn(2, 3, 5, 4).to(dtype)
        zero = torch.zeros(3)
        z, weight = torch.randn(2, 5, 8).to(dtype), torch.randn(36, 8).to(dtype)
        assert torch.equal(attnscale_qkv(z, weight, weight[:, 0], zero, 3), F.linear(z, weight, weight[:, 0]))
        gains = torch.zeros(36)
        assert torch.equal(featscale_linear(z, weight, None, gains, gains), F.linear(z, weight))
        assert torch.equal(attnscale_fused(x, x.flip(2), zero), x)
        assert torch.equal(attnscale_tokens(x, x.flip(2), zero), x.transpose(1, 2).flatten(-2))
        assert torch.equal(attnscale(x, zero), x)
        assert torch.equal(attnscale_map(x, zero), x)
        assert torch.equal(attnscale_softmax(x, zero), x.softmax(-1))
        assert torch.equal(featscale(x[0], torch.zeros(4), torch.zeros(4), 2.), x[0])


@pytest.mark.parametrize('start', [0, 8])
@pytest.mark.parametrize('with_bias', [True, False])
def test_affine_linear_folds_into_the_product_as_it_rescales_after_it(start, with_bias, monkeypatch):
    """On the CPU in float32 the scale goes into the weight rows and the shift into a per-image bias, with no
    F.linear; the other path (CUDA, float16/bfloat16, fewer rows than the weight; here forced by float64
    gains) rescales F.linear's output in place. Both give y * scale + shift on channels from `start` on and
    the plain projection before them, for any leading dims."""
    torch.manual_seed(0)
    z, weight = torch.randn(2, 3, 7, 8), torch.randn(12, 8)
    bias = torch.randn(12) if with_bias else None
    scale, shift = 1. + 0.3 * torch.randn(12 - start), torch.randn(2, 3, 1, 12 - start)
    y = F.linear(z.double(), weight.double(), None if bias is None else bias.double())
    expected = torch.cat([y[..., :start], y[..., start:] * scale.double() + shift.double()], dim=-1)
    linear, calls = F.linear, []
    monkeypatch.setattr(F, 'linear', lambda *args: calls.append(1) or linear(*args))
    folded = affine_linear(z, weight, bias, scale, shift, start)
    assert calls == []
    after = affine_linear(z, weight, bias, scale.double(), shift.double(), start)
    assert calls == [1]
    assert folded.dtype == after.dtype == torch.float32 and folded.is_contiguous()
    for out in (folded, after):
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(out[..., :start], linear(z, weight, bias)[..., :start])


def test_affine_linear_with_unit_scale_is_the_projection_bit_for_bit():
    """The fold writes the bias and adds the product as F.linear does, so scale 1 and shift 0 give its bits,
    also with a long reduction (K = 1536) and for fewer rows than the weight (the in-place path)."""
    torch.manual_seed(0)
    for rows in (64, 4):
        z, weight, bias = torch.randn(2, rows // 2, 1536), torch.randn(48, 1536), torch.randn(48)
        shift = torch.zeros(2, 1, 16)
        assert torch.equal(affine_linear(z, weight, bias, torch.ones(16), shift, 32), F.linear(z, weight, bias))


def _values_scaled(z, weight, lamb):  # attnscale_qkv written out with plain ops, 2 heads
    qkv = F.linear(z, weight)
    v, lamb_ = qkv[..., 16:].unflatten(-1, (2, 4)), lamb.view(-1, 1)
    v = ((1. + lamb_) * v - lamb_ * v.float().mean(dim=1, keepdim=True)).to(qkv.dtype)
    return torch.cat([qkv[..., :16], v.flatten(-2)], dim=-1)


@pytest.mark.parametrize('name', ['attnscale_qkv', 'featscale_linear'])
def test_a_half_input_under_bfloat16_autocast_is_cast_as_autocast_casts_it(name):
    """A float16 input under bfloat16 autocast goes to bfloat16, as autocast's linear takes it: outputs and
    all gradients match the plain ops' on the same input, to bfloat16 rounding."""
    torch.manual_seed(0)
    z, lamb = torch.randn(2, 7, 8).half().requires_grad_(), torch.randn(8).mul(0.3).requires_grad_()
    if name == 'attnscale_qkv':
        weight, lamb2 = torch.randn(24, 8).requires_grad_(), None
        fns = (lambda z, w: attnscale_qkv(z, w, None, lamb[:2], 2), lambda z, w: _values_scaled(z, w, lamb[:2]))
    else:
        weight = torch.randn(8, 8).requires_grad_()
        fns = (lambda z, w: featscale_linear(z, w, None, lamb, lamb.flip(0), 2.),
               lambda z, w: featscale(F.linear(z, w), lamb, lamb.flip(0), 2.))
    results = []
    for fn in fns:
        with torch.autocast('cpu', torch.bfloat16):
            out = fn(z, weight)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (z, weight, lamb))))
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert rel_err(a.double(), b.double()) < 2e-2
