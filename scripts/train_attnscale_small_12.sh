#!/usr/bin/env bash
# DeiT-S, 12 layers, + AttnScale, trained from scratch on ImageNet-1k with the paper's recipe: batch 512
# per process x 2 processes, main.py's defaults otherwise (--epochs 500). See scripts/_launch.sh.
set -euo pipefail
MODEL=attnscale_small_12 RUN=imnet1k DEFAULT_PORT=29700 SCRIPT_ARGS="DATA_PATH"
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
parse_args "$@"
launch --auto_reload --model "$MODEL" --batch-size 512 --data-path "$DATA_PATH" --data-set IMNET \
  --input-size 224 --output_dir "$OUTPUT_DIR"
