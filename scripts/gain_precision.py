"""How accurate the add-on gains' gradients are under autocast: the path a training step takes against the
explicit formula run in the same precision, both against float64 of the explicit formula.

The explicit formula forms AttnScale's map A' = (1 + lamb) A - lamb / N and runs FeatScale after the plain
projection, by plain autograd (`explicit_formula`); it shares no code with the fused Functions of
models/fused.py that a training step runs. Relative errors of dL/d(gains) of one cross-entropy step, at
gains `--gain` (early training: near-uniform attention, DC-dominated tokens), on random images.

    python scripts/gain_precision.py attnscale_small_12 --dtype bfloat16 float16
    python scripts/gain_precision.py attnscale_swin_tiny_patch4_window7_224 --batch-size 2 --model-kwargs depths=(2,2,2,2)
"""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import models  # noqa: E402
from models.checkpoint import ADDON_KEY  # noqa: E402
from models.plugin import AttnScaleAttention, FeatScaleProjection  # noqa: E402


def explicit_formula(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with the add-ons as written: A' formed on the explicit map (as under attention dropout),
    FeatScale after the plain projection."""
    model = copy.deepcopy(model)
    models.set_fused_attn(model, False)
    for m in model.modules():
        if isinstance(m, AttnScaleAttention):
            m.map_dropped = lambda m=m: m.lamb is not None
        if isinstance(m, FeatScaleProjection):
            m.featscale_fused = lambda: False
    return model


def gain_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype=None) -> torch.Tensor:
    """dL/d(gains) of one cross-entropy step, flattened in float64, under `dtype` autocast (None: none). Under
    float16 the loss is scaled for backward as a GradScaler scales it, and the gradients scaled back: 2^16, halved
    until every gradient is finite (CaiT's layer scale of 1e-5 would otherwise flush the gains' gradients to
    zero)."""
    scale = 2. ** 16 if dtype == torch.float16 else 1.
    while True:
        model.zero_grad()
        with torch.autocast(x.device.type, dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        (loss * scale).backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if finite or scale == 1.:
            break
        scale /= 2.
    return torch.cat([p.grad.double().flatten() / scale for n, p in model.named_parameters() if ADDON_KEY.search(n)])


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def errors(model, x, y, dtypes) -> dict:
    """{dtype: (error of the training path, error of the explicit formula)} against float64 of the formula."""
    explicit = explicit_formula(model)
    ref = gain_gradients(copy.deepcopy(explicit).double(), x.double(), y)
    return {dtype: (relative_error(gain_gradients(model, x, y, dtype), ref),
                    relative_error(gain_gradients(explicit, x, y, dtype), ref)) for dtype in dtypes}


@cli.one_line_errors('gain_precision.py')
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', help='a registered add-on model (attnscale_*, featscale_*) or NAME+attnscale')
    p.add_argument('--gain', type=float, default=3e-3)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--dtype', nargs='+', default=['bfloat16'], choices=['bfloat16', 'float16'])
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    name, _, addon = args.model.partition('+')
    torch.manual_seed(args.seed + 1)
    model = models.create_model(name, addon=addon or None, img_size=args.img_size, drop_path_rate=0.,
                                **models.parse_model_kwargs(args.model_kwargs)).train()
    with torch.no_grad():
        for n, param in model.named_parameters():
            if ADDON_KEY.search(n):
                param.fill_(args.gain)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    print(f'{args.model}: relative error of dL/d(gains) against float64 of the explicit formula, gains {args.gain}, '
          f'batch {args.batch_size}, {args.img_size} px')
    for dtype, (fused, written) in errors(model, x, y, [getattr(torch, d) for d in args.dtype]).items():
        print(f'{str(dtype)[6:]:9s} training path {fused:.4f}   explicit formula {written:.4f}   '
              f'ratio {fused / written:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
