#!/usr/bin/env python3
"""The GPU check: what a CPU test suite cannot show, measured on one CUDA GPU and printed as one table, every row
judged against a bound it states (or reported only, marked '-').

  1. dL/dλ of every add-on path (AttnScale, FeatScale; ViT/DeiT, CaiT, Swin) as training computes it under
     float16 and bfloat16 autocast, against float64 central differences (scripts/gpu_check_gains.py): relative
     error at most 32 u (u: the dtype's unit roundoff).
  2. Training: two passes over the same few batches, through engine.train_one_epoch (what main.py runs), for
     AttnScale and FeatScale, float16 + GradScaler and bfloat16 (AttnScale also compiled): the loss of the
     second pass is lower, every weight and every gain has changed, no bfloat16 step is skipped, at most
     MAX_SKIPPED float16 steps are, and the loss scale ends at SCALE_FLOOR or above.
  3. DDP in a one-process group (NCCL; gloo on CPU), wrapped as main.py wraps it (DDP, then torch.compile): it
     trains as in 2, and without compile ends bit for bit where the same steps without DDP end.
  4. Resume: float16 + GradScaler steps, a checkpoint written and read back as main.py does (weights, optimizer,
     GradScaler and RNG states), then the rest of the steps: bit for bit the uninterrupted run where two
     uninterrupted runs agree bit for bit on the device, else within 4x their own difference.
  5. Host synchronisations per training step (CUDA): float32, bfloat16, float16 + GradScaler; at most 1 each.
  6. benchmark.py: attnscale_small_12 against timm's deit_small_patch16_224 at batch 128 in bfloat16. Reported.

    bash scripts/gpu_check.sh                          # one CUDA GPU, a few minutes
    bash scripts/gpu_check.sh --self-test              # the check, then again under each sabotage: it must fail
    bash scripts/gpu_check.sh --device cpu --tiny --compile-backend aot_eager --self-test   # the test suite's run

`--sabotage KIND` runs the check with the gains' gradients sabotaged under float16/bfloat16 autocast (zero,
negate, x10, nan), by tensor hooks on the gain parameters; `--self-test` runs it clean and then with each
sabotage (sections 1-2, without torch.compile), in one process. Exit status: 0 when every judged row passes
(with --self-test: when the clean run passes and every sabotaged run fails), 1 otherwise.
"""
import argparse
import contextlib
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gpu_check_gains as gain_check  # noqa: E402
import main as trainer  # noqa: E402  (main.py's own model, optimizer and checkpoint code)
import utils  # noqa: E402
from engine import NonFiniteLossError, train_one_epoch  # noqa: E402
from losses import DistillationLoss  # noqa: E402
from models.checkpoint import load_checkpoint, load_state_dict, model_state  # noqa: E402

TINY_KWARGS = ['depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8']
LR = 5e-4
MAX_SKIPPED = 4  # float16 steps a training run may skip (the GradScaler calibrating its scale)
SCALE_FLOOR = 2. ** 16 / 2 ** MAX_SKIPPED  # GradScaler starts at 2^16 and halves on each skipped step
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('GPU check', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--tiny', action='store_true', help='toy sizes (2 blocks, width 48, 32 px): a CPU run')
    p.add_argument('--models', nargs='+', default=['attnscale_small_12', 'featscale_small_12'],
                   help='models trained in section 2 (the first one also in 3-6)')
    p.add_argument('--reference', default='deit_small_patch16_224', help='benchmark.py reference model (timm)')
    p.add_argument('--train-steps', type=int, default=None, help='steps per pass (default 10; --tiny: 4)')
    p.add_argument('--batch-size', type=int, default=None, help='training batch (default 64; --tiny: 4)')
    p.add_argument('--gain-batch-size', type=int, default=None, help='section 1 batch (default 8; --tiny: 4)')
    p.add_argument('--fd-entries', type=int, default=None,
                   help='entries of each gain checked by finite differences, at random (default 64; --tiny: 16)')
    p.add_argument('--bench-batch-size', type=int, default=None, help='benchmark.py batch (default 128; --tiny: 4)')
    p.add_argument('--no-compile', action='store_false', dest='compile', help='skip the torch.compile runs')
    p.add_argument('--compile-backend', default='inductor',
                   help='torch.compile backend (aot_eager on a CPU: the same tracing, no code generation)')
    p.add_argument('--no-benchmark', action='store_false', dest='benchmark', help='skip section 6')
    p.add_argument('--sabotage', choices=sorted(gain_check.SABOTAGES), default=None,
                   help="run the check with the gains' gradients sabotaged under low precision (it must fail)")
    p.add_argument('--self-test', action='store_true',
                   help='run the check, then sections 1-2 once per sabotage; exit 0 when only the clean run passes')
    p.add_argument('--json', default='', metavar='OUT', help='also write every number here')
    return p


def sizes(args) -> dict:
    """Image size, classes, model kwargs, steps and batch sizes of this run."""
    tiny = args.tiny
    return dict(img_size=32 if tiny else 224, num_classes=10 if tiny else 1000,
                model_kwargs=TINY_KWARGS if tiny else [], steps=args.train_steps or (4 if tiny else 10),
                batch=args.batch_size or (4 if tiny else 64), gain_batch=args.gain_batch_size or (4 if tiny else 8),
                fd_entries=args.fd_entries if args.fd_entries is not None else (16 if tiny else 64),
                bench_batch=args.bench_batch_size or (4 if tiny else 128))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def row(section: str, setting: str, ok, result: str, **numbers) -> dict:
    return dict(section=section, setting=setting, ok=ok, result=result, numbers=numbers)


# ---------------------------------------------------------------------------------------------------------------
# Training runs, as main.py trains (sections 2-5)
# ---------------------------------------------------------------------------------------------------------------

def build(args, size: dict, name: str, device: torch.device, seed: int = 0):
    """`name` as main.py builds it (its flags' defaults: drop-path 0.1, AdamW, weight decay 0.05): (model,
    optimizer, main.py's flags)."""
    train_args = trainer.get_args_parser().parse_args(
        ['--model', name, '--input-size', str(size['img_size']), '--model-kwargs', *size['model_kwargs']])
    torch.manual_seed(seed)
    model = trainer.build_model(train_args, size['num_classes']).to(device)
    return model, trainer.build_optimizer(train_args, model, LR), train_args


def batches(size: dict, device: torch.device, count: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size['batch'], 3, size['img_size'], size['img_size'], generator=gen).to(device),
             torch.randint(0, size['num_classes'], (size['batch'],), generator=gen).to(device)) for _ in range(count)]


class StepWatch:
    """Counts the optimizer steps of a run (a step the GradScaler skips never reaches the optimizer) and those
    that changed every add-on gain. Compares on the device: not for runs whose synchronisations are counted."""

    def __init__(self, optimizer, model):
        self.gains = [p for _, p in gain_check.gains(model)]
        self.ran, self.updating, self.before = 0, 0, []
        optimizer.register_step_pre_hook(self.pre)
        optimizer.register_step_post_hook(self.post)

    def pre(self, optimizer, args, kwargs):
        self.before = [g.detach().clone() for g in self.gains]

    def post(self, optimizer, args, kwargs):
        self.ran += 1
        self.updating += all(not torch.equal(a, g) for a, g in zip(self.before, self.gains))


def train_pass(net, model, optimizer, scaler, data, device, amp_dtype, sabotage=None) -> float:
    """One engine.train_one_epoch over `data` (progress lines hidden), the gains' gradients sabotaged under low
    precision if asked: the pass's mean loss."""
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0., 1.)
    with contextlib.redirect_stdout(io.StringIO()), gain_check.sabotaged(model, sabotage):
        stats, _, _ = train_one_epoch(net, criterion, data, optimizer, device, 0, scaler, amp_dtype,
                                      print_freq=10 ** 6)
    return stats['loss']


def trained(net, model, optimizer, scaler, data, device, amp_dtype, sabotage) -> dict:
    """Two passes over `data`: the numbers every training row is judged on (see `judge`)."""
    watch = StepWatch(optimizer, model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    sync(device)
    began = time.perf_counter()
    losses = [train_pass(net, model, optimizer, scaler, data, device, amp_dtype, sabotage) for _ in range(2)]
    sync(device)
    gain_names = {n for n, _ in gain_check.gains(model)}
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), start[n])]
    return dict(loss_first_pass=losses[0], loss_second_pass=losses[1], steps=2 * len(data), optimizer_steps=watch.ran,
                gain_updating_steps=watch.updating, seconds=time.perf_counter() - began,
                unchanged_weights=[n for n in unchanged if n not in gain_names],
                unchanged_gains=[n for n in unchanged if n in gain_names], weights=len(start) - len(gain_names),
                gains=len(gain_names), loss_scale=scaler.get_scale() if scaler is not None else None)


def judge(numbers: dict) -> tuple:
    """(ok, result) of a training run: the loss falls from the first pass to the second, every weight and gain
    changed, no step skipped in bfloat16 and at most MAX_SKIPPED in float16, each step that ran changed every
    gain, and the loss scale ends at SCALE_FLOOR or above."""
    n = numbers
    skipped, still = n['steps'] - n['optimizer_steps'], n['optimizer_steps'] - n['gain_updating_steps']
    problems = []
    if not n['loss_second_pass'] < n['loss_first_pass']:
        problems.append('the loss did not fall')
    for kind in ('weights', 'gains'):
        if n[f'unchanged_{kind}']:
            problems.append(f"{len(n[f'unchanged_{kind}'])} {kind} unchanged ({n[f'unchanged_{kind}'][0]}, ...)")
    if skipped > (MAX_SKIPPED if n['loss_scale'] is not None else 0):
        problems.append(f"{skipped} of {n['steps']} steps skipped")
    if still:
        problems.append(f"{still} of the {n['optimizer_steps']} optimizer steps left a gain unchanged")
    if n['loss_scale'] is not None and not n['loss_scale'] >= SCALE_FLOOR:
        problems.append(f"loss scale {n['loss_scale']:g} < {SCALE_FLOOR:g}")
    scale = f", loss scale {n['loss_scale']:g} (>= {SCALE_FLOOR:g})" if n['loss_scale'] is not None else ''
    result = (f"loss {n['loss_first_pass']:.3f} -> {n['loss_second_pass']:.3f}, all {n['weights']} weights and "
              f"{n['gains']} gains changed, {skipped} of {n['steps']} steps skipped{scale}")
    return (False, 'FAILED: ' + '; '.join(problems)) if problems else (True, result)


def training_configs(device: torch.device, compile_: bool) -> list:
    """(label, autocast dtype, GradScaler?, torch.compile?) of each training run; compiled: main.py's default
    precision on CUDA (float16 + GradScaler), bfloat16 on CPU."""
    configs = [('float16 + GradScaler', torch.float16, True, False), ('bfloat16', torch.bfloat16, False, False)]
    if compile_:
        configs.append(('compile, float16 + GradScaler', torch.float16, True, True) if device.type == 'cuda' else
                       ('compile, bfloat16', torch.bfloat16, False, True))
    return configs


def check_training(args, size: dict, device: torch.device, sabotage=None) -> list:
    """Rows of section 2: each model in each configuration (compiled: the first model), two passes over the
    same batches."""
    rows = []
    for i, name in enumerate(args.models):
        for label, amp_dtype, use_scaler, compile_ in training_configs(device, args.compile and i == 0):
            model, optimizer, _ = build(args, size, name, device)
            scaler = torch.amp.GradScaler(device.type) if use_scaler else None
            net = torch.compile(model, backend=args.compile_backend) if compile_ else model
            try:
                numbers = trained(net, model, optimizer, scaler, batches(size, device, size['steps']), device,
                                  amp_dtype, sabotage)
            except NonFiniteLossError as e:
                rows.append(row(f'training {name}', label, False, f'FAILED: {e}'))
                continue
            ok, result = judge(numbers)
            ms = 1e3 * numbers['seconds'] / numbers['steps']
            rows.append(row(f'training {name}', label, ok, f'{result}; {ms:.0f} ms/step', **numbers))
        if i == 0 and not args.compile:
            rows.append(row(f'training {name}', 'compile', None, 'skipped (--no-compile)'))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 3. DDP in a one-process group
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def one_process_group(device: torch.device):
    """A process group of this process alone (an in-memory store): NCCL on CUDA, gloo on CPU."""
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def check_ddp(args, size: dict, device: torch.device, sabotage=None) -> list:
    """Rows of section 3: float16 + GradScaler (the CPU one on a CPU) through DDP as main.wrap_model wraps it,
    eager (compared with the same steps without DDP) and compiled after DDP."""
    name, data = args.models[0], batches(size, device, size['steps'])
    plain, optimizer, _ = build(args, size, name, device)
    try:
        trained(plain, plain, optimizer, torch.amp.GradScaler(device.type), data, device, torch.float16, sabotage)
    except NonFiniteLossError:
        pass  # the DDP run fails the same way and says so
    rows = []
    with one_process_group(device) as backend:
        for compile_ in (False, True):
            label = f"{backend}, 1 process, float16 + GradScaler{', compile after DDP' if compile_ else ''}"
            if compile_ and not args.compile:
                rows.append(row('DDP', label, None, 'skipped (--no-compile)'))
                continue
            model, optimizer, train_args = build(args, size, name, device)
            net = trainer.wrap_model(model, argparse.Namespace(**dict(vars(train_args), compile=False)), device)
            if compile_:
                net = torch.compile(net, backend=args.compile_backend)  # main.wrap_model's order: DDP first
            try:
                numbers = trained(net, model, optimizer, torch.amp.GradScaler(device.type), data, device,
                                  torch.float16, sabotage)
            except NonFiniteLossError as e:
                rows.append(row('DDP', label, False, f'FAILED: {e}'))
                continue
            ok, result = judge(numbers)
            if not compile_:
                differ = [n for (n, p), q in zip(model.named_parameters(), plain.parameters()) if not torch.equal(p, q)]
                numbers['differ_from_plain'] = differ
                if differ:
                    ok, result = False, f'FAILED: {len(differ)} weights differ from the run without DDP ({differ[0]})'
                elif ok:
                    result += '; bit for bit the run without DDP (one process: the all-reduce is a copy)'
            elif not isinstance(getattr(net, '_orig_mod', None), torch.nn.parallel.DistributedDataParallel):
                ok, result = False, 'FAILED: the compiled module is not the DDP module'
            rows.append(row('DDP', label, ok, result, **numbers))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 4. Resume with GradScaler state
# ---------------------------------------------------------------------------------------------------------------

def training_state(model, optimizer, train_args) -> trainer.TrainingState:
    """main.py's TrainingState of a float16 run (its GradScaler, its LR schedule)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its 'learning rate' line
        _, lr_scheduler, scaler = trainer.build_optimization(train_args, model, torch.float16, steps_per_epoch=1)
    return trainer.TrainingState(model, None, optimizer, lr_scheduler, scaler, run_args={})


def states(state: trainer.TrainingState) -> dict:
    """Every tensor a resumed run must continue from: weights, optimizer state, GradScaler state."""
    out = {f'model.{k}': v for k, v in state.model.state_dict().items()}
    for i, s in state.optimizer.state_dict()['state'].items():
        out.update({f'optimizer.{i}.{k}': v for k, v in s.items() if isinstance(v, torch.Tensor)})
    out.update({f'scaler.{k}': torch.tensor(v) for k, v in state.loss_scaler.state_dict().items()})
    return out


def resumed_run(args, size, device, data, folder: Path, sabotage) -> dict:
    """The steps of `data` in two halves with a checkpoint between them, written and read back as main.py does
    (atomically, weights-only): the model and optimizer of the second half are built afresh (another seed)."""
    half = len(data) // 2
    model, optimizer, train_args = build(args, size, args.models[0], device)
    state = training_state(model, optimizer, train_args)
    train_pass(model, model, optimizer, state.loss_scaler, data[:half], device, torch.float16, sabotage)
    state.save(str(folder / 'checkpoint.pth'), rng=[utils.rng_state()])
    model, optimizer, train_args = build(args, size, args.models[0], device, seed=1)
    state = training_state(model, optimizer, train_args)
    ckpt = load_checkpoint(str(folder / 'checkpoint.pth'))
    load_state_dict(model, model_state(ckpt))
    state.load_state_dict(ckpt)
    utils.set_rng_state(ckpt['rng'][0])
    train_pass(model, model, optimizer, state.loss_scaler, data[half:], device, torch.float16, sabotage)
    return states(state)


def uninterrupted_run(args, size, device, data, sabotage) -> dict:
    model, optimizer, train_args = build(args, size, args.models[0], device)
    state = training_state(model, optimizer, train_args)
    half = len(data) // 2
    for part in (data[:half], data[half:]):
        train_pass(model, model, optimizer, state.loss_scaler, part, device, torch.float16, sabotage)
    return states(state)


def largest_difference(a: dict, b: dict) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a.values(), b.values()))


def check_resume(args, size: dict, device: torch.device, sabotage=None) -> list:
    """Row of section 4: the resumed run against the uninterrupted one, float16 + GradScaler."""
    data = batches(size, device, 2 * size['steps'])
    label = f'float16 + GradScaler, {len(data) // 2} + {len(data) // 2} steps'
    try:
        reference = uninterrupted_run(args, size, device, data, sabotage)
        again = uninterrupted_run(args, size, device, data, sabotage)
        with tempfile.TemporaryDirectory() as folder:
            resumed = resumed_run(args, size, device, data, Path(folder), sabotage)
    except NonFiniteLossError as e:
        return [row('resume', label, False, f'FAILED: {e}')]
    noise = largest_difference(again, reference)
    unequal = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    scaler = f"loss scale {resumed['scaler.scale'].item():g}, growth tracker {resumed['scaler._growth_tracker'].item()}"
    numbers = dict(tensors=len(reference), unequal=unequal, run_to_run=noise,
                   largest_difference=largest_difference(resumed, reference) if unequal else 0.)
    if not unequal:
        return [row('resume', label, True, f'bit for bit the uninterrupted run ({len(reference)} tensors; {scaler})',
                    **numbers)]
    scaler_unequal = [k for k in unequal if k.startswith('scaler.')]
    ok = noise > 0 and not scaler_unequal and numbers['largest_difference'] <= 4 * noise
    why = (f"{len(unequal)} of {len(reference)} tensors differ by up to {numbers['largest_difference']:.1e}; two "
           f'uninterrupted runs differ by {noise:.1e}')
    if scaler_unequal:
        why += f" and the GradScaler state differs ({', '.join(k[len('scaler.'):] for k in scaler_unequal)})"
    return [row('resume', label, ok, f'{why}: within 4x that' if ok else f'FAILED: {why}; first: {unequal[0]}',
                **numbers)]


# ---------------------------------------------------------------------------------------------------------------
# 5. Host synchronisations per step
# ---------------------------------------------------------------------------------------------------------------

class Marked:
    """Iterates `data`, noting how many warnings `caught` holds each time a batch is handed out, so that each
    step's synchronisation warnings can be told apart."""

    def __init__(self, data: list, caught: list):
        self.data, self.caught, self.marks = data, caught, []

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            self.marks.append(len(self.caught))
            yield batch
        self.marks.append(len(self.caught))

    def per_step(self) -> list:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def syncs_per_step(args, size, device, amp_dtype) -> list:
    """Host synchronisations (torch.cuda.set_sync_debug_mode warnings) of each step of a pass over `steps`
    batches, after a first pass (allocator, kernel choice)."""
    model, optimizer, _ = build(args, size, args.models[0], device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    data = batches(size, device, size['steps'])
    train_pass(model, model, optimizer, scaler, data, device, amp_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        marked = Marked(data, caught)
        torch.cuda.set_sync_debug_mode('warn')
        try:
            train_pass(model, model, optimizer, scaler, marked, device, amp_dtype)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    hits = [i for i, w in enumerate(caught) if 'synchroniz' in str(w.message)]
    return [sum(a <= i < b for i in hits) for a, b in zip(marked.marks, marked.marks[1:])]


def check_syncs(args, size: dict, device: torch.device) -> list:
    """Rows of section 5, one per precision: the steps between the first and the last (which print progress
    lines) must synchronise at most once each."""
    rows = []
    for label, amp_dtype in (('float32', torch.float32), ('bfloat16', torch.bfloat16),
                             ('float16 + GradScaler', torch.float16)):
        if device.type != 'cuda':
            rows.append(row('host syncs per step', label, None,
                            'skipped on CPU: no device to wait for (tests/test_step_sync.py counts host reads)'))
            continue
        if size['steps'] < 3:
            rows.append(row('host syncs per step', label, None, 'skipped: needs --train-steps 3 or more'))
            continue
        counts = syncs_per_step(args, size, device, amp_dtype)[1:-1]
        rows.append(row('host syncs per step', label, max(counts) <= 1,
                        f"{', '.join(map(str, counts))} (steps 2-{len(counts) + 1}; at most 1 each)", counts=counts))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 6. benchmark.py against timm's DeiT-S
# ---------------------------------------------------------------------------------------------------------------

def check_benchmark(args, size: dict, device: torch.device) -> list:
    """Rows of section 6, from benchmark.py's JSON summary (its command line, as a user runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'bench.json'
        cmd = [sys.executable, str(ROOT / 'benchmark.py'), '--models', args.reference, args.models[0],
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
            return [row('benchmark.py', ' '.join(cmd[2:6]), False, f'benchmark.py failed ({proc.returncode}): {tail}')]
        summary = json.loads(out.read_text())['summary']
    return [row('benchmark.py', f"{label}, batch {size['bench_batch']}, bfloat16", None,
                f"train {s['train_ms']['median']:.1f} ms/step (x{s['train_ratio']:.3f}), infer "
                f"{s['infer_imgs_per_s']['median']:.0f} img/s (x{s['infer_ratio']:.3f}), peak {s['peak_mb']:.0f} MB "
                f"(x{s['peak_ratio']:.3f})", **s) for label, s in summary.items()]


# ---------------------------------------------------------------------------------------------------------------
# Runs and report
# ---------------------------------------------------------------------------------------------------------------

def run_check(args, size: dict, device: torch.device, sabotage=None, cache=None, sections: str = '123456') -> list:
    """The rows of the chosen sections, with the gains' gradients sabotaged under low precision if asked.
    `cache` keeps section 1's float64 references between runs."""
    rows = []
    if '1' in sections:
        rows += gain_check.check(args.tiny, device, size['gain_batch'], size['fd_entries'], sabotage, cache)
    for number, section in (('2', check_training), ('3', check_ddp), ('4', check_resume)):
        if number in sections:
            rows += section(args, size, device, sabotage)
    if '5' in sections:
        rows += check_syncs(args, size, device)
    if '6' in sections and args.benchmark:
        rows += check_benchmark(args, size, device)
    return rows


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'CPU'
    cuda = f', CUDA {torch.version.cuda}' if device.type == 'cuda' else ''
    import timm
    return f'GPU check on {name} ({device}; torch {torch.__version__}, timm {timm.__version__}{cuda})'


def render(rows: list) -> str:
    """The summary table: check | setting | result | ok."""
    cells = [['check', 'setting', 'result', 'ok']] + [
        [r['section'], r['setting'], r['result'], {True: 'yes', False: 'NO', None: '-'}[r['ok']]] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [' | '.join(c.ljust(w) for c, w in zip(cells_row, widths)).rstrip() for cells_row in cells]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)


def verdict(rows: list) -> tuple:
    """(passed, 'n of m checks passed[, k FAILED]') of the judged rows."""
    judged = [r for r in rows if r['ok'] is not None]
    failed = [r for r in judged if not r['ok']]
    return not failed, f"{len(judged) - len(failed)} of {len(judged)} checks passed" + (
        f', {len(failed)} FAILED' if failed else '')


def self_test(args, size: dict, device: torch.device) -> tuple:
    """The check clean, then sections 1-2 without torch.compile once per sabotage: (exit status, {run: rows})."""
    cache = {}
    runs = {'clean': run_check(args, size, device, cache=cache)}
    eager = argparse.Namespace(**dict(vars(args), compile=False))
    print(render(runs['clean']))
    clean_ok, line = verdict(runs['clean'])
    print(f'clean: {line}', flush=True)
    caught = []
    for kind in sorted(gain_check.SABOTAGES):
        runs[kind] = run_check(eager, size, device, kind, cache, sections='12')
        failed = [r for r in runs[kind] if r['ok'] is False]
        caught.append(bool(failed))
        print(f"\nsabotage '{kind}' (the gains' gradients under float16/bfloat16 autocast, by tensor hooks): "
              f"{len(failed)} rows FAILED" + (', as they must' if failed else ', NOT CAUGHT'))
        print(render(failed or runs[kind]), flush=True)
    ok = clean_ok and all(caught)
    print(f"\nself-test {'passed' if ok else 'FAILED'}: the clean check {'passes' if clean_ok else 'FAILS'}, "
          f'{sum(caught)} of {len(caught)} sabotages caught')
    return (0 if ok else 1), runs


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda but CUDA is not available; pass --device cpu --tiny for a CPU run')
    if device.type == 'cuda':  # an index, as main.py's devices have (DDP's device_ids)
        device = torch.device('cuda', torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    size = sizes(args)
    start = time.time()
    print(describe(device), flush=True)
    if args.self_test:
        status, runs = self_test(args, size, device)
    else:
        runs = {args.sabotage or 'clean': run_check(args, size, device, args.sabotage)}
        rows = next(iter(runs.values()))
        print(render(rows))
        passed, line = verdict(rows)
        status = 0 if passed else 1
        print(f"{line}{f' (sabotage {args.sabotage})' if args.sabotage else ''} ({time.time() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=describe(device), sizes=size, status=status, runs=runs),
                                              indent=1, default=str))
    return status


if __name__ == '__main__':
    sys.exit(main())
