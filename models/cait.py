"""CaiT family (LayerScale, talking heads, class attention) with AttnScale and FeatScale, on timm's Cait.

The add-ons act in the self-attention stage only (`blocks.{i}`); the class-attention stage
(`blocks_token_only`) is CaiT's own. Token means there are over the patch tokens (no class token
in that stage).
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.models.cait import Cait, LayerScaleBlock as TimmLayerScaleBlock, TalkingHeadAttn as TimmTalkingHeadAttn

from .antioversmooth import attnscale, featscale
from .official import official_drop_rates, official_flops
from .registry import default_cfg, register_variant


class TalkingHeadAttn(TimmTalkingHeadAttn):
    """Talking-heads attention with optional AttnScale, applied after the post-softmax head mixing
    (`proj_w`), before attention dropout, with A_dc = 1/N as in the released models.
    The maps always exist here; `attn_probe` is an identity whose forward hooks see them.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_scale: bool = False, device=None, dtype=None, **kwargs):
        super().__init__(dim, num_heads=num_heads, device=device, dtype=dtype, **kwargs)
        self.lamb = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype)) if attn_scale else None
        self.attn_probe = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.lamb is not None:
            attn = attnscale(attn, self.lamb)
        attn = self.attn_drop(self.attn_probe(attn))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore
    def flops(self, num_tokens: int) -> int:
        """The official count: as DeiT's attention plus the two talking-heads mixes."""
        N, C, H = num_tokens, self.qkv.in_features, self.num_heads
        d = C // H
        attnscale_flops = H * N * N if self.lamb is not None else 0
        return N * C * 3 * C + H * N * d * N + attnscale_flops + H * N * N * d + N * C * C + 2 * N * N * H * H


class LayerScaleBlock(TimmLayerScaleBlock):
    """CaiT self-attention block with optional FeatScale (applied once, before `gamma_1`)."""

    def __init__(self, dim: int, *args, feat_scale: bool = False, device=None, dtype=None, **kwargs):
        super().__init__(dim, *args, device=device, dtype=dtype, **kwargs)
        self.lamb1 = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if feat_scale else None
        self.lamb2 = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if feat_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x))
        if self.lamb1 is not None and self.lamb2 is not None:
            y = featscale(y, self.lamb1, self.lamb2)
        x = x + self.drop_path(self.gamma_1 * y)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    @torch.jit.ignore
    def flops(self, num_tokens: int) -> int:
        N, C = num_tokens, self.mlp.fc1.in_features
        featscale_flops = 2 * C * N if self.lamb1 is not None else 0
        return 4 * C * N + self.attn.flops(N) + 2 * N * C * self.mlp.fc1.out_features + featscale_flops


class CaiT(Cait):
    """timm's Cait with the two add-ons as switches; `drop_rate` with the official meaning
    (after the position embedding and in the self-attention stage's projections, none before the head).
    """

    def __init__(self, attn_scale: bool = False, feat_scale: bool = False, drop_rate: float = 0., **kwargs):
        self.attn_scale, self.feat_scale = attn_scale, feat_scale
        super().__init__(
            block_layers=partial(LayerScaleBlock, feat_scale=feat_scale),
            attn_block=partial(TalkingHeadAttn, attn_scale=attn_scale),
            **official_drop_rates(drop_rate, kwargs),
        )

    @torch.jit.ignore
    def flops(self) -> int:
        """FLOPs as the official `flops()` counts them (N = patches)."""
        N, C = self.patch_embed.num_patches, self.embed_dim
        flops = sum(blk.flops(N) for blk in self.blocks)
        for blk in self.blocks_token_only:
            H = blk.attn.num_heads
            d = C // H
            attn = N * C * 2 * C + C * C + H * d * N + H * N * d + C * C
            flops += C + attn + C + 2 * C * blk.mlp.fc1.out_features + C + C
        return official_flops(self, flops)


default_cfgs = {}
__all__ = ['CaiT', 'TalkingHeadAttn', 'LayerScaleBlock']
# size: (embed_dim, depth, num_heads, img_size, LayerScale init)
CAIT_SIZES = {
    'XXS24_224': (192, 24, 4, 224, 1e-5), 'XXS24': (192, 24, 4, 384, 1e-5),
    'XXS36_224': (192, 36, 4, 224, 1e-5), 'XXS36': (192, 36, 4, 384, 1e-5),
    'XS24': (288, 24, 6, 384, 1e-5),
    'S24_224': (384, 24, 8, 224, 1e-5), 'S24': (384, 24, 8, 384, 1e-5), 'S36': (384, 36, 8, 384, 1e-6),
    'M36': (768, 36, 16, 384, 1e-6), 'M48': (768, 48, 16, 448, 1e-6),
}
for _size, (_dim, _depth, _heads, _img, _init) in CAIT_SIZES.items():
    _args = dict(patch_size=16, img_size=_img, embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=4.,
                 qkv_bias=True, init_values=_init)
    _cfg = default_cfg(_img, crop_pct=0.875 if _img == 224 else 1.0)
    register_variant(__name__, f'cait_{_size}', CaiT, _cfg, **_args)
    register_variant(__name__, f'attnscale_cait_{_size}', CaiT, _cfg, attn_scale=True, **_args)
    register_variant(__name__, f'featscale_cait_{_size}', CaiT, _cfg, feat_scale=True, **_args)
