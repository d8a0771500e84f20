"""CaiT family (LayerScale, talking heads, class attention) with AttnScale and FeatScale, on timm's Cait.

The add-ons act in the self-attention stage only (`blocks.{i}`); the class-attention stage
(`blocks_token_only`) is CaiT's own. Token means there are over the patch tokens (no class token
in that stage).
"""
import torch
import torch.nn as nn
from timm.models.cait import Cait

from .official import official_drop_rates, official_flops
from .plugin import install
from .registry import default_cfg, register_variant


def block_flops(blk: nn.Module, num_tokens: int) -> int:
    """The official count of one self-attention block: DeiT's, plus the two talking-heads mixes and the two
    LayerScales."""
    N, C, H = num_tokens, blk.attn.qkv.in_features, blk.attn.num_heads
    d = C // H
    attn = N * C * 3 * C + H * N * d * N + H * N * N * d + N * C * C + 2 * N * N * H * H
    attn += H * N * N if blk.attn.lamb is not None else 0
    return 4 * C * N + attn + 2 * N * C * blk.mlp.fc1.out_features + (2 * C * N if blk.lamb1 is not None else 0)


class CaiT(Cait):
    """timm's Cait with the two add-ons as switches; `drop_rate` with the official meaning
    (after the position embedding and in the self-attention stage's projections, none before the head).
    """

    def __init__(self, attn_scale: bool = False, feat_scale: bool = False, drop_rate: float = 0., **kwargs):
        self.attn_scale, self.feat_scale = attn_scale, feat_scale
        super().__init__(**official_drop_rates(drop_rate, kwargs))
        install(self, attn_scale, feat_scale)

    @torch.jit.ignore
    def flops(self) -> int:
        """FLOPs as the official `flops()` counts them (N = patches)."""
        N, C = self.patch_embed.num_patches, self.embed_dim
        flops = sum(block_flops(blk, N) for blk in self.blocks)
        for blk in self.blocks_token_only:
            H = blk.attn.num_heads
            d = C // H
            attn = N * C * 2 * C + C * C + H * d * N + H * N * d + C * C
            flops += C + attn + C + 2 * C * blk.mlp.fc1.out_features + C + C
        return official_flops(self, flops)


default_cfgs = {}
__all__ = ['CaiT']
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
