"""timm's own model-convention tests (from the timm sdist's tests/test_models.py), run on our variants.

The sdist of the installed timm version is fetched once from PyPI into .cache/ (or TIMM_TESTS_DIR);
its functions are called as they are, so a variant passes exactly what timm's DeiT, CaiT and Swin pass.
Combinations that timm itself skips (a fixed input size over its limit: the 384 px CaiT models in
all but the forward test) are not generated. As timm does, the ViT-like families run the "non-standard"
config test, Swin (NHWC features) the standard one and the `features_only` test.

One model per kind runs them: the first registered name of each family (module), add-on (none, AttnScale,
FeatScale) and input size (up to 320 px, or above). The other names of a kind build the same class from the
same code with another width, depth or name (test_models.py checks every name and its official shapes).
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

import models

pytestmark = pytest.mark.slow  # full-size models (224 px; 384 px for the forward test)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get('TIMM_TESTS_DIR', ROOT / '.cache' / 'timm-tests'))


def _timm_test_models():
    src = CACHE / f'timm-{timm.__version__}'
    if not (src / 'tests' / 'test_models.py').exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
                        f'timm=={timm.__version__}', '-d', str(CACHE)], check=True)
        with tarfile.open(CACHE / f'timm-{timm.__version__}.tar.gz') as tar:
            tar.extractall(CACHE, members=[m for m in tar.getmembers() if '/tests/' in m.name], filter='data')
    spec = importlib.util.spec_from_file_location('timm_test_models', src / 'tests' / 'test_models.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_per_kind() -> list:
    """The first registered name of each (family, add-on, input size above 320 px) kind."""
    kinds = {}
    for name in models.list_variants():
        prefix = name.split('_')[0]
        kind = (timm.models.model_entrypoint(name).__module__, prefix if prefix in models.ADDONS else None,
                timm.get_pretrained_cfg_value(name, 'input_size')[-1] > 320)
        kinds.setdefault(kind, name)
    return list(kinds.values())


T = _timm_test_models()
KINDS = one_per_kind()
AT_224 = [n for n in KINDS if timm.get_pretrained_cfg_value(n, 'input_size')[-1] <= 320]
SWIN = [n for n in AT_224 if '_swin_' in n]


@pytest.mark.parametrize('name', KINDS)
def test_model_forward(name):
    T.test_model_forward(name, 1)


@pytest.mark.parametrize('name', AT_224)
def test_model_backward(name):
    T.test_model_backward(name, 2)


@pytest.mark.parametrize('name', [n for n in AT_224 if n not in SWIN])
def test_model_default_cfgs_non_std(name):
    T.test_model_default_cfgs_non_std(name, 1, 'meta')


@pytest.mark.parametrize('name', SWIN)
def test_model_default_cfgs(name):
    T.test_model_default_cfgs(name, 1, 'meta')


@pytest.mark.parametrize('name', SWIN)
def test_model_forward_features(name):
    T.test_model_forward_features(name, 1)


@pytest.mark.parametrize('name', AT_224)
def test_model_forward_torchscript(name):
    T.test_model_forward_torchscript(name, 1)


@pytest.mark.parametrize('name', AT_224)
def test_model_forward_intermediates(name):
    T.test_model_forward_intermediates(name, 1)


@pytest.mark.parametrize('name', AT_224)
def test_model_forward_intermediates_features(name):
    T.test_model_forward_intermediates_features(name, 1)
