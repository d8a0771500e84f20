"""scripts/block_benchmark.py: the per-block timing of the add-ons (at toy sizes; the numbers are in
docs/performance.md). The command lines run in this process (helpers.run_script)."""
import json
import subprocess
from pathlib import Path

from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    """`python scripts/block_benchmark.py *args`: exit status, stdout and stderr."""
    code, out, err = run_script(ROOT / 'scripts' / 'block_benchmark.py', args)
    return subprocess.CompletedProcess(['block_benchmark.py', *args], code, out, err)


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


def test_block_ratios_come_with_an_interval_around_their_median(tmp_path):
    out = tmp_path / 'blocks.json'
    assert run('--models', 'deit_tiny_12', 'featscale_tiny_12', '--img-size', '32', '--batch-size', '2',
               '--repeats', '5', '--json', str(out)).returncode == 0
    s = json.loads(out.read_text())['summary']
    assert s['deit_tiny_12']['train']['ci'] == [1.0, 1.0]
    for mode in ('train', 'infer'):
        low, high = s['featscale_tiny_12'][mode]['ci']
        assert low <= s['featscale_tiny_12'][mode]['ratio'] <= high


def test_projections_time_what_each_addon_changes_against_the_plain_projection(tmp_path):
    out = tmp_path / 'projections.json'
    result = run('--models', 'deit_tiny_12', '--projections', '--img-size', '32', '--batch-size', '2',
                 '--repeats', '5', '--json', str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    samples, summary = data['samples'], data['summary']
    assert sorted(samples) == ['attention', 'attention+attnscale', 'block', 'proj', 'proj+featscale']
    for addon, fused, plain in (('AttnScale', 'attention+attnscale', 'attention'), ('FeatScale', 'proj+featscale', 'proj')):
        for mode in ('train', 'infer'):
            s = summary[addon][mode]
            diffs = sorted(1e3 * (a - b) for a, b in zip(samples[fused][mode], samples[plain][mode]))
            assert abs(s['extra_ms'] - diffs[2]) < 1e-9  # median of five paired differences
            assert s['ci'][0] <= s['extra_ms'] <= s['ci'][1]
            block_ms = 1e3 * sorted(samples['block'][mode])[2]
            assert abs(s['fraction'] - s['extra_ms'] / block_ms) < 1e-9
    rows = [line.split(' | ')[:2] for line in result.stdout.splitlines()[3:7]]
    assert rows == [['AttnScale', 'train'], ['AttnScale', 'infer'], ['FeatScale', 'train'], ['FeatScale', 'infer']]


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'scripts'))
    import block_benchmark
    return block_benchmark


def test_projection_units_apply_the_addon_to_the_blocks_weights(monkeypatch):
    import torch
    block_benchmark = _script(monkeypatch)
    blocks, (tokens, dim) = block_benchmark.middle_blocks(['deit_tiny_12'], 32)
    units = block_benchmark.projection_units('deit_tiny_12', blocks['deit_tiny_12'])
    heads = blocks['deit_tiny_12'].attn.num_heads
    lamb = torch.linspace(-0.2, 0.3, heads)
    lamb1, lamb2 = torch.linspace(-0.5, 0.5, dim), torch.linspace(0.4, -0.1, dim)
    with torch.no_grad():
        units['attention+attnscale'].lamb.copy_(lamb)
        units['proj+featscale'].lamb1.copy_(lamb1)
        units['proj+featscale'].lamb2.copy_(lamb2)
    z = torch.randn(2, tokens, dim)
    attn = blocks['deit_tiny_12'].attn
    torch.testing.assert_close(units['attention'](z), attn(z), rtol=0, atol=0)
    q, k, v = attn.qkv(z).reshape(2, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(-1)
    a = 1. / tokens + (1. + lamb.view(heads, 1, 1)) * (a - 1. / tokens)  # AttnScale on the map, written out
    torch.testing.assert_close(units['attention+attnscale'](z), attn.proj((a @ v).transpose(1, 2).flatten(2)))
    y = units['proj'](z)
    dc = y.mean(dim=1, keepdim=True)
    expected = y + lamb1 * dc + lamb2 * (y - dc)  # FeatScale, s = 1
    torch.testing.assert_close(units['proj+featscale'](z), expected)
    with torch.no_grad():
        torch.testing.assert_close(units['proj+featscale'](z), expected)


def test_interval_is_reproducible_and_widens_with_the_scatter(monkeypatch):
    interval = _script(monkeypatch).interval
    assert interval([2.5] * 9) == [2.5, 2.5]
    tight = [1. + 0.001 * ((7 * i) % 11 - 5) for i in range(40)]
    loose = [1. + 0.01 * ((7 * i) % 11 - 5) for i in range(40)]
    assert interval(tight) == interval(list(tight))
    low, high = interval(tight)
    assert low < 1. < high and interval(loose)[1] - interval(loose)[0] > 5 * (high - low)


def test_projections_refuse_an_addon_block_and_several_models():
    result = run('--models', 'attnscale_tiny_12', '--projections', '--repeats', '1')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: --projections takes the projections of a plain ViT/DeiT block, which attnscale_tiny_12 has not; '
        'give a ViT/DeiT model without an add-on, e.g. --models deit_small_patch16_224']
    result = run('--models', 'deit_tiny_12', 'attnscale_tiny_12', '--projections', '--repeats', '1')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: --projections times one reference block; give one model, e.g. --models deit_small_patch16_224']
