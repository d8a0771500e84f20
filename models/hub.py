"""Released weights through timm's own `pretrained=True`: where they are on the Hugging Face Hub, and the
`pretrained_filter_fn` that brings a released, trained or exported checkpoint into one of our models.

    import models, timm
    model = timm.create_model('attnscale_small_12', pretrained=True)

timm's loader fetches the file through the `huggingface_hub` cache, so HF_HUB_CACHE and HF_HUB_OFFLINE=1 (cache
only) apply as for any Hub model; `pretrained_cfg_overlay=dict(file=<path>)` loads a local copy instead, read by
`models.checkpoint` like `--resume` (safe unpickling, `.safetensors`, the training checkpoint's `model` weights).
"""
import contextlib
import os
import pickle
import re

import timm
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from .checkpoint import (CheckpointError, check_fit, first_line, interpolate_pos_embed, load_checkpoint, model_state,
                         to_model_layout)

HF_HUB_ID = 'peihaowang/vit-anti-oversmoothing'
RELEASED = {  # model name -> its file in HF_HUB_ID
    'attnscale_small_12': 'attnscale_small_12.pth',
    'featscale_small_12': 'featscale_small_12.pth',
    'attnscale_cait_XXS24_224': 'attnscale_cait_xxs24_224.pth',
    'featscale_cait_XXS24_224': 'featscale_cait_xxs24_224.pth',
}
HUB_ERRORS = (EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled)


def released_cfg(name: str, cfg: dict) -> dict:
    """`cfg` plus the Hub location (`hf_hub_id`, `hf_hub_filename`) of `name`'s released weights, if any."""
    return dict(cfg, hf_hub_id=HF_HUB_ID, hf_hub_filename=RELEASED[name]) if name in RELEASED else cfg


def weights_location(cfg: dict) -> str:
    """Where the pretrained weights of a resolved pretrained_cfg come from, for messages."""
    if cfg.get('file'):
        return cfg['file']
    if cfg.get('hf_hub_id'):
        return f"{cfg['hf_hub_id']}/{cfg.get('hf_hub_filename') or 'model.safetensors'}"
    return cfg.get('url') or 'the given state_dict'


def filter_fn(state_dict: dict, model) -> dict:
    """timm's `pretrained_filter_fn`: the model weights of a checkpoint (training state and a DDP `module.` prefix
    dropped) with `pos_embed` resized to the model's patch grid. Anything else that does not fit fails in one line;
    the classifier may differ when the model has another number of classes (timm re-initialises it)."""
    state = to_model_layout(model, model_state(state_dict))
    interpolate_pos_embed(model, state)
    cfg = model.pretrained_cfg
    heads = (cfg.get('classifier'),) if isinstance(cfg.get('classifier'), str) else cfg.get('classifier') or ()
    new_head = model.num_classes != cfg['num_classes']
    optional = [f'{h}.{p}' for h in heads for p in ('weight', 'bias')] if new_head else []
    check_fit(model, state, f'pretrained weights {weights_location(cfg)}', optional)
    return state


def build(model_cls, name: str, pretrained: bool, **kwargs):
    """`build_model_with_cfg` of one of our variants; with `pretrained`, its released weights or the checkpoint
    given as `pretrained_cfg_overlay=dict(file=...)`, through timm's loader and `filter_fn`."""
    if pretrained:
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        cfg = resolve_pretrained_cfg(name, kwargs.get('pretrained_cfg'), overlay)
        if cfg.file and cfg.source != 'local-dir' and cfg.state_dict is None:
            kwargs['pretrained_cfg_overlay'] = local_file_overlay(name, cfg, overlay)
        elif not (cfg.has_weights or cfg.state_dict):
            raise ValueError(f'{name} has no released weights; pretrained=True loads them for {", ".join(RELEASED)} '
                             '(or give a checkpoint: pretrained_cfg_overlay=dict(file=<path>), '
                             'main.py --finetune <path>)')
    with hub_errors(name, kwargs.get('cache_dir')):
        model = build_model_with_cfg(model_cls, name, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    model.pretrained_cfg.pop('state_dict', None)  # the weights are in the model; do not keep a second copy
    return model


def local_file_overlay(name: str, cfg, overlay: dict) -> dict:
    """`overlay` with the weights of `cfg.file` read as --resume reads them (timm's own file reader would pick a
    training checkpoint's EMA weights), and their class count, which the file's head gives, unless set."""
    if not os.path.isfile(cfg.file):
        raise CheckpointError(f'{name}: pretrained file {cfg.file} does not exist; check '
                              'pretrained_cfg_overlay=dict(file=...)')
    state = model_state(load_checkpoint(cfg.file))
    head = f'{cfg.classifier}.weight' if isinstance(cfg.classifier, str) else None
    if head in state and 'num_classes' not in overlay:
        overlay = dict(overlay, num_classes=state[head].shape[0])
    return dict(overlay, state_dict=state)


@contextlib.contextmanager
def hub_errors(name: str, cache_dir=None):
    """Turn a failed Hub download of `name`'s pretrained weights (any timm model) into one ValueError line naming
    the repository, the file, the cache and the offline switch; a file the safe unpickler refuses, likewise."""
    try:
        yield
    except HUB_ERRORS as e:
        repo, file = hub_location(name)
        why = ('HF_HUB_OFFLINE=1 is set' if hf_constants.HF_HUB_OFFLINE
               else f'the Hub is not reachable ({first_line(e)})')
        raise ValueError(
            f'{name}: pretrained weights {repo}/{file} are not in the Hugging Face cache '
            f'{cache_dir or hf_constants.HF_HUB_CACHE} and {why}; download them where the Hub is reachable '
            f'(hf download {repo} {file}), point HF_HUB_CACHE at a cache that holds them, or give a local copy '
            '(pretrained_cfg_overlay=dict(file=<path>), main.py --finetune <path>)') from None
    except RuntimeError as e:  # timm's weights_only load re-raises the unpickler's refusal as a RuntimeError
        if not isinstance(e.__cause__, pickle.UnpicklingError):
            raise
        found = re.search(r'Unsupported globals: (.*?)\.(\s|$)', str(e))
        repo, file = hub_location(name)
        raise CheckpointError(
            f'{name}: pretrained weights {repo}/{file} were refused by the safe loader (it pickles '
            f'{found.group(1) if found else "objects that are not tensors"}); if you trust the file, pass it to '
            'main.py (--finetune or --resume) with --unsafe-load') from None


def hub_location(name: str) -> tuple:
    """(repository, file) that timm's loader downloads for `name`'s pretrained weights."""
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.PretrainedCfg()
    return cfg.hf_hub_id, cfg.hf_hub_filename or 'model.safetensors'


def describe_start(model) -> str:
    """One line saying which pretrained weights `model` starts from and how they were adapted to it."""
    cfg = model.pretrained_cfg
    notes = []
    if model.num_classes != cfg['num_classes']:
        notes.append(f"head re-initialised for {model.num_classes} classes (the weights have {cfg['num_classes']})")
    size = model.patch_embed.img_size if getattr(model, 'pos_embed', None) is not None else None
    if size is not None and tuple(size) != tuple(cfg['input_size'][1:]):
        notes.append(f"position embedding resized from {cfg['input_size'][-1]} px to {size[-1]} px")
    return f'Starting from the pretrained weights {weights_location(cfg)}' + (f'; {"; ".join(notes)}' if notes else '')
