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
from pathlib import Path

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
from models.checkpoint import ADDON_KEY, CheckpointError, load_checkpoint, load_state_dict, model_state
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
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra create_model arguments, e.g. patch_size=2 embed_dim=96 num_heads=3')
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


def check_args(args):
    """Fail in one line, before anything starts, on flag values that would otherwise end in a traceback later."""
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
    for flag in ('resume', 'finetune'):
        path = getattr(args, flag)
        if path and os.path.isdir(path):
            utils.fail(f'--{flag} {path} is a directory; fix: pass the checkpoint file in it, e.g. '
                       f'{os.path.join(path, "checkpoint.pth")}')
    check_model(args)


def option(dest: str) -> str:
    """How the flag of `args.<dest>` is spelled: 'batch_size' -> '--batch-size', 'num_workers' -> '--num_workers'."""
    return next(a.option_strings[0] for a in get_args_parser()._actions if a.dest == dest)


def check_model(args):
    """Build the model on the meta device (no memory, no weights, a fraction of a second), so that an unknown
    --model or --model-kwargs that do not fit together, such as a width that does not divide into the heads, fail
    in one line that names the fix, before the dataset is scanned."""
    try:
        kwargs = models.parse_model_kwargs(args.model_kwargs)
        with torch.device('meta'):
            models.create_model(args.model, img_size=args.input_size, **kwargs)
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


def resolve_resume(args) -> str:
    """The checkpoint to start from: with --auto_reload, `<output_dir>/checkpoint.pth` (or its `.prev`
    predecessor if the latest is unreadable) wins over --resume, so an interrupted fine-tune continues."""
    if args.auto_reload and args.output_dir:
        latest = os.path.join(args.output_dir, 'checkpoint.pth')
        previous = utils.previous_checkpoint(latest)
        for path in (latest, previous):
            if os.path.exists(path):
                try:
                    load_checkpoint(path, allow_unsafe=args.unsafe_load)
                except CheckpointError as e:
                    if path == latest:
                        utils.log(f'warning: cannot resume from the latest checkpoint: {e}; resuming from the '
                                  f'previous checkpoint {previous} instead', file=sys.stderr)
                    continue
                return path
        if os.path.exists(latest):
            utils.fail(f'{latest} and its .prev are unreadable; remove them to start over, or pass --resume')
    return args.resume


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


def mid_epoch_state(ckpt: dict, args, steps_per_epoch: int, path: str):
    """`(resume_step, train_meters, rng_state)` of this rank from a mid-epoch checkpoint, `(0, None, None)` else.

    The steps are skipped exactly when the run has the world size and batch size of the saved one; otherwise
    the same number of samples is skipped (an approximation of the rest of the epoch, announced).
    """
    step = int(ckpt.get('resume_step') or 0)
    if not step:
        return 0, None, None
    saved = ckpt.get('args') or {}
    old = (saved.get('world_size', args.world_size), saved.get('batch_size', args.batch_size))
    rng, meters = ckpt.get('rng') or [], ckpt.get('train_meters') or []
    if old != (args.world_size, args.batch_size):
        new_step = step * old[0] * old[1] // (args.world_size * args.batch_size)
        utils.log(f'warning: {path} was saved mid-epoch by {old[0]} processes with --batch-size {old[1]}; with '
                  f'{args.world_size} x {args.batch_size} the epoch continues after {new_step} steps, which only '
                  'approximates the rest of the interrupted epoch')
        return min(new_step, steps_per_epoch - 1), None, None
    rank = utils.get_rank()
    return (min(step, steps_per_epoch - 1), meters[rank] if len(meters) == args.world_size else None,
            rng[rank] if len(rng) == args.world_size else None)


def interpolate_pos_embed(model, state: dict):
    """Resize a checkpoint's `pos_embed` to the model's patch grid (bicubic), keeping prefix tokens."""
    from timm.layers import resample_abs_pos_embed
    if 'pos_embed' not in state or state['pos_embed'].shape == model.pos_embed.shape:
        return
    num_prefix = model.pos_embed.shape[1] - model.patch_embed.num_patches
    state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], new_size=model.patch_embed.grid_size,
                                                num_prefix_tokens=num_prefix)


def load_finetune(model, path: str, unsafe: bool):
    state = model_state(load_checkpoint(path, allow_unsafe=unsafe))
    own = model.state_dict()
    for k in ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'):
        if k in state and k in own and state[k].shape != own[k].shape:
            utils.log(f'Removing key {k} from the fine-tune checkpoint (another number of classes)')
            del state[k]
    interpolate_pos_embed(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    utils.log(f'Fine-tuning from {path}; newly initialised: {missing}; ignored: {unexpected}')


def addon_lambdas(model) -> dict:
    """Mean learned lambda of each add-on layer, for TensorBoard: {'attnscale/block3': value, ...}."""
    names = {'lamb': 'attnscale', 'lamb1': 'featscale_dc', 'lamb2': 'featscale_hf'}
    out = {}
    for name, p in model.named_parameters():
        match = ADDON_KEY.search(name)
        if match and name.startswith('blocks.'):
            out[f'{names[match.group(2)]}/block{name.split(".")[1]}'] = p.detach().float().mean().item()
    return out


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
    utils.init_distributed_mode(args)
    if args.distillation_type != 'none' and args.finetune and not args.eval:
        utils.fail('fine-tuning with distillation is not supported; drop --distillation-type or --finetune')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        utils.fail('--device cuda but CUDA is not available; pass --device cpu')
    amp_dtype = getattr(torch, args.amp_dtype or ('float16' if device.type == 'cuda' else 'float32'))
    if amp_dtype == torch.float16 and device.type != 'cuda':
        utils.fail('--amp-dtype float16 needs CUDA; use bfloat16 or float32 on CPU')
    utils.log(json.dumps({k: v for k, v in vars(args).items()}, default=str))

    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device.type == 'cuda':
        cudnn.benchmark = True
    if args.output_dir:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(args.output_dir) / f'.write_test.{os.getpid()}'
            probe.touch()
            probe.unlink()
        except OSError as e:
            utils.fail(f'--output_dir {args.output_dir} is not writable ({e.strerror}); pick another directory')

    try:
        dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
        dataset_val, nb_val = build_dataset(is_train=False, args=args)
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

    loader_kwargs = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == 'cuda',
                         persistent_workers=args.num_workers > 0)
    # its own generator: creating an epoch's iterator draws a seed from it, not from the global RNG that
    # augmentation uses, so a mid-epoch resume continues the global RNG exactly
    loader_generator = torch.Generator()
    data_loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                                    drop_last=True, generator=loader_generator, **loader_kwargs)
    steps_per_epoch = len(data_loader_train)
    data_loader_val = torch.utils.data.DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
                                                  drop_last=False, **loader_kwargs)

    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)

    utils.log(f'Creating model: {args.model}')
    try:
        model = models.create_model(args.model, num_classes=args.nb_classes, drop_rate=args.drop,
                                    drop_path_rate=args.drop_path, drop_block_rate=None, img_size=args.input_size,
                                    **models.parse_model_kwargs(args.model_kwargs))
    except (ValueError, TypeError) as e:
        utils.fail(str(e).splitlines()[0] if str(e) else repr(e))
    if args.finetune:
        try:
            load_finetune(model, args.finetune, args.unsafe_load)
        except CheckpointError as e:
            utils.fail(str(e))
    model.to(device)
    model_without_ddp = model

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)

    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    utils.log(f'number of params: {n_parameters}')
    if hasattr(model_without_ddp, 'flops'):
        utils.log(f'number of GFLOPs: {model_without_ddp.flops() / 1e9}')

    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * utils.get_world_size() / 512.0
    optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=args))
    loss_scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    lr_scheduler, _ = create_scheduler(args, optimizer)

    criterion = build_criterion(args, mixup_active)
    teacher_model = None
    if args.distillation_type != 'none':
        if not args.teacher_path:
            utils.fail('--distillation-type needs --teacher-path (weights are never downloaded)')
        teacher_model = models.create_model(args.teacher_model, num_classes=args.nb_classes, global_pool='avg')
        load_state_dict(teacher_model, model_state(load_checkpoint(args.teacher_path, args.unsafe_load)),
                        source=args.teacher_path)
        teacher_model.to(device).eval()
    criterion = DistillationLoss(criterion, teacher_model, args.distillation_type, args.distillation_alpha,
                                 args.distillation_tau)

    max_accuracy = 0.0
    resume_step, resume_meters, resume_rng = 0, None, None  # set by a mid-epoch (preemption) checkpoint
    resume = resolve_resume(args)
    if resume:
        try:
            ckpt = load_checkpoint(resume, allow_unsafe=args.unsafe_load)
            absent = load_state_dict(model_without_ddp, model_state(ckpt), allow_missing_addons=True, source=resume)
        except CheckpointError as e:
            utils.fail(str(e))
        if absent:
            utils.log(f'Initialised from baseline checkpoint {resume}; {len(absent)} add-on parameters start at '
                      'zero, so the model computes the baseline; fine-tuning from epoch 0')
        elif not args.eval and all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
            optimizer.load_state_dict(ckpt['optimizer'])
            lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
            args.start_epoch = ckpt['epoch'] + 1
            if model_ema is not None and ckpt.get('model_ema'):
                model_ema.module.load_state_dict(model_state({'model': ckpt['model_ema']}))
            if loss_scaler is not None and ckpt.get('scaler'):
                loss_scaler.load_state_dict(ckpt['scaler'])
            max_accuracy = ckpt.get('max_accuracy', 0.0)
            resume_step, resume_meters, resume_rng = mid_epoch_state(ckpt, args, steps_per_epoch, resume)
            where = f'step {resume_step}/{steps_per_epoch} of ' if resume_step else ''
            utils.log(f'Resumed from {resume} (epoch {ckpt["epoch"]}); training continues at {where}epoch '
                      f'{args.start_epoch}')
        else:
            utils.log(f'Loaded weights from {resume}')
        if model_ema is not None and (absent or 'model_ema' not in ckpt):
            model_ema.set(model_without_ddp)
        set_aside_unreadable_latest(args, resume)

    if args.compile:
        model = torch.compile(model)
    if args.distributed:
        ddp_kwargs = dict(device_ids=[args.gpu]) if device.type == 'cuda' else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    if args.throughput:
        throughput(data_loader_val, model, device, amp_dtype)
        return
    if args.eval:
        test_stats = evaluate(data_loader_val, model, device, amp_dtype, args.print_freq)
        utils.log(f'Accuracy of the network on the {len(dataset_val)} test images: {test_stats["acc1"]:.1f}%')
        return

    tb_writer = None
    if args.output_dir and args.log_tensorboard and utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides the events of epochs this run redoes (written before an interruption)
        tb_writer = SummaryWriter(log_dir=args.output_dir, purge_step=args.start_epoch or None)
    log_path = os.path.join(args.output_dir, 'log.txt') if args.output_dir else ''
    log_truncated = False  # log lines of epochs >= start_epoch are dropped at the first append, not before:
    #                        a run that fails early leaves log.txt as it was
    for stale in utils.remove_stale_temp_files(args.output_dir):
        utils.log(f'Removed {stale}, left by a checkpoint write that was interrupted')

    stop_requested = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))

    def should_stop():
        """Whether any rank got SIGTERM (agreed over all ranks, so they stop at the same step)."""
        flag = torch.tensor([float(bool(stop_requested))])
        if args.distributed:
            flag = flag.to(utils._collective_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def checkpoint(epoch, path, **extra):
        utils.save_on_master({
            'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
            'lr_scheduler': lr_scheduler.state_dict(), 'epoch': epoch,
            'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
            'scaler': loss_scaler.state_dict() if loss_scaler is not None else None,
            'max_accuracy': max_accuracy, 'args': {k: v for k, v in vars(args).items()}, **extra,
        }, path)

    utils.log(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        skip = resume_step if epoch == args.start_epoch else 0
        if skip and resume_rng is not None:
            utils.set_rng_state(resume_rng, loader_generator)  # the states right after step `skip`
        else:
            seed_epoch(args.seed, rank, epoch, loader_generator)
        data_loader_train.sampler.set_epoch(epoch, skip=skip * args.batch_size)
        if skip:
            utils.log(f'Epoch {epoch}: skipping the {skip} steps done before the interruption')
        try:
            train_stats, stopped_at, meter_totals = train_one_epoch(
                model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler, amp_dtype,
                args.clip_grad, model_ema, mixup_fn, set_training_mode=args.train_mode, print_freq=args.print_freq,
                should_stop=should_stop, start_step=skip,
                initial_meters=resume_meters if skip else None)
        except NonFiniteLossError as e:
            utils.fail(str(e), code=3)
        if stopped_at is not None:
            if args.output_dir:  # the state after step `stopped_at`, as the last complete epoch plus those steps
                latest = os.path.join(args.output_dir, 'checkpoint.pth')
                checkpoint(epoch - 1, latest, resume_step=stopped_at,
                           train_meters=utils.all_gather_object(meter_totals),  # per rank, like the RNG states
                           rng=utils.all_gather_object(utils.rng_state(loader_generator)))
                if args.distributed:
                    torch.distributed.barrier()  # no rank exits (and gets the launcher to kill rank 0) mid-write
                utils.log(f'SIGTERM: saved {latest} after step {stopped_at}/{steps_per_epoch} of epoch {epoch}. '
                          'Rerun the same command with --auto_reload to continue from there.')
                saved = f'; saved at step {stopped_at}/{steps_per_epoch}, resumable with --auto_reload'
            else:
                saved = '; nothing saved (no --output_dir)'
            utils.fail(f'preempted (SIGTERM) during epoch {epoch}{saved}', PREEMPTED_EXIT_CODE, ignore_sigterm=True)
        lr_scheduler.step(epoch)

        test_stats = evaluate(data_loader_val, model, device, amp_dtype, args.print_freq)
        utils.log(f'Accuracy of the network on the {len(dataset_val)} test images: {test_stats["acc1"]:.1f}%')
        improved = test_stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        utils.log(f'Max accuracy: {max_accuracy:.2f}%')

        rss = [round(r, 1) for r in utils.all_gather_object(utils.rss_mb())]
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': n_parameters, 'rss_mb': max(rss), 'rss_mb_ranks': rss}
        if args.skip_bad_images:
            mine = getattr(dataset_train, 'bad_files', set()) | getattr(dataset_val, 'bad_files', set())
            skipped = sorted(set().union(*utils.all_gather_object(sorted(mine))))  # distinct files, all ranks
            log_stats['skipped_images'] = len(skipped)
            if skipped:
                utils.log(f'--skip-bad-images: {len(skipped)} unreadable images skipped so far: '
                          + ', '.join(skipped[:5]) + (f' (+{len(skipped) - 5} more)' if len(skipped) > 5 else ''))
        if args.output_dir and utils.is_main_process():
            if not log_truncated:
                utils.truncate_log(log_path, args.start_epoch)
                log_truncated = True
            utils.append_log(log_path, log_stats)
            if tb_writer is not None:
                for tag, value in (('train/loss', train_stats['loss']), ('train/lr', train_stats['lr']),
                                   ('test/acc1', test_stats['acc1']), ('test/acc5', test_stats['acc5']),
                                   ('test/loss', test_stats['loss'])):
                    tb_writer.add_scalar(tag, value, epoch)
                for tag, value in addon_lambdas(model_without_ddp).items():
                    tb_writer.add_scalar(f'lambda/{tag}', value, epoch)
                tb_writer.flush()
        if args.output_dir:
            checkpoint(epoch, os.path.join(args.output_dir, 'checkpoint.pth'))
            if improved:
                checkpoint(epoch, os.path.join(args.output_dir, 'best_checkpoint.pth'))
        if epoch + 1 < args.epochs and should_stop():  # agreed by all ranks, after rank 0 wrote the checkpoint
            utils.fail(f'preempted (SIGTERM) after epoch {epoch}; resumable with --auto_reload', PREEMPTED_EXIT_CODE,
                       ignore_sigterm=True)

    if tb_writer is not None:
        tb_writer.close()
    utils.log(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser('AttnScale / FeatScale training and evaluation', parents=[get_args_parser()])
    args = parser.parse_args()
    if args.list_models:
        print('\n'.join(models.list_variants()))
    else:
        main(args)
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
