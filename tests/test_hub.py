"""Released weights through timm's `pretrained=True`, offline, from a local Hugging Face cache laid out exactly as the
`huggingface_hub` client writes it (refs/main, snapshots/<revision>/<file> linking into blobs/), holding small but
correctly keyed checkpoints under the real file names, in each wrapping a released file may have."""
import argparse
import hashlib
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from timm.layers import resample_abs_pos_embed

import models
from helpers import free_port, make_image_folder
from helpers import run_main as run_main_here
from models.checkpoint import CheckpointError
from models.hub import HF_HUB_ID, RELEASED

ROOT = Path(__file__).resolve().parents[1]
REVISION = '0123456789abcdef0123456789abcdef01234567'
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)  # real keys, fewer blocks
TINY_CLI = ['--model-kwargs', 'patch_size=8', 'depth=2', 'embed_dim=48', 'num_heads=2', '--input-size', '32']
WRAPPINGS = ('bare', 'model', 'state_dict', 'module', 'training')


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub read it at import: its constant is set too) and for the
    subprocesses, and no socket may connect anywhere: nothing in these tests reaches the network."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)

    def refuse(sock, address):
        raise AssertionError(f'a test tried to connect to {address}')
    monkeypatch.setattr(socket.socket, 'connect', refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, selected by HF_HUB_CACHE (environment and huggingface_hub's constant)."""
    root = tmp_path / 'hf-cache'
    root.mkdir()
    monkeypatch.setenv('HF_HUB_CACHE', str(root))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(root))
    return root


def publish(cache_root: Path, repo_id: str, files: dict) -> Path:
    """Write `{filename: checkpoint}` into the cache as `hf_hub_download` leaves a download: the content in
    blobs/<sha256>, a relative link to it in snapshots/<revision>/, the revision in refs/main. Returns the
    snapshot folder."""
    repo = cache_root / f'models--{repo_id.replace("/", "--")}'
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(REVISION)  # the client writes the bare hash, no newline
    snapshot = repo / 'snapshots' / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for filename, ckpt in files.items():
        staged = repo / 'blobs' / 'incoming'
        if filename.endswith('.safetensors'):
            import safetensors.torch
            safetensors.torch.save_file(ckpt, staged)
        else:
            torch.save(ckpt, staged)
        blob = repo / 'blobs' / hashlib.sha256(staged.read_bytes()).hexdigest()
        staged.replace(blob)
        (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def wrap(state: dict, wrapping: str, name: str) -> dict:
    """`state` as a released file may hold it."""
    if wrapping == 'bare':
        return state
    if wrapping == 'module':  # saved from a DistributedDataParallel model
        return {'model': {f'module.{k}': v for k, v in state.items()}}
    if wrapping == 'state_dict':
        return {'state_dict': state}
    ckpt = {'model': state}
    if wrapping == 'training':  # the official main.py's checkpoint, with its pickled Namespace
        ckpt.update(model_ema={k: v + 1 for k, v in state.items()}, optimizer={'state': {}, 'param_groups': []},
                    lr_scheduler={'last_epoch': 299}, epoch=299, scaler=None, max_accuracy=79.8,
                    args=argparse.Namespace(model=name, input_size=224, batch_size=256))
    return ckpt


def released_states(seed: int = 1) -> dict:
    """{model name: freshly initialised tiny weights} for the four released variants."""
    torch.manual_seed(seed)
    return {name: models.create_model(name, **TINY).state_dict() for name in RELEASED}


def assert_same_tensors(model, state):
    own = model.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_the_four_released_variants_carry_their_hub_location():
    for name, filename in RELEASED.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (HF_HUB_ID, filename)
    assert set(timm.list_models(pretrained=True)) & set(models.list_variants()) == set(RELEASED)
    assert RELEASED['attnscale_cait_XXS24_224'] == 'attnscale_cait_xxs24_224.pth'


@pytest.mark.parametrize('wrapping', WRAPPINGS)
def test_pretrained_loads_exactly_the_released_tensors(wrapping, cache):
    states = released_states()
    snapshot = publish(cache, HF_HUB_ID, {RELEASED[n]: wrap(s, wrapping, n) for n, s in states.items()})
    for name, state in states.items():
        model = timm.create_model(name, pretrained=True, **TINY)
        assert_same_tensors(model, state)  # the `model` weights, never the EMA copy of a training checkpoint
        assert 'state_dict' not in model.pretrained_cfg
        local_copy = dict(file=str(snapshot / RELEASED[name]))
        local = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=local_copy, **TINY)
        assert_same_tensors(local, state)  # a local copy of the file loads the same weights


@pytest.mark.slow
def test_the_real_user_path_reads_the_environment_variables(cache):
    """A fresh process with only HF_HUB_OFFLINE and HF_HUB_CACHE set (huggingface_hub reads them at import)."""
    state = released_states()['featscale_cait_XXS24_224']
    publish(cache, HF_HUB_ID, {RELEASED['featscale_cait_XXS24_224']: wrap(state, 'training', 'x')})
    torch.save(state, cache.parent / 'expected.pth')
    code = ('import torch, timm, models; '
            f'm = timm.create_model("featscale_cait_XXS24_224", pretrained=True, **{TINY!r}); '
            f'e = torch.load("{cache.parent / "expected.pth"}"); '
            'print(all(torch.equal(v, e[k]) for k, v in m.state_dict().items()) and m.state_dict().keys() == e.keys())')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'True'


def test_another_class_count_and_input_size_reinitialise_the_head_and_resize_pos_embed(cache):
    state = released_states()['attnscale_small_12']
    publish(cache, HF_HUB_ID, {'attnscale_small_12.pth': {'model': state}})
    torch.manual_seed(5)
    model = models.create_model('attnscale_small_12', pretrained=True, **dict(TINY, img_size=64, num_classes=4))
    own = model.state_dict()
    assert own['head.weight'].shape == (4, 48) and own['head.bias'].shape == (4,)
    expected = resample_abs_pos_embed(state['pos_embed'], new_size=(8, 8), num_prefix_tokens=1)
    assert own['pos_embed'].shape == (1, 65, 48) and torch.equal(own['pos_embed'], expected)
    for k in state.keys() - {'head.weight', 'head.bias', 'pos_embed'}:
        assert torch.equal(own[k], state[k]), k
    assert models.hub.describe_start(model) == (
        f'Starting from the pretrained weights {HF_HUB_ID}/attnscale_small_12.pth; head re-initialised for 4 '
        'classes (the weights have 1000); position embedding resized from 224 px to 64 px')


def test_weights_neither_cached_nor_reachable_fail_in_one_line(cache):
    publish(cache, HF_HUB_ID, {'attnscale_small_12.pth': released_states()['attnscale_small_12']})
    for create in (timm.create_model, models.create_model):
        with pytest.raises(ValueError) as e:
            create('featscale_cait_XXS24_224', pretrained=True, **TINY)
        msg = str(e.value)
        assert '\n' not in msg
        assert msg.startswith(f'featscale_cait_XXS24_224: pretrained weights {HF_HUB_ID}/featscale_cait_xxs24_224.pth '
                              f'are not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 is set;')
        assert 'HF_HUB_CACHE' in msg and f'hf download {HF_HUB_ID} featscale_cait_xxs24_224.pth' in msg


def test_a_name_without_released_weights_names_the_four_that_have_them():
    with pytest.raises(ValueError) as e:
        timm.create_model('attnscale_small_24', pretrained=True)
    assert str(e.value) == (
        'attnscale_small_24 has no released weights; pretrained=True loads them for attnscale_small_12, '
        'featscale_small_12, attnscale_cait_XXS24_224, featscale_cait_XXS24_224 '
        '(or give a checkpoint: pretrained_cfg_overlay=dict(file=<path>), main.py --finetune <path>)')


def test_a_file_for_another_model_fails_with_the_key_report(cache, tmp_path):
    states = released_states()
    publish(cache, HF_HUB_ID, {'attnscale_small_12.pth': {'model': states['featscale_small_12']}})
    with pytest.raises(CheckpointError) as e:
        timm.create_model('attnscale_small_12', pretrained=True, **TINY)
    msg = str(e.value)
    assert msg.startswith(f'pretrained weights {HF_HUB_ID}/attnscale_small_12.pth does not fit DeiT (2 missing: '
                          'blocks.0.attn.lamb, blocks.1.attn.lamb; 4 unexpected: blocks.0.lamb1')
    assert '\n' not in msg
    with pytest.raises(CheckpointError, match=r'pretrained file \S+/absent.pth does not exist'):
        timm.create_model('attnscale_small_12', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'absent.pth')))


def test_torch_hub_load_pretrained(cache):
    state = released_states()['featscale_small_12']
    publish(cache, HF_HUB_ID, {'featscale_small_12.pth': wrap(state, 'module', 'x')})
    model = torch.hub.load(str(ROOT), 'featscale_small_12', source='local', pretrained=True, **TINY)
    assert_same_tensors(model, state)


def test_timm_model_pretrained_from_the_cache(cache):
    """timm's own weights of a timm model (the base of `--addon ... --pretrained`) come from the same cache."""
    torch.manual_seed(2)
    kwargs = dict(depth=2, num_classes=10)
    source = timm.create_model('vit_tiny_patch16_224', **kwargs).state_dict()
    cfg = timm.models.get_pretrained_cfg('vit_tiny_patch16_224')
    publish(cache, cfg.hf_hub_id, {'model.safetensors': source})
    model = models.create_model('vit_tiny_patch16_224', pretrained=True, img_size=32, **kwargs)
    own = model.state_dict()
    assert own['pos_embed'].shape == (1, 5, 192)
    for k in source.keys() - {'pos_embed', 'head.weight', 'head.bias'}:
        assert torch.equal(own[k], source[k]), k
    assert own['head.weight'].shape == (10, 192)  # the weights have 1000 classes in timm's cfg: a new head


# ---------------------------------------------------------------- main.py --pretrained

def run_main(args, env, launcher=False):
    cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=1', '--master_port', str(free_port()),
           '--use_env', 'main.py'] if launcher else [sys.executable, 'main.py']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **env)
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


EVAL = ['--eval', '--device', 'cpu', '--batch-size', '64', '--num_workers', '0', '--data-set', 'IMNET',
        '--eval-crop-ratio', '1.0', *TINY_CLI]


@pytest.mark.slow
def test_main_pretrained_eval_through_the_launcher(cache, tmp_path):
    """Released weights whose head predicts class 0 with logit 5 and 0 for the other 999 give a known loss."""
    state = released_states()['attnscale_small_12']
    state['head.weight'] = torch.zeros_like(state['head.weight'])
    state['head.bias'] = torch.zeros_like(state['head.bias'])
    state['head.bias'][0] = 5.
    publish(cache, HF_HUB_ID, {'attnscale_small_12.pth': wrap(state, 'training', 'attnscale_small_12')})
    data = make_image_folder(tmp_path / 'data', num_classes=1000, train_per_class=1, val_per_class=1, size=16)
    env = {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(cache)}
    proc = run_main(['--model', 'attnscale_small_12', '--pretrained', '--data-path', data, *EVAL], env, launcher=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f'Starting from the pretrained weights {HF_HUB_ID}/attnscale_small_12.pth; position embedding resized '
            'from 224 px to 32 px') in proc.stdout
    acc1, loss = re.findall(r'\* Acc@1 ([\d.]+) Acc@5 [\d.]+ loss ([\d.]+)', proc.stdout)[-1]
    assert float(acc1) == 0.1  # the one image of class 0
    assert float(loss) == pytest.approx(math.log(math.exp(5) + 999) - 5 / 1000, abs=1e-3)


def test_main_pretrained_errors_are_one_line(cache, tmp_path):
    """In this process (helpers.run_main), offline and with the cache set as the fixtures set them."""
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=1, val_per_class=1, size=16)
    code, _, err = run_main_here(['--model', 'featscale_small_12', '--pretrained', '--data-path', data, *EVAL])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert (f'featscale_small_12: pretrained weights {HF_HUB_ID}/featscale_small_12.pth are not in the Hugging Face '
            f'cache {cache} and HF_HUB_OFFLINE=1 is set;') in lines[0]
    code, _, err = run_main_here(['--model', 'featscale_small_12', '--pretrained', '--finetune', 'x.pth',
                                  '--data-path', data, *EVAL])
    assert code == 2
    assert err == 'error: --pretrained and --finetune both choose the starting weights; pass one of them\n'


class Payload:
    """A pickled object of a class, which the safe loader refuses (it could run code on load)."""


def test_a_file_the_safe_loader_refuses_fails_in_one_line(cache):
    publish(cache, HF_HUB_ID, {'attnscale_small_12.pth': {'model': released_states()['attnscale_small_12'],
                                                          'extra': Payload()}})
    with pytest.raises(CheckpointError) as e:
        timm.create_model('attnscale_small_12', pretrained=True, **TINY)
    msg = str(e.value)
    assert msg == (f'attnscale_small_12: pretrained weights {HF_HUB_ID}/attnscale_small_12.pth were refused by the '
                   'safe loader (it pickles test_hub.Payload); if you trust the file, pass it to main.py (--finetune '
                   'or --resume) with --unsafe-load')


def test_addon_on_timm_pretrained_weights_starts_at_the_base_model(cache):
    """`--model vit_tiny_patch16_224 --addon attnscale --pretrained`: timm's weights, lambdas at zero."""
    torch.manual_seed(2)
    kwargs = dict(depth=2, img_size=32)
    source = timm.create_model('vit_tiny_patch16_224', **kwargs).state_dict()
    publish(cache, timm.models.get_pretrained_cfg('vit_tiny_patch16_224').hf_hub_id, {'model.safetensors': source})
    base = models.create_model('vit_tiny_patch16_224', pretrained=True, **kwargs).eval()
    model = models.create_model('vit_tiny_patch16_224', addon='attnscale', pretrained=True, **kwargs).eval()
    lambdas = {k: v for k, v in model.state_dict().items() if k.endswith('.lamb')}
    assert len(lambdas) == 2 and all(not v.any() for v in lambdas.values())
    assert_same_tensors(model, {**base.state_dict(), **lambdas})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), base(x))
