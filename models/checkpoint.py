"""Reading checkpoints safely (`.pth` and `.safetensors`) and loading weights with a report of every key that
does not fit. Every weight file this project reads goes through `load_checkpoint` and `model_state`."""
import argparse
import math
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
    """Read a checkpoint file: safetensors (weights only, e.g. from scripts/export_weights.py) or a `torch.save`
    file with `torch.load(weights_only=True)`, told apart by their first bytes (check_checkpoint_file).

    The official training checkpoints pickle `args` as an `argparse.Namespace`, which is allowed
    explicitly; nothing else that executes code on load is. A checkpoint of the official Swin trainer
    pickles a yacs `CfgNode`, read as a plain OrderedDict; its optimizer and scheduler states (that
    trainer's parameter groups) are dropped, so it resumes as weights. `allow_unsafe=True` (the explicit
    opt-in `--unsafe-load`) falls back to full unpickling for files you trust.
    """
    if check_checkpoint_file(path) == 'safetensors':
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
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


FORMATS = (  # (format, its first bytes) of what torch.save and safetensors write
    ('zip', b'PK\x03\x04'), ('pickle', b'\x80\x02'), ('pickle', b'\x80\x03'), ('pickle', b'\x80\x04'),
    ('pickle', b'\x80\x05'))
OTHER_FILES = ((b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'GIF8', 'a GIF image'),
               (b'\x1f\x8b', 'a gzip file'), (b'BM', 'a BMP image'), (b'%PDF', 'a PDF document'))


def check_checkpoint_file(path: str) -> str:
    """'zip' or 'pickle' (torch.save's two formats) or 'safetensors', from the first bytes of the file at `path`;
    a CheckpointError for a path that is no file, or a file that is not a checkpoint (saying what it looks like),
    so a text file or an image is not taken for a checkpoint carrying pickled code."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check the path given to --resume/--finetune')
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f'cannot read checkpoint {path} ({e.strerror}); fix: check its permissions') from None
    for kind, magic in FORMATS:
        if head.startswith(magic):
            return kind
    if len(head) > 8 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < 2 ** 40:
        return 'safetensors'  # an 8-byte header length, then the JSON header
    what = next((name for magic, name in OTHER_FILES if head.startswith(magic)), None)
    if what is None:
        what = 'an empty file' if not head else 'a text file' if _is_text(path) else 'a file of unknown format'
    raise CheckpointError(f'{path} is not a PyTorch checkpoint (it is {what}); fix: pass a .pth file written by '
                          'main.py or torch.save, or a .safetensors file')


def _is_text(path: str) -> bool:
    with open(path, 'rb') as f:
        sample = f.read(4096)
    try:
        sample.decode('utf-8')
    except UnicodeDecodeError:
        return False
    return b'\0' not in sample


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
    """Raise a one-line CheckpointError unless `state` fits `model` (see `fit_report`). When the head or the
    position embedding is what differs, the line says what the checkpoint was trained for (size_hints)."""
    report = fit_report(model, state, optional)
    if not report:
        return
    hints = size_hints(model, state, optional)
    if hints:
        raise CheckpointError(f'{source} does not fit {type(model).__name__}: {"; ".join(hints)} ({report}); fix: use '
                              'data with its classes and its --input-size, or start from it with --finetune (a new '
                              'head, the position embedding resized)')
    raise CheckpointError(f'{source} does not fit {type(model).__name__} ({report}); '
                          'check that --model matches the checkpoint')


def classifier_keys(model: torch.nn.Module) -> list:
    """The state-dict keys of the model's classifier(s): timm's pretrained_cfg names them ('head', 'fc',
    ('head', 'head_dist'), 'head.fc')."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if any(k.startswith(f'{n}.') for n in names)]


def size_hints(model: torch.nn.Module, state: dict, optional=()) -> list:
    """What a checkpoint that does not fit was trained for, where its classifier or position embedding is what
    differs: its class count, its input size (from the patch grid of its pos_embed). Keys in `optional` are not
    compared."""
    own, hints = model.state_dict(), []
    heads = [k for k in classifier_keys(model) if k.endswith('weight') and k in state and k not in optional
             and state[k].shape != own[k].shape]
    if heads:
        hints.append(f'it was trained for {state[heads[0]].shape[0]} classes, the model is built for '
                     f'{own[heads[0]].shape[0]} (the class folders of the data)')
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape \
            and 'pos_embed' not in optional and hasattr(model, 'patch_embed'):
        prefix = own['pos_embed'].shape[1] - model.patch_embed.num_patches
        grid = math.isqrt(max(state['pos_embed'].shape[1] - prefix, 0))
        patch = model.patch_embed.patch_size[0]
        if grid and grid * grid == state['pos_embed'].shape[1] - prefix:
            ours = model.patch_embed.grid_size
            hints.append(f'it was trained at input size {grid * patch} ({grid}x{grid} patches of {patch} px), the '
                         f'model is built for {ours[0] * patch} ({ours[0]}x{ours[1]}, --input-size)')
    return hints


def split_fit(model: torch.nn.Module, state: dict) -> tuple:
    """(the entries of `state` that fit `model`, the model's keys they leave at their initialisation, the keys of
    `state` that are not used), for --finetune."""
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    return fits, [k for k in own if k not in fits], [k for k in state if k not in fits]


def unused_share(state: dict, fits: dict) -> float:
    """The share of a checkpoint's weights (by element count) that `fits` leaves unused."""
    total = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    used = sum(v.numel() for v in fits.values())
    return 1 - used / total if total else 0.0


def fitted_share(model: torch.nn.Module, fits: dict) -> float:
    """The share of the model's weights (by element count; the classifier and the add-on gains, which start
    afresh by design, not counted) that `fits` provides."""
    skip = set(classifier_keys(model))
    own = {k: v.numel() for k, v in model.state_dict().items() if k not in skip and not ADDON_KEY.search(k)}
    total = sum(own.values())
    return sum(n for k, n in own.items() if k in fits) / total if total else 1.0


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
    """Resize a checkpoint's `pos_embed` in place to the model's patch grid (bicubic), keeping prefix tokens. A
    `pos_embed` that is not a square grid after the model's prefix tokens, or of another width (a checkpoint of
    another model), is left as it is, for the caller's report."""
    from timm.layers import resample_abs_pos_embed
    own = getattr(model, 'pos_embed', None)
    if 'pos_embed' not in state or own is None or state['pos_embed'].shape == own.shape:
        return
    num_prefix = own.shape[1] - model.patch_embed.num_patches
    tokens = state['pos_embed'].shape[1] - num_prefix
    if state['pos_embed'].ndim != 3 or state['pos_embed'].shape[-1] != own.shape[-1] or tokens <= 0 \
            or math.isqrt(tokens) ** 2 != tokens:
        return
    state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], new_size=model.patch_embed.grid_size,
                                                num_prefix_tokens=num_prefix)
