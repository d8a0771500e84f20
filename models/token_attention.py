"""Which of timm's modules are token-to-token softmax attention (where AttnScale is defined), and which only look
like attention.

AttnScale acts on a map A whose rows are softmax distributions of queries over keys, both image tokens: A_dc = 1/N_k
is the map that keeps only the values' DC component. `TOKEN_ATTENTION` lists every such module class in timm's zoo;
`apply_addon` refuses a model where one of them is left without gains, and `scripts/addon_coverage.py` counts an
architecture of timm's pretrained zoo as one that should take the add-ons when it holds one of them.
`NOT_TOKEN_ATTENTION` names the modules that mix tokens otherwise, with the reason they take no AttnScale gains.
"""
import importlib


def _classes(names: str) -> tuple:
    """The classes named 'module.Class' (modules of timm.models, or timm.layers.<module>), in order."""
    found = []
    for name in names.split():
        module, cls = name.rsplit('.', 1)
        path = f'timm.{module}' if module.startswith('layers.') else f'timm.models.{module}'
        found.append(getattr(importlib.import_module(path), cls))
    return tuple(found)


TOKEN_ATTENTION = _classes('''
    layers.attention.Attention layers.attention.AttentionRope layers.diff_attention.DiffAttention
    layers.attention2d.MultiQueryAttention2d layers.bottleneck_attn.BottleneckAttn layers.halo_attn.HaloAttn
    vision_transformer.ParallelScalingBlock vision_transformer.DiffParallelScalingBlock
    beit.Attention cait.TalkingHeadAttn convit.GPSA convit.MHSA cpubone.ConvAttention csatv2.SpatialTransformerBlock
    davit.WindowAttention efficientformer.Attention efficientformer_v2.Attention2d
    efficientformer_v2.Attention2dDownsample efficientvit_msra.CascadedGroupAttention eva.EvaAttention
    fastvit.Attention gcvit.WindowAttentionGlobal gemma4_vit.Gemma4Attention hiera.MaskUnitAttention
    hieradet_sam2.MultiScaleAttention iformer.SHMA levit.Attention levit.AttentionDownsample lowformer.ConvAttention
    maxxvit.Attention2d maxxvit.AttentionCl metaformer.Attention mvitv2.MultiScaleAttention nest.Attention
    nextvit.EfficientAttention pvt_v2.Attention shvit.SHSA swin_transformer.WindowAttention
    swin_transformer_v2.WindowAttention swin_transformer_v2_cr.WindowMultiHeadAttention tiny_vit.Attention
    tnt.Attention twins.GlobalSubSampleAttn twins.LocallyGroupedAttn visformer.Attention
    vision_transformer_relpos.RelPosAttention vision_transformer_sam.Attention volo.Attention
''')  # ParallelScalingBlock, DiffParallelScalingBlock and csatv2's SpatialTransformerBlock attend inside the block

CLASS_ATTENTION = 'class attention: one query (the class token) per image, not token-to-token'
NO_TOKEN_MAP = 'mixes channels or runs a linear attention: no token-to-token map, so A_dc is undefined'
NOT_TOKEN_ATTENTION = dict(zip(_classes('''
    cait.ClassAttn volo.ClassAttention crossvit.CrossAttention layers.attention_pool.AttentionPoolLatent
    layers.attention_pool2d.AttentionPool2d volo.OutlookAttention layers.lambda_layer.LambdaLayer xcit.XCA
    edgenext.CrossCovarianceAttn coat.FactorAttnConvRelPosEnc efficientvit_mit.LiteMLA
    swiftformer.EfficientAdditiveAttention mobilevit.LinearSelfAttention
'''), (  # module: why it takes no AttnScale gains
    CLASS_ATTENTION, CLASS_ATTENTION, 'cross-attention of one branch\'s class token to the other branch: one query',
    'attention pooling: a few learned queries, not token-to-token', 'attention pooling: one query per image',
    'outlook attention: local weights predicted from one token, no query-key map', *[NO_TOKEN_MAP] * 7)))


def token_attention_modules(model) -> list:
    """(name, module) of every token-to-token attention module in `model`, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TOKEN_ATTENTION)]
