"""Predicted GPU cost of a training step and an inference pass, from the ops they dispatch (no GPU needed).

A CPU step is bound by its matrix products; a bfloat16 GPU step largely by memory traffic and by the number
of kernels it launches. What a step dispatches does not depend on the device, so its GPU cost can be
predicted on the meta device (shapes only: any model size, in seconds) by costing every aten op:

    time(op) = max(FLOPs / peak FLOP/s, bytes read and written / bandwidth) + 2 us (launch floor)

* The model's parameters and buffers are fake tensors (shapes and dtypes, no memory), float32 as a
  mixed-precision run keeps them; the step runs under autocast as CUDA applies it (the CPU's autocast, which
  shares CUDA's list of ops run in low precision, plus CUDA's list of ops run in float32: layer norm, softmax,
  sums, ...), so the casts a GPU run makes are costed too. A training step is forward, cross-entropy loss and
  backward; inference is one forward without autograd.
* Ops that move no data are free: views (per their schema's alias annotations), `_unsafe_view`, and
  allocations (`empty*`). Bytes count each distinct tensor an op reads once and each it writes once (an
  in-place op reads and writes its operand); a broadcast (stride-0) dimension is read once. A matrix product
  that adds a matrix (`addmm` and kin with a 2-D `self`, out of place) is a copy of it into the output and a
  product that reads the output back, as a GPU's BLAS runs it (a 1-D bias goes into the product for free).
* FLOPs come from `torch.utils.flop_counter`'s registry (matrix products, convolutions); elementwise ops
  and reductions count 0 FLOPs (they are bandwidth-bound).
* `F.scaled_dot_product_attention` is costed as one flash kernel, as a GPU runs it (on the meta device it
  would decompose into N x N matrices): forward reads q, k, v (and a mask) and writes the output, 4 B H Nq Nk d
  FLOPs; backward is one kernel that reads q, k, v, out, grad-out and writes dq, dk, dv (and the mask's
  gradient), at 2.5x the forward FLOPs. Explicit attention (matrix products and a softmax) is costed op by op.

These are predictions, not measurements: real kernels reach a fraction of peak, launches overlap, and library
kernels have their own efficiencies. Ratios between models that differ by a few kernels and passes are what
the model predicts well.
"""
import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

KERNEL_FLOOR_S = 2e-6
FLASH_BACKWARD_FLOPS = 2.5  # backward FLOPs per forward FLOP of a flash attention kernel


@dataclass(frozen=True)
class GPU:
    name: str
    flops: float  # dense bfloat16 FLOP/s
    bandwidth: float  # bytes/s

    def seconds(self, flops: float, nbytes: float) -> float:
        """Predicted time of one kernel."""
        return max(flops / self.flops, nbytes / self.bandwidth) + KERNEL_FLOOR_S


GPUS = {'h100': GPU('H100 SXM', 989e12, 3.35e12), 'a100': GPU('A100 SXM', 312e12, 2.0e12)}
FREE_OPS = {'aten::_unsafe_view', 'aten::empty', 'aten::empty_strided', 'aten::empty_like', 'aten::new_empty',
            'aten::new_empty_strided', 'aten::detach', 'aten::lift_fresh', 'prim::device'}
BETA_PRODUCTS = {torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default, torch.ops.aten.addbmm.default}
IN_PLACE_PRODUCTS = {torch.ops.aten.addmm_: flop_registry[torch.ops.aten.addmm],
                     torch.ops.aten.baddbmm_: flop_registry[torch.ops.aten.baddbmm]}
WRITE_ONLY_OPS = {'aten::copy_', 'aten::fill_', 'aten::zero_', 'aten::normal_', 'aten::uniform_',
                  'aten::bernoulli_', 'aten::random_'}


@dataclass
class Op:
    name: str
    phase: str  # 'forward' or 'backward'
    flops: int
    nbytes: int


@dataclass
class Account:
    """The ops one pass dispatched, and their totals."""
    ops: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ops)

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    def seconds(self, gpu: GPU) -> float:
        return sum(gpu.seconds(op.flops, op.nbytes) for op in self.ops)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of memory `t` covers: its element size times its extent over the dimensions that are not
    broadcast (stride 0), so an expanded tensor counts what is stored."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1
    return n


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensors(values) -> list:
    return [t for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


def is_view(func) -> bool:
    """Whether `func` only makes views: every return aliases an input and nothing is written."""
    schema = func._schema
    if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return False
    returns = schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class OpCounter(TorchDispatchMode):
    """Records every data-moving aten op with its FLOPs and bytes, tagged with the current `phase`."""

    def __init__(self, account: Account):
        super().__init__()
        self.account, self.phase = account, 'forward'

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if name in FREE_OPS or is_view(func):
            return out
        mutated = self._written(func, args, kwargs)
        written = mutated + _tensors(out)
        skip = {id(t) for t in mutated} if name in WRITE_ONLY_OPS else set()
        read = [t for t in _tensors((args, {k: v for k, v in kwargs.items() if k != 'out'})) if id(t) not in skip]
        if not read and not written:  # a scalar computation (e.g. promote_types): no kernel
            return out
        counter = flop_registry.get(func._overloadpacket) or IN_PLACE_PRODUCTS.get(func._overloadpacket)
        flops = counter(*args, **kwargs, out_val=out) if counter is not None else 0
        if func in BETA_PRODUCTS and args[0].dim() > 1 and kwargs.get('beta', 1) != 0:
            # a GPU's BLAS adds a matrix `self` by reading it as the product's C operand: first copied into the
            # output (unless it is the output, in place), then read back by the product
            self.record('aten::copy_', self.phase, 0, [args[0]], [out])
            read = [t for t in read if t is not args[0]] + [out]
        self.record(name, self.phase, flops, read, written)
        return out

    def record(self, name: str, phase: str, flops: float, read: list, written: list) -> None:
        """Add one kernel: `read` and `written` tensors (None entries ignored), each distinct one counted once."""
        nbytes = sum(tensor_bytes(t) for group in (read, written)
                     for t in {_key(t): t for t in group if t is not None}.values())
        self.account.ops.append(Op(name, phase, int(flops), nbytes))

    @staticmethod
    def _written(func, args, kwargs) -> list:
        """Tensors the op writes in place (mutable arguments, `out=`), beside its returns."""
        bound = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
        return _tensors([v for a, v in zip(func._schema.arguments, bound)
                         if a.alias_info is not None and a.alias_info.is_write])


def _flash_layout(t: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of `shape` (..., H, N, d) laid out as a flash kernel writes it: (..., N, H, d) in memory."""
    if len(shape) < 4:
        return t.new_empty(shape)
    return t.new_empty(*shape[:-3], shape[-2], shape[-3], shape[-1]).transpose(-2, -3)


class _FlashAttention(torch.autograd.Function):
    """A flash-attention kernel's inputs and outputs, without its arithmetic: shapes for the cost account."""

    @staticmethod
    def forward(ctx, counter, q, k, v, mask):
        ctx.counter = counter
        out = _flash_layout(q, (*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, mask = ctx.saved_tensors
        grads = [_flash_layout(t, t.shape) for t in (q, k, v)]
        grad_mask = mask.new_empty(mask.shape) if mask is not None and ctx.needs_input_grad[4] else None
        flops = FLASH_BACKWARD_FLOPS * attention_flops(q, k, v)
        ctx.counter.record('aten::_flash_attention_backward', 'backward', flops,
                           [q, k, v, out, grad, mask], grads + [grad_mask])
        return None, *grads, grad_mask


def attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """FLOPs of softmax(q k^T) v: 2 Nq Nk d for q k^T and 2 Nq Nk d_v for the product with v, per head."""
    heads = q.numel() // (q.shape[-2] * q.shape[-1])
    return 2 * heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


SDPA_SIGNATURE = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                   scale=None, enable_gqa=False: None)


class FlashAttention(TorchFunctionMode):
    """Costs `F.scaled_dot_product_attention` as one flash kernel forward and one backward (see the module
    docstring), recorded in `counter`'s account, instead of the N x N ops it would decompose into here."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = SDPA_SIGNATURE.bind(*args, **kwargs)
        q, k, v, mask = (call.arguments.get(n) for n in ('query', 'key', 'value', 'attn_mask'))
        out = _FlashAttention.apply(self.counter, q, k, v, mask)
        self.counter.record('aten::_flash_attention_forward', self.counter.phase, attention_flops(q, k, v),
                            [q, k, v, mask], [out])
        return out




# CUDA autocast runs these in float32 (its float32 list, for the functions ViTs call); CPU autocast does not.
FLOAT32_FUNCTIONS = {'layer_norm', 'group_norm', 'softmax', 'log_softmax', 'softmin', 'cross_entropy', 'nll_loss',
                     'sum', 'prod', 'cumsum', 'cumprod', 'exp', 'log', 'pow', 'rsqrt', 'reciprocal', 'norm',
                     'normalize', 'cosine_similarity', 'softplus', 'mse_loss', 'l1_loss', 'kl_div', 'erfinv',
                     'binary_cross_entropy_with_logits', 'logsumexp', 'cdist', 'dist', 'renorm'}


class CudaFloat32Ops(TorchFunctionMode):
    """Autocast's float32 list as CUDA has it, on top of the CPU's autocast (which shares CUDA's list of ops it
    runs in low precision, but runs softmax, layer_norm, sum, ... in their input's dtype): under autocast,
    these functions get their low-precision floating inputs cast to float32 first, as CUDA's autocast does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, '__name__', '') in FLOAT32_FUNCTIONS and torch.is_autocast_enabled('cpu'):
            def widen(t):
                return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            args, kwargs = tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def fake_model(build) -> torch.nn.Module:
    """`build()` with fake CPU tensors for parameters and buffers (shapes and dtypes only, no memory): built on
    the meta device, then moved into a FakeTensorMode, where CPU autocast applies as it does to real tensors."""
    with torch.device('meta'):
        model = build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        return model.to_empty(device='cpu')


def account(model: torch.nn.Module, batch_size: int, img_size: int, num_classes: int, train: bool,
            amp_dtype: torch.dtype = torch.bfloat16) -> Account:
    """The ops of one training step (forward and cross-entropy under autocast, backward) or one inference pass
    (eval mode, no autograd, no loss) of a `fake_model`, on `batch_size` images of `img_size` px (`num_classes`
    only names the loss's classes). `amp_dtype` float32: no autocast."""
    fake_mode = next(model.parameters()).fake_mode
    with fake_mode:
        x = torch.empty(batch_size, 3, img_size, img_size)
        y = torch.empty(batch_size, dtype=torch.long)
    result = Account()
    counter = OpCounter(result)
    model.train(train)
    with fake_mode, FlashAttention(counter), CudaFloat32Ops(), counter, torch.set_grad_enabled(train):
        with torch.autocast('cpu', dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            logits = model(x)
            loss = F.cross_entropy(logits, y) if train else None
        if train:
            counter.phase = 'backward'
            loss.backward()
    model.zero_grad(set_to_none=True)
    return result


def summarize(accounts: dict, reference: str, gpus: list) -> dict:
    """{label: {mode: {'ops', 'bytes', 'flops', '<gpu> ms', '<gpu> x'}}} from {label: {mode: Account}}: totals,
    predicted milliseconds per GPU, and ratios to the `reference` label's prediction."""
    out = {}
    for label, modes in accounts.items():
        out[label] = {}
        for mode, acc in modes.items():
            entry = dict(ops=acc.count, bytes=acc.nbytes, flops=acc.flops)
            for gpu in gpus:
                entry[f'{gpu.name} ms'] = 1e3 * acc.seconds(gpu)
                entry[f'{gpu.name} x'] = acc.seconds(gpu) / accounts[reference][mode].seconds(gpu)
            out[label][mode] = entry
    return out


def op_changes(account: Account, reference: Account, gpu: GPU) -> list:
    """What `account` dispatches beyond `reference`, and what it no longer dispatches: one row per kind of op
    (phase, name, bytes, FLOPs) whose count differs, as dicts with the count's change, the kind, and the predicted
    microseconds of one such op and of the change on `gpu`. Their 'us' sum to the difference of the two accounts'
    predictions. Forward first, then the largest changes."""
    def kinds(acc):
        return Counter((op.phase, op.name, op.nbytes, op.flops) for op in acc.ops)
    mine, ref = kinds(account), kinds(reference)
    rows = []
    for kind in mine.keys() | ref.keys():
        change = mine[kind] - ref[kind]
        if change:
            phase, name, nbytes, flops = kind
            each = 1e6 * gpu.seconds(flops, nbytes)
            rows.append(dict(change=change, phase=phase, op=name, bytes=nbytes, flops=flops, us_each=each,
                             us=change * each))
    return sorted(rows, key=lambda r: (r['phase'] != 'forward', -abs(r['us']), r['op'], r['bytes']))


def format_changes(rows: list) -> list:
    """(header, rows) of `op_changes`' rows: count change, phase, op, MB and MFLOP of one op, its predicted us, and
    the change's."""
    header = ['change', 'phase', 'op', 'MB each', 'MFLOP each', 'us each', 'us']
    return header, [[f'{r["change"]:+d}', r['phase'], r['op'], f'{r["bytes"] / 1e6:.2f}', f'{r["flops"] / 1e6:.1f}',
                     f'{r["us_each"]:.2f}', f'{r["us"]:+.1f}'] for r in rows]


def format_table(summary: dict, reference: str, gpus: list) -> list:
    """(header, rows) of the summary: per label, training step then inference pass, with ops, GB moved, TFLOPs,
    and per GPU the predicted ms and its ratio to the reference's."""
    header = ['model']
    for mode in ('train', 'infer'):
        header += [f'{mode} ops', f'{mode} GB', f'{mode} TFLOP']
        header += [f'{mode} {gpu.name} {unit}' for gpu in gpus for unit in ('ms', 'x')]
    rows = []
    for label, modes in summary.items():
        row = [label + (' *' if label == reference else '')]
        for mode in ('train', 'infer'):
            s = modes[mode]
            row += [str(s['ops']), f'{s["bytes"] / 1e9:.2f}', f'{s["flops"] / 1e12:.2f}']
            row += [f'{s[f"{gpu.name} {unit}"]:{".3f" if unit == "x" else ".2f"}}' for gpu in gpus for unit in ('ms', 'x')]
        rows.append(row)
    return header, rows
