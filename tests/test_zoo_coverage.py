"""scripts/addon_coverage.py on a few of timm's families (meta device, in-process): the numbers it prints, its JSON,
and that docs/models.md shows the same rows. Those build 25 full-size architectures (shapes only): slow tier."""
import io
import json
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import timm
import torch
from timm.models import levit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
import addon_coverage  # noqa: E402

# LeViT (its own adapter), PiT (timm's blocks inside stages, found by the walker), ConViT (GPSA: no adapter),
# SwiftFormer (additive attention only: no token-to-token map, so not counted) and XCiT (channel attention: not
# counted either, FeatScale only)
FAMILIES = ['levit', 'pit', 'convit', 'swiftformer', 'xcit']


@pytest.fixture(scope='module')
def printed(tmp_path_factory):
    """What the script prints and writes, once for the module (a module fixture cannot take capsys)."""
    out = tmp_path_factory.mktemp('coverage') / 'coverage.json'
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert addon_coverage.main(['--families', *FAMILIES, '--json', out]) == 0
    return buffer.getvalue(), json.loads(out.read_text())


def rows(text):
    return {line.split(' | ')[0].strip('| *'): line for line in text.splitlines() if line.startswith('| ')}


@pytest.mark.slow
def test_prints_per_family_architectures_tags_covered_and_why(printed):
    text, _ = printed
    table = rows(text)
    assert table['levit'] == '| levit | 10 | 10 | 10 | 10 | — |'
    assert table['pit'] == '| pit | 8 | 8 | 8 | 8 | — |'
    assert table['convit'] == '| convit | 3 | 3 | 0 | 0 | its GPSA has no adapter (3) |'
    assert 'swiftformer' not in table and 'xcit' not in table  # no token-to-token attention
    assert text.splitlines()[-1] == 'Without token attention, FeatScale only (AttnScale refused): xcit (28)'
    assert table['total'] == '| **total** | **21** | **21** | **18** (85.7%) | **18** (85.7%) | |'
    assert '(python scripts/addon_coverage.py --families levit pit convit swiftformer xcit --json' in text


@pytest.mark.slow
def test_json_has_every_architecture_with_its_gains(printed):
    _, data = printed
    archs = data['architectures']
    swiftformer = [r for name, r in archs.items() if name.startswith('swiftformer_')]
    assert len(swiftformer) == 4 and not any(r['token_attention'] or r['covered'] for r in swiftformer)
    xcit = archs['xcit_nano_12_p16_224']  # 12 XCA blocks of 128 channels; AttnScale refused
    assert not xcit['token_attention'] and xcit['featscale'] == 12 * 2 * 128
    assert xcit['attnscale'].endswith('no token-to-token map, so A_dc is undefined; FeatScale can (--addon featscale)')
    with torch.device('meta'):
        plain = timm.create_model('levit_128s')
    attentions = [m for m in plain.modules() if isinstance(m, (levit.Attention, levit.AttentionDownsample))]
    levit_128s = archs['levit_128s']  # one lamb per head of every attention, lamb1/lamb2 per channel of its output
    assert levit_128s['covered'] and levit_128s['attnscale'] == sum(m.num_heads for m in attentions)
    assert levit_128s['featscale'] == 2 * sum(m.proj.ln.bn.num_features for m in attentions)
    assert archs['convit_tiny']['attnscale'].endswith('its GPSA (blocks.0.attn) has no adapter')
    assert data['summary']['pit'] == dict(architectures=8, tags=8, covered=8, covered_tags=8, why={},
                                          featscale_only=0)


@pytest.mark.slow
def test_docs_show_the_rows_the_script_prints(printed):
    text, _ = printed
    docs = (ROOT / 'docs' / 'models.md').read_text()
    for family in ('levit', 'pit', 'convit'):
        assert rows(text)[family] in docs, family
    assert re.search(r'python scripts/addon_coverage.py\n', docs)


def test_unknown_family_is_one_clear_error():
    with pytest.raises(SystemExit, match='no pretrained architecture in the families vit: use timm module names'):
        addon_coverage.main(['--families', 'vit'])
