"""Train one epoch, evaluate, and measure throughput (DeiT's engine, device- and dtype-agnostic)."""
import math
import time
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.utils import accuracy

import utils


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when the loss of any rank is NaN or infinite."""


def autocast(device: torch.device, amp_dtype: torch.dtype):
    """Mixed precision context for `amp_dtype` (float32 means none)."""
    if amp_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one tiny all-reduce, so all ranks stop together)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if utils.is_dist_avail_and_initialized():
        finite = finite.to(utils._collective_device())
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    loss_scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: torch.dtype = torch.float32,
                    max_norm: Optional[float] = None, model_ema=None, mixup_fn: Optional[Mixup] = None,
                    set_training_mode: bool = True, print_freq: int = 10, bce_loss: bool = False,
                    should_stop=lambda: False, start_step: int = 0, initial_meters: Optional[dict] = None,
                    on_update=None):
    """One pass over `data_loader` (which starts at step `start_step` of the epoch when resuming mid-epoch).

    `should_stop()` (a preemption signal agreed by all ranks) is checked after each step. Returns
    `(stats, stopped_at, meter_totals)`: the meters averaged over ranks; the number of steps of the epoch done
    (counting the `start_step` skipped ones) when `should_stop()` cut it short before its last step, else None;
    and this rank's `{meter: [count, total]}` before they are summed over ranks, which a mid-epoch checkpoint
    stores and the resumed epoch passes back as `initial_meters`, so that its averages cover the whole epoch
    and are summed in the same order as in an uninterrupted epoch. `on_update(steps done in the epoch)` is
    called after every optimizer step (a per-update LR schedule).
    """
    model.train(set_training_mode)
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for name, (count, total) in (initial_meters or {}).items():
        metric_logger.meters[name].count, metric_logger.meters[name].total = int(count), float(total)
    num_steps = len(data_loader)
    stopped_at = None
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]')):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        if bce_loss:
            targets = targets.gt(0.0).type(targets.dtype)

        with autocast(device, amp_dtype):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        if not _all_ranks_finite(loss):
            raise NonFiniteLossError(
                f'loss is {loss.item()} at epoch {epoch}; lower --lr, set --clip-grad, or use --amp-dtype bfloat16/float32')

        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler.scale(loss).backward()
            if max_norm:
                loss_scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            loss_scaler.step(optimizer)
            loss_scaler.update()
        else:
            loss.backward()
            if max_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()

        if model_ema is not None:
            model_ema.update(model)
        metric_logger.update(loss=loss.item(), lr=optimizer.param_groups[0]['lr'])
        if on_update is not None:
            on_update(start_step + step + 1)
        if should_stop() and step < num_steps - 1:  # a stop after the last step is handled after the epoch
            stopped_at = start_step + step + 1
            break
    totals = {k: [meter.count, meter.total] for k, meter in metric_logger.meters.items()}
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
        metric_logger.update(loss=loss.item())
        metric_logger.meters['acc1'].update(acc1.item(), n=n)
        metric_logger.meters['acc5'].update(acc5.item(), n=n)
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
