"""What a training checkpoint holds, and restoring it: one definition of the saved state (`TrainingState`), the
checkpoint to start from (--resume, --auto_reload and its fallback to `checkpoint.prev.pth`), where a resumed epoch
starts after a mid-epoch (preemption) checkpoint, the class names a checkpoint was trained on, and the LR schedule
of the current flags where it differs from the checkpoint's."""
import copy
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from timm.utils import ModelEmaV3

import rundir
import startup
import utils
from models.checkpoint import CheckpointError, load_checkpoint, load_state_dict, model_state


def check_classes(args, saved: Optional[list], path: str, classes: list):
    """Refuse a checkpoint trained on other class names than the data's (the same count, other names or order),
    unless --ignore-class-names; a checkpoint without class names (older, or released) is said to be unchecked."""
    if saved is None:
        utils.log(f'note: {path} stores no class names, so they are not compared with the data\'s')
        return
    if list(saved) == list(classes):
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, classes)) if a != b), min(len(saved), len(classes)))
    difference = (f'class {i} is {saved[i]!r} there, {classes[i]!r} here' if i < min(len(saved), len(classes))
                  else f'{len(saved)} classes there, {len(classes)} here')
    if args.ignore_class_names:
        utils.log(f'warning: {path} was trained on other class names ({difference}); used anyway '
                  '(--ignore-class-names)', file=sys.stderr)
        return
    utils.fail(f'{path} was trained on other classes than --data-path {args.data_path} holds ({difference}); fix: use '
               'the data it was trained on, or pass --ignore-class-names if they are the same classes renamed')



@dataclass
class TrainingState:
    """Everything a checkpoint holds, defined once: `state_dict()` is what is saved, `load_state_dict()` reads
    the same entries back, so saving and resuming cannot drift apart.

    `model` is the plain module (keys without `module.`/`_orig_mod.`), `epoch` the last complete epoch (-1
    before the first), `run_args` the flags of the run plus its real world size, `classes` the class names of the
    data (saved when known, compared on resume and --eval). A checkpoint written on preemption adds the MID_EPOCH
    entries: `resume_step` (steps of epoch + 1 done), `train_meters` and `rng` (one entry per rank).
    """
    model: torch.nn.Module
    model_ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loss_scaler: Optional[torch.amp.GradScaler]
    run_args: dict
    epoch: int = -1
    max_accuracy: float = 0.0
    classes: Optional[list] = None

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
            **({'classes': self.classes} if self.classes is not None else {}),
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
        """Write the checkpoint atomically on the main process (the others do not even build the dict); a write
        that fails (a full disk) ends the run with one line, the previous checkpoint intact."""
        if utils.is_main_process():
            try:
                utils.save_on_master(self.state_dict(**mid_epoch), path)
            except utils.WriteError as e:
                write_failed(e)


def write_failed(e: OSError):
    utils.fail(f'{e}; fix: free disk space, then rerun with --auto_reload to continue from the last checkpoint',
               rundir.WRITE_FAILED_EXIT_CODE)


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
                    ckpt = load_checkpoint(path, allow_unsafe=args.unsafe_load)
                    if args.resume:
                        utils.log(f'--auto_reload continues from {path}; --resume {args.resume} is not used')
                    return path, ckpt
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


def restore(args, state: TrainingState, steps_per_epoch: int, resumed: tuple, classes: list) -> MidEpoch:
    """Load the checkpoint of --resume / --auto_reload, `resumed` = (path, checkpoint dict), into `state`: the
    weights always (a baseline checkpoint may lack the add-on parameters: they stay at zero and training starts
    over), after comparing its class names with the data's `classes`; the rest of the training state when the
    checkpoint has it and this is not --eval. Returns where the first epoch starts."""
    path, ckpt = resumed
    if not path:
        return MidEpoch()
    try:
        absent = load_state_dict(state.model, model_state(ckpt), allow_missing_addons=True, source=path)
    except CheckpointError as e:
        utils.fail(str(e))
    check_classes(args, ckpt.get('classes'), path, classes)
    mid, resumed_state = MidEpoch(), False
    if absent:
        utils.log(f'Initialised from baseline checkpoint {path}; {len(absent)} add-on parameters start at '
                  f'zero, so the model computes the baseline; fine-tuning from epoch {state.epoch + 1}')
    elif not args.eval and all(k in ckpt for k in TrainingState.RESUMABLE):
        fresh = copy.deepcopy(state.lr_scheduler.state_dict())  # the schedule of the current flags
        state.load_state_dict(ckpt)
        resumed_state = True
        mid = mid_epoch_state(ckpt, args.batch_size, steps_per_epoch, path)
        where = f'step {mid.step}/{steps_per_epoch} of ' if mid.step else ''
        utils.log(f'Resumed from {path} (epoch {state.epoch}); training continues at {where}epoch '
                  f'{state.epoch + 1}')
        rebuild_schedule(state, fresh, ckpt['lr_scheduler'], steps_per_epoch, mid)
    elif not args.eval:
        utils.log(f'Loaded weights from {path}; it holds no training state, so training starts at epoch '
                  f'{state.epoch + 1}')
    else:
        utils.log(f'Loaded weights from {path}')
    if state.model_ema is not None and not resumed_state:  # weights only: the EMA starts from them
        state.model_ema.set(state.model)
    set_aside_unreadable_latest(args, path)
    return mid


def rebuild_schedule(state: TrainingState, fresh: dict, saved: dict, steps_per_epoch: int, mid: MidEpoch):
    """After a resume, the LR schedule of the current flags where it differs from the checkpoint's (a longer
    --epochs, another --lr or --min-lr, ...): the schedule is rebuilt for them and the learning rate of the next
    step set from it, and the log says so. timm's schedulers are functions of the epoch (or update) and their
    settings, so the rebuilt schedule is the one a run started with these flags would follow from here."""
    changed = startup.schedule_differs(fresh, saved, state.lr_scheduler)
    if not changed:
        return
    scheduler = state.lr_scheduler
    scheduler.load_state_dict(fresh)
    if scheduler.t_in_epochs:
        scheduler.step(state.epoch)  # as after the epoch `state.epoch` of an uninterrupted run
    else:
        scheduler.step_update((state.epoch + 1) * steps_per_epoch + mid.step)
    what = ', '.join(f'{k} {saved.get(k)} -> {fresh[k]}' for k in changed)
    utils.log(f'The LR schedule of the checkpoint differs from the one of the current flags ({what}): rebuilt for '
              f'the current flags; training continues at lr {state.optimizer.param_groups[0]["lr"]:.6g}')
