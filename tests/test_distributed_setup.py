"""Where a process runs and how a distributed job fails: launcher environments, CUDA device choice, NCCL settings."""
import argparse

import pytest
import torch

import utils


@pytest.mark.parametrize('env,local_rank_arg,expected', [
    ({}, None, None),  # a plain single process
    ({'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1'}, None, (5, 8, 1)),  # torchrun, launch --use_env, submitit
    ({'RANK': '3', 'WORLD_SIZE': '4'}, 3, (3, 4, 3)),  # torch.distributed.launch without --use_env: --local-rank
    ({'SLURM_PROCID': '6', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '2'}, None, (6, 8, 2)),  # srun main.py
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1', 'SLURM_LOCALID': '0'}, None, None),  # a one-task SLURM job
    ({'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1', 'SLURM_PROCID': '7', 'SLURM_NTASKS': '8'}, None, (1, 2, 1)),
])
def test_launcher_placement(env, local_rank_arg, expected):
    assert utils.launcher_placement(env, local_rank_arg) == expected


@pytest.mark.parametrize('local_rank,rank,device_count,local_world_size,srun,expected', [
    (0, 0, 8, 8, False, 0), (7, 15, 8, 8, False, 7),  # torchrun / submitit: every GPU of the node visible, LOCAL_RANK
    (0, 0, 1, None, False, 0),  # one process, or a launcher that does not say how many share the node
    (3, 11, 1, None, True, 0), (7, 7, 1, None, True, 0),  # srun --gpus-per-task=1: each task sees its GPU as 0
    (3, 3, 2, None, True, 1), (2, 6, 2, None, True, 0),  # srun with two GPUs bound per task: rank % 2
    (1, 1, 4, None, True, 1),  # srun without binding, fewer tasks than GPUs: LOCAL_RANK
])
def test_cuda_device_index_never_names_an_invisible_device(local_rank, rank, device_count, local_world_size, srun,
                                                           expected):
    assert utils.cuda_device_index(local_rank, rank, device_count, local_world_size, srun=srun) == expected
    assert 0 <= expected < device_count


def test_cuda_device_index_without_a_visible_device_says_what_to_check():
    with pytest.raises(ValueError, match=r'no CUDA device is visible to this process \(check CUDA_VISIBLE_DEVICES'):
        utils.cuda_device_index(0, 0, 0)


@pytest.mark.parametrize('local_rank,local_world_size', [(0, 4), (3, 4), (2, None)])
def test_more_processes_than_gpus_is_an_error_not_a_shared_gpu(local_rank, local_world_size):
    """torchrun --nproc_per_node=4 (or LOCAL_RANK 2 alone) on a node with 2 visible GPUs: every process, also
    those whose own LOCAL_RANK is a valid device, refuses, instead of two of them sharing a GPU."""
    with pytest.raises(ValueError) as e:
        utils.cuda_device_index(local_rank, local_rank, 2, local_world_size, visible='0,1')
    assert str(e.value) == (
        f'LOCAL_RANK {local_rank}: {local_world_size or local_rank + 1} processes on this node for 2 visible CUDA '
        "device(s) (CUDA_VISIBLE_DEVICES='0,1'), so two would share a GPU; start at most 2 processes per node "
        '(torchrun --nproc_per_node, run_with_submitit.py --ngpus), or make more GPUs visible')


class FakeCuda:
    """`count` visible CUDA devices as torch.cuda shows them to init_distributed_mode and the RNG state helpers:
    each device has its own generator state (a tensor of 16 bytes), `current` is the current device. The
    all-device calls behave as torch's do when given more states than devices (an invalid ordinal)."""

    def __init__(self, monkeypatch, count: int, current: int = 0, seed: int = 0):
        self.count, self.current = count, current
        gen = torch.Generator().manual_seed(seed)
        self.states = [torch.randint(0, 256, (16,), dtype=torch.uint8, generator=gen) for _ in range(count)]
        self.calls = {}
        cuda = utils.torch.cuda
        for name in ('is_available', 'is_initialized'):
            monkeypatch.setattr(cuda, name, lambda: True)
        monkeypatch.setattr(cuda, 'device_count', lambda: self.count)
        monkeypatch.setattr(cuda, 'current_device', lambda: self.current)
        monkeypatch.setattr(cuda, 'set_device', self.set_device)
        monkeypatch.setattr(cuda, 'get_rng_state', self.get_rng_state)
        monkeypatch.setattr(cuda, 'set_rng_state', self.set_rng_state)
        monkeypatch.setattr(cuda, 'get_rng_state_all', lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(cuda, 'set_rng_state_all', lambda states: [self.set_rng_state(s, i)
                                                                       for i, s in enumerate(states)])

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if not 0 <= index < self.count:
            raise RuntimeError(f'CUDA error: invalid device ordinal {index} ({self.count} visible)')
        return index

    def set_device(self, device):
        self.current = self.index(device)
        self.calls['device'] = torch.device('cuda', self.current)

    def get_rng_state(self, device='cuda'):
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state, device='cuda'):
        self.states[self.index(device)] = state.clone()


def torchrun_env(monkeypatch, **env):
    """The launcher's variables of this test only (anything the caller had is recorded and removed first)."""
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'SLURM_PROCID', 'SLURM_NTASKS',
                'SLURM_LOCALID', 'CUDA_VISIBLE_DEVICES', 'TORCH_NCCL_ASYNC_ERROR_HANDLING',
                'NCCL_ASYNC_ERROR_HANDLING'):
        monkeypatch.setenv(key, 'x')  # recorded, so that what the test sets is undone too
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def fake_init_process_group(monkeypatch, calls: dict):
    monkeypatch.setattr(utils, '_stop_with_launcher', lambda: None)

    def init_process_group(**kwargs):
        calls['group'] = kwargs
        calls['env'] = {k: utils.os.environ.get(k) for k in ('TORCH_NCCL_ASYNC_ERROR_HANDLING',
                                                            'NCCL_ASYNC_ERROR_HANDLING')}
    monkeypatch.setattr(utils.dist, 'init_process_group', init_process_group)


def test_cuda_job_with_one_gpu_per_task_takes_device_0(monkeypatch):
    """init_distributed_mode under srun with one GPU bound per task (LOCAL_RANK 3, one visible device): the process
    selects cuda:0 and joins an NCCL group, leaving NCCL's error handling to torch (faked: no GPU and no NCCL)."""
    cuda, calls = FakeCuda(monkeypatch, count=1), {}
    fake_init_process_group(monkeypatch, calls)
    torchrun_env(monkeypatch, SLURM_PROCID=11, SLURM_NTASKS=16, SLURM_LOCALID=3)
    args = argparse.Namespace(device='cuda', local_rank=None, dist_url='env://', dist_timeout=2.0)
    before = dict(vars(args))
    device = utils.init_distributed_mode(args)
    assert str(device) == 'cuda:0' and str(cuda.calls['device']) == 'cuda:0'
    assert calls['group']['backend'] == 'nccl' and (calls['group']['rank'], calls['group']['world_size']) == (11, 16)
    assert calls['group']['timeout'].total_seconds() == 120
    assert calls['env'] == {'TORCH_NCCL_ASYNC_ERROR_HANDLING': None, 'NCCL_ASYNC_ERROR_HANDLING': None}
    assert vars(args) == before  # only read


@pytest.mark.parametrize('chosen', ['1', '3'])
def test_nccl_error_handling_is_the_users_choice(monkeypatch, chosen):
    cuda, calls = FakeCuda(monkeypatch, count=2), {}
    fake_init_process_group(monkeypatch, calls)
    torchrun_env(monkeypatch, RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2,
                 TORCH_NCCL_ASYNC_ERROR_HANDLING=chosen)
    utils.init_distributed_mode(argparse.Namespace(device='cuda', local_rank=None, dist_url='env://',
                                                   dist_timeout=1.0))
    assert calls['env'] == {'TORCH_NCCL_ASYNC_ERROR_HANDLING': chosen, 'NCCL_ASYNC_ERROR_HANDLING': None}
    assert cuda.current == 1


@pytest.mark.parametrize('local_rank', [0, 3])
def test_too_many_processes_for_the_gpus_fail_in_one_line_before_nccl(monkeypatch, capsys, local_rank):
    """torchrun --nproc_per_node=4 where 2 GPUs are visible (faked): every worker exits 2 with one line naming its
    LOCAL_RANK, the visible devices and CUDA_VISIBLE_DEVICES, before the process group (NCCL) is created."""
    FakeCuda(monkeypatch, count=2)
    calls = {}
    fake_init_process_group(monkeypatch, calls)
    torchrun_env(monkeypatch, RANK=local_rank, WORLD_SIZE=4, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=4,
                 CUDA_VISIBLE_DEVICES='0,1')
    with pytest.raises(SystemExit) as e:
        utils.init_distributed_mode(argparse.Namespace(device='cuda', local_rank=None, dist_url='env://',
                                                       dist_timeout=1.0))
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'group' not in calls
    assert err.count('\n') == 1 and err.startswith(
        f"error: LOCAL_RANK {local_rank}: 4 processes on this node for 2 visible CUDA device(s) "
        "(CUDA_VISIBLE_DEVICES='0,1'), so two would share a GPU; start at most 2 processes per node"), err


def test_cuda_rng_state_is_this_ranks_device_only(monkeypatch, tmp_path):
    """A mid-epoch checkpoint saved by LOCAL_RANK 5 with 8 visible GPUs holds the state of device 5 only, and
    resumes where 1 GPU is visible (srun --gpus-per-task=1) and where 2 are (LOCAL_RANK 1): the state goes to
    the process's current device, no other device is touched, nothing indexes a device that is not there."""
    saved = FakeCuda(monkeypatch, count=8, current=5, seed=1)
    state = utils.rng_state()
    assert torch.equal(state['cuda'], saved.states[5])
    torch.save({'rng': [state]}, tmp_path / 'ckpt.pth')
    restored = torch.load(tmp_path / 'ckpt.pth', weights_only=True)['rng'][0]

    for count, current in ((1, 0), (2, 1)):
        resumed = FakeCuda(monkeypatch, count=count, current=current, seed=2)
        others = {i: s.clone() for i, s in enumerate(resumed.states) if i != current}
        utils.set_rng_state(restored)
        assert torch.equal(resumed.states[current], saved.states[5])
        assert all(torch.equal(resumed.states[i], s) for i, s in others.items())
    before = [s.clone() for s in resumed.states]  # a list of every device's states (older checkpoints): skipped
    utils.set_rng_state(dict(restored, cuda=[s.clone() for s in saved.states]))
    assert all(torch.equal(a, b) for a, b in zip(resumed.states, before))


def test_unexpected_exception_is_recorded_for_torchrun(monkeypatch, tmp_path):
    """main() is decorated with torch.distributed.elastic's `record`: an exception that is not one of our one-line
    errors is written, with its traceback, to the error file torchrun gives the worker (TORCHELASTIC_ERROR_FILE),
    which torchrun's failure summary shows for that rank."""
    import json
    import main
    error_file = tmp_path / 'error.json'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(error_file))
    monkeypatch.setattr(main.startup, 'check_args', lambda args, parser: None)

    def run(args, *rest):
        raise KeyError('a bug in the run')
    monkeypatch.setattr(main, 'run', run)
    with pytest.raises(KeyError):
        main.main(argparse.Namespace())
    message = json.loads(error_file.read_text())['message']
    assert message['message'] == "KeyError: 'a bug in the run'"
    assert "raise KeyError('a bug in the run')" in message['extraInfo']['py_callstack']


def test_gloo_timeout_raised_in_ddp_backward_is_a_one_line_timeout_error():
    """With the step's flag all-reduce overlapping the backward pass, a hung peer may first be noticed by DDP's
    gradient all-reduce, whose gloo error reads differently from the all_reduce one."""
    exc = RuntimeError('Application timeout caused pair closure')
    assert utils.is_comm_error(exc)
    assert utils.comm_error_message(exc, 0.15).startswith(
        'a collective operation failed: another process did not answer within --dist-timeout 0.15 min')


@pytest.mark.parametrize('text,expected', [
    ('The server socket has failed to bind to [::]:29500 (errno: 98 - Address already in use).',
     'port 29511 is in use on this machine (another run or program holds it); pass --master_port <free port> '
     'to the launcher (MASTER_PORT for a direct or SLURM launch)'),
    ("environment variable MASTER_ADDR expected, but not set",
     'cannot join the process group (environment variable MASTER_ADDR expected, but not set); set MASTER_ADDR and '
     'MASTER_PORT, or start main.py with torchrun / torch.distributed.launch --use_env'),
    ('Socket Timeout\n  waiting for rank 1',
     'timed out joining the process group at node7:29511 (rank 0 of 2); check that every process was started and '
     'that MASTER_ADDR/MASTER_PORT agree, or raise --dist-timeout'),
    ('Connection reset by peer', 'cannot join the process group at node7:29511 (Connection reset by peer)'),
])
def test_a_failed_process_group_join_is_one_line_with_what_to_do(monkeypatch, text, expected):
    """What main.py prints when init_process_group raises: the port in use, missing rendezvous variables, a timeout
    (with this rank and the address it waited on), anything else with the address and the error, on one line."""
    monkeypatch.setenv('MASTER_ADDR', 'node7')
    monkeypatch.setenv('MASTER_PORT', '29511')
    assert utils._init_error_message(RuntimeError(text), 0, 2) == expected
