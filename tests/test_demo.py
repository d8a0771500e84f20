"""The README's first command, shortened: digits export, 2-process training, --eval --resume, the table."""
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_evaluates_and_is_idempotent(tmp_path):
    (tmp_path / 'bin').mkdir()  # SKIP_SETUP=1: the demo's `python` is this interpreter, whatever PATH holds
    (tmp_path / 'bin' / 'python').write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (tmp_path / 'bin' / 'python').chmod(0o755)
    env = dict(os.environ, SKIP_SETUP='1', EPOCHS='1', MODELS='deit_tiny_12 attnscale_tiny_12', OUT=str(tmp_path / 'out'),
               DATA=str(tmp_path / 'digits'), MASTER_PORT=str(free_port()), OMP_NUM_THREADS='1',
               PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}')
    first = subprocess.run(['bash', 'scripts/demo.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = re.findall(r'^(\w+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)$', first.stdout, re.M)
    assert [r[0] for r in rows] == ['deit_tiny_12', 'attnscale_tiny_12']
    assert int(rows[1][1]) - int(rows[0][1]) == 12 * 3  # AttnScale adds one lambda per head per layer
    assert all(0. <= float(r[2]) <= 100. for r in rows)
    progress = re.findall(r'^(\w+)  epoch 1/1  train loss [\d.]+  val top-1 +([\d.]+)%  elapsed \d+:\d\d  ETA 0:00$',
                          first.stdout, re.M)  # one line per epoch and model, while training
    assert progress == [(r[0], r[2]) for r in rows]  # the last epoch's accuracy is the table's
    assert f'curves: {tmp_path}/out/curves.png\n' in first.stdout and (tmp_path / 'out' / 'curves.png').stat().st_size
    for model in ('deit_tiny_12', 'attnscale_tiny_12'):
        run = tmp_path / 'out' / model
        assert (run / 'checkpoint.pth').exists() and len((run / 'log.txt').read_text().splitlines()) == 1
        assert 'Accuracy of the network on the 360 test images' in (run / 'eval.out').read_text()
    assert sum(1 for _ in (tmp_path / 'digits' / 'train').rglob('*.png')) == 1437

    again = subprocess.run(['bash', 'scripts/demo.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'nothing rewritten' in again.stdout and '  epoch ' not in again.stdout
    assert 'Epoch: [' not in (tmp_path / 'out' / 'deit_tiny_12' / 'train.out').read_text()
    assert re.findall(r'^(\w+)\s+\d+\s+([\d.]+)%', again.stdout, re.M) == [(r[0], r[2]) for r in rows]
