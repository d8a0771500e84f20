"""AttnScale and FeatScale fused with the operations around them: no N x N map, nothing extra kept for backward,
and a handful of small kernels beyond the plain block's, on every device.

The formulas are those of `antioversmooth.py`, rearranged so that the attention kernel and both projections run
as in the plain model and the add-ons act through the output projection's weight and a per-image bias:

- AttnScale, for any map A (softmax, talking heads, masked windows): A'v = (1 + lamb) A v - lamb DC[v]. The
  gain scales the projection's input channels, W (1 + lamb), and -lamb DC[v] W^T joins its bias per image
  (`attnscale_projection`). DC[v] comes from splitting the qkv projection's output into heads
  (`qkv_heads_and_mean`), whose backward writes the qkv gradient in one pass and adds DC[v]'s gradient to it.
- FeatScale on the projection's output y = z W^T + b: y' = (1 + s lamb2) HF[y] + (1 + s lamb1) DC[y], with
  DC[y] = DC[z] W^T + b. The HF gain scales the weight's rows, the rest is a per-image bias
  (`featscale_projection`).

Backward forms the gains' gradients from the projection's weight-gradient product g^T z (the C x C matrix the
plain projection forms anyway) and per-image token sums of g (which replace the plain bias gradient's sum):
Sum g . HF[y] = W . (g^T z - S^T DC[z]) per channel. No division by (1 + lamb) occurs, so every gain value is
exact, -1 included. What each form costs on a GPU is in docs/performance.md (`benchmark.py --cost`).
Under TorchScript, torch.compile and tracing, where the custom Functions below do not run, the same formulas run
through plain autograd (`_plain_*`).
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .antioversmooth import as_gain, featscale


def autocast_off(device_type: str):
    """Autocast disabled (a no-op where the device has none), for steps that choose their own dtypes."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_input(z: torch.Tensor) -> torch.Tensor:
    """z as autocast's linear would take it: in the autocast dtype where autocast is on."""
    device = z.device.type
    if z.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.amp.is_autocast_available(device) \
            and torch.is_autocast_enabled(device):
        return z.to(torch.get_autocast_dtype(device))
    return z


def plain_autograd() -> bool:
    """Whether the custom Functions cannot run here (torch.compile, tracing): use the formulas. Callers test
    `torch.jit.is_scripting()` beside it, in the same condition, so that TorchScript drops the Functions."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _heads(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, d) as views of qkv (B, N, 3 H d), as timm splits them."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _token_mean(v: torch.Tensor) -> torch.Tensor:
    """DC[v] (B, H, 1, d) in float32 or wider."""
    return v.mean(dim=-2, keepdim=True, dtype=torch.promote_types(v.dtype, torch.float32))


@torch.jit.ignore
def key_validity(attn_mask: torch.Tensor) -> torch.Tensor:
    """Which keys an attention mask (..., Nq, Nk) lets at least one query see, as (B or 1, Nk, 1) bool: a padding
    mask's valid tokens. A bool mask attends where True; an additive mask masks with -inf or its dtype's lowest
    value (as timm writes them: entries below half that value count as masked)."""
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    allowed = allowed.any(dim=-2)
    while allowed.dim() > 2:  # heads
        allowed = allowed.any(dim=1)
    return allowed.view(-1, allowed.shape[-1], 1)


def attnscale_values(o: torch.Tensor, mean: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """A'v = (1 + lamb) o - lamb DC[v] from o = A v with the heads on axis -3 and DC[v] (float32) shaped alike, by
    plain autograd: AttnScale for any map where the projection cannot take it. Zero gains give o bit for bit."""
    lamb = as_gain(lamb, mean).view(-1, 1, 1)
    return torch.addcmul(-lamb * mean, o, 1. + lamb).to(o.dtype)


class QKVHeads(torch.autograd.Function):
    """q, k, v views of the qkv projection's output. Backward stacks their gradients into qkv's layout in one
    pass (autograd's own split copies them twice: a stack, then a reshape of the permuted stack)."""

    @staticmethod
    def forward(ctx, qkv, num_heads):
        return _heads(qkv, num_heads)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        grad = torch.stack([g.transpose(1, 2) for g in (grad_q, grad_k, grad_v)], dim=2)  # (B, N, 3, H, d)
        return grad.flatten(2), None


class QKVHeadsAndMean(torch.autograd.Function):
    """`QKVHeads` and DC[v] (B, H, 1, d), float32: backward adds DC[v]'s gradient / N to v's as it writes it."""

    @staticmethod
    def forward(ctx, qkv, num_heads):
        q, k, v = _heads(qkv, num_heads)
        return q, k, v, _token_mean(v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v, grad_mean):
        B, H, N, d = grad_v.shape
        grad = torch.empty(B, N, 3, H, d, dtype=grad_v.dtype, device=grad_v.device)
        grad[:, :, 0] = grad_q.transpose(1, 2)
        grad[:, :, 1] = grad_k.transpose(1, 2)
        torch.add(grad_v.transpose(1, 2), grad_mean.transpose(1, 2), alpha=1. / N, out=grad[:, :, 2])
        return grad.flatten(2), None


def qkv_heads(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, d) from the qkv projection's output (B, N, 3 H d), as timm's reshape/permute/unbind."""
    if torch.jit.is_scripting() or plain_autograd():
        return _heads(qkv, num_heads)
    return QKVHeads.apply(qkv, num_heads)


def qkv_heads_and_mean(qkv: torch.Tensor, num_heads: int):
    """`qkv_heads` and DC[v], the token mean of the values (B, H, 1, d), in float32 (AttnScale's DC term)."""
    if torch.jit.is_scripting() or plain_autograd():
        q, k, v = _heads(qkv, num_heads)
        return q, k, v, _token_mean(v)
    return QKVHeadsAndMean.apply(qkv, num_heads)


def _gain_dtype(lamb: torch.Tensor) -> torch.dtype:
    return torch.promote_types(lamb.dtype, torch.float32)


def _scaled(weight: torch.Tensor, gain: torch.Tensor, dtype: torch.dtype, value: float = 1.,
            per_head: bool = False) -> torch.Tensor:
    """weight * (1 + value * gain) in `dtype` (the product's), formed in float32 or wider and rounded once: gain
    (out,) scales rows; with `per_head`, gain (H,) scales each head's block of input channels."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if per_head:
        shape, gain = (weight.shape[0], gain.numel(), -1), gain.view(-1, 1)
    else:
        shape, gain = (weight.shape[0], -1), gain.view(-1, 1)
    torch.addcmul(weight.view(shape), weight.view(shape), gain, value=value, out=out.view(shape))
    return out


class AttnScaleProjection(torch.autograd.Function):
    """The output projection of AttnScale's attention: (A'v) W^T + b from o = A v (B, N, C), per image.

    A'v = (1 + lamb) o - lamb DC[v] per head, so the projection is o W'^T + (b - (lamb DC[v]) W^T) with
    W' = W (1 + lamb) on each head's input channels: one product and one per-image bias. Backward, with
    g the output's gradient, S its token sums per image and Q = g^T o (the plain weight gradient's product):
    R = Q - S^T DC[v] = g^T (o - DC[v]); dW = Q + lamb R; d(lamb) = Sum over each head's columns of W . R;
    d(DC[v]) = -lamb (S W). Keeps o and W' (as the plain projection keeps o and its weight) and DC[v].
    """

    @staticmethod
    def forward(ctx, o, weight, bias, lamb, mean):
        B, N, C = o.shape
        heads = lamb.numel()
        with autocast_off(o.device.type):
            w_scaled = _scaled(weight, lamb, o.dtype, per_head=True)
            y = F.linear(o, w_scaled, None if bias is None else bias.to(o.dtype))
            shift = (mean.view(B, heads, -1) * lamb.view(heads, 1)).view(B, C)  # lamb DC[v]
            y.sub_(torch.mm(shift, weight.to(lamb.dtype).t()).unsqueeze(1))
        ctx.save_for_backward(o, weight, lamb, mean, w_scaled if w_scaled.dtype != weight.dtype else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        o, weight, lamb, mean, w_scaled = ctx.saved_tensors
        B, N, C = o.shape
        heads, gd = lamb.numel(), lamb.dtype
        per_head = (-1, heads, C // heads)
        with autocast_off(grad.device.type):
            if w_scaled is None:
                w_scaled = _scaled(weight, lamb, o.dtype, per_head=True)
            w, mean = weight.to(gd), mean.view(B, C)
            sums = grad.sum(dim=1, dtype=gd)  # (B, C_out)
            grad_o = torch.matmul(grad, w_scaled)
            grad2, o2 = grad.reshape(-1, grad.shape[-1]).t(), o.reshape(-1, C)
            if o.dtype == gd:
                q = torch.mm(grad2, o2)  # g^T o
                r = torch.addmm(q, sums.t(), mean, alpha=-1)  # g^T (o - DC[v])
                grad_w = q.view(per_head).addcmul_(r.view(per_head), lamb.view(heads, 1))
            else:  # g^T o is dominated by S^T DC[v]: take it out inside the product, before its output is rounded
                dc = torch.mm(sums.t(), mean)
                dc_low = dc.to(o.dtype)
                r = torch.sub(dc_low, dc).add_(dc_low.addmm_(grad2, o2, beta=-1))
                grad_w = dc.add_(r).view(per_head).addcmul_(r.view(per_head), lamb.view(heads, 1))  # g^T o + lamb R
            grad_lamb = (w.view(per_head) * r.view(per_head)).sum(dim=(0, 2))
            grad_mean = torch.addmm(mean, sums, w, beta=0, alpha=-1).view(B, heads, 1, -1).mul_(lamb.view(heads, 1, 1))
            grad_b = sums.sum(0) if ctx.has_bias else None
        return (grad_o, grad_w.view_as(weight).to(weight.dtype), None if grad_b is None else grad_b.to(weight.dtype),
                grad_lamb, grad_mean)


def _attnscale_tokens(o: torch.Tensor, mean: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """A'v = (1 + lamb) o - lamb DC[v] (B, N, C) from o = A v (B, N, C) and DC[v] (B, H, 1, d), by plain autograd."""
    B, N, C = o.shape
    lamb = as_gain(lamb, o).view(-1, 1)
    heads = o.reshape(B, N, lamb.shape[0], C // lamb.shape[0])
    out = torch.addcmul(-lamb * mean.reshape(B, 1, lamb.shape[0], C // lamb.shape[0]), heads, 1. + lamb)
    return out.to(o.dtype).reshape(B, N, C)


def attnscale_projection(o: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lamb: torch.Tensor,
                         mean: torch.Tensor) -> torch.Tensor:
    """F.linear(A'v, weight, bias) from the attention output o = A v (B, N, C, heads concatenated), DC[v]
    (B, H, 1, d) from `qkv_heads_and_mean` and the per-head gains lamb (H,): AttnScale through the projection,
    for any map A. Exact whenever no dropout acts on A; zero gains give F.linear(o, weight, bias)'s numbers."""
    if torch.jit.is_scripting() or plain_autograd():
        return F.linear(_attnscale_tokens(o, mean, lamb), weight, bias)
    o = autocast_input(o)
    return AttnScaleProjection.apply(o, weight, bias, as_gain(lamb, o), mean)


class FeatScaleProjection(torch.autograd.Function):
    """FeatScale on the projection y = z W^T + b (B, N, C): y' = a2 HF[y] + a1 DC[y], a2 = 1 + s lamb2,
    a1 = 1 + s lamb1, written as (z (a2 W)^T + a2 b) + s (lamb1 - lamb2) DC[y] with DC[y] = DC[z] W^T + b.

    Backward, with g the output's gradient, S its token sums and Q = g^T z: dW = a2 Q + c (S^T DC[z]),
    c = s (lamb1 - lamb2); db = a1 Sum S; d(lamb2) = s W . (Q - S^T DC[z]) per row; d(lamb1) = s Sum_b S DC[y];
    dz = g (a2 W) + (c S) W / N per image. Keeps what the plain projection keeps (z, and a2 W where the product
    runs in another dtype than the weight, as autocast keeps its copy), the token means DC[z] and DC[y] and
    lamb1 - lamb2; not y.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, lamb1, lamb2, repeat):
        gd = lamb1.dtype
        with autocast_off(z.device.type):
            mean = z.mean(dim=-2, dtype=gd)  # (B, K)
            w = weight.to(gd)
            if bias is None:
                mean_y = torch.mm(mean, w.t()).mul_(repeat)
            else:
                mean_y = torch.addmm(bias.to(gd), mean, w.t(), beta=repeat, alpha=repeat)  # s DC[y]
            w_scaled = _scaled(weight, lamb2, z.dtype, repeat)
            y = F.linear(z, w_scaled, None if bias is None else _scaled(bias, lamb2, z.dtype, repeat))
            gap = torch.sub(lamb1, lamb2)
            y.addcmul_(mean_y.unsqueeze(1), gap)
        ctx.repeat, ctx.has_bias = repeat, bias is not None
        ctx.save_for_backward(z, weight, bias, lamb1, lamb2, mean, mean_y, gap,
                              w_scaled if w_scaled.dtype != weight.dtype else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, weight, bias, lamb1, lamb2, mean, mean_y, gap, w_scaled = ctx.saved_tensors
        s, gd, (N, K) = ctx.repeat, lamb1.dtype, z.shape[1:]
        with autocast_off(grad.device.type):
            if w_scaled is None:
                w_scaled = _scaled(weight, lamb2, z.dtype, s)
            w = weight.to(gd)
            sums = grad.sum(dim=1, dtype=gd)  # (B, C)
            grad_z = torch.matmul(grad, w_scaled)
            gap_sums = sums * gap
            grad_z.add_(torch.mm(gap_sums, w).unsqueeze(1), alpha=s / N)  # d(c DC[y])/dz, per image
            q = torch.mm(grad.reshape(-1, grad.shape[-1]).t(), z.reshape(-1, K)).to(gd)
            hf = torch.addmm(q, sums.t(), mean, beta=s, alpha=-s)  # s g^T (z - DC[z])
            grad_lamb2 = torch.bmm(w.unsqueeze(1), hf.unsqueeze(2)).view(-1)  # s Sum g . HF[y], per channel
            grad_lamb1 = (sums * mean_y).sum(0)  # s Sum g . DC[y]
            grad_w = q.addcmul_(q, lamb2.view(-1, 1), value=s).addmm_(gap_sums.t(), mean, alpha=s)
            grad_b = None
            if ctx.has_bias:
                total = sums.sum(0)
                grad_b = torch.addcmul(total, total, lamb1, value=s).to(bias.dtype)
        return grad_z, grad_w.to(weight.dtype), grad_b, grad_lamb1, grad_lamb2, None


def featscale_projection(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lamb1: torch.Tensor,
                         lamb2: torch.Tensor, repeat: float = 1.) -> torch.Tensor:
    """featscale(F.linear(z, weight, bias), lamb1, lamb2, repeat) (B, N, C), to rounding, keeping for backward only
    what the projection keeps (z and its weight) and two token means: FeatScale fused with the projection."""
    if torch.jit.is_scripting() or plain_autograd():
        return featscale(F.linear(z, weight, bias), lamb1, lamb2, repeat)
    z = autocast_input(z)
    return FeatScaleProjection.apply(z, weight, bias, as_gain(lamb1, z), as_gain(lamb2, z), repeat)
