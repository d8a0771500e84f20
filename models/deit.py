"""DeiT family (plain pre-norm ViT) with AttnScale and FeatScale, built on timm's VisionTransformer.

Parameter names are those of the released checkpoints: timm's `blocks.{i}.attn.qkv`, ... plus
`blocks.{i}.attn.lamb` (AttnScale) and `blocks.{i}.lamb1` / `blocks.{i}.lamb2` (FeatScale).
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer

from .antioversmooth import attnscale, attnscale_values_, featscale
from .official import official_drop_rates, official_flops
from .registry import default_cfg, register_variant


class Attention(TimmAttention):
    """Multi-head self-attention with optional AttnScale.

    Fused path (scaled_dot_product_attention on AttnScale'd values, A'v = A v') whenever no dropout
    acts on the attention matrix; explicit path otherwise, or when `fused_attn` is switched off
    to read attention maps: `attn_probe` is an identity that sees each (scaled) map, so forward
    hooks on it capture them.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_scale: bool = False, device=None, dtype=None, **kwargs):
        super().__init__(dim, num_heads=num_heads, device=device, dtype=dtype, **kwargs)
        self.lamb = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype)) if attn_scale else None
        self.attn_probe = nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError('masked attention is not supported by AttnScale/FeatScale models')
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        fused = self.fused_attn and (self.attn_drop.p == 0. or not self.training)
        if fused and self.lamb is not None:
            attnscale_values_(qkv[2], self.lamb)  # A'v = A v', v' in place of v
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if self.lamb is not None:
                attn = attnscale(attn, self.lamb)
            attn = self.attn_drop(self.attn_probe(attn))
            x = attn @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore
    def flops(self, num_tokens: int) -> int:
        """The official count for N tokens: qkv, q k^T, (AttnScale), A v, proj."""
        N, C, H, d = num_tokens, self.qkv.in_features, self.num_heads, self.head_dim
        return N * C * 3 * C + H * N * d * N + (H * N * N if self.lamb is not None else 0) + H * N * N * d + N * C * C


def set_fused_attn(model: nn.Module, enabled: bool) -> dict:
    """Switch `fused_attn` on every module of `model` that has one (ours and timm's attentions); returns
    {module: previous value}, so a caller can restore them. Off, attention maps are formed explicitly."""
    previous = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    for m in previous:
        m.fused_attn = enabled
    return previous


class AttnScaleAttention(Attention):
    """Attention with AttnScale on (timm's block factory takes a class, not a partial)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(dim, attn_scale=True, **kwargs)


class Block(TimmBlock):
    """Pre-norm block with optional FeatScale on the attention branch output.

    `feat_scale_repeat` is 2 in the released DeiT models (their code adds the scaled terms twice).
    """

    def __init__(self, dim: int, *args, feat_scale: bool = False, feat_scale_repeat: float = 2.,
                 device=None, dtype=None, **kwargs):
        super().__init__(dim, *args, device=device, dtype=dtype, **kwargs)
        self.feat_scale_repeat = feat_scale_repeat
        self.lamb1 = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if feat_scale else None
        self.lamb2 = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if feat_scale else None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        if self.lamb1 is not None and self.lamb2 is not None:
            y = featscale(y, self.lamb1, self.lamb2, self.feat_scale_repeat)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    @torch.jit.ignore
    def flops(self, num_tokens: int) -> int:
        N, C = num_tokens, self.mlp.fc1.in_features
        featscale_flops = 2 * C * N if self.lamb1 is not None else 0
        return 2 * C * N + self.attn.flops(N) + 2 * N * C * self.mlp.fc1.out_features + featscale_flops


class DeiT(VisionTransformer):
    """timm's VisionTransformer with the official DeiT details and the two add-ons as switches.

    As in the official code (timm 0.4), `drop_rate` is the dropout after the position embedding
    and inside attention/MLP projections; there is no dropout before the head.
    """

    def __init__(self, attn_scale: bool = False, feat_scale: bool = False, drop_rate: float = 0., **kwargs):
        self.attn_scale, self.feat_scale = attn_scale, feat_scale
        super().__init__(
            attn_layer=AttnScaleAttention if attn_scale else Attention,
            block_fn=partial(Block, feat_scale=feat_scale),
            **official_drop_rates(drop_rate, kwargs),
        )

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset=needs_reset)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)  # official init (timm uses normal, std 1e-6)

    @torch.jit.ignore
    def flops(self) -> int:
        """FLOPs as the official `flops()` counts them (N = patches, class token not counted)."""
        return official_flops(self, sum(blk.flops(self.patch_embed.num_patches) for blk in self.blocks))


default_cfgs = {}
__all__ = ['DeiT', 'Attention', 'AttnScaleAttention', 'Block']
DEIT_SIZES = {'tiny': dict(embed_dim=192, num_heads=3), 'small': dict(embed_dim=384, num_heads=6),
              'base': dict(embed_dim=768, num_heads=12)}
for _size, _dims in DEIT_SIZES.items():
    for _depth in (12, 24):
        _args = dict(patch_size=16, img_size=224, depth=_depth, mlp_ratio=4., qkv_bias=True, **_dims)
        _names = [f'deit_{_size}_{_depth}'] + ([f'our_{_size}_{_depth}'] if _size != 'tiny' else [])
        for _name in _names:  # plain baseline, also under the official name our_*
            register_variant(__name__, _name, DeiT, default_cfg(), **_args)
        register_variant(__name__, f'attnscale_{_size}_{_depth}', DeiT, default_cfg(), attn_scale=True, **_args)
        register_variant(__name__, f'featscale_{_size}_{_depth}', DeiT, default_cfg(), feat_scale=True, **_args)
