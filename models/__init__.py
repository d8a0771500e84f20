"""AttnScale / FeatScale models. Importing this package registers every variant in timm's registry."""
from . import cait, deit
from .antioversmooth import attnscale, attnscale_fused, dc_hf_split, featscale, token_mean
from .checkpoint import load_checkpoint, load_state_dict
from .deit import set_fused_attn
from .registry import create_model, list_variants, parse_model_kwargs
