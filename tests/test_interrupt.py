"""Ctrl-C takes the SIGTERM path: the run stops after the current step, writes the mid-epoch checkpoint, prints
one line and exits 130; a second Ctrl-C, or one outside the training loop, exits 130 at once with one line."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import utils
from helpers import make_image_folder, run_main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ['--model', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8',
        '--input-size', '32', '--batch-size', '8', '--eval-crop-ratio', '1.0', '--warmup-epochs', '1',
        '--print-freq', '1', '--data-set', 'IMNET', '--no-log-tensorboard', '--device', 'cpu', '--epochs', '2']


class Run:
    """`python main.py` in a session of its own, as a terminal runs it (its DataLoader workers in its process
    group), stdout read live."""

    def __init__(self, args, **env):
        self.p = subprocess.Popen([sys.executable, 'main.py', *map(str, args)], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                  env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **env))
        self.out, self.err = [], []
        self.threads = [threading.Thread(target=lambda s=s, d=d: d.extend(s), daemon=True)
                        for s, d in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.threads:
            t.start()

    def wait_for(self, text: str, timeout: float = 120):
        deadline = time.time() + timeout
        while not any(text in line for line in list(self.out)):
            assert time.time() < deadline and self.p.poll() is None, ''.join(self.out + self.err)[-3000:]
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        try:
            self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        for t in self.threads:
            t.join(10)
        return self.p.returncode


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT to the process group, DataLoader worker included) during epoch 1: the step finishes, the
    mid-epoch checkpoint is written, one line, exit status 130; --auto_reload continues at the next step."""
    data = make_image_folder(tmp_path / 'data', num_classes=4, train_per_class=6, val_per_class=2)
    args = [*ARGS, '--data-path', data, '--output_dir', tmp_path / 'out', '--auto_reload', '--num_workers', '1']
    run = Run(args, ANTIOVERSMOOTH_STEP_DELAY='0.3')
    run.wait_for('Epoch: [1] [0/3]')
    os.killpg(run.p.pid, signal.SIGINT)
    assert run.finish() == 130, ''.join(run.out + run.err)[-3000:]
    err = ''.join(run.err)
    assert 'Traceback' not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: interrupted (Ctrl-C) during epoch 1; saved at step ') and \
        last.endswith('/3, resumable with --auto_reload'), err
    step = int(last.split('saved at step ')[1].split('/')[0])
    state = torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)
    assert (state['epoch'], state['resume_step']) == (0, step) and 1 <= step < 3

    again = Run(args)
    assert again.finish() == 0, ''.join(again.out + again.err)[-3000:]
    assert any(f'training continues at step {step}/3 of epoch 1' in line for line in again.out)
    assert torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)['epoch'] == 1


def test_stop_request_records_signals_and_a_second_ctrl_c_stops_at_once():
    stop = utils.StopRequest()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        stop.install(signal.SIGUSR1, 'stopped (SIGUSR1)', 75)
        stop.install(signal.SIGINT, 'interrupted (Ctrl-C)', 130)
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)  # handlers run in the main thread, between bytecodes
        time.sleep(0.01)
        assert stop and stop.received == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert stop.agreed() == ('interrupted (Ctrl-C)', 130) and stop.agreed_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_ctrl_c_outside_the_training_loop_is_one_line(monkeypatch, tmp_path):
    """A Ctrl-C while the data are scanned (or a second one during training) exits 130 with one line."""
    import main

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(main, 'build_data', interrupted)
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=2, val_per_class=1)
    code, _, err = run_main([*ARGS, '--data-path', data])
    assert code == 130 and err == 'error: interrupted (Ctrl-C); nothing saved since the last checkpoint\n'
