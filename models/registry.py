"""Registering our variants in timm's model registry, and creating them with clear errors."""
import ast
import difflib
import sys

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model

from . import hub
from .plugin import ADDONS, apply_addon

OUR_MODULES = ('deit', 'cait', 'swin')


def default_cfg(img_size: int = 224, crop_pct: float = 0.875) -> dict:
    """timm pretrained_cfg of an ImageNet-1k model trained at `img_size` (DeiT preprocessing)."""
    return dict(
        url='', num_classes=1000, input_size=(3, img_size, img_size), pool_size=None, crop_pct=crop_pct,
        interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='patch_embed.proj', classifier='head', paper_ids='arXiv:2203.05962',
    )


def register_variant(module_name: str, name: str, model_cls, cfg: dict, feature_cfg: dict = None,
                     **model_args) -> None:
    """Register `name` as a timm entrypoint defined in `module_name` that builds `model_cls(**model_args)`.

    Keyword arguments given to `timm.create_model` override `model_args` (e.g. `img_size`). The four released
    variants get their Hub location in `cfg`, so `pretrained=True` loads their weights (models/hub.py). `feature_cfg`:
    how timm's `features_only` wraps the model (default: the ViT getter on the last block).
    """
    feature_cfg = feature_cfg or dict(out_indices=3, feature_cls='getter')
    module = sys.modules[module_name]

    def entrypoint(pretrained: bool = False, **kwargs):
        features = dict(feature_cfg, out_indices=kwargs.pop('out_indices', feature_cfg['out_indices']))
        return hub.build(model_cls, name, pretrained, feature_cfg=features, **dict(model_args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module_name
    entrypoint.__doc__ = f'{name}: {model_cls.__name__}({", ".join(f"{k}={v}" for k, v in model_args.items())})'
    module.default_cfgs[name] = hub.released_cfg(name, cfg)
    setattr(module, name, register_model(entrypoint))


def list_variants() -> list:
    """Every model name this package registers, in registration order."""
    return [n for m in OUR_MODULES for n in sys.modules[f'{__package__}.{m}'].__all__ if not n[0].isupper()]


def create_model(name: str, addon: str = None, **kwargs):
    """`timm.create_model` that fails on an unknown name with the closest registered names, and on pretrained
    weights it can neither find in the Hugging Face cache nor download, with one line saying what to do.

    `addon` ('attnscale' or 'featscale') installs that add-on into the model (see `plugin.apply_addon`), with
    its gains at zero, after any pretrained weights of the base model are loaded; a name that carries an add-on
    already is refused. A model without an `img_size` argument (it takes any input size) is built without it.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, sorted(set(list_variants() + timm.list_models())), n=5, cutoff=0.5)
        hint = f'; closest: {", ".join(close)}' if close else ''
        raise ValueError(f'unknown model {name!r}{hint} (python main.py --list-models prints them all)')
    if addon and name.split('_')[0] in ADDONS:
        raise ValueError(f'--addon {addon}: {name} carries an add-on already; drop --addon or pick a base model')
    with hub.hub_errors(name, kwargs.get('cache_dir')):
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as e:  # a model that takes any input size has no img_size argument (PVT-v2, CNNs)
            if kwargs.get('img_size') is None or "'img_size'" not in str(e):
                raise
            model = timm.create_model(name, **{k: v for k, v in kwargs.items() if k != 'img_size'})
    return apply_addon(model, addon) if addon else model


def parse_model_kwargs(items) -> dict:
    """`['patch_size=2', 'embed_dim=96', 'attn_scale=True']` -> keyword arguments for create_model.

    Values are Python literals (ints, floats, booleans, tuples); anything else stays a string.
    """
    kwargs = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'--model-kwargs expects key=value pairs, got {item!r} (e.g. patch_size=2 embed_dim=96)')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs
