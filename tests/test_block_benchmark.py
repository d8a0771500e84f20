"""scripts/block_benchmark.py: the per-block timing of the add-ons (at toy sizes; the numbers are in
docs/performance.md)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / 'scripts' / 'block_benchmark.py'), *args],
                          capture_output=True, text=True, timeout=300)


def test_pairs_samples_with_the_reference_and_reads_the_block_input_shape(tmp_path):
    out = tmp_path / 'blocks.json'
    result = run('--models', 'deit_tiny_12', 'attnscale_tiny_12', 'featscale_cait_XXS24_224', '--img-size', '32',
                 '--batch-size', '2', '--repeats', '3', '--json', str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data['tokens'] == 5  # 4 patches + class token; the (first) reference sets the shape
    assert all(len(modes[m]) == 3 for modes in data['samples'].values() for m in ('train', 'infer'))
    ref = data['summary']['deit_tiny_12']
    assert ref['train']['ratio'] == ref['infer']['ratio'] == 1.0
    for name, s in data['summary'].items():
        ratios = sorted(a / b for a, b in zip(data['samples'][name]['train'], data['samples']['deit_tiny_12']['train']))
        assert s['train']['ratio'] == ratios[1]  # median of three paired ratios
    rows = [line.split(' | ')[0] for line in result.stdout.splitlines()]
    assert rows[3:6] == ['deit_tiny_12', 'attnscale_tiny_12', 'featscale_cait_XXS24_224']


def test_cait_blocks_see_the_patch_tokens_only(tmp_path):
    out = tmp_path / 'cait.json'
    assert run('--models', 'cait_XXS24_224', '--img-size', '32', '--batch-size', '1', '--repeats', '1',
               '--amp', 'bfloat16', '--json', str(out)).returncode == 0
    assert json.loads(out.read_text())['tokens'] == 4


def test_models_without_vit_blocks_are_refused_in_one_line():
    result = run('--models', 'swin_tiny_patch4_window7_224', '--repeats', '1')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: swin_tiny_patch4_window7_224 has no `blocks` of self-attention (ViT/DeiT/CaiT only); '
        'time Swin with benchmark.py instead']


def test_unknown_model_names_are_one_line_with_the_close_names():
    result = run('--models', 'deit_smal_12', '--repeats', '1')
    assert result.returncode == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: unknown model 'deit_smal_12'; closest: deit_small_12")
