#!/usr/bin/env python
"""Per-term, per-level gradient norms of the distillation terms against the segmentation loss's.

    python scripts/kd_gradients.py TEACHER_RUN --cache CACHE [--student STUDENT_RUN] [--methods recokd,logit,cwd]

For each method, a student (at its initial weights, and, with ``--student``, at a trained run's final
weights) is fed ``--batches`` training batches of the teacher run's plan; the table gives each term's
loss, ``‖∇_θ L‖`` on the student's weights and ``λ_max · ‖∇L_term‖ / ‖∇L_seg‖``, the term's pull
relative to the labels' at full λ (means over the batches). See ReCoKDLib/distill/diagnostics.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from ReCoKDLib.data.loader import PatchBatches
from ReCoKDLib.data.planning import Plans
from ReCoKDLib.data.preprocessing import load_preprocessed
from ReCoKDLib.distill.diagnostics import term_gradients
from ReCoKDLib.distill.distiller import Distiller
from ReCoKDLib.models.unet import UNetSpec, build_unet, dynunet_tap_names
from ReCoKDLib.models.weights import load_weights
from ReCoKDLib.utils.runtime import configure_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path, help="a `recokd train` run folder")
    ap.add_argument("--cache", type=Path, required=True, help="the preprocessed cache the teacher trained from")
    ap.add_argument("--student", type=Path, help="a trained student run (its model_final weights are measured too)")
    ap.add_argument("--methods", default="recokd,logit,cwd,fitnet")
    ap.add_argument("--width-factor", type=float, default=4.0)
    ap.add_argument("--lambda-max", type=float, help="λ_max for the ratio (default: each method's)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    configure_cpu(args.threads)

    run = json.loads((args.teacher / "run.json").read_text())
    plans = Plans.load(args.teacher / "plans.json")
    t_spec = UNetSpec.from_json((args.teacher / "network.json").read_text())
    teacher = load_weights(build_unet(t_spec), args.teacher / "model_final.safetensors")
    ids = run["train_cases"]
    cases = [load_preprocessed(args.cache, plans, i) for i in ids]
    data = PatchBatches([c.image for c in cases], [c.label for c in cases], plans.patch_size,
                        batch_size=run["config"]["batch_size"], seed=args.seed, length=args.batches)
    batches = [data[i] for i in range(args.batches)]
    s_spec = t_spec.student(args.width_factor)
    states = {"init": None}
    if args.student:
        states["trained"] = args.student / "model_final.safetensors"

    print(f"teacher {args.teacher}, student R = {args.width_factor:g}, {args.batches} batches of "
          f"{run['config']['batch_size']} × {list(plans.patch_size)}")
    print("| method | student | term | level | loss | ‖∇‖ | λ_max·‖∇‖/‖∇seg‖ |\n|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for state, weights in states.items():
            torch.manual_seed(args.seed)
            student = build_unet(s_spec)
            if weights:
                load_weights(student, weights)
            rows = defaultdict(list)
            with Distiller(teacher, student, dynunet_tap_names(t_spec), dynunet_tap_names(s_spec),
                           plans.num_classes, method, lambda_max=args.lambda_max) as distiller:  # hooks removed after
                distiller.train()
                lambda_max = distiller.lambda_max
                for images, labels in batches:
                    for r in term_gradients(distiller, images, labels):
                        rows[(r.term, r.level)].append(r)
            seg = statistics.mean(r.grad_norm for r in rows[("seg", None)])
            for (term, level), rs in rows.items():
                if term == "seg" and method != args.methods.split(",")[0]:
                    continue
                g = statistics.mean(r.grad_norm for r in rs)
                ratio = "" if term == "seg" else f"{lambda_max * g / seg:.3g}"
                print(f"| {method} | {state} | {term} | {'all' if level is None else level} | "
                      f"{statistics.mean(r.loss for r in rs):.4g} | {g:.3g} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
