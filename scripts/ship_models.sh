#!/usr/bin/env bash
# Rebuilds the models shipped in ReCoKDLib/resources/models/ (the Slicer module's model list on first
# open, and `recokd predict -m NAME` without --registry): trains, scores on held-out cases with
# `recokd evaluate`, exports bundles with terminology, test Dice and terms of use, writes registry.json.
#
#   bash scripts/ship_models.sh [WORK_DIR]     (default ./recokd_ship; resumable: re-run to continue)
#
# About 45 minutes on 2 CPU cores. Needs ../shared/data/LA2018-lowres (research-use data: the LA2018
# model may be redistributed for research use only, as its bundle and registry entry say).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
source "${RECOKD_VENV:-$root/.venv}/bin/activate"
W="$(mkdir -p "${1:-recokd_ship}" && cd "${1:-recokd_ship}" && pwd)"
LA="${RECOKD_SHARED_DATA:-$root/../shared/data}/LA2018-lowres"
OUT="$root/ReCoKDLib/resources/models"
TERMS="$root/configs/terminology"
common="--fold all --iters-per-epoch 100 --optimizer adamw --lr 0.003 --batch-size 2 --no-augment --seed 0
        --val-every 5 --val-max-cases 2 --workers 1 --threads 1 --device cpu --no-progress --resume"
planner="--patch-budget 65536 --base-filters 16 --max-filters 128"

# -- LA2018-lowres: left atrium, 80 training cases, scored on the 10 test cases --------------------
L="$W/la2018"
recokd plan "$LA" --cache "$L/cache" --no-progress $planner
recokd train "$LA" -o "$L/teacher" --cache "$L/cache" --plans "$L/cache/plans.json" --epochs 15 $common
recokd distill "$LA" -o "$L/student_recokd" --cache "$L/cache" --teacher "$L/teacher" --epochs 15 --method recokd $common
recokd predict -m "$L/student_recokd" -i "$LA/imagesTs" -o "$L/pred" --device cpu --no-progress
recokd evaluate "$L/pred" "$LA/labelsTs" --json "$L/test.json"
recokd export "$L/student_recokd" -o "$OUT/la2018-left-atrium.recokd" --name la2018-left-atrium \
  --description "Left atrium in 3D LGE-MRI (1.25 mm); ReCo-KD student (R = 4) of a 16-128-filter U-Net" \
  --terminology "$TERMS/la2018-left-atrium.json" --test-metrics "$L/test.json" \
  --license "Research use only, not for clinical use: trained on the 2018 Atrial Segmentation Challenge data (LA2018, via the UA-MT repository; cite Xiong et al., Medical Image Analysis 2021)."

# -- the built-in phantom: 40 training cases (seed 0); scored on 10 held-out cases and the sample ---
P="$W/phantom"
python - "$P" <<'PY'
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ReCoKDLib.data.phantom import generate_dataset, sample_case, save_dataset_nnunet

root = Path(sys.argv[1])
train = root / "Dataset900_ReCoKDPhantom"
if not (train / "dataset.json").is_file():
    save_dataset_nnunet(generate_dataset(40, seed=0), train, "Dataset900_ReCoKDPhantom")
test = root / "heldout"
if not (test / "dataset.json").is_file():
    cases = [replace(c, name=f"heldout_{i:03d}") for i, c in enumerate(generate_dataset(10, seed=1))] + [sample_case()]
    save_dataset_nnunet(cases, test, "Dataset901_ReCoKDPhantomHeldout")
    for folder in ("imagesTr", "labelsTr"):
        (test / folder).rename(test / folder.replace("Tr", "Ts"))
PY
D="$P/Dataset900_ReCoKDPhantom"
recokd plan "$D" --cache "$P/cache" --no-progress $planner
recokd train "$D" -o "$P/teacher" --cache "$P/cache" --plans "$P/cache/plans.json" --epochs 10 $common
recokd distill "$D" -o "$P/student_recokd" --cache "$P/cache" --teacher "$P/teacher" --epochs 20 --method recokd $common
recokd predict -m "$P/student_recokd" -i "$P/heldout/imagesTs" -o "$P/pred" --device cpu --no-progress
recokd evaluate "$P/pred" "$P/heldout/labelsTs" --json "$P/test.json"
recokd export "$P/student_recokd" -o "$OUT/phantom-abdomen.recokd" --name phantom-abdomen \
  --description "ReCoKD's synthetic abdomen phantom (organ, kidneys, vessel, lesions); ReCo-KD student (R = 4); for trying the module" \
  --terminology "$TERMS/phantom-abdomen.json" --test-metrics "$P/test.json" \
  --license "Apache-2.0 (trained on ReCoKD's synthetic phantom, no patient data). Not for clinical use."

# -- the registry ---------------------------------------------------------------------------------
python - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

from ReCoKDLib.deployment.bundle import load_bundle
from ReCoKDLib.deployment.registry import make_entry, validate_registry

out = Path(sys.argv[1])
models = []
for name in ("la2018-left-atrium", "phantom-abdomen"):
    path = out / f"{name}.recokd"
    bundle = load_bundle(path)  # checks schema and checksums
    p = bundle.provenance
    entry = make_entry(path, name=name, url=path.name, description=bundle.manifest["description"])
    entry.update(role=bundle.role, method=p.get("method"), labels=bundle.labels,
                 channels=[bundle.channel_names[k] for k in sorted(bundle.channel_names)],
                 license=p["license"], test_dice=round(p["test_metrics"]["dice_mean"], 4))
    models.append(entry)
registry = {"version": 1, "description": "Models shipped with ReCoKD (work offline)", "models": models}
validate_registry(registry, "the shipped registry")
(out / "registry.json").write_text(json.dumps(registry, indent=2) + "\n")
print(json.dumps([(m["name"], m["test_dice"], m["size"]) for m in models]))
PY
