"""Submit main.py to SLURM with submitit (optional dependency: `pip install submitit`).

    python scripts/run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --model attnscale_small_12 \
        --batch-size 64 --data-path /data/imagenet --data-set IMNET

Every main.py flag is accepted. Each task exports the torch.distributed environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from SLURM and runs main.main() on GPU LOCAL_RANK.
SLURM's signal before the time limit (SIGUSR2, --signal-delay seconds ahead) takes main.py's SIGTERM path:
every task finishes its step, the mid-epoch checkpoint is written once, then the job is requeued and
continues from <output_dir>/checkpoint.pth (--auto_reload is forced on).
"""
import argparse
import os
import signal
import sys
import uuid
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)

import main as trainer  # noqa: E402
import utils  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser('Submit main.py to SLURM', parents=[trainer.get_args_parser()])
    parser.add_argument('--ngpus', default=8, type=int, help='GPUs (tasks) per node')
    parser.add_argument('--nodes', default=2, type=int)
    parser.add_argument('--timeout', default=2800, type=int, help='minutes before SLURM stops (and we requeue)')
    parser.add_argument('--job_dir', default='', type=str, help='submitit logs; default <output_dir>/submitit')
    parser.add_argument('--partition', default='', type=str)
    parser.add_argument('--constraint', default='', type=str, help='e.g. volta32gb')
    parser.add_argument('--comment', default='', type=str)
    parser.add_argument('--cpus-per-task', default=10, type=int)
    parser.add_argument('--mem-per-gpu', default=40, type=int, help='GB')
    parser.add_argument('--signal-delay', default=120, type=int,
                        help='seconds before the time limit at which SLURM signals the job to checkpoint and requeue')
    parser.add_argument('--cluster', default=None, choices=['slurm', 'local', 'debug'],
                        help="submitit cluster (default: SLURM when available); 'local' runs the tasks here")
    args = parser.parse_args(argv)
    if not args.output_dir:
        parser.error('--output_dir is required on SLURM (checkpoints are how a requeued job resumes)')
    args.job_dir = args.job_dir or os.path.join(args.output_dir, 'submitit')
    args.auto_reload = True
    return args


class Trainer:
    """The callable submitit runs in every task; `checkpoint()` is submitit's requeue hook."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        """main.main() with the job's distributed environment. submitit's handler of the time-limit signal would
        requeue from rank 0 at once, mid-step, and leave the other ranks blocked in their next collective; here
        that signal is one of main.py's stop signals instead, and the job is requeued once the mid-epoch
        checkpoint is written (`requeue`)."""
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        timeout_signal = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG)  # SIGUSR2 unless changed
        submitit_handler = signal.getsignal(timeout_signal)
        stop = utils.StopRequest()
        stop.install(timeout_signal, f'stopped for requeueing ({timeout_signal.name}: the SLURM time limit is near)',
                     trainer.PREEMPTED_EXIT_CODE)
        try:
            trainer.main(argparse.Namespace(**dict(vars(self.args), dist_url='env://')), stop)
        except SystemExit:
            if stop.agreed_signal == timeout_signal:
                requeue(submitit_handler, timeout_signal)
            raise

    def checkpoint(self):
        """Requeue with the arguments as parsed: main() never changes them, so the learning rate is scaled once
        per run, however often the job is requeued (and before or after its first checkpoint)."""
        import submitit
        return submitit.helpers.DelayedSubmission(Trainer(self.args))


def requeue(submitit_handler, signum: int):
    """After every rank wrote its part of the mid-epoch checkpoint and is about to exit: submitit's own handler
    of `signum`, which on rank 0 saves `Trainer.checkpoint()` and requeues the job (then exits), and does nothing
    on the other ranks; they wait in a barrier until rank 0 has requeued, so that none ends the job step first."""
    import torch.distributed as dist
    try:
        if callable(submitit_handler):
            submitit_handler(signum, None)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def main(argv=None):
    args = parse_args(argv)
    try:
        import submitit
    except ImportError:
        sys.exit('error: submitit is not installed; `pip install submitit` to launch on SLURM')
    Path(args.job_dir).mkdir(parents=True, exist_ok=True)
    # the tasks unpickle Trainer before any of our code runs, so they must find main.py and this file
    paths = (ROOT, str(Path(__file__).resolve().parent), os.environ.get('PYTHONPATH'))
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in paths if p)
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    extra = {'slurm_constraint': args.constraint} if args.constraint else {}
    if args.comment:
        extra['slurm_comment'] = args.comment
    executor.update_parameters(
        mem_gb=args.mem_per_gpu * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task, nodes=args.nodes, timeout_min=args.timeout,
        slurm_partition=args.partition or None, slurm_signal_delay_s=args.signal_delay,
        name=f'antioversmooth-{uuid.uuid4().hex[:6]}',
        **extra)
    job = executor.submit(Trainer(args))
    print(f'Submitted job {job.job_id}; logs in {args.job_dir}', flush=True)
    return job


if __name__ == '__main__':
    main()
