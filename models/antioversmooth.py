"""AttnScale and FeatScale: the paper's contribution on one screen.

Wang et al., "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis:
From Theory to Practice", ICLR 2022.

Self-attention is a low-pass filter: a row-stochastic attention matrix keeps the DC component of
the tokens (their mean) and shrinks everything else, so a deep stack of attention layers leaves
only the DC token. Both add-ons split a signal into its DC part and its high-frequency (HF) rest,
and give the HF rest a learned gain. With the gains at their zero init, both are the identity.

    DC[x] = mean over tokens of x         HF[x] = x - DC[x]

AttnScale, per attention layer and head h, on the attention matrix A (N x N, N tokens):
    A_dc = DC[A] = 1/N everywhere (for row-stochastic A),   A' = A_dc + (1 + lamb_h) (A - A_dc)
FeatScale, per block and channel, on the attention branch output y (B, N, C):
    y' = y + s * (lamb1 * DC[y] + lamb2 * HF[y])
where s = 1 in the paper and CaiT, and s = 2 in the released DeiT models (their code adds the
scaled terms twice; the checkpoints were trained that way, so we keep it).

Numerics: the gains stay in float32 (at least) and every correction is formed there, then stored
in the activation's dtype; 1 + lamb is never rounded to bfloat16/float16 (where it is 1.0 for
|lamb| < 2^-9 and rows of A' would stop summing to one). Zero gains return the input bit for bit.
Memory: no N x N constant is built. `fused.py` has the same formulas fused with the attention kernel
and with the projection that produces y, which keep nothing extra for backward.
"""
from typing import Optional

import torch


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """DC component: the mean over the token axis (-2), kept as a length-1 token axis."""
    return x.mean(dim=-2, keepdim=True)


def dc_hf_split(x: torch.Tensor):
    """Split tokens x (..., N, C) into their DC part (..., 1, C) and HF rest (..., N, C)."""
    dc = token_mean(x)
    return dc, x - dc


def dc_mean(x: torch.Tensor, valid: Optional[torch.Tensor] = None, dim: int = -2) -> torch.Tensor:
    """DC[x], the mean over the token axis `dim` of x, kept as a length-1 axis, in float32 or wider: over every
    token, or over those `valid` marks (a bool tensor that broadcasts against x, length 1 on the other axis)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if valid is None:
        return x.mean(dim=dim, keepdim=True, dtype=dtype)
    kept = torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return kept.sum(dim=dim, keepdim=True) / valid.sum(dim=dim, keepdim=True)


def as_gain(lamb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A gain in float32, or x's dtype if wider (float64 references)."""
    return lamb.to(torch.promote_types(x.dtype, torch.float32))


def attnscale(attn: torch.Tensor, lamb: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """AttnScale on an explicit attention matrix attn (B, H, N, N) with per-head gains lamb (H,).

    A_dc + (1 + lamb)(A - A_dc) with A_dc = 1/N, written as (1 + lamb) A - lamb / N so that no
    N x N constant is built and lamb = 0 returns A exactly. With `valid` (B, 1, 1, N) bool (a padding
    mask's keys), A_dc is 1/N_valid on the valid keys and 0 on the others.
    """
    lamb = as_gain(lamb, attn).view(-1, 1, 1)
    if valid is None:
        return (attn * (1. + lamb) - lamb / attn.shape[-1]).to(attn.dtype)
    a_dc = valid.to(lamb.dtype) / valid.sum(dim=-1, keepdim=True)
    return (attn * (1. + lamb) - lamb * a_dc).to(attn.dtype)


def featscale(y: torch.Tensor, lamb1: torch.Tensor, lamb2: torch.Tensor, repeat: float = 1.,
              valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FeatScale on y (B, N, C) with per-channel gains lamb1 (DC) and lamb2 (HF), each (C,).

    y + s (lamb1 DC[y] + lamb2 HF[y]) = (1 + s lamb2) y + s (lamb1 - lamb2) DC[y]: one expression of y
    and its token mean, so backward keeps only y and DC[y] (no HF[y] or other temporaries). With `valid`
    (B, N, 1) bool (a padding mask's tokens), DC[y] is the mean over the valid tokens only.
    """
    lamb1, lamb2 = as_gain(lamb1, y), as_gain(lamb2, y)
    dc = y.mean(dim=-2, keepdim=True, dtype=lamb1.dtype) if valid is None else dc_mean(y, valid).to(lamb1.dtype)
    return torch.addcmul((repeat * (lamb1 - lamb2)) * dc, y, 1. + repeat * lamb2).to(y.dtype)
