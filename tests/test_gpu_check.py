"""scripts/gpu_check.sh at toy sizes on the CPU (the command a GPU user runs, so that it cannot rot): the table
has every row, the judged checks pass, and the numbers behind them are sane."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / 'check.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable)
    proc = subprocess.run(['bash', 'scripts/gpu_check.sh', '--device', 'cpu', '--tiny', '--compile-backend',
                           'aot_eager', '--json', str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith('GPU check on ') and '(cpu; torch ' in lines[0]
    assert [c.strip() for c in lines[1].split('|')] == ['check', 'setting', 'result', 'ok']
    assert lines[-1].startswith('5 of 5 checks passed')

    rows = {(r['section'], r['setting']): r for r in json.loads(out.read_text())['rows']}
    assert set(rows) == {
        ('AttnScale fused vs explicit', 'float16 autocast'), ('AttnScale fused vs explicit', 'bfloat16 autocast'),
        ('training attnscale_small_12', 'float16 + GradScaler'), ('training attnscale_small_12', 'bfloat16'),
        ('training attnscale_small_12', 'compile, bfloat16'),
        ('benchmark.py', 'deit_small_patch16_224, batch 4, bfloat16'),
        ('benchmark.py', 'attnscale_small_12, batch 4, bfloat16')}
    for dtype, bound in (('float16', 5e-3), ('bfloat16', 5e-2)):
        numbers = rows['AttnScale fused vs explicit', f'{dtype} autocast']['numbers']
        for path in ('fused', 'explicit'):  # autocast really ran (not zero) and stayed near float32
            assert 0 < numbers[path]['out'] < bound and 0 < numbers[path]['grad'] < bound, numbers
    eager = rows['training attnscale_small_12', 'bfloat16']['numbers']
    for setting in ('float16 + GradScaler', 'bfloat16', 'compile, bfloat16'):
        numbers = rows['training attnscale_small_12', setting]['numbers']
        assert numbers['steps'] == 2 and math.isfinite(numbers['loss_second_pass'])
        assert numbers['loss_second_pass'] < numbers['loss_first_pass']  # the same batches, seen again
        assert abs(numbers['loss_first_pass'] - eager['loss_first_pass']) < 0.02  # same model, same data
    reference = rows['benchmark.py', 'deit_small_patch16_224, batch 4, bfloat16']['numbers']
    ours = rows['benchmark.py', 'attnscale_small_12, batch 4, bfloat16']['numbers']
    assert reference['train_ratio'] == reference['infer_ratio'] == reference['peak_ratio'] == 1.0
    assert ours['params'] == reference['params'] + 2 * 2  # one lambda per head (2) in each of the 2 blocks
    assert ours['peak_ratio'] > 0 and ours['train_ratio'] > 0
