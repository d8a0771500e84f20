"""The --output_dir of a training run, where nothing is lost:

  * check_fresh_start: a run that would start from its first epoch refuses a directory that holds another run
    (its checkpoints or log.txt), unless --overwrite says so; --auto_reload continues that run, --resume starts
    from a checkpoint of the user's choice;
  * claimed / RunLock: one training run at a time in a directory. The main process holds an flock on
    `run.lock` (which names its process) for the whole run and removes the file at the end; a lock file left by
    a process that died holds no flock, so it is recognised as stale and taken over, with a line saying so;
  * RunLog: log.txt, only appended to. The lines of epochs that a run trains again (it resumed from an earlier
    checkpoint than the last logged epoch, or started over with --overwrite) are moved to log.superseded.txt at
    its first append, so log.txt holds each epoch once and no line is ever deleted.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import utils

RUN_FILES = ('checkpoint.pth', 'checkpoint.prev.pth', 'best_checkpoint.pth', 'log.txt')
LOCK_FILE = 'run.lock'
SUPERSEDED_LOG = 'log.superseded.txt'
WRITE_FAILED_EXIT_CODE = 74  # EX_IOERR: a checkpoint or log.txt could not be written (disk full, ...)


def check_fresh_start(args):
    """Fail when this training run would start from its first epoch in an --output_dir that holds another run.

    With --auto_reload, a directory with log.txt but no checkpoint is not refused: the run was stopped before its
    first checkpoint, there is nothing to continue from and nothing to lose (its log lines are set aside)."""
    if not args.output_dir or args.eval or args.throughput or args.overwrite or args.resume:
        return
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.output_dir, name))]
    if args.auto_reload:
        if 'checkpoint.pth' in found or 'checkpoint.prev.pth' in found or found in ([], ['log.txt']):
            return
    elif not found:
        return
    reload = '' if args.auto_reload else 'pass --auto_reload to continue it, '
    utils.fail(f'--output_dir {args.output_dir} holds another run ({", ".join(found)}) that this run would '
               f'replace, starting from scratch; fix: {reload}pass --overwrite to start over in it, or pick '
               'another --output_dir')


class RunLockError(RuntimeError):
    """Another live run holds the lock of the directory."""


class RunLock:
    """`<directory>/run.lock`: an exclusive flock, held from acquire() to release(), on a file naming its holder."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd = None

    def acquire(self) -> str:
        """Take the lock; returns a line about a stale lock file taken over ('' when there was none). Raises
        RunLockError when another live process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunLockError(f'--output_dir {self.directory} is in use by another run ({holder or self.path}); '
                                   'fix: wait for it to end, or pick another --output_dir') from None
            except OSError as e:  # a file system without flock: judge by the process the file names
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._check_holder_alive(fd)
            if self._is_current(fd):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} since {time.strftime("%Y-%m-%d %H:%M:%S")}\n'
                  .encode(), 0)
        self.fd = fd
        return f'Took over {self.path}, left by {previous}, which is no longer running' if previous else ''

    def _is_current(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _check_holder_alive(self, fd: int):
        holder = _read(fd)
        parts = holder.split()
        if len(parts) < 4 or parts[0] != 'pid':
            return
        pid, host = int(parts[1]), parts[3]
        alive = host != socket.gethostname() or (pid != os.getpid() and _running(pid))
        if alive:
            os.close(fd)
            raise RunLockError(f'--output_dir {self.directory} is in use by another run ({holder}; this file system '
                               f'has no locks, so a run on another host cannot be checked); fix: wait for it to end, '
                               f'delete {self.path} if it has ended, or pick another --output_dir')

    def release(self):
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self._is_current(self.fd):
                os.unlink(self.path)  # still holding the flock: nobody else owns this file yet
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors='replace').strip()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claimed(args):
    """--output_dir, created and checked writable; for a training run, locked by the main process until the block
    ends. Every process learns the main process's answer, so all of them fail with its one line."""
    if not args.output_dir:
        yield
        return
    try:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(args.output_dir) / f'.write_test.{os.getpid()}'
        probe.touch()
        probe.unlink()
    except OSError as e:
        utils.fail(f'--output_dir {args.output_dir} is not writable ({e.strerror}); pick another directory')
    lock, error = None, ''
    if not (args.eval or args.throughput) and utils.is_main_process():
        lock = RunLock(args.output_dir)
        try:
            note = lock.acquire()
        except RunLockError as e:
            lock, error = None, str(e)
        else:
            if note:
                utils.log(note)
    error = utils.all_gather_object(error)[0]
    if error:
        utils.fail(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class RunLog:
    """log.txt (one JSON line per epoch) and TensorBoard scalars, written by the main process.

    Nothing changes before the first append: a run that fails early leaves log.txt as it was. TensorBoard's
    purge_step hides the events of epochs this run redoes.
    """

    def __init__(self, args, start_epoch: int):
        self.path = os.path.join(args.output_dir, 'log.txt') if args.output_dir else ''
        self.start_epoch = start_epoch
        self.started = False
        self.tb_writer = None
        if args.output_dir and args.log_tensorboard and utils.is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            self.tb_writer = SummaryWriter(log_dir=args.output_dir, purge_step=start_epoch or None)

    def write(self, epoch: int, entry: dict, lambdas: dict):
        if not self.path or not utils.is_main_process():
            return
        try:
            if not self.started:
                moved = set_aside_epochs(self.path, self.start_epoch)
                if moved:
                    utils.log(f'Moved the {moved} lines of epochs from {self.start_epoch} on, which this run trains '
                              f'again, from {self.path} to {os.path.join(os.path.dirname(self.path), SUPERSEDED_LOG)}')
                self.started = True
            with open(self.path, 'a') as f:
                f.write(json.dumps(entry) + '\n')
        except OSError as e:
            utils.fail(f'cannot write {self.path} ({e.strerror or e}); the checkpoints are unchanged; fix: free disk '
                       'space and rerun with --auto_reload', WRITE_FAILED_EXIT_CODE)
        if self.tb_writer is not None:
            for tag in ('train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/loss'):
                self.tb_writer.add_scalar(tag, entry[tag.replace('/', '_')], epoch)
            for tag, value in lambdas.items():
                self.tb_writer.add_scalar(f'lambda/{tag}', value, epoch)
            self.tb_writer.flush()

    def close(self):
        if self.tb_writer is not None:
            self.tb_writer.close()


def set_aside_epochs(path: str, start_epoch: int) -> int:
    """Move the lines of epochs >= `start_epoch` from the log at `path` to log.superseded.txt beside it (appended,
    and on disk before the log is rewritten without them); returns how many. Lines that are not epoch entries
    stay where they are."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line if line.endswith('\n') else line + '\n' for line in f if line.strip()]
    moved = [line for line in lines if _epoch(line) >= start_epoch]
    if not moved:
        return 0
    with open(os.path.join(os.path.dirname(path), SUPERSEDED_LOG), 'a') as f:
        f.writelines(moved)
        f.flush()
        os.fsync(f.fileno())
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.writelines(line for line in lines if _epoch(line) < start_epoch)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(moved)


def _epoch(line: str) -> float:
    try:
        entry = json.loads(line)
    except ValueError:
        return -1
    return entry.get('epoch', -1) if isinstance(entry, dict) else -1
