"""Logging, distributed set-up and atomic checkpoint writing (DeiT's utils, with the official defects fixed).

Printing happens on the main process only through `log()`; `builtins.print` is left alone.
"""
import datetime
import json
import os
import sys
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist


class SmoothedValue:
    """A series of values with windowed median/avg and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value, n: int = 1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues and DeiT's progress lines: `header [ i/n] eta: ... meters ... time: ... data: ...`."""

    def __init__(self, delimiter: str = '  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(v.item() if isinstance(v, torch.Tensor) else v)

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq: int, header: str = ''):
        """Yield from `iterable`, logging progress with ETA every `print_freq` steps and at the end."""
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        n = len(iterable)
        width = len(str(n))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                log(self.delimiter.join([f'{header} [{i:>{width}}/{n}]', f'eta: {eta}', str(self),
                                         f'time: {iter_time}', f'data: {data_time}']))
            end = time.time()
        total = time.time() - start
        log(f'{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s / it)')


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def _collective_device():
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


def log(*args, force: bool = False, **kwargs):
    """print() on the main process (or anywhere with force=True), flushed so launchers show it live."""
    if force or is_main_process():
        print(*args, **kwargs, flush=True)


def fail(message: str, code: int = 2):
    """Exit with a one-line error (every rank prints it, prefixed with its rank when distributed)."""
    prefix = f'[rank {get_rank()}] ' if is_dist_avail_and_initialized() else ''
    print(f'{prefix}error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


def init_distributed_mode(args):
    """Join the process group described by the launcher's environment, if any.

    torchrun and `torch.distributed.launch --use_env` set RANK/WORLD_SIZE/LOCAL_RANK; launch without
    --use_env passes `--local-rank` (then RANK/WORLD_SIZE are still in the environment); SLURM sets
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. The backend follows the device: nccl on CUDA, gloo else.
    Sets args.distributed, args.rank, args.world_size, args.gpu.
    """
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', args.local_rank or 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', 0))
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.distributed = True
    use_cuda = args.device.startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = 'nccl' if use_cuda else 'gloo'
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=args.dist_timeout))
    log(f'| distributed init (rank {args.rank}/{args.world_size}, backend {backend}): {args.dist_url}')


def save_on_master(obj, path: str):
    """Atomically write `obj` to `path` on the main process; the file it replaces is kept as a
    `.prev` sibling, so a corrupt or interrupted latest checkpoint always has a good predecessor."""
    if not is_main_process():
        return
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        delay = float(os.environ.get('ANTIOVERSMOOTH_SAVE_DELAY', '0'))  # fault injection for the tests
        if delay:
            time.sleep(delay)
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def previous_checkpoint(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f'{root}.prev{ext}'


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_log(path: str, entry: dict):
    with open(path, 'a') as f:
        f.write(json.dumps(entry) + '\n')


def truncate_log(path: str, start_epoch: int):
    """Keep only the log lines of epochs before `start_epoch` (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get('epoch', -1) < start_epoch]
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.writelines(lines)
    os.replace(tmp, path)
