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
"""
import os
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
