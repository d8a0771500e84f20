"""AttnScale and FeatScale fused with the operations around them, so that they keep nothing extra for backward.

The formulas are those of `antioversmooth.py`, rearranged:
- `attnscale_qkv`: AttnScale through a fused attention kernel, on the values, in the qkv projection (A'v = A v');
- `attnscale_tokens`: the same after a kernel that keeps no A v, A'v = (1 + lamb) A v - lamb DC[v], as tokens;
- `attnscale_fused`: that formula in plain autograd (costs one tensor where the kernel keeps A v);
- `attnscale_map`, `attnscale_softmax`: AttnScale on an explicit map (or on the softmax that forms it), keeping
  only its output;
- `featscale_linear`: FeatScale together with the projection that produces y (y itself is not kept).
Each is exact: the same numbers to rounding (with zero gains, the plain operation's bit for bit). The two
with a projection form DC and the gains' gradients from the projection's input and its weight gradient's
product, not from a pass over their output, and apply the gains through the product itself on the CPU in
float32 and float64 (`affine_linear`). Under TorchScript and torch.compile, where the custom autograd
Functions below do not run, the same formulas run through plain autograd.
"""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from . import antioversmooth
from .antioversmooth import featscale


def autocast_off(device_type: str):
    """Autocast disabled, for hand-written backwards that cast for themselves (a no-op where the device has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_input(z: torch.Tensor) -> torch.Tensor:
    """z as autocast's linear would take it: in the autocast dtype where autocast is on. The Functions below
    run their projection inside and keep this copy for backward, where autocast's linear would keep it."""
    device = z.device.type
    if z.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.amp.is_autocast_available(device) \
            and torch.is_autocast_enabled(device):
        return z.to(torch.get_autocast_dtype(device))
    return z


def input_mean(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> tuple:
    """(DC[z] (B, 1, K), DC[z W^T + b] = DC[z] W^T + b (B, 1, C)) in `dtype`: the token mean of a projection
    from that of its input, without a pass over its output."""
    with autocast_off(z.device.type):
        dc_z = z.sum(dim=-2, keepdim=True, dtype=dtype) / z.shape[-2]
        dc = dc_z @ weight.to(z.dtype).to(dtype).t()  # the weight as the product used it (autocast rounds it)
        if bias is not None:
            dc += bias.to(z.dtype)
        return dc_z, dc


def affine_linear(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                  shift: torch.Tensor, start: int = 0) -> torch.Tensor:
    """F.linear(z, weight, bias) with its output channels from `start` on taken to y * scale + shift: scale
    (O - start,) per channel, shift (..., 1, O - start) per image, both in float32 or wider.

    On the CPU in float32 and float64, F.linear of a contiguous z writes its bias into the output and adds
    the product onto it. Here the scale goes into those weight rows and the shift into a per-image bias
    written the same way, so no pass over the output follows the product (scale 1 and shift 0 give
    F.linear's bits). Elsewhere those channels are rescaled in place after the product: CUDA adds the bias
    inside its product; in float16/bfloat16 scale * W would be rounded to the activation's dtype (1 + lamb
    is 1 in bfloat16 for |lamb| < 2^-9); and where z has fewer rows than W, copying W costs more than the
    rescale."""
    fold = (z.device.type == 'cpu' and z.dtype in (torch.float32, torch.float64) and scale.dtype == z.dtype
            and z.is_contiguous() and (bias is None or bias.is_contiguous())
            and z.numel() // z.shape[-1] >= weight.shape[0])
    if not fold:
        y = F.linear(z, weight, bias)
        part = y[..., start:]
        torch.addcmul(shift, part, scale, out=part)
        return y
    head = weight.new_zeros(start) if bias is None else bias[:start]
    tail = shift if bias is None else shift + bias[start:] * scale
    per_image = torch.cat([head.expand(*tail.shape[:-1], start), tail], dim=-1)
    scaled = torch.cat([weight[:start], weight[start:] * scale[:, None]])
    y = per_image.expand(*z.shape[:-1], weight.shape[0]).contiguous()
    y.view(-1, y.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), scaled.t())
    return y


def split_products(grad: torch.Tensor, z: torch.Tensor, dc_z: torch.Tensor, dtype: torch.dtype,
                   start: int = 0) -> tuple:
    """The projection's weight gradient g^T z (over all tokens), with its rows from `start` on split for the
    gains: (sum_n g (..., 1, C), g^T DC[z], g^T HF[z] (C x K), in `dtype`, for the C channels from `start` on;
    g^T z for the channels before `start`, in grad's dtype). float32 and wider activations take all of it
    from one product g^T z, the HF part by subtraction. float16/bfloat16 ones form the HF part from HF[z]
    (one temporary the size of z, in z's dtype), so that rounding a DC-dominated g^T z does not take the HF
    part's digits with it."""
    tail = grad[..., start:]
    grad_sum = tail.sum(dim=-2, keepdim=True, dtype=dtype)
    g_dc = grad_sum.flatten(0, -2).t() @ dc_z.flatten(0, -2)  # (C, B) @ (B, K)
    grad2, z2 = grad.flatten(0, -2), z.flatten(0, -2)
    if grad.element_size() >= 4:
        full = torch.mm(grad2.t(), z2)
        return grad_sum, g_dc, full[start:].to(dtype) - g_dc, full[:start]
    hf = torch.sub(z, dc_z, out=torch.empty_like(z))  # subtracted in `dtype`, rounded once
    g_hf = torch.mm(tail.flatten(0, -2).t(), hf.flatten(0, -2)).to(dtype)
    return grad_sum, g_dc, g_hf, torch.mm(grad2[:, :start].t(), z2)


class AttnScaleQKV(torch.autograd.Function):
    """qkv = z W^T + b with AttnScale applied to its values v (the last third): v' in v's place.

    A' v = A v' with v' = DC[v] + (1 + lamb) HF[v] per head (A_dc v = DC[v] in every row, A DC[v] = DC[v]
    for row-stochastic A). Running the projection here makes qkv this Function's own output, so the
    in-place rescale costs autograd no copy of qkv's gradient, as it would on a view of it. Everything is
    formed from the projection's input z, which it keeps anyway: DC[v] = DC[z] W_v^T + b_v, and in backward
    d(loss)/d(lamb) = sum g . HF[v] = sum over each head's rows of W_v . (g^T HF[z]), from the weight
    gradient's own product; the only passes beyond the projection's are DC[z], the rescale (none on the CPU
    in float32 and float64, `affine_linear`), sum_n g and the DC[g] term of z's gradient (and HF[z] in float16/bfloat16,
    `split_products`).
    """

    @staticmethod
    def forward(ctx, z, weight, bias, lamb):
        k = 2 * weight.shape[0] // 3
        dc_z, dc = input_mean(z, weight[k:], None if bias is None else bias[k:], lamb.dtype)
        lamb_c = lamb.repeat_interleave(dc.shape[-1] // lamb.numel())  # per value channel
        ctx.save_for_backward(z, weight, lamb, dc_z)
        return affine_linear(z, weight, bias, 1. + lamb_c, -lamb_c * dc, start=k)  # v' = (1 + lamb) v - lamb DC[v]

    @staticmethod
    def backward(ctx, grad):
        with autocast_off(grad.device.type):
            return AttnScaleQKV._backward(ctx.needs_input_grad[2], grad, *ctx.saved_tensors)

    @staticmethod
    def _backward(bias_needs_grad, grad, z, weight, lamb, dc_z):
        k, n = 2 * grad.shape[-1] // 3, grad.shape[-2]
        lamb_c = lamb.repeat_interleave((grad.shape[-1] - k) // lamb.numel())  # per value channel
        grad_sum, g_dc, g_hf, g_qk = split_products(grad, z, dc_z, lamb.dtype, start=k)
        grad2, w_v = grad.flatten(0, -2), weight[k:].to(lamb.dtype)
        w_scaled = torch.cat([weight[:k].to(grad.dtype), (w_v * (1. + lamb_c[:, None])).to(grad.dtype)])
        grad_z = torch.mm(grad2, w_scaled).view_as(z)
        grad_z -= (grad_sum * (lamb_c / n) @ w_v).to(grad.dtype)  # d(-lamb DC[v])/dz, per image
        grad_w = torch.cat([g_qk, (g_hf * (1. + lamb_c[:, None]) + g_dc).to(grad.dtype)])
        grad_b = None
        if bias_needs_grad:  # in float32, as the value part's sums are
            grad_b = torch.cat([grad2[:, :k].sum(0, dtype=lamb.dtype), grad_sum.flatten(0, -2).sum(0)])
        grad_lamb = (g_hf * w_v).sum(-1).view(lamb.numel(), -1).sum(-1)
        return grad_z.to(z.dtype), grad_w.to(weight.dtype), grad_b, grad_lamb


def attnscale_qkv(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lamb: torch.Tensor,
                  num_heads: int) -> torch.Tensor:
    """The qkv projection F.linear(z, weight, bias) (B, N, 3C) with AttnScale folded into its values, for a
    fused attention kernel: attention over the returned q, k, v' gives A' v. Exact whenever no dropout acts on
    A; with zero gains, the projection bit for bit. Keeps only DC[z] (B, 1, K) beyond what the projection
    and the kernel keep."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling():  # no custom Function there; same formula
        qkv = F.linear(z, weight, bias)
        v = qkv[..., 2 * qkv.shape[-1] // 3:].unflatten(-1, (num_heads, -1)).transpose(-2, -3)  # (B, H, N, d)
        v.copy_(attnscale_fused(v.clone(), v, lamb))
        return qkv
    z = autocast_input(z)
    return AttnScaleQKV.apply(z, weight, bias, antioversmooth.as_gain(lamb, z))


class AttnScaleTokens(torch.autograd.Function):
    """A'v = (1 + lamb) A v - lamb DC[v] from a kernel's output out = A v (B, H, N, d), written as tokens
    (B, N, H d), the layout the output projection takes (which then keeps this output as its input).

    Backward keeps only that output and DC[v]: d(A'v)/d(lamb) = A v - DC[v] = (A'v - DC[v]) / (1 + lamb).
    """

    @staticmethod
    def forward(ctx, out, v, lamb):
        B, H, N, d = out.shape
        lamb_ = lamb.view(-1, 1, 1)
        dc = v.mean(dim=-2, keepdim=True, dtype=lamb.dtype)
        tokens = torch.empty(B, N, H, d, dtype=out.dtype, device=out.device)
        torch.addcmul(-lamb_ * dc, out, 1. + lamb_, out=tokens.transpose(1, 2))
        tokens = tokens.flatten(-2)
        ctx.save_for_backward(tokens, dc, lamb)
        return tokens

    @staticmethod
    def backward(ctx, grad):
        tokens, dc, lamb = ctx.saved_tensors
        lamb_, per_head = lamb.view(-1, 1, 1), (lamb.numel(), -1)
        grad, tokens = grad.unflatten(-1, per_head).transpose(1, 2), tokens.unflatten(-1, per_head).transpose(1, 2)
        grad_out = (grad * (1. + lamb_)).to(grad.dtype)
        grad_v = grad.sum(dim=-2, keepdim=True, dtype=lamb.dtype) * (-lamb_ / grad.shape[-2])
        grad_lamb = (tokens - dc).mul_(grad).sum(dim=(0, 2, 3)) / (1. + lamb)
        return grad_out, grad_v.to(grad.dtype).expand_as(grad), grad_lamb


def attnscale_tokens(out: torch.Tensor, v: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """AttnScale after a fused kernel, as tokens: attnscale_fused(out, v, lamb).transpose(1, 2) flattened to
    (B, N, C). For kernels that do not keep A v (a masked one that falls back to plain matrix products):
    keeps only DC[v] beyond the output, which the projection keeps anyway."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling():  # no custom Function there; same formula
        return attnscale_fused(out, v, lamb).transpose(1, 2).flatten(-2)
    return AttnScaleTokens.apply(out, v, antioversmooth.as_gain(lamb, out))


class AttnScaleMap(torch.autograd.Function):
    """attnscale(attn, lamb) on an explicit map, written contiguous so that the product A' v keeps this very
    tensor, and keeping only it for backward: d(A')/d(lamb) = A - 1/N = (A' - 1/N) / (1 + lamb)."""

    @staticmethod
    def forward(ctx, attn, lamb):
        lamb_ = lamb.view(-1, 1, 1)
        scaled = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)
        torch.sub(attn * (1. + lamb_), lamb_ / attn.shape[-1], out=scaled)  # antioversmooth.attnscale
        ctx.save_for_backward(scaled, lamb)
        return scaled

    @staticmethod
    def backward(ctx, grad):
        scaled, lamb = ctx.saved_tensors
        lamb_ = lamb.view(-1, 1, 1)
        grad_attn = (grad * (1. + lamb_)).to(grad.dtype)
        hf = scaled.to(lamb.dtype) - 1. / scaled.shape[-1]
        return grad_attn, hf.mul_(grad).sum_to_size(lamb_.shape).view(-1) / (1. + lamb)


def attnscale_map(attn: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """attnscale(attn, lamb), bit for bit, keeping nothing for backward but its output: for maps that nothing
    else keeps (CaiT's talking-heads mix, permuted; after a softmax, the softmax keeps its own output anyway)."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling():  # no custom Function there; same formula
        return antioversmooth.attnscale(attn, lamb)
    return AttnScaleMap.apply(attn, antioversmooth.as_gain(lamb, attn))


class AttnScaleSoftmax(torch.autograd.Function):
    """attnscale(softmax(logits), lamb), keeping only its output A' for backward (the product A' v keeps it
    anyway) where the two apart keep A as well: A - 1/N = (A' - 1/N) / (1 + lamb) gives d(A')/d(lamb) and,
    with A, the softmax's gradient."""

    @staticmethod
    def forward(ctx, logits, lamb):
        scaled = antioversmooth.attnscale(logits.softmax(dim=-1), lamb)
        ctx.save_for_backward(scaled, lamb)
        return scaled

    @staticmethod
    def backward(ctx, grad):
        scaled, lamb = ctx.saved_tensors
        lamb_, n = lamb.view(-1, 1, 1), scaled.shape[-1]
        hf = (scaled - 1. / n).div_(1. + lamb_)  # A - 1/N
        grad_lamb = (hf * grad).sum_to_size(lamb_.shape).view(-1)
        attn, grad_attn = hf.add_(1. / n), grad * (1. + lamb_)
        return attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True)), grad_lamb


def attnscale_softmax(logits: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """attnscale(logits.softmax(-1), lamb), bit for bit: the explicit attention path's AttnScale at the memory
    of the plain path. float32 and float64 logits run as one step that keeps only the scaled map; float16 and
    bfloat16 ones run apart (there A' would be a second rounding of A; and where autocast takes the softmax
    to float32, the product with v keeps its low-precision copy of A', not A', so the two apart keep no more)."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling() or logits.element_size() < 4:
        return antioversmooth.attnscale(logits.softmax(dim=-1), lamb)
    return AttnScaleSoftmax.apply(logits, antioversmooth.as_gain(lamb, logits))


def attnscale_fused(out: torch.Tensor, v: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """AttnScale applied after attention: A'v = (1 + lamb) (A v) - lamb DC[v].

    out = A v (B, H, N, d) from a fused kernel, v (B, H, N, d). Exact, valid whenever no dropout is
    applied to A. Keeps A v for backward (one more tensor where the kernel keeps it too, as flash kernels do);
    `attnscale_qkv` and `attnscale_tokens` keep nothing more than the kernel and the projection.
    """
    lamb = antioversmooth.as_gain(lamb, out).view(-1, 1, 1)
    dc = v.mean(dim=-2, keepdim=True, dtype=lamb.dtype)
    return torch.addcmul(-lamb * dc, out, 1. + lamb).to(out.dtype)


class FeatScaleLinear(torch.autograd.Function):
    """FeatScale(z W^T + b): the projection y = z W^T + b and FeatScale on y in one step (`affine_linear`).

    Everything is formed from the projection's input z, which it keeps anyway: DC[y] = DC[z] W^T + b, and
    with y' = a y + c DC[y] (a = 1 + s lamb2, c = s (lamb1 - lamb2)) the gains' gradients are sums over
    tokens of g . HF[y] = W . (g^T HF[z]) and g . DC[y] = W . (g^T DC[z]) + b sum g, from the weight
    gradient's own product. Backward keeps z, DC[z] and the parameters, not y.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, lamb1, lamb2, repeat):
        dc_z, dc = input_mean(z, weight, bias, lamb1.dtype)
        ctx.repeat = repeat
        ctx.save_for_backward(z, weight, bias, lamb1, lamb2, dc_z)
        return affine_linear(z, weight, bias, 1. + repeat * lamb2, repeat * (lamb1 - lamb2) * dc)

    @staticmethod
    def backward(ctx, grad):
        with autocast_off(grad.device.type):
            return *FeatScaleLinear._backward(ctx.repeat, grad, *ctx.saved_tensors), None

    @staticmethod
    def _backward(s, grad, z, weight, bias, lamb1, lamb2, dc_z):
        a, c, n = 1. + s * lamb2, s * (lamb1 - lamb2), grad.shape[-2]
        grad_sum, g_dc, g_hf, _ = split_products(grad, z, dc_z, a.dtype)
        w = weight.to(a.dtype)
        grad_z = torch.mm(grad.flatten(0, -2), (a[:, None] * w).to(grad.dtype)).view_as(z)
        grad_z += (grad_sum * (c / n) @ w).to(grad.dtype)  # d(c DC[y])/dz, per image
        grad_w = a[:, None] * g_hf + (a + c)[:, None] * g_dc
        grad_total, sum_g_dc = grad_sum.flatten(0, -2).sum(0), (g_dc * w).sum(-1)
        if bias is not None:
            sum_g_dc = sum_g_dc + grad_total * bias.to(a.dtype)
        grad_b = None if bias is None else ((a + c) * grad_total).to(bias.dtype)
        sum_g_hf = (g_hf * w).sum(-1)
        return grad_z.to(z.dtype), grad_w.to(weight.dtype), grad_b, s * sum_g_dc, s * sum_g_hf


def featscale_linear(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lamb1: torch.Tensor,
                     lamb2: torch.Tensor, repeat: float = 1.) -> torch.Tensor:
    """featscale(F.linear(z, weight, bias), lamb1, lamb2, repeat) (B, N, C), to rounding, keeping for backward
    only what the projection keeps (z) and DC[z]: FeatScale on the projection that produces y."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling():  # no custom Function there; same formula
        return featscale(F.linear(z, weight, bias), lamb1, lamb2, repeat)
    z = autocast_input(z)
    lamb1, lamb2 = antioversmooth.as_gain(lamb1, z), antioversmooth.as_gain(lamb2, z)
    return FeatScaleLinear.apply(z, weight, bias, lamb1, lamb2, repeat)
