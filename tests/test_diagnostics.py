"""Oversmoothing diagnostics: known answers of the metrics, the hook-based probe, and the analyze.py CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diagnostics
import models
from helpers import make_image_folder, run_script

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TINY = dict(img_size=32, patch_size=8)  # 16 patches (+1 class token for DeiT)


def _row_stochastic(*shape):
    return torch.rand(*shape).softmax(dim=-1)


def test_identical_tokens_have_no_high_frequency_and_patch_cosine_one():
    x = torch.randn(3, 1, 16).expand(3, 10, 16)
    torch.testing.assert_close(diagnostics.hf_ratio(x), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(diagnostics.hf_ratio(x, 'total'), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(diagnostics.patch_cosine_similarity(x, num_prefix=1), torch.ones(3))


def test_hf_ratio_known_values():
    # DC token (3, 4) and HF +-(1, 0) over two tokens: ||DC|| = sqrt(2) * 5, ||HF|| = sqrt(2)
    x = torch.tensor([[[4., 4.], [2., 4.]]])
    torch.testing.assert_close(diagnostics.hf_ratio(x), torch.tensor([1 / 5.]))
    torch.testing.assert_close(diagnostics.hf_ratio(x, 'total'), torch.tensor([1 / math.sqrt(26.)]))
    with pytest.raises(ValueError, match='relative_to'):
        diagnostics.hf_ratio(x, 'patch')


def test_patch_cosine_matches_pairwise_definition_and_skips_prefix():
    x = torch.randn(2, 9, 5)
    u = F.normalize(x[:, 1:], dim=-1)
    gram = u @ u.transpose(1, 2)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    expected = gram[:, off_diagonal].mean(dim=1)
    torch.testing.assert_close(diagnostics.patch_cosine_similarity(x, num_prefix=1), expected)
    orthogonal = torch.cat([torch.randn(1, 1, 6), torch.eye(6)[None]], dim=1)  # class token + one-hot patches
    torch.testing.assert_close(diagnostics.patch_cosine_similarity(orthogonal, 1), torch.zeros(1))


def test_token_spectrum_is_relative_to_dc_and_finds_a_pure_frequency():
    n, k = 16, 3
    wave = torch.cos(2 * math.pi * k * torch.arange(n) / n)[None, :, None].expand(1, n, 4) + 2.
    spectrum = diagnostics.token_spectrum(wave)[0]
    freqs = diagnostics.token_frequencies(n)
    assert freqs[n // 2] == 0 and spectrum[n // 2].abs() < 1e-5  # DC in the centre, 0 dB
    peaks = freqs[spectrum > -60.].tolist()
    assert peaks == [-k / n, 0., k / n]
    torch.testing.assert_close(spectrum[freqs == k / n], torch.tensor([20 * math.log10(0.25)]))  # (N/2) / (2N)


def test_uniform_attention_keeps_only_dc():
    n = 17
    response = diagnostics.attention_spectral_response(torch.full((2, 3, n, n), 1. / n))
    dc = n // 2
    torch.testing.assert_close(response[..., dc], torch.ones(2, 3))
    assert response[..., torch.arange(n) != dc].abs().max() < 1e-6


def test_identity_attention_has_a_flat_response():
    response = diagnostics.attention_spectral_response(torch.eye(12).expand(2, 4, 12, 12))
    torch.testing.assert_close(response, torch.ones(2, 4, 12))


def test_attnscale_raises_non_dc_response_by_one_plus_lambda():
    n, lamb = 13, torch.tensor([0.3, 1.0, 2.5])
    attn = _row_stochastic(2, 3, n, n)
    before = diagnostics.attention_spectral_response(attn)
    after = diagnostics.attention_spectral_response(models.attnscale(attn, lamb))
    non_dc = torch.arange(n) != n // 2
    torch.testing.assert_close(after[..., non_dc], before[..., non_dc] * (1 + lamb).view(1, 3, 1))


def test_attention_cosine():
    a = _row_stochastic(2, 3, 10, 10)
    torch.testing.assert_close(diagnostics.attention_cosine(a, a), torch.ones(2))
    b = torch.eye(10).expand(2, 3, 10, 10)
    assert (diagnostics.attention_cosine(a, b) < 0.9).all()


def test_probe_deit_collects_every_layer_and_restores_fused_attn():
    model = models.create_model('attnscale_tiny_12', num_classes=5, **TINY).eval()
    model.blocks[3].attn.fused_attn = False  # a mixed setting must come back as it was
    before = {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, 'fused_attn')}
    images = torch.randn(2, 3, 32, 32)
    probed = diagnostics.probe(model, images)
    assert len(probed['tokens']) == 13 and len(probed['branch']) == 12 and len(probed['attn']) == 12
    assert all(x.shape == (2, 17, 192) for x in probed['tokens'] + probed['branch'])
    assert all(a.shape == (2, 3, 17, 17) for a in probed['attn'])
    torch.testing.assert_close(probed['attn'][0].sum(-1), torch.ones(2, 3, 17))  # lambda = 0: softmax rows
    assert {name: m.fused_attn for name, m in model.named_modules() if hasattr(m, 'fused_attn')} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(probed['logits'], model(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probed['tokens'][1], model.blocks[0](probed['tokens'][0]))


def test_probe_cait_stage_has_patch_tokens_only():
    model = models.create_model('attnscale_cait_XXS24_224', num_classes=5, **TINY).eval()
    probed = diagnostics.probe(model, torch.randn(2, 3, 32, 32))
    assert diagnostics.stage_prefix_tokens(model) == 0
    assert len(probed['tokens']) == 25 and probed['tokens'][0].shape == (2, 16, 192)
    assert probed['attn'][-1].shape == (2, 4, 16, 16)


def test_measure_layers_and_addon_parameters():
    model = models.create_model('featscale_tiny_12', num_classes=5, **TINY)
    with torch.no_grad():
        model.blocks[0].lamb1.copy_(torch.arange(192.) / 191.)
    loader = [(torch.randn(3, 3, 32, 32), torch.zeros(3)), (torch.randn(2, 3, 32, 32), torch.zeros(2))]
    result = diagnostics.measure(model, loader, torch.device('cpu'))
    assert (result['num_images'], result['num_tokens'], result['num_prefix_tokens']) == (5, 17, 1)
    metrics = result['metrics']
    assert metrics['patch_cosine']['layers'] == list(range(13))
    assert metrics['hf_dc_branch']['layers'] == list(range(1, 13))
    assert metrics['attention_cosine']['layers'] == list(range(2, 13))
    assert len(metrics['attention_spectral_response']['values'][0]) == len(result['frequencies']) == 17
    params = diagnostics.addon_parameters(model)
    assert params['attnscale_lambda'] is None and params['featscale_lambda2']['max'] == [0.] * 12
    lamb1 = params['featscale_lambda1']
    assert lamb1['layers'] == list(range(1, 13))
    assert (lamb1['min'][0], lamb1['max'][0]) == (0., 1.) and lamb1['mean'][0] == pytest.approx(0.5)


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), num_classes=3, train_per_class=1, val_per_class=3)


def test_cli_two_models(image_root, tmp_path):
    """The command line `python analyze.py ...`, run in this process (helpers.run_script)."""
    out = tmp_path / 'out'
    argv = ['--model', 'deit_tiny_12', 'attnscale_tiny_12', '--data-path', image_root, '--input-size', '32',
            '--model-kwargs', 'patch_size=8', '--num-images', '5', '--batch-size', '3', '--output_dir', out,
            '--device', 'cpu']
    code, stdout, stderr = run_script(ROOT / 'analyze.py', argv)
    assert code == 0, stderr
    lines = stdout.splitlines()
    pngs = ['hf_ratio.png', 'patch_cosine.png', 'attention_cosine.png', 'feature_spectrum.png',
            'attention_spectrum.png', 'lambda.png']
    for name in ['diagnostics.json'] + pngs:
        assert f'wrote {out / name}' in lines
    for name in pngs:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    for label in ('deit_tiny_12', 'attnscale_tiny_12'):
        assert f'{label}: no checkpoint, analysing the random initialisation (seed 0)' in lines
        assert any(line.startswith(label + ' ') and len(line.split()) == 4 for line in lines)  # table row
    assert lines[-3].split()[0] == 'model'

    report = json.loads((out / 'diagnostics.json').read_text())
    assert report['num_images'] == 5 and [m['label'] for m in report['models']] == ['deit_tiny_12', 'attnscale_tiny_12']
    for entry in report['models']:
        assert entry['checkpoint'] is None and entry['random_init'] and entry['input_size'] == 32
        assert entry['model_kwargs'] == {'patch_size': 8} and entry['depth'] == 12 and entry['num_tokens'] == 17
        m = entry['metrics']
        for key in ('hf_dc_features', 'hf_total_features', 'patch_cosine'):
            assert len(m[key]['values']) == 13
        for key in ('hf_dc_branch', 'hf_total_branch'):
            assert len(m[key]['values']) == 12
        assert len(m['attention_cosine']['values']) == 11
        assert [len(v) for v in m['feature_spectrum_db']['values']] == [17] * 13
        assert [len(v) for v in m['attention_spectral_response']['values']] == [17] * 12
    assert report['models'][0]['addon_params'] == dict(attnscale_lambda=None, featscale_lambda1=None,
                                                       featscale_lambda2=None)
    assert report['models'][1]['addon_params']['attnscale_lambda']['values'] == [[0.] * 3] * 12


def _save_checkpoint(path, lamb):
    model = models.create_model('attnscale_tiny_12', num_classes=3, **TINY)
    with torch.no_grad():
        model.blocks[-1].attn.lamb.copy_(lamb)
    args = dict(model='attnscale_tiny_12', input_size=32, model_kwargs=['patch_size=8'])
    torch.save(dict(model=model.state_dict(), args=args), path)
    return str(path)


def test_cli_checkpoint_defaults_and_errors(image_root, tmp_path, capsys):
    import analyze  # here, not at the top: it needs datasets.py, which the metric tests do not
    ckpt = _save_checkpoint(tmp_path / 'attnscale.pth', torch.tensor([0.5, -0.25, 1.0]))
    common = ['--data-path', str(image_root), '--num-images', '3', '--batch-size', '3', '--device', 'cpu',
              '--output_dir', str(tmp_path / 'out')]
    assert analyze.main(['--resume', ckpt] + common) == 0  # model, input size and kwargs from the checkpoint
    entry = json.loads((tmp_path / 'out' / 'diagnostics.json').read_text())['models'][0]
    assert (entry['model'], entry['checkpoint'], entry['random_init']) == ('attnscale_tiny_12', ckpt, False)
    assert (entry['input_size'], entry['num_classes'], entry['model_kwargs']) == (32, 3, {'patch_size': 8})
    assert entry['addon_params']['attnscale_lambda']['values'][-1] == [0.5, -0.25, 1.0]
    capsys.readouterr()

    for argv, message in (
            (['--model', 'deit_tiny_13'] + common, "unknown model 'deit_tiny_13'"),
            (['--model', 'deit_tiny_12', '--resume', ckpt] + common, 'does not fit'),
            (['--model', 'deit_tiny_12', '--resume', ckpt, ckpt] + common, '2 --resume paths for 1 --model'),
            (['--model', 'deit_tiny_12', '--data-path', str(tmp_path / 'nowhere')], 'does not exist'),
            (['--model', 'deit_tiny_12', '--data-path', str(tmp_path)], 'has no val/ folder')):
        assert analyze.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('analyze.py: error: ') and message in err and err.count('\n') == 1, err
