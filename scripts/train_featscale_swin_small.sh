#!/usr/bin/env bash
# Swin-S + FeatScale trained from scratch on ImageNet-1k with the official Swin recipe (the paper's swin/ code
# trains with upstream Swin's, unchanged): batch 128 per process x 8 processes, 300 epochs, 20 warm-up epochs,
# AdamW at lr 5e-4, warm-up lr 5e-7 and min lr 5e-6, each scaled by the total batch / 512 (main.py scales --lr;
# the other two are scaled here), cosine stepped per iteration, weight decay 0.05 (none on 1-D parameters,
# biases and relative position tables), gradient clipping 5.0, drop path 0.3, no EMA, no repeated
# augmentation; main.py's defaults otherwise (label smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment
# rand-m9-mstd0.5-inc1, random erasing 0.25, eval crop 0.875). See scripts/_launch.sh.
set -euo pipefail
MODEL=featscale_swin_small_patch4_window7_224 RUN=imnet1k DEFAULT_PORT=29707 SCRIPT_ARGS="DATA_PATH"
NPROC="${NPROC:-8}"
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
parse_args "$@"
scaled() { awk -v lr="$1" -v n="$NPROC" 'BEGIN { print lr * n * 128 / 512 }'; }
launch --auto_reload --model "$MODEL" --batch-size 128 --epochs 300 --warmup-epochs 20 --sched-on-updates \
  --lr 5e-4 --warmup-lr "$(scaled 5e-7)" --min-lr "$(scaled 5e-6)" --weight-decay 0.05 --clip-grad 5.0 \
  --drop-path 0.3 --no-model-ema --no-repeated-aug --data-path "$DATA_PATH" --data-set IMNET --input-size 224 \
  --output_dir "$OUTPUT_DIR"
