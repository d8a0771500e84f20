"""scripts/run_with_submitit.py through submitit's local cluster: 2 tasks form a gloo group and train."""
import json
import sys
from pathlib import Path

import pytest

from helpers import make_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import run_with_submitit  # noqa: E402


@pytest.mark.slow
def test_submitit_local_two_tasks_train_one_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setenv('PYTHONPATH', '')
    data = make_image_folder(tmp_path / 'data', num_classes=3, train_per_class=8, val_per_class=4)
    out = tmp_path / 'out'
    job = run_with_submitit.main([
        '--cluster', 'local', '--nodes', '1', '--ngpus', '2', '--device', 'cpu', '--model', 'deit_tiny_12',
        '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8', '--input-size', '32',
        '--batch-size', '4', '--epochs', '1', '--num_workers', '0', '--mixup', '0', '--cutmix', '0', '--aa', 'none',
        '--reprob', '0', '--data-set', 'IMNET', '--data-path', str(data), '--output_dir', str(out),
        '--mem-per-gpu', '1', '--cpus-per-task', '1', '--timeout', '10'])
    job.results()  # waits for both tasks; raises if one failed
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0]
    assert 'distributed init (rank 0/2, backend gloo)' in job.stdout()


def test_submitit_requires_an_output_dir(capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        run_with_submitit.parse_args(['--model', 'deit_tiny_12'])
    assert e.value.code == 2 and '--output_dir is required' in capsys.readouterr().err


def test_requeued_task_gets_the_arguments_as_parsed(monkeypatch):
    """Each task runs main() on its own copy (dist_url env://); the requeue hook resubmits the parsed arguments,
    which main() never changes, so a job requeued before its first checkpoint scales the learning rate once."""
    import submitit
    args = run_with_submitit.parse_args(['--model', 'deit_tiny_12', '--output_dir', '/tmp/x', '--lr', '5e-4',
                                         '--dist_url', 'tcp://elsewhere:1'])
    parsed = dict(vars(args))
    received = []
    monkeypatch.setattr(submitit.helpers, 'TorchDistributedEnvironment',
                        lambda: type('Env', (), {'export': lambda self, **kwargs: None})())
    monkeypatch.setattr(run_with_submitit.trainer, 'main', received.append)
    task = run_with_submitit.Trainer(args)
    task()
    assert received[0] is not args and vars(received[0]) == dict(parsed, dist_url='env://')
    requeued = task.checkpoint()
    assert requeued.function.args is args and vars(args) == parsed and args.auto_reload
