#!/usr/bin/env python3
"""The GPU check: what a CPU test suite cannot show, measured on one CUDA GPU and printed as one table.

  1. AttnScale's fused path (SDPA, then the lambda term added to A v) against the explicit one (the attention
     map formed and rescaled), under float16 and bfloat16 autocast: the error of each against a float32
     reference, on the logits and on the gradient. The fused path passes when its errors are at most twice the
     explicit one's (or below a floor at the dtype's resolution).
  2. A few training steps of attnscale_small_12 through engine.train_one_epoch, the code main.py runs: float16
     with GradScaler, bfloat16, and torch.compile. Passes when every loss is finite. Reports the loss of the
     first and second pass over the same batches, ms/step, peak memory and, on CUDA, the host synchronisations
     per step (torch.cuda.set_sync_debug_mode).
  3. benchmark.py, called through its command line: attnscale_small_12 against timm's deit_small_patch16_224
     at batch 128 in bfloat16 (training and inference time ratios, peak memory). Reported, not judged.

    bash scripts/gpu_check.sh                          # one CUDA GPU, a few minutes
    bash scripts/gpu_check.sh --device cpu --tiny      # the same code at toy sizes (the test suite runs this)

Exit status 0 when every judged check passes, 1 otherwise.
"""
import argparse
import contextlib
import io
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import main as trainer  # noqa: E402  (main.py's own model and optimizer builders)
import models  # noqa: E402
import utils  # noqa: E402
from engine import NonFiniteLossError, autocast, train_one_epoch  # noqa: E402
from losses import DistillationLoss  # noqa: E402

TINY_KWARGS = ['depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']
FLOORS = {'float16': 2e-3, 'bfloat16': 2e-2}  # below these, both paths are at the dtype's resolution


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('GPU check', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--tiny', action='store_true', help='toy sizes (2 blocks, width 48, 32 px): a CPU smoke run')
    p.add_argument('--model', default='attnscale_small_12')
    p.add_argument('--reference', default='deit_small_patch16_224', help='benchmark.py reference model (timm)')
    p.add_argument('--train-steps', type=int, default=None, help='steps per pass (default 10; --tiny: 2)')
    p.add_argument('--batch-size', type=int, default=None, help='numerics and training batch (default 64; --tiny: 4)')
    p.add_argument('--bench-batch-size', type=int, default=None, help='benchmark.py batch (default 128; --tiny: 4)')
    p.add_argument('--no-compile', action='store_false', dest='compile', help='skip the torch.compile steps')
    p.add_argument('--compile-backend', default='inductor',
                   help="torch.compile backend (the test suite's CPU run uses aot_eager: same tracing, no codegen)")
    p.add_argument('--json', default='', metavar='OUT', help='also write every number here')
    return p


def sizes(args) -> dict:
    """Image size, classes, model kwargs and step counts of this run."""
    tiny = args.tiny
    return dict(img_size=32 if tiny else 224, num_classes=10 if tiny else 1000,
                model_kwargs=TINY_KWARGS if tiny else [], steps=args.train_steps or (2 if tiny else 10),
                batch=args.batch_size or (4 if tiny else 64), bench_batch=args.bench_batch_size or (4 if tiny else 128))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def build(args, size: dict, device: torch.device):
    """The model as main.py builds it (its flags' defaults: drop-path 0.1, AdamW, weight decay 0.05)."""
    train_args = trainer.get_args_parser().parse_args(
        ['--model', args.model, '--input-size', str(size['img_size']), '--model-kwargs', *size['model_kwargs']])
    model = trainer.build_model(train_args, size['num_classes']).to(device)
    return model, train_args


# ---------------------------------------------------------------------------------------------------------------
# 1. Fused vs explicit AttnScale
# ---------------------------------------------------------------------------------------------------------------

def forward_backward(model, x, y, device, amp_dtype) -> dict:
    """Logits, every gradient, and the AttnScale lambdas' gradients of one forward/backward pass (float32)."""
    model.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        out = model(x)
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    grads = {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None}
    lambdas = [g for n, g in grads.items() if n.endswith('attn.lamb')]
    return dict(out=out.detach().float(), grad=torch.cat(list(grads.values())),
                lambda_grad=torch.cat(lambdas) if lambdas else torch.zeros(1, device=out.device))


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (L2 over all elements)."""
    return ((a - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_attn_paths(args, size: dict, device: torch.device) -> list:
    """Rows of section 1, one per dtype: relative L2 error against float32 (explicit path, no autocast) of the
    logits and of the whole gradient, for each path; judged on those two. The lambdas' own gradient error is
    reported too (in the JSON): a small sum of many terms, it is dominated by cancellation in both paths.
    The lambdas are set to random values first (they start at zero, where AttnScale is the identity and both
    paths would agree trivially); dropout and drop-path are off (eval mode)."""
    torch.manual_seed(0)
    model, _ = build(args, size, device)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('attn.lamb'):
                p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(size['batch'], 3, size['img_size'], size['img_size'], device=device)
    y = torch.randint(0, size['num_classes'], (size['batch'],), device=device)
    models.set_fused_attn(model, False)
    ref = forward_backward(model, x, y, device, torch.float32)
    rows = []
    for dtype in ('float16', 'bfloat16'):
        got, err = {}, {}
        for path in ('fused', 'explicit'):
            models.set_fused_attn(model, path == 'fused')
            got[path] = forward_backward(model, x, y, device, getattr(torch, dtype))
            err[path] = {k: relative_error(got[path][k], ref[k]) for k in ref}
        gap = relative_error(got['fused']['out'], got['explicit']['out'])
        ok = all(err['fused'][k] <= max(2 * err['explicit'][k], FLOORS[dtype]) for k in ('out', 'grad'))
        rows.append(dict(
            section='AttnScale fused vs explicit', setting=f'{dtype} autocast', ok=ok, numbers=dict(
                err, fused_vs_explicit_out=gap),
            result=(f"error vs fp32, fused / explicit: logits {err['fused']['out']:.1e} / {err['explicit']['out']:.1e}, "
                    f"gradient {err['fused']['grad']:.1e} / {err['explicit']['grad']:.1e}")))
    models.set_fused_attn(model, True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 2. Training steps
# ---------------------------------------------------------------------------------------------------------------

def training_configs(device: torch.device, compile_: bool) -> list:
    """(label, autocast dtype, GradScaler?, torch.compile?) of each training run."""
    configs = [('float16 + GradScaler', torch.float16, True, False), ('bfloat16', torch.bfloat16, False, False)]
    if compile_:  # main.py's default on CUDA (float16 + GradScaler); bfloat16 on CPU
        configs.append(('compile, float16 + GradScaler', torch.float16, True, True) if device.type == 'cuda' else
                       ('compile, bfloat16', torch.bfloat16, False, True))
    return configs


def train_pass(net, model, criterion, batches, optimizer, scaler, device, amp_dtype, count_syncs: bool):
    """One engine.train_one_epoch over `batches` (its progress lines hidden): (loss, seconds, host syncs)."""
    sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('always')
        if count_syncs:
            torch.cuda.set_sync_debug_mode('warn')
        try:
            stats, _, _ = train_one_epoch(net, criterion, batches, optimizer, device, 0, scaler, amp_dtype,
                                          print_freq=10 ** 6)
        finally:
            if count_syncs:
                torch.cuda.set_sync_debug_mode('default')
    sync(device)
    syncs = sum('synchronizing' in str(w.message) for w in caught)
    return stats['loss'], time.perf_counter() - start, syncs


def check_training(args, size: dict, device: torch.device) -> list:
    """Rows of section 2: two passes over the same `steps` batches per configuration (the first one compiles)."""
    rows = []
    for label, amp_dtype, use_scaler, compile_ in training_configs(device, args.compile):
        torch.manual_seed(0)
        model, train_args = build(args, size, device)
        optimizer = trainer.build_optimizer(train_args, model, 5e-4)
        scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0., 1.)
        net = torch.compile(model, backend=args.compile_backend) if compile_ else model
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(size['batch'], 3, size['img_size'], size['img_size'], generator=gen).to(device),
                    torch.randint(0, size['num_classes'], (size['batch'],), generator=gen).to(device))
                   for _ in range(size['steps'])]
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        numbers = dict(steps=size['steps'], batch=size['batch'])
        try:
            first, first_s, _ = train_pass(net, model, criterion, batches, optimizer, scaler, device, amp_dtype, False)
            second, second_s, syncs = train_pass(net, model, criterion, batches, optimizer, scaler, device, amp_dtype,
                                                 device.type == 'cuda')
        except NonFiniteLossError as e:
            rows.append(dict(section=f'training {args.model}', setting=label, ok=False, result=str(e), numbers={}))
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else utils.peak_rss_mb()
        numbers.update(loss_first_pass=first, loss_second_pass=second, first_pass_s=first_s,
                       ms_per_step=1e3 * second_s / size['steps'], peak_mb=peak,
                       syncs_per_step=syncs / size['steps'] if device.type == 'cuda' else None,
                       final_loss_scale=scaler.get_scale() if scaler is not None else None)
        result = (f"loss {first:.3f} -> {second:.3f}, {numbers['ms_per_step']:.0f} ms/step, peak "
                  f"{peak:.0f} MB{'' if device.type == 'cuda' else ' RSS'}")
        if numbers['syncs_per_step'] is not None:
            result += f", {numbers['syncs_per_step']:.1f} host syncs/step"
        if compile_:
            result += f', first pass (compiling) {first_s:.0f} s'
        rows.append(dict(section=f'training {args.model}', setting=label, result=result, numbers=numbers,
                         ok=math.isfinite(first) and math.isfinite(second)))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 3. benchmark.py against timm's DeiT-S
# ---------------------------------------------------------------------------------------------------------------

def check_benchmark(args, size: dict, device: torch.device) -> list:
    """Rows of section 3, from benchmark.py's JSON summary (its command line, as a user runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'bench.json'
        cmd = [sys.executable, str(ROOT / 'benchmark.py'), '--models', args.reference, args.model,
               '--reference', args.reference, '--dtype', 'bfloat16', '--batch-size', str(size['bench_batch']),
               '--img-size', str(size['img_size']), '--num-classes', str(size['num_classes']),
               '--device', str(device), '--json', str(out)]
        if args.tiny:
            cmd += ['--model-kwargs', *TINY_KWARGS, '--rounds', '1', '--steps', '1', '--warmup', '1',
                    '--memory-steps', '1', '--threads', '1']
        else:
            cmd += ['--rounds', '5', '--steps', '5', '--warmup', '3']
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
            return [dict(section='benchmark.py', setting=' '.join(cmd[2:6]), ok=False, numbers={},
                         result=f'benchmark.py failed ({proc.returncode}): {tail}')]
        summary = json.loads(out.read_text())['summary']
    rows = []
    for label, s in summary.items():
        result = (f"train {s['train_ms']['median']:.1f} ms/step (x{s['train_ratio']:.3f}), infer "
                  f"{s['infer_imgs_per_s']['median']:.0f} img/s (x{s['infer_ratio']:.3f}), peak {s['peak_mb']:.0f} MB "
                  f"(x{s['peak_ratio']:.3f})")
        rows.append(dict(section='benchmark.py', setting=f"{label}, batch {size['bench_batch']}, bfloat16",
                         result=result, numbers=s, ok=None))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'CPU'
    cuda = f', CUDA {torch.version.cuda}' if device.type == 'cuda' else ''
    import timm
    return f'GPU check on {name} ({device}; torch {torch.__version__}, timm {timm.__version__}{cuda})'


def render(rows: list) -> str:
    """The summary table: section | setting | result | ok."""
    cells = [['check', 'setting', 'result', 'ok']] + [
        [r['section'], r['setting'], r['result'], {True: 'yes', False: 'NO', None: '-'}[r['ok']]] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = [' | '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda but CUDA is not available; pass --device cpu --tiny for a CPU run')
    size = sizes(args)
    start = time.time()
    rows = check_attn_paths(args, size, device) + check_training(args, size, device) + \
        check_benchmark(args, size, device)
    print(describe(device))
    print(render(rows))
    judged = [r for r in rows if r['ok'] is not None]
    failed = [r for r in judged if not r['ok']]
    print(f"{len(judged) - len(failed)} of {len(judged)} checks passed"
          f"{'' if not failed else f', {len(failed)} FAILED'} ({time.time() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=describe(device), sizes=size, rows=[
            {k: v for k, v in r.items()} for r in rows]), indent=1, default=str))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
