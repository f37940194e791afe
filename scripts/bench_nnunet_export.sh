#!/usr/bin/env bash
# Issue 31's timing figures: a teacher and its student, both exported as nnU-Net v2 results folders, timed
# on the same cases by `recokd benchmark` (ReCoKD's predictor, nnU-Net's window weights) and by nnU-Net's own
# `nnUNetv2_predict_from_modelfolder` (whole command, process start included), and nnU-Net's predictor in one
# process (`predict_single_npy_array` per case: preprocessing, network and resampling; no process start, no
# export workers), teacher and student alternated case by case; one CPU thread.
#   bash scripts/bench_nnunet_export.sh TEACHER STUDENT IMAGES LABELS OUT
# TEACHER / STUDENT: a ReCoKD run folder or .recokd bundle (exported here) or an nnU-Net results folder.
set -euo pipefail
teacher=$1 student=$2 images=$3 labels=$4 out=$5
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/.bench_nnunet_export" ]; then
  echo "error: $out exists and is not an earlier run of this benchmark; choose another OUT" >&2; exit 2
fi
mkdir -p "$out" && touch "$out/.bench_nnunet_export"  # its own folder: later runs may replace what it wrote
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
bin=$(dirname "$py")
folder() {  # an nnU-Net model folder for $1 (exported to $out/nnunet/<id> unless it is one already)
  if [ -f "$1/plans.json" ] && [ -f "$1/dataset.json" ]; then echo "$1"; return; fi
  "$bin/recokd" export "$1" --format nnunet -o "$out/nnunet/$2" --dataset-id "$2" --overwrite >&2
  ls -d "$out/nnunet/$2"/Dataset*/nnUNetTrainer__nnUNetPlans__3d_fullres
}
t=$(folder "$teacher" 801); s=$(folder "$student" 802)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$bin/recokd" benchmark --models "teacher=$t" "student=$s" --images "$images" --labels "$labels" --threads 1 \
  --repeats 3 -o "$out/recokd_benchmark" --overwrite
export nnUNet_raw="$out/raw" nnUNet_preprocessed="$out/pre" nnUNet_results="$out/nnunet" nnUNet_def_n_proc=1
echo
echo "| model | nnUNetv2_predict_from_modelfolder, $(ls "$images" | wc -l) cases (s, whole command) | s/case |"
echo "|---|---|---|"
for round in 1 2; do  # alternated, twice: load drift shows as a difference between rounds
  for name in teacher student; do
    m=$t; [ "$name" = student ] && m=$s
    rm -rf "$out/pred_$name"
    start=$(date +%s.%N)
    "$bin/nnUNetv2_predict_from_modelfolder" -i "$images" -o "$out/pred_$name" -m "$m" -f 0 -device cpu \
      --disable_tta -npp 1 -nps 1 > "$out/nnunet_$name.log" 2>&1
    end=$(date +%s.%N)
    n=$(ls "$images" | wc -l)
    awk -v a="$start" -v b="$end" -v n="$n" -v m="$name (round $round)" 'BEGIN{printf "| %s | %.1f | %.2f |\n", m, b-a, (b-a)/n}'
  done
done

echo
"$py" - "$t" "$s" "$images" <<'EOF'
import statistics, sys, time
from pathlib import Path

import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

torch.set_num_threads(1)
folders, images = dict(teacher=sys.argv[1], student=sys.argv[2]), sorted(Path(sys.argv[3]).glob("*.nii.gz"))
predictors = {}
for name, folder in folders.items():
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(folder, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictors[name] = p
seconds = {name: [] for name in predictors}
for i, path in enumerate(images):
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)[None].astype("float32")
    props = {"spacing": list(image.GetSpacing())[::-1]}
    order = list(predictors) if i % 2 == 0 else list(predictors)[::-1]  # alternated: drift hits both alike
    for name in order:
        tick = time.perf_counter()
        predictors[name].predict_single_npy_array(array, props, None, None, False)
        seconds[name].append(time.perf_counter() - tick)
ratios = [t / s for t, s in zip(seconds["teacher"], seconds["student"])]
print(f"| model | nnU-Net predictor in one process, {len(images)} cases: s/volume median [range] |")
print("|---|---|")
for name, values in seconds.items():
    print(f"| {name} | {statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}] |")
print(f"| teacher / student, per case | {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] |")
EOF
