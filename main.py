"""Train and evaluate AttnScale / FeatScale vision transformers (DeiT's main.py, with the official flags).

    python -m torch.distributed.launch --nproc_per_node=2 --use_env main.py --model attnscale_small_12 ...
    torchrun --nproc_per_node=2 main.py ...          python main.py ...          (see README.md)
"""
import argparse
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3

import models
import utils
from datasets import DatasetError, build_dataset
from engine import NonFiniteLossError, evaluate, throughput, train_one_epoch
from losses import DistillationLoss, build_criterion
from models.checkpoint import (ADDON_KEY, CheckpointError, interpolate_pos_embed, load_checkpoint, load_state_dict,
                               model_state)
from samplers import RASampler, ResumableSampler

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM after a checkpoint; rerun with --auto_reload
PEER_LOST_EXIT_CODE = 1  # a collective failed: another rank died, hung or was killed
LAUNCHER_GRACE_S = 10  # a rank that lost a peer waits this long for torchrun to stop it (see wait_for_launcher)
DEFAULT_DATA_PATH = '/datasets01/imagenet_full_size/061417/'  # the authors' cluster; kept as the official default


def get_args_parser():
    p = argparse.ArgumentParser('AttnScale / FeatScale training and evaluation', add_help=False)
    p.add_argument('--batch-size', default=64, type=int, help='per-process batch size')
    p.add_argument('--epochs', default=500, type=int)
    p.add_argument('--list-models', action='store_true', help='print the registered model names and exit')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL')
    g.add_argument('--addon', default=None, choices=models.ADDONS,
                   help='install AttnScale or FeatScale (gains at zero) into a timm ViT, CaiT or Swin --model')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra create_model arguments, e.g. patch_size=2 embed_dim=96 num_heads=3')
    g.add_argument('--pretrained', action='store_true',
                   help="start from the model's pretrained weights (the released ones, or timm's for a timm model; "
                        'from the Hugging Face cache): head re-initialised for another class count, pos_embed resized')
    g.add_argument('--input-size', default=224, type=int, help='image size')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='drop path rate')
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    p.set_defaults(model_ema=True)
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)

    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    g.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=0.05)

    g = p.add_argument_group('learning rate schedule')
    g.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
    g.add_argument('--lr', type=float, default=5e-4, metavar='LR')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    g.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    g.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--decay-epochs', type=float, default=30, metavar='N')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--cooldown-epochs', type=int, default=10, metavar='N')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    g.add_argument('--sched-on-updates', action='store_true',
                   help='step the schedule after every optimizer update, not every epoch (the official Swin recipe)')
    g.add_argument('--unscale-lr', action='store_true', help='do not scale --lr by batch_size * world_size / 512')

    g = p.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME')
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', type=str, default='bicubic')
    g.add_argument('--repeated-aug', action='store_true')
    g.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    p.set_defaults(repeated_aug=True)
    g.add_argument('--train-mode', action='store_true')
    g.add_argument('--no-train-mode', action='store_false', dest='train_mode')
    p.set_defaults(train_mode=True)
    g.add_argument('--ThreeAugment', action='store_true', help='DeiT III simple augmentation')
    g.add_argument('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    g.add_argument('--shift-aug', type=float, default=0., metavar='FRAC',
                   help='train transform = resize + random shift up to FRAC of the size (small images)')
    g.add_argument('--reprob', type=float, default=0.25, metavar='PCT')
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--resplit', action='store_true', default=False)
    g.add_argument('--mixup', type=float, default=0.8)
    g.add_argument('--cutmix', type=float, default=1.0)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch')
    g.add_argument('--eval-crop-ratio', default=0.875, type=float, help='eval resize = input_size / ratio')
    g.add_argument('--bce-loss', action='store_true',
                   help='binary cross-entropy on one-hot or mixup targets (DeiT III)')
    g.add_argument('--bce-target-thresh', type=float, default=None, metavar='T',
                   help='with --bce-loss: targets above T become 1, the others 0 (default: targets as they are)')

    g = p.add_argument_group('distillation')
    g.add_argument('--teacher-model', default='regnety_160', type=str, metavar='MODEL')
    g.add_argument('--teacher-path', type=str, default='')
    g.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'], type=str)
    g.add_argument('--distillation-alpha', default=0.5, type=float)
    g.add_argument('--distillation-tau', default=1.0, type=float)

    g = p.add_argument_group('data, checkpoints and run')
    g.add_argument('--finetune', default='', help='initialise from a checkpoint (head dropped if sized differently, '
                                                  'pos_embed resized)')
    g.add_argument('--data-path', default=DEFAULT_DATA_PATH, type=str)
    g.add_argument('--data-set', default='IMNET100', choices=['CIFAR', 'IMNET', 'IMNET100', 'INAT', 'INAT19'])
    g.add_argument('--inat-category', default='name',
                   choices=['kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'])
    g.add_argument('--skip-bad-images', action='store_true', help='skip unreadable images instead of failing')
    g.add_argument('--output_dir', default='', help='where to save checkpoints and logs; empty for no saving')
    g.add_argument('--auto_reload', action='store_true',
                   help='resume from <output_dir>/checkpoint.pth when it exists (takes precedence over --resume)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--seed', default=0, type=int)
    g.add_argument('--resume', default='', help='checkpoint to resume from or to fine-tune')
    g.add_argument('--unsafe-load', action='store_true', help='allow checkpoints with arbitrary pickled objects')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N')
    g.add_argument('--eval', action='store_true', help='evaluation only')
    g.add_argument('--throughput', action='store_true', help='measure inference throughput only')
    g.add_argument('--dist-eval', action='store_true', default=False, help='distributed evaluation')
    g.add_argument('--num_workers', default=10, type=int)
    g.add_argument('--pin-mem', action='store_true')
    g.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    p.set_defaults(pin_mem=True)
    g.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16', 'float32'],
                   help='autocast dtype (default: float16 on CUDA, float32 on CPU)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--compile-backend', default='inductor', choices=['inductor', 'aot_eager', 'eager'],
                   help='torch.compile backend of --compile (aot_eager: the same tracing, no code generation)')
    g.add_argument('--log-tensorboard', action='store_true')
    g.add_argument('--no-log-tensorboard', action='store_false', dest='log_tensorboard')
    p.set_defaults(log_tensorboard=True)
    g.add_argument('--print-freq', default=10, type=int, help='progress line every N steps')

    g = p.add_argument_group('distributed')
    g.add_argument('--world_size', default=1, type=int)
    g.add_argument('--dist_url', default='env://')
    g.add_argument('--local-rank', '--local_rank', type=int, default=None, dest='local_rank',
                   help='set by torch.distributed.launch without --use_env')
    g.add_argument('--dist-timeout', type=float, default=10., metavar='MIN',
                   help='minutes a collective waits for a silent rank before the run fails')
    return p


# ---------------------------------------------------------------------------------------------------------------
# Start-up: checks that need no data
# ---------------------------------------------------------------------------------------------------------------

def check_args(args):
    """Fail in one line, before anything starts, on flag values that would otherwise end in a traceback later,
    and on flags that cannot work together."""
    if args.data_path == DEFAULT_DATA_PATH and not os.path.exists(DEFAULT_DATA_PATH):
        utils.fail(f'no --data-path given (the default {DEFAULT_DATA_PATH} is the authors\' cluster path); fix: pass '
                   '--data-path <folder with train/ and val/>, or run scripts/demo.sh for a dataset that ships offline')
    for dest, minimum in (('batch_size', 1), ('input_size', 1), ('epochs', 0), ('num_workers', 0)):
        if getattr(args, dest) < minimum:
            utils.fail(f'{option(dest)} {getattr(args, dest)} must be at least {minimum}; fix: pass a value >= '
                       f'{minimum}')
    for dest, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            utils.fail(f'{option(dest)} {value} is not a finite number; fix: pass a number')
    if not 0 <= args.smoothing < 1:
        utils.fail(f'--smoothing {args.smoothing} must be in [0, 1); fix: pass e.g. 0.1, or 0 for none')
    if args.pretrained and args.finetune:
        utils.fail('--pretrained and --finetune both choose the starting weights; pass one of them')
    for flag in ('resume', 'finetune'):
        path = getattr(args, flag)
        if path and os.path.isdir(path):
            utils.fail(f'--{flag} {path} is a directory; fix: pass the checkpoint file in it, e.g. '
                       f'{os.path.join(path, "checkpoint.pth")}')
    check_distillation(args, check_model(args))


def option(dest: str) -> str:
    """How the flag of `args.<dest>` is spelled: 'batch_size' -> '--batch-size', 'num_workers' -> '--num_workers'."""
    return next(a.option_strings[0] for a in get_args_parser()._actions if a.dest == dest)


def check_model(args) -> torch.nn.Module:
    """Build the model on the meta device (no memory, no weights, a fraction of a second) and return it, so that an
    unknown --model or --model-kwargs that do not fit together, such as a width that does not divide into the
    heads, fail in one line that names the fix, before the dataset is scanned."""
    try:
        kwargs = models.parse_model_kwargs(args.model_kwargs)
        with torch.device('meta'):
            return models.create_model(args.model, addon=args.addon, img_size=args.input_size, **kwargs)
    except AssertionError as e:
        given = ' '.join(args.model_kwargs)
        if 'divisible by num_heads' not in str(e):
            utils.fail(f'--model {args.model} --model-kwargs {given}: {e}; fix: change --model-kwargs')
        with torch.device('meta'):
            default = models.create_model(args.model)
        width = kwargs.get('embed_dim', default.embed_dim)
        heads = [h for h in range(1, 17) if width % h == 0]
        utils.fail(f'--model-kwargs {given}: the width embed_dim={width} does not split into '
                   f'num_heads={kwargs.get("num_heads", default.blocks[0].attn.num_heads)} heads; fix: pick num_heads '
                   f'among {", ".join(map(str, heads))}, or an embed_dim that is a multiple of num_heads')
    except (ValueError, TypeError) as e:
        utils.fail(str(e).splitlines()[0] if str(e) else repr(e))


def check_distillation(args, probe: torch.nn.Module):
    """--distillation-type needs a teacher file and a model with a distillation token and head (timm's
    `set_distilled_training`), which `probe`, the weightless copy of the model, tells. An add-on (AttnScale /
    FeatScale) keeps the class of the model it is applied to."""
    if args.distillation_type == 'none':
        return
    if args.finetune and not args.eval:
        utils.fail('fine-tuning with distillation is not supported; drop --distillation-type or --finetune')
    if not args.teacher_path:
        utils.fail('--distillation-type needs --teacher-path (weights are never downloaded)')
    if not hasattr(probe, 'set_distilled_training'):
        utils.fail(f'--distillation-type {args.distillation_type} needs a model with a distillation head, such as '
                   f'deit_tiny_distilled_patch16_224; {args.model} has none: pick a *_distilled_* model or drop '
                   '--distillation-type')


def autocast_dtype(args, device: torch.device) -> torch.dtype:
    """--amp-dtype, else float16 on CUDA and float32 (i.e. no autocast) elsewhere."""
    amp_dtype = getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'float32'))
    if amp_dtype == torch.float16 and device.type != 'cuda':
        utils.fail('--amp-dtype float16 needs CUDA; use bfloat16 or float32 on CPU')
    return amp_dtype


def seed_run(args, device: torch.device):
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device.type == 'cuda':
        cudnn.benchmark = True


def prepare_output_dir(args):
    """Create --output_dir and check that it is writable, before anything is trained."""
    if not args.output_dir:
        return
    try:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(args.output_dir) / f'.write_test.{os.getpid()}'
        probe.touch()
        probe.unlink()
    except OSError as e:
        utils.fail(f'--output_dir {args.output_dir} is not writable ({e.strerror}); pick another directory')


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Data:
    """Datasets and loaders of a run. `loader_generator` is the training loader's own generator: creating an
    epoch's iterator draws a seed from it, not from the global RNG that augmentation uses, so a mid-epoch resume
    continues the global RNG exactly."""
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    nb_classes: int
    loader_train: torch.utils.data.DataLoader
    loader_val: torch.utils.data.DataLoader
    loader_generator: torch.Generator
    mixup_fn: Optional[Mixup]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader_train)


def build_data(args) -> Data:
    """Datasets, samplers (repeated augmentation, resumable), loaders and mixup, as the flags say.

    Training workers persist across epochs; validation workers do not (they would sit idle, holding memory,
    for the whole training epoch).
    """
    try:
        dataset_train, nb_classes = build_dataset(is_train=True, args=args)
        dataset_val, _ = build_dataset(is_train=False, args=args)
    except DatasetError as e:
        utils.fail(str(e))

    num_tasks, rank = utils.get_world_size(), utils.get_rank()
    if args.repeated_aug:
        sampler_train = RASampler(dataset_train, num_replicas=num_tasks, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=num_tasks, rank=rank,
                                                            shuffle=True, seed=args.seed)
    sampler_train = ResumableSampler(sampler_train)  # can start an epoch after a mid-epoch checkpoint's steps
    if args.dist_eval and num_tasks > 1:
        if len(dataset_val) % num_tasks:
            utils.log('Warning: the validation set does not divide by the number of processes; distributed '
                      'evaluation pads it with repeated images, which changes the numbers slightly.')
        sampler_val = torch.utils.data.DistributedSampler(dataset_val, num_replicas=num_tasks, rank=rank,
                                                          shuffle=False)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    if not args.eval and not args.throughput and len(sampler_train) < args.batch_size:
        utils.fail(f'--batch-size {args.batch_size} is larger than the {len(sampler_train)} training images each '
                   f'of the {num_tasks} processes sees; lower --batch-size')

    pin_memory = args.pin_mem and args.device.startswith('cuda')
    loader_generator = torch.Generator()
    loader_train = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=args.batch_size, drop_last=True, generator=loader_generator,
        num_workers=args.num_workers, pin_memory=pin_memory, persistent_workers=args.num_workers > 0)
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size), drop_last=False,
        num_workers=args.num_workers, pin_memory=pin_memory, persistent_workers=False)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
    return Data(dataset_train, dataset_val, nb_classes, loader_train, loader_val, loader_generator, mixup_fn)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

def build_model(args, num_classes: int) -> torch.nn.Module:
    """`args.model` with the flags' image size, drop rates and --model-kwargs: the one place a model is created."""
    try:
        return models.create_model(args.model, addon=args.addon, pretrained=args.pretrained, num_classes=num_classes,
                                   drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=None,
                                   img_size=args.input_size, **models.parse_model_kwargs(args.model_kwargs))
    except (ValueError, TypeError) as e:
        utils.fail(str(e).splitlines()[0] if str(e) else repr(e))


def load_finetune(model, path: str, unsafe: bool):
    """--finetune: every weight of the checkpoint that fits; the heads are dropped when the number of classes
    differs, and `pos_embed` is resized to the model's patch grid."""
    state = models.checkpoint.to_model_layout(model, model_state(load_checkpoint(path, allow_unsafe=unsafe)))
    own = model.state_dict()
    for k in ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias', 'head.fc.weight', 'head.fc.bias'):
        if k in state and k in own and state[k].shape != own[k].shape:
            utils.log(f'Removing key {k} from the fine-tune checkpoint (another number of classes)')
            del state[k]
    interpolate_pos_embed(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    utils.log(f'Fine-tuning from {path}; newly initialised: {missing}; ignored: {unexpected}')
    if any(ADDON_KEY.search(k) for k in missing):
        utils.log(f'{path} has no add-on parameters: they start at zero, so the model starts as the checkpoint\'s')


def prepare_model(args, num_classes: int, device: torch.device):
    """The plain model (fine-tune weights loaded, distilled training on, moved to `device`) and its EMA copy."""
    utils.log(f'Creating model: {args.model}')
    model = build_model(args, num_classes)
    if args.pretrained:
        addon = f'; the {args.addon} gains start at zero' if args.addon else ''
        utils.log(models.hub.describe_start(model) + addon)
    if args.finetune:
        try:
            load_finetune(model, args.finetune, args.unsafe_load)
        except CheckpointError as e:
            utils.fail(str(e))
    if args.distillation_type != 'none':
        model.set_distilled_training(True)  # training returns (class, distillation) logits; eval averages them
    model.to(device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    utils.log(f'number of params: {count_parameters(model)}')
    if hasattr(model, 'flops'):
        utils.log(f'number of GFLOPs: {model.flops() / 1e9}')
    return model, model_ema


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def wrap_model(model, args, device: torch.device) -> torch.nn.Module:
    """DDP first, then torch.compile, as timm's train.py does: compiling the DDP module lets dynamo split the
    graph at DDP's bucket boundaries, so each bucket's gradient all-reduce overlaps the rest of the backward.
    Checkpoints are written from the plain `model`, so their keys never carry `module.` or `_orig_mod.`."""
    net = model
    if utils.is_dist_avail_and_initialized():
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda'
                                                        else None)
    if args.compile:
        net = torch.compile(net, backend=args.compile_backend)
    return net


def addon_lambdas(model) -> dict:
    """Mean learned lambda of each add-on layer, for TensorBoard: {'attnscale/block3': value, ...}."""
    names = {'lamb': 'attnscale', 'lamb1': 'featscale_dc', 'lamb2': 'featscale_hf'}
    out = {}
    for name, p in model.named_parameters():
        match = ADDON_KEY.search(name)
        if match:  # blocks.3.attn.lamb -> attnscale/block3, layers.1.blocks.0.lamb1 -> featscale_dc/layers.1.block0
            where = name[:match.start()].replace('.attn', '').replace('blocks.', 'block')
            out[f'{names[match.group(2)]}/{where}'] = p.detach().float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Optimisation and criterion
# ---------------------------------------------------------------------------------------------------------------

def scaled_lr(args, world_size: int) -> float:
    """DeiT's linear scaling rule, `--lr * batch_size * world_size / 512`; `--lr` itself with --unscale-lr."""
    return args.lr if args.unscale_lr else args.lr * args.batch_size * world_size / 512.0


def build_optimizer(args, model, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory at learning rate `lr`: no weight decay on 1-D parameters (biases, norms, every
    lambda) nor on the names in `model.no_weight_decay()` (pos_embed, cls_token, dist_token)."""
    return create_optimizer_v2(model, **dict(optimizer_kwargs(cfg=args), lr=lr))


def build_optimization(args, model, amp_dtype: torch.dtype, steps_per_epoch: int):
    """(optimizer, lr_scheduler, loss_scaler) for the plain model; the loss scaler only for float16 autocast.
    With --sched-on-updates the schedule counts optimizer updates (`steps_per_epoch` a epoch), else epochs."""
    lr = scaled_lr(args, utils.get_world_size())
    rule = '--unscale-lr: not scaled' if args.unscale_lr else \
        f'--lr {args.lr:g} x {args.batch_size} x {utils.get_world_size()} / 512'
    utils.log(f'learning rate: {lr:g} ({rule})')
    optimizer = build_optimizer(args, model, lr)
    loss_scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    lr_scheduler, _ = create_scheduler(args, optimizer, updates_per_epoch=steps_per_epoch)
    return optimizer, lr_scheduler, loss_scaler


def build_training_criterion(args, data: Data, device: torch.device) -> DistillationLoss:
    """The base criterion of the flags, wrapped in DeiT's distillation loss (a pass-through without a teacher).
    The teacher's weights come from --teacher-path through the safe loader; they must fit --teacher-model."""
    teacher = None
    if args.distillation_type != 'none':
        try:
            teacher = models.create_model(args.teacher_model, num_classes=data.nb_classes)
            load_state_dict(teacher, model_state(load_checkpoint(args.teacher_path, args.unsafe_load)),
                            source=args.teacher_path)
        except (ValueError, TypeError) as e:  # CheckpointError is a ValueError
            utils.fail(str(e).splitlines()[0])
        teacher.requires_grad_(False)
        teacher.to(device).eval()
    return DistillationLoss(build_criterion(args, data.mixup_fn is not None), teacher, args.distillation_type,
                            args.distillation_alpha, args.distillation_tau)


# ---------------------------------------------------------------------------------------------------------------
# What a checkpoint holds, and restoring it
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrainingState:
    """Everything a checkpoint holds, defined once: `state_dict()` is what is saved, `load_state_dict()` reads
    the same entries back, so saving and resuming cannot drift apart.

    `model` is the plain module (keys without `module.`/`_orig_mod.`), `epoch` the last complete epoch (-1
    before the first), `run_args` the flags of the run plus its real world size. A checkpoint written on
    preemption adds the MID_EPOCH entries: `resume_step` (steps of epoch + 1 done), `train_meters` and `rng`
    (one entry per rank).
    """
    model: torch.nn.Module
    model_ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loss_scaler: Optional[torch.amp.GradScaler]
    run_args: dict
    epoch: int = -1
    max_accuracy: float = 0.0

    MID_EPOCH = ('resume_step', 'train_meters', 'rng')
    RESUMABLE = ('optimizer', 'lr_scheduler', 'epoch')  # without these, a checkpoint only provides weights

    def state_dict(self, **mid_epoch) -> dict:
        assert set(mid_epoch) <= set(self.MID_EPOCH), mid_epoch
        return {
            'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(), 'epoch': self.epoch,
            'model_ema': self.model_ema.module.state_dict() if self.model_ema is not None else None,
            'scaler': self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            'max_accuracy': self.max_accuracy, 'args': self.run_args, **mid_epoch,
        }

    def load_state_dict(self, ckpt: dict):
        """Everything but the model's weights (restore() loads those for every kind of checkpoint). An EMA the
        checkpoint lacks restarts from the model."""
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        self.epoch = ckpt['epoch']
        self.max_accuracy = ckpt.get('max_accuracy', 0.0)
        if self.model_ema is not None:
            if ckpt.get('model_ema'):
                self.model_ema.module.load_state_dict(model_state({'model': ckpt['model_ema']}))
            else:
                self.model_ema.set(self.model)
        if self.loss_scaler is not None and ckpt.get('scaler'):
            self.loss_scaler.load_state_dict(ckpt['scaler'])

    def save(self, path: str, **mid_epoch):
        """Write the checkpoint atomically on the main process (the others do not even build the dict)."""
        if utils.is_main_process():
            utils.save_on_master(self.state_dict(**mid_epoch), path)


class MidEpoch(NamedTuple):
    """Where a resumed epoch starts: steps already done, this rank's meter totals and RNG states after them."""
    step: int = 0
    meters: Optional[dict] = None
    rng: Optional[dict] = None


def resolve_resume(args):
    """`(path, checkpoint dict)` to start from, `('', None)` for none; each file is read once.

    With --auto_reload, `<output_dir>/checkpoint.pth` (or its `.prev` predecessor if the latest is unreadable)
    wins over --resume, so an interrupted fine-tune continues.
    """
    if args.auto_reload and args.output_dir:
        latest = os.path.join(args.output_dir, 'checkpoint.pth')
        previous = utils.previous_checkpoint(latest)
        for path in (latest, previous):
            if os.path.exists(path):
                try:
                    return path, load_checkpoint(path, allow_unsafe=args.unsafe_load)
                except CheckpointError as e:
                    if path == latest:
                        utils.log(f'warning: cannot resume from the latest checkpoint: {e}; resuming from the '
                                  f'previous checkpoint {previous} instead', file=sys.stderr)
        if os.path.exists(latest):
            utils.fail(f'{latest} and its .prev are unreadable; remove them to start over, or pass --resume')
    if not args.resume:
        return '', None
    try:
        return args.resume, load_checkpoint(args.resume, allow_unsafe=args.unsafe_load)
    except CheckpointError as e:
        utils.fail(str(e))


def set_aside_unreadable_latest(args, resumed_from: str):
    """After a fall-back to `checkpoint.prev.pth`, rename the unreadable `checkpoint.pth` to
    `checkpoint.unreadable.pth` (main process): the next save would otherwise rotate it into `.prev` and drop
    the good predecessor."""
    if not (args.auto_reload and args.output_dir and utils.is_main_process()):
        return
    latest = os.path.join(args.output_dir, 'checkpoint.pth')
    if resumed_from == utils.previous_checkpoint(latest) and os.path.exists(latest):
        kept = os.path.join(args.output_dir, 'checkpoint.unreadable.pth')
        os.replace(latest, kept)
        utils.log(f'Moved the unreadable {latest} to {kept}')


def mid_epoch_state(ckpt: dict, batch_size: int, steps_per_epoch: int, path: str) -> MidEpoch:
    """Where this rank resumes after a mid-epoch checkpoint (MidEpoch() after an end-of-epoch one).

    The steps are skipped exactly when the run has the world size and batch size of the saved one; otherwise
    the same number of samples is skipped (an approximation of the rest of the epoch, announced).
    """
    step = int(ckpt.get('resume_step') or 0)
    if not step:
        return MidEpoch()
    world_size = utils.get_world_size()
    saved = ckpt.get('args') or {}
    old = (saved.get('world_size', world_size), saved.get('batch_size', batch_size))
    rng, meters = ckpt.get('rng') or [], ckpt.get('train_meters') or []
    if old != (world_size, batch_size):
        new_step = step * old[0] * old[1] // (world_size * batch_size)
        utils.log(f'warning: {path} was saved mid-epoch by {old[0]} processes with --batch-size {old[1]}; with '
                  f'{world_size} x {batch_size} the epoch continues after {new_step} steps, which only '
                  'approximates the rest of the interrupted epoch')
        return MidEpoch(min(new_step, steps_per_epoch - 1))
    rank = utils.get_rank()
    return MidEpoch(min(step, steps_per_epoch - 1), meters[rank] if len(meters) == world_size else None,
                    rng[rank] if len(rng) == world_size else None)


def restore(args, state: TrainingState, steps_per_epoch: int) -> MidEpoch:
    """Load the checkpoint of --resume / --auto_reload into `state`: the weights always (a baseline checkpoint
    may lack the add-on parameters: they stay at zero and training starts over); the rest of the training state
    when the checkpoint has it and this is not --eval. Returns where the first epoch starts."""
    path, ckpt = resolve_resume(args)
    if not path:
        return MidEpoch()
    try:
        absent = load_state_dict(state.model, model_state(ckpt), allow_missing_addons=True, source=path)
    except CheckpointError as e:
        utils.fail(str(e))
    mid, resumed = MidEpoch(), False
    if absent:
        utils.log(f'Initialised from baseline checkpoint {path}; {len(absent)} add-on parameters start at '
                  'zero, so the model computes the baseline; fine-tuning from epoch 0')
    elif not args.eval and all(k in ckpt for k in TrainingState.RESUMABLE):
        state.load_state_dict(ckpt)
        resumed = True
        mid = mid_epoch_state(ckpt, args.batch_size, steps_per_epoch, path)
        where = f'step {mid.step}/{steps_per_epoch} of ' if mid.step else ''
        utils.log(f'Resumed from {path} (epoch {state.epoch}); training continues at {where}epoch '
                  f'{state.epoch + 1}')
    elif not args.eval:
        utils.log(f'Loaded weights from {path}; it holds no training state, so training starts at epoch 0')
    else:
        utils.log(f'Loaded weights from {path}')
    if state.model_ema is not None and not resumed:  # weights only: the EMA starts from them
        state.model_ema.set(state.model)
    set_aside_unreadable_latest(args, path)
    return mid


# ---------------------------------------------------------------------------------------------------------------
# The epoch loop
# ---------------------------------------------------------------------------------------------------------------

class RunLog:
    """log.txt (one JSON line per epoch) and TensorBoard scalars, written by the main process.

    The lines of epochs >= `start_epoch` are dropped at the first append, not before: a run that fails early
    leaves log.txt as it was. TensorBoard's purge_step likewise hides the events of epochs this run redoes.
    """

    def __init__(self, args, start_epoch: int):
        self.path = os.path.join(args.output_dir, 'log.txt') if args.output_dir else ''
        self.start_epoch = start_epoch
        self.truncated = False
        self.tb_writer = None
        if args.output_dir and args.log_tensorboard and utils.is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            self.tb_writer = SummaryWriter(log_dir=args.output_dir, purge_step=start_epoch or None)

    def write(self, epoch: int, entry: dict, lambdas: dict):
        if not self.path or not utils.is_main_process():
            return
        if not self.truncated:
            utils.truncate_log(self.path, self.start_epoch)
            self.truncated = True
        utils.append_log(self.path, entry)
        if self.tb_writer is not None:
            for tag in ('train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/loss'):
                self.tb_writer.add_scalar(tag, entry[tag.replace('/', '_')], epoch)
            for tag, value in lambdas.items():
                self.tb_writer.add_scalar(f'lambda/{tag}', value, epoch)
            self.tb_writer.flush()

    def close(self):
        if self.tb_writer is not None:
            self.tb_writer.close()


def epoch_entry(args, epoch: int, train_stats: dict, test_stats: dict, data: Data, n_parameters: int) -> dict:
    """The log.txt line of an epoch: train/test meters, memory of every rank, skipped images (all ranks)."""
    rss = [round(r, 1) for r in utils.all_gather_object(utils.rss_mb())]
    entry = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'test_{k}': v for k, v in test_stats.items()},
             'epoch': epoch, 'n_parameters': n_parameters, 'rss_mb': max(rss), 'rss_mb_ranks': rss}
    if args.skip_bad_images:
        mine = getattr(data.train, 'bad_files', set()) | getattr(data.val, 'bad_files', set())
        skipped = sorted(set().union(*utils.all_gather_object(sorted(mine))))  # distinct files, all ranks
        entry['skipped_images'] = len(skipped)
        if skipped:
            utils.log(f'--skip-bad-images: {len(skipped)} unreadable images skipped so far: '
                      + ', '.join(skipped[:5]) + (f' (+{len(skipped) - 5} more)' if len(skipped) > 5 else ''))
    return entry


def train_epoch(args, net, state: TrainingState, data: Data, criterion, device, amp_dtype, epoch: int,
                mid: MidEpoch, stop_requested) -> dict:
    """Train one epoch (from step `mid.step`); on SIGTERM, save a mid-epoch checkpoint and exit 75."""
    if mid.step and mid.rng is not None:
        utils.set_rng_state(mid.rng, data.loader_generator)  # the states right after step `mid.step`
    else:
        seed_epoch(args.seed, utils.get_rank(), epoch, data.loader_generator)
    data.loader_train.sampler.set_epoch(epoch, skip=mid.step * args.batch_size)
    if mid.step:
        utils.log(f'Epoch {epoch}: skipping the {mid.step} steps done before the interruption')
    try:
        stats, stopped_at, meter_totals = train_one_epoch(
            net, criterion, data.loader_train, state.optimizer, device, epoch, state.loss_scaler, amp_dtype,
            args.clip_grad, state.model_ema, data.mixup_fn, set_training_mode=args.train_mode,
            print_freq=args.print_freq, stop_requested=stop_requested, start_step=mid.step,
            initial_meters=mid.meters if mid.step else None,
            on_update=(lambda done: state.lr_scheduler.step_update(epoch * data.steps_per_epoch + done))
            if args.sched_on_updates else None)
    except NonFiniteLossError as e:
        utils.fail(str(e), code=3)
    if stopped_at is not None:
        save_preempted(args, state, data, epoch, stopped_at, meter_totals)
    return stats


def save_preempted(args, state: TrainingState, data: Data, epoch: int, stopped_at: int, meter_totals: dict):
    """SIGTERM during `epoch`: save the state after step `stopped_at` (as the last complete epoch plus those
    steps, with every rank's meters and RNG states), wait for the write, exit 75 on every rank."""
    if args.output_dir:
        latest = os.path.join(args.output_dir, 'checkpoint.pth')
        meters = utils.all_gather_object(meter_totals)  # collectives: every rank takes part
        rng = utils.all_gather_object(utils.rng_state(data.loader_generator))
        state.save(latest, resume_step=stopped_at, train_meters=meters, rng=rng)
        if utils.is_dist_avail_and_initialized():
            torch.distributed.barrier()  # no rank exits (and gets the launcher to kill rank 0) mid-write
        utils.log(f'SIGTERM: saved {latest} after step {stopped_at}/{data.steps_per_epoch} of epoch {epoch}. '
                  'Rerun the same command with --auto_reload to continue from there.')
        saved = f'; saved at step {stopped_at}/{data.steps_per_epoch}, resumable with --auto_reload'
    else:
        saved = '; nothing saved (no --output_dir)'
    utils.fail(f'preempted (SIGTERM) during epoch {epoch}{saved}', PREEMPTED_EXIT_CODE, ignore_sigterm=True)


def save_epoch(args, state: TrainingState, improved: bool):
    """checkpoint.pth after every epoch; best_checkpoint.pth is that same file (hard link or copy), not a second
    serialisation."""
    if not args.output_dir:
        return
    latest = os.path.join(args.output_dir, 'checkpoint.pth')
    state.save(latest)
    if improved and utils.is_main_process():
        utils.publish_copy(latest, os.path.join(args.output_dir, 'best_checkpoint.pth'))


def train(args, net, state: TrainingState, data: Data, criterion, device, amp_dtype, mid: MidEpoch):
    """The epoch loop: train, step the LR schedule, evaluate, log, checkpoint; SIGTERM stops it resumably."""
    start_epoch = state.epoch + 1
    run_log = RunLog(args, start_epoch)
    for stale in utils.remove_stale_temp_files(args.output_dir):
        utils.log(f'Removed {stale}, left by a checkpoint write that was interrupted')
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))

    utils.log(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_stats = train_epoch(args, net, state, data, criterion, device, amp_dtype, epoch,
                                  mid if epoch == start_epoch else MidEpoch(), lambda: bool(stop_requested))
        state.lr_scheduler.step(epoch)
        test_stats = evaluate(data.loader_val, net, device, amp_dtype, args.print_freq)
        utils.log(f'Accuracy of the network on the {len(data.val)} test images: {test_stats["acc1"]:.1f}%')
        improved = test_stats['acc1'] > state.max_accuracy
        state.epoch, state.max_accuracy = epoch, max(state.max_accuracy, test_stats['acc1'])
        utils.log(f'Max accuracy: {state.max_accuracy:.2f}%')
        entry = epoch_entry(args, epoch, train_stats, test_stats, data, count_parameters(state.model))
        run_log.write(epoch, entry, addon_lambdas(state.model) if run_log.tb_writer is not None else {})
        save_epoch(args, state, improved)
        if epoch + 1 < args.epochs and utils.any_rank(bool(stop_requested)):  # after rank 0 wrote the checkpoint
            utils.fail(f'preempted (SIGTERM) after epoch {epoch}; resumable with --auto_reload', PREEMPTED_EXIT_CODE,
                       ignore_sigterm=True)
    run_log.close()
    utils.log(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def seed_epoch(seed: int, rank: int, epoch: int, loader_generator: torch.Generator = None):
    """Seed torch, numpy, python `random` and the training DataLoader's generator from (seed, rank, epoch).

    Every epoch starts from these states whether the run was interrupted or not, so augmentation, mixup and
    drop-path draws after an end-of-epoch resume are those of an uninterrupted run (with --num_workers 0; with
    DataLoader workers, only the main process's draws are reseeded).
    """
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    value = int(state[0]) << 32 | int(state[1])
    torch.manual_seed(value)
    np.random.seed(int(state[0]))
    random.seed(value)
    if loader_generator is not None:
        loader_generator.manual_seed(value ^ 0x5DEECE66D)


def main(args):
    """Run training or evaluation; a collective that fails because another rank died or hung ends the process
    with one line (the launcher names the rank that failed first) instead of a traceback on every rank."""
    check_args(args)
    try:
        run(args)
    except RuntimeError as e:
        if utils.is_dist_avail_and_initialized() and utils.is_comm_error(e):
            message = utils.comm_error_message(e, args.dist_timeout)
            if 'TORCHELASTIC_RUN_ID' in os.environ and not utils._mentions_timeout(str(e)):
                wait_for_launcher(message)
            utils.fail(message, PEER_LOST_EXIT_CODE)
        raise
    except DatasetError as e:  # an unreadable image met during training or evaluation
        utils.fail(one_line(e))


def wait_for_launcher(message: str):
    """Under torchrun / torch.distributed.launch, give the launcher LAUNCHER_GRACE_S to stop this rank after it
    lost the connection to a peer; its SIGTERM ends the wait with the one-line error, as does the end of the wait.

    This rank sees the closed connection at once and would exit within moments. The launcher polls its workers
    (every 0.1 s, later under load) and reports as root cause the failure it records first, in rank order within
    one poll: a rank that exits before that poll is named in place of the rank that died. Waiting lets it record
    the dead rank first. The grace is shorter than the 30 s the launcher leaves a worker between SIGTERM and
    SIGKILL, so the line is printed even if the launcher's SIGTERM came before the failed collective.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: utils.fail(message, PEER_LOST_EXIT_CODE, ignore_sigterm=True))
    time.sleep(LAUNCHER_GRACE_S)


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line. A DataLoader worker re-raises its exception with the worker's traceback
    in the message; the meaningful part is its last line, without the exception's class name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in (f'{type(exc).__module__}.{type(exc).__name__}: ', f'{type(exc).__name__}: '):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


def run(args):
    """Train or evaluate as the flags say, in named steps: start-up checks, data, model, optimisation, restore,
    epoch loop. `args` is only read, never changed (a requeued SLURM job calls this again with the same object);
    the values derived from it (device, learning rate, classes, start epoch) live in what these steps return."""
    device = utils.init_distributed_mode(args)
    amp_dtype = autocast_dtype(args, device)
    utils.log(json.dumps(vars(args), default=str))
    seed_run(args, device)
    prepare_output_dir(args)

    data = build_data(args)
    model, model_ema = prepare_model(args, data.nb_classes, device)
    optimizer, lr_scheduler, loss_scaler = build_optimization(args, model, amp_dtype, data.steps_per_epoch)
    criterion = build_training_criterion(args, data, device)
    state = TrainingState(model, model_ema, optimizer, lr_scheduler, loss_scaler, epoch=args.start_epoch - 1,
                          run_args=dict(vars(args), world_size=utils.get_world_size()))
    mid = restore(args, state, data.steps_per_epoch)
    net = wrap_model(model, args, device)

    if args.throughput:
        throughput(data.loader_val, net, device, amp_dtype)
    elif args.eval:
        test_stats = evaluate(data.loader_val, net, device, amp_dtype, args.print_freq)
        utils.log(f'Accuracy of the network on the {len(data.val)} test images: {test_stats["acc1"]:.1f}%')
    else:
        train(args, net, state, data, criterion, device, amp_dtype, mid)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('AttnScale / FeatScale training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args()
    if args.list_models:
        print('\n'.join(models.list_variants()))
    else:
        main(args)
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
