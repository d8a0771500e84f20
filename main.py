"""Train and evaluate AttnScale / FeatScale vision transformers (DeiT's main.py, with the official flags).

    python -m torch.distributed.launch --nproc_per_node=2 --use_env main.py --model attnscale_small_12 ...
    torchrun --nproc_per_node=2 main.py ...          python main.py ...          (see README.md)
"""
import argparse
import datetime
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.backends.cudnn as cudnn
from torch.distributed.elastic.multiprocessing.errors import record
from timm.data import Mixup
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3

import models
import rundir
import startup
import utils
from datasets import DatasetError, build_dataset
from engine import NonFiniteLossError, evaluate, throughput, train_one_epoch
from losses import DistillationLoss, build_criterion
from models.checkpoint import (ADDON_KEY, CheckpointError, classifier_keys, fit_report, fitted_share,
                               interpolate_pos_embed, load_checkpoint, load_state_dict, model_state, split_fit,
                               unused_share)
from samplers import RASampler, ResumableSampler
from training_state import MidEpoch, TrainingState, check_classes, resolve_resume, restore, write_failed

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM after a checkpoint; rerun with --auto_reload
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: stopped by Ctrl-C (after a checkpoint, when mid-training)
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
    g.add_argument('--overwrite', action='store_true',
                   help='start this run from scratch in an --output_dir that holds another run (which it replaces)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--seed', default=0, type=int)
    g.add_argument('--resume', default='', help='checkpoint to resume from or to fine-tune')
    g.add_argument('--unsafe-load', action='store_true', help='allow checkpoints with arbitrary pickled objects')
    g.add_argument('--ignore-class-names', action='store_true',
                   help="resume or evaluate a checkpoint although its class names differ from the data's")
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
# Start-up (the flags themselves are checked in startup.py)
# ---------------------------------------------------------------------------------------------------------------

def autocast_dtype(args, device: torch.device) -> torch.dtype:
    """--amp-dtype, else float16 on CUDA and float32 (i.e. no autocast) elsewhere (float16 off CUDA is refused at
    start-up)."""
    return getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'float32'))


def seed_run(args, device: torch.device):
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device.type == 'cuda':
        cudnn.benchmark = True


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
    """`args.model` with the flags' image size, drop rates and --model-kwargs, as far as the model takes them: the
    one place a model is created."""
    try:
        return models.create_model(args.model, addon=args.addon, pretrained=args.pretrained, num_classes=num_classes,
                                   **startup.model_kwargs(args))
    except (ValueError, TypeError) as e:
        utils.fail(str(e).splitlines()[0] if str(e) else repr(e))


class Finetuned(NamedTuple):
    """What --finetune loaded: the model's keys it left at their initialisation, and the checkpoint's classes."""
    fresh: list
    classes: Optional[list]


def load_finetune(model, path: str, unsafe: bool) -> Finetuned:
    """--finetune: every weight of the checkpoint that fits; the heads are dropped when the number of classes
    differs, and `pos_embed` is resized to the model's patch grid. A checkpoint that provides less than half of
    the model's weights (another model's) is refused with a CheckpointError."""
    ckpt = load_checkpoint(path, allow_unsafe=unsafe)
    state = models.checkpoint.to_model_layout(model, model_state(ckpt))
    own = model.state_dict()
    for k in classifier_keys(model):
        if k in state and state[k].shape != own[k].shape:
            utils.log(f'Removing key {k} from the fine-tune checkpoint (another number of classes)')
            del state[k]
    interpolate_pos_embed(model, state)
    fits, fresh, unused = split_fit(model, state)
    share = fitted_share(model, fits)
    if share < 0.5:
        trained = (ckpt.get('args') or {}).get('model') if isinstance(ckpt.get('args'), dict) else None
        raise CheckpointError(
            f'--finetune {path}: only {share:.0%} of the weights of {model.pretrained_cfg.get("architecture")} fit '
            f'({len(fits)} of {len(own)} tensors; {fit_report(model, state)}); it is a checkpoint of another model'
            + (f' ({trained})' if trained else '') + '; fix: pass a checkpoint of this --model, or set --model to '
            "the checkpoint's")
    model.load_state_dict(fits, strict=False)
    utils.log(f'Fine-tuning from {path}: {len(fits)} of {len(own)} tensors loaded ({share:.1%} of the weights); newly '
              f'initialised: {fresh}; ignored: {unused}')
    if unused_share(state, fits) > 0.5:
        utils.log(f'warning: --finetune {path}: {unused_share(state, fits):.0%} of its weights are not used (a '
                  'checkpoint of a larger or another model?)', file=sys.stderr)
    if any(ADDON_KEY.search(k) for k in fresh):
        utils.log(f'{path} has no add-on parameters: they start at zero, so the model starts as the checkpoint\'s')
    return Finetuned(fresh, ckpt.get('classes'))


def prepare_model(args, num_classes: int, device: torch.device, classes: list = None):
    """The plain model (fine-tune weights loaded, distilled training on, moved to `device`) and its EMA copy.
    --eval refuses weights that would start at their initialisation (a head for another class count)."""
    utils.log(f'Creating model: {args.model}')
    model = build_model(args, num_classes)
    if args.pretrained:
        addon = f'; the {args.addon} gains start at zero' if args.addon else ''
        utils.log(models.hub.describe_start(model) + addon)
        if args.eval and model.num_classes != model.pretrained_cfg['num_classes']:
            utils.fail(f'--eval --pretrained: the weights have {model.pretrained_cfg["num_classes"]} classes, the data '
                       f'{model.num_classes}, so the head would be random; fix: evaluate on data with its classes')
    if args.finetune:
        try:
            finetuned = load_finetune(model, args.finetune, args.unsafe_load)
        except CheckpointError as e:
            utils.fail(str(e))
        fresh = [k for k in finetuned.fresh if not ADDON_KEY.search(k)]
        if args.eval and fresh:
            utils.fail(f'--eval --finetune {args.finetune}: {", ".join(fresh[:4])} would be evaluated at their random '
                       'initialisation (the checkpoint has no such weights, or a head for another class count); fix: '
                       'evaluate on data with its classes, or fine-tune first')
        if args.eval and classes is not None:
            check_classes(args, finetuned.classes, args.finetune, classes)
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
    """(optimizer, lr_scheduler, loss_scaler) for the plain model; the loss scaler (on the model's device type)
    only for float16 autocast. With --sched-on-updates the schedule counts optimizer updates (`steps_per_epoch`
    a epoch), else epochs."""
    lr = scaled_lr(args, utils.get_world_size())
    rule = '--unscale-lr: not scaled' if args.unscale_lr else \
        f'--lr {args.lr:g} x {args.batch_size} x {utils.get_world_size()} / 512'
    utils.log(f'learning rate: {lr:g} ({rule})')
    optimizer = build_optimizer(args, model, lr)
    device_type = next(model.parameters()).device.type
    loss_scaler = torch.amp.GradScaler(device_type) if amp_dtype == torch.float16 else None
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
# The epoch loop
# ---------------------------------------------------------------------------------------------------------------

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
                mid: MidEpoch, stop: utils.StopRequest) -> dict:
    """Train one epoch (from step `mid.step`); on a stop signal, save a mid-epoch checkpoint and exit."""
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
            print_freq=args.print_freq, stop_requested=lambda: bool(stop), start_step=mid.step,
            initial_meters=mid.meters if mid.step else None,
            on_update=(lambda done: state.lr_scheduler.step_update(epoch * data.steps_per_epoch + done))
            if args.sched_on_updates else None)
    except NonFiniteLossError as e:
        utils.fail(str(e), code=3)
    if stopped_at is not None:
        save_preempted(args, state, data, epoch, stopped_at, meter_totals, stop)
    return stats


def save_preempted(args, state: TrainingState, data: Data, epoch: int, stopped_at: int, meter_totals: dict,
                   stop: utils.StopRequest):
    """A stop signal during `epoch`: save the state after step `stopped_at` (as the last complete epoch plus those
    steps, with every rank's meters and RNG states), wait for the write, exit on every rank with the status of
    the signal (75 for SIGTERM, 130 for Ctrl-C)."""
    reason, code = stop.agreed()  # a collective: every rank takes part
    if args.output_dir:
        latest = os.path.join(args.output_dir, 'checkpoint.pth')
        meters = utils.all_gather_object(meter_totals)
        rng = utils.all_gather_object(utils.rng_state(data.loader_generator))
        state.save(latest, resume_step=stopped_at, train_meters=meters, rng=rng)
        if utils.is_dist_avail_and_initialized():
            torch.distributed.barrier()  # no rank exits (and gets the launcher to kill rank 0) mid-write
        utils.log(f'{reason}: saved {latest} after step {stopped_at}/{data.steps_per_epoch} of epoch {epoch}. '
                  'Rerun the same command with --auto_reload to continue from there.')
        saved = f'; saved at step {stopped_at}/{data.steps_per_epoch}, resumable with --auto_reload'
    else:
        saved = '; nothing saved (no --output_dir)'
    utils.fail(f'{reason} during epoch {epoch}{saved}', code, ignore_sigterm=True)


def stop_signals(stop: Optional[utils.StopRequest] = None) -> utils.StopRequest:
    """`stop` (a new StopRequest if None) listening also to SIGTERM (preemption: exit 75) and SIGINT (Ctrl-C:
    exit 130). A launcher may have added its own signals to `stop` (run_with_submitit.py: SLURM's
    pre-timeout signal)."""
    stop = stop if stop is not None else utils.StopRequest()
    stop.install(signal.SIGTERM, 'preempted (SIGTERM)', PREEMPTED_EXIT_CODE)
    stop.install(signal.SIGINT, 'interrupted (Ctrl-C)', INTERRUPTED_EXIT_CODE)
    return stop


def save_epoch(args, state: TrainingState, improved: bool):
    """checkpoint.pth after every epoch; best_checkpoint.pth is that same file (hard link or copy), not a second
    serialisation."""
    if not args.output_dir:
        return
    latest = os.path.join(args.output_dir, 'checkpoint.pth')
    state.save(latest)
    if improved and utils.is_main_process():
        best = os.path.join(args.output_dir, 'best_checkpoint.pth')
        try:
            utils.publish_copy(latest, best)
        except OSError as e:  # only where hard links are not supported and the copy does not fit on the disk
            write_failed(utils.WriteError(e.errno, f'cannot write {best} ({e.strerror}); {latest} is complete'))


def train(args, net, state: TrainingState, data: Data, criterion, device, amp_dtype, mid: MidEpoch,
          stop: Optional[utils.StopRequest] = None):
    """The epoch loop: train, step the LR schedule, evaluate, log, checkpoint; a stop signal (SIGTERM, Ctrl-C,
    those in `stop`) ends it resumably."""
    start_epoch = state.epoch + 1
    run_log = rundir.RunLog(args, start_epoch)
    for stale in utils.remove_stale_temp_files(args.output_dir):
        utils.log(f'Removed {stale}, left by a checkpoint write that was interrupted')
    stop = stop_signals(stop)

    utils.log(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_stats = train_epoch(args, net, state, data, criterion, device, amp_dtype, epoch,
                                  mid if epoch == start_epoch else MidEpoch(), stop)
        test_stats = evaluate(data.loader_val, net, device, amp_dtype, args.print_freq)
        state.lr_scheduler.step(epoch, test_stats['acc1'])  # the metric: only --sched plateau reads it
        utils.log(f'Accuracy of the network on the {len(data.val)} test images: {test_stats["acc1"]:.1f}%')
        improved = test_stats['acc1'] > state.max_accuracy
        state.epoch, state.max_accuracy = epoch, max(state.max_accuracy, test_stats['acc1'])
        utils.log(f'Max accuracy: {state.max_accuracy:.2f}%')
        entry = epoch_entry(args, epoch, train_stats, test_stats, data, count_parameters(state.model))
        run_log.write(epoch, entry, addon_lambdas(state.model) if run_log.tb_writer is not None else {})
        save_epoch(args, state, improved)
        if epoch + 1 < args.epochs and utils.any_rank(bool(stop)):  # after rank 0 wrote the checkpoint
            reason, code = stop.agreed()
            utils.fail(f'{reason} after epoch {epoch}; resumable with --auto_reload', code, ignore_sigterm=True)
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


@record
def main(args, stop: Optional[utils.StopRequest] = None):
    """Run training or evaluation; a collective that fails because another rank died or hung ends the process
    with one line (the launcher names the rank that failed first) instead of a traceback on every rank.
    `record` writes any other exception, with its traceback, to the error file torchrun gives each worker, so
    torchrun's failure summary names the rank and shows its error. `stop` carries a launcher's own stop signals
    (see `train`); Ctrl-C's handler is the caller's again on return."""
    startup.check_args(args, get_args_parser())
    sigint = signal.getsignal(signal.SIGINT)
    try:
        run(args, stop)
    except RuntimeError as e:
        if utils.is_dist_avail_and_initialized() and utils.is_comm_error(e):
            message = utils.comm_error_message(e, args.dist_timeout)
            if 'TORCHELASTIC_RUN_ID' in os.environ and not utils._mentions_timeout(str(e)):
                wait_for_launcher(message)
            utils.fail(message, PEER_LOST_EXIT_CODE)
        raise
    except DatasetError as e:  # an unreadable image met during training or evaluation
        utils.fail(one_line(e))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
        utils.fail('interrupted (Ctrl-C); nothing saved since the last checkpoint', INTERRUPTED_EXIT_CODE)
    finally:
        signal.signal(signal.SIGINT, sigint)


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


def run(args, stop: Optional[utils.StopRequest] = None):
    """Train or evaluate as the flags say, in named steps: start-up checks, data, model, optimisation, restore,
    epoch loop. `args` is only read, never changed (a requeued SLURM job calls this again with the same object);
    the values derived from it (device, learning rate, classes, start epoch) live in what these steps return."""
    device = utils.init_distributed_mode(args)
    amp_dtype = autocast_dtype(args, device)
    utils.log(json.dumps(vars(args), default=str))
    seed_run(args, device)
    with rundir.claimed(args):  # --output_dir created; a training run holds its lock until it ends
        resumed = resolve_resume(args)  # read once, and checked against the flags before the data is scanned
        startup.check_resume(args, get_args_parser(), *resumed)
        data = build_data(args)
        classes = list(data.train.classes)
        model, model_ema = prepare_model(args, data.nb_classes, device, classes)
        optimizer, lr_scheduler, loss_scaler = build_optimization(args, model, amp_dtype, data.steps_per_epoch)
        criterion = build_training_criterion(args, data, device)
        state = TrainingState(model, model_ema, optimizer, lr_scheduler, loss_scaler, epoch=args.start_epoch - 1,
                              run_args=dict(vars(args), world_size=utils.get_world_size()), classes=classes)
        mid = restore(args, state, data.steps_per_epoch, resumed, classes)
        net = wrap_model(model, args, device)

        if args.throughput:
            throughput(data.loader_val, net, device, amp_dtype)
        elif args.eval:
            test_stats = evaluate(data.loader_val, net, device, amp_dtype, args.print_freq)
            utils.log(f'Accuracy of the network on the {len(data.val)} test images: {test_stats["acc1"]:.1f}%')
        else:
            train(args, net, state, data, criterion, device, amp_dtype, mid, stop)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('AttnScale / FeatScale training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args()
    if args.list_models:
        print('\n'.join(models.list_variants()))
    else:
        main(args)
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
