"""``recokd evaluate PRED_DIR GT_DIR``: Dice, HD95 and normalised surface Dice per class."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    result = evaluate_folders(args.pred, args.gt, labels=labels, tolerance_mm=args.tolerance)
    csv_path = Path(args.csv or Path(args.pred) / "evaluation.csv")
    write_csv(csv_path, result.cases, result.summary, result.class_names)
    print(format_table(result.summary, result.class_names, args.tolerance))
    print(f"\n{len(result.cases)} case(s); per-case scores in {csv_path}")
    if result.missing:
        print(f"note: {len(result.missing)} reference case(s) have no prediction and were not scored: "
              f"{', '.join(result.missing)[:200]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score predictions against reference labels (Dice, HD95, NSD)")
    p.add_argument("pred", help="folder of predicted label files")
    p.add_argument("gt", help="folder of reference label files (same names)")
    p.add_argument("--labels", help="labels JSON ({name: value}) or dataset.json (default: dataset.json near GT)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--csv", help="CSV output (default PRED/evaluation.csv)")
    p.set_defaults(func=run)
