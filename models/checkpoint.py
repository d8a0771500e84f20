"""Reading checkpoints safely (`.pth` and `.safetensors`) and loading weights with a report of every key that
does not fit. Every weight file this project reads goes through `load_checkpoint` and `model_state`."""
import argparse
import os
import pickle
import re
import zipfile
from collections import OrderedDict

import safetensors.torch
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from safetensors import SafetensorError

ADDON_KEY = re.compile(r'(^|\.)(lamb|lamb1|lamb2)$')  # AttnScale / FeatScale parameters
# The official Swin trainer pickles its yacs config (a dict subclass holding plain values): read as an OrderedDict
YACS_CONFIG = (OrderedDict, 'yacs.config.CfgNode')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def load_checkpoint(path: str, allow_unsafe: bool = False) -> dict:
    """Read a checkpoint file: `.safetensors` (weights only, e.g. from scripts/export_weights.py) or a
    `torch.save` file with `torch.load(weights_only=True)`.

    The official training checkpoints pickle `args` as an `argparse.Namespace`, which is allowed
    explicitly; nothing else that executes code on load is. A checkpoint of the official Swin trainer
    pickles a yacs `CfgNode`, read as a plain OrderedDict; its optimizer and scheduler states (that
    trainer's parameter groups) are dropped, so it resumes as weights. `allow_unsafe=True` (the explicit
    opt-in `--unsafe-load`) falls back to full unpickling for files you trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check the path given to --resume/--finetune')
    if str(path).endswith('.safetensors'):
        try:
            return safetensors.torch.load_file(path, device='cpu')
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'checkpoint {path} is corrupt or truncated ({first_line(e)}); delete it or pick '
                                  'another file') from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace, YACS_CONFIG]):
            ckpt = torch.load(path, map_location='cpu', weights_only=not allow_unsafe)
    except ModuleNotFoundError as e:
        raise CheckpointError(f'checkpoint {path} pickles objects of the module {e.name}, which is not installed: '
                              'load it without --unsafe-load, or install that module') from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'checkpoint {path} was refused by the safe loader ({first_line(e)}); it may carry pickled code. '
            'Pass --unsafe-load only if you trust the file') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f'checkpoint {path} is corrupt or truncated ({first_line(e)}); delete it or pick '
                              'another file') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights')
    if isinstance(ckpt.get('args'), argparse.Namespace):
        ckpt['args'] = vars(ckpt['args'])
    if 'config' in ckpt and 'args' not in ckpt:  # the official Swin trainer's: its optimizer state does not fit ours
        for key in ('optimizer', 'lr_scheduler'):
            ckpt.pop(key, None)
    return ckpt


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_state(ckpt: dict) -> dict:
    """The weights of a checkpoint dict (`model` or `state_dict` entry, or the dict itself), without a
    DataParallel/DDP `module.` prefix."""
    state = ckpt.get('model', ckpt.get('state_dict', ckpt))
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def to_model_layout(model: torch.nn.Module, state: dict) -> dict:
    """`state` in the key layout of `model`: a Swin checkpoint in the official (Microsoft) layout is mapped
    with timm's own Swin `checkpoint_filter_fn` (which leaves timm-layout weights and add-on keys as they are);
    other families' checkpoints already have their model's layout."""
    if not isinstance(model, SwinTransformer):
        return state
    try:
        return swin_checkpoint_filter_fn(state, model)
    except (AttributeError, RuntimeError):  # a block the model lacks, a table of another size: the report says which
        return state


def fit_report(model: torch.nn.Module, state: dict, optional=()) -> str:
    """'' when `state` has exactly the model's keys and shapes, else one line naming every missing,
    unexpected or mis-shaped key. Keys in `optional` may be absent or shaped differently."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in state and k not in optional and state[k].shape != own[k].shape]

    def show(keys):
        return ', '.join(keys[:8]) + (f' (+{len(keys) - 8} more)' if len(keys) > 8 else '')
    return '; '.join(f'{len(v)} {what}: {show(v)}' for what, v in
                     (('missing', missing), ('unexpected', unexpected), ('with another shape', shapes)) if v)


def check_fit(model: torch.nn.Module, state: dict, source: str, optional=()) -> None:
    """Raise a one-line CheckpointError unless `state` fits `model` (see `fit_report`)."""
    report = fit_report(model, state, optional)
    if report:
        raise CheckpointError(f'{source} does not fit {type(model).__name__} ({report}); '
                              'check that --model matches the checkpoint')


def load_state_dict(model: torch.nn.Module, state: dict, allow_missing_addons: bool = False,
                    source: str = 'checkpoint'):
    """Load `state` into `model` strictly, or fail naming every missing, unexpected or mis-shaped key.
    A checkpoint in another layout of the model's family is mapped first (`to_model_layout`).

    With `allow_missing_addons`, the AttnScale/FeatScale parameters (`lamb`, `lamb1`, `lamb2`) may be
    absent (a baseline checkpoint fine-tuned with an add-on): they keep their zero init.
    Returns the list of add-on keys that were absent.
    """
    state = to_model_layout(model, state)
    addons = [k for k in model.state_dict() if k not in state and ADDON_KEY.search(k)] if allow_missing_addons else []
    check_fit(model, state, source, optional=addons)
    model.load_state_dict(state, strict=not addons)
    return addons


def interpolate_pos_embed(model: torch.nn.Module, state: dict) -> None:
    """Resize a checkpoint's `pos_embed` in place to the model's patch grid (bicubic), keeping prefix tokens."""
    from timm.layers import resample_abs_pos_embed
    if 'pos_embed' not in state or state['pos_embed'].shape == model.pos_embed.shape:
        return
    num_prefix = model.pos_embed.shape[1] - model.patch_embed.num_patches
    state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], new_size=model.patch_embed.grid_size,
                                                num_prefix_tokens=num_prefix)
