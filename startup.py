"""main.py's flags, checked at start-up: before the dataset is scanned, a checkpoint is read or anything is written.

A bad value ends the run with one line (utils.fail, exit status 2) that names the flag, the value and what is
accepted:
  * numbers: the range of every numeric flag (RANGES; a test keeps it complete) and the count of list flags;
  * names and spec strings, against what the library that reads them accepts: --device (torch), --opt, --sched,
    --aa, --train-interpolation, --remode, --mixup-mode, --teacher-model, --model (timm);
  * the model, built on the meta device (no memory, no weights) with only the keyword arguments it accepts: its
    input constraints (a patch grid that covers the image exactly) and one forward pass of an --input-size image;
  * combinations: a flag whose effect needs another one (NEEDS), two flags that decide the same thing, --eval
    without weights, --world_size without a launcher, and an --output_dir that holds another run (rundir).
Flags that have no effect in the chosen mode, where the result is still what was asked for (training flags with
--eval, schedule parameters the chosen --sched does not use), get a `warning:` line instead. No flag a user sets
is ignored without a word.
"""
import difflib
import functools
import math
import os
import re
import sys
from typing import NamedTuple

import timm
import torch
from timm.data.transforms import str_to_interp_mode
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.scheduler.plateau_lr import PlateauLRScheduler

import models
import rundir
import utils
from datasets import SMALL_IMAGE_SIZE, build_transform
from models.checkpoint import (ADDON_KEY, CheckpointError, check_checkpoint_file, check_fit, classifier_keys,
                               model_state, to_model_layout)


class Range(NamedTuple):
    """The accepted values of a numeric flag, e.g. Range(0, 1, high_open=True) is [0, 1)."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x) -> bool:
        return ((x > self.low if self.low_open else x >= self.low)
                and (x < self.high if self.high_open else x <= self.high))

    def __str__(self) -> str:
        if self.high == math.inf:
            return f'{"greater than" if self.low_open else "at least"} {number(self.low)}'
        left, right = '(' if self.low_open else '[', ')' if self.high_open else ']'
        return f'in {left}{number(self.low)}, {number(self.high)}{right}'

    def fix(self) -> str:
        if self.high == math.inf:
            return f'pass a value {">" if self.low_open else ">="} {number(self.low)}'
        return f'pass a value {self}'


def number(x) -> str:
    return str(int(x)) if float(x).is_integer() else f'{x:g}'


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
FRACTION, PROBABILITY = Range(0, 1, high_open=True), Range(0, 1)  # [0, 1) and [0, 1]
RANGES = {
    'batch_size': AT_LEAST_1, 'epochs': AT_LEAST_1, 'input_size': AT_LEAST_1, 'drop': FRACTION, 'drop_path': FRACTION,
    'model_ema_decay': PROBABILITY, 'opt_eps': POSITIVE, 'opt_betas': FRACTION, 'clip_grad': POSITIVE,
    'momentum': FRACTION, 'weight_decay': AT_LEAST_0, 'lr': POSITIVE, 'lr_noise': AT_LEAST_0,
    'lr_noise_pct': AT_LEAST_0, 'lr_noise_std': AT_LEAST_0, 'warmup_lr': AT_LEAST_0, 'min_lr': AT_LEAST_0,
    'decay_epochs': POSITIVE, 'warmup_epochs': AT_LEAST_0, 'cooldown_epochs': AT_LEAST_0,
    'patience_epochs': AT_LEAST_0, 'decay_rate': POSITIVE, 'color_jitter': AT_LEAST_0, 'smoothing': FRACTION,
    'shift_aug': FRACTION, 'reprob': PROBABILITY, 'recount': AT_LEAST_1, 'mixup': AT_LEAST_0, 'cutmix': AT_LEAST_0,
    'cutmix_minmax': Range(0, 1, low_open=True), 'mixup_prob': PROBABILITY, 'mixup_switch_prob': PROBABILITY,
    'eval_crop_ratio': Range(0, 1, low_open=True), 'bce_target_thresh': FRACTION, 'distillation_alpha': PROBABILITY,
    'distillation_tau': POSITIVE, 'seed': Range(0, 2 ** 31 - 1), 'start_epoch': AT_LEAST_0,
    'num_workers': AT_LEAST_0, 'print_freq': AT_LEAST_1, 'world_size': AT_LEAST_1, 'local_rank': AT_LEAST_0,
    'dist_timeout': POSITIVE,
}
FIXES = {'smoothing': 'pass e.g. 0.1, or 0 for none', 'clip_grad': 'pass e.g. 5.0, or leave it out for no clipping',
         'eval_crop_ratio': 'pass e.g. 0.875 (224/256), or 1.0 for no crop'}
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'wsd', 'rsqrt')  # timm's but none
REMODES, MIXUP_MODES = ('const', 'rand', 'pixel'), ('batch', 'pair', 'elem')
SCHEDULE_FLAGS = {  # schedule flags -> the --sched values that use them; --cooldown-epochs: none (DeiT's loop)
    'decay_epochs': ('step', 'wsd', 'rsqrt'), 'decay_rate': ('step', 'multistep', 'plateau', 'poly'),
    'patience_epochs': ('plateau',), 'min_lr': ('cosine', 'tanh', 'plateau', 'poly', 'wsd', 'rsqrt'),
    'cooldown_epochs': (),
}
RESERVED_MODEL_KWARGS = {'img_size': '--input-size', 'drop_rate': '--drop', 'drop_path_rate': '--drop-path',
                         'num_classes': 'the data set (its class count)', 'pretrained': '--pretrained'}
OPTIONAL_MODEL_KWARGS = ('img_size', 'drop_rate', 'drop_path_rate')  # passed only to models that take them
TRAINING_GROUPS = ('optimizer', 'learning rate schedule', 'augmentation', 'distillation')
TRAINING_FLAGS = ('epochs', 'start_epoch', 'drop', 'drop_path', 'model_ema', 'model_ema_decay', 'model_ema_force_cpu',
                  'overwrite')
NOT_TRAINING = ('eval_crop_ratio',)  # in the augmentation group, but used by evaluation
RESUME_FLAGS = ('resume', 'auto_reload', 'local_rank', 'dist_url', 'world_size', 'start_epoch', 'eval', 'overwrite')


def warn(message: str):
    utils.log(f'warning: {message}', file=sys.stderr)


class Flags:
    """`args` with the parser that made it: how a flag is spelled, and whether the user set it (a value other
    than its default)."""

    def __init__(self, args, parser):
        self.args = args
        self.actions = {}  # dest -> its actions ('--model-ema' and '--no-model-ema' share one)
        for a in parser._actions:
            if a.dest not in ('help', 'list_models'):
                self.actions.setdefault(a.dest, []).append(a)
        self.groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}

    def flag(self, dest: str) -> str:
        return self.actions[dest][0].option_strings[0]

    def given(self, dest: str) -> bool:
        return getattr(self.args, dest) != self.actions[dest][0].default

    def shown(self, dest: str) -> str:
        """The flag as the user would write it: '--lr 0.001', '--opt-betas 0.9 0.99', '--no-model-ema'."""
        value = getattr(self.args, dest)
        if isinstance(value, bool):
            spelled = [a.option_strings[0] for a in self.actions[dest] if a.const is value]
            return spelled[0] if spelled else f'{self.flag(dest)} off'
        shown = ' '.join(map(str, value)) if isinstance(value, list) else value
        return f'{self.flag(dest)} {shown}'


def check_args(args, parser):
    """Every start-up check, in order: numbers, names, the model, combinations, the files the run reads and the
    --output_dir it writes; then a warning for each flag that has no effect in the chosen mode."""
    flags = Flags(args, parser)
    if args.data_path == parser.get_default('data_path') and not os.path.exists(args.data_path):
        utils.fail(f'no --data-path given (the default {args.data_path} is the authors\' cluster path); fix: pass '
                   '--data-path <folder with train/ and val/>, or run scripts/demo.sh for a dataset that ships offline')
    check_numbers(flags)
    check_device(flags)
    check_optimization(flags)
    check_augmentation(flags)
    probe = probe_model(args, flags)
    check_combinations(flags)
    check_needs(flags)
    check_distillation(flags, probe)
    check_files(flags)
    rundir.check_fresh_start(args)
    warn_unused(flags)


# ---------------------------------------------------------------------------------------------------------------
# Numbers and names
# ---------------------------------------------------------------------------------------------------------------

def check_numbers(flags: Flags):
    """Every numeric flag: finite, in RANGES, and the right count of values for the list flags."""
    for dest, accepted in RANGES.items():
        value = getattr(flags.args, dest)
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                utils.fail(f'{flags.flag(dest)} {v} is not a finite number; fix: pass a number')
            if v not in accepted:
                what = f'{flags.shown(dest)}: each value' if isinstance(value, list) else flags.shown(dest)
                utils.fail(f'{what} must be {accepted}; fix: {FIXES.get(dest, accepted.fix())}')
    args = flags.args
    if args.lr_noise is not None and len(args.lr_noise) not in (1, 2):
        utils.fail(f'{flags.shown("lr_noise")}: give 1 value (noise from that fraction of the schedule on) or 2 '
                   '(noise between two fractions), e.g. --lr-noise 0.4 0.9')
    minmax = args.cutmix_minmax
    if minmax is not None and (len(minmax) != 2 or minmax[0] >= minmax[1]):
        utils.fail(f'{flags.shown("cutmix_minmax")}: give 2 values MIN < MAX in (0, 1], the range of the CutMix box '
                   'side as a fraction of the image side, e.g. --cutmix-minmax 0.2 0.8')
    if args.start_epoch >= args.epochs:
        utils.fail(f'--start_epoch {args.start_epoch} must be below --epochs {args.epochs} (epochs are numbered from '
                   f'0); fix: pass --start_epoch {args.epochs - 1} or less, or a larger --epochs')


def choose(flag: str, value: str, accepted) -> None:
    """Fail unless `value` is one of `accepted`, naming the closest ones."""
    if value in accepted:
        return
    close = difflib.get_close_matches(str(value), list(accepted), n=3, cutoff=0.5)
    hint = f' (closest: {", ".join(close)})' if close else ''
    listing = ', '.join(accepted) if len(accepted) <= 12 else f'{len(accepted)} names'
    utils.fail(f'{flag} {value!r} is not one of {listing}{hint}')


def check_device(flags: Flags):
    """--device: a device torch knows, available here; on CUDA under a launcher, without an index (each process
    takes the GPU of its local rank). --amp-dtype float16 needs CUDA."""
    args = flags.args
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        utils.fail(f'--device {args.device!r} is not a device; fix: pass cpu, cuda or cuda:<index>')
    if device.type not in ('cpu', 'cuda'):
        utils.fail(f'--device {args.device}: main.py runs on cpu or cuda; fix: pass --device cpu or --device cuda')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            utils.fail('--device cuda but CUDA is not available; pass --device cpu')
        if device.index is not None and launched(args):
            utils.fail(f'--device {args.device}: under a launcher each process uses the GPU of its local rank; '
                       'fix: pass --device cuda')
        if device.index is not None and device.index >= torch.cuda.device_count():
            utils.fail(f'--device {args.device}: only {torch.cuda.device_count()} GPUs are visible (cuda:0 to '
                       f'cuda:{torch.cuda.device_count() - 1}); fix: pass one of them')
    if args.amp_dtype == 'float16' and device.type != 'cuda':
        utils.fail('--amp-dtype float16 needs CUDA; use bfloat16 or float32 on CPU')


def launched(args) -> bool:
    """Whether a launcher (torchrun, torch.distributed.launch, srun, submitit) started this process."""
    return utils.launcher_placement(os.environ, args.local_rank) is not None


def check_optimization(flags: Flags):
    """--opt, its hyper-parameters and --sched with its parameters, as timm's factories take them: both are built
    here, on a one-weight stand-in model."""
    args = flags.args
    opt = args.opt.lower().split('_')[-1]  # timm: 'lookahead_adamw' is AdamW inside Lookahead
    try:
        info = get_optimizer_info(opt)
    except ValueError:
        choose('--opt', args.opt, list_optimizers())
    for dest, has, what in (('momentum', info.has_momentum, 'momentum'), ('opt_eps', info.has_eps, 'epsilon'),
                            ('opt_betas', info.has_betas, 'betas')):
        if flags.given(dest) and getattr(args, dest) is not None and not has:
            utils.fail(f'{flags.shown(dest)}: --opt {args.opt} has no {what}; fix: drop {flags.flag(dest)}')
    if args.opt_betas is not None and info.has_betas and len(args.opt_betas) != info.num_betas:
        utils.fail(f'{flags.shown("opt_betas")}: --opt {args.opt} takes {info.num_betas} betas; fix: pass '
                   f'{info.num_betas} values')
    stand_in = torch.nn.Linear(1, 1)
    try:
        optimizer = create_optimizer_v2(stand_in, **dict(optimizer_kwargs(cfg=args), lr=args.lr))
    except (ValueError, TypeError, AssertionError) as e:
        utils.fail(f'--opt {args.opt}: {first_line(e)}')
    if args.sched == 'none':
        utils.fail('--sched none: main.py steps a schedule every epoch; fix: for a fixed learning rate pass --sched '
                   'constant --warmup-epochs 0')
    choose('--sched', args.sched, SCHEDULERS)
    if args.sched == 'plateau' and args.sched_on_updates:
        utils.fail('--sched plateau steps once an epoch (on the accuracy); fix: drop --sched-on-updates')
    try:
        create_scheduler(args, optimizer, updates_per_epoch=1)
    except (ValueError, AssertionError) as e:
        utils.fail(f'--sched {args.sched}: {first_line(e)}')


def first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def augment_on(args) -> bool:
    return args.aa is not None and str(args.aa).lower() not in ('', 'none')


def default_transform(args) -> bool:
    """Whether training uses DeiT's transform (RandAugment, random erasing), not --shift-aug or --ThreeAugment."""
    return not args.shift_aug and not args.ThreeAugment


def check_augmentation(flags: Flags):
    """--remode, --mixup-mode and --train-interpolation by name; --aa by building the training transform with
    timm; mixup's even batch."""
    args = flags.args
    choose('--remode', args.remode, REMODES)
    choose('--mixup-mode', args.mixup_mode, MIXUP_MODES)
    if args.train_interpolation != 'random':
        try:
            str_to_interp_mode(args.train_interpolation)
        except KeyError:
            choose('--train-interpolation', args.train_interpolation,
                   ('random', 'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'))
    if mixup_on(args) and args.batch_size % 2:
        utils.fail(f'--batch-size {args.batch_size}: mixup/cutmix pair each image with another, so the batch must be '
                   'even; fix: pass an even --batch-size, or --mixup 0 --cutmix 0')
    try:
        build_transform(True, args)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        culprit = flags.shown('aa') if augment_on(args) and default_transform(args) else 'the training transform'
        utils.fail(f'{culprit}: timm does not accept it ({first_line(e)}); fix: pass a timm augmentation spec such '
                   'as rand-m9-mstd0.5-inc1, or none')


def mixup_on(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# ---------------------------------------------------------------------------------------------------------------
# The model, on the meta device
# ---------------------------------------------------------------------------------------------------------------

class ModelError(ValueError):
    """A model that cannot be built or cannot take the input size; the message names the flag."""


def probe_model(args, flags: Flags = None) -> torch.nn.Module:
    """The model of the flags, built on the meta device (a fraction of a second), or one line saying why it
    cannot be built or cannot take --input-size images. A flag the model has no argument for (--drop, --drop-path)
    fails when the user set it; otherwise it is simply not passed."""
    try:
        probe, dropped = _probe(args.model, args.addon, tuple(args.model_kwargs or ()), args.input_size, args.drop,
                                args.drop_path)
    except ModelError as e:
        utils.fail(str(e))
    for key in dropped:
        dest = {'drop_rate': 'drop', 'drop_path_rate': 'drop_path'}.get(key)
        if flags is not None and dest and flags.given(dest):
            utils.fail(f'{flags.shown(dest)}: {args.model} has no {key} argument; fix: drop {flags.flag(dest)}')
    return probe


def model_kwargs(args) -> dict:
    """The keyword arguments main.py builds `args.model` with: --model-kwargs, plus the image size and drop rates
    of the flags where the model takes them (resnet18 has no img_size, for instance)."""
    _, dropped = _probe(args.model, args.addon, tuple(args.model_kwargs or ()), args.input_size, args.drop,
                        args.drop_path)
    kwargs = dict(img_size=args.input_size, drop_rate=args.drop, drop_path_rate=args.drop_path)
    return {**{k: v for k, v in kwargs.items() if k not in dropped}, **models.parse_model_kwargs(args.model_kwargs)}


@functools.lru_cache(maxsize=4)
def _probe(name: str, addon, items: tuple, input_size: int, drop: float, drop_path: float):
    """(the model on the meta device, the optional keyword arguments it does not take); ModelError otherwise."""
    given = ' '.join(items)
    try:
        kwargs = models.parse_model_kwargs(list(items))
    except ValueError as e:
        raise ModelError(str(e)) from None
    for key in kwargs:
        if key in RESERVED_MODEL_KWARGS:
            raise ModelError(f'--model-kwargs {key}={kwargs[key]}: main.py sets {key} from '
                             f'{RESERVED_MODEL_KWARGS[key]}; fix: drop it from --model-kwargs')
    optional = dict(img_size=input_size, drop_rate=drop, drop_path_rate=drop_path)
    base = _build(name, kwargs, optional, given)  # without the add-on: a failure here is not the add-on's
    dropped = tuple(k for k in OPTIONAL_MODEL_KWARGS if k not in optional)
    check_input_size(base, name, input_size, given)
    if not addon:
        return base, dropped
    try:
        with torch.device('meta'):
            model = models.create_model(name, addon=addon, **kwargs, **optional)
    except ValueError as e:
        raise ModelError(str(e) if str(e).startswith('--addon') else f'--addon {addon}: {e}') from None
    _forward(model, input_size, f'--addon {addon} on --model {name}')
    return model, dropped


def _build(name: str, kwargs: dict, optional: dict, given: str) -> torch.nn.Module:
    """`name` on the meta device with `kwargs` and those of `optional` it accepts (the others are removed from
    `optional`); ModelError naming --model or --model-kwargs otherwise."""
    while True:
        try:
            with torch.device('meta'):
                return models.create_model(name, **kwargs, **optional)
        except TypeError as e:
            key = unexpected_keyword(e)
            if key in optional:
                del optional[key]
                continue
            if key in kwargs:
                raise ModelError(f'--model-kwargs {key}={kwargs[key]}: {name} has no argument {key}; fix: drop it '
                                 'from --model-kwargs') from None
            raise ModelError(model_error(name, given, e)) from None
        except Exception as e:  # noqa: BLE001 (any failure of a constructor: one line that names the flags)
            raise ModelError(model_error(name, given, e)) from None


def unexpected_keyword(e: TypeError) -> str:
    """The argument a constructor refused, or '': Python's "got an unexpected keyword argument 'img_size'", or
    timm's "got unexpected keyword argument(s): ['img_size']"."""
    found = re.search(r"unexpected keyword argument(?:\(s\))?:? \[?'(\w+)'", str(e))
    return found.group(1) if found else ''


def model_error(name: str, given: str, e: Exception) -> str:
    """One line for a model that cannot be built: the real cause where it is known."""
    text = first_line(e)
    if not given:
        return text if isinstance(e, ValueError) else f'--model {name} cannot be built ({type(e).__name__}: {text})'
    if 'divisible by num_heads' in text:
        return heads_error(name, given)
    if 'has no attention blocks' in text and builds(name):  # the gains go into every block: these kwargs left none
        return (f'--model-kwargs {given}: {name} has no attention blocks with these arguments; fix: give it at '
                'least one block (e.g. depth=1)')
    return f'--model {name} --model-kwargs {given}: cannot be built ({type(e).__name__}: {text}); fix: change ' \
           '--model-kwargs (every size must be a positive number)'


def builds(name: str) -> bool:
    """Whether `name` builds (on the meta device) with its default arguments."""
    try:
        with torch.device('meta'):
            models.create_model(name)
    except Exception:
        return False
    return True


def heads_error(name: str, given: str) -> str:
    kwargs = models.parse_model_kwargs(given.split())
    with torch.device('meta'):
        default = models.create_model(name)
    width = kwargs.get('embed_dim', default.embed_dim)
    heads = [h for h in range(1, 17) if width % h == 0]
    return (f'--model-kwargs {given}: the width embed_dim={width} does not split into '
            f'num_heads={kwargs.get("num_heads", default.blocks[0].attn.num_heads)} heads; fix: pick num_heads '
            f'among {", ".join(map(str, heads))}, or an embed_dim that is a multiple of num_heads')


def check_input_size(model: torch.nn.Module, name: str, size: int, given: str):
    """The image must be cut into whole patches (timm's patch embedding would drop the border silently), and the
    model must run on a `size` x `size` image: one forward pass on the meta device."""
    embed = getattr(model, 'patch_embed', None)
    patch = getattr(embed, 'patch_size', None)
    if patch is not None and not getattr(embed, 'dynamic_img_pad', False):
        p = max(patch) if isinstance(patch, (tuple, list)) else patch
        if size < p or size % p:
            sizes = sorted({max(p, size // p * p), (size // p + 1) * p})
            raise ModelError(f'--input-size {size}: {name} cuts images into {p} px patches, so the size must be a '
                             f'multiple of {p}; fix: pass --input-size {" or ".join(map(str, sizes))}'
                             + (' (or another patch_size in --model-kwargs)' if given else ''))
    _forward(model, size, f'--model {name}' + (f' --model-kwargs {given}' if given else ''))


def _forward(model: torch.nn.Module, size: int, what: str):
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device='meta'))
    except Exception as e:  # noqa: BLE001 (whatever the model raises for this size)
        raise ModelError(f'--input-size {size}: {what} cannot take {size} x {size} images ({type(e).__name__}: '
                         f'{first_line(e)}); fix: pass the input size the model is built for') from None


# ---------------------------------------------------------------------------------------------------------------
# Combinations
# ---------------------------------------------------------------------------------------------------------------

def check_combinations(flags: Flags):
    """Flags that decide the same thing, and what --eval, --pretrained and the launcher flags need."""
    args = flags.args
    pairs = (('eval', 'throughput', 'both choose what the run does'),
             ('pretrained', 'finetune', 'both choose the starting weights'),
             ('pretrained', 'resume', 'both choose the starting weights'),
             ('finetune', 'resume', 'both choose the starting weights (--resume would replace what --finetune loads)'),
             ('shift_aug', 'ThreeAugment', 'both choose the training transform'),
             ('overwrite', 'auto_reload', 'ask to start over and to continue the run in --output_dir'),
             ('overwrite', 'resume', 'are for different starts (--resume may write into an --output_dir that holds '
                                     'a run anyway)'))
    for a, b, why in pairs:
        if getattr(args, a) and getattr(args, b):
            utils.fail(f'{flags.flag(a)} and {flags.flag(b)} {why}; pass one of them')
    if args.eval and not (args.resume or args.finetune or args.pretrained or reloads(args)):
        utils.fail('--eval needs weights to evaluate; fix: pass --resume <checkpoint>, --finetune <checkpoint> or '
                   '--pretrained' + (f' (--auto_reload found no checkpoint in {args.output_dir})'
                                    if args.auto_reload else ''))
    if args.pretrained:
        cfg = timm.models.get_pretrained_cfg(args.model)
        if not (cfg and cfg.has_weights):
            utils.fail(f'--pretrained: {args.model} has no pretrained weights (released: '
                       f'{", ".join(models.hub.RELEASED)}; or a timm model with weights); fix: drop --pretrained, or '
                       'pass the weights with --finetune <file>')
    check_launcher(flags)


def reloads(args) -> bool:
    """Whether --auto_reload finds a checkpoint to continue from."""
    return bool(args.auto_reload and args.output_dir and any(
        os.path.exists(os.path.join(args.output_dir, name)) for name in ('checkpoint.pth', 'checkpoint.prev.pth')))


def check_launcher(flags: Flags):
    """--world_size, --local-rank and --dist_url are read from (or set by) a launcher; without one they would be
    ignored and the run would train alone."""
    args = flags.args
    placement = utils.launcher_placement(os.environ, args.local_rank)
    if placement is None:
        for dest in ('world_size', 'local_rank', 'dist_url'):
            if flags.given(dest):
                utils.fail(f'{flags.shown(dest)} needs a launcher that starts the processes: main.py alone runs one; '
                           f'fix: torchrun --nproc_per_node=<processes> main.py ... (without {flags.flag(dest)})')
    elif flags.given('world_size') and args.world_size != placement[1]:
        utils.fail(f'--world_size {args.world_size}, but the launcher started {placement[1]} processes; fix: drop '
                   '--world_size (the launcher sets it)')


NEEDS = (  # flag -> (what it needs, whether the flags give it); a flag set without what it needs would be ignored
    ('auto_reload', '--output_dir', lambda a: a.output_dir),
    ('overwrite', '--output_dir', lambda a: a.output_dir),
    ('teacher_path', '--distillation-type soft or hard', lambda a: a.distillation_type != 'none'),
    ('teacher_model', '--distillation-type soft or hard', lambda a: a.distillation_type != 'none'),
    ('distillation_alpha', '--distillation-type soft or hard', lambda a: a.distillation_type != 'none'),
    ('distillation_tau', '--distillation-type soft or hard', lambda a: a.distillation_type != 'none'),
    ('src', '--ThreeAugment', lambda a: a.ThreeAugment),
    ('bce_target_thresh', '--bce-loss', lambda a: a.bce_loss),
    ('lr_noise_pct', '--lr-noise', lambda a: a.lr_noise),
    ('lr_noise_std', '--lr-noise', lambda a: a.lr_noise),
    ('model_ema_decay', '--model-ema', lambda a: a.model_ema),
    ('model_ema_force_cpu', '--model-ema', lambda a: a.model_ema),
    ('mixup_prob', '--mixup or --cutmix above 0', mixup_on),
    ('mixup_mode', '--mixup or --cutmix above 0', mixup_on),
    ('mixup_switch_prob', 'both --mixup and --cutmix above 0',
     lambda a: a.mixup > 0 and (a.cutmix > 0 or a.cutmix_minmax)),
    ('cutmix', 'no --cutmix-minmax (which sets the CutMix box itself)', lambda a: a.cutmix_minmax is None),
    ('remode', '--reprob above 0', lambda a: a.reprob > 0),
    ('recount', '--reprob above 0', lambda a: a.reprob > 0),
    ('aa', "DeiT's training transform (not --ThreeAugment or --shift-aug)", default_transform),
    ('reprob', "DeiT's training transform (not --ThreeAugment or --shift-aug)", default_transform),
    ('train_interpolation', "DeiT's training transform (not --ThreeAugment or --shift-aug)", default_transform),
    ('color_jitter', '--aa none or --ThreeAugment (RandAugment replaces color jitter, as in timm)',
     lambda a: a.ThreeAugment or (not a.shift_aug and not augment_on(a))),
    ('resplit', 'augmentation splits, which DeiT\'s recipe does not have', lambda a: False),
    ('inat_category', '--data-set INAT or INAT19', lambda a: a.data_set in ('INAT', 'INAT19')),
    ('skip_bad_images', 'an image folder data set (CIFAR-100 is read from arrays, not image files)',
     lambda a: a.data_set != 'CIFAR'),
    ('eval_crop_ratio', f'--input-size above {SMALL_IMAGE_SIZE} (smaller images are resized to the input size, '
                        'not cropped: a ratio of 1)',
     lambda a: a.input_size > SMALL_IMAGE_SIZE or a.eval_crop_ratio == 1),
    ('unsafe_load', 'a checkpoint to load: --resume, --finetune, --auto_reload or --teacher-path',
     lambda a: a.resume or a.finetune or a.auto_reload or a.teacher_path),
)


def check_needs(flags: Flags):
    """A flag set without what it needs fails, unless its value turns its feature off anyway (--aa none)."""
    for dest, needed, present in NEEDS:
        value = getattr(flags.args, dest)
        if flags.given(dest) and not turned_off(value) and not present(flags.args):
            add = f', or add {needed}' if needed.startswith('--') else ''
            utils.fail(f'{flags.shown(dest)} has no effect without {needed}; fix: drop {flags.flag(dest)}{add}')


def turned_off(value) -> bool:
    return value is None or value is False or value == 0 or str(value).lower() in ('', 'none')


def check_distillation(flags: Flags, probe: torch.nn.Module):
    """--distillation-type needs a teacher file, a teacher model timm knows and a model with a distillation token
    and head (timm's `set_distilled_training`), which `probe` tells. An add-on keeps the class of its model."""
    args = flags.args
    if args.distillation_type == 'none':
        return
    if args.finetune and not args.eval:
        utils.fail('fine-tuning with distillation is not supported; drop --distillation-type or --finetune')
    if not args.teacher_path:
        utils.fail('--distillation-type needs --teacher-path (weights are never downloaded)')
    if not timm.is_model(args.teacher_model):
        close = difflib.get_close_matches(args.teacher_model, timm.list_models(), n=3, cutoff=0.5)
        utils.fail(f'--teacher-model {args.teacher_model!r} is not a timm model' +
                   (f' (closest: {", ".join(close)})' if close else ''))
    if not hasattr(probe, 'set_distilled_training'):
        utils.fail(f'--distillation-type {args.distillation_type} needs a model with a distillation head, such as '
                   f'deit_tiny_distilled_patch16_224; {args.model} has none: pick a *_distilled_* model or drop '
                   '--distillation-type')


def check_files(flags: Flags):
    """The checkpoint files the run will read exist and are checkpoints (their first bytes say so)."""
    args = flags.args
    for dest in ('resume', 'finetune', 'teacher_path'):
        path = getattr(args, dest)
        if not path or (dest == 'teacher_path' and args.distillation_type == 'none'):
            continue
        if os.path.isdir(path):
            utils.fail(f'{flags.flag(dest)} {path} is a directory; fix: pass the checkpoint file in it, e.g. '
                       f'{os.path.join(path, "checkpoint.pth")}')
        try:
            check_checkpoint_file(path)
        except CheckpointError as e:
            utils.fail(f'{flags.flag(dest)}: {e}')


# ---------------------------------------------------------------------------------------------------------------
# Flags without effect in the chosen mode: warnings
# ---------------------------------------------------------------------------------------------------------------

def warn_unused(flags: Flags):
    """A warning line for each flag set by the user that has no effect here, but leaves the result as asked."""
    args = flags.args
    if args.eval or args.throughput:
        mode = '--eval' if args.eval else '--throughput'
        unused = [flags.shown(d) for d in flags.actions if flags.given(d) and not turned_off(getattr(args, d))
                   and d not in NOT_TRAINING and (flags.groups.get(d) in TRAINING_GROUPS or d in TRAINING_FLAGS)]
        if unused:
            warn(f'{", ".join(unused)}: no effect with {mode} (training flags)')
        if args.output_dir:
            warn(f'--output_dir {args.output_dir}: {mode} writes nothing there')
        return
    for dest, users in SCHEDULE_FLAGS.items():
        if flags.given(dest) and args.sched not in users:
            why = (f'--sched {args.sched} does not use it' if users else
                   'main.py trains exactly --epochs epochs, as DeiT does; add the cool-down epochs to --epochs')
            warn(f'{flags.shown(dest)}: no effect ({why})')
    if not launched(args):
        for dest in ('dist_eval', 'dist_timeout'):
            if flags.given(dest):
                warn(f'{flags.shown(dest)}: no effect in a single process')


# ---------------------------------------------------------------------------------------------------------------
# Resuming: the checkpoint against the flags, before the data is read
# ---------------------------------------------------------------------------------------------------------------

def check_resume(args, parser, path: str, ckpt: dict):
    """A checkpoint to resume from (--resume, --auto_reload) against the flags: its weights fit the model (on
    the meta device; the head is checked against the data later), --epochs leaves something to train, --start_epoch
    is not set (the checkpoint says where to continue), and every flag that differs from the checkpoint's run is
    printed."""
    if not path:
        return
    probe = probe_model(args)
    addons = [k for k in probe.state_dict() if ADDON_KEY.search(k)]
    state = to_model_layout(probe, model_state(ckpt))
    try:
        check_fit(probe, state, path, optional=addons + classifier_keys(probe))
    except CheckpointError as e:
        utils.fail(str(e))
    baseline = any(k not in state for k in addons)  # fine-tuning with an add-on starts at epoch 0 (training_state.restore)
    if args.eval or baseline or not all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
        return
    flags, done = Flags(args, parser), ckpt['epoch'] + 1
    if flags.given('start_epoch'):
        utils.fail(f'--start_epoch {args.start_epoch}: {path} continues the run at epoch {done}; fix: drop '
                   '--start_epoch')
    if args.epochs < done:
        utils.fail(f'--epochs {args.epochs}: {path} has trained {done} epochs already; fix: pass --epochs above '
                   f'{done} to train more, or --eval to evaluate it')
    changed = changed_flags(flags, ckpt.get('args') or {})
    if changed:
        utils.log(f'Flags that differ from the run of {path}: {", ".join(changed)}')
    if args.epochs == done:
        utils.log(f'{path} has trained all --epochs {args.epochs} epochs: nothing left to train (pass a larger '
                  '--epochs to train more)')


def changed_flags(flags: Flags, saved: dict) -> list:
    """'--epochs 6 (was 2)' for each flag whose value differs from the checkpoint's stored arguments."""
    out = []
    for dest in flags.actions:
        if dest in saved and dest not in RESUME_FLAGS and saved[dest] != getattr(flags.args, dest):
            out.append(f'{flags.shown(dest)} (was {saved[dest]})')
    return out


def schedule_differs(fresh: dict, saved: dict, scheduler) -> list:
    """The LR-schedule settings (timm scheduler state) in which `fresh`, built from the flags, differs from the
    checkpoint's `saved`; none for the plateau schedule, whose state is its progress, not its settings."""
    if isinstance(scheduler, PlateauLRScheduler):
        return []
    return [k for k in fresh if k != 'metric' and fresh[k] != saved.get(k)]
