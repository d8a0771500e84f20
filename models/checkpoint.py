"""Reading checkpoints safely and loading weights with a report of every key that does not fit."""
import argparse
import os
import pickle
import re
import zipfile

import torch

ADDON_KEY = re.compile(r'(^|\.)(lamb|lamb1|lamb2)$')  # AttnScale / FeatScale parameters


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def load_checkpoint(path: str, allow_unsafe: bool = False) -> dict:
    """Read a checkpoint file with `torch.load(weights_only=True)`.

    The official training checkpoints pickle `args` as an `argparse.Namespace`, which is allowed
    explicitly; nothing else that executes code on load is. `allow_unsafe=True` (the explicit
    opt-in `--unsafe-load`) falls back to full unpickling for files you trust.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check the path given to --resume/--finetune')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=not allow_unsafe)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f'checkpoint {path} was refused by the safe loader ({first}); it may carry pickled code. '
            'Pass --unsafe-load only if you trust the file') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'checkpoint {path} is corrupt or truncated ({first}); delete it or pick another file') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {path} holds a {type(ckpt).__name__}, not a dict of weights')
    if isinstance(ckpt.get('args'), argparse.Namespace):
        ckpt['args'] = vars(ckpt['args'])
    return ckpt


def model_state(ckpt: dict) -> dict:
    """The weights of a checkpoint dict (`model` or `state_dict` entry, or the dict itself), without a
    DataParallel/DDP `module.` prefix."""
    state = ckpt.get('model', ckpt.get('state_dict', ckpt))
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def load_state_dict(model: torch.nn.Module, state: dict, allow_missing_addons: bool = False, source: str = 'checkpoint'):
    """Load `state` into `model` strictly, or fail naming every missing, unexpected or mis-shaped key.

    With `allow_missing_addons`, the AttnScale/FeatScale parameters (`lamb`, `lamb1`, `lamb2`) may be
    absent (a baseline checkpoint fine-tuned with an add-on): they keep their zero init.
    Returns the list of add-on keys that were absent.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in state and state[k].shape != own[k].shape]
    addons = [k for k in missing if ADDON_KEY.search(k)] if allow_missing_addons else []
    missing = [k for k in missing if k not in addons]
    if missing or unexpected or shapes:
        def show(keys):
            return ', '.join(keys[:8]) + (f' (+{len(keys) - 8} more)' if len(keys) > 8 else '')
        parts = [f'{len(v)} {what}: {show(v)}' for what, v in
                 (('missing', missing), ('unexpected', unexpected), ('with another shape', shapes)) if v]
        raise CheckpointError(f'{source} does not fit {type(model).__name__} ({"; ".join(parts)}); '
                              'check that --model matches the checkpoint')
    model.load_state_dict({k: v for k, v in state.items()}, strict=not addons)
    return addons
