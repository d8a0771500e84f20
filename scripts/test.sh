#!/usr/bin/env bash
# Runs the test suite, installing what it needs first (the command CI runs; SKIP_SETUP=1 uses the active python).
# Extra args go to pytest. The caller's MASTER_PORT, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, launcher and SLURM
# variables do not matter: tests/conftest.py sets or removes them for every test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${SKIP_SETUP:-0}" != 1 ]; then . scripts/setup_env.sh; fi
python -m pytest -q -p no:cacheprovider tests "$@"
