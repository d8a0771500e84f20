"""What a newcomer meets first: each mistake ends in one line naming the fix and a non-zero exit, no traceback."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_image_folder, run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--model', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8',
        '--input-size', '32', '--batch-size', '8', '--num_workers', '0', '--data-set', 'IMNET', '--epochs', '1',
        '--no-log-tensorboard']
TRACEBACK = re.compile(r'Traceback|File ".*\.py", line')


def assert_one_line_error(code, err, expected):
    """Exit status 2 and exactly one 'error: ' line on stderr, matching `expected`, and no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and re.fullmatch(expected, lines[0]), err
    assert not TRACEBACK.search(err), err


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=2, train_per_class=8, val_per_class=2)


@pytest.mark.slow
def test_python_main_without_data_path():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, 'main.py'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr,
                          r"error: no --data-path given \(the default /datasets01/imagenet_full_size/061417/ is the "
                          r"authors' cluster path\); fix: pass --data-path <folder with train/ and val/>, or run "
                          r"scripts/demo\.sh for a dataset that ships offline")
    assert proc.stdout == ''  # failed before printing its arguments


def test_train_without_val(tmp_path):
    root = make_image_folder(tmp_path, num_classes=2, train_per_class=1, val_per_class=1)
    for f in (root / 'val').rglob('*.png'):
        f.unlink()
    for d in (root / 'val').iterdir():
        d.rmdir()
    (root / 'val').rmdir()
    code, _, err = run_main([*TINY, '--data-path', root])
    assert_one_line_error(code, err, rf'error: {root}/val is missing \(train/ is there\); fix: put the validation '
                                     r'images in val/<class>/, with the class folders of train/ \(ImageNet: '
                                     r'`python scripts/prepare_imagenet\.py`\)')


def test_image_folder_without_images(tmp_path):
    for split in ('train', 'val'):
        for name in ('cat', 'dog'):
            (tmp_path / split / name).mkdir(parents=True)
        (tmp_path / split / 'cat' / 'notes.txt').write_text('not an image')
    code, _, err = run_main([*TINY, '--data-path', tmp_path])
    assert_one_line_error(code, err, rf'error: {tmp_path}/train has 2 class folders but no images; fix: add images '
                                     rf'\(\.jpg, .*\) under {tmp_path}/train/<class>/')


@pytest.mark.parametrize('flags,expected', [
    (['--batch-size', '0'], r'error: --batch-size 0 must be at least 1; fix: pass a value >= 1'),
    (['--epochs', '-1'], r'error: --epochs -1 must be at least 1; fix: pass a value >= 1'),
    (['--num_workers', '-2'], r'error: --num_workers -2 must be at least 0; fix: pass a value >= 0'),
    (['--lr', 'nan'], r'error: --lr nan is not a finite number; fix: pass a number'),
    (['--weight-decay', 'inf'], r'error: --weight-decay inf is not a finite number; fix: pass a number'),
    (['--smoothing', '1'], r'error: --smoothing 1\.0 must be in \[0, 1\); fix: pass e\.g\. 0\.1, or 0 for none'),
    (['--model-kwargs', 'embed_dim=96', 'num_heads=5'],
     r'error: --model-kwargs embed_dim=96 num_heads=5: the width embed_dim=96 does not split into num_heads=5 heads; '
     r'fix: pick num_heads among 1, 2, 3, 4, 6, 8, 12, 16, or an embed_dim that is a multiple of num_heads'),
    (['--model-kwargs', 'num_heads=5'],  # the width is the model's own: 192 for tiny
     r'error: --model-kwargs num_heads=5: the width embed_dim=192 does not split into num_heads=5 heads; fix: pick '
     r'num_heads among 1, 2, 3, 4, 6, 8, 12, 16, or an embed_dim that is a multiple of num_heads'),
    (['--model-kwargs', 'depth'], r"error: --model-kwargs expects key=value pairs, got 'depth' \(e\.g\. patch_size=2 "
                                  r'embed_dim=96\)'),
])
def test_values_that_used_to_end_in_a_traceback(data, tmp_path, flags, expected):
    code, _, err = run_main([*TINY, '--data-path', data, '--output_dir', tmp_path / 'out', *flags])
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flag', ['--resume', '--finetune'])
def test_checkpoint_flag_given_a_directory(data, tmp_path, flag):
    code, _, err = run_main([*TINY, '--data-path', data, flag, tmp_path])
    assert_one_line_error(code, err, rf'error: {flag} {tmp_path} is a directory; fix: pass the checkpoint file in it, '
                                     rf'e\.g\. {tmp_path}/checkpoint\.pth')


def test_unknown_model_lists_each_close_name_once(data):
    code, _, err = run_main(['--model', 'attnscale_tiny12', '--data-path', data])
    assert_one_line_error(code, err, r"error: unknown model 'attnscale_tiny12'; closest: .* \(python main\.py "
                                     r'--list-models prints them all\)')
    names = re.search(r'closest: (.*) \(python', err).group(1).split(', ')
    assert names[0] == 'attnscale_tiny_12' and len(names) == len(set(names)) == 5, names


def test_demo_without_python_venv(tmp_path):
    """A Python without the venv module (Debian's python3 without python3-venv): setup_env.sh leaves no half-made
    environment behind (a rerun after installing python3-venv starts clean) and says what to install or do."""
    stub = tmp_path / 'bin'
    stub.mkdir()
    (stub / 'python3').write_text(  # creates the folder, then fails as Debian's does without ensurepip
        '#!/bin/sh\nif [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; ln -s /bin/false "$3/bin/python"\n'
        '  echo "The virtual environment was not created successfully because ensurepip is not available." >&2\n'
        '  exit 1; fi\nexit 3\n')
    (stub / 'python3').chmod(0o755)
    venv = tmp_path / 'venv'
    env = dict(os.environ, PATH=f'{stub}:/usr/bin:/bin', VENV=str(venv), OUT=str(tmp_path / 'out'),
               DATA=str(tmp_path / 'digits'))
    env.pop('SKIP_SETUP', None)
    env.pop('VIRTUAL_ENV', None)
    proc = subprocess.run(['bash', 'scripts/demo.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f'setup_env: python3 cannot create a virtual environment at {venv} (no venv/ensurepip module); fix: install '
        'it (Debian/Ubuntu: sudo apt install python3-venv), or activate an environment that has the requirements and '
        'rerun with SKIP_SETUP=1'), proc.stderr
    assert not venv.exists() and not (tmp_path / 'out').exists()
