"""AttnScale / FeatScale models. Importing this package registers every variant in timm's registry;
`apply_addon` installs either add-on into a supported timm model."""
from . import cait, deit, swin, zoo_featscale_only, zoo_hierarchical, zoo_vit
from .antioversmooth import attnscale, dc_hf_split, featscale, token_mean
from .checkpoint import load_checkpoint, load_state_dict
from .fused import attnscale_projection, featscale_projection, qkv_heads, qkv_heads_and_mean
from .plugin import ADDONS, apply_addon, set_fused_attn
from .registry import create_model, list_variants, parse_model_kwargs
