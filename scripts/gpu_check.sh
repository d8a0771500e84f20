#!/usr/bin/env bash
# The GPU check, one command on one CUDA GPU (a few minutes; well under 8), one summary table:
#   * AttnScale's fused attention path against the explicit one, under float16 and bfloat16 autocast;
#   * a few training steps of attnscale_small_12 through main.py's engine: float16 + GradScaler, bfloat16,
#     torch.compile (host synchronisations per step counted on CUDA);
#   * benchmark.py: attnscale_small_12 against timm's deit_small_patch16_224, batch 128, bfloat16.
# Exit status 0 when every judged check passes. Arguments go to scripts/gpu_check.py, e.g. --json out.json,
# or `--device cpu --tiny` for the toy-size CPU run the test suite makes. PYTHON picks the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
