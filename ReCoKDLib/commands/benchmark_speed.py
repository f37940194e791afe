"""``recokd benchmark-speed``: teacher at nnU-Net widths vs its students, per backend, on real volumes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ReCoKDError

DESCRIPTION = (
    "Times a teacher at nnU-Net widths (32…320 filters by default) and its students (channels / R) on real "
    "volumes, with each inference engine and precision, round by round in turn in one process (load that changes "
    "during the run falls on every model alike; speed-ups are per round, median and range), with each one's label "
    "agreement with PyTorch fp32 and a fresh process's peak RAM on the largest volume. The networks have random weights "
    "(speed does not depend on them) and the topology, patch and preprocessing of a dataset's plan "
    "(`recokd plan DATASET` writes plans.json and network.json)."
)


def run(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from ..benchmarks.speed import run_speed_benchmark, speed_table, width_ladder
    from ..data.datasets import group_cases, read_image
    from ..data.planning import Plans
    from ..utils.io import atomic_write_text, json_safe
    from ..utils.outputs import check_output_files
    from ..utils.runtime import configure_cpu
    from ..workflows.runs import planned_network

    out = Path(args.output)
    check_output_files([out / "speed.md", out / "speed.json"], overwrite=args.overwrite, kind="benchmark output")
    plans_path = Path(args.plans)
    plans = Plans.load(plans_path)
    topology = planned_network(plans_path, plans)
    cases = group_cases(args.images)
    if not cases:
        raise ReCoKDError(f"{args.images} holds no images; give the folder of a dataset's images (e.g. imagesTs)")
    volume_files = [files for _, files in list(cases.items())[: args.max_cases]]
    if args.threads:
        configure_cpu(args.threads)
    bundles = width_ladder(plans, topology, args.base_filters, args.max_filters, args.width_factors)
    results = run_speed_benchmark(bundles, volume_files, args.backends, threads=args.threads, repeats=args.repeats,
                                  overlap=args.overlap, sw_batch_size=args.sw_batch, precisions=args.precisions,
                                  memory=not args.no_memory)
    shape = "x".join(str(n) for n in sitk.GetArrayViewFromImage(read_image(volume_files[0][0])).shape)
    caption = (f"{plans.dataset_name}: {len(volume_files)} volume(s) (first {shape} voxels), patch "
               f"{'x'.join(map(str, plans.patch_size))}, overlap {args.overlap}, {args.repeats} round(s)")
    table = speed_table(results, caption)
    atomic_write_text(out / "speed.md", table + "\n")
    atomic_write_text(out / "speed.json", json.dumps([json_safe({**r.__dict__, "overhead": r.overhead})
                                                      for r in results], indent=1) + "\n")
    print(table)
    print(f"\nwritten to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark-speed", help="seconds per volume: nnU-Net-width teacher vs students, per backend",
                       description=DESCRIPTION)
    p.add_argument("--plans", required=True, help="a dataset's plans.json (network.json beside it: the topology)")
    p.add_argument("--images", required=True, help="folder of the dataset's images (case_0000.nii.gz ...)")
    p.add_argument("--base-filters", dest="base_filters", type=int, default=32, help="teacher's level-0 filters (default 32)")
    p.add_argument("--max-filters", dest="max_filters", type=int, default=320, help="teacher's filter cap (default 320)")
    p.add_argument("--width-factors", dest="width_factors", type=float, nargs="+", default=[4, 8],
                   help="students' R (default 4 8)")
    p.add_argument("--backends", nargs="+", choices=["torch", "onnxruntime", "openvino"], default=["torch", "onnxruntime"],
                   help="engines to time (default torch onnxruntime; openvino needs pip install 'recokd[openvino]')")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="precisions to time each engine at (default fp32; bf16 runs on torch and openvino)")
    p.add_argument("--no-memory", dest="no_memory", action="store_true",
                   help="skip the peak-RAM measurement (a fresh process per model and engine)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--max-cases", dest="max_cases", type=int, default=2, help="volumes to time (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timing rounds; in each, every model segments every volume once, in turn (default 3)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch", dest="sw_batch", type=int, default=2, help="windows per forward pass (default 2)")
    p.add_argument("-o", "--output", default="recokd_speed", help="output folder (default ./recokd_speed)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's speed.md / speed.json")
    p.set_defaults(func=run)
