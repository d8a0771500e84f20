"""The GPU cost accounting (gpu_cost.py, benchmark.py --cost): the rules on single ops, a two-block toy training
step counted exactly, fused attention as one kernel, and the ratio columns."""
import json

import pytest
import torch
import torch.nn.functional as F

import benchmark
import gpu_cost

F32 = 4


def counted(fn, *args) -> list:
    """[(op, flops, bytes)] of what `fn(*args)` dispatches, as the accounting records it."""
    account = gpu_cost.Account()
    counter = gpu_cost.OpCounter(account)
    with gpu_cost.FlashAttention(counter), counter:
        fn(*args)
    return [(op.name, op.flops, op.nbytes) for op in account.ops]


def meta(*shape):
    return torch.empty(*shape, device='meta')


def test_the_rules_on_single_ops():
    """Views and allocations are free; an op reads each distinct input once and writes each output once; in place
    reads and writes; copy_ only writes its destination; a broadcast operand is read as stored; matrix products
    count 2 m k n FLOPs; a 2-D matrix added by addmm is first copied into the output and read back."""
    x, w, b2, b1 = meta(8, 4), meta(4, 6), meta(8, 6), meta(6)

    def ops(x, w, b2, b1):
        y = torch.mm(x, w)
        y.t().unsqueeze(0).view(6, 8)  # views
        torch.empty(100)
        y.t().contiguous()  # a copy
        y.add_(1.)
        torch.empty(8, 6, device='meta').copy_(y)
        torch.add(y, b1)  # b1 broadcast over 8 rows: read once
        torch.add(y, y)  # one tensor read once
        torch.addmm(b1, x, w)  # 1-D bias: inside the product
        torch.addmm(b2, x, w)  # 2-D: copy, then a product that reads it back
        b2.addmm_(x, w)  # in place: no copy
    mm = 2 * 8 * 4 * 6
    assert counted(ops, x, w, b2, b1) == [
        ('aten::mm', mm, (32 + 24 + 48) * F32), ('aten::clone', 0, (48 + 48) * F32),
        ('aten::add_', 0, (48 + 48) * F32), ('aten::copy_', 0, (48 + 48) * F32),
        ('aten::add', 0, (48 + 6 + 48) * F32), ('aten::add', 0, (48 + 48) * F32),
        ('aten::addmm', mm, (6 + 32 + 24 + 48) * F32), ('aten::copy_', 0, (48 + 48) * F32),
        ('aten::addmm', mm, (32 + 24 + 48 + 48) * F32), ('aten::addmm_', mm, (48 + 32 + 24 + 48) * F32)]


def test_fused_attention_is_one_kernel_each_way():
    """scaled_dot_product_attention: forward reads q, k, v and writes the output (4 B H N N d FLOPs); backward reads
    q, k, v, the output and its gradient and writes dq, dk, dv (2.5x the FLOPs); no N x N map is formed."""
    B, H, N, d = 2, 3, 5, 4
    qkv = meta(B, N, 3 * H * d).requires_grad_()

    def step(qkv):
        q, k, v = qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    ops = counted(step, qkv)
    t, flops = B * H * N * d * F32, 4 * B * H * N * N * d
    assert ops[0] == ('aten::_flash_attention_forward', flops, 4 * t)
    backward = [op for op in ops if op[0] == 'aten::_flash_attention_backward']
    assert backward == [('aten::_flash_attention_backward', int(2.5 * flops), 4 * t + F32 + 3 * t)]  # grad: ones
    assert not any(op[0] in ('aten::bmm', 'aten::_softmax', 'aten::softmax') for op in ops)


class Toy(torch.nn.Module):
    """Two blocks of Linear + ReLU on tokens."""

    def __init__(self, C):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(C, C) for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = F.relu(blk(x))
        return x.sum()


def test_a_two_block_training_step_is_counted_exactly():
    """Forward: per block the product with its bias and the ReLU, then the sum; backward: the seed, per block the
    ReLU's backward, the products for the input (second block only: the input needs none) and the weight, and the
    bias's sum. Every op's FLOPs and bytes from the shapes."""
    B, N, C = 2, 5, 8
    model, x = Toy(C).to('meta'), meta(B, N, C)
    account = gpu_cost.Account()
    counter = gpu_cost.OpCounter(account)
    with counter:
        loss = model(x)
        counter.phase = 'backward'
        loss.backward()
    act, w, b, one = B * N * C * F32, C * C * F32, C * F32, F32
    prod = 2 * B * N * C * C
    forward = [('aten::addmm', prod, act + w + b + act), ('aten::relu', 0, 2 * act)] * 2 + [('aten::sum', 0, act + one)]
    backward = [('aten::ones_like', 0, 2 * one), ('aten::threshold_backward', 0, one + act + act),
                ('aten::mm', prod, act + w + act), ('aten::mm', prod, 2 * act + w), ('aten::sum', 0, act + b),
                ('aten::threshold_backward', 0, 3 * act), ('aten::mm', prod, 2 * act + w), ('aten::sum', 0, act + b)]
    got = [(op.name, op.flops, op.nbytes) for op in account.ops]
    assert got == forward + backward
    assert [op.phase for op in account.ops] == ['forward'] * 5 + ['backward'] * 8
    h100 = gpu_cost.GPUS['h100']
    expected = sum(max(f / 989e12, n / 3.35e12) + 2e-6 for _, f, n in got)
    assert account.count == 13 and account.flops == 5 * prod and abs(account.seconds(h100) - expected) < 1e-15


def test_cost_mode_prints_predictions_with_ratios_to_the_reference(tmp_path, capsys):
    """benchmark.py --cost: per model and GPU, predicted ms and the ratio to the reference's (1 for itself), ops,
    bytes and FLOPs for a training step and an inference pass; the add-on costs ops and bytes, never FLOPs of its own
    beyond a few small products."""
    out = tmp_path / 'cost.json'
    assert benchmark.main(['--models', 'deit_tiny_12+plain', 'attnscale_tiny_12', 'featscale_tiny_12',
                           '--model-kwargs', 'depth=2', 'patch_size=8', '--img-size', '32', '--batch-size', '4',
                           '--num-classes', '10', '--dtype', 'bfloat16', '--cost', 'h100', 'a100',
                           '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith('predicted from the ops dispatched (not measured)')
    summary = json.loads(out.read_text())['summary']
    ref = summary['deit_tiny_12+plain']
    for label, modes in summary.items():
        for mode, s in modes.items():
            for gpu in ('H100 SXM', 'A100 SXM'):
                assert s[f'{gpu} x'] == pytest.approx(s[f'{gpu} ms'] / ref[mode][f'{gpu} ms'], rel=1e-12)
            assert s['ops'] >= ref[mode]['ops'] and s['bytes'] >= ref[mode]['bytes']
    assert all(ref[mode][f'{g} x'] == 1. for mode in ref for g in ('H100 SXM', 'A100 SXM'))
    rows = [line.split(' | ') for line in printed.splitlines()[3:] if ' | ' in line]
    assert [r[0].strip() for r in rows] == ['deit_tiny_12+plain *', 'attnscale_tiny_12', 'featscale_tiny_12']
    assert float(rows[1][4]) == pytest.approx(summary['attnscale_tiny_12']['train']['H100 SXM ms'], abs=0.006)


def test_op_changes_lists_what_a_model_adds_and_drops():
    """One row per kind of op (phase, name, bytes, FLOPs) whose count differs, forward first, then by the change's
    predicted time; each row's microseconds are its count times one op's, and they sum to the predictions' gap."""
    h100 = gpu_cost.GPUS['h100']
    op = gpu_cost.Op
    ref = gpu_cost.Account([op('aten::mm', 'forward', 10 ** 9, 10 ** 6), op('aten::sum', 'backward', 0, 3 * 10 ** 7),
                            op('aten::sum', 'backward', 0, 3 * 10 ** 7), op('aten::add', 'backward', 0, 8)])
    acc = gpu_cost.Account([op('aten::mm', 'forward', 10 ** 9, 10 ** 6), op('aten::mean', 'backward', 0, 3 * 10 ** 7),
                            op('aten::sum', 'backward', 0, 3 * 10 ** 7), op('aten::mul', 'forward', 0, 4),
                            op('aten::mul', 'forward', 0, 4), op('aten::add', 'backward', 0, 8)])
    rows = gpu_cost.op_changes(acc, ref, h100)
    each = {'mul': 2. + 4 / 3.35e6, 'big': 2. + 3e7 / 3.35e6}
    assert [(r['change'], r['phase'], r['op'], r['bytes'], r['flops']) for r in rows] == [
        (2, 'forward', 'aten::mul', 4, 0), (1, 'backward', 'aten::mean', 3 * 10 ** 7, 0),
        (-1, 'backward', 'aten::sum', 3 * 10 ** 7, 0)]
    assert [r['us_each'] for r in rows] == pytest.approx([each['mul'], each['big'], each['big']], rel=1e-12)
    assert [r['us'] for r in rows] == pytest.approx([2 * each['mul'], each['big'], -each['big']], rel=1e-12)
    assert sum(r['us'] for r in rows) == pytest.approx(1e6 * (acc.seconds(h100) - ref.seconds(h100)), rel=1e-9)
    assert gpu_cost.op_changes(ref, ref, h100) == []
    header, table = gpu_cost.format_changes(rows)
    assert header[0] == 'change' and table[0][:3] == ['+2', 'forward', 'aten::mul'] and table[2][-1] == '-11.0'


def test_cost_changes_prints_each_models_extra_ops(tmp_path, capsys):
    """benchmark.py --cost --cost-changes: after the table, per add-on model and pass, a line with its extra ops and
    microseconds against the reference, and the rows behind them (in --json too), which add up to that line."""
    out = tmp_path / 'cost.json'
    assert benchmark.main(['--models', 'deit_tiny_12', 'featscale_tiny_12', '--model-kwargs', 'depth=2',
                           'patch_size=8', '--img-size', '32', '--batch-size', '4', '--num-classes', '10',
                           '--dtype', 'bfloat16', '--cost', 'a100', 'h100', '--cost-changes',
                           '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert list(payload['changes']) == ['featscale_tiny_12']
    for mode, what in (('train', 'training step'), ('infer', 'inference pass')):
        rows, s, ref = (payload['changes']['featscale_tiny_12'][mode], payload['summary']['featscale_tiny_12'][mode],
                        payload['summary']['deit_tiny_12'][mode])
        gap_us = 1e3 * (s['A100 SXM ms'] - ref['A100 SXM ms'])  # the first --cost GPU
        assert sum(r['us'] for r in rows) == pytest.approx(gap_us, rel=1e-9)
        assert sum(r['change'] for r in rows) == s['ops'] - ref['ops'] > 0
        line = (f'featscale_tiny_12, {what}, against deit_tiny_12: {s["ops"] - ref["ops"]:+d} ops, {gap_us:+.1f} us on '
                f'A100 SXM ({s["A100 SXM x"]:.4f}x)')
        assert line in printed.splitlines()
    # per block, the forward pass adds the token mean and one per-image pass over the projection's output
    forward = [r for r in payload['changes']['featscale_tiny_12']['infer'] if r['change'] > 0]
    assert {(r['op'], r['change']) for r in forward} >= {('aten::mean', 2), ('aten::addcmul_', 2)}
