"""The add-ons in timm's single-scale ViT families beyond `VisionTransformer`'s own blocks: EVA / EVA-02 / DINOv3 /
PE and the other `AttentionRope` models (Qwen3-VL, DeepSeek), BEiT, the relative-position ViT, and post-norm
(ResPost) blocks. One small adapter per family, registered with `plugin.register`: our subclasses of timm's block
and attention, swapped in place by `install`.

- Position terms (RoPE on q and k, relative position biases added to the logits) act before the softmax, so
  AttnScale (A'v = (1 + lamb) A v - lamb DC[v], through the output projection) passes them through unchanged.
- Under a padding mask, DC[v] and FeatScale's DC[y] are means over the valid tokens only (as in `ViTBlock`).
- Post-norm blocks add norm(attn(x)) to the residual: FeatScale acts on that branch output, after the norm (the
  paper's definition: on what the attention branch adds), so it cannot join the projection there and runs after
  the norm (`featscale`, which keeps the branch output for backward).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention, Block as BeitBlock
from timm.models.deepseek_vit import DeepseekVitBlock
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Attention, ResPostBlock
from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

from .fused import key_validity
from .plugin import Adapter, AttnScaleAttention, FeatScaleProjection, ViTAttention, register


def biased_qkv(attn, x: torch.Tensor) -> torch.Tensor:
    """The fused qkv projection with separate q and v biases (k's is zero), as EVA, BEiT and Swin V2 run it."""
    if attn.q_bias is None:
        return attn.qkv(x)
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        qkv = attn.qkv(x)
        qkv += qkv_bias
        return qkv
    return F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)


def rotated(t: torch.Tensor, rope: Optional[torch.Tensor], prefix: int, half: bool, like: torch.Tensor):
    """q or k with the rotary embedding applied to its patch tokens (not the `prefix` ones), as timm does."""
    if rope is None:
        return t
    return torch.cat([t[:, :, :prefix, :], apply_rot_embed_cat(t[:, :, prefix:, :], rope, half=half)], dim=2).type_as(like)


class RopeAttentionOutput(AttnScaleAttention):
    """What EVA's attention and `AttentionRope` share: the forward through `mix`, and after q, k and v: RoPE,
    attention, scale norm, gate. Listed first among a subclass's bases, so that its forward is the one taken."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        z, mean = self.mix(x, rope, attn_mask, is_causal)
        return self.proj_drop(self.project(z, mean))

    def mixed(self, q, k, v, gate, rope, attn_mask, is_causal, valid, width: int, groups: int = 1) -> torch.Tensor:
        """q and k normed and rotated, k and v repeated over their `groups` of query heads, then the attention,
        its output normed and gated, as timm computes them."""
        B, _, N, _ = q.shape
        q, k = self.q_norm(q), self.k_norm(k)
        half = getattr(self, 'rotate_half', False)
        q, k = (rotated(t, rope, self.num_prefix_tokens, half, v) for t in (q, k))
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        x = self.attention(q, k, v, attn_mask, is_causal, valid).transpose(1, 2).reshape(B, N, width)
        x = self.norm(x)
        return x if gate is None else x * gate


class EvaAttentionAddon(RopeAttentionOutput, EvaAttention):
    """EVA's attention (RoPE on q and k, fused or separate q/k/v projections) with optional AttnScale."""

    def mix(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False):
        """The attention's output before its projection `proj`, and DC[v] where AttnScale acts there."""
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        valid = key_validity(attn_mask) if attn_mask is not None and self.lamb is not None else None
        if self.qkv is not None:
            q, k, v, mean = self.split(biased_qkv(self, x), self.num_heads, valid)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                        self.v_proj))
            mean = self.values_mean(v, None if valid is None else valid.unsqueeze(1))
        return self.mixed(q, k, v, gate, rope, attn_mask, is_causal, valid, C), mean


class RopeAttention(RopeAttentionOutput, AttentionRope):
    """timm's `AttentionRope` (EVA-style ViTs, Qwen3-VL, DeepSeek; grouped-query heads) with optional AttnScale."""

    def mix(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False):
        """The attention's output before its projection `proj`, and DC[v] where AttnScale acts there."""
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        valid = key_validity(attn_mask) if attn_mask is not None and self.lamb is not None else None
        if self.qkv is not None and self.num_kv_groups == 1:
            q, k, v, mean = self.split(self.qkv(x), self.num_heads, valid)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
            mean = self.values_mean(v, None if valid is None else valid.unsqueeze(1))
        if mean is not None and self.num_kv_groups > 1:  # query head h reads kv head h // groups
            mean = mean.repeat_interleave(self.num_kv_groups, dim=1)
        return self.mixed(q, k, v, gate, rope, attn_mask, is_causal, valid, self.attn_dim, self.num_kv_groups), mean


class EvaBlockAddon(EvaBlock, FeatScaleProjection):
    """EVA's pre-norm block with optional FeatScale on the attention branch, before `gamma_1`."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is None and self.fuses_featscale():
            x_attn = self.featscale_projection(*self.attn.mix(self.norm1(x), rope, attn_mask, is_causal))
        else:
            x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            x_attn = self.feat_scaled(x_attn, self.valid_tokens(attn_mask))
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)


class EvaPostNormBlock(EvaBlockPostNorm, FeatScaleProjection):
    """EVA's post-norm block with optional FeatScale on the attention branch's output, after `norm1`."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        y = self.norm1(self.attn(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal))
        x = x + self.drop_path1(self.feat_scaled(y, self.valid_tokens(attn_mask)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class DeepseekBlock(DeepseekVitBlock, FeatScaleProjection):
    """DeepSeek's pre-norm block (`AttentionRope`) with optional FeatScale on the attention branch."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fuses_featscale():
            y = self.featscale_projection(*self.attn.mix(self.norm1(x), rope))
        else:
            y = self.feat_scaled(self.attn(self.norm1(x), rope=rope))
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViTResPostBlock(ResPostBlock, FeatScaleProjection):
    """timm's post-norm ViT block with optional FeatScale on the attention branch's output, after `norm1`."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        y = self.norm1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))
        x = x + self.drop_path1(self.feat_scaled(y, self.valid_tokens(attn_mask)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class BeitAttentionAddon(BeitAttention, AttnScaleAttention):
    """BEiT's attention (relative position bias, per block or shared) with optional AttnScale."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, mean = self.mix(x, shared_rel_pos_bias)
        return self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None):
        """The attention's output before its projection `proj`, and DC[v] where AttnScale acts there."""
        B, N, C = x.shape
        q, k, v, mean = self.split(biased_qkv(self, x), self.num_heads)
        if self.fused_attn and not self.map_dropped():
            bias = shared_rel_pos_bias
            if self.relative_position_bias_table is not None:
                bias = self._get_rel_pos_bias() if bias is None else self._get_rel_pos_bias() + bias
            x = self.attention(q, k, v, bias)
        else:  # timm adds the two biases one after the other here
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.relative_position_bias_table is not None:
                attn = attn + self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                attn = attn + shared_rel_pos_bias
            x = self.attend(attn.softmax(dim=-1), v)
        return x.transpose(1, 2).reshape(B, N, C), mean


class BeitBlockAddon(BeitBlock, FeatScaleProjection):
    """BEiT's pre-norm block with optional FeatScale on the attention branch, before `gamma_1`."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fuses_featscale():
            y = self.featscale_projection(*self.attn.mix(self.norm1(x), shared_rel_pos_bias))
        else:
            y = self.feat_scaled(self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


class RelPosAttentionAddon(RelPosAttention, AttnScaleAttention):
    """The relative-position ViT's attention with optional AttnScale."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, mean = self.mix(x, shared_rel_pos)
        return self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None):
        """The attention's output before its projection `proj`, and DC[v] where AttnScale acts there."""
        B, N, C = x.shape
        q, k, v, mean = self.split(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        return self.attention(q, k, v, bias).transpose(1, 2).reshape(B, N, C), mean


class RelPosBlockAddon(RelPosBlock, FeatScaleProjection):
    """The relative-position ViT's pre-norm block with optional FeatScale on the attention branch, before `ls1`."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.fuses_featscale():
            y = self.featscale_projection(*self.attn.mix(self.norm1(x), shared_rel_pos))
        else:
            y = self.feat_scaled(self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos))
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RelPosResPostBlock(ResPostRelPosBlock, FeatScaleProjection):
    """The relative-position ViT's post-norm block with optional FeatScale after `norm1`."""

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.feat_scaled(self.norm1(self.attn(x, shared_rel_pos=shared_rel_pos))))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


register(ResPostBlock, Attention, Adapter(ViTResPostBlock, ViTAttention))
for _block, _ours in ((EvaBlock, EvaBlockAddon), (EvaBlockPostNorm, EvaPostNormBlock)):
    register(_block, EvaAttention, Adapter(_ours, EvaAttentionAddon))
    register(_block, AttentionRope, Adapter(_ours, RopeAttention))
register(DeepseekVitBlock, AttentionRope, Adapter(DeepseekBlock, RopeAttention))
register(BeitBlock, BeitAttention, Adapter(BeitBlockAddon, BeitAttentionAddon))
register(RelPosBlock, RelPosAttention, Adapter(RelPosBlockAddon, RelPosAttentionAddon))
register(ResPostRelPosBlock, RelPosAttention, Adapter(RelPosResPostBlock, RelPosAttentionAddon))
