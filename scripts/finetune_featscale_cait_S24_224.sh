#!/usr/bin/env bash
# CaiT-S24 (224 px) + FeatScale, fine-tuned on ImageNet-1k from a CaiT-S24 checkpoint (CKPT) with the
# paper's recipe: batch 128 per process x 2 processes, 60 epochs at lr 5e-5. See scripts/_launch.sh.
set -euo pipefail
MODEL=featscale_cait_S24_224 RUN=imnet1k DEFAULT_PORT=29705 SCRIPT_ARGS="DATA_PATH CKPT"
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
parse_args "$@"
require_checkpoint
launch --auto_reload --model "$MODEL" --batch-size 128 --epochs 60 --lr 5e-5 --weight-decay 5e-4 \
  --min-lr 1e-6 --warmup-epochs 1 --decay-epochs 5 --data-path "$DATA_PATH" --data-set IMNET \
  --input-size 224 --output_dir "$OUTPUT_DIR" --resume "$CKPT"
