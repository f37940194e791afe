#!/usr/bin/env bash
# What it takes for the ACDC-subset teacher to reach the issue-14 target (mean Dice >= 0.80 over the
# study's 3-fold patient-grouped cross-validation), one variable at a time against the study's teacher
# (1600 iterations, lr 3e-3, --augment none, batch 2, the study's CPU plan; seed k on fold k).
# Each run is scored with `recokd predict` + `recokd evaluate` on its held-out fold, no post-processing.
# Variants: VARIANTS="base it3200 it4800 lr1e-3 patch2x" (default: all; base reproduces the study's teachers).
# Resumable: run it again to continue. PARALLEL runs at a time (default 2), one CPU thread each.
#   [VARIANTS="it3200"] [FOLDS="0 1 2"] [PARALLEL=2] bash scripts/measure_acdc_teacher.sh [WORK_FOLDER]
set -uo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); W=$(realpath -m "${1:-acdc_teacher}"); D=$R/../shared/data/ACDC-subset
source "$R/.venv/bin/activate"; mkdir -p "$W"
common="--optimizer adamw --batch-size 2 --iters-per-epoch 100 --val-max-cases 2 --augment none --workers 1
        --threads 1 --device cpu --no-progress --resume"
planner="--patch-budget 65536 --base-filters 16 --max-filters 128"
run() {  # variant, fold, epochs, cache, extra options...
  local n=$1_f$2 k=$2 epochs=$3 cache=$4; shift 4
  [ -f "$W/eval_$n.json" ] && { echo "$n $(grep -o '"dice_mean": [0-9.]*' "$W/eval_$n.json")"; return; }
  recokd train "$D" -o "$W/$n" --cache "$cache" --plans "$cache/plans.json" --val-cases "$W/folds/fold$k.txt" \
      --seed "$k" --epochs "$epochs" --val-every "$epochs" $common "$@" > "$W/$n.log" 2>&1 \
  && recokd predict --overwrite -m "$W/$n" -i "$W/folds/f${k}_images" -o "$W/pred_$n" --device cpu --threads 1 --no-progress \
      > /dev/null 2>&1 \
  && recokd evaluate --overwrite "$W/pred_$n" "$W/folds/f${k}_labels" --json "$W/eval_$n.json" | grep "| mean" | sed "s/^/$n /" \
  || echo "$n failed; see $W/$n.log"
}
for k in 0 1 2; do
  [ -f "$W/folds/fold$k.txt" ] || python "$R/scripts/heldout_fold.py" "$D" "$W/folds" --fold "$k" --prefix "f$k" > /dev/null
done
[ -f "$W/cache/plans.json" ] || recokd plan "$D" --cache "$W/cache" --no-progress $planner > /dev/null
# the same plan with twice the patch budget (its own cache: the patch size is part of the plan)
[ -f "$W/cache2x/plans.json" ] || recokd plan "$D" --cache "$W/cache2x" --no-progress \
    --patch-budget 131072 --base-filters 16 --max-filters 128 > /dev/null
queue=()
for v in ${VARIANTS:-base it3200 it4800 lr1e-3 patch2x}; do
  for k in ${FOLDS:-0 1 2}; do queue+=("$v $k"); done
done
variant() {  # variant fold
  case $1 in
    base)    run base "$2" 16 "$W/cache" --lr 0.003 ;;
    it3200)  run it3200 "$2" 32 "$W/cache" --lr 0.003 ;;
    it4800)  run it4800 "$2" 48 "$W/cache" --lr 0.003 ;;
    lr1e-3)  run lr1e-3 "$2" 16 "$W/cache" --lr 0.001 ;;
    patch2x) run patch2x "$2" 16 "$W/cache2x" --lr 0.003 ;;
    *) echo "unknown variant $1"; return 1 ;;
  esac
}
P=${PARALLEL:-2}
for ((i = 0; i < ${#queue[@]}; i += P)); do  # P at a time
  for ((j = i; j < i + P && j < ${#queue[@]}; j++)); do variant ${queue[j]} & done
  wait
done
