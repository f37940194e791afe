#!/usr/bin/env bash
# Inference speed at real nnU-Net widths (issue 16): a 32-320-filter teacher and its R = 4 / R = 8 students
# on LA2018-lowres and ACDC volumes, PyTorch and ONNX Runtime side by side, 2 CPU threads; then which cheap
# CPU options pay per window (fp32 / channels-last / bf16 / ONNX Runtime at batch 1, 2, 4). Run it on an
# otherwise idle machine: the figures are timings. Then the same at a 4x patch budget (262144 voxels: about
# nnU-Net's own patch for these volumes, few windows per volume), one variable changed.
# Usage: bash scripts/measure_speed.sh [WORK_FOLDER]
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd); W=$(realpath -m "${1:-speed_measure}"); D="${RECOKD_SHARED_DATA:-$R/../shared/data}"
source "$R/.venv/bin/activate"; mkdir -p "$W"
plan() {  # dataset name, patch budget, cache suffix -> its plan (the study's CPU plan: 64k-voxel patch)
  [ -f "$W/cache_$1$3/plans.json" ] || recokd plan "$D/$1" --cache "$W/cache_$1$3" --no-progress \
      --patch-budget "$2" --base-filters 16 --max-filters 128 > /dev/null
}
for suffix in "" _patch4x; do
  budget=65536; [ -n "$suffix" ] && budget=262144
  plan LA2018-lowres $budget "$suffix"; plan ACDC-subset $budget "$suffix"
  recokd benchmark-speed --plans "$W/cache_LA2018-lowres$suffix/plans.json" --images "$D/LA2018-lowres/imagesTs" \
      --threads 2 --max-cases 2 --repeats 2 -o "$W/la2018$suffix"
  recokd benchmark-speed --plans "$W/cache_ACDC-subset$suffix/plans.json" --images "$D/ACDC-subset/imagesTr" \
      --threads 2 --max-cases 2 --repeats 2 -o "$W/acdc$suffix"
done
python "$R/scripts/cpu_inference_options.py" "$W/cache_LA2018-lowres/plans.json" --threads 2 | tee "$W/cpu_options_la2018.md"
