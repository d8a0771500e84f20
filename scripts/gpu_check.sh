#!/usr/bin/env bash
# The GPU check, one command on one CUDA GPU (a few minutes), one summary table, every row judged against the bound
# it states:
#   * dL/dλ of AttnScale and FeatScale (ViT/DeiT, CaiT, Swin) under float16 and bfloat16 autocast, against float64
#     central differences;
#   * training steps through main.py's engine (float16 + GradScaler, bfloat16, torch.compile): the loss falls, every
#     weight and gain changes, no bfloat16 step and at most a few float16 steps are skipped;
#   * DDP in a one-process NCCL group, compiled after DDP; a resume with GradScaler state, bit for bit;
#   * host synchronisations per step for float32, bfloat16 and float16 + GradScaler;
#   * benchmark.py: attnscale_small_12 against timm's deit_small_patch16_224, batch 128, bfloat16 (reported).
# Exit status 0 when every judged check passes. Arguments go to scripts/gpu_check.py, e.g. --json out.json,
# --self-test (the check, then again with the gains' gradients sabotaged: it must fail), or `--device cpu --tiny`
# for the toy-size CPU run the test suite makes. PYTHON picks the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
