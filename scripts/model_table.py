"""Print the models table of docs/models.md: every registered variant with its family, add-on, input size,
parameter count and official GFLOPs (at 1,000 classes). Models are built on the meta device, so this takes
seconds even for CaiT-M48.

    python scripts/model_table.py [--names NAME ...]
"""
import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the variants)


def describe(name: str) -> list:
    """One table row: name, family, add-on, image size, parameters, official GFLOPs."""
    with torch.device('meta'):
        model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    family = type(model).__name__.replace('Transformer', '')
    addon = next((a for a in ('AttnScale', 'FeatScale') if name.startswith(a.lower())), '—')
    img = timm.get_pretrained_cfg_value(name, 'input_size')[-1]
    return [f'`{name}`', family, addon, str(img), f'{params:,}', f'{model.flops() / 1e9:.2f}']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--names', nargs='*', default=None, help='variants to list (default: all registered)')
    args = parser.parse_args(argv)
    rows = [describe(n) for n in (args.names or models.list_variants())]
    print('| model | family | add-on | img | params | GFLOPs |')
    print('|---|---|---|---|---|---|')
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    main()
