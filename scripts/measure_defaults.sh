#!/usr/bin/env bash
# The training defaults other than augmentation, one variable at a time on the same seeds (issue 14):
# LA2018-lowres teachers, 1000 iterations, --augment none, seeds 0-2, scored with recokd evaluate on the
# 10 test cases. The baseline is measure_augment.sh's `la_none_s<seed>` runs in the same WORK folder (run
# it first, or this script trains them). Variants: a 2x patch (32x64x64, the plain script's), foreground
# oversampling off (0) and on every patch (1; batch 2 makes 1/3 one patch of two), EMA off, lr 1e-3 and
# 1e-2, and the default patch for 2000 iterations (it2000: the patch variant's CPU time, 2x per iteration).
# Summarise with `python scripts/defaults_summary.py WORK`. Resumable: run it again to continue.
# VARIANTS="patch32x64x64 fg0" runs only those (and script instances with different SEEDS may run side by side).
# Usage: [SEEDS="0 1 2"] [VARIANTS="..."] bash scripts/measure_defaults.sh [WORK_FOLDER]
set -uo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); W=$(realpath -m "${1:-augment_measure}"); D=$R/../shared/data/LA2018-lowres
source "$R/.venv/bin/activate"; mkdir -p "$W"
train="--optimizer adamw --batch-size 2 --iters-per-epoch 100 --epochs 10 --val-every 10 --val-max-cases 2 --fold all
       --augment none --workers 1 --threads 1 --device cpu --no-progress --resume"
la() {  # name, seed, extra options...
  local v=$1 n=la_$1_s$2 seed=$2; shift 2
  [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $v "* ]] || return 0
  [ -f "$W/eval_$n.json" ] && { echo "$n $(grep -o '"dice_mean": [0-9.]*' "$W/eval_$n.json")"; return; }
  recokd train "$D" -o "$W/$n" --cache "$W/la_cache" --plans "$W/la_cache/plans.json" --seed "$seed" $train "$@" \
      > "$W/$n.log" 2>&1 \
  && recokd predict --overwrite -m "$W/$n" -i "$D/imagesTs" -o "$W/pred_$n" --device cpu --threads 1 --no-progress > /dev/null 2>&1 \
  && recokd evaluate --overwrite "$W/pred_$n" "$D/labelsTs" --json "$W/eval_$n.json" | grep "| mean" | sed "s/^/$n /" \
  || echo "$n failed; see $W/$n.log"
}
[ -f "$W/la_cache/plans.json" ] || recokd plan "$D" --cache "$W/la_cache" --no-progress --patch-budget 65536 \
    --base-filters 16 --max-filters 128 > /dev/null
for seed in ${SEEDS:-0 1 2}; do  # SEEDS="0" for a first pass
  la none "$seed" --lr 0.003 & la patch32x64x64 "$seed" --lr 0.003 --patch-size 32 64 64 & wait
  la fg0 "$seed" --lr 0.003 --foreground-fraction 0 & la fg1 "$seed" --lr 0.003 --foreground-fraction 1 & wait
  la noema "$seed" --lr 0.003 --ema-decay 0 & la lr1e-3 "$seed" --lr 0.001 & wait
  la lr1e-2 "$seed" --lr 0.01 & la it2000 "$seed" --lr 0.003 --epochs 20 & wait
done
