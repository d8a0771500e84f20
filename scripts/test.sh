#!/usr/bin/env bash
# Runs the test suite, installing what it needs first (the command CI runs; SKIP_SETUP=1 uses the active python).
# Two pytest-xdist workers share the modules (one module per worker at a time, the longest first: see
# tests/conftest.py), and the 15 slowest tests are listed at the end. Extra args go to pytest (`-m quick`: the quick
# tier; `-n 0`: one process). The caller's MASTER_PORT, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, launcher and SLURM
# variables do not matter: tests/conftest.py sets or removes them for every test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${SKIP_SETUP:-0}" != 1 ]; then . scripts/setup_env.sh; fi
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests "$@"
