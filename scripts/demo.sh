#!/usr/bin/env bash
# The two-minute tour, end to end on a real dataset that ships offline (scikit-learn's UCI digits):
#   1. create .venv and install the requirements (skipped when present; SKIP_SETUP=1 uses the active python),
#   2. export the digits as an ImageFolder (data/digits, idempotent),
#   3. train each model of MODELS with 2 processes through torch.distributed.launch --use_env,
#   4. evaluate each saved checkpoint with --eval --resume, print a table, and plot val top-1 per epoch of every
#      model into $OUT/curves.png.
# While a model trains, one line per epoch (train loss, val top-1, elapsed, ETA); main.py's full output goes to
# $OUT/<model>/train.out, its per-epoch numbers to $OUT/<model>/log.txt.
# Idempotent: finished runs are not retrained (--auto_reload finds their last epoch).
# Knobs (environment): MODELS, EPOCHS, NPROC, OUT, DATA, MASTER_PORT, and EXTRA (more main.py flags).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${SKIP_SETUP:-0}" != 1 ]; then . scripts/setup_env.sh; fi
MODELS="${MODELS:-deit_tiny_12 attnscale_tiny_12}"
EPOCHS="${EPOCHS:-50}"
NPROC="${NPROC:-2}"
OUT="${OUT:-logs/demo}"
DATA="${DATA:-data/digits}"
PORT="${MASTER_PORT:-29760}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

python scripts/export_digits.py --output "$DATA"

# The DeiT ImageNet recipe (mixup, cutmix, RandAugment, random erasing, flips) destroys 8 px digits, so
# the demo uses its own: 12 blocks of width 96 on the digits' native 8 px (the 32 px export resized back),
# 2 px patches (16 patches + class token), AdamW with a cosine schedule, and +-1 px shifts as the only
# augmentation (at 32 px the shifts would fall between original pixels, which measured much worse).
RECIPE=(--model-kwargs patch_size=2 embed_dim=96 num_heads=3 --input-size 8 --data-path "$DATA" --data-set IMNET
        --batch-size 32 --unscale-lr --lr 2e-3 --warmup-lr 2e-4 --warmup-epochs 3 --min-lr 1e-5 --drop-path 0
        --mixup 0 --cutmix 0 --aa none --reprob 0 --color-jitter 0 --shift-aug 0.125 --eval-crop-ratio 1.0
        --no-repeated-aug --no-model-ema --num_workers 0 --print-freq 100)
launch() { python -m torch.distributed.launch --nproc_per_node="$NPROC" --master_port "$PORT" --use_env main.py "$@"; }

rows=()
for model in $MODELS; do
  dir="$OUT/$model"
  mkdir -p "$dir"
  start=$(date +%s)
  echo "+ training $model for $EPOCHS epochs -> $dir" >&2
  launch --model "$model" "${RECIPE[@]}" --epochs "$EPOCHS" --output_dir "$dir" --auto_reload ${EXTRA:-} \
    | python scripts/demo_report.py follow --run "$dir" --epochs "$EPOCHS"
  if grep -q 'Epoch: \[' "$dir/train.out" || [ ! -f "$dir/minutes" ]; then  # trained now: record the time
    awk -v s="$(( $(date +%s) - start ))" 'BEGIN {printf "%.1f\n", s / 60}' > "$dir/minutes"
  fi
  launch --model "$model" "${RECIPE[@]}" --eval --resume "$dir/checkpoint.pth" > "$dir/eval.out"
  acc=$(sed -n 's/^Accuracy of the network on the [0-9]* test images: \(.*\)%$/\1/p' "$dir/eval.out" | tail -1)
  params=$(sed -n 's/^number of params: //p' "$dir/eval.out" | tail -1)
  rows+=("$model $params $acc $(cat "$dir/minutes")")
done

printf '\n%-22s %10s %12s %9s\n' model params 'val top-1' minutes
for row in "${rows[@]}"; do printf '%-22s %10s %11s%% %9s\n' $row; done
runs=()
for model in $MODELS; do runs+=("$OUT/$model"); done
python scripts/demo_report.py curves --output "$OUT/curves.png" "${runs[@]}"
