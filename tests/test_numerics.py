"""AttnScale / FeatScale numerics: the fused Functions against finite differences and written-out formulas, every
family's gradients at extreme gains, low precision against the explicit formula, TorchScript, tracing,
torch.compile, double backward, and one code path for every device."""
import copy
import io
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import gpu_cost
import models
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
from gain_precision import explicit_formula, gain_gradients as lamb_grads  # noqa: E402
from models.antioversmooth import attnscale, featscale
from models.fused import attnscale_projection, featscale_projection, qkv_heads, qkv_heads_and_mean

LOW = [torch.bfloat16, torch.float16]
ADDON = ('lamb', 'lamb1', 'lamb2')
SWIN = dict(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7)
FAMILIES = {  # registered name: (kwargs, image size)
    'attnscale_tiny_12': (dict(depth=3, img_size=32, patch_size=8), 32),
    'featscale_tiny_12': (dict(depth=3, img_size=32, patch_size=8), 32),
    'attnscale_cait_XXS24_224': (dict(depth=3, img_size=32, patch_size=8, depth_token_only=1, init_values=0.5), 32),
    'featscale_cait_XXS24_224': (dict(depth=3, img_size=32, patch_size=8, depth_token_only=1, init_values=0.5), 32),
    'attnscale_swin_tiny_patch4_window7_224': (SWIN, 56),
    'featscale_swin_tiny_patch4_window7_224': (SWIN, 56),
}


def rel_err(a, ref) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def build(name, gains=None, **extra):
    kwargs, size = FAMILIES[name]
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0., **kwargs, **extra).eval()
    if gains is not None:
        set_gains(model, gains)
    return model, size


def set_gains(model, value):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.split('.')[-1] in ADDON:
                p.fill_(value)


def gains_of(model) -> list:
    return [p for n, p in model.named_parameters() if n.split('.')[-1] in ADDON]


def batch(size, n=4):
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


@pytest.mark.parametrize('gain', [-1., -0.99, 0.3])
@pytest.mark.parametrize('name', FAMILIES)
def test_gain_gradients_against_finite_differences(name, gain):
    """dL/d(gains) on the path a training step takes (gradients recorded, fused Functions), in float32 and under
    bfloat16 autocast, against float64 central differences of the same model on 12 of the gains: relative errors
    within 2e-3 and 0.1; every gradient finite, AttnScale's lamb = -1 (the uniform map) included."""
    if name.startswith('featscale') and name.endswith('_12'):
        gain /= 2.  # the released DeiT models double FeatScale's terms: -1/s is their singular-looking point
    model, size = build(name, gain)
    x, y = batch(size)
    grads = {dtype: lamb_grads(model, x, y, dtype) for dtype in (None, torch.bfloat16)}
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    gains = torch.nn.utils.parameters_to_vector(gains_of(model.double())).detach()
    probes = torch.randperm(gains.numel(), generator=torch.Generator().manual_seed(2))[:12]
    fd = []
    for i in probes:
        losses = []
        for step in (1e-5, -1e-5):
            shifted = gains.clone()
            shifted[i] += step
            torch.nn.utils.vector_to_parameters(shifted, gains_of(model))
            with torch.no_grad():
                losses.append(F.cross_entropy(model(x.double()), y))
        fd.append((losses[0] - losses[1]).item() / 2e-5)
    for dtype, tolerance in ((None, 2e-3), (torch.bfloat16, 0.1)):
        assert rel_err(grads[dtype][probes], torch.tensor(fd, dtype=torch.float64)) <= tolerance, dtype


SWIN_T4 = (dict(depths=(2, 2, 2, 2)), 224, 4)
BOUND = {  # toy models, and Swin with Swin-T's four stages at 224 px where the two-stage toy's maps are nearly
    # uniform (lamb-gradients of 1e-6), far from the real model's regime: A v rounded to 16 bits hardly differs
    # from DC[v] there, and both paths' errors are set by that rounding; 4 images (with 2, one image's noise
    # decides the float16 ratio: 1.00 to 1.46 by seed)
    **{(name, dtype): None for name in FAMILIES for dtype in LOW if 'swin' not in name},
    **{(name, torch.bfloat16): SWIN_T4 for name in FAMILIES if 'swin' in name},
    ('featscale_swin_tiny_patch4_window7_224', torch.float16): None,
    ('attnscale_swin_tiny_patch4_window7_224', torch.float16): SWIN_T4,  # float16 on a CPU: a minute
}


@pytest.mark.parametrize('name,dtype', [
    pytest.param(n, d, id=f'{n}-{str(d)[6:]}', marks=[pytest.mark.slow] if (n, d) == (
        'attnscale_swin_tiny_patch4_window7_224', torch.float16) else []) for n, d in BOUND])
def test_low_precision_gain_gradients_are_as_accurate_as_the_explicit_formula(name, dtype):
    """Under autocast, dL/d(gains) on the path a GPU run takes is within 1.25x the error of the explicit formula
    (the map A' formed, FeatScale after the projection) run in the same precision, both against float64 of the
    explicit formula, at gains 3e-3 (early training, where A is near uniform and DC dominates)."""
    config = BOUND[name, dtype]
    if config is None:
        model, size = build(name, 3e-3)
        x, y = batch(size, 8)
    else:
        kwargs, size, n = config
        torch.manual_seed(1)
        model = timm.create_model(name, num_classes=10, drop_path_rate=0., **kwargs)
        set_gains(model, 3e-3)
        x, y = batch(size, n)
    model.train()
    explicit = explicit_formula(model)
    ref = lamb_grads(copy.deepcopy(explicit).double(), x.double(), y)
    fused = rel_err(lamb_grads(model, x, y, dtype), ref)
    written = rel_err(lamb_grads(explicit, x, y, dtype), ref)
    assert fused <= 1.25 * written, (fused, written)


def test_functions_against_finite_differences():
    """gradcheck (float64 finite differences) of every hand-written backward, with and without bias, at gains
    that include -1."""
    torch.manual_seed(0)
    d64 = dict(dtype=torch.float64, requires_grad=True)
    qkv = torch.randn(2, 5, 18, **d64)
    assert torch.autograd.gradcheck(lambda t: qkv_heads(t, 3), (qkv,))
    assert torch.autograd.gradcheck(lambda t: qkv_heads_and_mean(t, 3), (qkv,))
    o, mean = torch.randn(2, 5, 6, **d64), torch.randn(2, 3, 1, 2, **d64)
    weight, bias = torch.randn(4, 6, **d64), torch.randn(4, **d64)
    lamb = torch.tensor([-1., 0.3, -0.99], **d64)
    assert torch.autograd.gradcheck(attnscale_projection, (o, weight, bias, lamb, mean))
    assert torch.autograd.gradcheck(lambda o, w, a, m: attnscale_projection(o, w, None, a, m), (o, weight, lamb, mean))
    lamb1, lamb2 = torch.tensor([-0.5, 0.2, 1., -1.], **d64), torch.tensor([0.3, -0.5, -1., 0.1], **d64)
    assert torch.autograd.gradcheck(lambda *t: featscale_projection(*t, 2.), (o, weight, bias, lamb1, lamb2))
    assert torch.autograd.gradcheck(lambda o, w, a, b: featscale_projection(o, w, None, a, b), (o, weight, lamb1, lamb2))


def test_functions_compute_the_written_out_formulas():
    """attnscale_projection(A v, ..., DC[v]) = F.linear(A'v) with A' = (1 + lamb) A - lamb / N, for a map A that is
    not row-stochastic (CaiT's) too; featscale_projection = y + s (lamb1 DC[y] + lamb2 HF[y]); float64."""
    torch.manual_seed(0)
    A, v = torch.rand(2, 3, 7, 7, dtype=torch.float64), torch.randn(2, 3, 7, 4, dtype=torch.float64)
    lamb, weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64), \
        torch.randn(5, dtype=torch.float64)
    written = ((1. + lamb.view(3, 1, 1)) * A - lamb.view(3, 1, 1) / 7) @ v
    expected = F.linear(written.transpose(1, 2).reshape(2, 7, 12), weight, bias)
    o = (A @ v).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(attnscale_projection(o, weight, bias, lamb, v.mean(-2, keepdim=True)), expected)
    y = F.linear(o, weight, bias)
    lamb1, lamb2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    dc = y.mean(1, keepdim=True)
    torch.testing.assert_close(featscale_projection(o, weight, bias, lamb1, lamb2, 2.),
                               y + 2. * (lamb1 * dc + lamb2 * (y - dc)))


@pytest.mark.parametrize('dtype', LOW, ids=str)
def test_attnscale_gradient_survives_a_dc_dominated_product(dtype):
    """On values dominated 100:1 by their mean (near-uniform attention, deep layers), dL/dlamb of
    attnscale_projection in low precision, from the same rounded inputs, is within the dtype's epsilon of float64 of
    the written-out formula: the product subtracts S^T DC[v] before rounding its output. Rounding g^T o first, then
    subtracting, is more than 10x further off (bfloat16: 0.0027 against 0.34)."""
    torch.manual_seed(0)
    o = (3. + 0.03 * torch.randn(4, 50, 48)).to(dtype)
    mean = o.float().mean(1).view(4, 3, 1, 16) + 0.001 * torch.randn(4, 3, 1, 16)
    weight, upstream = torch.randn(24, 48) / 7, torch.randn(4, 50, 24).to(dtype)
    lamb = torch.full((3,), 1e-3, requires_grad=True)
    attnscale_projection(o, weight, None, lamb, mean).backward(upstream)
    heads = o.double().view(4, 50, 3, 16) - mean.double().view(4, 1, 3, 16)
    exact = ((upstream.double() @ weight.double()).view(4, 50, 3, 16) * heads).sum((0, 1, 3))  # dL/dlamb
    rounded = (upstream.flatten(0, 1).t() @ o.flatten(0, 1)).double() - upstream.double().sum(1).t() @ mean.double(
    ).view(4, 48)
    naive = (weight.double() * rounded).view(24, 3, 16).sum((0, 2))  # g^T o rounded, then S^T DC[v] subtracted
    error = rel_err(lamb.grad.double(), exact)
    assert error < torch.finfo(dtype).eps and rel_err(naive, exact) > 10 * error


@pytest.mark.parametrize('dtype', [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize('name', ['attnscale_tiny_12', 'featscale_tiny_12'])
def test_zero_gains_are_bit_identical(name, dtype):
    """Zero gains give the plain model's logits bit for bit, with and without gradients recorded, under autocast."""
    torch.manual_seed(0)
    base = timm.create_model('deit_tiny_12', depth=2, img_size=32, patch_size=8, num_classes=10).eval()
    model = timm.create_model(name, depth=2, img_size=32, patch_size=8, num_classes=10).eval()
    models.load_state_dict(model, base.state_dict(), allow_missing_addons=True)
    x = torch.randn(2, 3, 32, 32)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.autocast('cpu', dtype, enabled=dtype != torch.float32):
            assert torch.equal(base(x), model(x))


def _graph_nodes(tensor) -> set:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize('name', ['attnscale_tiny_12', 'featscale_tiny_12', 'attnscale_swin_tiny_patch4_window7_224'])
def test_the_addons_run_as_their_own_autograd_nodes(name):
    """No in-place op on a view (CopySlices copies the whole gradient); the qkv split, AttnScale's projection and
    FeatScale's projection are one node each."""
    model, size = build(name)
    nodes = _graph_nodes(model(torch.randn(2, 3, size, size)))
    assert 'CopySlices' not in nodes
    assert ('QKVHeadsAndMeanBackward' in nodes) == ('AttnScaleProjectionBackward' in nodes) == ('attnscale' in name)
    assert ('FeatScaleProjectionBackward' in nodes) == ('featscale' in name)


@pytest.mark.parametrize('name', FAMILIES)
def test_trace_save_load_and_export_give_the_eager_logits(name, tmp_path):
    """torch.jit.trace records the plain formulas (no Python Function), so the trace saves and loads; torch.export
    exports the model; both give the eager logits."""
    model, size = build(name, 0.2)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torchscript_matches_eager():
    for name in ('attnscale_tiny_12', 'featscale_tiny_12'):
        model, size = build(name, 0.3)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    """Under torch.compile the same formulas run through autograd (no custom Functions there)."""
    torch.manual_seed(0)
    inputs = [torch.randn(*shape, requires_grad=True) for shape in ((2, 9, 72), (24, 24), (24,), (3,), (24,), (24,))]

    def block(qkv, weight, bias, lamb, lamb1, lamb2):
        q, k, v, mean = qkv_heads_and_mean(qkv, 3)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 24)
        return featscale_projection(attnscale_projection(o, weight, bias, lamb, mean), weight, bias, lamb1, lamb2, 2.)

    results = []
    for fn in (block, torch.compile(block, backend='aot_eager', fullgraph=True)):
        out = fn(*inputs)
        results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize('name', ['attnscale_tiny_12', 'featscale_tiny_12'])
def test_double_backward_is_refused_in_one_line(name):
    """The hand-written backwards are once-differentiable: a second derivative through them raises, never a
    silently wrong number (on the explicit attention path: the CPU's fused kernel has no second derivative)."""
    model, size = build(name, 0.2)
    models.set_fused_attn(model, False)
    loss = model(torch.randn(2, 3, size, size)).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)  # e.g. a gradient penalty
    with pytest.raises(RuntimeError, match='once_differentiable'):
        (loss + sum(g.square().sum() for g in grads)).backward()


def test_double_backward_of_the_plain_model_equals_timms():
    """The plain models' qkv split (one pass in backward) is differentiable twice and gives timm's second
    derivatives (on the explicit attention path: the CPU's fused kernel has no second derivative)."""
    torch.manual_seed(0)
    ours = timm.create_model('deit_tiny_12', depth=2, img_size=32, patch_size=8, num_classes=10)
    theirs = timm.create_model('deit_tiny_patch16_224', depth=2, img_size=32, patch_size=8, num_classes=10)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        models.set_fused_attn(model, False)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    hvps = []
    for model in (ours, theirs):
        (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad(grad.square().sum(), model.blocks[0].attn.qkv.weight)[0])
    torch.testing.assert_close(*hvps, rtol=1e-5, atol=1e-6)


def _dispatched(model, x) -> list:
    """The aten ops one training step dispatches, attention as one kernel (gpu_cost's accounting)."""
    account = gpu_cost.Account()
    counter = gpu_cost.OpCounter(account)
    with gpu_cost.FlashAttention(counter), counter:
        model(x).sum().backward()
    return [op.name for op in account.ops]


@pytest.mark.parametrize('name', ['attnscale_tiny_12', 'featscale_tiny_12', 'attnscale_cait_XXS24_224',
                                  'featscale_swin_tiny_patch4_window7_224'])
def test_one_code_path_for_every_device(name):
    """The same model on the CPU and on the meta device dispatches the same ops: nothing branches on the device."""
    model, size = build(name, 0.2)
    model.train()
    ops = {}
    for device in ('cpu', 'meta'):
        ops[device] = _dispatched(copy.deepcopy(model).to(device), torch.randn(2, 3, size, size, device=device))
    assert len(ops['cpu']) > 50 and ops['cpu'] == ops['meta']


def test_zero_gains_leave_the_plain_projection_untouched_in_every_dtype():
    for dtype in (torch.float32, *LOW):
        torch.manual_seed(0)
        o, weight, bias = torch.randn(2, 5, 8).to(dtype), torch.randn(6, 8).to(dtype), torch.randn(6).to(dtype)
        mean = torch.randn(2, 2, 1, 4)
        assert torch.equal(attnscale_projection(o, weight, bias, torch.zeros(2), mean), F.linear(o, weight, bias))
        assert torch.equal(featscale_projection(o, weight, bias, torch.zeros(6), torch.zeros(6), 2.),
                           F.linear(o, weight, bias))
        assert torch.equal(attnscale(o, torch.zeros(1)), o)
        assert torch.equal(featscale(o, torch.zeros(8), torch.zeros(8), 2.), o)


@pytest.mark.parametrize('name', ['attnscale', 'featscale'])
def test_a_half_input_under_bfloat16_autocast_is_cast_as_autocast_casts_it(name):
    """A float16 input under bfloat16 autocast goes to bfloat16, as autocast's linear takes it: outputs and all
    gradients match the written-out ops' on the same input, to bfloat16 rounding."""
    torch.manual_seed(0)
    o, lamb = torch.randn(2, 7, 8).half().requires_grad_(), torch.randn(8).mul(0.3).requires_grad_()
    weight, mean = torch.randn(8, 8).requires_grad_(), torch.randn(2, 2, 1, 4)
    if name == 'attnscale':
        fns = (lambda o, w: attnscale_projection(o, w, None, lamb[:2], mean),
               lambda o, w: F.linear(((1. + lamb[:2].view(2, 1)) * o.float().view(2, 7, 2, 4)
                                      - lamb[:2].view(2, 1) * mean.view(2, 1, 2, 4)).view(2, 7, 8), w))
    else:
        fns = (lambda o, w: featscale_projection(o, w, None, lamb, lamb.flip(0), 2.),
               lambda o, w: featscale(F.linear(o, w), lamb, lamb.flip(0), 2.))
    results = []
    for fn in fns:
        with torch.autocast('cpu', torch.bfloat16):
            out = fn(o, weight)
        results.append((out.float(), *torch.autograd.grad(out.float().square().sum(), (o, weight, lamb))))
    assert results[0][0].dtype == torch.float32
    for a, b in zip(*results):
        assert rel_err(a.double(), b.double()) < 2e-2


@pytest.mark.parametrize('name', ['featscale_tiny_12', 'featscale_cait_XXS24_224'])
def test_featscale_fused_with_the_projection_matches_featscale_after_it(name):
    """The block runs FeatScale fused with its projection unless hooks watch the attention module: both give the
    same logits and gradients (float32)."""
    model, size = build(name, None)
    with torch.no_grad():
        for p in gains_of(model):
            p.normal_(0, 0.3)
    x = torch.randn(4, 3, size, size)
    runs = []
    for hooked in (False, True):
        handles = [blk.attn.register_forward_hook(lambda *a: None) for blk in model.blocks] if hooked else []
        assert all(blk.featscale_fused() != hooked for blk in model.blocks)
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        for h in handles:
            h.remove()
    (logits, grads), (plain_logits, plain_grads) = runs
    assert rel_err(logits, plain_logits) < 1e-6
    for n, g in grads.items():
        assert rel_err(g, plain_grads[n]) < 1e-5 or (g - plain_grads[n]).abs().max() < 1e-6, n
    model.train()
    model.blocks[0].attn.proj_drop.p = 0.1
    assert not model.blocks[0].featscale_fused() and model.blocks[1].featscale_fused()


def test_gain_precision_script_prints_both_paths_errors(capsys):
    """scripts/gain_precision.py: per dtype, the training path's and the explicit formula's relative errors of
    dL/d(gains), nonzero and small under bfloat16 at 3e-3 gains, and their ratio; a timm model + add-on too."""
    import gain_precision
    tiny = ['--img-size', '32', '--model-kwargs', 'depth=2', 'patch_size=8', '--batch-size', '2']
    for model in ('attnscale_tiny_12', 'deit_tiny_patch16_224+featscale'):
        assert gain_precision.main([model, *tiny, '--dtype', 'bfloat16', 'float16', '--gain', '0.01']) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == (f'{model}: relative error of dL/d(gains) against float64 of the explicit formula, '
                            'gains 0.01, batch 2, 32 px')
        for line, dtype in zip(lines[1:], ('bfloat16', 'float16')):
            name, _, _, fused, _, _, written, _, ratio = line.split()
            assert name == dtype and 0 < float(fused) < 0.1 and 0 < float(written) < 0.1
            assert float(ratio) == pytest.approx(float(fused) / float(written), abs=0.01, rel=0.05)
        assert len(lines) == 3
