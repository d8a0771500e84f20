"""AttnScale and FeatScale fused with the operations around them, so that they keep nothing extra for backward.

The formulas are those of `antioversmooth.py`, rearranged:
- `attnscale_values_`: AttnScale through a fused attention kernel, on the values, in place (A'v = A v');
- `attnscale_fused`: the same after the kernel, A'v = (1 + lamb) A v - lamb DC[v] (costs one tensor);
- `featscale_linear`: FeatScale together with the projection that produces y (y itself is not kept).
Each is exact (the same outputs; gradients to rounding). Under TorchScript and torch.compile, where the
custom autograd Functions below do not run, the same formulas run through plain autograd.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import antioversmooth
from .antioversmooth import featscale


class AttnScaleValues(torch.autograd.Function):
    """v <- DC[v] + (1 + lamb) HF[v] in place, formed in float32 (lamb's dtype) and stored in v's dtype.

    Backward keeps v' (which attention keeps anyway), DC[v] and lamb, no other activation:
    HF[v] = HF[v'] / (1 + lamb), so 1 + lamb must not vanish (lamb = -1 would make A' = A_dc).
    """

    @staticmethod
    def forward(ctx, v, lamb):
        dc = v.mean(dim=-2, keepdim=True, dtype=lamb.dtype)
        v.copy_(torch.addcmul(-lamb * dc, v, 1. + lamb))
        ctx.mark_dirty(v)
        ctx.save_for_backward(v, dc, lamb)
        return v

    @staticmethod
    def backward(ctx, grad):
        v, dc, lamb = ctx.saved_tensors
        grad_dc = grad.sum(dim=-2, keepdim=True, dtype=lamb.dtype) * (lamb / grad.shape[-2])
        grad_v = torch.addcmul(-grad_dc, grad, 1. + lamb).to(grad.dtype)
        return grad_v, (grad * (v - dc)).sum_to_size(lamb.shape) / (1. + lamb)


def attnscale_values_(v: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """AttnScale for fused kernels, on the values v (B, H, N, d) before attention, in place; returns v.

    A' v = A v' with v' = DC[v] + (1 + lamb) HF[v]: A_dc v = DC[v] in every row, and A DC[v] = DC[v]
    since A is row-stochastic. Exact whenever no dropout acts on A. In place, v' replaces v in the qkv
    output that the kernel saves anyway, so AttnScale keeps only DC[v] (B, H, 1, d) for backward.
    v must not come from `unbind` (autograd forbids in-place ops there): pass qkv[2] before unbinding.
    """
    lamb = antioversmooth.as_gain(lamb, v).view(-1, 1, 1)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():  # no custom Function there; same formula
        return v.copy_(attnscale_fused(v.clone(), v, lamb))
    return AttnScaleValues.apply(v, lamb)


def attnscale_fused(out: torch.Tensor, v: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """AttnScale applied after attention: A'v = (1 + lamb) (A v) - lamb DC[v].

    out = A v (B, H, N, d) from a fused kernel, v (B, H, N, d). Exact, valid whenever no dropout is
    applied to A. Costs one (B, H, N, d) tensor for backward (the kernel keeps A v, the next layer A'v);
    `attnscale_values_` does not.
    """
    lamb = antioversmooth.as_gain(lamb, out).view(-1, 1, 1)
    dc = v.mean(dim=-2, keepdim=True, dtype=lamb.dtype)
    return torch.addcmul(-lamb * dc, out, 1. + lamb).to(out.dtype)


class FeatScaleLinear(torch.autograd.Function):
    """FeatScale(z W^T + b): the projection y = z W^T + b and FeatScale on y in one step.

    Backward keeps z (which the projection keeps anyway), DC[y] and the parameters, not y: with
    y' = a y + c DC[y] (a = 1 + s lamb2, c = s (lamb1 - lamb2)), sum_n g y = W . (g^T z) + b sum_n g,
    and g^T z (C x K) costs what the projection's weight gradient costs, which follows from it.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, lamb1, lamb2, repeat):
        y = F.linear(z, weight, bias)
        out = featscale(y, lamb1, lamb2, repeat)
        ctx.repeat = repeat
        ctx.save_for_backward(z, weight, bias, lamb1, lamb2, y.mean(dim=-2, keepdim=True, dtype=lamb1.dtype))
        return out

    @staticmethod
    def backward(ctx, grad):
        if not torch.amp.is_autocast_available(grad.device.type):
            return FeatScaleLinear._backward(ctx.repeat, grad, *ctx.saved_tensors)
        with torch.autocast(grad.device.type, enabled=False):
            return FeatScaleLinear._backward(ctx.repeat, grad, *ctx.saved_tensors)

    @staticmethod
    def _backward(s, grad, z, weight, bias, lamb1, lamb2, dc):
        a, c, n = 1. + s * lamb2, s * (lamb1 - lamb2), grad.shape[-2]
        grad_sum = grad.sum(dim=-2, keepdim=True, dtype=a.dtype)  # (B, 1, C)
        w = weight.to(a.dtype)
        grad_z = grad @ (a[:, None] * w).to(grad.dtype)
        grad_z += ((c / n) * grad_sum) @ w
        gz = grad.flatten(0, -2).t() @ z.flatten(0, -2).to(grad.dtype)  # (C, K): g^T z
        z_sum = z.sum(dim=-2, dtype=a.dtype).flatten(0, -2)  # (B, K)
        grad_w = a[:, None] * gz.to(a.dtype) + (c / n)[:, None] * (grad_sum.flatten(0, -2).t() @ z_sum)
        grad_total = grad_sum.flatten(0, -2).sum(0)
        g_y = (gz.to(a.dtype) * w).sum(-1)  # sum over tokens of g * y ...
        if bias is not None:
            g_y = g_y + grad_total * bias.to(a.dtype)  # ... with y's bias
        grad_b = None if bias is None else ((a + c) * grad_total).to(bias.dtype)
        g_dc = (grad_sum * dc).flatten(0, -2).sum(0)  # sum over tokens of g * DC[y]
        return grad_z.to(z.dtype), grad_w.to(weight.dtype), grad_b, s * g_dc, s * (g_y - g_dc), None


def featscale_linear(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lamb1: torch.Tensor,
                     lamb2: torch.Tensor, repeat: float = 1.) -> torch.Tensor:
    """featscale(F.linear(z, weight, bias), lamb1, lamb2, repeat), bit for bit, keeping for backward only what
    the projection keeps (z) and a token mean: FeatScale on the projection that produces y (B, N, C)."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling():  # no custom Function there; same formula
        return featscale(F.linear(z, weight, bias), lamb1, lamb2, repeat)
    device = z.device.type
    if z.dtype == torch.float32 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        z = z.to(torch.get_autocast_dtype(device))  # the copy that autocast's linear would keep
    lamb1, lamb2 = antioversmooth.as_gain(lamb1, z), antioversmooth.as_gain(lamb2, z)
    return FeatScaleLinear.apply(z, weight, bias, lamb1, lamb2, repeat)
