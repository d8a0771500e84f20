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
interpreter (a launch, a script, a fresh process): it fails, naming the fix, when it does. Under pytest-xdist
(scripts/test.sh runs `-n 2 --dist loadgroup`) the modules with the most slow tests are handed out first, and the
tests that use one of the module fixtures that launch runs (SHARED_RUNS) run on one worker, which makes it once.
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
SHARED_RUNS = {'trained', 'reference', 'runs'}  # module fixtures that launch runs, for several tests each


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Put each test in its tier, order the modules (most slow tests first, each module's tests together and in
    their order), and group the tests that use one of the SHARED_RUNS fixtures of their module (xdist_group)."""
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        if len(tiers) > 1:
            raise pytest.UsageError(f'{item.nodeid} is marked {" and ".join(tiers)}: a test is in exactly one tier')
        if not tiers:
            item.add_marker('quick')
        params = item.callspec.params if hasattr(item, 'callspec') else {}
        shared = sorted(SHARED_RUNS & set(item.fixturenames) - set(params))
        if shared:
            item.add_marker(pytest.mark.xdist_group(f'{item.module.__name__}.{shared[0]}'))
    slow = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(item.get_closest_marker('slow'))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: each module's own order is kept


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
