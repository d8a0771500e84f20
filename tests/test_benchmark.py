"""benchmark.py end to end in tiny configurations: table layout and JSON fields, never timings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark
import models  # noqa: F401  (registers the model names)

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--models', 'deit_tiny_12', 'attnscale_tiny_12', '--model-kwargs', 'depth=2', '--img-size', '32',
        '--batch-size', '2', '--rounds', '2', '--warmup', '1', '--steps', '2', '--threads', '1']


RUNS = {  # name: arguments; the three runs start together (a module fixture) to keep the suite fast
    'memory': [*TINY, '--json', '{tmp}/memory.json'],
    'no_memory': [*TINY, '--no-memory', '--reference', 'attnscale_tiny_12', '--dtype', 'float32', 'bfloat16',
                  '--json', '{tmp}/no_memory.json'],
    'data': ['--data', '--data-images', '3', '--data-passes', '1', '--target-imgs-per-s', '100', '400',
             '--json', '{tmp}/data.json'],
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """{run name: (stdout, JSON payload)} of benchmark.py, each in a fresh interpreter, run concurrently."""
    tmp = tmp_path_factory.mktemp('bench')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / 'benchmark.py'), *(a.format(tmp=tmp) for a in args)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)
             for name, args in RUNS.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f'{name}: {stderr[-3000:]}'
        results[name] = stdout, json.loads((tmp / f'{name}.json').read_text())
    return results


def table(stdout: str) -> tuple:
    """(header cells, {model: row cells}) of the printed table."""
    lines = [ln for ln in stdout.splitlines() if ' | ' in ln]
    cells = [[c.strip() for c in ln.split(' | ')] for ln in lines]
    return cells[0], {row[0].rstrip(' *'): row for row in cells[1:]}


@pytest.mark.slow
def test_models_with_memory(runs):
    stdout, payload = runs['memory']
    header, rows = table(stdout)
    assert header == ['model', 'params (M)', 'train ms/step median (min-max)', 'train x', 'train x cpu',
                      'infer img/s median (min-max)', 'infer x', 'infer x cpu', 'peak MB', 'mem x', 'tensor MB',
                      'tensor x', 'saved MB', 'saved x']
    assert set(rows) == {'deit_tiny_12', 'attnscale_tiny_12'}
    assert rows['deit_tiny_12'][0] == 'deit_tiny_12 *'  # the first model is the default reference
    assert {rows['deit_tiny_12'][i] for i in (3, 4, 6, 7, 9, 11)} == {'1.000'} and rows['deit_tiny_12'][13] == '1.0000'
    assert 'batch 2, 32 px, 2 rounds x 2 steps' in stdout

    assert set(payload) == {'config', 'environment', 'rounds_done', 'raw', 'summary'}
    assert payload['rounds_done'] == 2
    assert payload['config']['reference'] == 'deit_tiny_12'
    assert {'torch', 'timm', 'threads', 'cpu_count', 'device'} <= set(payload['environment'])
    for name in ('deit_tiny_12', 'attnscale_tiny_12'):
        raw, summary = payload['raw'][name], payload['summary'][name]
        for kind in ('train_s', 'infer_s', 'train_cpu_s', 'infer_cpu_s'):  # every sample kept: rounds x steps
            assert len(raw[kind]) == 2 and all(len(r) == 2 for r in raw[kind])
        assert raw['memory']['peak_mb'] >= raw['memory']['baseline_rss_mb'] > 0
        assert raw['memory']['peak_mb'] > raw['memory']['tensor_peak_mb'] > 0  # RSS includes the interpreter
        assert set(summary) == {'model', 'dtype', 'attn_path', 'params', 'train_ms', 'train_ratio', 'train_cpu_ratio',
                                'infer_imgs_per_s', 'infer_ratio', 'infer_cpu_ratio', 'peak_mb', 'peak_ratio',
                                'tensor_peak_mb', 'tensor_peak_ratio', 'saved_bytes', 'saved_ratio'}
        assert set(summary['train_ms']) == set(summary['infer_imgs_per_s']) == {'median', 'min', 'max'}
    assert payload['summary']['deit_tiny_12']['train_ratio'] == 1.0
    assert payload['summary']['attnscale_tiny_12']['params'] == payload['summary']['deit_tiny_12']['params'] + 2 * 3


@pytest.mark.slow
def test_models_without_memory_two_dtypes_other_reference(runs):
    stdout, payload = runs['no_memory']
    header, rows = table(stdout)
    assert 'peak MB' not in header and len(header) == 8
    assert set(rows) == {f'{m}@{d}' for m in ('deit_tiny_12', 'attnscale_tiny_12') for d in ('float32', 'bfloat16')}
    assert rows['attnscale_tiny_12@float32'][0] == 'attnscale_tiny_12@float32 *'
    assert 'dtype float32/bfloat16' in stdout
    summary = payload['summary']
    assert payload['config']['reference'] == 'attnscale_tiny_12@float32'
    assert summary['attnscale_tiny_12@float32']['infer_ratio'] == 1.0
    assert 'peak_mb' not in summary['deit_tiny_12@float32']
    assert summary['deit_tiny_12@bfloat16']['dtype'] == 'bfloat16'


@pytest.mark.slow
def test_data_mode(runs):
    stdout, payload = runs['data']
    header, rows = table(stdout)
    assert header == ['transform', 'img/s per worker median (min-max)', 'img/s per CPU-s', 'workers @ 100 img/s',
                      'workers @ 400 img/s']
    assert set(rows) == {'decode only', 'train', 'eval'}
    assert payload['config']['transform_args']['aa'] == 'rand-m9-mstd0.5-inc1'
    for split in ('decode only', 'train', 'eval'):
        s = payload['summary'][split]
        assert len(payload['raw'][split]['imgs_per_s']) == len(payload['raw'][split]['imgs_per_cpu_s']) == 1
        assert s['imgs_per_s']['median'] > 0 and s['imgs_per_cpu_s']['median'] > 0
        assert s['workers_needed']['400.0'] >= s['workers_needed']['100.0'] >= 1


@pytest.mark.parametrize('argv,message', [
    (['--dtype', 'float16', '--device', 'cpu'], 'float16 needs CUDA'),
    (['--models', 'deit_tiny_12', '--reference', 'deit_small_12', '--device', 'cpu'], 'not one of --models'),
    (['--compile', '--warmup', '0', '--device', 'cpu'], '--warmup >= 1'),
    (['--attn-path', 'fused', 'fused', '--device', 'cpu'], '--attn-path lists a value twice'),
    (['--cost-changes'], '--cost-changes lists the ops behind a --cost prediction: add --cost h100'),
])
def test_bad_options_fail_fast(argv, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.check_args(benchmark.get_args_parser().parse_args(argv))


def test_attention_path_axis_labels_rows_and_switches_every_attention():
    args = benchmark.get_args_parser().parse_args(
        ['--models', 'deit_tiny_12', 'attnscale_tiny_12', '--attn-path', 'fused', 'explicit', '--device', 'cpu',
         '--model-kwargs', 'depth=2', '--img-size', '32', '--num-classes', '10'])
    labels = benchmark.variants(args)
    assert labels['attnscale_tiny_12@explicit'] == ('attnscale_tiny_12', 'float32', 'explicit')
    assert list(labels) == ['deit_tiny_12@fused', 'attnscale_tiny_12@fused', 'deit_tiny_12@explicit',
                            'attnscale_tiny_12@explicit']
    assert benchmark.reference_label(args) == 'deit_tiny_12@fused'
    for path, fused in (('fused', True), ('explicit', False)):
        model, _, _ = benchmark.build('attnscale_tiny_12', args, torch.device('cpu'), 'float32', path)
        switches = [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')]
        assert switches == [fused, fused]  # one per block


def test_explicit_attention_keeps_a_map_per_block_that_fused_does_not():
    """The explicit path keeps each block's N x N attention map for backward (the softmax's output, which the
    product with v keeps too); the fused path keeps none, only its kernel's log-sum-exp per row (N). AttnScale
    keeps the same on either path."""
    args = benchmark.get_args_parser().parse_args(['--batch-size', '2', '--img-size', '32', '--num-classes', '10',
                                                   '--device', 'cpu', '--model-kwargs', 'depth=2', 'patch_size=8'])
    x, y = benchmark.make_batch(args, torch.device('cpu'))
    saved = {(name, path): benchmark.saved_bytes(benchmark.build(name, args, torch.device('cpu'), 'float32', path)[0],
                                                 x, y, torch.float32)
             for name in ('deit_tiny_12', 'attnscale_tiny_12') for path in ('fused', 'explicit')}
    n = (32 // 8) ** 2 + 1  # tokens
    maps, rows = 2 * 2 * 3 * n * n * 4, 2 * 2 * 3 * n * 4  # blocks x batch x heads x N (x N) float32
    for name in ('deit_tiny_12', 'attnscale_tiny_12'):
        assert saved[name, 'explicit'] - saved[name, 'fused'] == maps - rows


@pytest.mark.parametrize('amp', [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_are_exact_and_addons_cost_only_token_means(amp):
    """Activations saved for backward, to the byte: AttnScale keeps one float32 token mean of v per block
    (B x C); FeatScale the float32 token means of its projection's input and output and lamb1 - lamb2
    (B x C, B x C, C). The gains act through the projection's weight, kept in its product's dtype, as the
    plain projection keeps it (under autocast: a bfloat16 copy either way)."""
    args = benchmark.get_args_parser().parse_args(['--batch-size', '3', '--img-size', '32', '--num-classes', '10',
                                                   '--model-kwargs', 'depth=2', 'patch_size=8', '--device', 'cpu'])
    x, y = benchmark.make_batch(args, torch.device('cpu'))
    saved = {name: benchmark.saved_bytes(benchmark.build(name, args, torch.device('cpu'), 'float32')[0], x, y, amp)
             for name in ('deit_tiny_12', 'attnscale_tiny_12', 'featscale_tiny_12')}
    B, C, depth = 3, 192, 2
    assert saved['attnscale_tiny_12'] - saved['deit_tiny_12'] == depth * B * C * 4
    assert saved['featscale_tiny_12'] - saved['deit_tiny_12'] == depth * (2 * B * C + C) * 4
    model = benchmark.build('deit_tiny_12', args, torch.device('cpu'), 'float32')[0]
    assert benchmark.saved_bytes(model, x, y, amp) == saved['deit_tiny_12']  # deterministic


TINY = ['--model-kwargs', 'depth=2', 'patch_size=8']
EXPLICIT_MAPS = [('cait_XXS24_224', 32, TINY, torch.float32), ('cait_XXS24_224', 32, TINY, torch.bfloat16),
                 ('deit_tiny_12', 32, TINY, torch.float32), ('swin_tiny_patch4_window7_224', 56, [], torch.float32)]


@pytest.mark.parametrize('base,img_size,extra,amp', EXPLICIT_MAPS, ids=[f'{m[0]}-{m[3]}' for m in EXPLICIT_MAPS])
def test_attnscale_on_explicit_maps_keeps_no_extra_map(base, img_size, extra, amp):
    """On the explicit attention path AttnScale acts through the projection, so the map the product with v keeps
    is the plain model's: the add-on keeps no N x N map, only DC[v] per attention (B_ x C float32)."""
    args = benchmark.get_args_parser().parse_args(['--batch-size', '2', '--img-size', str(img_size),
                                                   '--num-classes', '10', '--device', 'cpu', *extra])
    x, y = benchmark.make_batch(args, torch.device('cpu'))
    prefix = 'attnscale_' + ('tiny_12' if base == 'deit_tiny_12' else base)
    models_ = [benchmark.build(name, args, torch.device('cpu'), 'float32', 'explicit')[0] for name in (base, prefix)]
    saved = [benchmark.saved_bytes(model, x, y, amp) for model in models_]
    means = []
    for attn in (m for m in models_[1].modules() if getattr(m, 'lamb', None) is not None):
        attn.register_forward_pre_hook(lambda m, args: means.append(args[0].shape[0] * m.qkv.out_features // 3 * 4))
    models_[1](x)
    assert saved[0] > 0 and saved[1] - saved[0] == sum(means) > 0


def test_swin_attnscale_saved_bytes_are_token_means_on_the_fused_path():
    """Swin's fused AttnScale keeps one float32 window mean of v per window and head beyond plain Swin:
    B_ x H x d per attention."""
    args = benchmark.get_args_parser().parse_args(['--batch-size', '2', '--img-size', '56', '--num-classes', '10',
                                                   '--device', 'cpu'])
    x, y = benchmark.make_batch(args, torch.device('cpu'))
    saved, means = {}, []
    for name in ('swin_tiny_patch4_window7_224', 'attnscale_swin_tiny_patch4_window7_224'):
        model = benchmark.build(name, args, torch.device('cpu'), 'float32', attn_path='fused')[0]
        saved[name] = benchmark.saved_bytes(model, x, y, torch.float32)
    for attn in (m for m in model.modules() if isinstance(m, models.plugin.SwinWindowAttention)):
        attn.register_forward_pre_hook(lambda m, args: means.append(args[0].shape[0] * m.qkv.out_features // 3 * 4))
    model(x)
    assert len(means) == 12 and saved[name] - saved['swin_tiny_patch4_window7_224'] == sum(means)


def test_tensor_peak_counts_live_storage():
    with benchmark.TensorPeak() as tracker:
        a, b = torch.empty(1000), torch.empty(1000)  # 4000 bytes each, alive together
        del a, b
        c = torch.empty(500)
    assert tracker.peak == 8000 and tracker.live == 2000
    del c
    assert tracker.live == 0


def test_memory_only_run_describes_itself():
    args = benchmark.get_args_parser().parse_args(['--no-train', '--no-infer', '--device', 'cpu', '--memory-steps', '2'])
    line = benchmark.describe(args, dict(device='cpu', torch='2.x', threads=2, cpu_count=2))
    assert 'memory only, 2 training steps' in line and 'rounds' not in line


def test_swin_featscale_saved_bytes_are_token_means():
    """Swin's FeatScale, fused with the output projection after the windows are merged, keeps the float32 token
    means of the projection's input and output per block (B x C each) and lamb1 - lamb2 (C) beyond plain Swin:
    not y."""
    args = benchmark.get_args_parser().parse_args(['--batch-size', '2', '--img-size', '56', '--num-classes', '10',
                                                   '--device', 'cpu'])
    x, y = benchmark.make_batch(args, torch.device('cpu'))
    plain, featscale = (benchmark.build(name, args, torch.device('cpu'), 'float32')[0]
                        for name in ('swin_tiny_patch4_window7_224', 'featscale_swin_tiny_patch4_window7_224'))
    blocks = models.plugin.self_attention_blocks(featscale)
    means = sum((2 * 2 + 1) * b.attn.proj.in_features * 4 for b in blocks)  # 2 B x C + C float32 per block
    assert len(blocks) == 12
    assert benchmark.saved_bytes(featscale, x, y, torch.float32) - benchmark.saved_bytes(plain, x, y, torch.float32) \
        == means
