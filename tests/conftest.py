"""The suite runs the same whatever the caller's environment: the variables below are set or removed here, before
torch is imported, and every subprocess a test starts inherits the result.

* CPU only (CUDA_VISIBLE_DEVICES=''): main.py defaults to CUDA when it sees a GPU, which would change numbers,
  dtypes and the backend.
* One thread per process: torch in this process and OMP_NUM_THREADS=1 in the processes the tests start. A
  second thread saves little on these small models when the other core is idle, and makes an op many times
  slower when it is busy (a rank of a launched job, another test process): OpenMP's threads wait for each
  other at every op.
* No launcher or SLURM variables and no fault-injection delays: a plain `python main.py` must not believe it is a
  rank of a job, and every test picks its own master port (helpers.free_port).

Tiers: every test is in exactly one, `slow` where the test (or its module, or its parameter) is marked so, `quick`
otherwise; `-m quick` (the same as `-m "not slow"`) runs the quick one. A quick test may not start a Python
interpreter (a launch, a script, a fresh process): it fails, naming the fix, when it does.
"""
import os
import subprocess
import sys
from pathlib import Path

INHERITED = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK',
             'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_JOB_ID', 'ANTIOVERSMOOTH_STEP_DELAY',
             'ANTIOVERSMOOTH_SAVE_DELAY', 'SKIP_SETUP', 'MODELS', 'EPOCHS', 'NPROC', 'OUT', 'DATA', 'EXTRA')
for _name in list(os.environ):
    if _name in INHERITED or _name.startswith('TORCHELASTIC_'):
        del os.environ[_name]
os.environ.update(CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TIERS = ('quick', 'slow')
# The modules that take longest (tens of seconds to minutes each in `--durations`), run first so that under
# pytest-xdist (`--dist loadfile`: one module per worker at a time) the two workers end together; the other modules
# follow in their usual order.
LONGEST_FIRST = ('test_reliability', 'test_demo', 'test_training', 'test_models', 'test_timm_conventions',
                 'test_benchmark', 'test_gpu_check')


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Put each test in its tier (fail on a test marked with both), and run the LONGEST_FIRST modules first, each
    module's tests in their order."""
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        if len(tiers) > 1:
            raise pytest.UsageError(f'{item.nodeid} is marked {" and ".join(tiers)}: a test is in exactly one tier')
        if not tiers:
            item.add_marker('quick')
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable


_running = []  # the test being run in this process, while it runs
_popen_init = subprocess.Popen.__init__


def _starts_python(args) -> bool:
    """Whether the command's program (a list's first item, a shell line's first word) is a Python interpreter."""
    program = os.fsdecode(args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), ''))
    words = program.split()
    return program == sys.executable or bool(words) and Path(words[0]).name.startswith('python')


def _guarded_popen_init(self, args, *pargs, **kwargs):
    if _running and _running[-1].get_closest_marker('quick') and _starts_python(args):
        raise AssertionError(f'{_running[-1].nodeid} starts a Python interpreter ({args!r}) but is in the quick tier: '
                             'mark it (or its module or parameter) @pytest.mark.slow')
    _popen_init(self, args, *pargs, **kwargs)


subprocess.Popen.__init__ = _guarded_popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown of `item` (with the fixtures it makes) run with `item` as the running test."""
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()
