"""``recokd evaluate PRED_DIR GT_DIR``: Dice, HD95 and normalised surface Dice per class."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..errors import ReCoKDError


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_folders, format_table, write_csv

    labels = None
    if args.labels:
        try:
            raw = json.loads(Path(args.labels).read_text())
            raw = raw.get("labels", raw)
            labels = {str(k): int(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise ReCoKDError(f"cannot read labels from {args.labels}: {exc}; give a JSON {{name: value}} or a dataset.json") from None
    result = evaluate_folders(args.pred, args.gt, labels=labels, tolerance_mm=args.tolerance, postprocess=args.postprocess)
    csv_path = Path(args.csv or Path(args.pred) / "evaluation.csv")
    write_csv(csv_path, result.cases, result.summary, result.class_names)
    if args.json:
        from ..utils.io import atomic_write_text, json_safe

        atomic_write_text(Path(args.json), json.dumps(json_safe(evaluation_record(result, args)), indent=2) + "\n")
    print(format_table(result.summary, result.class_names, args.tolerance))
    print(f"\n{len(result.cases)} case(s); per-case scores in {csv_path}")
    if result.missing:
        print(f"note: {len(result.missing)} reference case(s) have no prediction and were not scored: "
              f"{', '.join(result.missing)[:200]}")
    return 0


def evaluation_record(result, args: argparse.Namespace) -> dict:
    """What ``--json`` writes (and ``recokd export --test-metrics`` records in a bundle): the command,
    the number of cases, mean Dice/HD95/NSD per class and mean Dice per case."""
    return {
        # the last two parts of each folder: a shipped bundle should not carry the scorer's local paths
        "command": "recokd evaluate " + " ".join("/".join(Path(f).resolve().parts[-2:]) for f in (args.pred, args.gt))
        + (f" --postprocess {args.postprocess}" if args.postprocess != "none" else ""),
        "num_cases": len(result.cases),
        "postprocess": args.postprocess,
        "tolerance_mm": args.tolerance,
        "mean": {metric: dict(values) for metric, values in result.summary.items()},
        "dice_mean": result.summary["dice"]["mean"],
        "per_case_dice_mean": {c.case_id: float(np.nanmean([c.scores["dice"][n] for n in result.class_names]))
                               for c in result.cases},
    }


def register(sub: argparse._SubParsersAction) -> None:
    from ..inference.postprocessing import POSTPROCESSING

    p = sub.add_parser("evaluate", help="score predictions against reference labels (Dice, HD95, NSD)")
    p.add_argument("pred", help="folder of predicted label files")
    p.add_argument("gt", help="folder of reference label files (same names)")
    p.add_argument("--labels", help="labels JSON ({name: value}) or dataset.json (default: dataset.json near GT)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--csv", help="CSV output (default PRED/evaluation.csv)")
    p.add_argument("--json", help="also write the summary as JSON (for recokd export --test-metrics)")
    p.add_argument("--postprocess", choices=POSTPROCESSING, default="none",
                   help="post-process the predictions before scoring (files unchanged), to choose a model's "
                   "recokd export --postprocess on held-out cases (default none)")
    p.set_defaults(func=run)
