"""Train one epoch, evaluate, and measure throughput (DeiT's engine, device- and dtype-agnostic)."""
import math
import time
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.utils import accuracy, unwrap_model

import utils


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when the loss of any rank is NaN or infinite."""


def autocast(device: torch.device, amp_dtype: torch.dtype):
    """Mixed precision context for `amp_dtype` (float32 means none)."""
    if amp_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def start_step_flags(loss: torch.Tensor, stop_requested: bool):
    """`[loss not finite, stop requested]` of this rank, maximised over all ranks by one all-reduce that is only
    started here: it runs while the backward pass is queued, and `read_step_flags` waits for it. Built on the
    loss's device without copying from the host (a fill kernel), so starting it costs no synchronisation."""
    flags = torch.stack([torch.isfinite(loss.detach()).logical_not(),
                         torch.full((), stop_requested, dtype=torch.bool, device=loss.device)]).float()
    if not utils.is_dist_avail_and_initialized():
        return flags, None
    flags = flags.to(utils._collective_device())
    return flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)


def read_step_flags(flags: torch.Tensor, work, found_inf: Optional[torch.Tensor] = None) -> tuple:
    """`(any rank's loss not finite, any rank asked to stop, gradients not finite)`: the step's one host
    synchronisation. `found_inf` is the GradScaler's inf/NaN flag of the unscaled gradients (float16), read in
    the same transfer; the gradients are all-reduced already, so it is the same on every rank."""
    if work is not None:
        work.wait()
    if found_inf is not None:
        flags = torch.cat([flags, found_inf.reshape(1).to(flags.device, non_blocking=True)])
    nonfinite, stop, *skip = flags.tolist()
    return bool(nonfinite), bool(stop), bool(skip and skip[0])


def unscale_gradients(loss_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """Unscale the gradients (`loss_scaler.unscale_`, no synchronisation) and return the scaler's flag of
    non-finite gradients as a device tensor, which GradScaler.step would read with a synchronisation of its own
    (None for a disabled scaler). It is the flag `loss_scaler.update()` backs the scale off on: the scaler's
    record for this optimizer."""
    if not loss_scaler.is_enabled():
        return None
    loss_scaler.unscale_(optimizer)
    return sum(loss_scaler._per_optimizer_states[id(optimizer)]['found_inf_per_device'].values())


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    loss_scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: torch.dtype = torch.float32,
                    max_norm: Optional[float] = None, model_ema=None, mixup_fn: Optional[Mixup] = None,
                    set_training_mode: bool = True, print_freq: int = 10,
                    stop_requested=lambda: False, start_step: int = 0, initial_meters: Optional[dict] = None,
                    on_update=None):
    """One pass over `data_loader` (which starts at step `start_step` of the epoch when resuming mid-epoch).

    Each step synchronises the host once and runs one small collective: the all-reduce of the step flags
    (a non-finite loss on any rank, and `stop_requested()`, this rank's preemption signal), started before the
    backward pass and read before the optimizer step. A non-finite loss raises NonFiniteLossError on every rank
    before any weight changes; a stop request ends the epoch after the step on every rank. With a GradScaler
    (float16) the gradients are unscaled before that read and the scaler's inf/NaN flag is read with the step
    flags, so the step is skipped, as GradScaler.step would skip it, without a second synchronisation. The loss
    meter keeps device tensors and reads them at `print_freq` boundaries (see utils.SmoothedValue).

    Returns `(stats, stopped_at, meter_totals)`: the meters averaged over ranks; the number of steps of the epoch
    done (counting the `start_step` skipped ones) when a stop request cut it short before its last step, else
    None; and this rank's `{meter: [count, total]}` before they are summed over ranks, which a mid-epoch
    checkpoint stores and the resumed epoch passes back as `initial_meters`, so that its averages cover the
    whole epoch and are summed in the same order as in an uninterrupted epoch. `on_update(steps done in the
    epoch)` is called after every optimizer step (a per-update LR schedule).
    """
    model.train(set_training_mode)
    ema_source = unwrap_model(model)  # the plain module: same keys as the EMA copy, also under DDP / compile
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for name, (count, total) in (initial_meters or {}).items():
        metric_logger.meters[name].set_totals(int(count), float(total))
    num_steps = len(data_loader)
    stopped_at = None
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]')):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with autocast(device, amp_dtype):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        flags, work = start_step_flags(loss, stop_requested())

        optimizer.zero_grad(set_to_none=True)
        found_inf = None
        if loss_scaler is not None:
            loss_scaler.scale(loss).backward()
            found_inf = unscale_gradients(loss_scaler, optimizer)
        else:
            loss.backward()
        nonfinite, stop, skip = read_step_flags(flags, work, found_inf)
        if nonfinite:
            value = loss.item()
            raise NonFiniteLossError(f'loss is {value if not math.isfinite(value) else "not finite on another process"}'
                                     f' at epoch {epoch}; lower --lr, set --clip-grad, or use --amp-dtype '
                                     'bfloat16/float32')
        if max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if not skip:
            optimizer.step()
        if loss_scaler is not None:
            loss_scaler.update()  # backs the scale off after a skipped step, as after GradScaler.step

        if model_ema is not None:
            model_ema.update(ema_source)
        metric_logger.update(loss=loss.detach(), lr=optimizer.param_groups[0]['lr'])
        if on_update is not None:
            on_update(start_step + step + 1)
        if stop and step < num_steps - 1:  # a stop after the last step is handled after the epoch
            stopped_at = start_step + step + 1
            break
    totals = {k: list(meter.totals()) for k, meter in metric_logger.meters.items()}
    metric_logger.synchronize_between_processes()
    utils.log('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}, stopped_at, totals


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: torch.dtype = torch.float32, print_freq: int = 10):
    """Top-1/top-5 accuracy and cross-entropy over `data_loader`, summed over ranks."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter='  ')
    model.eval()
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
            loss = criterion(output, target)
        acc1, acc5 = accuracy(output.float(), target, topk=(1, min(5, output.shape[-1])))
        n = images.shape[0]
        metric_logger.update(loss=loss.detach())  # device tensors, read once at the end (or a progress line)
        metric_logger.meters['acc1'].update(acc1, n=n)
        metric_logger.meters['acc5'].update(acc5, n=n)
    metric_logger.synchronize_between_processes()
    utils.log('* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f}'.format(
        top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def throughput(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
               amp_dtype: torch.dtype = torch.float32, warmup: int = 10, steps: int = 30):
    """Inference images/s on one batch of `data_loader`, after `warmup` passes."""
    model.eval()
    images, _ = next(iter(data_loader))
    images = images.to(device, non_blocking=True)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with autocast(device, amp_dtype):
        for _ in range(warmup):
            model(images)
        sync()
        start = time.time()
        for _ in range(steps):
            model(images)
        sync()
    rate = steps * images.shape[0] / (time.time() - start)
    utils.log(f'batch_size {images.shape[0]} throughput {rate:.1f} images/s')
    return rate
