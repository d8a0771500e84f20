"""The add-ons in timm's hierarchical families: Swin V2 (both implementations), MaxViT / CoAtNet, VOLO, PVT-v2,
Twins, MViTv2 and LeViT. One small adapter per family, registered with `plugin.register`: our subclasses of timm's
block and attention, swapped in place by `install`.

- Windows (Swin V2, MaxViT's block and grid partitions, Twins' local groups): AttnScale's A_dc = 1/N over the tokens
  of a window; FeatScale's DC is the mean over the whole image, after the windows are merged back.
- Keys fewer than queries (PVT-v2's and Twins' sub-sampled keys, MViTv2's pooled keys, LeViT's sub-sampled queries):
  A_dc = 1/N_k and DC[v] is the mean of the values over the N_k keys, so A'v = (1 + lamb) A v - lamb DC[v] still.
- Position terms and cosine attention (Swin V2's log-spaced CPB and logit scale, MaxViT's and LeViT's relative
  biases, MViTv2's decomposed relative positions) act before the softmax: AttnScale leaves them as they are.
- Where the output projection is not a plain Linear over the heads' channels (CoAtNet's 1x1 convolution, LeViT's
  activation before its projection, MViTv2's residual pooling, Twins' windows), AttnScale acts on the attention's
  output, A'v, before it (`scale_values`).
- Post-norm blocks (Swin V2) add norm(attn(x)) to the residual: FeatScale acts on that, after the norm.
- LeViT's down-sampling attention has no residual around it: its output is the stage's new tokens, and FeatScale
  acts on them.
"""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from timm.models.levit import Attention as LevitAttention, AttentionDownsample, LevitBlock, LevitDownsample
from timm.models.maxxvit import (Attention2d, AttentionCl, PartitionAttentionCl, TransformerBlock2d, grid_partition,
                                 grid_reverse, window_partition, window_reverse)
from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock, cal_rel_pos_type, reshape_post_pool, \
    reshape_pre_pool
from timm.models.pvt_v2 import Attention as PvtAttention, Block as PvtBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention as WindowAttentionV2
from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock, WindowMultiHeadAttention
from timm.models.twins import Block as TwinsBlock, GlobalSubSampleAttn, LocallyGroupedAttn
from timm.models.volo import Attention as VoloAttention, Transformer as VoloTransformer

from .plugin import Adapter, AttnScaleAttention, FeatScaleProjection, register
from .zoo_vit import biased_qkv


class SwinV2Attention(WindowAttentionV2, AttnScaleAttention):
    """Swin V2's window attention (cosine logits, logit scale, log-spaced continuous position bias) with optional
    AttnScale, N = the tokens of a window (the shift mask is ignored, as in Swin)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, mean = self.mix(x, mask)
        return self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The attention's output before its projection `proj`, per window, and DC[v] where AttnScale acts there."""
        B_, N, C = x.shape
        q, k, v, mean = self.split(biased_qkv(self, x), self.num_heads)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        return self.attend(self.softmax(attn), v).transpose(1, 2).reshape(B_, N, C), mean


class SwinV2Block(SwinTransformerV2Block, FeatScaleProjection):
    """Swin V2's post-norm block with optional FeatScale on the attention branch's output after `norm1`, DC over
    the image's H W tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.feat_scaled_map(self.norm1(self._attn(x))))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)


class SwinV2CrAttention(WindowMultiHeadAttention, AttnScaleAttention):
    """The other Swin V2 implementation's window attention (cosine logits, meta-network position bias) with
    optional AttnScale, N = the tokens of a window."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, mean = self.mix(x, mask)
        return self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The attention's output before its projection `proj`, per window, and DC[v] where AttnScale acts there."""
        Bw, L, C = x.shape
        q, k, v, mean = self.split(self.qkv(x), self.num_heads)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale.reshape(1, self.num_heads, 1, 1), max=math.log(1. / 0.01)).exp()
        attn = attn + self._relative_positional_encodings()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(Bw // num_win, num_win, self.num_heads, L, L) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, L, L)
        return self.attend(attn.softmax(dim=-1), v).transpose(1, 2).reshape(Bw, L, -1), mean


class SwinV2CrBlock(SwinTransformerV2CrBlock, FeatScaleProjection):
    """Its post-norm block with optional FeatScale after `norm1`, DC over the image's H W tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.feat_scaled_map(self.norm1(self._shifted_window_attn(x))))
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return self.norm3(x).reshape(B, H, W, C)


class MaxxVitAttention(AttentionCl, AttnScaleAttention):
    """MaxViT's channels-last attention over one block or grid partition (B', h, w, C), with optional AttnScale,
    N = the partition's tokens."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, mean = self.mix(x, shared_rel_pos)
        return self.proj_drop(self.project(z, mean)).view(*x.shape[:-1], -1)

    def mix(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None):
        """The attention's output before its projection `proj`, as tokens (B', N, C), and DC[v]."""
        B = x.shape[0]
        if self.head_first:
            q, k, v = self.qkv(x).view(B, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = self.qkv(x).reshape(B, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        mean = self.values_mean(v)
        if self.fused_attn and not self.map_dropped():
            bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
            x = self.attention(q, k, v, bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.rel_pos is not None:
                attn = self.rel_pos(attn, shared_rel_pos=shared_rel_pos)
            elif shared_rel_pos is not None:
                attn = attn + shared_rel_pos
            x = self.attend(attn.softmax(dim=-1), v)
        return x.transpose(1, 2).reshape(B, -1, self.num_heads * self.dim_head), mean


class MaxxVitPartitionBlock(PartitionAttentionCl, FeatScaleProjection):
    """MaxViT's block (or grid) attention block with optional FeatScale on the attention branch, before `ls1`, DC
    over the image's H W tokens. Fused with the attention's projection, that projection (a per-token map) runs after
    the partitions are merged back, on the whole image (without AttnScale, whose DC is per partition)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuses_featscale() and self.attn.lamb is None:
            z = self.merged(*self._partitioned(self.norm1(x)))
            y = self.featscale_projection(z.flatten(1, 2), None).view(z.shape[:3] + (-1,))
        else:
            y = self.feat_scaled_map(self._partition_attn(self.norm1(x)))
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _partitioned(self, x: torch.Tensor):
        """The attention's output before its projection, per partition (B', h, w, C), and the image size."""
        img_size = x.shape[1:3]
        parts = window_partition(x, self.partition_size) if self.partition_block else \
            grid_partition(x, self.partition_size)
        z, _ = self.attn.mix(parts)
        return z.view(parts.shape[:3] + (-1,)), img_size

    def merged(self, z: torch.Tensor, img_size: List[int]) -> torch.Tensor:
        if self.partition_block:
            return window_reverse(z, self.partition_size, img_size)
        return grid_reverse(z, self.partition_size, img_size)


class CoAtNetAttention(Attention2d, AttnScaleAttention):
    """CoAtNet's channels-first attention (B, C, H, W) with optional AttnScale on its output before the 1x1
    convolution that projects it."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.head_first:
            q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.dim_head, -1).unbind(1)
        mean = self.values_mean(v, dim=-1)  # v: (B, heads, d, N)
        if self.fused_attn and not self.map_dropped():
            bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
            x = self.attention(*(t.transpose(-1, -2).contiguous() for t in (q, k, v)), bias).transpose(-1, -2)
        else:
            attn = (q * self.scale).transpose(-2, -1) @ k
            if self.rel_pos is not None:
                attn = self.rel_pos(attn)
            elif shared_rel_pos is not None:
                attn = attn + shared_rel_pos
            x = v @ self.attn_drop(self.attn_map(attn.softmax(dim=-1))).transpose(-2, -1)
        return self.proj_drop(self.proj(self.scale_values(x, mean).reshape(B, -1, H, W)))


class CoAtNetBlock(TransformerBlock2d, FeatScaleProjection):
    """CoAtNet's transformer block with optional FeatScale on the attention branch (B, C, H, W), before `ls1`."""
    channels_first = True  # its maps, for diagnostics.py

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.feat_scaled_map(self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos), channels_first=True)
        x = self.shortcut(x) + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def branch_channels(self) -> int:
        return self.attn.proj.out_channels


class VoloAttentionAddon(VoloAttention, AttnScaleAttention):
    """VOLO's transformer-stage attention on a map (B, H, W, C) with optional AttnScale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, mean = self.mix(x)
        return self.proj_drop(self.project(z, mean)).view(x.shape[:3] + (-1,))

    def mix(self, x: torch.Tensor):
        """The attention's output before its projection `proj`, as tokens (B, H W, C), and DC[v]."""
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3 * C)
        q, k, v, mean = self.split(qkv, self.num_heads)
        return self.attention(q, k, v).transpose(1, 2).reshape(B, H * W, C), mean


class VoloBlock(VoloTransformer, FeatScaleProjection):
    """VOLO's transformer block with optional FeatScale on the attention branch, DC over the map's tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuses_featscale():
            y = self.featscale_projection(*self.attn.mix(self.norm1(x))).view(x.shape)
        else:
            y = self.feat_scaled_map(self.attn(self.norm1(x)))
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SubSampledAttention(AttnScaleAttention):
    """PVT-v2's and Twins' attention: queries from every token, keys and values from a sub-sampled map (fewer)."""

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        z, mean = self.mix(x, size)
        return self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, size: List[int]):
        """The attention's output before its projection `proj`, and DC[v], the values' mean over the N_k keys."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        k, v = self.keys_values(x, size)
        return self.attention(q, k, v).transpose(1, 2).reshape(B, N, C), self.values_mean(v)


class PvtAttentionAddon(PvtAttention, SubSampledAttention):
    """PVT-v2's attention (spatial reduction or average-pooled keys) with optional AttnScale."""
    forward = SubSampledAttention.forward

    def keys_values(self, x: torch.Tensor, feat_size: List[int]):
        B, N, C = x.shape
        if self.pool is not None:
            x = self.sr(self.pool(x.permute(0, 2, 1).reshape(B, C, *feat_size))).reshape(B, C, -1).permute(0, 2, 1)
            x = self.act(self.norm(x))
        elif self.sr is not None:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, *feat_size)).reshape(B, C, -1).permute(0, 2, 1))
        return self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


class TwinsGlobalAttention(GlobalSubSampleAttn, SubSampledAttention):
    """Twins' global sub-sampled attention with optional AttnScale."""
    forward = SubSampledAttention.forward

    def keys_values(self, x: torch.Tensor, size: List[int]):
        B, N, C = x.shape
        if self.sr is not None:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(B, C, *size)).reshape(B, C, -1).permute(0, 2, 1))
        return self.kv(x).reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)


class TwinsLocalAttention(LocallyGroupedAttn, AttnScaleAttention):
    """Twins' locally grouped attention (windows, zero-padded as timm pads them) with optional AttnScale on each
    window's output, N = the window's tokens."""

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        z, mean = self.mix(x, size)
        return self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, size: List[int]):
        """The attention's output before its projection `proj` (AttnScale applied per window), and None."""
        B, N, C = x.shape
        H, W = size
        x = x.view(B, H, W, C)
        pad_r, pad_b = (self.ws - W % self.ws) % self.ws, (self.ws - H % self.ws) % self.ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, Hp, Wp, _ = x.shape
        _h, _w = Hp // self.ws, Wp // self.ws
        x = x.reshape(B, _h, self.ws, _w, self.ws, C).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, _h * _w, self.ws * self.ws, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
        x = self.scale_values(self.attention(q, k, v), self.values_mean(v))
        x = x.transpose(2, 3).reshape(B, _h, _w, self.ws, self.ws, C)
        x = x.transpose(2, 3).reshape(B, _h * self.ws, _w * self.ws, C)
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        return x.reshape(B, N, C), None


class SizedBlock(FeatScaleProjection):
    """PVT-v2's and Twins' pre-norm blocks (their attention takes the map size) with optional FeatScale."""

    def attention_branch(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        if self.fuses_featscale():
            return self.featscale_projection(*self.attn.mix(self.norm1(x), size))
        return self.feat_scaled(self.attn(self.norm1(x), size))


class PvtBlockAddon(PvtBlock, SizedBlock):

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attention_branch(x, feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x), feat_size))


class TwinsBlockAddon(TwinsBlock, SizedBlock):

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attention_branch(x, size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MViTAttention(MultiScaleAttention, AttnScaleAttention):
    """MViTv2's pooling attention with optional AttnScale on its output A v (before the residual pooling adds q),
    DC[v] over the pooled keys."""

    def map_dropped(self) -> bool:
        return False  # no attention dropout

    def forward(self, x: torch.Tensor, feat_size: List[int]):
        z, q_size = self.mix(x, feat_size)
        return self.proj(z), q_size

    def mix(self, x: torch.Tensor, feat_size: List[int]):
        """The attention's output before its projection `proj` (AttnScale applied), and the queries' map size."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(dim=0)
        q, q_size = self._pooled(q, self.pool_q, self.norm_q, feat_size)
        k, k_size = self._pooled(k, self.pool_k, self.norm_k, feat_size)
        v, _ = self._pooled(v, self.pool_v, self.norm_v, feat_size)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_type == 'spatial':
            attn = cal_rel_pos_type(attn, q, self.has_cls_token, q_size, k_size, self.rel_pos_h, self.rel_pos_w)
        x = self.scale_values(self.attn_map(attn.softmax(dim=-1)) @ v, self.values_mean(v))
        if self.residual_pooling:
            x = x + q
        return x.transpose(1, 2).reshape(B, -1, self.dim_out), q_size

    def _pooled(self, t: torch.Tensor, pool, norm, feat_size: List[int]):
        size = feat_size
        if pool is not None:
            t, tok = reshape_pre_pool(t, feat_size, self.has_cls_token)
            t, size = reshape_post_pool(pool(t), self.num_heads, tok)
        return (t if norm is None else norm(t)), size


class MViTBlock(MultiScaleBlock, FeatScaleProjection):
    """MViTv2's block with optional FeatScale on the attention branch (fused with the attention's projection)."""

    def featscale_fused(self) -> bool:
        return not self.attn._forward_hooks  # no dropout after the projection

    def forward(self, x: torch.Tensor, feat_size: List[int]):
        x_norm = self.norm1(x)
        x_shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        x_shortcut = self._shortcut_pool(x_shortcut, feat_size)
        if self.fuses_featscale():
            z, feat_size_new = self.attn.mix(x_norm, feat_size)
            y = self.featscale_projection(z, None)
        else:
            y, feat_size_new = self.attn(x_norm, feat_size)
            y = self.feat_scaled(y)
        x = x_shortcut + self.drop_path1(y)
        x_norm = self.norm2(x)
        x_shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return x_shortcut + self.drop_path2(self.mlp(x_norm)), feat_size_new


class LevitAttentionOutput(AttnScaleAttention):
    """What LeViT's attentions share: no dropout, and AttnScale on A v before the activation and projection."""

    def map_dropped(self) -> bool:
        return False

    def attend_values(self, attn: torch.Tensor, v: torch.Tensor, channels_first: bool) -> torch.Tensor:
        """A v with AttnScale: (B, heads, d, N) from v (B, heads, d, N) if `channels_first`, else (B, heads, N, d)."""
        attn = self.attn_map(attn.softmax(dim=-1))
        if channels_first:
            return self.scale_values(v @ attn.transpose(-2, -1), self.values_mean(v, dim=-1))
        return self.scale_values(attn @ v, self.values_mean(v))


class LevitAttentionAddon(LevitAttention, LevitAttentionOutput):
    """LeViT's attention (attention biases, linear or convolutional) with optional AttnScale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            B, C, H, W = x.shape
            q, k, v = self.qkv(x).view(B, self.num_heads, -1, H * W).split(
                [self.key_dim, self.key_dim, self.val_dim], dim=2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + self.get_attention_biases(x.device)
            x = self.attend_values(attn, v, True).view(B, -1, H, W)
        else:
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
                [self.key_dim, self.key_dim, self.val_dim], dim=3)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            attn = q @ k * self.scale + self.get_attention_biases(x.device)
            x = self.attend_values(attn, v, False).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class LevitDownsampleAttention(AttentionDownsample, LevitAttentionOutput):
    """LeViT's down-sampling attention (queries from a sub-sampled map, keys from every token) with optional
    AttnScale, DC[v] over all the keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            B, C, H, W = x.shape
            HH, WW = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
            k, v = self.kv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.val_dim], dim=2)
            q = self.q(x).view(B, self.num_heads, self.key_dim, -1)
            attn = (q.transpose(-2, -1) @ k) * self.scale + self.get_attention_biases(x.device)
            x = self.attend_values(attn, v, True).reshape(B, self.val_attn_dim, HH, WW)
        else:
            B, N, C = x.shape
            k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
            k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            q = self.q(x).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
            attn = q @ k * self.scale + self.get_attention_biases(x.device)
            x = self.attend_values(attn, v, False).transpose(1, 2).reshape(B, -1, self.val_attn_dim)
        return self.proj(x)


class LevitBranch(FeatScaleProjection):
    """FeatScale on a LeViT attention's output, tokens (B, N, C) or, convolutional, a map (B, C, H, W)."""

    def feat_scaled_output(self, y: torch.Tensor) -> torch.Tensor:
        return self.feat_scaled_map(y, channels_first=True) if y.dim() == 4 else self.feat_scaled(y)

    def branch_channels(self) -> int:
        return self.attn.proj.ln.bn.num_features

    @property
    def channels_first(self) -> bool:
        """Whether its tokens are maps (B, C, H, W) (convolutional LeViT), for diagnostics.py."""
        return bool(self.attn.use_conv)


class LevitBlockAddon(LevitBlock, LevitBranch):
    """LeViT's residual attention block with optional FeatScale on the attention branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.feat_scaled_output(self.attn(x)))
        return x + self.drop_path2(self.mlp(x))


class LevitDownsampleBlock(LevitDownsample, LevitBranch):
    """LeViT's down-sampling stage entry with optional FeatScale on its attention's output (no residual there)."""

    @property
    def attn(self):
        return self.attn_downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feat_scaled_output(self.attn_downsample(x))
        return x + self.drop_path(self.mlp(x))


register(SwinTransformerV2Block, WindowAttentionV2, Adapter(SwinV2Block, SwinV2Attention))
register(SwinTransformerV2CrBlock, WindowMultiHeadAttention, Adapter(SwinV2CrBlock, SwinV2CrAttention))
register(PartitionAttentionCl, AttentionCl, Adapter(MaxxVitPartitionBlock, MaxxVitAttention))
register(TransformerBlock2d, Attention2d, Adapter(CoAtNetBlock, CoAtNetAttention))
register(VoloTransformer, VoloAttention, Adapter(VoloBlock, VoloAttentionAddon))
register(PvtBlock, PvtAttention, Adapter(PvtBlockAddon, PvtAttentionAddon))
register(TwinsBlock, GlobalSubSampleAttn, Adapter(TwinsBlockAddon, TwinsGlobalAttention))
register(TwinsBlock, LocallyGroupedAttn, Adapter(TwinsBlockAddon, TwinsLocalAttention))
register(MultiScaleBlock, MultiScaleAttention, Adapter(MViTBlock, MViTAttention))
register(LevitBlock, LevitAttention, Adapter(LevitBlockAddon, LevitAttentionAddon))
register(LevitDownsample, AttentionDownsample, Adapter(LevitDownsampleBlock, LevitDownsampleAttention,
                                                       attr='attn_downsample'))
