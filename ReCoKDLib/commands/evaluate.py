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
    csv_path = Path(args.csv or Path(args.pred) / "evaluation.csv")
    _check_outputs(args, csv_path)  # before the scoring, which can take minutes
    result = evaluate_folders(args.pred, args.gt, labels=labels, tolerance_mm=args.tolerance, postprocess=args.postprocess)
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


def _check_outputs(args: argparse.Namespace, csv_path: Path) -> None:
    """The overwrite rule (:mod:`ReCoKDLib.utils.outputs`) for ``--csv`` and ``--json``: never a file of
    the folders being scored or the labels file, never an existing file unless ``--overwrite``, and then
    only an earlier evaluation CSV / JSON."""
    from ..data.datasets import IMAGE_FILE_ENDINGS, split_file_ending
    from ..utils.outputs import check_output_file

    inputs = [p for folder in (args.pred, args.gt) if Path(folder).is_dir() for p in Path(folder).iterdir()
              if split_file_ending(p.name)[1].lower() in IMAGE_FILE_ENDINGS]  # what is scored
    inputs += [Path(args.labels)] if args.labels else []
    inputs += [Path(args.gt) / "dataset.json", Path(args.gt).parent / "dataset.json"]
    outputs = [("--csv", csv_path, "evaluation CSV", _is_evaluation_csv)]
    if args.json:
        outputs.append(("--json", Path(args.json), "evaluation JSON", _is_evaluation_json))
    if args.json and _same(Path(args.json), csv_path):
        raise ReCoKDError(f"--json {args.json} is also the CSV output; give the two outputs different names")
    for option, path, kind, is_kind in outputs:
        if split_file_ending(path.name)[1].lower() in IMAGE_FILE_ENDINGS:
            raise ReCoKDError(f"{option} {path} is named like an image; give a .{option[2:]} file")
        check_output_file(path, overwrite=args.overwrite, kind=kind, is_kind=is_kind, inputs=inputs, option=option)


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _is_evaluation_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith("case,class,")
    except (OSError, UnicodeDecodeError):
        return False


def _is_evaluation_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"num_cases", "mean", "dice_mean"} <= set(data)


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
    from ..utils.outputs import OVERWRITE_HELP

    p = sub.add_parser("evaluate", help="score predictions against reference labels (Dice, HD95, NSD)")
    p.add_argument("pred", help="folder of predicted label files")
    p.add_argument("gt", help="folder of reference label files (same names)")
    p.add_argument("--labels", help="labels JSON ({name: value}) or dataset.json (default: dataset.json near GT)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--csv", help="CSV output (default PRED/evaluation.csv)")
    p.add_argument("--json", help="also write the summary as JSON (for recokd export --test-metrics)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--postprocess", choices=POSTPROCESSING, default="none",
                   help="post-process the predictions before scoring (files unchanged), to choose a model's "
                   "recokd export --postprocess on held-out cases (default none)")
    p.set_defaults(func=run)
