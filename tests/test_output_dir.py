"""Nothing in an --output_dir is lost: another run's checkpoints need --auto_reload, --resume or --overwrite, one run
at a time holds the directory, log.txt is only appended to, a longer --epochs rebuilds the LR schedule (and says so),
and a checkpoint write that fails leaves the previous checkpoint intact."""
import errno
import json
import math
import os
import shutil
import subprocess

import pytest
import torch

import rundir
from failures import TINY, assert_one_error, finished_run, small_data, snapshot
from helpers import run_main

SCHEDULE = ['--lr', '1e-3', '--unscale-lr', '--min-lr', '1e-5', '--warmup-epochs', '0']  # plain cosine


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return small_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def finished(data, tmp_path_factory):
    """A finished 2-epoch run: its output folder."""
    return finished_run(data, tmp_path_factory.mktemp('finished'), *SCHEDULE, '--epochs', 2)


@pytest.fixture
def run_dir(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / 'run')


def args(data, out, *extra):
    return [*TINY, *SCHEDULE, '--data-path', data, '--output_dir', out, *extra]


def log_epochs(out):
    return [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# 3. Nothing lost
# ---------------------------------------------------------------------------------------------------------------

def test_a_new_run_over_a_finished_one_is_refused(data, run_dir):
    before = snapshot(run_dir)
    code, out, err = run_main(args(data, run_dir, '--epochs', 2))
    assert_one_error(code, err, rf'--output_dir {run_dir} holds another run \(checkpoint\.pth, checkpoint\.prev\.pth, '
                                r'best_checkpoint\.pth, log\.txt\) .*fix: pass --auto_reload to continue it, pass '
                                r'--overwrite to start over in it')
    assert out == '' and snapshot(run_dir) == before


def test_overwrite_starts_over_and_keeps_the_old_log_lines(data, run_dir):
    old_log, old_checkpoint = (run_dir / 'log.txt').read_text(), (run_dir / 'checkpoint.pth').read_bytes()
    code, out, err = run_main(args(data, run_dir, '--epochs', 1, '--overwrite'))
    assert code == 0, err
    assert log_epochs(run_dir) == [0]
    assert (run_dir / 'log.superseded.txt').read_text() == old_log  # set aside, not deleted
    assert (run_dir / 'checkpoint.prev.pth').read_bytes() == old_checkpoint
    assert torch.load(run_dir / 'checkpoint.pth', weights_only=True)['args']['epochs'] == 1


def test_one_run_at_a_time_and_a_stale_lock_is_taken_over(data, run_dir):
    lock = rundir.RunLock(str(run_dir))
    assert lock.acquire() == ''
    try:
        before = snapshot(run_dir)
        code, out, err = run_main(args(data, run_dir, '--epochs', 3, '--auto_reload'))
        assert_one_error(code, err, rf'--output_dir {run_dir} is in use by another run \(pid {os.getpid()} on .*\); '
                                    r'fix: wait for it to end, or pick another --output_dir')
        assert snapshot(run_dir) == before
    finally:
        lock.release()
    assert not (run_dir / 'run.lock').exists()

    dead = subprocess.run(['sh', '-c', 'echo $$'], capture_output=True, text=True)
    (run_dir / 'run.lock').write_text(f'pid {dead.stdout.strip()} on somehost since yesterday\n')  # killed with -9
    code, out, err = run_main(args(data, run_dir, '--epochs', 3, '--auto_reload'))
    assert code == 0, err
    assert f'Took over {run_dir}/run.lock, left by pid {dead.stdout.strip()} on somehost since yesterday, which is ' \
           'no longer running' in out
    assert not (run_dir / 'run.lock').exists() and log_epochs(run_dir) == [0, 1, 2]


def test_resume_appends_to_log_txt(data, run_dir):
    old_log = (run_dir / 'log.txt').read_bytes()
    code, _, err = run_main(args(data, run_dir, '--epochs', 3, '--auto_reload'))
    assert code == 0, err
    log = (run_dir / 'log.txt').read_bytes()
    assert log.startswith(old_log) and log_epochs(run_dir) == [0, 1, 2]
    assert not (run_dir / 'log.superseded.txt').exists()


def test_a_resume_that_redoes_an_epoch_sets_its_old_line_aside(data, run_dir):
    """The checkpoint of epoch 1 was lost (a kill during its write): epoch 1 is trained again; its first line moves
    to log.superseded.txt, so log.txt has each epoch once and no line is deleted."""
    lines = (run_dir / 'log.txt').read_text().splitlines(keepends=True)
    os.replace(run_dir / 'checkpoint.prev.pth', run_dir / 'checkpoint.pth')  # the state after epoch 0
    code, out, err = run_main(args(data, run_dir, '--epochs', 2, '--auto_reload'))
    assert code == 0, err
    assert log_epochs(run_dir) == [0, 1] and (run_dir / 'log.txt').read_text().startswith(lines[0])
    assert (run_dir / 'log.superseded.txt').read_text() == lines[1]


# ---------------------------------------------------------------------------------------------------------------
# 4. Extending a run
# ---------------------------------------------------------------------------------------------------------------

def cosine(epoch: int, epochs: int, lr=1e-3, min_lr=1e-5) -> float:
    """The learning rate epoch `epoch` trains at: DeiT steps the schedule after each epoch, so epoch e runs at the
    cosine's value at e - 1 (at e = 0: the start value), written out in float64."""
    t = max(epoch - 1, 0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def test_a_longer_run_rebuilds_the_schedule_and_says_so(data, run_dir):
    lrs = [json.loads(line)['train_lr'] for line in (run_dir / 'log.txt').read_text().splitlines()]
    assert lrs == pytest.approx([cosine(0, 2), cosine(1, 2)], rel=1e-6)
    code, out, err = run_main(args(data, run_dir, '--epochs', 5, '--auto_reload'))
    assert code == 0, err
    assert f'Flags that differ from the run of {run_dir}/checkpoint.pth: --epochs 5 (was 2)' in out
    assert 'The LR schedule of the checkpoint differs from the one of the current flags (t_initial 2 -> 5): rebuilt ' \
           'for the current flags' in out
    entries = [json.loads(line) for line in (run_dir / 'log.txt').read_text().splitlines()]
    assert [e['epoch'] for e in entries] == [0, 1, 2, 3, 4]
    assert [e['train_lr'] for e in entries[2:]] == pytest.approx([cosine(e, 5) for e in (2, 3, 4)], rel=1e-6)
    assert entries[2]['train_lr'] > 10 * 1e-5  # not the old schedule's end (its minimum)


def test_a_shorter_epochs_than_trained_is_refused(data, run_dir):
    before = snapshot(run_dir)
    code, out, err = run_main(args(data, run_dir, '--epochs', 1, '--auto_reload'))
    assert_one_error(code, err, rf'--epochs 1: {run_dir}/checkpoint\.pth has trained 2 epochs already; fix: pass '
                                r'--epochs above 2 to train more, or --eval')
    assert snapshot(run_dir) == before


def test_a_start_epoch_beside_a_checkpoint_that_continues_is_refused(data, run_dir):
    before = snapshot(run_dir)
    code, out, err = run_main(args(data, run_dir, '--epochs', 4, '--start_epoch', 1, '--auto_reload'))
    assert_one_error(code, err, rf'--start_epoch 1: {run_dir}/checkpoint\.pth continues the run at epoch 2; fix: drop '
                                r'--start_epoch$')
    assert snapshot(run_dir) == before


def test_the_same_epochs_again_trains_nothing_and_changes_nothing(data, run_dir):
    before = snapshot(run_dir)
    code, out, err = run_main(args(data, run_dir, '--epochs', 2, '--auto_reload'))
    assert code == 0, err
    assert f'{run_dir}/checkpoint.pth has trained all --epochs 2 epochs: nothing left to train' in out
    assert 'Epoch: [' not in out and snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------------------------
# 7. A full disk
# ---------------------------------------------------------------------------------------------------------------

def test_disk_full_while_saving_is_one_line_and_the_previous_checkpoint_survives(data, run_dir, monkeypatch):
    def full_disk(obj, f, *a, **k):
        f.write(b'the first bytes of a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')
    checkpoints = {n: (run_dir / n).read_bytes() for n in ('checkpoint.pth', 'checkpoint.prev.pth',
                                                           'best_checkpoint.pth')}
    old_log = (run_dir / 'log.txt').read_bytes()
    monkeypatch.setattr(torch, 'save', full_disk)
    code, out, err = run_main(args(data, run_dir, '--epochs', 3, '--auto_reload'))
    assert_one_error(code, err, rf'cannot write {run_dir}/checkpoint\.pth \(No space left on device\); it is '
                                r'unchanged; fix: free disk space, then rerun with --auto_reload', status=74)
    assert {n: (run_dir / n).read_bytes() for n in checkpoints} == checkpoints
    assert not list(run_dir.glob('*.tmp*')) and (run_dir / 'log.txt').read_bytes().startswith(old_log)


def test_a_baseline_checkpoint_with_training_state_starts_a_fine_tune(data, finished, tmp_path):
    """A checkpoint of the plain model (2 epochs trained, its optimizer state with it) given to an add-on model is a
    starting point (training_state.restore: the gains start at zero, training at epoch 0), so --epochs 1 is not too short."""
    out = tmp_path / 'addon'
    argv = args(data, out, '--epochs', 1, '--resume', finished / 'checkpoint.pth')
    code, stdout, err = run_main(['--model', 'attnscale_tiny_12', *argv[2:]])
    assert code == 0, err
    assert f'Initialised from baseline checkpoint {finished}/checkpoint.pth; 2 add-on parameters start at ' \
           'zero' in stdout
    assert log_epochs(out) == [0]


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    """A file system without flock (some network mounts): a lock naming a live process on this host, or any
    process on another host, is refused; one naming a dead process here is taken over."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(rundir.fcntl, 'flock', no_locks)
    lock_file = tmp_path / 'run.lock'
    host = rundir.socket.gethostname()
    with subprocess.Popen(['sleep', '60']) as alive:
        try:
            for holder in (f'pid {alive.pid} on {host} since now', 'pid 1 on another-host since now'):
                lock_file.write_text(holder + '\n')
                with pytest.raises(rundir.RunLockError, match=rf'is in use by another run \({holder}; '):
                    rundir.RunLock(str(tmp_path)).acquire()
                assert lock_file.read_text() == holder + '\n'
        finally:
            alive.kill()
    lock_file.write_text(f'pid {alive.pid} on {host} since then\n')  # killed, and waited for: no longer running
    lock = rundir.RunLock(str(tmp_path))
    assert lock.acquire() == f'Took over {lock_file}, left by pid {alive.pid} on {host} since then, which is no ' \
                             'longer running'
    assert lock_file.read_text().startswith(f'pid {os.getpid()} on {host} since ')
    lock.release()
    assert not lock_file.exists()
