"""Reliability of main.py: hard kills, preemption, a dying or hanging rank, corrupt checkpoints, bad input and
a long run in miniature. Run alone with `pytest -m reliability`.

Every multi-process run is a real 2-process gloo job (torchrun, `torch.distributed.launch --use_env`, or two
processes started the way `srun` starts them) on a generated ImageFolder with a tiny model. Runs are started in
their own process group, read live, and killed at chosen points; two fault-injection hooks make those points
deterministic: ANTIOVERSMOOTH_STEP_DELAY (seconds slept after each training/evaluation step, right after its
progress line) and ANTIOVERSMOOTH_SAVE_DELAY (seconds slept inside a checkpoint write, before its rename).

The bad-input cases and the one-process reruns after a fault run main.main() in this process (one interpreter
start instead of one per case); the cases where the process boundary matters (DataLoader workers, the launcher,
the port, signals) run as subprocesses.
"""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port, make_image_folder, run_main

pytestmark = [pytest.mark.reliability, pytest.mark.slow]  # nearly every test launches main.py or needs `reference`

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']
# Fast, but every stochastic part of the DeiT recipe stays on (drop-path 0.1, RandAugment, random erasing, mixup,
# cutmix, label smoothing, repeated augmentation, model EMA): resumed runs must still match bit for bit.
FAST = ['--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--eval-crop-ratio', '1.0',
        '--warmup-epochs', '1', '--lr', '2e-3', '--unscale-lr', '--print-freq', '1', '--data-set', 'IMNET',
        '--no-log-tensorboard']
EPOCHS = 4
STEPS = 3  # 4 classes x 12 training images, RASampler: 24 per rank, 3 batches of 8
PREEMPTED = 75
TRACEBACK_FROM_US = re.compile(r'Traceback|File ".*(main|utils|engine|datasets|samplers)\.py"')


def base_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'ANTIOVERSMOOTH_STEP_DELAY',
                'ANTIOVERSMOOTH_SAVE_DELAY'):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A process in its own session (so its whole group can be signalled), stdout/stderr read live."""

    def __init__(self, cmd, env):
        self.cmd = [str(c) for c in cmd]
        self.p = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self.lines = {'stdout': [], 'stderr': []}
        self.closed = {'stdout': False, 'stderr': False}
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._pump, args=(name, getattr(self.p, name)), daemon=True)
                        for name in ('stdout', 'stderr')]
        for t in self.threads:
            t.start()

    def _pump(self, name, stream):
        for line in stream:
            with self.cond:
                self.lines[name].append(line)
                self.cond.notify_all()
        with self.cond:
            self.closed[name] = True
            self.cond.notify_all()

    @property
    def stdout(self) -> str:
        with self.cond:
            return ''.join(self.lines['stdout'])

    @property
    def stderr(self) -> str:
        with self.cond:
            return ''.join(self.lines['stderr'])

    def wait_for(self, pattern: str, stream: str = 'stdout', start: int = 0, timeout: float = 240) -> int:
        """Index of the first line from `start` on that matches `pattern`, waiting for it to be printed."""
        regex, deadline, i = re.compile(pattern), time.time() + timeout, start
        with self.cond:
            while True:
                lines = self.lines[stream]
                while i < len(lines):
                    if regex.search(lines[i]):
                        return i
                    i += 1
                if self.closed[stream] or time.time() > deadline:
                    raise AssertionError(f'{pattern!r} never appeared on {stream}\n{self.tail()}')
                self.cond.wait(0.5)

    def workers(self) -> dict:
        """{rank: pid} of the launcher's worker processes (its children, told apart by their RANK)."""
        found = {}
        for entry in Path('/proc').iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
                if ppid != self.p.pid:
                    continue
                env = dict(item.split('=', 1) for item in (entry / 'environ').read_text().split('\0') if '=' in item)
            except (OSError, IndexError, ValueError):
                continue
            if 'RANK' in env:
                found[int(env['RANK'])] = int(entry.name)
        return found

    def signal_group(self, sig):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)

    def kill_job(self):
        """SIGKILL to the launcher's process group and to each worker's: torchrun starts every worker in a
        session of its own, so killing the launcher's group alone would leave the workers running."""
        groups = [self.p.pid, *self.workers().values()]
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

    def finish(self, timeout: float = 240) -> int:
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_job()
            self.p.wait()
            raise AssertionError(f'still running after {timeout} s: {" ".join(self.cmd)}\n{self.tail()}')
        for t in self.threads:
            t.join(10)
        return self.p.returncode

    def tail(self) -> str:
        return f'--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-4000:]}'

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:  # never leave a run behind, whatever failed
            self.kill_job()
            self.p.wait()


def launch(args, launcher='torchrun', port=None, poll=0.1, **env) -> Proc:
    """main.py under a launcher with 2 processes, or (launcher='python') as one plain process. `poll`: seconds
    between torchrun's checks of its workers (its --monitor-interval; 0.1 is its default)."""
    if launcher == 'python':
        head = [sys.executable, 'main.py']
    elif launcher == 'launch':
        head = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', '--master_port',
                port or free_port(), '--use_env', 'main.py']
    else:
        head = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--monitor-interval', poll,
                '--master_port', port or free_port(), 'main.py']
    return Proc(head + list(args), base_env(**env))


def srun_style(args, port, world_size=2, ranks=None, **env) -> list:
    """The processes of a job started the way `srun` starts them: main.py itself, one per task, told its place
    by SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, no launcher in between."""
    procs = []
    for rank in (range(world_size) if ranks is None else ranks):
        procs.append(Proc([sys.executable, 'main.py'] + list(args), base_env(
            SLURM_PROCID=rank, SLURM_NTASKS=world_size, SLURM_LOCALID=rank, MASTER_ADDR='127.0.0.1',
            MASTER_PORT=port, **env)))
    return procs


def log_entries(out) -> list:
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


def log_epochs(out) -> list:
    return [e['epoch'] for e in log_entries(out)]


def saved_epoch(out) -> int:
    return torch.load(Path(out) / 'checkpoint.pth', weights_only=True)['epoch']


def snapshot(directory) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*')) if p.is_file()}


def assert_same_training(out, ref):
    """The run in `out` ended in exactly the state of the uninterrupted run in `ref`: every tensor of the model,
    the EMA model and the optimizer is equal (torch.equal: bit for bit), and every number in log.txt is equal,
    the memory figures excepted."""
    a = torch.load(Path(out) / 'checkpoint.pth', weights_only=True)
    b = torch.load(Path(ref) / 'checkpoint.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == EPOCHS - 1 and 'resume_step' not in a
    for part in ('model', 'model_ema'):
        assert a[part].keys() == b[part].keys()
        unequal = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not unequal, f'{part} differs from the uninterrupted run in {unequal}'
    for pa, pb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a['lr_scheduler'] == b['lr_scheduler'] and a['max_accuracy'] == b['max_accuracy']

    def numbers(entries):
        return [{k: v for k, v in e.items() if not k.startswith('rss_mb')} for e in entries]
    assert numbers(log_entries(out)) == numbers(log_entries(ref))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


def train_args(data, out, *extra):
    return [*TINY, *FAST, '--data-path', data, '--output_dir', out, '--epochs', EPOCHS, *extra]


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """An uninterrupted 2-process run of EPOCHS epochs: what every interrupted and resumed run must equal."""
    out = tmp_path_factory.mktemp('reference')
    with launch(train_args(data, out)) as run:
        assert run.finish() == 0, run.tail()
    assert log_epochs(out) == list(range(EPOCHS))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------------

def test_hard_kill_at_any_moment_resumes_to_the_uninterrupted_result(data, reference, tmp_path):
    """SIGKILL of the whole job (launcher and both workers) mid-epoch, during evaluation and during the checkpoint
    write, each time followed by the same command with --auto_reload.

    Guaranteed: each rerun resumes from the last complete epoch (the checkpoint is replaced atomically, so a
    kill never leaves a half-written checkpoint.pth; the temp file of an interrupted write is removed), the run
    ends at the requested epoch, log.txt has each epoch exactly once, and the final model, EMA model, optimizer
    state and every logged number are bit-for-bit those of the uninterrupted run with the same seed. That holds
    with every stochastic part on because the data order depends only on (seed, epoch) and main.py reseeds
    torch/numpy/python RNGs from (seed, rank, epoch) at the start of each epoch; with --num_workers 0 on CPU, as
    here (augmentation in DataLoader workers is not replayed exactly after a resume). The comparison is exact
    (torch.equal): the resumed run performs the same float operations in the same order.
    """
    args = train_args(data, tmp_path, '--auto_reload')
    ckpt = tmp_path / 'checkpoint.pth'

    with launch(args, ANTIOVERSMOOTH_STEP_DELAY=0.5) as run:  # 1. mid-epoch: after step 1 of epoch 1
        run.wait_for(r'^Epoch: \[1\] \[1/3\]')
        run.kill_job()
        run.finish()
    assert saved_epoch(tmp_path) == 0 and log_epochs(tmp_path) == [0]

    with launch(args, ANTIOVERSMOOTH_STEP_DELAY=0.5) as run:  # 2. during the evaluation of epoch 2
        run.wait_for(r'training continues at epoch 1$')
        run.wait_for(r'^Test: \[0/2\]', start=run.wait_for(r'^Epoch: \[2\] \[2/3\]'))
        run.kill_job()
        run.finish()
    assert saved_epoch(tmp_path) == 1 and log_epochs(tmp_path) == [0, 1]

    with launch(args, ANTIOVERSMOOTH_SAVE_DELAY=60) as run:  # 3. while epoch 2's checkpoint is being written
        run.wait_for(r'training continues at epoch 2$')
        deadline = time.time() + 120
        while not list(tmp_path.glob('checkpoint.pth.tmp.*')):
            assert run.p.poll() is None and time.time() < deadline, run.tail()
            time.sleep(0.05)
        run.kill_job()
        run.finish()
    assert list(tmp_path.glob('checkpoint.pth.tmp.*')), 'the kill should have interrupted the write'
    assert saved_epoch(tmp_path) == 1  # the interrupted write did not touch checkpoint.pth
    assert log_epochs(tmp_path) == [0, 1, 2]  # epoch 2 was logged before its checkpoint: redone and rewritten

    with launch(args) as run:  # 4. to the end
        assert run.finish() == 0, run.tail()
    assert 'training continues at epoch 2' in run.stdout and 'Removed ' in run.stdout
    assert not list(tmp_path.glob('*.tmp*'))
    assert log_epochs(tmp_path) == list(range(EPOCHS))
    assert ckpt.exists() and (tmp_path / 'checkpoint.prev.pth').exists()
    assert_same_training(tmp_path, reference)


def test_sigterm_saves_mid_epoch_and_the_resumed_run_equals_an_uninterrupted_one(data, reference, tmp_path):
    """SIGTERM (what SLURM sends before preempting a job) to every worker, launched as the scripts do
    (`torch.distributed.launch --use_env`), during epoch 2.

    Guaranteed: the ranks agree (one all-reduce per step) to stop after the same step, rank 0 writes
    checkpoint.pth atomically with the state after that step (`epoch`: the last complete epoch, `resume_step`:
    the steps done in the next one, the summed train meters and every rank's RNG states), no rank exits before
    the file is complete, and every rank exits with 75 (EX_TEMPFAIL). The launcher itself exits 1 (torchrun
    reports each worker's code in its failure table). The next --auto_reload run continues the epoch after
    those steps (the sampler skips the batches already trained on) and ends bit-for-bit where the uninterrupted
    run ends; log.txt has each epoch once, with the same numbers.
    """
    args = train_args(data, tmp_path, '--auto_reload')
    with launch(args, launcher='launch', ANTIOVERSMOOTH_STEP_DELAY=0.5) as run:
        run.wait_for(r'^Epoch: \[2\] \[0/3\]')
        workers = run.workers()
        assert sorted(workers) == [0, 1]
        for pid in workers.values():
            os.kill(pid, signal.SIGTERM)
        assert run.finish() != 0
    err = run.stderr
    for rank in (0, 1):
        assert f'[rank {rank}] error: preempted (SIGTERM) during epoch 2; saved at step 2/3, resumable with ' \
               '--auto_reload' in err, run.tail()
    codes = re.findall(r'exitcode\s*:\s*(-?\d+)', err)
    assert codes and set(codes) == {str(PREEMPTED)}, run.tail()
    assert not re.search(r'File ".*main\.py"', err)
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert state['epoch'] == 1 and state['resume_step'] == 2 and len(state['rng']) == 2
    assert torch.load(tmp_path / 'checkpoint.prev.pth', weights_only=True)['epoch'] == 1
    assert log_epochs(tmp_path) == [0, 1]

    with launch(args, launcher='launch') as run:
        assert run.finish() == 0, run.tail()
    assert 'training continues at step 2/3 of epoch 2' in run.stdout
    assert re.search(r'^Epoch: \[2\] \[0/1\]', run.stdout, re.M)  # only the step left of epoch 2
    assert_same_training(tmp_path, reference)


def test_launcher_killed_alone_does_not_leave_workers_running(data, tmp_path):
    """SIGKILL of the torchrun process only (the OOM killer's or a user's choice). torchrun starts each worker
    in a session of its own, so they would go on training unsupervised, next to the rerun. Guaranteed: main.py
    asks Linux for SIGTERM when its launcher dies, so the workers stop like a preempted run, after the same
    step, with a mid-epoch checkpoint, within seconds."""
    args = [*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', 1000]
    with launch(args, ANTIOVERSMOOTH_STEP_DELAY=0.5) as run:
        run.wait_for(r'^Epoch: \[1\] \[0/3\]')
        workers = run.workers()
        os.kill(run.p.pid, signal.SIGKILL)
        run.p.wait()
        deadline = time.time() + 60
        while any(Path(f'/proc/{pid}').exists() for pid in workers.values()):
            assert time.time() < deadline, f'workers {workers} outlived their launcher by 60 s'
            time.sleep(0.1)
        run.finish()
    for rank in (0, 1):
        assert f'[rank {rank}] error: preempted (SIGTERM) during epoch 1; saved at step 2/3' in run.stderr, run.tail()
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert (state['epoch'], state['resume_step']) == (0, 2)


def test_sigterm_single_process_exits_75_and_resumes(data, tmp_path):
    """A plain (or srun-started) process gets exit status 75 itself; SIGTERM between epochs saves that epoch."""
    args = [*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', 3, '--auto_reload']
    with launch(args, launcher='python', ANTIOVERSMOOTH_STEP_DELAY=0.5) as run:
        run.wait_for(r'^Test: \[0/2\]', start=run.wait_for(r'^Epoch: \[1\]'))  # during the evaluation of epoch 1
        os.kill(run.p.pid, signal.SIGTERM)
        assert run.finish() == PREEMPTED, run.tail()
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line == 'error: preempted (SIGTERM) after epoch 1; resumable with --auto_reload'
    assert saved_epoch(tmp_path) == 1 and log_epochs(tmp_path) == [0, 1]
    code, out, err = run_main(args)  # the rerun, in this process
    assert code == 0, err
    assert 'training continues at epoch 2' in out and log_epochs(tmp_path) == [0, 1, 2]


@pytest.mark.parametrize('how', ['torchrun', 'srun'])
def test_a_rank_killed_mid_training_ends_the_job_quickly(data, tmp_path, how):
    """SIGKILL of rank 1 only. Guaranteed: the surviving rank 0 notices on its next collective (gloo reports the
    closed connection at once), prints one line and exits non-zero; the job is over well within 120 s (not after
    --dist-timeout, 10 min by default); torchrun's failure report names rank 1 and SIGKILL as the root cause; the
    last complete epoch's checkpoint is intact.

    Under torchrun, rank 0 waits (main.LAUNCHER_GRACE_S) for torchrun to stop it: torchrun names as root cause the
    failure it records first, in rank order within one poll of its workers, so a rank 0 that exited before torchrun
    polled (under load) used to be named instead of rank 1. Here torchrun polls every 5 s instead of 0.1 s, which
    made that happen in 2 of 4 runs before rank 0 waited. Without a launcher, rank 0 exits by itself."""
    args = [*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', 1000]
    port = free_port()
    if how == 'torchrun':
        procs = [launch(args, port=port, poll=5, ANTIOVERSMOOTH_STEP_DELAY=0.05)]  # a late poll, as under load
    else:
        procs = srun_style(args, port, ANTIOVERSMOOTH_STEP_DELAY=0.05)
    with contextlib.ExitStack() as stack:
        for p in procs:
            stack.enter_context(p)
        procs[0].wait_for(r'^Epoch: \[2\] \[1/3\]')
        victim = procs[0].workers()[1] if how == 'torchrun' else procs[1].p.pid
        os.kill(victim, signal.SIGKILL)
        start = time.time()
        codes = [p.finish(timeout=120) for p in procs]
        elapsed = time.time() - start
    assert elapsed < 120
    err = procs[0].stderr
    assert re.search(r'^\[rank 0\] error: a collective operation failed: lost the connection to another process '
                     r'.*rerun with --auto_reload', err, re.M), procs[0].tail()
    assert not re.search(r'File ".*(main|engine|utils)\.py"', err), procs[0].tail()
    if how == 'torchrun':
        assert codes[0] != 0
        report = err[err.index('Root Cause'):]
        assert re.search(r'rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9', report), report
    else:  # rank 0 exits 1 after its line, or is aborted by gloo's teardown of the broken group (seen in 1 of ~8)
        assert codes[0] in (1, -signal.SIGABRT) and codes[1] == -signal.SIGKILL, codes
    assert saved_epoch(tmp_path) >= 1


def test_a_hung_rank_times_out_after_dist_timeout(data, tmp_path):
    """SIGSTOP of rank 1 (a hang: its sockets stay open). Guaranteed: rank 0 gives up after --dist-timeout
    (here 0.15 min) instead of waiting forever. When gloo reports the timeout as a Python error (the usual
    case) the exit is 1 with one line naming the timeout and the flag; when the timeout fires inside gloo's
    own worker thread, gloo aborts the process from C++ (SIGABRT, 'terminate called without an active
    exception') before Python can see it, which still ends the run within the bound."""
    args = [*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', 1000, '--dist-timeout', 0.15]
    procs = srun_style(args, free_port(), ANTIOVERSMOOTH_STEP_DELAY=0.05)
    with contextlib.ExitStack() as stack:
        for p in procs:
            stack.enter_context(p)
        procs[0].wait_for(r'^Epoch: \[1\] \[1/3\]')
        os.kill(procs[1].p.pid, signal.SIGSTOP)
        start = time.time()
        code = procs[0].finish(timeout=120)
        elapsed = time.time() - start
        procs[1].signal_group(signal.SIGKILL)
        procs[1].finish()
    assert elapsed < 120 and code in (1, -signal.SIGABRT), (code, elapsed, procs[0].tail())
    if code == 1:
        assert re.search(r'^\[rank 0\] error: a collective operation failed: another process did not answer '
                         r'within --dist-timeout 0.15 min', procs[0].stderr, re.M), procs[0].tail()
    else:
        assert 'terminate called' in procs[0].stderr, procs[0].tail()
    assert 'Traceback' not in procs[0].stderr


def truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_corrupt_latest_checkpoint_falls_back_to_prev(data, reference, tmp_path):
    """--auto_reload with a truncated checkpoint.pth: a warning naming the file, then the run continues from
    checkpoint.prev.pth (one epoch earlier) and redoes the missing epoch; it never silently starts over. The
    unreadable file is set aside as checkpoint.unreadable.pth, so that the next save does not rotate it into
    checkpoint.prev.pth in place of the good one."""
    for name in ('checkpoint.pth', 'checkpoint.prev.pth', 'log.txt'):
        (tmp_path / name).write_bytes((reference / name).read_bytes())
    truncate(tmp_path / 'checkpoint.pth')
    code, out, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', EPOCHS,
                               '--auto_reload'])  # in this process
    assert code == 0, err
    assert re.search(rf'^warning: cannot resume from the latest checkpoint: checkpoint {tmp_path}/checkpoint.pth is '
                     rf'corrupt or truncated .*; resuming from the previous checkpoint {tmp_path}/checkpoint.prev.pth '
                     r'instead$', err, re.M), err
    assert f'Resumed from {tmp_path}/checkpoint.prev.pth (epoch {EPOCHS - 2}); training continues at epoch ' \
           f'{EPOCHS - 1}' in out
    assert 'Epoch: [0]' not in out
    assert log_epochs(tmp_path) == list(range(EPOCHS)) and saved_epoch(tmp_path) == EPOCHS - 1
    assert (tmp_path / 'checkpoint.unreadable.pth').stat().st_size == (reference / 'checkpoint.pth').stat().st_size // 2
    assert torch.load(tmp_path / 'checkpoint.prev.pth', weights_only=True)['epoch'] == EPOCHS - 2


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, a non-zero exit, nothing in --output_dir touched
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def occupied(tmp_path, reference):
    """An --output_dir that already holds a previous run's checkpoints and log, to check nothing is touched."""
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('checkpoint.pth', 'checkpoint.prev.pth', 'log.txt'):
        (out / name).write_bytes((reference / name).read_bytes())
    return out


def assert_clean_failure(code, err, expected, code_expected=2):
    assert code == code_expected, err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and re.search(expected, lines[0]), err
    assert not TRACEBACK_FROM_US.search(err), err


def flat_val(root):
    for f in (root / 'val').rglob('*.png'):
        f.rename(root / 'val' / f.name)
    for d in (root / 'val').iterdir():
        if d.is_dir():
            d.rmdir()


def other_classes(root):
    (root / 'val' / 'class_03').rename(root / 'val' / 'class_99')


BAD_DATA = {
    'missing data path': (lambda root: root / 'nope', r'--data-path \S+/nope does not exist; fix: pass the folder'),
    'empty data path': (lambda root: '', r'--data-path is empty; fix: pass the folder'),
    'empty data folder': (lambda root: root / 'empty', r'/empty/train is missing; fix: --data-path must hold '
                                                        r'train/<class>/<images> and val/<class>/<images>'),
    'flat val': (flat_val, r'/val holds 20 image files but no class folders .*run '
                           r'`python scripts/prepare_imagenet\.py`'),
    'different classes': (other_classes, r'have different class folders \(only in train: class_03; only in val: '
                                         r'class_99\); fix: give val/ exactly the class folders of train/'),
}


@pytest.mark.parametrize('case', sorted(BAD_DATA))
def test_bad_dataset(case, tmp_path, occupied):
    root = make_image_folder(tmp_path / 'data', num_classes=4, train_per_class=2, val_per_class=5)
    (root / 'empty').mkdir()
    change, expected = BAD_DATA[case]
    data_path = change(root)
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', root if data_path is None else data_path,
                             '--output_dir', occupied, '--overwrite', '--epochs', 1])
    assert_clean_failure(code, err, expected)
    assert snapshot(occupied) == before


def corrupt_one_image(root, split='train') -> Path:
    bad = sorted((root / split / 'class_01').glob('*.png'))[0]
    bad.write_bytes(b'not a png at all')
    return bad


def test_corrupt_image_in_a_dataloader_worker_names_the_file(tmp_path, occupied):
    """Raised in a DataLoader worker, the error arrives wrapped in the worker's traceback; main.py prints only
    its last line. With --skip-bad-images the run goes on and reports how many files it skipped."""
    root = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=8, val_per_class=2)
    bad = corrupt_one_image(root)
    args = [*TINY, *FAST, '--data-path', root, '--output_dir', occupied, '--overwrite', '--epochs', 1,
            '--num_workers', 1, '--no-repeated-aug']  # every training image is read in the epoch
    before = snapshot(occupied)
    with launch(args, launcher='python') as run:
        code = run.finish()
    assert code == 2, run.tail()
    assert run.stderr.strip().splitlines()[-1] == (
        f'error: cannot read image {bad} (UnidentifiedImageError: cannot identify image file {str(bad)!r}); fix: '
        'replace or delete the file, or pass --skip-bad-images to skip unreadable images'), run.tail()
    assert 'Traceback' not in run.stderr
    assert snapshot(occupied) == before

    with launch(args + ['--skip-bad-images'], launcher='python') as run:
        assert run.finish() == 0, run.tail()
    assert f'--skip-bad-images: 1 unreadable images skipped so far: {bad}' in run.stdout
    assert log_entries(occupied)[-1]['skipped_images'] == 1


def test_unknown_model_lists_the_closest_names(data, tmp_path):
    code, _, err = run_main(['--model', 'attnscale_tiny12', *FAST, '--data-path', data, '--epochs', 1])
    assert_clean_failure(code, err, r"unknown model 'attnscale_tiny12'; closest: attnscale_tiny_12.* \(python "
                                    r"main.py --list-models prints them all\)")


def test_checkpoint_of_another_architecture_names_the_keys(data, reference, occupied):
    before = snapshot(occupied)
    code, _, err = run_main(['--model', 'featscale_tiny_12', *TINY[2:], *FAST, '--data-path', data,
                             '--output_dir', occupied, '--epochs', EPOCHS + 1,
                             '--resume', reference / 'checkpoint.pth'])
    assert_clean_failure(code, err, rf'{reference}/checkpoint.pth does not fit .* unexpected: blocks\.0\.attn\.lamb.*'
                                    r'check that --model matches the checkpoint')
    assert snapshot(occupied) == before


def test_resume_path_that_does_not_exist(data, occupied):
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', occupied, '--epochs', 1,
                             '--resume', occupied / 'nope.pth'])
    assert_clean_failure(code, err, r'checkpoint \S+/nope.pth does not exist: check the path given to --resume')
    assert snapshot(occupied) == before


def test_corrupt_resume_checkpoint_names_the_file(data, reference, tmp_path, occupied):
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes((reference / 'checkpoint.pth').read_bytes())
    truncate(bad)
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', occupied, '--epochs', 1,
                             '--resume', bad])
    assert_clean_failure(code, err, rf'checkpoint {bad} is corrupt or truncated .*delete it or pick another file')
    assert snapshot(occupied) == before


def test_both_auto_reload_checkpoints_corrupt_never_starts_over(data, occupied):
    for name in ('checkpoint.pth', 'checkpoint.prev.pth'):
        truncate(occupied / name)
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', occupied, '--epochs', EPOCHS + 1,
                             '--auto_reload'])
    assert_clean_failure(code, err, r'checkpoint.pth and its .prev are unreadable; remove them to start over, or pass '
                                    r'--resume')
    assert 'warning: cannot resume from the latest checkpoint' in err
    assert snapshot(occupied) == before


class WritesAFile:
    """Unpickling this creates a file: what a malicious checkpoint could do with full unpickling."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def test_checkpoint_with_pickled_code_is_refused(data, tmp_path, occupied):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': WritesAFile(marker)}, evil)
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', occupied, '--epochs', 1,
                             '--resume', evil])
    assert_clean_failure(code, err, rf'checkpoint {evil} was refused by the safe loader .*Pass --unsafe-load only if '
                                    r'you trust the file')
    assert not marker.exists()
    assert snapshot(occupied) == before


def test_batch_size_larger_than_the_dataset(data, occupied):
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', occupied, '--overwrite', '--epochs', 1,
                             '--batch-size', 64])
    assert_clean_failure(code, err, r'--batch-size 64 is larger than the 48 training images each of the 1 processes '
                                    r'sees; lower --batch-size')
    assert snapshot(occupied) == before


def test_output_dir_not_writable(data, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', blocker / 'out', '--epochs', 1])
    assert_clean_failure(code, err, rf'--output_dir {blocker}/out is not writable \(Not a directory\); pick another')
    assert blocker.read_text() == 'x'


def test_nan_loss_leaves_the_previous_run_untouched(data, occupied):
    before = snapshot(occupied)
    code, _, err = run_main([*TINY, *FAST, '--data-path', data, '--output_dir', occupied, '--overwrite', '--epochs', 1,
                             '--lr', '1e30', '--warmup-epochs', 0])
    assert_clean_failure(code, err, r'loss is (nan|inf) at epoch 0; lower --lr, set --clip-grad', code_expected=3)
    assert snapshot(occupied) == before  # log.txt is only rewritten when the first epoch of a run is logged


def test_master_port_in_use(data, tmp_path):
    """torchrun binds the port itself, before main.py runs: its own error ends with a line naming the port. A
    process started without a launcher (srun, submitit) binds it in main.py, which says what to do."""
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', 1]
        with launch(args, port=port) as run:
            assert run.finish(timeout=120) != 0
        assert re.search(rf'port: {port}, .*EADDRINUSE.*address already in use', run.stderr.strip().splitlines()[-1])
        [rank0] = srun_style(args, port, ranks=[0])
        with rank0:
            code = rank0.finish(timeout=120)
    assert code == 2, rank0.tail()
    assert rank0.stderr.strip().splitlines()[-1] == (
        f'error: port {port} is in use on this machine (another run or program holds it); pass --master_port '
        '<free port> to the launcher (MASTER_PORT for a direct or SLURM launch)')
    assert 'Traceback' not in rank0.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------

def test_long_run_in_miniature_does_not_grow_in_memory(data, tmp_path):
    """32 epochs, 2 processes, a checkpoint (and its .prev rotation), evaluation, EMA and TensorBoard every
    epoch. Each log.txt entry carries `rss_mb_ranks` (resident memory of every rank at the end of the epoch) and
    `rss_mb` (their maximum); after the warm-up epochs no rank may grow by 50 MB or more."""
    epochs = 32
    args = [*TINY, *FAST, '--data-path', data, '--output_dir', tmp_path, '--epochs', epochs, '--print-freq', 100,
            '--log-tensorboard']
    with launch(args) as run:
        assert run.finish(timeout=400) == 0, run.tail()
    entries = log_entries(tmp_path)
    assert [e['epoch'] for e in entries] == list(range(epochs))
    rss = [e['rss_mb_ranks'] for e in entries]
    assert all(len(r) == 2 and e['rss_mb'] == max(r) for r, e in zip(rss, entries))
    print('rss_mb per epoch (rank 0, rank 1):', rss)
    for rank in (0, 1):
        growth = rss[-1][rank] - rss[5][rank]
        assert growth < 50, f'rank {rank} grew {growth:.1f} MB from epoch 5 to {epochs - 1}: {[r[rank] for r in rss]}'
    names = {p.name for p in tmp_path.iterdir() if 'tfevents' not in p.name}
    assert {'checkpoint.pth', 'checkpoint.prev.pth', 'best_checkpoint.pth', 'log.txt'} <= names <= {
        'checkpoint.pth', 'checkpoint.prev.pth', 'best_checkpoint.pth', 'best_checkpoint.prev.pth', 'log.txt'}
