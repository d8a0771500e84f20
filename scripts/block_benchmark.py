"""Per-block time of the add-ons, resolved to a fraction of a percent on a shared, noisy CPU.

Whole training steps on a shared CPU vary by several percent from one to the next, more than an add-on
costs. This script times one transformer block instead: the middle self-attention block of each model,
all with the reference's weights (the add-ons' gains at 0.01; their value changes no work), at the
model's token count and `--batch-size`. Training (forward, then backward of a fixed upstream gradient) and
inference (forward without autograd) are timed model after model, `--repeats` times. A sample lasts
about a second, so each model's sample and the reference's next to it share the machine's state: the
median of their ratios cancels the drift that whole-step rounds do not. Everything outside the blocks
(patch embedding, head, loss, optimizer) is the same with and without an add-on, so a model's training
step costs at most its block ratio over the plain model's.

    python scripts/block_benchmark.py --models deit_small_12 attnscale_small_12 featscale_small_12 \\
        --batch-size 32 --repeats 40 --threads 1 [--device cuda --amp bfloat16] [--json out.json]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the variants)
from benchmark import timed  # noqa: E402
from models.checkpoint import ADDON_KEY  # noqa: E402
from engine import autocast  # noqa: E402


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
                    p.fill_(0.01)
        shape = shape or block_input_shape(model, blk, img_size)
        blocks[name] = blk.train()
    return blocks, shape


def train_once(blk, x, upstream, amp) -> None:
    blk.zero_grad(set_to_none=True)
    x.grad = None
    with autocast(x.device, amp):
        out = blk(x)
    out.backward(upstream.to(out.dtype))


def infer_once(blk, x, amp) -> None:
    with torch.no_grad(), autocast(x.device, amp):
        blk(x)


def seconds(fn, blk, x, *args) -> float:
    """Wall seconds of one call, device work included."""
    return timed(lambda: fn(blk, x, *args), x.device)[0]


def measure(blocks: dict, x, upstream, repeats: int, amp=torch.float32) -> dict:
    """{name: {'train': [s, ...], 'infer': [s, ...]}}; one warm-up call each; the order rotates per repeat."""
    names = list(blocks)
    for blk in blocks.values():
        train_once(blk, x, upstream, amp)
        infer_once(blk, x, amp)
    samples = {name: {'train': [], 'infer': []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name]['train'].append(seconds(train_once, blocks[name], x, upstream, amp))
            samples[name]['infer'].append(seconds(infer_once, blocks[name], x, amp))
    return samples


def summarize(samples: dict) -> dict:
    """Per model and mode: median ms, and median and quartiles of the paired ratios to the reference."""
    ref = next(iter(samples.values()))
    summary = {}
    for name, modes in samples.items():
        summary[name] = {}
        for mode, values in modes.items():
            ratios = [a / b for a, b in zip(values, ref[mode])]
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            summary[name][mode] = dict(ms=1e3 * statistics.median(values), ratio=statistics.median(ratios),
                                       q1=q1, q3=q3)
    return summary


def format_table(summary: dict) -> str:
    lines = ['model | train ms | train x (quartiles) | inference ms | inference x (quartiles)', '---|---|---|---|---']
    for name, s in summary.items():
        cells = [f'{s[m]["ms"]:.1f} | {s[m]["ratio"]:.4f} ({s[m]["q1"]:.4f}-{s[m]["q3"]:.4f})'
                 for m in ('train', 'infer')]
        lines.append(f'{name} | ' + ' | '.join(cells))
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        sys.exit('error: --repeats and --batch-size must be at least 1')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    try:
        blocks, (tokens, dim) = middle_blocks(args.models, args.img_size)
    except ValueError as exc:  # an unknown name, an add-on a model cannot take
        sys.exit(f'error: {exc}')
    blocks = {name: blk.to(device) for name, blk in blocks.items()}
    x = torch.randn(args.batch_size, tokens, dim, device=device, requires_grad=True)
    upstream = torch.randn(args.batch_size, tokens, dim, device=device)
    samples = measure(blocks, x, upstream, args.repeats, getattr(torch, args.amp or 'float32'))
    summary = summarize(samples)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} thread(s)'
    print(f'one block, batch {args.batch_size}, {tokens} tokens, width {dim}, {args.amp or "float32"}, {where}, '
          f'{args.repeats} repeats, torch {torch.__version__}; ratios: median of paired samples, '
          f'reference {args.models[0]}')
    print(format_table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=vars(args), tokens=tokens, samples=samples,
                                                   summary=summary), indent=1))
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
