#!/usr/bin/env bash
# The ACDC-subset students trained as long as the 4800-iteration teachers of measure_acdc_teacher.sh
# (issue 14: the study's ACDC section used 1600-iteration teachers and students). Same folds and plan;
# seed s trains on fold s mod 3 against that fold's teacher, as in the study, and every method of a seed
# shares the no-KD run's initial weights and batch order; width factor R = WIDTH (default 4; run folders
# of other widths are named METHOD-R<WIDTH>); lr 3e-3, --augment none, batch 2.
# Each run is scored with `recokd predict` + `recokd evaluate` on its held-out fold. Needs the teachers first:
#   VARIANTS=it4800 bash scripts/measure_acdc_teacher.sh WORK
# Resumable (run it again to continue); PARALLEL jobs at a time from one queue (default 2, one thread each).
#   [METHODS="none recokd"] [SEEDS="0 1 2"] [WIDTH=4] [TEACHER=it4800] [PARALLEL=2] bash scripts/measure_acdc_students.sh [WORK]
# Summary (mean, per class, paired difference to no-KD): python scripts/acdc_students_summary.py WORK
set -uo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); W=$(realpath -m "${1:-acdc_teacher}"); D=$R/../shared/data/ACDC-subset
T=${TEACHER:-it4800}; epochs=${EPOCHS:-48}; width=${WIDTH:-4}
source "$R/.venv/bin/activate"
one() {  # method seed
  local m=$1 s=$2 k=$(($2 % 3)) label=$1
  [ "$width" = 4 ] || label=$1-R$width
  local n=student_${T}_${label}_f$k
  [ "$s" = "$k" ] || n=student_${T}_${label}_s$2_f$k  # run folders: seed k on fold k keeps the short name
  [ -f "$W/eval_$n.json" ] && { echo "$n $(grep -o '"dice_mean": [0-9.]*' "$W/eval_$n.json")"; return; }
  [ -f "$W/eval_${T}_f$k.json" ] || { echo "$n: teacher $W/${T}_f$k is not finished"; return 1; }
  recokd distill "$D" -o "$W/$n" --cache "$W/cache" --teacher "$W/${T}_f$k" --val-cases "$W/folds/fold$k.txt" \
      --method "$m" --width-factor "$width" --seed "$s" --epochs "$epochs" --val-every "$epochs" --iters-per-epoch 100 \
      --optimizer adamw --lr 0.003 --batch-size 2 --val-max-cases 2 --augment none --workers 1 --threads 1 \
      --device cpu --no-progress --resume > "$W/$n.log" 2>&1 \
  && recokd predict --overwrite -m "$W/$n" -i "$W/folds/f${k}_images" -o "$W/pred_$n" --device cpu --threads 1 --no-progress \
      > /dev/null 2>&1 \
  && recokd evaluate --overwrite "$W/pred_$n" "$W/folds/f${k}_labels" --json "$W/eval_$n.json" | grep "| mean" | sed "s/^/$n /" \
  || echo "$n failed; see $W/$n.log"
}
export -f one; export W D T epochs width
# seed by seed, so that pairs complete early; within a seed the longer job (distillation) first
for s in ${SEEDS:-0 1 2}; do for m in ${METHODS:-recokd none}; do echo "$m $s"; done; done \
  | xargs -P "${PARALLEL:-2}" -L 1 bash -c 'one "$0" "$1"'
