"""Conventions of the official code that the DeiT and CaiT families share.

`drop_rate` keeps its timm 0.4 meaning, and `flops()` counts as the official `model.flops()` does, so
the numbers `main.py` prints match the paper's logs.
"""
import torch.nn as nn


def official_drop_rates(drop_rate: float, kwargs: dict) -> dict:
    """timm 0.4's `drop_rate`: dropout after the position embedding and in the attention/MLP projections
    (none before the head); explicit `pos_drop_rate` / `proj_drop_rate` in `kwargs` win."""
    return dict(dict(pos_drop_rate=drop_rate, proj_drop_rate=drop_rate), **kwargs)


def official_flops(model: nn.Module, blocks_flops: int) -> int:
    """The official count around the blocks: patch embedding and head over N patches (the class token not
    counted), plus `blocks_flops`, what the model's blocks count for N tokens."""
    N, C = model.patch_embed.num_patches, model.embed_dim
    proj = model.patch_embed.proj
    patch_embed = N * C * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    return patch_embed + blocks_flops + N * C + C * model.num_classes
