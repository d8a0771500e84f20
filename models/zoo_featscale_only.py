"""FeatScale where AttnScale is undefined: XCiT, whose cross-covariance attention (XCA) mixes channels, a (d x d)
map per head over the channels, not tokens. With no token-to-token map there is no A_dc, so `apply_addon(model,
'attnscale')` refuses such a model in one line that says why; FeatScale is defined on any attention branch's output
y (B, N, C): y' = y + lamb1 DC[y] + lamb2 HF[y], DC the mean over the block's tokens (XCiT's patch tokens; the class
token joins only in the class-attention blocks, which take no add-on).
"""
import torch
from timm.models.xcit import XCA, XCABlock

from .plugin import Adapter, FeatScaleProjection, register
from .token_attention import NO_TOKEN_MAP


class XcaAttention(XCA):
    """XCiT's cross-covariance attention, unchanged: FeatScale acts in the block, on its output."""


class XcaBlock(XCABlock, FeatScaleProjection):
    """XCiT's block with optional FeatScale on the XCA branch's output, before `gamma1` (layer scale) and drop path."""

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path1(self.gamma1 * self.feat_scaled(self.attn(self.norm1(x))))
        x = x + self.drop_path3(self.gamma3 * self.local_mp(self.norm3(x), H, W))  # timm's order (3, then 2)
        return x + self.drop_path2(self.gamma2 * self.mlp(self.norm2(x)))


register(XCABlock, XCA, Adapter(XcaBlock, XcaAttention, no_attnscale=NO_TOKEN_MAP))
