"""DeiT family (plain pre-norm ViT) with AttnScale and FeatScale: timm's VisionTransformer with the official
DeiT details, the add-ons installed by the ViT adapter of `plugin.py`.

Parameter names are those of the released checkpoints: timm's `blocks.{i}.attn.qkv`, ... plus
`blocks.{i}.attn.lamb` (AttnScale) and `blocks.{i}.lamb1` / `blocks.{i}.lamb2` (FeatScale).
"""
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from .official import official_drop_rates, official_flops
from .plugin import install
from .registry import default_cfg, register_variant


def block_flops(blk: nn.Module, num_tokens: int) -> int:
    """The official count of one block for N tokens: norms, qkv, q k^T, (AttnScale), A v, proj, MLP, (FeatScale)."""
    N, C, H = num_tokens, blk.attn.qkv.in_features, blk.attn.num_heads
    d = C // H
    attn = N * C * 3 * C + H * N * d * N + H * N * N * d + N * C * C + (H * N * N if blk.attn.lamb is not None else 0)
    return 2 * C * N + attn + 2 * N * C * blk.mlp.fc1.out_features + (2 * C * N if blk.lamb1 is not None else 0)


class DeiT(VisionTransformer):
    """timm's VisionTransformer with the official DeiT details and the two add-ons as switches.

    As in the official code (timm 0.4), `drop_rate` is the dropout after the position embedding
    and inside attention/MLP projections; there is no dropout before the head. The released code adds
    FeatScale's scaled terms twice (`feat_scale_repeat`); the checkpoints were trained that way.
    """
    feat_scale_repeat = 2.

    def __init__(self, attn_scale: bool = False, feat_scale: bool = False, drop_rate: float = 0., **kwargs):
        self.attn_scale, self.feat_scale = attn_scale, feat_scale
        super().__init__(**official_drop_rates(drop_rate, kwargs))
        install(self, attn_scale, feat_scale, self.feat_scale_repeat)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset=needs_reset)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)  # official init (timm uses normal, std 1e-6)

    @torch.jit.ignore
    def flops(self) -> int:
        """FLOPs as the official `flops()` counts them (N = patches, class token not counted)."""
        return official_flops(self, sum(block_flops(blk, self.patch_embed.num_patches) for blk in self.blocks))


default_cfgs = {}
__all__ = ['DeiT']
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
