"""scripts/run_with_submitit.py through submitit's local cluster: 2 tasks form a gloo group and train; SLURM's
signal before the time limit (SIGUSR2) checkpoints mid-epoch on every task and requeues the job, which then ends
where an uninterrupted job ends."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import run_with_submitit  # noqa: E402

EPOCHS = 1
STEPS = 3  # 4 classes x 12 training images, RASampler: 24 per task, 3 batches of 8
TINY = ['--model', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8',
        '--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--eval-crop-ratio', '1.0',
        '--warmup-epochs', '1', '--lr', '2e-3', '--unscale-lr', '--print-freq', '1', '--data-set', 'IMNET',
        '--no-log-tensorboard', '--epochs', str(EPOCHS)]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=4, train_per_class=12, val_per_class=5)


def submit(data, out, **env):
    """The job as a user submits it (`--cluster local`, 2 tasks on CPU), with `env` added to its tasks'."""
    saved = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS='1', PYTHONPATH='', **env)
    try:
        return run_with_submitit.main(['--cluster', 'local', '--nodes', '1', '--ngpus', '2', '--device', 'cpu', *TINY,
                                       '--data-path', str(data), '--output_dir', str(out), '--mem-per-gpu', '1',
                                       '--cpus-per-task', '1', '--timeout', '10'])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def wait(job, timeout: float = 300):
    """Wait for the job's end (its tasks, requeued ones included); cancel it and fail after `timeout` s."""
    deadline = time.time() + timeout
    while not job.done():
        if time.time() > deadline:
            job.cancel()
            raise AssertionError(f'job still running after {timeout} s\n{job.stdout()}\n{job.stderr()}')
        time.sleep(0.2)


def log_entries(out) -> list:
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """An uninterrupted job of EPOCHS epochs."""
    out = tmp_path_factory.mktemp('reference')
    job = submit(data, out)
    wait(job)
    job.results()  # raises if a task failed
    assert 'distributed init (rank 0/2, backend gloo)' in job.stdout()
    return out


@pytest.mark.slow
def test_submitit_local_two_tasks_train(reference):
    assert [e['epoch'] for e in log_entries(reference)] == list(range(EPOCHS))


def task_pids(job) -> list:
    """The pids of the job's tasks: the children of submitit's local controller process."""
    controller, found = job._process.pid, []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == controller:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.slow
def test_time_limit_signal_checkpoints_on_every_task_then_requeues(data, reference, tmp_path):
    """SIGUSR2 (what SLURM sends --signal-delay seconds before the time limit) to both tasks during epoch 0.

    Guaranteed: it takes main.py's SIGTERM path: both tasks finish the same step, the mid-epoch checkpoint is
    written once (rank 0), each task prints one line and exits; then rank 0 has submitit requeue the job (no task
    is left blocked in a collective). The requeued job resumes at the next step and ends bit for bit where the
    uninterrupted job ends (model, EMA, optimizer, every logged number)."""
    job = submit(data, tmp_path, ANTIOVERSMOOTH_STEP_DELAY='0.3')
    log = Path(str(job.paths.stdout))
    deadline = time.time() + 240
    while not (log.exists() and 'Epoch: [0] [0/3]' in log.read_text()):
        assert time.time() < deadline and not job.done(), job.stdout()
        time.sleep(0.05)
    pids = task_pids(job)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    wait(job)
    job.results()

    first_run, resumed = job.stdout().split('Resumed from ')
    lines = [[line for line in job.task(rank).stderr().splitlines() if 'error: ' in line] for rank in (0, 1)]
    assert [len(found) for found in lines] == [1, 1], lines
    step = int(lines[0][0].split('saved at step ')[1].split('/')[0])
    assert 1 <= step < STEPS
    for rank in (0, 1):  # the same step on both tasks
        assert lines[rank][0] == (f'[rank {rank}] error: stopped for requeueing (SIGUSR2: the SLURM time limit is '
                                  f'near) during epoch 0; saved at step {step}/3, resumable with --auto_reload')
    assert first_run.count(': saved ') == 1  # the checkpoint, written once by rank 0
    assert first_run.index(': saved ') < first_run.index('Requeued job')  # and only then requeued
    assert f'training continues at step {step}/3 of epoch 0' in resumed

    ours = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    theirs = torch.load(reference / 'checkpoint.pth', weights_only=True)
    assert ours['epoch'] == theirs['epoch'] == EPOCHS - 1 and 'resume_step' not in ours
    for part in ('model', 'model_ema'):
        unequal = [k for k in ours[part] if not torch.equal(ours[part][k], theirs[part][k])]
        assert not unequal, f'{part} differs from the uninterrupted job in {unequal}'
    for a, b in zip(ours['optimizer']['state'].values(), theirs['optimizer']['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    def numbers(entries):
        return [{k: v for k, v in e.items() if not k.startswith('rss_mb')} for e in entries]
    assert numbers(log_entries(tmp_path)) == numbers(log_entries(reference))


def test_submitit_requires_an_output_dir(capsys):
    with pytest.raises(SystemExit) as e:
        run_with_submitit.parse_args(['--model', 'deit_tiny_12'])
    assert e.value.code == 2 and '--output_dir is required' in capsys.readouterr().err


def test_requeued_task_gets_the_arguments_as_parsed(monkeypatch):
    """Each task runs main() on its own copy (dist_url env://); the requeue hook resubmits the parsed arguments,
    which main() never changes, so a job requeued before its first checkpoint scales the learning rate once."""
    import submitit
    args = run_with_submitit.parse_args(['--model', 'deit_tiny_12', '--output_dir', '/tmp/x', '--lr', '5e-4',
                                         '--dist_url', 'tcp://elsewhere:1'])
    parsed = dict(vars(args))
    received = []
    monkeypatch.setattr(submitit.helpers, 'TorchDistributedEnvironment',
                        lambda: type('Env', (), {'export': lambda self, **kwargs: None})())
    monkeypatch.setattr(run_with_submitit.trainer, 'main', lambda args, stop: received.append((args, stop)))
    task = run_with_submitit.Trainer(args)
    usr2 = signal.getsignal(signal.SIGUSR2)
    try:
        task()
    finally:
        signal.signal(signal.SIGUSR2, usr2)
    given, stop = received[0]
    assert given is not args and vars(given) == dict(parsed, dist_url='env://')
    assert stop.reasons[signal.SIGUSR2][1] == run_with_submitit.trainer.PREEMPTED_EXIT_CODE
    requeued = task.checkpoint()
    assert requeued.function.args is args and vars(args) == parsed and args.auto_reload
