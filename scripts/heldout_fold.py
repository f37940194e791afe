#!/usr/bin/env python
"""Write one cross-validation fold of a dataset as the study cuts it, for scripts that train on the other
folds and score on this one: ``OUT/fold<k>.txt`` (the held-out case ids, for ``--val-cases``) and links to
the held-out images and labels in ``OUT/<prefix>_images`` and ``OUT/<prefix>_labels``.

    python scripts/heldout_fold.py DATASET OUT [--fold 0] [--folds 3] [--group-pattern '^(patient\\d+)'] [--prefix heldout]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ReCoKDLib.data.datasets import open_dataset
from ReCoKDLib.workflows.study import cv_folds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("out", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--group-pattern", default=r"^(patient\d+)", help="cases sharing its first match stay together")
    ap.add_argument("--prefix", default="heldout")
    args = ap.parse_args()
    ds = open_dataset(args.dataset)
    held_out = cv_folds([r.case_id for r in ds.training], args.folds, args.group_pattern)[args.fold]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fold{args.fold}.txt").write_text("\n".join(held_out) + "\n")
    for r in ds.training:
        if r.case_id in held_out:
            links = [(p, "images") for p in r.image_files] + [(r.label_file, "labels")]
            for path, kind in links:
                folder = args.out / f"{args.prefix}_{kind}"
                folder.mkdir(exist_ok=True)
                if not (folder / path.name).exists():
                    (folder / path.name).symlink_to(path.resolve())


if __name__ == "__main__":
    main()
