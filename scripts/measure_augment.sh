#!/usr/bin/env bash
# The augmentation presets at CPU schedules (docs/results.md, "Augmentation at CPU schedules"), one variable at
# a time: LA2018-lowres teachers (1000 iterations, seeds 0-2: none / light, seed 0: nnunet) scored on the test
# cases, ACDC-subset fold-0 teachers (800 iterations, seeds 0-1: none / light, seed 0: nnunet) scored on the held-out
# cases. Resumable: run it again to continue. Usage: bash scripts/measure_augment.sh [WORK_FOLDER]
set -uo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); W=$(realpath -m "${1:-augment_measure}"); DATA=$R/../shared/data
source "$R/.venv/bin/activate"; mkdir -p "$W/acdc"
planner="--no-progress --patch-budget 65536 --base-filters 16 --max-filters 128"
train="--optimizer adamw --lr 0.003 --batch-size 2 --iters-per-epoch 100 --val-max-cases 2 --workers 1 --threads 1 --device cpu --no-progress --resume"
score() {  # model, images, labels, name
  recokd predict --overwrite -m "$1" -i "$2" -o "$W/pred_$4" --device cpu --threads 1 --no-progress > /dev/null 2>&1 \
  && recokd evaluate --overwrite "$W/pred_$4" "$3" --json "$W/eval_$4.json" | grep "| mean" | sed "s/^/$4 /"
}
la() {  # preset, seed
  local D=$DATA/LA2018-lowres n=la_$1_s$2
  recokd train "$D" -o "$W/$n" --cache "$W/la_cache" --plans "$W/la_cache/plans.json" --fold all --epochs 10 --val-every 10 \
    --seed "$2" --augment "$1" $train > "$W/$n.log" 2>&1 && score "$W/$n" "$D/imagesTs" "$D/labelsTs" "$n"
}
acdc() {  # preset, seed
  local D=$DATA/ACDC-subset n=acdc_$1_s$2
  recokd train "$D" -o "$W/$n" --cache "$W/acdc_cache" --plans "$W/acdc_cache/plans.json" --val-cases "$W/acdc/fold0.txt" \
    --epochs 8 --val-every 8 --seed "$2" --augment "$1" $train > "$W/$n.log" 2>&1 \
  && score "$W/$n" "$W/acdc/val_images" "$W/acdc/val_labels" "$n"
}
[ -f "$W/la_cache/plans.json" ] || recokd plan "$DATA/LA2018-lowres" --cache "$W/la_cache" $planner > /dev/null
[ -f "$W/acdc_cache/plans.json" ] || recokd plan "$DATA/ACDC-subset" --cache "$W/acdc_cache" $planner > /dev/null
python "$R/scripts/heldout_fold.py" "$DATA/ACDC-subset" "$W/acdc" --prefix val
la none 0 & la light 0 & wait
la none 1 & la light 1 & wait
la none 2 & la light 2 & wait
la nnunet 0 & acdc nnunet 0 & wait
acdc none 0 & acdc light 0 & wait
acdc none 1 & acdc light 1 & wait
