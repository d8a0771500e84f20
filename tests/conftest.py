import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '2')))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
