"""scripts/gpu_check.sh at toy sizes on the CPU (the command a GPU user runs, so that it cannot rot), and proof that
it can fail: with the add-on gains' gradients sabotaged under float16/bfloat16 autocast (zeroed, negated, x10, NaN,
by tensor hooks on the gain parameters) it must fail, clean it must pass."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
import gpu_check  # noqa: E402

FAMILIES = ('ViT', 'CaiT', 'Swin')
GAIN_ROWS = {('dL/dλ vs float64', f'{addon} {family}, {dtype}') for addon in ('attnscale', 'featscale')
             for family in FAMILIES for dtype in ('float16', 'bfloat16')}
TRAINING = ('float16 + GradScaler', 'bfloat16')


@pytest.fixture(scope='module')
def self_test(tmp_path_factory):
    """`gpu_check.sh --self-test` at toy sizes: the check clean (torch.compile with aot_eager: the same tracing
    as inductor, no code generation), then once per sabotage; (exit status, stdout, stderr, JSON)."""
    out = tmp_path_factory.mktemp('gpu_check') / 'check.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable)
    proc = subprocess.run(['bash', 'scripts/gpu_check.sh', '--device', 'cpu', '--tiny', '--compile-backend',
                           'aot_eager', '--self-test', '--json', str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr, json.loads(out.read_text()) if out.exists() else None


def rows_of(run: list) -> dict:
    return {(r['section'], r['setting']): r for r in run}


def test_clean_check_passes_with_every_row(self_test):
    code, output, err, report = self_test
    assert code == 0 and report['status'] == 0, output[-5000:] + err[-3000:]
    lines = output.strip().splitlines()
    assert lines[0].startswith('GPU check on ') and '(cpu; torch ' in lines[0]
    assert [c.strip() for c in lines[1].split('|')] == ['check', 'setting', 'result', 'ok']
    assert 'clean: 20 of 20 checks passed' in output
    assert lines[-1] == 'self-test passed: the clean check passes, 4 of 4 sabotages caught'

    rows = rows_of(report['runs']['clean'])
    training = {(f'training {m}', s) for m in ('attnscale_small_12', 'featscale_small_12') for s in TRAINING} | {
        ('training attnscale_small_12', 'compile, bfloat16')}
    assert set(rows) == GAIN_ROWS | training | {
        ('DDP', 'gloo, 1 process, float16 + GradScaler'),
        ('DDP', 'gloo, 1 process, float16 + GradScaler, compile after DDP'),
        ('resume', 'float16 + GradScaler, 4 + 4 steps'),
        *(('host syncs per step', p) for p in ('float32', 'bfloat16', 'float16 + GradScaler')),
        ('benchmark.py', 'deit_small_patch16_224, batch 4, bfloat16'),
        ('benchmark.py', 'attnscale_small_12, batch 4, bfloat16')}
    assert all(r['ok'] for k, r in rows.items() if k[0] not in ('host syncs per step', 'benchmark.py'))
    assert all(rows['host syncs per step', p]['ok'] is None for p in ('float32', 'bfloat16', 'float16 + GradScaler'))

    for key in GAIN_ROWS:  # autocast really ran (not zero error), within its stated bound, every AttnScale gain
        n = rows[key]['numbers']
        assert 0 < n['error'] <= n['bound'] == 32 * (2 ** -11 if key[1].endswith(', float16') else 2 ** -8)
        assert f"<= {n['bound']:.1e} (32u)" in rows[key]['result']
        assert n['checked'] == n['gains'] if 'attnscale' in key[1] else n['checked'] < n['gains']
    bf16 = rows['training attnscale_small_12', 'bfloat16']['numbers']
    for key in training:
        n = rows[key]['numbers']
        assert n['steps'] == 8 and n['loss_second_pass'] < n['loss_first_pass'] < 3
        assert n['gain_updating_steps'] == n['optimizer_steps'] and not n['unchanged_gains']
        skipped = 0 if n['loss_scale'] is None else round(math.log2(2 ** 16 / n['loss_scale']))
        assert n['optimizer_steps'] == 8 - skipped
        assert abs(n['loss_first_pass'] - bf16['loss_first_pass']) < 0.02  # the same model and data
    ddp = rows['DDP', 'gloo, 1 process, float16 + GradScaler']
    assert ddp['numbers']['differ_from_plain'] == [] and 'bit for bit the run without DDP' in ddp['result']
    assert rows['resume', 'float16 + GradScaler, 4 + 4 steps']['numbers']['unequal'] == []
    reference = rows['benchmark.py', 'deit_small_patch16_224, batch 4, bfloat16']['numbers']
    ours = rows['benchmark.py', 'attnscale_small_12, batch 4, bfloat16']['numbers']
    assert reference['train_ratio'] == reference['infer_ratio'] == reference['peak_ratio'] == 1.0
    assert ours['params'] == reference['params'] + 2 * 2  # one lambda per head (2) in each of the 2 blocks


@pytest.mark.parametrize('kind', ['zero', 'negate', 'x10', 'nan'])
def test_every_sabotage_fails_the_check(self_test, kind):
    """Each sabotage fails every dL/dλ row, by the amount it must (zeroed: error exactly 1; negated: about 2;
    x10: about 9; NaN: NaN); zeroed and NaN gradients also fail every training row."""
    output, report = self_test[1], self_test[3]
    rows = rows_of(report['runs'][kind])
    assert f"sabotage '{kind}' " in output and 'as they must' in output.split(f"sabotage '{kind}' ")[1].split('\n')[0]
    expected = {'zero': (1., 1e-12), 'negate': (2., 0.1), 'x10': (9., 0.5)}
    for key in GAIN_ROWS:
        error = rows[key]['numbers']['error']
        assert rows[key]['ok'] is False and 'NOT <=' in rows[key]['result']
        assert math.isnan(error) if kind == 'nan' else abs(error - expected[kind][0]) <= expected[kind][1], (key, error)
    training = [r for k, r in rows.items() if k[0].startswith('training') and r['ok'] is not None]
    assert len(training) == 4
    if kind == 'zero':
        assert all(not r['ok'] and 'gains unchanged' in r['result'] for r in training)
    if kind == 'nan':
        for r in training:
            assert not r['ok'] and ('loss is nan' in r['result'] if r['setting'] == 'bfloat16' else
                                    '8 of 8 steps skipped' in r['result'] and 'loss scale 256 < 4096' in r['result'])


def test_exit_status_follows_the_table(tmp_path, capsys):
    """A plain run with one sabotage (x10: AdamW's update does not depend on the gradient's scale, so training
    still passes) exits 1, and exactly the dL/dλ rows say NO."""
    out = tmp_path / 'check.json'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy sizes: a second thread only waits for the first
    try:
        assert gpu_check.main(['--device', 'cpu', '--tiny', '--no-compile', '--no-benchmark', '--sabotage', 'x10',
                               '--models', 'attnscale_small_12', '--fd-entries', '4', '--json', str(out)]) == 1
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    failed = {(r['section'], r['setting']) for r in report['runs']['x10'] if r['ok'] is False}
    assert report['status'] == 1 and failed == GAIN_ROWS
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        '4 of 16 checks passed, 12 FAILED (sabotage x10)')
