#!/usr/bin/env bash
# Evaluates a released checkpoint (Hugging Face Hub: peihaowang/vit-anti-oversmoothing) on the
# ImageNet-1k validation set with the paper's command: batch 256 per process x 2 processes.
# CKPT is the checkpoint file, or the folder holding <MODEL>.pth; MODEL defaults to
# attnscale_small_12. See scripts/_launch.sh.
set -euo pipefail
MODEL="${MODEL:-attnscale_small_12}" RUN=eval DEFAULT_PORT=29701 SCRIPT_ARGS="DATA_PATH CKPT [MODEL]"
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
parse_args "$@"
if [[ -d "${CKPT:-}" ]]; then
  CKPT="${CKPT%/}/$MODEL.pth"
fi
require_checkpoint
launch --model "$MODEL" --batch-size 256 --drop 0.2 --data-path "$DATA_PATH" --data-set IMNET \
  --input-size 224 --output_dir "$OUTPUT_DIR" --eval --resume "$CKPT"
