#!/usr/bin/env python3
"""Which of timm's pretrained architectures take AttnScale and FeatScale (`models.apply_addon`), per family.

Every architecture of `timm.list_models(pretrained=True)` that timm itself defines (not the variants this
repository registers; its weight tags counted apart) is built on the meta device (shapes only, no memory, no
weights) and sorted by its timm module (the family). An architecture counts when it holds a token-to-token
softmax attention module (`models/token_attention.py`); it is covered when both add-ons install, with gains on
every such module. The table gives, per family: architectures, weight tags, covered architectures and tags, and
why the others are not (the first line of `apply_addon`'s refusal, grouped by the attention class).
Families without token attention where FeatScale installs are listed after the table.

    python scripts/addon_coverage.py                          # all of timm's pretrained zoo (a few minutes)
    python scripts/addon_coverage.py --families eva maxxvit   # some families
    python scripts/addon_coverage.py --json coverage.json     # and every architecture's result
"""
import argparse
import json
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import timm
import torch
from timm.models import model_entrypoint
from timm.models._registry import _model_to_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from models.token_attention import token_attention_modules  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('AttnScale / FeatScale coverage of timm\'s pretrained zoo', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--families', nargs='+', default=None, metavar='MODULE',
                   help='only these timm modules (e.g. eva maxxvit swin_transformer_v2); default: all')
    p.add_argument('--json', default=None, metavar='FILE', help='write the summary and every architecture\'s result')
    return p


def architectures(families=None) -> dict:
    """{architecture: [weight tags]} of timm's own pretrained zoo, in the given families (timm modules) only."""
    found = defaultdict(list)
    for name in timm.list_models(pretrained=True):
        arch = name.split('.')[0]
        if not model_entrypoint(arch).__module__.startswith('timm.'):  # registered by `import models`
            continue
        if families is None or _model_to_module.get(arch) in families:
            found[arch].append(name)
    return dict(found)


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split('; supported:')[0]


def check(arch: str) -> dict:
    """One architecture on the meta device: whether it has token attention, and what each add-on does."""
    with warnings.catch_warnings(), torch.device('meta'):
        warnings.simplefilter('ignore')
        try:
            base = timm.create_model(arch)
        except Exception as e:  # an architecture timm cannot build here
            return dict(token_attention=False, error=f'timm cannot build it: {first_line(e)}')
    result = dict(token_attention=bool(token_attention_modules(base)))
    for addon in models.ADDONS:
        try:
            with torch.device('meta'):
                model = models.apply_addon(timm.create_model(arch), addon) if addon != models.ADDONS[0] else \
                    models.apply_addon(base, addon)
            result[addon] = sum(p.numel() for n, p in model.named_parameters() if n.rsplit('.', 1)[-1] in
                                ('lamb', 'lamb1', 'lamb2'))
        except ValueError as e:
            result[addon] = first_line(e)
    result['covered'] = all(isinstance(result[a], int) for a in models.ADDONS)
    return result


def reason(result: dict) -> str:
    """Why an architecture with token attention is not covered: the first refusal, without the model's class and
    the module's path (so that the architectures of a family group by the attention class that has no adapter)."""
    text = next(result[a] for a in models.ADDONS if not isinstance(result[a], int))
    return re.sub(r' \([\w.]+\)', '', text.split(': ', 1)[-1]) if ': its ' in text else text


def summarize(results: dict, tags: dict) -> dict:
    """{family: dict(architectures, tags, covered, covered_tags, why, featscale_only)} over the results."""
    families = defaultdict(lambda: dict(architectures=0, tags=0, covered=0, covered_tags=0, why=defaultdict(int),
                                        featscale_only=0))
    for arch, r in results.items():
        f = families[_model_to_module.get(arch, '?')]
        if r['token_attention']:
            f['architectures'] += 1
            f['tags'] += len(tags[arch])
            if r['covered']:
                f['covered'] += 1
                f['covered_tags'] += len(tags[arch])
            else:
                f['why'][reason(r)] += 1
        elif isinstance(r.get('featscale'), int):
            f['featscale_only'] += 1
    return {name: dict(f, why=dict(f['why'])) for name, f in families.items()}


def render(summary: dict) -> str:
    """The markdown table (families with token attention, most architectures first), totals, FeatScale-only list."""
    rows = sorted(((n, f) for n, f in summary.items() if f['architectures']),
                  key=lambda t: (-t[1]['architectures'], t[0]))
    lines = ['| family (timm module) | architectures | weight tags | covered | covered tags | not covered: why |',
             '|---|---|---|---|---|---|']
    for name, f in rows:
        why = '; '.join(f'{k} ({v})' for k, v in sorted(f['why'].items(), key=lambda t: -t[1]))
        lines.append(f"| {name} | {f['architectures']} | {f['tags']} | {f['covered']} | {f['covered_tags']} | "
                     f"{why or '—'} |")
    archs, tags = (sum(f[k] for _, f in rows) for k in ('architectures', 'tags'))
    covered, covered_tags = (sum(f[k] for _, f in rows) for k in ('covered', 'covered_tags'))
    lines.append(f'| **total** | **{archs}** | **{tags}** | **{covered}** ({100 * covered / max(archs, 1):.1f}%) | '
                 f'**{covered_tags}** ({100 * covered_tags / max(tags, 1):.1f}%) | |')
    featscale_only = sorted((n, f['featscale_only']) for n, f in summary.items() if f['featscale_only'])
    if featscale_only:
        lines.append('')
        lines.append('Without token attention, FeatScale only (AttnScale refused): ' +
                     ', '.join(f'{n} ({k})' for n, k in featscale_only))
    return '\n'.join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = get_args_parser().parse_args(argv)
    tags = architectures(set(args.families) if args.families else None)
    if not tags:
        raise SystemExit(f'no pretrained architecture in the families {" ".join(args.families)}: use timm module '
                         'names, e.g. vision_transformer, eva, maxxvit')
    results, start = {}, time.time()
    for i, arch in enumerate(sorted(tags), start=1):
        results[arch] = check(arch)
        if i % 50 == 0 or i == len(tags):
            elapsed = time.time() - start
            print(f'[{i}/{len(tags)}] {arch}  elapsed {elapsed:.0f} s  eta {elapsed / i * (len(tags) - i):.0f} s',
                  file=sys.stderr, flush=True)
    summary = summarize(results, tags)
    print(f'timm {timm.__version__}: architectures of list_models(pretrained=True) with token-to-token attention, '
          f'and those both add-ons install into ({" ".join(["python scripts/addon_coverage.py", *argv])})\n')
    print(render(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(summary=summary, architectures=results), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
