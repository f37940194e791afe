"""``recokd benchmark``: teacher, students and baselines side by side on the same cases."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ReCoKDError


def run(args: argparse.Namespace) -> int:
    from ..benchmarks.inference import benchmark_chart, benchmark_table, parse_models, results_json, run_benchmark
    from ..utils.io import atomic_write_text
    from ..utils.outputs import check_output_files

    config = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            raise ReCoKDError(f"cannot read benchmark config {args.config}: {exc}") from None
    out = Path(args.output)
    # the overwrite rule (utils/outputs.py), before minutes of timing
    check_output_files([out / f"benchmark.{e}" for e in ("md", "json", "png")], overwrite=args.overwrite,
                       kind="benchmark output")
    models = parse_models(args.models) if args.models else dict(config.get("models", {}))
    images, labels = args.images or config.get("images"), args.labels or config.get("labels")
    if not models or not images or not labels:
        raise ReCoKDError("give --models NAME=PATH ..., --images DIR and --labels DIR (or a --config JSON with them)")
    results = run_benchmark(models, images, labels, device=args.device, repeats=args.repeats,
                            max_cases=args.max_cases, teacher=args.teacher or config.get("teacher"),
                            no_kd=args.no_kd or config.get("no_kd"), threads=args.threads,
                            backends=args.backends or config.get("backends") or ["torch"])
    table = benchmark_table(results)
    atomic_write_text(out / "benchmark.md", table + "\n")
    atomic_write_text(out / "benchmark.json", results_json(results) + "\n")
    benchmark_chart(results, out / "benchmark.png")
    print(table)
    print(f"\nwritten to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="compare teacher, students and baselines on the same cases")
    p.add_argument("--models", nargs="+", help="NAME=PATH (bundle or run folder), one per model")
    p.add_argument("--images", help="folder of images (case_0000.nii.gz ...)")
    p.add_argument("--labels", help="folder of reference labels (case.nii.gz)")
    p.add_argument("--config", help="JSON with models / images / labels / teacher / no_kd")
    p.add_argument("--teacher", help="name of the teacher (default: the model whose role is teacher)")
    p.add_argument("--no-kd", dest="no_kd", help="name of the student without KD (default: method none)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, help="CPU threads for every model (default: torch's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timing rounds; in each, every model segments every volume once, in turn (median; default 3)")
    p.add_argument("--backends", nargs="+", choices=["torch", "onnxruntime", "openvino", "auto"],
                   help="run every model with each of these engines (default torch; e.g. --backends torch onnxruntime)")
    p.add_argument("--max-cases", dest="max_cases", type=int, help="use at most this many cases")
    p.add_argument("-o", "--output", default="recokd_benchmark", help="output folder (default ./recokd_benchmark)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier benchmark's files in the output folder")
    p.set_defaults(func=run)
