"""Logging, distributed set-up and atomic checkpoint writing (DeiT's utils, with the official defects fixed).

Printing happens on the main process only through `log()`; `builtins.print` is left alone.
"""
import contextlib
import datetime
import errno
import glob
import os
import random
import shutil
import signal
import sys
import time
from collections import defaultdict, deque
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class SmoothedValue:
    """A series of values with windowed median/avg and the global average.

    `update()` takes python numbers or tensors. Tensors (a step's loss, on the GPU) are kept as they are and
    read in one transfer when a statistic is first needed (a progress line every `print_freq` steps, the end of
    an epoch), so a training step does not wait for the device to log its loss. The values are added in the
    order they came, exactly as if each had been read at once.
    """

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self._total, self._count, self.fmt = 0.0, 0, fmt
        self._pending = []  # (tensor, n) not read yet

    def update(self, value, n: int = 1):
        if isinstance(value, torch.Tensor):
            self._pending.append((value.detach(), n))
        else:
            self._add(value, n)

    def _add(self, value: float, n: int):
        self.deque.append(value)
        self._count += n
        self._total += value * n

    def _read_pending(self):
        if self._pending:
            pending, self._pending = self._pending, []
            values = torch.stack([v.reshape(()).float() for v, _ in pending]).tolist()
            for value, (_, n) in zip(values, pending):
                self._add(value, n)

    @property
    def count(self) -> int:
        self._read_pending()
        return self._count

    @property
    def total(self) -> float:
        self._read_pending()
        return self._total

    def totals(self) -> tuple:
        """(count, total) of this process, for a mid-epoch checkpoint."""
        return self.count, self.total

    def set_totals(self, count: int, total: float):
        """Continue the global average from a checkpoint's `totals()`."""
        self._read_pending()
        self._count, self._total = count, total

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        self._count, self._total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        self._read_pending()
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        self._read_pending()
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        self._read_pending()
        return max(self.deque)

    @property
    def value(self):
        self._read_pending()
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
            self.meters[k].update(v)

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
            _fault_delay('ANTIOVERSMOOTH_STEP_DELAY')
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


def fail(message: str, code: int = 2, ignore_sigterm: bool = False):
    """Exit with a one-line error (every rank prints it, prefixed with its rank when distributed).

    `ignore_sigterm` keeps a SIGTERM that arrives while the interpreter shuts down (torchrun sends one to the
    other workers as soon as one exits) from turning the exit status into -15: Python restores the default
    SIGTERM action during finalization unless the signal is ignored.
    """
    prefix = f'[rank {get_rank()}] ' if is_dist_avail_and_initialized() else ''
    print(f'{prefix}error: {message}', file=sys.stderr, flush=True)
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _fault_delay(variable: str):
    """Sleep for the seconds given in the environment variable `variable` (fault injection for the tests)."""
    delay = float(os.environ.get(variable, '0') or 0)
    if delay:
        time.sleep(delay)


def is_comm_error(exc: BaseException) -> bool:
    """Whether `exc` comes from a collective whose peer died, hung past --dist-timeout or closed its socket.

    torch raises DistError subclasses for some of these; gloo and NCCL failures inside DDP's backward still
    arrive as plain RuntimeErrors, recognised by their message.
    """
    if isinstance(exc, getattr(dist, 'DistError', ())):
        return True
    text = str(exc)
    if 'DataLoader' in text:  # e.g. 'DataLoader timed out', 'DataLoader worker ... exited unexpectedly'
        return False
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        'gloo', 'Gloo', 'NCCL', 'Connection reset', 'Connection closed', 'Connection refused', 'Broken pipe',
        'Timed out', 'timed out', 'ProcessGroup', 'pair closure'))  # gloo: 'Application timeout caused pair closure'


def _mentions_timeout(text: str) -> bool:
    """Whether an error text from torch.distributed / gloo / NCCL reports a timeout ('Timed out', 'timeout')."""
    return 'imed out' in text or 'imeout' in text


def comm_error_message(exc: BaseException, timeout_min: float) -> str:
    """One line for a failed collective: what happened and what to do."""
    text = ' '.join(str(exc).split())
    first = text.split('. ')[0][:300]
    if _mentions_timeout(text):
        cause = (f'another process did not answer within --dist-timeout {timeout_min:g} min (hung or stopped); '
                 'raise --dist-timeout if a slow step (e.g. a large checkpoint write) is expected')
    else:
        cause = 'lost the connection to another process (it died or was killed; the launcher reports which rank)'
    return (f'a collective operation failed: {cause} [{first}]; rerun with --auto_reload to continue from the '
            'last checkpoint')


def launcher_placement(env, local_rank_arg=None) -> Optional[tuple]:
    """`(rank, world_size, local_rank)` from the launcher's environment, or None for a single process.

    torchrun and `torch.distributed.launch --use_env` set RANK/WORLD_SIZE/LOCAL_RANK; launch without --use_env
    passes `--local-rank` (RANK/WORLD_SIZE are still in the environment); srun sets SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID (submitit exports them as RANK/WORLD_SIZE/LOCAL_RANK).
    """
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', local_rank_arg or 0))
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        return int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env.get('SLURM_LOCALID', 0))
    return None


def cuda_device_index(local_rank: int, rank: int, device_count: int, local_world_size: Optional[int] = None,
                      visible: Optional[str] = None, srun: bool = False) -> int:
    """The CUDA device of this process.

    Under torchrun, torch.distributed.launch and submitit every process sees all the GPUs of its node: it takes
    device LOCAL_RANK, and more processes on the node (LOCAL_WORLD_SIZE, else at least LOCAL_RANK + 1) than
    visible devices is a ValueError naming LOCAL_RANK, the device count and CUDA_VISIBLE_DEVICES (`visible`);
    `rank % device_count` would put two processes on one GPU, which NCCL refuses ("Duplicate GPU").
    Started by srun itself (`srun`: placement from SLURM_LOCALID), SLURM may bind one or a few GPUs to each
    task (`--gpus-per-task`, `--gpu-bind`): a task then sees its own GPUs from device 0 on, and one whose
    LOCAL_RANK is beyond them takes `rank % device_count`.
    """
    if device_count < 1:
        raise ValueError('no CUDA device is visible to this process (check CUDA_VISIBLE_DEVICES and the GPUs '
                         'SLURM gave the task), or pass --device cpu')
    if srun and local_rank >= device_count:
        return rank % device_count
    processes = max(local_rank + 1, local_world_size or 0)
    if processes > device_count:
        shown = 'unset' if visible is None else repr(visible)
        raise ValueError(f'LOCAL_RANK {local_rank}: {processes} processes on this node for {device_count} visible '
                         f'CUDA device(s) (CUDA_VISIBLE_DEVICES={shown}), so two would share a GPU; start at most '
                         f'{device_count} processes per node (torchrun --nproc_per_node, run_with_submitit.py '
                         '--ngpus), or make more GPUs visible')
    return local_rank


def init_distributed_mode(args) -> torch.device:
    """Join the process group described by the launcher's environment, if any, and return this process's device.

    The backend follows the device: nccl on CUDA, gloo else. `args` is only read. TORCH_NCCL_ASYNC_ERROR_HANDLING
    is left as it is: torch's default (3) ends the process on a failed or timed-out NCCL collective without
    calling ncclCommAbort, which can hang; torchrun sets 1 (abort, then end) in its workers unless it is set.
    """
    use_cuda = args.device.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        fail('--device cuda but CUDA is not available; pass --device cpu')
    placement = launcher_placement(os.environ, args.local_rank)
    if placement is None:
        device = torch.device(args.device)
        if use_cuda and device.index is not None:  # e.g. --device cuda:1: the device whose RNG state is saved
            torch.cuda.set_device(device)
        return device
    rank, world_size, local_rank = placement
    _stop_with_launcher()
    device = torch.device('cpu')
    if use_cuda:
        try:
            local_world_size = int(os.environ['LOCAL_WORLD_SIZE']) if 'LOCAL_WORLD_SIZE' in os.environ else None
            device = torch.device('cuda', cuda_device_index(
                local_rank, rank, torch.cuda.device_count(), local_world_size,
                os.environ.get('CUDA_VISIBLE_DEVICES'), srun='RANK' not in os.environ))
        except ValueError as e:
            fail(str(e))
        torch.cuda.set_device(device)
    backend = 'nccl' if use_cuda else 'gloo'
    try:
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(minutes=args.dist_timeout))
    except (RuntimeError, ValueError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
        fail(_init_error_message(e, rank, world_size))
    log(f'| distributed init (rank {rank}/{world_size}, backend {backend}): {args.dist_url}')
    return device


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one all-reduce when distributed)."""
    if not is_dist_avail_and_initialized():
        return flag
    t = torch.tensor([float(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopRequest:
    """The signals that ask a training run to stop after its current step, resumably: each handler only records
    the signal; the training loop reads the record between steps, every rank stops after the same step (the
    step flags), and a mid-epoch checkpoint is written before the run exits. A second SIGINT (Ctrl-C) raises
    KeyboardInterrupt at once."""

    def __init__(self):
        self.received = []  # signal numbers, in the order they came
        self.reasons = {}  # signal number -> (what the exit line calls it, exit status)
        self.agreed_signal = None  # set by agreed()

    def install(self, signum: int, reason: str, exit_code: int):
        self.reasons[signum] = (reason, exit_code)
        signal.signal(signum, self._record)

    def _record(self, signum, frame):
        if signum == signal.SIGINT and signum in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    def __bool__(self) -> bool:
        return bool(self.received)

    def agreed(self) -> tuple:
        """`(reason, exit status)` of the first signal of the lowest rank that received one: the same on every
        rank (a collective when distributed), also on ranks that received none. That signal is kept in
        `agreed_signal`."""
        firsts = [r[0] for r in all_gather_object(self.received[:1]) if r]
        self.agreed_signal = firsts[0] if firsts else next(iter(self.reasons))
        return self.reasons[self.agreed_signal]


def _stop_with_launcher():
    """Under torchrun / torch.distributed.launch, have Linux send this worker SIGTERM when the launcher dies.

    The launcher starts each worker in a session of its own, so a launcher killed with SIGKILL (by hand, or by
    the out-of-memory killer) would leave the workers training, and writing checkpoints, next to a rerun. With
    this they stop like a preempted run: after the current step, with a checkpoint, exit status 75.
    """
    if not sys.platform.startswith('linux') or 'TORCHELASTIC_RUN_ID' not in os.environ:
        return
    try:
        import ctypes
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _init_error_message(exc: BaseException, rank: int, world_size: int) -> str:
    """One line for a failed `init_process_group` (port in use, master unreachable, missing variables)."""
    text = ' '.join(str(exc).split())
    port = os.environ.get('MASTER_PORT', '?')
    addr = os.environ.get('MASTER_ADDR', '?')
    if 'EADDRINUSE' in text or 'address already in use' in text.lower():
        return (f'port {port} is in use on this machine (another run or program holds it); pass --master_port '
                f'<free port> to the launcher (MASTER_PORT for a direct or SLURM launch)')
    if 'MASTER_ADDR' in text or 'MASTER_PORT' in text or 'environment variable' in text:
        return (f'cannot join the process group ({text[:200]}); set MASTER_ADDR and MASTER_PORT, or start main.py '
                f'with torchrun / torch.distributed.launch --use_env')
    if _mentions_timeout(text):
        return (f'timed out joining the process group at {addr}:{port} (rank {rank} of {world_size}); '
                'check that every process was started and that MASTER_ADDR/MASTER_PORT agree, or raise --dist-timeout')
    return f'cannot join the process group at {addr}:{port} ({text[:300]})'


class WriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the file it would replace is unchanged."""

    def __str__(self) -> str:
        return self.strerror


def save_on_master(obj, path: str):
    """Atomically write `obj` to `path` on the main process; the file it replaces is kept as a
    `.prev` sibling, so a corrupt or interrupted latest checkpoint always has a good predecessor. A write that
    fails (a full disk) removes its temporary file, leaves `path` as it was and raises WriteError."""
    if not is_main_process():
        return
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            delay = float(os.environ.get('ANTIOVERSMOOTH_SAVE_DELAY', '0'))  # fault injection for the tests
            if delay:
                time.sleep(delay)
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else ' '.join(str(e).split())[:200]
        raise WriteError(errno.EIO, f'cannot write {path} ({reason}); it is unchanged') from e
    _publish(tmp, path)


def publish_copy(src: str, dst: str):
    """Make `dst` a copy of the checkpoint `src` without serialising it again: a hard link where the file system
    has them (no bytes written), else a byte copy; atomic, with `dst`'s previous file kept as its `.prev`, as
    in save_on_master. Sharing an inode is safe because checkpoints are only ever replaced, never modified."""
    tmp = f'{dst}.tmp.{os.getpid()}'
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems)
        shutil.copyfile(src, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
    _publish(tmp, dst)


def _publish(tmp: str, path: str):
    """Rename the finished `tmp` to `path`, after moving the file it replaces to `path`'s `.prev`."""
    if os.path.exists(path):
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_temp_files(directory: str) -> list:
    """Delete `*.pth.tmp.<pid>` files left by a save that was killed before its rename (main process only).

    They are never read (the rename is what publishes a checkpoint); deleting them frees the disk space.
    """
    if not is_main_process() or not directory or not os.path.isdir(directory):
        return []
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), '*.pth.tmp.*')):
        if tmp.endswith(f'.tmp.{os.getpid()}'):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


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


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; the peak RSS elsewhere)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10


def all_gather_object(obj) -> list:
    """`obj` of every rank, in rank order (a one-element list when not distributed)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state(loader_generator: torch.Generator = None) -> dict:
    """This process's random number generator states, as plain tensors/lists (loadable with weights_only=True):
    torch CPU, CUDA (this process's own device, the current one, when CUDA is initialised; another rank's
    devices are none of its business, and a resumed run may see fewer of them), numpy's global RandomState,
    python's `random`, and the training DataLoader's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        'python': [version, list(internal), gauss_next],
        'loader': loader_generator.get_state() if loader_generator is not None else None,
    }


def set_rng_state(state: dict, loader_generator: torch.Generator = None):
    """Restore what `rng_state` returned; the CUDA state goes to this process's current device, whatever device
    it was saved from (a list there, one state per visible device as older checkpoints kept it, is skipped)."""
    torch.set_rng_state(state['torch'])
    if isinstance(state.get('cuda'), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    if loader_generator is not None and state.get('loader') is not None:
        loader_generator.set_state(state['loader'])
