"""The helper scripts fail one way, through cli.one_line_errors: one `<script>: error:` line, a non-zero exit, no
traceback; export_weights.py never overwrites an export and exports --addon checkpoints as documented."""
import importlib.util
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import analyze
import benchmark
import cli
import models
from failures import assert_one_error, snapshot

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_weights = load_script('export_weights')
prepare_imagenet = load_script('prepare_imagenet')


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('not weights\n')
    return path


def test_the_four_scripts_fail_in_one_line(tmp_path, text_file, capsys):
    (tmp_path / 'data' / 'val' / 'a').mkdir(parents=True)
    cases = (
        (export_weights.main, 'export_weights.py', ['--checkpoint', str(text_file), '--output', str(tmp_path / 'x')],
         2, rf'{text_file} is not a PyTorch checkpoint \(it is a text file\)'),
        (analyze.main, 'analyze.py', ['--resume', str(text_file), '--data-path', str(tmp_path / 'data')],
         2, rf'{text_file} is not a PyTorch checkpoint \(it is a text file\)'),
        (benchmark.main, 'benchmark.py', ['--models', 'deit_tiny_13', '--no-memory'],
         2, r"unknown model 'deit_tiny_13'; closest: deit_tiny_12"),
        (benchmark.main, 'benchmark.py', ['--dtype', 'float16'], 2, r'--dtype float16 needs CUDA'),
        (prepare_imagenet.main, 'prepare_imagenet.py', ['--archives', str(tmp_path), '--output', str(text_file)],
         2, rf'{text_file}: File exists|{text_file}: Not a directory'),
    )
    before = snapshot(tmp_path)
    for main, prog, argv, status, expected in cases:
        code = main(argv)
        assert_one_error(code, capsys.readouterr().err, expected, status=status, prefix=f'{prog}: error: ')
    assert snapshot(tmp_path) == before


def test_an_unexpected_exception_is_one_line_naming_its_class(capsys):
    @cli.one_line_errors('tool.py')
    def main(argv=None):
        return {}['missing']
    assert main([]) == 1
    assert capsys.readouterr().err == "tool.py: error: KeyError: 'missing'\n"


# ---------------------------------------------------------------------------------------------------------------
# export_weights.py
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def addon_checkpoint(tmp_path):
    """A main.py checkpoint of timm's ViT trained with --addon attnscale, with trained gains and class names."""
    model = models.create_model('vit_tiny_patch16_224', addon='attnscale', img_size=32, patch_size=8, depth=2,
                                num_classes=3).eval()
    with torch.no_grad():
        model.blocks[1].attn.lamb.copy_(torch.tensor([0.5, -0.25, 1.0]))
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': model.state_dict(), 'classes': ['cat', 'dog', 'emu'],
                'args': {'model': 'vit_tiny_patch16_224', 'addon': 'attnscale', 'input_size': 32,
                         'model_kwargs': ['patch_size=8', 'depth=2']}}, path)
    return path, model


def test_export_of_an_addon_checkpoint_records_the_addon(addon_checkpoint, tmp_path, capsys):
    path, model = addon_checkpoint
    out = tmp_path / 'exported'
    assert export_weights.main(['--checkpoint', str(path), '--output', str(out)]) == 0
    assert 'vit_tiny_patch16_224 with attnscale, 3 classes' in capsys.readouterr().out
    config = json.loads((out / 'config.json').read_text())
    assert (config['architecture'], config['addon'], config['label_names']) == ('vit_tiny_patch16_224', 'attnscale',
                                                                                ['cat', 'dog', 'emu'])
    reloaded = models.create_model(config['architecture'], addon=config['addon'], **config['model_args']).eval()
    reloaded.load_state_dict(safetensors.torch.load_file(out / 'model.safetensors'))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded(x), model(x))


def test_export_never_overwrites(addon_checkpoint, tmp_path, capsys):
    path, _ = addon_checkpoint
    out = tmp_path / 'exported'
    assert export_weights.main(['--checkpoint', str(path), '--output', str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    code = export_weights.main(['--checkpoint', str(path), '--output', str(out), '--addon', 'attnscale'])
    assert_one_error(code, capsys.readouterr().err, rf'--output {out} is not empty \(config\.json, '
                                                    r'model\.safetensors\); fix: pass a new folder',
                     prefix='export_weights.py: error: ')
    assert snapshot(out) == before
