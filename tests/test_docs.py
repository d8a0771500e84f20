"""The README and docs/: links that resolve, and the models table that scripts/model_table.py prints."""
import re
from pathlib import Path

from helpers import run_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))


def test_relative_links_resolve():
    links = [(doc, target) for doc in DOCS
             for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', doc.read_text())
             if not re.match(r'[a-z]+://', target)]
    assert len(links) >= 10  # the README links every docs/ file, docs/diagnostics.md its figures
    missing = [f'{doc.name}: {target}' for doc, target in links if not (doc.parent / target).exists()]
    assert not missing, f'links to missing files: {missing}'


def test_models_table_rows_are_what_the_script_prints():
    names = ['attnscale_small_12', 'featscale_cait_XXS24_224']
    code, out, err = run_script(ROOT / 'scripts' / 'model_table.py', ['--names', *names])
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith('| `')]
    assert rows == ['| `attnscale_small_12` | DeiT | AttnScale | 224 | 22,050,736 | 4.58 |',
                    '| `featscale_cait_XXS24_224` | CaiT | FeatScale | 224 | 11,965,480 | 2.53 |']
    table = (ROOT / 'docs' / 'models.md').read_text()
    assert all(row in table for row in rows)
