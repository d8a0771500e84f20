"""Where a process runs and how a distributed job fails: launcher environments, CUDA device choice, NCCL settings."""
import argparse

import pytest

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


@pytest.mark.parametrize('local_rank,rank,device_count,expected', [
    (0, 0, 8, 0), (7, 15, 8, 7),  # every GPU of the node visible to every task: LOCAL_RANK
    (3, 11, 1, 0), (7, 7, 1, 0),  # srun --gpus-per-task=1 / gpu-bind: each task sees its GPU as device 0
    (3, 3, 2, 1), (2, 6, 2, 0),  # two GPUs per task: rank % 2
    (0, 0, 1, 0),
])
def test_cuda_device_index_never_names_an_invisible_device(local_rank, rank, device_count, expected):
    assert utils.cuda_device_index(local_rank, rank, device_count) == expected
    assert 0 <= expected < device_count


def test_cuda_device_index_without_a_visible_device_says_what_to_check():
    with pytest.raises(ValueError, match=r'no CUDA device is visible to this process \(check CUDA_VISIBLE_DEVICES'):
        utils.cuda_device_index(0, 0, 0)


def test_cuda_job_with_one_gpu_per_task_takes_device_0(monkeypatch):
    """init_distributed_mode under srun with one GPU bound per task (LOCAL_RANK 3, one visible device): the process
    selects cuda:0 and sets the NCCL error handling before joining the group (faked: no GPU and no NCCL here)."""
    calls = {}
    monkeypatch.setattr(utils.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(utils.torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(utils.torch.cuda, 'set_device', lambda device: calls.setdefault('device', device))
    monkeypatch.setattr(utils, '_stop_with_launcher', lambda: None)

    def init_process_group(**kwargs):
        calls['group'] = kwargs
        calls['env'] = utils.os.environ.get('TORCH_NCCL_ASYNC_ERROR_HANDLING')
    monkeypatch.setattr(utils.dist, 'init_process_group', init_process_group)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'TORCH_NCCL_ASYNC_ERROR_HANDLING', 'NCCL_ASYNC_ERROR_HANDLING'):
        monkeypatch.setenv(key, 'x')  # recorded, so that what the test sets is undone too
        monkeypatch.delenv(key)
    monkeypatch.setenv('SLURM_PROCID', '11')
    monkeypatch.setenv('SLURM_NTASKS', '16')
    monkeypatch.setenv('SLURM_LOCALID', '3')
    args = argparse.Namespace(device='cuda', local_rank=None, dist_url='env://', dist_timeout=2.0)
    before = dict(vars(args))
    device = utils.init_distributed_mode(args)
    assert str(device) == 'cuda:0' and str(calls['device']) == 'cuda:0'
    assert calls['group']['backend'] == 'nccl' and (calls['group']['rank'], calls['group']['world_size']) == (11, 16)
    assert calls['group']['timeout'].total_seconds() == 120
    assert calls['env'] == '1'
    assert vars(args) == before  # only read


def test_nccl_error_handling_is_set_unless_the_user_chose():
    env = {}
    assert utils.configure_nccl_error_handling(env) == {'TORCH_NCCL_ASYNC_ERROR_HANDLING': '1'}
    assert env == {'TORCH_NCCL_ASYNC_ERROR_HANDLING': '1'}
    for chosen in ({'TORCH_NCCL_ASYNC_ERROR_HANDLING': '3'}, {'NCCL_ASYNC_ERROR_HANDLING': '0'}):
        env = dict(chosen)
        assert utils.configure_nccl_error_handling(env) == {} and env == chosen


def test_gloo_timeout_raised_in_ddp_backward_is_a_one_line_timeout_error():
    """With the step's flag all-reduce overlapping the backward pass, a hung peer may first be noticed by DDP's
    gradient all-reduce, whose gloo error reads differently from the all_reduce one."""
    exc = RuntimeError('Application timeout caused pair closure')
    assert utils.is_comm_error(exc)
    assert utils.comm_error_message(exc, 0.15).startswith(
        'a collective operation failed: another process did not answer within --dist-timeout 0.15 min')
