"""AttnScale / FeatScale as a plug-in for timm's own models (ViT, CaiT, Swin here; the other families in
`zoo_vit.py`, `zoo_hierarchical.py` and `zoo_featscale_only.py`): `apply_addon(model, addon)`.

One small adapter per supported timm family turns the family's attention module and block into
their subclass below, in place (`module.__class__` is swapped, the weights stay where they are),
and gives them the add-on's gains, named as in the released checkpoints and zero at the start:

    AttnScale   <attention>.lamb     (heads,)     A' = (1 + lamb) A - lamb / N, N = tokens attended
    FeatScale   <block>.lamb1/lamb2  (channels,)  y' = y + lamb1 DC[y] + lamb2 HF[y], y the attention branch

FeatScale acts once on the attention-branch output, before layer scale and drop path. The maths is
`antioversmooth.py` (its fused forms: `fused.py`); a subclass only decides where it acts. With zero
gains every subclass computes what timm's module computes, bit for bit, on the same (fused or explicit)
attention path. The attention itself runs as in the plain model, fused kernel or explicit map: AttnScale
acts through the output projection, by the identity A'v = (1 + lamb) A v - lamb DC[v], which holds for
any map (`attnscale_projection`), and FeatScale is fused with that projection (`featscale_projection`),
so neither keeps an extra tensor for backward. In Swin that projection then runs after the windows are
merged, over whole images: the same row-by-row products, bit for bit on CPU, though a GPU library may
pick another kernel for the other shape. The explicit path shows each map to `attn_probe`, an identity
whose forward hooks see it (diagnostics.py).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.cait import LayerScaleBlock, TalkingHeadAttn
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block

from .antioversmooth import attnscale, dc_mean, featscale
from .fused import (attnscale_projection, attnscale_values, featscale_projection, key_validity, plain_autograd,
                    qkv_heads, qkv_heads_and_mean)
from .checkpoint import ADDON_KEY
from .token_attention import token_attention_modules

ADDONS = ('attnscale', 'featscale')
SUPPORTED = ('timm VisionTransformer, DeiT, CaiT, Swin and the other families of docs/models.md '
             '(python scripts/addon_coverage.py lists them)')


class AttnScaleAttention:
    """What every attention subclass below shares: where AttnScale acts and what the diagnostics see.

    AttnScale acts through the output projection (`attnscale_projection`: A'v = (1 + lamb) A v - lamb DC[v]),
    so the attention itself, fused kernel or explicit map, runs as in the plain model. Only where dropout acts on
    the map (training with attention dropout) is A' formed and dropped out, as the official code does. The
    explicit path shows each map A, before AttnScale, to `attn_probe`, an identity whose forward hooks see it
    (diagnostics.py applies the module's lamb)."""

    def map_dropped(self) -> bool:
        """Whether dropout acts on the attention map, so that AttnScale must form A' itself."""
        return self.lamb is not None and self.training and self.attn_drop.p > 0.

    def split(self, qkv: torch.Tensor, num_heads: int, valid: Optional[torch.Tensor] = None):
        """q, k, v from the qkv projection's output, and DC[v] where AttnScale goes through the projection: the
        mean over every key, or over the keys `valid` (B, N, 1) marks (a padding mask's, `key_validity`)."""
        if self.lamb is None or self.map_dropped():
            q, k, v = qkv_heads(qkv, num_heads)
            return q, k, v, None
        if valid is not None:
            q, k, v = qkv_heads(qkv, num_heads)
            return q, k, v, dc_mean(v, valid.unsqueeze(1))
        return qkv_heads_and_mean(qkv, num_heads)

    def values_mean(self, v: torch.Tensor, valid: Optional[torch.Tensor] = None, dim: int = -2):
        """DC[v], the values' mean over the keys (axis `dim`; only those `valid` marks), in float32, where AttnScale
        acts on the attention's output rather than on its map (None elsewhere): for values that do not come
        from one fused qkv projection (separate projections, pooled keys)."""
        if self.lamb is None or self.map_dropped():
            return None
        return dc_mean(v, valid, dim)

    def scale_values(self, o: torch.Tensor, mean: Optional[torch.Tensor]) -> torch.Tensor:
        """A'v = (1 + lamb) A v - lamb DC[v] from o = A v with the heads on axis -3 ((B, H, N, d), (B, H, d, N),
        windows (B, G, H, n, d)) and DC[v] shaped alike: AttnScale on the attention's output, for projections that
        are not a plain Linear over the heads' channels (or come after other terms). o itself where `mean` is None."""
        if mean is None or self.lamb is None:
            return o
        return attnscale_values(o, mean, self.lamb)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  is_causal: bool = False, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + attn_mask) v as timm's `Attention` runs it: the fused kernel (`fused_attn`,
        unless dropout acts on AttnScale's map) or the explicit map (`attend`, A_dc over the keys `valid` marks)."""
        if self.fused_attn and not self.map_dropped():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                  dropout_p=self.attn_drop.p if self.training else 0.)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
        return self.attend(attn.softmax(dim=-1), v, valid)

    def attn_map(self, attn: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The explicit map A as the product with v takes it: shown to `attn_probe`, and A' where dropout acts on
        it (A_dc over the keys `valid` (B, N, 1) marks, where given)."""
        attn, lamb = self.attn_probe(attn), self.lamb
        if lamb is not None and self.map_dropped():
            attn = attnscale(attn, lamb, None if valid is None else valid.transpose(-1, -2).unsqueeze(1))
        return attn

    def attend(self, attn: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The explicit map's product with v, through `attn_map` and dropout."""
        return self.attn_drop(self.attn_map(attn, valid)) @ v

    def project(self, x: torch.Tensor, mean: Optional[torch.Tensor]) -> torch.Tensor:
        """The output projection `proj`, with AttnScale where `mean` (DC[v]) is given."""
        lamb = self.lamb
        if mean is None or lamb is None:
            return self.proj(x)
        return attnscale_projection(x, self.proj.weight, self.proj.bias, lamb, mean)


class ViTAttention(Attention, AttnScaleAttention):
    """timm's `Attention` with optional AttnScale (`lamb`, per head)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x, mean = self.mix(x, attn_mask, is_causal)
        return self.proj_drop(self.project(x, mean))

    def mix(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """The attention's output before its projection `proj` (heads mixed, normed and gated), and DC[v] where
        AttnScale is to act in the projection."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        valid = key_validity(attn_mask) if attn_mask is not None and self.lamb is not None else None
        q, k, v, mean = self.split(self.qkv(x), self.num_heads, valid)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn and not self.map_dropped():
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attend(attn.softmax(dim=-1), v, valid)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return x, mean


class FeatScaleProjection:
    """For blocks whose attention ends in `proj_drop(proj(z))`: FeatScale fused with that projection
    (`featscale_projection`, which keeps nothing extra for backward) where no dropout follows the projection.
    Where the attention module has forward hooks (diagnostics.py), the attention runs whole, then `featscale`:
    the same numbers, and the hooks see its output."""

    def valid_tokens(self, attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The tokens (B, N, 1) a padding mask leaves valid, where FeatScale needs them (None: every token)."""
        if attn_mask is None or self.lamb1 is None:
            return None
        return key_validity(attn_mask)

    def featscale_fused(self) -> bool:
        if torch.jit.is_scripting():
            return False
        return (self.attn.proj_drop.p == 0. or not self.training) and not self.attn._forward_hooks

    def featscale_projection(self, z: torch.Tensor, mean: Optional[torch.Tensor]) -> torch.Tensor:
        """FeatScale on the attention's projection of z (with AttnScale's `mean` too, both add-ons: then
        FeatScale follows AttnScale's projection)."""
        if mean is not None:
            return featscale(self.attn.project(z, mean), self.lamb1, self.lamb2, self.feat_scale_repeat)
        return featscale_projection(z, self.attn.proj.weight, self.attn.proj.bias, self.lamb1, self.lamb2,
                                    self.feat_scale_repeat)

    def fuses_featscale(self) -> bool:
        """Whether the block has FeatScale and runs it fused with the attention's projection."""
        return self.lamb1 is not None and self.lamb2 is not None and self.featscale_fused()

    def feat_scaled(self, y: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """FeatScale on the attention branch's output y (B, N, C) where the block has its gains (else y): DC over
        every token, or over those `valid` (B, N, 1) marks."""
        if self.lamb1 is None or self.lamb2 is None:
            return y
        return featscale(y, self.lamb1, self.lamb2, self.feat_scale_repeat, valid)

    def feat_scaled_map(self, y: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """`feat_scaled` on a map, (B, H, W, C) or with `channels_first` (B, C, H, W): DC over its H W tokens."""
        if self.lamb1 is None or self.lamb2 is None:
            return y
        if channels_first:
            return self.feat_scaled(y.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(y.shape)
        return self.feat_scaled(y.reshape(y.shape[0], -1, y.shape[-1])).view(y.shape)

    def branch_channels(self) -> int:
        """Channels of the attention branch's output (FeatScale's gains)."""
        return self.attn.proj.out_features


class ViTBlock(Block, FeatScaleProjection):
    """timm's pre-norm `Block` with optional FeatScale on the attention branch, before `ls1`. Under a padding mask
    (NaFlexViT) both add-ons take their means over the valid tokens only.

    `feat_scale_repeat` is 1 (the paper); the released DeiT models use 2 (see `deit.py`).
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is None and self.lamb1 is not None and self.lamb2 is not None and self.featscale_fused():
            y = self.featscale_projection(*self.attn.mix(self.norm1(x), attn_mask, is_causal))
        else:
            y = self.feat_scaled(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal),
                                 self.valid_tokens(attn_mask))
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class CaitAttention(TalkingHeadAttn, AttnScaleAttention):
    """CaiT's talking-heads attention with optional AttnScale after the post-softmax head mix `proj_w`
    (rows then need not sum to 1; A_dc = 1/N all the same, as in the released models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, mean = self.mix(x)
        return self.proj_drop(self.project(x, mean))

    def mix(self, x: torch.Tensor):
        """The attention's output before its projection `proj`, and DC[v] where AttnScale acts there."""
        B, N, C = x.shape
        q, k, v, mean = self.split(self.qkv(x), self.num_heads)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.attend(attn, v).transpose(1, 2).reshape(B, N, C), mean


class CaitBlock(LayerScaleBlock, FeatScaleProjection):
    """CaiT's self-attention block with optional FeatScale, before `gamma_1`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lamb1 is not None and self.lamb2 is not None and self.featscale_fused():
            y = self.featscale_projection(*self.attn.mix(self.norm1(x)))
        else:
            y = self.attn(self.norm1(x))
            if self.lamb1 is not None and self.lamb2 is not None:
                y = featscale(y, self.lamb1, self.lamb2, self.feat_scale_repeat)
        x = x + self.drop_path(self.gamma_1 * y)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class SwinWindowAttention(WindowAttention, AttnScaleAttention):
    """Swin's window attention with optional AttnScale after the softmax, N = tokens of one window.

    As in the official code, A_dc = 1/N ignores the shift mask (masked entries become -lamb/N), which is what
    A'v = (1 + lamb) A v - lamb DC[v], DC over the window's N tokens, computes for the masked map A. Fused:
    relative position bias + shift mask go to the kernel as `attn_mask`.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z, mean = self.mix(x, mask)
        return z if self.projection_deferred else self.proj_drop(self.project(z, mean))

    def mix(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        """The attention's output before its projection `proj`, per window (B_, N, C), and DC[v] per window where
        AttnScale acts in the projection."""
        B_, N, C = x.shape
        q, k, v, mean = self.split(self.qkv(x), self.num_heads)
        if self.fused_attn and not self.map_dropped():
            attn_mask = self._get_rel_pos_bias()
            if mask is not None:  # (windows, N, N), 0 / -100, the same for every image
                num_win = mask.shape[0]
                mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
                attn_mask = attn_mask + mask.reshape(-1, self.num_heads, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            x = self.attend(self.softmax(attn), v)
        return x.transpose(1, 2).reshape(B_, N, -1), mean


class SwinBlock(SwinTransformerBlock, FeatScaleProjection):
    """Swin block with optional FeatScale on the attention branch after window reverse and reverse shift:
    DC is the mean over all H*W tokens of the image (not per window), applied once. While gradients are
    recorded (and no dropout follows the projection), the attention's output projection, a per-token map,
    runs after the windows are merged and shifted back, on the whole image, fused with FeatScale
    (`featscale_projection`), so that nothing extra is kept for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.lamb1 is not None and self.lamb2 is not None and self.projection_after_merge():
            y = self.featscale_projection(self.merged_before_projection(self.norm1(x)).reshape(B, H * W, C), None)
        else:
            y = self._attn(self.norm1(x)).reshape(B, H * W, C)
            if self.lamb1 is not None and self.lamb2 is not None:
                y = featscale(y, self.lamb1, self.lamb2, self.feat_scale_repeat)
        x = x.reshape(B, H * W, C) + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)

    def projection_after_merge(self) -> bool:
        """Whether the attention's projection runs after the window merge, fused with FeatScale: when
        `featscale_fused` (as in ViT), without AttnScale in the same block (its DC is per window), where the
        attention is as wide as the block (timm's merge takes its C channels), and outside TorchScript,
        torch.compile and tracing (no state is set mid-forward there)."""
        if torch.jit.is_scripting() or plain_autograd():
            return False
        return (self.featscale_fused() and self.attn.lamb is None
                and self.attn.proj.in_features == self.attn.proj.out_features)

    @torch.jit.unused
    def merged_before_projection(self, x: torch.Tensor) -> torch.Tensor:
        """timm's shifted-window attention (`_attn`) with the attention's output projection left out."""
        self.attn.projection_deferred = True
        try:
            return self._attn(x)
        finally:
            self.attn.projection_deferred = False


@dataclass(frozen=True)
class Adapter:
    """How one family takes the add-ons: our subclasses of its block and attention, the block's attribute that holds
    the attention, and (FeatScale-only families) why AttnScale is undefined there."""
    block: type
    attention: type
    attr: str = 'attn'
    no_attnscale: str = ''


ADAPTERS = {}  # timm's block class -> {timm's attention class: Adapter}; our classes map to the same Adapter


def register(block: type, attention: type, ours: Adapter) -> None:
    """Register the adapter of timm's `block` holding timm's `attention` (and of ours, for a second install)."""
    for b in (block, ours.block):
        for a in (attention, ours.attention):
            ADAPTERS.setdefault(b, {})[a] = ours


register(Block, Attention, Adapter(ViTBlock, ViTAttention))
register(LayerScaleBlock, TalkingHeadAttn, Adapter(CaitBlock, CaitAttention))
register(SwinTransformerBlock, WindowAttention, Adapter(SwinBlock, SwinWindowAttention))


def _adapter(model: nn.Module) -> list:
    """[(block, Adapter)] for every block of `model` that takes the add-ons, in module order: wherever timm's
    blocks sit (ViT's `blocks`, CaiT's self-attention stage, every Swin stage, CrossViT's branches, PiT's stages,
    MobileViT's transformers, ...). A ValueError names the model's class when it has none, or when one of its
    token-to-token attention modules (`token_attention.py`) would be left without gains."""
    found = [(m, ADAPTERS[type(m)][type(getattr(m, attr))]) for m in model.modules() if type(m) in ADAPTERS
             for attr in {a.attr for a in ADAPTERS[type(m)].values()}
             if type(getattr(m, attr, None)) in ADAPTERS[type(m)]]
    covered = {id(getattr(blk, a.attr)) for blk, a in found}
    left = [(name, m) for name, m in token_attention_modules(model) if id(m) not in covered]
    if left:
        name, m = left[0]
        raise ValueError(f'AttnScale/FeatScale cannot be installed in {type(model).__name__}: its '
                         f'{type(m).__name__} ({name}) has no adapter; supported: {SUPPORTED}')
    if not found:
        raise ValueError(f'AttnScale/FeatScale cannot be installed in {type(model).__name__}: it has no attention '
                         f'blocks; supported: {SUPPORTED}')
    return found


def self_attention_blocks(model: nn.Module) -> list:
    """The blocks of a supported model that carry (or would carry) the add-ons, in order."""
    return [blk for blk, _ in _adapter(model)]


def _gain(module: nn.Module, name: str, size: int, on: bool) -> None:
    """Give `module` the add-on gain `name`: zeros of `size` if `on`, else None (no state-dict key);
    a gain it has already stays."""
    if getattr(module, name, None) is None:
        ref = next(module.parameters())
        module.register_parameter(name, nn.Parameter(torch.zeros(size, device=ref.device, dtype=ref.dtype))
                                  if on else None)


def install(model: nn.Module, attn_scale: bool = False, feat_scale: bool = False,
            feat_scale_repeat: float = 1.) -> nn.Module:
    """Turn every self-attention block of `model` and its attention into our subclasses, in place, with the
    chosen add-ons' gains at zero (neither: the same function, with `attn_probe` for diagnostics)."""
    found = _adapter(model)
    refused = next((a.no_attnscale for _, a in found if a.no_attnscale), '') if attn_scale else ''
    if refused:
        raise ValueError(f'AttnScale cannot be installed in {type(model).__name__}: its attention {refused}; '
                         'FeatScale can (--addon featscale)')
    for blk, adapter in found:
        attn = getattr(blk, adapter.attr)
        blk.__class__, attn.__class__ = adapter.block, adapter.attention
        blk.feat_scale_repeat = feat_scale_repeat
        if not hasattr(attn, 'attn_probe'):
            attn.attn_probe = nn.Identity()
        if isinstance(attn, SwinWindowAttention):  # an instance attribute, seen by TorchScript
            attn.projection_deferred = False  # True for one call of SwinBlock.merged_before_projection
        if not adapter.no_attnscale:
            _gain(attn, 'lamb', attn.num_heads, attn_scale)
        for name in ('lamb1', 'lamb2'):
            _gain(blk, name, blk.branch_channels(), feat_scale)
    return model


def has_addon(model: nn.Module) -> bool:
    """Whether `model` has AttnScale or FeatScale gains already."""
    return any(ADDON_KEY.search(name) for name, _ in model.named_parameters())


def apply_addon(model: nn.Module, addon: str) -> nn.Module:
    """Insert `addon` ('attnscale' or 'featscale') into every self-attention block of a supported timm
    model, in place, and return it. The gains start at zero, so the model computes what it did before;
    the state dict gains only `<attention>.lamb` resp. `<block>.lamb1` / `<block>.lamb2`.

    FeatScale's terms count once (the paper), unless the model says otherwise in `feat_scale_repeat`
    (the released DeiT models: 2).
    """
    if addon not in ADDONS:
        raise ValueError(f'unknown add-on {addon!r}: choose one of {", ".join(ADDONS)}')
    if has_addon(model):
        raise ValueError(f'{type(model).__name__} already carries an add-on (it has lamb parameters); '
                         'apply --addon to its base model instead')
    return install(model, attn_scale=addon == 'attnscale', feat_scale=addon == 'featscale',
                   feat_scale_repeat=getattr(model, 'feat_scale_repeat', 1.))


def set_fused_attn(model: nn.Module, enabled: bool) -> dict:
    """Switch `fused_attn` on every module of `model` that has one (ours and timm's attentions); returns
    {module: previous value}, so a caller can restore them. Off, attention maps are formed explicitly."""
    previous = {m: m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')}
    for m in previous:
        m.fused_attn = enabled
    return previous
