#!/usr/bin/env bash
# Evaluates a released checkpoint on the ImageNet-1k validation set with the paper's command: batch 256 per
# process x 2 processes. MODEL is one of the four released models (default attnscale_small_12). Without CKPT the
# weights come with --pretrained from the Hugging Face Hub (peihaowang/vit-anti-oversmoothing) through its local
# cache (HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads only the cache); CKPT, a downloaded file or the folder holding the
# Hub's file names (<folder>/attnscale_cait_xxs24_224.pth, ...), is evaluated with --resume instead.
# See scripts/_launch.sh.
set -euo pipefail
MODEL="${MODEL:-attnscale_small_12}" RUN=eval DEFAULT_PORT=29701 SCRIPT_ARGS="DATA_PATH [MODEL] [CKPT]"
RELEASED="attnscale_small_12 featscale_small_12 attnscale_cait_XXS24_224 featscale_cait_XXS24_224"
. "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
parse_args "$@"
[[ " $RELEASED " == *" $MODEL "* ]] || fail "$MODEL has no released weights; MODEL is one of: ${RELEASED// /, }"
if [[ -z "${CKPT:-}" ]]; then
  WEIGHTS=(--pretrained)
else
  if [[ -d "$CKPT" ]]; then
    CKPT="${CKPT%/}/${MODEL,,}.pth"  # the Hub's file names are the model names in lower case
  fi
  require_checkpoint
  WEIGHTS=(--resume "$CKPT")
fi
launch --model "$MODEL" --batch-size 256 --drop 0.2 --data-path "$DATA_PATH" --data-set IMNET \
  --input-size 224 --output_dir "$OUTPUT_DIR" --eval "${WEIGHTS[@]}"
