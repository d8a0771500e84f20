"""The add-on gains' gradients under float16 / bfloat16 autocast against float64 (section 1 of scripts/gpu_check.py),
and the sabotage of those gradients that proves the check can fail.

For every add-on path (AttnScale and FeatScale in ViT/DeiT, CaiT and Swin) the model runs as in training: train
mode, the attention path it trains with (fused where it has one), gradients recorded, under autocast; dL/dλ of every
gain (`lamb`, `lamb1`, `lamb2`) is compared with central finite differences of the same loss in float64, which
use no gradient code at all. The error is ||g - g_ref|| / ||g_ref|| over the gains checked, and it must stay within
BOUND_UNITS times the dtype's unit roundoff u (float16: 2^-11, bfloat16: 2^-8).

Two choices keep the comparison meaningful rather than noise: the gains are set to random values (at their zero
init AttnScale and FeatScale are the identity and every path agrees trivially), and every linear layer is drawn
with unit variance (1/fan_in), so attention maps are far from uniform as in a trained model. At timm's
initialisation the maps are nearly uniform, A - 1/N cancels almost exactly and dL/dλ is lost to rounding in
bfloat16 in any implementation (errors of 10-50% on toy models, explicit path included).
"""
import contextlib
import copy
import math

import torch
import torch.nn.functional as F

import models
from engine import autocast
from models.checkpoint import ADDON_KEY

BOUND_UNITS = 32
UNIT_ROUNDOFF = {'float16': 2. ** -11, 'bfloat16': 2. ** -8}
FD_STEP = 1e-3  # float64 central differences: truncation error ~ step^2, rounding ~ 1e-16 / step
FAMILIES = {  # family -> (model name with {addon}, toy kwargs, full-size kwargs, toy image size, full image size)
    'ViT': ('{addon}_tiny_12', dict(depth=2, embed_dim=48, num_heads=2, patch_size=8), dict(depth=2), 32, 224),
    'CaiT': ('{addon}_cait_XXS24_224', dict(depth=2, embed_dim=48, num_heads=2, patch_size=8, init_values=0.5),
             dict(depth=2, init_values=0.5), 32, 224),
    'Swin': ('{addon}_swin_tiny_patch4_window7_224', dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2)),
             dict(depths=(2, 2), num_heads=(3, 6)), 56, 224),
}
FULL_NAMES = {'ViT': '{addon}_small_12', 'CaiT': '{addon}_cait_S24_224'}  # full-size widths: DeiT-S, CaiT-S24
SABOTAGES = {  # what a hook on each gain does to its gradient
    'zero': torch.zeros_like,
    'negate': torch.neg,
    'x10': lambda g: g * 10,
    'nan': lambda g: torch.full_like(g, math.nan),
}


def gains(model) -> list:
    """(name, parameter) of the add-on gains, in model order."""
    return [(n, p) for n, p in model.named_parameters() if ADDON_KEY.search(n)]


@contextlib.contextmanager
def sabotaged(model, kind):
    """Within the block, every gain's gradient goes through SABOTAGES[kind] (a tensor hook on the parameter; the
    models' code is untouched). `kind` None: nothing happens."""
    handles = [p.register_hook(SABOTAGES[kind]) for _, p in gains(model)] if kind else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def bound(dtype: str) -> float:
    return BOUND_UNITS * UNIT_ROUNDOFF[dtype]


def build(family: str, addon: str, tiny: bool, device: torch.device) -> torch.nn.Module:
    """The add-on model of `family` with random gains (std 0.5) and unit-variance linear layers, no dropout or
    drop path, in train mode on `device`."""
    name, toy, full, toy_size, full_size = FAMILIES[family]
    if not tiny:
        name = FULL_NAMES.get(family, name)
    torch.manual_seed(0)
    model = models.create_model(name.format(addon=addon), num_classes=10, drop_path_rate=0.,
                                img_size=toy_size if tiny else full_size, **(toy if tiny else full))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0., module.in_features ** -0.5)
        for _, p in gains(model):
            p.normal_(0., 0.5)
    return model.to(device).train()


def sample(model, batch: int, device: torch.device) -> tuple:
    """A batch of random images and labels for `model`."""
    size = model.patch_embed.img_size[0]
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, size, size, generator=gen).to(device),
            torch.randint(0, 10, (batch,), generator=gen).to(device))


def checked_entries(model, per_tensor: int) -> list:
    """(gain index, flat indices) of the entries checked: all of a gain with at most `per_tensor` entries (0: no
    limit), else `per_tensor` of them at random (seeded)."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for i, (_, p) in enumerate(gains(model)):
        n = p.numel()
        out.append((i, torch.arange(n) if not per_tensor or n <= per_tensor else
                    torch.randperm(n, generator=gen)[:per_tensor].sort().values))
    return out


def loss_of(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).to(torch.float64 if x.dtype == torch.float64 else torch.float32), y)


@torch.no_grad()
def reference_gradient(model, x, y, entries) -> torch.Tensor:
    """dL/dλ of the checked entries by central differences of the loss, everything in float64 (on a copy)."""
    ref = copy.deepcopy(model).double()
    x = x.double()
    params = [p for _, p in gains(ref)]
    out = []
    for i, indices in entries:
        flat = params[i].view(-1)
        for j in indices.tolist():
            value = flat[j].item()
            flat[j] = value + FD_STEP
            up = loss_of(ref, x, y)
            flat[j] = value - FD_STEP
            down = loss_of(ref, x, y)
            flat[j] = value
            out.append((up - down).item() / (2 * FD_STEP))
    return torch.tensor(out, dtype=torch.float64)


def low_precision_gradient(model, x, y, dtype: str, entries, sabotage=None) -> torch.Tensor:
    """dL/dλ of the checked entries from one training forward/backward under `dtype` autocast, in float64. The
    float16 loss is scaled by 2^10 as a GradScaler would (small gradients would flush to zero otherwise)."""
    scale = 2. ** 10 if dtype == 'float16' else 1.
    model.zero_grad(set_to_none=True)
    with sabotaged(model, sabotage):
        with autocast(x.device, getattr(torch, dtype)):
            loss = loss_of(model, x, y)
        (loss * scale).backward()
    params = [p for _, p in gains(model)]
    return torch.cat([params[i].grad.view(-1)[indices.to(x.device)].double().cpu() / scale for i, indices in entries])


def check(tiny: bool, device: torch.device, batch: int, per_tensor: int, sabotage=None, cache=None) -> list:
    """Rows of section 1: one per add-on, family and dtype. `cache` keeps the float64 references (they do not
    depend on the sabotage) across calls."""
    cache = {} if cache is None else cache
    rows = []
    for addon in ('attnscale', 'featscale'):
        for family in FAMILIES:
            model = build(family, addon, tiny, device)
            x, y = sample(model, batch, device)
            entries = checked_entries(model, per_tensor)
            if (addon, family) not in cache:
                cache[addon, family] = reference_gradient(model, x, y, entries)
            ref = cache[addon, family]
            total = sum(p.numel() for _, p in gains(model))
            for dtype in ('float16', 'bfloat16'):
                got = low_precision_gradient(model, x, y, dtype, entries, sabotage)
                err = ((got - ref).norm() / ref.norm()).item()
                ok = err <= bound(dtype)  # False for NaN
                rows.append(dict(
                    section='dL/dλ vs float64', setting=f'{addon} {family}, {dtype}', ok=ok,
                    numbers=dict(error=err, bound=bound(dtype), checked=len(ref), gains=total,
                                 reference_norm=ref.norm().item()),
                    result=f"relative error {err:.1e} {'<=' if ok else 'NOT <='} {bound(dtype):.1e} "
                           f'({BOUND_UNITS}u), {len(ref)} of {total} gains'))
    return rows
