"""Swin family with AttnScale and FeatScale (the official `swin/` models), on timm's SwinTransformer.

The add-ons are installed by the Swin adapter of `plugin.py`: AttnScale in the window attention, with
A_dc = 1/N over the N = 49 tokens of a window whatever the shift mask says; FeatScale on the attention
branch after window reverse and reverse shift, with DC the mean over all H*W tokens, applied once.
Everything else is timm's Swin, which computes the official plain Swin bit for bit (LayerNorm eps 1e-5,
attention dropout 0).

Checkpoints in the official (Microsoft) layout load through `models.load_state_dict`, which maps them with
timm's own `checkpoint_filter_fn`: PatchMerging moves from the end of stage i to the start of stage i+1,
`head.*` becomes `head.fc.*`, the persistent `relative_position_index` / `attn_mask` buffers are dropped.
"""
import torch
import torch.nn as nn
from timm.models.swin_transformer import PatchMerging, SwinTransformer

from .plugin import install
from .registry import default_cfg, register_variant


def swin_flops(model: SwinTransformer) -> float:
    """What the official Swin `flops()` returns for this (timm) Swin, add-ons counted: a float, since the
    official code counts windows with a true division. PatchMerging is counted with the stage it ends in the
    official layout, which is the same sum."""
    C0, (Ho, Wo) = model.embed_dim, model.patch_embed.grid_size
    proj = model.patch_embed.proj
    flops = Ho * Wo * C0 * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    flops += Ho * Wo * C0 if not isinstance(model.patch_embed.norm, nn.Identity) else 0
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            (H, W), C = stage.input_resolution, stage.downsample.dim
            flops += H * W * C + (H // 2) * (W // 2) * 4 * C * stage.downsample.out_dim
        for blk in stage.blocks:
            (H, W), C, heads = blk.input_resolution, blk.dim, blk.attn.num_heads
            N, d = blk.window_size[0] * blk.window_size[1], C // heads
            attn = N * C * 3 * C + heads * N * d * N + heads * N * N * d + N * C * C
            attn += heads * N * N if getattr(blk.attn, 'lamb', None) is not None else 0
            flops += 2 * C * H * W + H * W / N * attn + 2 * H * W * C * C * blk.mlp_ratio
            flops += 2 * C * H * W if getattr(blk, 'lamb1', None) is not None else 0
    return flops + model.num_features * Ho * Wo // 2 ** model.num_layers + model.num_features * model.num_classes


class Swin(SwinTransformer):
    """timm's SwinTransformer with the two add-ons as switches and the official `flops()`.

    `drop_rate` has the official Swin meaning, the dropout inside the blocks (timm's `proj_drop_rate`), not a
    dropout before the head. (The official code also drops after the patch embedding, a layer timm's Swin does
    not have; the official recipe sets the rate to 0.)
    """

    def __init__(self, attn_scale: bool = False, feat_scale: bool = False, drop_rate: float = 0., **kwargs):
        self.attn_scale, self.feat_scale = attn_scale, feat_scale
        super().__init__(**dict(dict(proj_drop_rate=drop_rate), **kwargs))
        install(self, attn_scale, feat_scale)

    @torch.jit.ignore
    def flops(self) -> float:
        """FLOPs as the official Swin `flops()` counts them."""
        return swin_flops(self)


default_cfgs = {}
__all__ = ['Swin']
# size: (embed_dim, num_heads, depths, official drop path)
SWIN_SIZES = {
    'tiny': (96, (3, 6, 12, 24), (2, 2, 6, 2), 0.2),
    'small': (96, (3, 6, 12, 24), (2, 2, 18, 2), 0.3),
    'base': (128, (4, 8, 16, 32), (2, 2, 18, 2), 0.5),
}
SWIN_FEATURES = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))
_cfg = dict(default_cfg(224, crop_pct=0.875), pool_size=(7, 7), classifier='head.fc')
for _size, (_dim, _heads, _depths, _drop_path) in SWIN_SIZES.items():
    _args = dict(patch_size=4, window_size=7, embed_dim=_dim, depths=_depths, num_heads=_heads,
                 drop_path_rate=_drop_path)
    for _addon in ('attnscale', 'featscale'):
        register_variant(__name__, f'{_addon}_swin_{_size}_patch4_window7_224', Swin, _cfg, feature_cfg=SWIN_FEATURES,
                         **{'attn_scale' if _addon == 'attnscale' else 'feat_scale': True}, **_args)
