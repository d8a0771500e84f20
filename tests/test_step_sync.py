"""One host synchronisation and one small collective per training step, in a real 2-process gloo group.

Two processes build the run the way main.py does (data, model, EMA, optimisation, criterion with mixup and label
smoothing, DDP) and train an epoch through engine.train_one_epoch while counting, per step:
  * collectives: every torch.distributed Python call (all_reduce, all_gather, barrier, ...). DDP's gradient
    buckets are reduced from C++ and are not counted, as they should not be;
  * host reads: `.item()`, `.tolist()`, `bool()`, `float()`, `int()`, `.numpy()` of a tensor, called from this
    repository's code or from torch's GradScaler (on a GPU each is a device synchronisation; the rest of torch's
    and timm's reads are of host tensors, such as the optimizer's step counts, and are not counted).
The first and last steps print progress lines and are excluded; the steps in between must do exactly one of each,
in float32, in bfloat16 autocast, and in float16 autocast with main.py's GradScaler (the CPU one here;
GradScaler.step would read its inf flag in a second synchronisation).
The same group then checks that the step flags do their job: a stop requested on one rank only, and a loss that
is NaN on one rank only, end the epoch on both ranks at the same step.
"""
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
ARGS = ['--model', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8',
        '--input-size', '32', '--batch-size', '4', '--num_workers', '0', '--aa', 'none', '--reprob', '0',
        '--data-set', 'IMNET', '--print-freq', '100', '--device', 'cpu']
COLLECTIVES = ('all_reduce', 'all_gather', 'all_gather_object', 'all_gather_into_tensor', 'broadcast',
               'broadcast_object_list', 'barrier', 'reduce', 'reduce_scatter', 'reduce_scatter_tensor', 'gather',
               'scatter', 'all_to_all', 'monitored_barrier')
READS = ('item', 'tolist', '__bool__', '__float__', '__int__', '__index__', 'numpy')
GRAD_SCALER = os.path.join('torch', 'amp', 'grad_scaler.py')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Counts:
    """Collectives and host reads so far in this process."""

    def __init__(self):
        self.collectives = self.reads = 0

    def snapshot(self) -> tuple:
        return self.collectives, self.reads


def count_collectives(counts: Counts):
    import torch.distributed as dist
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            counts.collectives += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)


def read_counter(counts: Counts):
    """A TorchFunctionMode that counts the host reads made by this repository's code (not the tests', nor torch's
    and timm's in a virtual environment inside the checkout, as scripts/test.sh makes it) and by torch's
    GradScaler."""
    from torch.overrides import TorchFunctionMode
    ours = str(ROOT) + os.sep

    class CountReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, '__name__', '') in READS:
                caller = sys._getframe(1).f_code.co_filename
                if caller.endswith(GRAD_SCALER) or caller.startswith(ours) and not caller.startswith(
                        (str(ROOT / 'tests'), sys.prefix + os.sep)):
                    counts.reads += 1
            return func(*args, **(kwargs or {}))
    return CountReads()


class CountingLoader:
    """Wraps a DataLoader; records the counters when the training loop gets a batch and when it asks for the
    next one, so that `steps()` counts each step's own work, not the loading of its batch."""

    def __init__(self, loader, counts: Counts):
        self.loader, self.counts = loader, counts
        self.handed, self.requested = [], []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.handed, self.requested = [], []
        batches = iter(self.loader)
        while True:
            self.requested.append(self.counts.snapshot())
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.handed.append(self.counts.snapshot())
            yield batch

    def steps(self) -> list:
        """(collectives, host reads) of each step, from receiving its batch to asking for the next."""
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.handed, self.requested[1:])]


def worker(rank: int, world_size: int, port: int, data: str, out: str):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS='1')
    torch.set_num_threads(1)
    import argparse
    import engine
    import main
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(ARGS + ['--data-path', data])
    device = main.utils.init_distributed_mode(args)
    data = main.build_data(args)
    model, model_ema = main.prepare_model(args, data.nb_classes, device)
    optimizer, _, loss_scaler = main.build_optimization(args, model, torch.float32, steps_per_epoch=4)
    criterion = main.build_training_criterion(args, data, device)
    net = main.wrap_model(model, args, device)
    compiled = main.wrap_model(model, argparse.Namespace(**dict(vars(args), compile=True)), device)
    result = {'compile_wraps_ddp': type(compiled).__name__ == 'OptimizedModule'
              and isinstance(compiled._orig_mod, torch.nn.parallel.DistributedDataParallel)
              and compiled._orig_mod.module is model}

    counts = Counts()
    count_collectives(counts)
    loader = CountingLoader(data.loader_train, counts)
    data.loader_train.sampler.set_epoch(0)

    def epoch(stop_requested=lambda: False, loss_criterion=criterion, amp_dtype=torch.float32, scaler=loss_scaler):
        return engine.train_one_epoch(net, loss_criterion, loader, optimizer, device, 0, scaler, amp_dtype,
                                      None, model_ema, data.mixup_fn, print_freq=args.print_freq,
                                      stop_requested=stop_requested)
    with read_counter(counts):
        stats, stopped_at, _ = epoch()
    result.update(steps=loader.steps(), stopped_at=stopped_at, loss=stats['loss'])

    with read_counter(counts):
        stats = epoch(amp_dtype=torch.bfloat16)[0]
    result.update(bfloat16_steps=loader.steps(), bfloat16_loss=stats['loss'])
    _, _, scaler = main.build_optimization(args, model, torch.float16, steps_per_epoch=4)
    with read_counter(counts):
        stats = epoch(amp_dtype=torch.float16, scaler=scaler)[0]
    result.update(float16_steps=loader.steps(), float16_loss=stats['loss'], scaler=str(scaler._device),
                  float16_scale=scaler.get_scale())

    calls = []  # rank 1 alone asks to stop, from its third step on
    result['stop_at'] = epoch(lambda: calls.append(1) is None and rank == 1 and len(calls) >= 3)[1]

    def nan_on_rank_1(samples, outputs, targets):
        loss = criterion(samples, outputs, targets)
        return loss * float('nan') if rank == 1 else loss
    try:
        epoch(loss_criterion=nan_on_rank_1)
        result['nan'] = 'not raised'
    except engine.NonFiniteLossError as e:
        result['nan'] = str(e)
    Path(out, f'rank{rank}.json').write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_one_collective_and_one_host_read_per_step(tmp_path):
    data = make_image_folder(tmp_path / 'data', num_classes=4, train_per_class=12, val_per_class=2)
    mp.start_processes(worker, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2, start_method='spawn')
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for result in results:
        steps = result['steps']
        assert len(steps) == 6  # 48 images x 3 repeats / 3 (RASampler) / 2 ranks / batch 4
        assert steps[1:-1] == [[1, 1]] * 4, steps  # the first and the last step print a progress line
        assert result['stopped_at'] is None and 0 < result['loss'] < 10
        assert result['bfloat16_steps'][1:-1] == [[1, 1]] * 4 and 0 < result['bfloat16_loss'] < 10, result
        assert result['float16_steps'][1:-1] == [[1, 1]] * 4, result['float16_steps']
        assert result['scaler'] == 'cpu' and 0 < result['float16_loss'] < 10
        assert result['float16_scale'] in (2. ** 16, 2. ** 15, 2. ** 14)  # at most a couple of skipped steps
        assert result['compile_wraps_ddp']
        assert result['stop_at'] == 3  # rank 1 asked during its third step: both ranks stop after it
    assert results[0]['nan'].startswith('loss is not finite on another process at epoch 0; lower --lr')
    assert results[1]['nan'].startswith('loss is nan at epoch 0; lower --lr')


def test_float16_steps_are_those_of_gradscaler_step():
    """engine.train_one_epoch in float16 autocast with a GradScaler (the CPU one) ends bit for bit where the
    documented loop `scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()` ends, also when a
    step's gradients are not finite (step 2 here: skipped, and the scale halved, in both)."""
    import copy
    import engine
    import models
    from losses import DistillationLoss
    torch.manual_seed(0)
    ours = models.create_model('attnscale_tiny_12', depth=2, embed_dim=48, num_heads=2, patch_size=8, img_size=32,
                               num_classes=4)
    theirs = copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(4)]
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0., 1.)
    runs = []
    for model in (ours, theirs):
        backward_passes = []
        model.head.weight.register_hook(lambda g, n=backward_passes: g * float('inf') if len(n) == 1 else g)
        model.register_full_backward_pre_hook(lambda m, g, n=backward_passes: n.append(1))
        torch.manual_seed(1)  # drop path
        runs.append((model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.amp.GradScaler('cpu', 2. ** 10)))
    model, optimizer, scaler = runs[0]
    engine.train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0, scaler, torch.float16,
                           print_freq=10 ** 6)
    model, optimizer, scaler = runs[1]
    torch.manual_seed(1)
    model.train()
    for samples, targets in batches:
        with torch.autocast('cpu', dtype=torch.float16):
            loss = criterion(samples, model(samples), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert runs[0][2].get_scale() == runs[1][2].get_scale() == 2. ** 9
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(runs[0][1].state_dict()['state'][0]['step']) == int(runs[1][1].state_dict()['state'][0]['step']) == 3
