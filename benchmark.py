#!/usr/bin/env python3
"""Benchmark: training-step time, inference throughput and peak memory of registered models.

Why this exists: AttnScale and FeatScale are sold as free add-ons, and the official implementation is not
(extra N x N tensors saved for backward). This script checks our implementation against its plain baseline
and against timm's models, on whatever machine it runs on, CPU or CUDA, without code changes.

How it measures, and why:
  * Every model (in every `--dtype` and `--attn-path`) lives in one process and is timed round-robin
    (`--rounds` rounds; each round visits every model, starting one model further along than the previous
    round). A shared or thermally drifting machine then slows every model alike, and ratios come from *paired*
    rounds: per round, model median / reference median; the reported ratio is the median of those ratios.
  * Each step is timed in wall seconds and, on CPU, in process CPU seconds ('x cpu' columns). On a CPU that
    other jobs share, wall time mostly measures the other jobs; CPU time much less so, and with `--threads 1`
    not at all by OpenMP threads spinning while a sibling thread waits for a core (with 2 threads on a busy
    2-core machine a step took up to 7x its idle time). Use `--threads 1` for add-on ratios on a busy machine.
  * `--warmup` untimed steps per model before the first round (allocator, oneDNN / cuDNN kernel choice,
    and torch.compile compilation, which is timed separately as "compile s").
  * Peak memory is measured in a fresh child process per model (so no model sees another's allocations):
    on CPU the child's RSS high-water mark (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, absolute, Python and
    libraries included) and the exact peak of live tensor bytes ('tensor MB', see `TensorPeak`); on CUDA
    `torch.cuda.max_memory_allocated()` after a reset. Beside them, on every device, the exact bytes of the
    activations one training forward saves for backward ('saved MB', see `saved_bytes`): deterministic, so
    an add-on's memory cost shows to the byte, whatever the allocator does. The child builds the model and runs `--memory-steps`
    training steps (the first one allocates the AdamW state). The child runs with glibc's mmap threshold fixed
    (MALLOC_MMAP_THRESHOLD_, unless set already), so every large tensor is mapped and unmapped on its own and
    the RSS high-water mark follows live memory rather than heap fragmentation: with glibc's adaptive default,
    two models with the same tensor peak differed by 5% in RSS; with it fixed, by 0.02% between repeats.
  * `--json` gets every raw sample and the summary, rewritten after each round.
  * `--data` instead measures the input pipeline: images/s of one data-loader worker running DeiT's training
    and evaluation transforms (JPEG decoding included; decoding alone for reference) on generated
    ImageNet-sized JPEGs, and the number of workers (each on a core of its own) needed to feed a GPU at
    `--target-imgs-per-s`.

Examples:
  python benchmark.py --models deit_small_12 attnscale_small_12 featscale_small_12 deit_small_patch16_224 \\
      --threads 2 --rounds 5 --steps 3 --json bench.json
  python benchmark.py --models deit_tiny_12 attnscale_tiny_12 --dtype float32 bfloat16 --no-memory
  python benchmark.py --models deit_small_12 attnscale_small_12 --attn-path fused explicit
  python benchmark.py --data --target-imgs-per-s 1000 2500
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import gpu_cost  # noqa: E402
import models  # noqa: E402  (registers our variants in timm's registry)
from engine import autocast  # noqa: E402  (the training loop's own mixed-precision context)
from models.plugin import install  # noqa: E402
from utils import peak_rss_mb  # noqa: E402

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options (see the module docstring for what is measured)."""
    p = argparse.ArgumentParser('AttnScale / FeatScale benchmark', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['deit_small_12', 'attnscale_small_12', 'featscale_small_12'],
                   metavar='NAME', help='registered model names (ours or timm\'s); NAME+attnscale or NAME+featscale '
                                        'installs that add-on into a timm ViT, CaiT or Swin (as main.py --addon), '
                                        'NAME+plain this repository\'s attention modules without gains (their fair '
                                        'reference)')
    p.add_argument('--reference', default=None, metavar='NAME',
                   help='model the ratios are computed against (default: the first of --models)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra create_model arguments for every model, e.g. depth=2 drop_path_rate=0.1')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--dtype', nargs='+', default=['float32'], choices=list(DTYPES),
                   help='autocast dtype (float32: none; float16 needs CUDA and uses a GradScaler); several: every '
                        'model in each, interleaved, rows labelled MODEL@DTYPE')
    p.add_argument('--attn-path', nargs='+', default=['fused'], choices=['fused', 'explicit'],
                   help='attention path of every module with a `fused_attn` switch: fused (one SDPA kernel; '
                        'AttnScale as the token-mean correction) or explicit (the N x N matrix is formed); '
                        'several: every model on each, rows labelled MODEL@PATH')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s choice)')
    p.add_argument('--compile', action='store_true', help='torch.compile every model (compile time is reported)')
    p.add_argument('--rounds', type=int, default=5, help='interleaved rounds over all models')
    p.add_argument('--warmup', type=int, default=2, help='untimed training and inference steps per model')
    p.add_argument('--steps', type=int, default=3, help='timed training and inference steps per model per round')
    p.add_argument('--no-train', action='store_false', dest='train', help='skip the training-step timing')
    p.add_argument('--no-infer', action='store_false', dest='infer', help='skip the inference timing')
    p.add_argument('--no-memory', action='store_false', dest='memory', help='skip the peak-memory child processes')
    p.add_argument('--memory-steps', type=int, default=3, help='training steps each memory child runs')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default='', metavar='OUT', help='write raw samples and the summary here')
    p.add_argument('--cost', nargs='+', default=None, choices=sorted(gpu_cost.GPUS), metavar='GPU',
                   help='instead of timing, predict each model\'s cost on these GPUs (h100, a100) from the ops one '
                        'training step and one inference pass dispatch, shapes only (gpu_cost.py); no GPU needed')
    p.add_argument('--cost-changes', action='store_true',
                   help='with --cost: also list, per model and pass, the ops it dispatches beyond the reference\'s '
                        '(and those it no longer dispatches), with their predicted microseconds on the first --cost GPU')

    g = p.add_argument_group('input pipeline (--data)')
    g.add_argument('--data', action='store_true', help='benchmark the DeiT data transforms instead of models')
    g.add_argument('--data-images', type=int, default=64, help='generated JPEGs (ImageNet-sized)')
    g.add_argument('--data-passes', type=int, default=3, help='timed passes over the images, per transform')
    g.add_argument('--target-imgs-per-s', type=float, nargs='+', default=[1000., 2500.], metavar='RATE',
                   help='GPU training rates (images/s) to size the worker count for')

    p.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)  # internal: one model's memory run
    return p


# ---------------------------------------------------------------------------------------------------------------
# Models and steps
# ---------------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock time covers it (CPU work is already synchronous)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def check_args(args) -> None:
    """Fail early, with the fix, on options that cannot work together."""
    if 'float16' in args.dtype and torch.device(args.device).type != 'cuda':
        raise SystemExit('--dtype float16 needs CUDA; use bfloat16 or float32 on CPU')
    if args.cost_changes and not args.cost:
        raise SystemExit('--cost-changes lists the ops behind a --cost prediction: add --cost h100 (or a100)')
    if args.reference is not None and args.reference not in args.models + list(variants(args)):
        raise SystemExit(f'--reference {args.reference} is not one of --models')
    for option in ('models', 'dtype', 'attn_path'):
        values = getattr(args, option)
        if len(set(values)) != len(values):
            raise SystemExit(f'--{option.replace("_", "-")} lists a value twice')
    if args.compile and args.warmup < 1:
        raise SystemExit('--compile needs --warmup >= 1 (the first step compiles)')
    if min(args.rounds, args.steps, args.batch_size) < 1:
        raise SystemExit('--rounds, --steps and --batch-size must be at least 1')


def variants(args) -> dict:
    """{row label: (model name, dtype name, attention path)} for every model in every --dtype and --attn-path:
    labels are the model names, with @DTYPE and @PATH appended for the axes that have several values."""
    out = {}
    for path in args.attn_path:
        for dtype in args.dtype:
            for name in args.models:
                label = name + (f'@{dtype}' if len(args.dtype) > 1 else '') + (
                    f'@{path}' if len(args.attn_path) > 1 else '')
                out[label] = (name, dtype, path)
    return out


def reference_label(args) -> str:
    """Row label of the reference: --reference (a model name, or a row label such as MODEL@DTYPE), in the
    first dtype and attention path by default."""
    labels = variants(args)
    ref = args.reference or args.models[0]
    return ref if ref in labels else next(label for label, (name, _, _) in labels.items() if name == ref)


def create(name: str, args) -> torch.nn.Module:
    """Model `name` as --models names it (NAME+attnscale, NAME+featscale: that add-on installed; NAME+plain: this
    repository's attention modules without gains), on the default device."""
    name, _, addon = name.partition('+')
    kwargs = dict(num_classes=args.num_classes, img_size=args.img_size, addon=addon if addon != 'plain' else None)
    kwargs.update(models.parse_model_kwargs(args.model_kwargs))
    try:
        model = models.create_model(name, **kwargs)
    except TypeError as exc:  # a model without an img_size argument (e.g. a CNN) takes any input size
        if 'img_size' not in str(exc):
            raise
        model = models.create_model(name, **{k: v for k, v in kwargs.items() if k != 'img_size'})
    return install(model) if addon == 'plain' else model


def build(name: str, args, device: torch.device, dtype: str, attn_path: str = 'fused'):
    """Model `name` on `device` in train mode, its AdamW optimizer, and its GradScaler (float16 only).

    `attn_path` sets `fused_attn` on every module that has one (timm's attentions and ours).

    AdamW with DeiT's defaults (lr 5e-4, weight decay 0.05): its step is part of the training step we time.
    """
    model = create(name, args).to(device).train()
    models.set_fused_attn(model, attn_path == 'fused')
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type) if dtype == 'float16' else None
    return model, optimizer, scaler


def make_batch(args, device: torch.device):
    """A random image batch and labels (content does not change the work a ViT does)."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
    return x.to(device), y.to(device)


def train_step(model, optimizer, scaler, x, y, device: torch.device, amp_dtype: torch.dtype) -> None:
    """One training step as engine.train_one_epoch does it: autocast forward + loss, backward, AdamW step."""
    model.train()
    with autocast(device, amp_dtype):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def infer_step(model, x, device: torch.device, amp_dtype: torch.dtype) -> None:
    """One inference pass in eval mode, without autograd, under the same autocast as evaluation."""
    model.eval()
    with torch.inference_mode(), autocast(device, amp_dtype):
        model(x)


def timed(fn, device: torch.device) -> tuple:
    """(wall seconds, process CPU seconds) of one call of `fn`, device work included.

    CPU seconds (all threads of this process) matter on a shared CPU: other processes inflate wall time
    by waiting for a core, but not the CPU time this process itself used (on CUDA they mean little).
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------------------------
# Peak memory: one fresh child process per model
# ---------------------------------------------------------------------------------------------------------------

class TensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storage created while this mode is active (a CPU max_memory_allocated).

    Every op output's storage is counted once when created and uncounted when freed (a finalizer on the
    storage). Unlike RSS it does not depend on how the C allocator reuses or returns freed memory, so it
    shows small differences between models exactly; it slows the step, so it runs on one extra step only.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != 'meta':
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.counted:
            return
        self.counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._uncount, key, size)

    def _uncount(self, key, size) -> None:
        self.counted.discard(key)
        self.live -= size


def saved_bytes(model, x, y, amp_dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward over one training forward + loss: the distinct storages of the tensors
    saved (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded (their copies under autocast
    included). Views of one storage count once, as they take memory once. Exact and deterministic."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(x.device, amp_dtype):
        loss = F.cross_entropy(model(x), y)
    del loss  # the graph (and what it saved) goes with it
    return sum(storages.values())


def state_bytes(model, optimizer) -> int:
    """Bytes of the parameters and the optimizer state (AdamW: two moments per parameter)."""
    tensors = list(model.parameters()) + [v for st in optimizer.state.values() for v in st.values()
                                          if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_child(args) -> dict:
    """Body of a memory child: build one model, run `--memory-steps` training steps, report the peaks.

    `baseline_rss_mb` (after imports, before the model) is reported for context; `peak_mb` is the absolute
    RSS high-water mark on CPU, and torch.cuda.max_memory_allocated on CUDA (params, grads, AdamW state and
    the activations saved for backward). On CPU (not compiled) one more step runs under `TensorPeak`:
    `tensor_peak_mb` = parameters + AdamW state + the peak of the tensors that step creates, the CPU
    counterpart of CUDA's number. Not compiled, `saved_bytes` (a compiled graph decides itself what it saves).
    """
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    baseline = peak_rss_mb()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    dtype, attn_path = args.dtype[0], args.attn_path[0]
    model, optimizer, scaler = build(args.memory_child, args, device, dtype, attn_path)
    x, y = make_batch(args, device)
    if args.compile:
        model = torch.compile(model)
    for _ in range(args.memory_steps):
        train_step(model, optimizer, scaler, x, y, device, DTYPES[dtype])
    sync(device)
    result = dict(model=args.memory_child, dtype=dtype, attn_path=attn_path, device=device.type,
                  baseline_rss_mb=baseline, max_rss_mb=peak_rss_mb())
    if device.type == 'cuda':
        result['cuda_max_allocated_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        result['peak_mb'] = result['cuda_max_allocated_mb']
    else:
        result['peak_mb'] = result['max_rss_mb']
        if not args.compile:
            tracker = TensorPeak()
            with tracker:
                train_step(model, optimizer, scaler, x, y, device, DTYPES[dtype])
            result['tensor_peak_mb'] = (state_bytes(model, optimizer) + tracker.peak) / 2 ** 20
    if not args.compile:
        result['saved_bytes'] = saved_bytes(model, x, y, DTYPES[dtype])
    return result


def measure_memory(name: str, dtype: str, attn_path: str, args) -> dict:
    """Run `memory_child` for model `name` in `dtype` on `attn_path` in a fresh interpreter; returns its report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), '--memory-child', name, '--device', args.device,
           '--batch-size', str(args.batch_size), '--img-size', str(args.img_size), '--dtype', dtype,
           '--attn-path', attn_path,
           '--num-classes', str(args.num_classes), '--memory-steps', str(args.memory_steps),
           '--seed', str(args.seed), '--model-kwargs', *args.model_kwargs]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    if args.compile:
        cmd += ['--compile']
    env = dict(os.environ)
    env.setdefault('MALLOC_MMAP_THRESHOLD_', str(128 * 1024))  # see the module docstring (glibc; ignored elsewhere)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'memory child for {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------------------------------------------

def warm_up(entry: dict, args, device: torch.device) -> None:
    """`--warmup` untimed training and inference steps; with --compile, the first of each is timed as compile."""
    model, opt, scaler, amp_dtype = entry['model'], entry['optimizer'], entry['scaler'], entry['amp_dtype']
    x, y = entry['batch']
    for i in range(args.warmup):
        if args.train:
            wall, _ = timed(lambda: train_step(model, opt, scaler, x, y, device, amp_dtype), device)
            if i == 0 and args.compile:
                entry['compile_train_s'] = wall
        if args.infer:
            wall, _ = timed(lambda: infer_step(model, x, device, amp_dtype), device)
            if i == 0 and args.compile:
                entry['compile_infer_s'] = wall


def run_rounds(entries: dict, args, device: torch.device, after_round=lambda rounds_done: None) -> None:
    """Round-robin timing: each round visits every row (rotated start), `--steps` timed steps of each kind.

    Samples go to entries[label]['train_s'][round] and ['infer_s'][round] (wall seconds per step), and to
    'train_cpu_s' / 'infer_cpu_s' (process CPU seconds per step). `after_round(rounds_done)` runs after each
    round (the caller saves what it has, so a long run that is stopped still leaves its samples).
    """
    labels = list(entries)
    if not (args.train or args.infer):
        return
    for r in range(args.rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            e = entries[label]
            model, opt, scaler, amp_dtype = e['model'], e['optimizer'], e['scaler'], e['amp_dtype']
            x, y = e['batch']
            if args.train:
                samples = [timed(lambda: train_step(model, opt, scaler, x, y, device, amp_dtype), device)
                           for _ in range(args.steps)]
                e['train_s'].append([wall for wall, _ in samples])
                e['train_cpu_s'].append([cpu for _, cpu in samples])
            if args.infer:
                samples = [timed(lambda: infer_step(model, x, device, amp_dtype), device) for _ in range(args.steps)]
                e['infer_s'].append([wall for wall, _ in samples])
                e['infer_cpu_s'].append([cpu for _, cpu in samples])
        print(f'round {r + 1}/{args.rounds} done', file=sys.stderr, flush=True)
        after_round(r + 1)


def spread(values: list) -> dict:
    """Median, min and max of a list of numbers."""
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def paired_ratio(samples: list, ref_samples: list, invert: bool = False) -> float:
    """Median over rounds of (this model's round median / the reference's round median).

    Pairing by round cancels slow drifts of a shared machine; `invert` gives reference / model
    (for rates computed from times).
    """
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(samples, ref_samples)]
    ratios = [1. / r for r in ratios] if invert else ratios
    return statistics.median(ratios)


def summarize(entries: dict, memory: dict, args) -> dict:
    """Per-model summary: params, train ms/step, infer images/s, peak memory MB, and ratios vs the reference."""
    ref = reference_label(args)
    out = {}
    for name, e in entries.items():
        s = dict(model=e['name'], dtype=e['dtype'], attn_path=e['attn_path'], params=e['params'])
        if args.train:
            flat = [t for rnd in e['train_s'] for t in rnd]
            s['train_ms'] = {k: 1e3 * v for k, v in spread(flat).items()}
            s['train_ratio'] = paired_ratio(e['train_s'], entries[ref]['train_s'])
            s['train_cpu_ratio'] = paired_ratio(e['train_cpu_s'], entries[ref]['train_cpu_s'])
        if args.infer:
            rates = [args.batch_size / t for rnd in e['infer_s'] for t in rnd]
            s['infer_imgs_per_s'] = spread(rates)
            s['infer_ratio'] = paired_ratio(e['infer_s'], entries[ref]['infer_s'], invert=True)
            s['infer_cpu_ratio'] = paired_ratio(e['infer_cpu_s'], entries[ref]['infer_cpu_s'], invert=True)
        if name in memory:
            s['peak_mb'] = memory[name]['peak_mb']
            s['peak_ratio'] = memory[name]['peak_mb'] / memory[ref]['peak_mb']
            if 'tensor_peak_mb' in memory[name]:
                s['tensor_peak_mb'] = memory[name]['tensor_peak_mb']
                s['tensor_peak_ratio'] = memory[name]['tensor_peak_mb'] / memory[ref]['tensor_peak_mb']
            if 'saved_bytes' in memory[name]:
                s['saved_bytes'] = memory[name]['saved_bytes']
                s['saved_ratio'] = memory[name]['saved_bytes'] / memory[ref]['saved_bytes']
        for key in ('compile_train_s', 'compile_infer_s'):
            if key in e:
                s[key] = e[key]
        out[name] = s
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------

def load_average() -> list:
    """1, 5 and 15 minute load averages (empty where unavailable): how busy a shared machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def environment(args, device: torch.device) -> dict:
    """What the numbers depend on: versions, device, threads."""
    env = dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
               processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               threads=torch.get_num_threads(), device=str(device), load_average_start=load_average())
    try:
        import timm
        env['timm'] = timm.__version__
    except ImportError:
        pass
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    return env


def format_table(summary: dict, args) -> str:
    """Fixed-width table of the summary. Ratios are vs the reference: time and memory as model / reference
    (above 1 is slower / bigger), throughput as model / reference (below 1 is slower); 'x cpu' columns
    (CPU device only) are the same ratios from process CPU time instead of wall time."""
    ref = reference_label(args)
    cpu = torch.device(args.device).type == 'cpu'  # CPU-time ratios: robust to a shared CPU
    cols = ['model', 'params (M)']
    if args.train:
        cols += ['train ms/step median (min-max)', 'train x'] + (['train x cpu'] if cpu else [])
    if args.infer:
        cols += ['infer img/s median (min-max)', 'infer x'] + (['infer x cpu'] if cpu else [])
    if any('peak_mb' in s for s in summary.values()):
        cols += ['peak MB', 'mem x']
    if any('tensor_peak_mb' in s for s in summary.values()):
        cols += ['tensor MB', 'tensor x']
    if any('saved_bytes' in s for s in summary.values()):
        cols += ['saved MB', 'saved x']
    if args.compile:
        cols += ['compile s (train+infer)']
    rows = []
    for name, s in summary.items():
        row = [name + (' *' if name == ref else ''), f'{s["params"] / 1e6:.2f}']
        if args.train:
            t = s['train_ms']
            row += [f'{t["median"]:.1f} ({t["min"]:.1f}-{t["max"]:.1f})', f'{s["train_ratio"]:.3f}']
            row += [f'{s["train_cpu_ratio"]:.3f}'] if cpu else []
        if args.infer:
            r = s['infer_imgs_per_s']
            row += [f'{r["median"]:.1f} ({r["min"]:.1f}-{r["max"]:.1f})', f'{s["infer_ratio"]:.3f}']
            row += [f'{s["infer_cpu_ratio"]:.3f}'] if cpu else []
        if 'peak MB' in cols:
            row += [f'{s["peak_mb"]:.0f}', f'{s["peak_ratio"]:.3f}'] if 'peak_mb' in s else ['-', '-']
        if 'tensor MB' in cols:
            has = 'tensor_peak_mb' in s
            row += [f'{s["tensor_peak_mb"]:.0f}', f'{s["tensor_peak_ratio"]:.3f}'] if has else ['-', '-']
        if 'saved MB' in cols:  # four decimals: a per-block token mean is a few parts in 10^4
            has = 'saved_bytes' in s
            row += [f'{s["saved_bytes"] / 2 ** 20:.1f}', f'{s["saved_ratio"]:.4f}'] if has else ['-', '-']
        if args.compile:
            row += [f'{s.get("compile_train_s", 0.) + s.get("compile_infer_s", 0.):.1f}']
        rows.append(row)
    return render_table(cols, rows)


def render_table(header: list, rows: list) -> str:
    """Columns padded to their widest cell: first column left-aligned, numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return ' | '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return '\n'.join([line(header), '-+-'.join('-' * w for w in widths)] + [line(r) for r in rows])


def describe(args, env: dict) -> str:
    """One line naming the configuration the table was measured in (and how busy the machine was)."""
    gpu = f' ({env["gpu"]})' if 'gpu' in env else ''
    load = '->'.join(f'{v[0]:.1f}' for v in (env.get('load_average_start'), env.get('load_average_end')) if v)
    timing = (f'{args.rounds} rounds x {args.steps} steps, warmup {args.warmup}' if args.train or args.infer
              else f'memory only, {args.memory_steps} training steps')
    return (f'device {env["device"]}{gpu}, torch {env["torch"]}, {env["threads"]} threads of {env["cpu_count"]} '
            f'CPUs{", load average " + load if load else ""}; dtype {"/".join(args.dtype)}, '
            f'{"/".join(args.attn_path)} attention, batch {args.batch_size}, {args.img_size} px, {timing}'
            f'{", compiled" if args.compile else ""}; * = reference; ratios are paired per round (median)')


def write_json(path: str, payload: dict) -> None:
    """Write `payload` as indented JSON, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))


def make_payload(entries: dict, memory: dict, args, env: dict, rounds_done: int) -> dict:
    """The JSON document: configuration, environment, every raw sample, and the summary of the rounds done."""
    raw = {label: dict(train_s=e['train_s'], infer_s=e['infer_s'], train_cpu_s=e['train_cpu_s'],
                       infer_cpu_s=e['infer_cpu_s'], memory=memory.get(label),
                       **{k: e[k] for k in ('compile_train_s', 'compile_infer_s') if k in e})
           for label, e in entries.items()}
    config = {k: v for k, v in vars(args).items() if k != 'memory_child'}
    config['reference'] = reference_label(args)
    return dict(config=config, environment=env, rounds_done=rounds_done, raw=raw,
                summary=summarize(entries, memory, args))


def benchmark_models(args) -> dict:
    """Measure every model in --models (in every --dtype) and print the table; returns the JSON payload.

    With --json, the file is rewritten after each round, so an interrupted run keeps its samples.
    """
    device = torch.device(args.device)
    env = environment(args, device)
    memory = {}
    if args.memory:  # before the timing, so children never compete with the timed steps for the CPU
        for label, (name, dtype, path) in variants(args).items():
            memory[label] = measure_memory(name, dtype, path, args)
            print(f'memory {label}: peak {memory[label]["peak_mb"]:.0f} MB', file=sys.stderr, flush=True)
    entries = {}
    for label, (name, dtype, path) in variants(args).items():
        torch.manual_seed(args.seed)
        model, optimizer, scaler = build(name, args, device, dtype, path)
        params = sum(p.numel() for p in model.parameters())
        if args.compile:
            model = torch.compile(model)
        entries[label] = dict(name=name, dtype=dtype, attn_path=path, amp_dtype=DTYPES[dtype], model=model, optimizer=optimizer,
                              scaler=scaler, batch=make_batch(args, device), params=params,
                              train_s=[], infer_s=[], train_cpu_s=[], infer_cpu_s=[])
    for entry in entries.values():
        warm_up(entry, args, device)

    def save(rounds_done):
        if args.json and rounds_done < args.rounds:
            write_json(args.json, make_payload(entries, memory, args, env, rounds_done))
    run_rounds(entries, args, device, after_round=save)
    env['load_average_end'] = load_average()
    payload = make_payload(entries, memory, args, env, args.rounds if args.train or args.infer else 0)
    print(describe(args, env))
    print(format_table(payload['summary'], args))
    return payload


def benchmark_cost(args) -> dict:
    """--cost: every model's predicted GPU cost (gpu_cost.py), per --dtype and --attn-path, with ratios to the
    reference, printed as a table; returns the JSON payload. Predictions, not measurements."""
    accounts = {}
    for label, (name, dtype, path) in variants(args).items():
        model = gpu_cost.fake_model(lambda: create(name, args))
        models.set_fused_attn(model, path == 'fused')
        accounts[label] = {mode: gpu_cost.account(model, args.batch_size, args.img_size, args.num_classes,
                                                  mode == 'train', DTYPES[dtype]) for mode in ('train', 'infer')}
    gpus, ref = [gpu_cost.GPUS[g] for g in args.cost], reference_label(args)
    summary = gpu_cost.summarize(accounts, ref, gpus)
    print(f'predicted from the ops dispatched (not measured): training step = forward + loss + backward, inference '
          f'= one forward; batch {args.batch_size}, {args.img_size} px, autocast {"/".join(args.dtype)}, '
          f'{"/".join(args.attn_path)} attention; ' + ', '.join(f'{g.name}: {g.flops / 1e12:.0f} TFLOP/s, '
                                                             f'{g.bandwidth / 1e12:.2f} TB/s' for g in gpus)
          + f', {1e6 * gpu_cost.KERNEL_FLOOR_S:.0f} us per kernel; * = reference')
    print(render_table(*gpu_cost.format_table(summary, ref, gpus)))
    config = {k: v for k, v in vars(args).items() if k != 'memory_child'}
    payload = dict(config=dict(config, reference=ref), summary=summary)
    if args.cost_changes:
        payload['changes'] = print_changes(accounts, ref, gpus[0])
    return payload


def print_changes(accounts: dict, reference: str, gpu: gpu_cost.GPU) -> dict:
    """--cost-changes: per model other than the reference and per pass, the ops it adds or drops (gpu_cost.op_changes),
    printed as a table under a line with the totals; returns the rows."""
    changes = {}
    for label, modes in accounts.items():
        if label == reference:
            continue
        changes[label] = {}
        for mode, acc in modes.items():
            ref = accounts[reference][mode]
            rows = changes[label][mode] = gpu_cost.op_changes(acc, ref, gpu)
            delta = 1e6 * (acc.seconds(gpu) - ref.seconds(gpu))
            print(f'\n{label}, {"training step" if mode == "train" else "inference pass"}, against {reference}: '
                  f'{acc.count - ref.count:+d} ops, {delta:+.1f} us on {gpu.name} '
                  f'({acc.seconds(gpu) / ref.seconds(gpu):.4f}x)')
            if rows:
                print(render_table(*gpu_cost.format_changes(rows)))
    return changes


# ---------------------------------------------------------------------------------------------------------------
# Input pipeline (--data)
# ---------------------------------------------------------------------------------------------------------------

def deit_data_args(img_size: int = 224) -> Namespace:
    """main.py's default augmentation options, as build_transform reads them."""
    return Namespace(input_size=img_size, color_jitter=0.4, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic',
                     reprob=0.25, remode='pixel', recount=1, eval_crop_ratio=0.875, ThreeAugment=False, src=False,
                     shift_aug=0.)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list:
    """`count` photo-like JPEGs of ImageNet's typical sizes (500x375, 375x500, 500x333), quality 90.

    Smooth colour fields plus grain: decode cost and file size (~100 KB) close to ImageNet's, unlike pure
    noise (too big) or flat images (too small).
    """
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (500, 333)]
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        coarse = Image.fromarray(rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        path = folder / f'img_{i:04d}.JPEG'
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def transform_rates(paths: list, transform) -> tuple:
    """(images per wall second, images per CPU second) of decode + `transform` over `paths`, in this process.

    One process with one torch thread is what a DataLoader worker is, so these are per-worker rates; the CPU
    rate is what the worker reaches on a core of its own, whatever else the machine is running.
    """
    from datasets import load_rgb
    wall, cpu = time.perf_counter(), time.process_time()
    for p in paths:
        transform(load_rgb(str(p)))
    return len(paths) / (time.perf_counter() - wall), len(paths) / (time.process_time() - cpu)


def benchmark_data(args) -> dict:
    """Per-worker images/s of JPEG decoding alone and of DeiT's train and eval transforms (decoding included),
    and the workers needed per GPU for each `--target-imgs-per-s` (from the per-CPU-second rate)."""
    from datasets import build_transform, load_rgb
    torch.set_num_threads(1)  # as inside a DataLoader worker
    data_args = deit_data_args(args.img_size)
    transforms = {'decode only': lambda img: img, 'train': build_transform(True, data_args),
                  'eval': build_transform(False, data_args)}
    raw = {split: dict(imgs_per_s=[], imgs_per_cpu_s=[]) for split in transforms}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.data_images, args.seed)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        for t in transforms.values():  # warm-up: first-call imports and caches
            t(load_rgb(str(paths[0])))
        for _ in range(args.data_passes):  # passes interleave the transforms
            for split, t in transforms.items():
                per_wall, per_cpu = transform_rates(paths, t)
                raw[split]['imgs_per_s'].append(per_wall)
                raw[split]['imgs_per_cpu_s'].append(per_cpu)
    summary = {}
    for split, rates in raw.items():
        cpu_rate = statistics.median(rates['imgs_per_cpu_s'])
        summary[split] = dict(imgs_per_s=spread(rates['imgs_per_s']), imgs_per_cpu_s=spread(rates['imgs_per_cpu_s']),
                              workers_needed={str(t): math.ceil(t / cpu_rate) for t in args.target_imgs_per_s})
    env = environment(args, torch.device('cpu'))
    load = f', load average {env["load_average_start"][0]:.1f}' if env['load_average_start'] else ''
    print(f'input pipeline: {args.data_images} generated JPEGs (mean {mean_kb:.0f} KB, ~500x375) -> '
          f'{args.img_size} px, {args.data_passes} passes, 1 thread per worker; {os.cpu_count()} CPUs here{load}')
    header = ['transform', 'img/s per worker median (min-max)', 'img/s per CPU-s']
    header += [f'workers @ {t:g} img/s' for t in args.target_imgs_per_s]
    rows = []
    for split, s in summary.items():
        wall = s['imgs_per_s']
        rows.append([split, f'{wall["median"]:.1f} ({wall["min"]:.1f}-{wall["max"]:.1f})',
                     f'{s["imgs_per_cpu_s"]["median"]:.1f}'] + [str(s['workers_needed'][str(t)])
                                                               for t in args.target_imgs_per_s])
    print(render_table(header, rows))
    config = dict(mode='data', img_size=args.img_size, data_images=args.data_images, passes=args.data_passes,
                  target_imgs_per_s=args.target_imgs_per_s, mean_jpeg_kb=mean_kb, transform_args=vars(data_args))
    return dict(config=config, environment=env, raw=raw, summary=summary)


@cli.one_line_errors('benchmark.py')
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    if args.data:
        payload = benchmark_data(args)
    else:
        check_args(args)
        payload = benchmark_cost(args) if args.cost else benchmark_models(args)
    if args.json:
        write_json(args.json, payload)
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
