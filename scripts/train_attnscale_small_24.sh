#!/usr/bin/env bash
# DeiT-S, 24 layers, + AttnScale, trained from scratch on ImageNet-1k with the paper's recipe: batch 256
# per process x 2 processes, dropout 0.2 (drop path stays 0.1), main.py's defaults otherwise.
# See scripts/_launch.sh.
set -euo pipefail
MODEL=attnscale_small_24 RUN=imnet1k DEFAULT_PORT=29702 SCRIPT_ARGS="DATA_PATH"
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
parse_args "$@"
launch --auto_reload --model "$MODEL" --batch-size 256 --drop 0.2 --data-path "$DATA_PATH" --data-set IMNET \
  --input-size 224 --output_dir "$OUTPUT_DIR"
