"""Seconds per volume and peak RAM of each shipped model on a full-size scan, per inference engine.

Issue 32's table: the models a user gets (ReCoKDLib/resources/models) on the largest volume in
../shared/data (BraTS2015-subset's FLAIR, 240 x 240 x 155 at 1 mm: a full-size scan's voxel count, not
these models' anatomy, so the input checks are skipped and the labels are not scored), against the
MONAIAuto3DSeg extension's CPU budget for a full-size scan (under 3 minutes and under 4 GB). Timing: the
whole predictor per volume (reading excluded), every model and engine once per round, in turn, after one
untimed run each; the median of ``--repeats`` rounds. Peak RAM: a fresh process segmenting the volume once
(``python -m ReCoKDLib.benchmarks.peak_memory``). Run it on an otherwise idle machine.

    python scripts/measure_shipped_speed.py [--image FILE] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS, BUDGET_MB = 180.0, 4096.0  # MONAIAuto3DSeg's CPU budget for a full-size scan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=str(ROOT.parent / "shared" / "data" / "BraTS2015-subset" / "imagesTr" /
                                               "brats_2013_pat0001_1_0000.nii.gz"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from ReCoKDLib.data.datasets import read_image
    from ReCoKDLib.inference.backends import _engine_available
    from ReCoKDLib.inference.predictor import Predictor
    from ReCoKDLib.utils.runtime import cpu_description

    models = sorted((ROOT / "ReCoKDLib" / "resources" / "models").glob("*.recokd"))
    engines = ["torch"] + [b for b in ("onnxruntime", "openvino") if _engine_available(b)]
    image = read_image(args.image)
    size = "x".join(str(n) for n in image.GetSize())
    torch.set_num_threads(args.threads)
    predictors = {}
    for model in models:
        for engine in engines:
            predictors[(model.stem, engine)] = Predictor(model, device="cpu", backend=engine, threads=args.threads,
                                                         check_spacing=False, progress=False, log=lambda m: None)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in predictors}
    keys = list(predictors)
    for r in range(args.repeats + 1):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # the order rotated each round
            start = time.perf_counter()
            predictors[key].predict_image([image], name="speed")
            if r:  # round 0 is the untimed warm-up (engine build, ONNX / OpenVINO compile caches)
                times[key].append(time.perf_counter() - start)
    peaks = {}
    for model, engine in keys:
        out = subprocess.run([sys.executable, "-m", "ReCoKDLib.benchmarks.peak_memory", str(ROOT / "ReCoKDLib" / "resources"
                              / "models" / f"{model}.recokd"), args.image, "--backend", engine, "--threads",
                              str(args.threads), "--force"], capture_output=True, text=True)
        peaks[(model, engine)] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] if out.returncode == 0 \
            else float("nan")
    print(f"\n{Path(args.image).name} ({size} voxels); {args.threads} threads; median of {args.repeats} rounds; "
          f"{cpu_description()}; torch {torch.__version__}\n")
    print("| model | engine | s/volume, median [range] | peak RAM (MB) | within MONAIAuto3DSeg's CPU budget (< 180 s, < 4 GB) |")
    print("|---|---|---|---|---|")
    for model, engine in keys:
        t, peak = times[(model, engine)], peaks[(model, engine)]
        ok = statistics.median(t) < BUDGET_SECONDS and peak < BUDGET_MB
        print(f"| {model} | {engine} | {statistics.median(t):.2f} [{min(t):.2f}, {max(t):.2f}] | {peak:.0f} | "
              f"{'yes' if ok else 'no'} |")
    best = {}
    for (model, engine), t in times.items():
        if model not in best or statistics.median(t) < statistics.median(times[(model, best[model])]):
            best[model] = engine
    print("\nbest engine per model: " + ", ".join(f"{m} {e}" for m, e in best.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
