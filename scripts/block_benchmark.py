"""Per-block time of the add-ons, resolved to a fraction of a percent on a shared, noisy CPU.

Whole training steps on a shared CPU vary by several percent from one to the next, more than an add-on
costs. This script times one transformer block instead: the middle self-attention block of each model,
all with the reference's weights (the add-ons' gains at 0.01; their value changes no work), at the
model's token count and `--batch-size`. Training (forward, then backward of a fixed upstream gradient) and
inference (forward without autograd) are timed model after model, `--repeats` times. A sample lasts
about a second, so each model's sample and the reference's next to it share the machine's state: the
median of their ratios cancels the drift that whole-step rounds do not. Everything outside the blocks
(patch embedding, head, loss, optimizer) is the same with and without an add-on, so a model's training
step costs at most its block ratio over the plain model's. Each ratio comes with a 95% bootstrap interval
of the median, which says how far the run resolves it.

`--projections` resolves an add-on's cost further. In a ViT/DeiT block, AttnScale changes only the attention
module (DC[v] from the qkv split, the correction in the output projection: `qkv_heads_and_mean`,
`attnscale_projection`) and FeatScale only the output projection (`featscale_projection`). So this mode times
those parts alone, plain and with the add-on, with the reference block's weights and input shape, next to the
reference block itself: the median paired difference is the add-on's time per block, taken from a shorter
operation than the block, and is reported as a fraction of the block's time.

    python scripts/block_benchmark.py --models deit_small_12 attnscale_small_12 featscale_small_12 \\
        --batch-size 32 --repeats 40 --threads 1 [--device cuda --amp bfloat16] [--json out.json]
    python scripts/block_benchmark.py --models deit_small_patch16_224 --projections --repeats 200
"""
import argparse
import copy
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from timm.models.vision_transformer import Attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the variants)
from benchmark import timed  # noqa: E402
from models.checkpoint import ADDON_KEY  # noqa: E402
from models.fused import featscale_projection  # noqa: E402
from models.plugin import ViTAttention, has_addon  # noqa: E402
from engine import autocast  # noqa: E402

GAIN = 0.01  # the add-ons' gains while timed; their value changes no work


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', required=True, metavar='NAME',
                        help='registered or timm names (NAME+attnscale works); the first is the reference')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=40)
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (on CUDA: for the host side)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    parser.add_argument('--amp', choices=['bfloat16', 'float16'], help='time under this autocast (default float32)')
    parser.add_argument('--projections', action='store_true',
                        help="time the parts the add-ons change, alone, with the reference's (one model)")
    parser.add_argument('--json', metavar='OUT', help='write every sample and the summary here')
    return parser


def block_input_shape(model, blk, img_size: int) -> tuple:
    """(tokens, width) that `blk` sees inside `model` (one image through the model, a pre-hook reads it)."""
    shapes = []
    handle = blk.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[1:])))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    handle.remove()
    return shapes[0]


def middle_blocks(names: list, img_size: int) -> tuple:
    """({name: middle self-attention block in train mode}, (tokens, width)): all with the reference's weights."""
    blocks, shape = {}, None
    for name in names:
        base, _, addon = name.partition('+')
        model = models.create_model(base, num_classes=10, img_size=img_size, addon=addon or None)
        if not hasattr(model, 'blocks') or not isinstance(model.blocks, torch.nn.Sequential):
            sys.exit(f'error: {name} has no `blocks` of self-attention (ViT/DeiT/CaiT only); '
                     'time Swin with benchmark.py instead')
        blk = model.blocks[len(model.blocks) // 2]
        if blocks:
            blk.load_state_dict(next(iter(blocks.values())).state_dict(), strict=False)
        with torch.no_grad():
            for key, p in blk.named_parameters():
                if ADDON_KEY.search(key):
                    p.fill_(GAIN)
        shape = shape or block_input_shape(model, blk, img_size)
        blocks[name] = blk.train()
    return blocks, shape


class Projection(torch.nn.Module):
    """A block's output projection alone: plain, or fused with FeatScale as a ViT/DeiT block runs it."""

    def __init__(self, linear: torch.nn.Linear, featscale: bool = False):
        super().__init__()
        self.linear, self.featscale = linear, featscale
        width = linear.out_features if featscale else 0
        self.lamb1, self.lamb2 = (torch.nn.Parameter(torch.full((width,), GAIN)) for _ in range(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.featscale:
            return featscale_projection(z, self.linear.weight, self.linear.bias, self.lamb1, self.lamb2)
        return self.linear(z)


def attention_unit(attn: Attention, attn_scale: bool) -> ViTAttention:
    """A copy of timm's attention module as this repository runs it, without or with AttnScale (gains GAIN)."""
    unit = copy.deepcopy(attn)
    unit.__class__ = ViTAttention
    unit.attn_probe = torch.nn.Identity()
    unit.register_parameter('lamb', torch.nn.Parameter(torch.full((unit.num_heads,), GAIN)) if attn_scale else None)
    return unit


PAIRS = {'AttnScale': ('attention+attnscale', 'attention'), 'FeatScale': ('proj+featscale', 'proj')}


def projection_units(name: str, blk) -> dict:
    """{unit: module}: the plain ViT/DeiT block `blk`, its attention module and its output projection, plain and
    with the add-on that changes each (the same weights)."""
    attn = getattr(blk, 'attn', None)
    if not isinstance(attn, Attention) or has_addon(blk):
        sys.exit(f'error: --projections takes the projections of a plain ViT/DeiT block, which {name} has not; '
                 'give a ViT/DeiT model without an add-on, e.g. --models deit_small_patch16_224')
    return {'block': blk, 'attention': attention_unit(attn, False), 'attention+attnscale': attention_unit(attn, True),
            'proj': Projection(attn.proj), 'proj+featscale': Projection(attn.proj, featscale=True)}


def train_once(unit, x, upstream, amp) -> None:
    unit.zero_grad(set_to_none=True)
    x.grad = None
    with autocast(x.device, amp):
        out = unit(x)
    out.backward(upstream.to(out.dtype))


def infer_once(unit, x, amp) -> None:
    with torch.no_grad(), autocast(x.device, amp):
        unit(x)


def seconds(fn, unit, x, *args) -> float:
    """Wall seconds of one call, device work included."""
    return timed(lambda: fn(unit, x, *args), x.device)[0]


def measure(units: dict, x, repeats: int, amp=torch.float32) -> dict:
    """{name: {'train': [s, ...], 'infer': [s, ...]}}. Each unit first runs untimed (a forward, which draws its
    fixed upstream gradient, seeded so that units of one output shape get the same, and a training step).
    The order rotates per repeat and runs backwards every other repeat, so that neighbours in the list
    run before each other equally often."""
    upstream = {}
    for name, unit in units.items():
        with torch.no_grad(), autocast(x.device, amp):
            shape = unit(x).shape
        upstream[name] = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x.device)
        train_once(unit, x, upstream[name], amp)
    names = list(units)
    samples = {name: {'train': [], 'infer': []} for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order[::-1] if r % 2 else order:
            samples[name]['train'].append(seconds(train_once, units[name], x, upstream[name], amp))
            samples[name]['infer'].append(seconds(infer_once, units[name], x, amp))
    return samples


def interval(values: list, resamples: int = 2000) -> list:
    """[low, high]: the 95% percentile-bootstrap interval of the median of `values` (seeded, so the same
    samples give the same interval). It treats the samples as independent: it covers their scatter, not a
    drift of the machine that pairing does not cancel."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def summarize(samples: dict) -> dict:
    """Per model and mode: median ms, and the median of the paired ratios to the reference, with its
    interval and the ratios' quartiles."""
    ref = next(iter(samples.values()))
    summary = {}
    for name, modes in samples.items():
        summary[name] = {}
        for mode, values in modes.items():
            ratios = [a / b for a, b in zip(values, ref[mode])]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            summary[name][mode] = dict(ms=1e3 * statistics.median(values), ratio=statistics.median(ratios),
                                       ci=interval(ratios), q1=q1, q3=q3)
    return summary


def summarize_projections(samples: dict) -> dict:
    """Per add-on and mode: the plain projection's median ms, the median of the paired differences with its
    interval (the add-on's ms per block), and both as fractions of the block's median time (the interval
    divided by that median, whose own scatter it leaves out)."""
    summary = {}
    for addon, (fused, plain) in PAIRS.items():
        summary[addon] = {}
        for mode in ('train', 'infer'):
            diffs = [1e3 * (a - b) for a, b in zip(samples[fused][mode], samples[plain][mode])]
            block = 1e3 * statistics.median(samples['block'][mode])
            extra, ci = statistics.median(diffs), interval(diffs)
            summary[addon][mode] = dict(plain_ms=1e3 * statistics.median(samples[plain][mode]), extra_ms=extra,
                                        ci=ci, block_ms=block, fraction=extra / block,
                                        fraction_ci=[c / block for c in ci])
    return summary


def format_table(summary: dict) -> str:
    lines = ['model | train ms | train x [95% interval] | inference ms | inference x [95% interval]',
             '---|---|---|---|---']
    for name, s in summary.items():
        cells = [f'{s[m]["ms"]:.1f} | {s[m]["ratio"]:.4f} [{s[m]["ci"][0]:.4f}, {s[m]["ci"][1]:.4f}]'
                 for m in ('train', 'infer')]
        lines.append(f'{name} | ' + ' | '.join(cells))
    return '\n'.join(lines)


def format_projections(summary: dict) -> str:
    lines = ['add-on | mode | plain part ms | extra ms [95% interval] | block ms | of the block [95% interval]',
             '---|---|---|---|---|---']
    for addon, modes in summary.items():
        for mode, s in modes.items():
            lines.append(f'{addon} | {mode} | {s["plain_ms"]:.1f} | {s["extra_ms"]:.2f} [{s["ci"][0]:.2f}, '
                         f'{s["ci"][1]:.2f}] | {s["block_ms"]:.1f} | {100 * s["fraction"]:.2f}% '
                         f'[{100 * s["fraction_ci"][0]:.2f}%, {100 * s["fraction_ci"][1]:.2f}%]')
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        sys.exit('error: --repeats and --batch-size must be at least 1')
    if args.projections and len(args.models) > 1:
        sys.exit('error: --projections times one reference block; give one model, e.g. --models deit_small_patch16_224')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    try:
        blocks, (tokens, dim) = middle_blocks(args.models, args.img_size)
    except ValueError as exc:  # an unknown name, an add-on a model cannot take
        sys.exit(f'error: {exc}')
    units = projection_units(args.models[0], blocks[args.models[0]]) if args.projections else blocks
    units = {name: unit.to(device) for name, unit in units.items()}
    x = torch.randn(args.batch_size, tokens, dim, device=device, requires_grad=True)
    samples = measure(units, x, args.repeats, getattr(torch, args.amp or 'float32'))
    summary = summarize_projections(samples) if args.projections else summarize(samples)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} thread(s)'
    print(f'one block, batch {args.batch_size}, {tokens} tokens, width {dim}, {args.amp or "float32"}, {where}, '
          f'{args.repeats} repeats, torch {torch.__version__}; reference {args.models[0]}; '
          + ('extra time: median of paired differences' if args.projections else 'ratios: median of paired samples'))
    print(format_projections(summary) if args.projections else format_table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=vars(args), tokens=tokens, samples=samples,
                                                   summary=summary), indent=1))
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
