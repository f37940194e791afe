#!/usr/bin/env python
"""Table of the runs of scripts/measure_acdc_teacher.sh and measure_acdc_students.sh: per fold, mean over
folds and per class, and each method's paired difference to the no-KD student of the same fold and seed
(95 % Student-t interval over the pairs), from their ``eval_*.json`` files (written by ``recokd evaluate``).

    python scripts/acdc_students_summary.py WORK [--teacher it4800] [--methods none recokd none-R8 recokd-R8]
                                                 [--figure PNG]

A method ``X-R8`` is compared with ``none-R8`` (the no-KD student of its width).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

from ReCoKDLib.workflows.study_report import paired_difference, paired_figure

# `recokd evaluate` names classes label_<value> without --labels, the study by dataset.json's names
SHORT = {"label_1": "RV", "right_ventricle": "RV", "label_2": "Myo", "myocardium": "Myo", "label_3": "LV",
         "left_ventricle": "LV", "mean": "mean"}


def runs_of(work: Path, name: str) -> list[dict]:
    """The finished runs of one model as ``[{"summary": {...}, "seed": s, "fold": k}]``: ``eval_NAME_f<k>.json``
    is seed k on fold k, ``eval_NAME_s<s>_f<k>.json`` seed s on fold k."""
    runs = []
    for path in sorted(work.glob(f"eval_{name}_*f[0-9].json")):
        m = re.fullmatch(rf"eval_{re.escape(name)}_(?:s(\d+)_)?f(\d)\.json", path.name)
        if m:
            fold = int(m.group(2))
            seed = int(m.group(1)) if m.group(1) else fold
            runs.append({"summary": json.loads(path.read_text())["mean"], "seed": seed, "fold": fold})
    return sorted(runs, key=lambda r: r["seed"])


def classes_of(runs: list[dict]) -> list[str]:
    return [c for c in runs[0]["summary"]["dice"] if c != "mean"] + ["mean"]


def row(label: str, runs: list[dict]) -> str:
    """Mean Dice per fold (over its seeds), then per class over every run (mean ± std over runs)."""
    cells = [f"{np.mean(v):.3f}" if (v := [r["summary"]["dice"]["mean"] for r in runs if r["fold"] == k]) else "–"
             for k in range(3)]
    per_class = [f"{np.mean([r['summary']['dice'][c] for r in runs]):.3f}" for c in classes_of(runs)]
    means = [r["summary"]["dice"]["mean"] for r in runs]
    if len(means) > 1:  # the spread over runs (seeds and folds together)
        per_class[-1] += f" ± {np.std(means, ddof=1):.3f}"
    return f"| {label} | {len(runs)} | " + " | ".join(cells) + " | " + " | ".join(per_class) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--teacher", default="it4800")
    ap.add_argument("--figure", type=Path, help="also draw the paired differences (one panel per class) to this PNG")
    ap.add_argument("--methods", nargs="+", default=["none", "recokd", "logit", "none-R8", "recokd-R8"])
    args = ap.parse_args()
    models = {"teacher": runs_of(args.work, args.teacher)}
    models.update({m: runs_of(args.work, f"student_{args.teacher}_{m}") for m in args.methods})
    models = {k: v for k, v in models.items() if v}
    classes = classes_of(next(iter(models.values()))) if models else []
    names = [SHORT.get(c, c) for c in classes]
    print("| model | runs | fold 0 | fold 1 | fold 2 | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for name, runs in models.items():
        print(row(name, runs))
    def reference(name: str) -> str:  # the no-KD student of the same width
        return "none" + (name[name.index("-R"):] if "-R" in name else "")

    compared = [m for m in models if m != "teacher" and m != reference(m) and reference(m) in models]
    if not compared:
        return
    print("\nPaired difference to the no-KD student of the same width (same fold and seed), "
          "mean [95 % interval] (runs better / pairs):\n")
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    numbers = {}
    for name in compared:
        cells = []
        width = float(name.split("-R")[1]) if "-R" in name else 4.0
        numbers[name] = {"reference": reference(name), "width_factor": width, "dice": {}}
        for c in ["mean", *classes[:-1]]:  # the figure's panels: mean first
            numbers[name]["dice"][SHORT.get(c, c)] = paired_difference(models[name], models[reference(name)], cls=c)
        for c in classes:
            d = numbers[name]["dice"][SHORT.get(c, c)]
            interval = f" [{d['low']:+.3f}, {d['high']:+.3f}]" if math.isfinite(d["low"]) else ""
            cells.append(f"{d['mean']:+.3f}{interval} ({d['wins']}/{d['n']})")
        print(f"| {name} vs {reference(name)} | " + " | ".join(cells) + " |")
    if "teacher" in models:  # the share of the teacher–no-KD gap each method recovers, over its pairs only
        teacher = {r["fold"]: r["summary"]["dice"]["mean"] for r in models["teacher"]}
        print()
        for name in compared:
            ref = {(r["seed"], r["fold"]): r["summary"]["dice"]["mean"] for r in models[reference(name)]}
            pairs = [(r["summary"]["dice"]["mean"], ref[key], teacher[r["fold"]]) for r in models[name]
                     if (key := (r["seed"], r["fold"])) in ref and r["fold"] in teacher]
            if not pairs:
                continue
            gap = float(np.mean([t - b for _, b, t in pairs]))
            gain = float(np.mean([a - b for a, b, _ in pairs]))
            share = f"{gain / gap:.0%}" if abs(gap) > 1e-9 else "–"
            print(f"- {name}: teacher − {reference(name)} gap {gap:+.3f} over its {len(pairs)} pairs; recovered {share}")
    if args.figure:
        runs = max(len(models[m]) for m in compared)
        title = f"ACDC-subset, {args.teacher}: paired Δ Dice vs no-KD ({runs} runs)"
        print(f"\nfigure: {paired_figure(numbers, title, args.figure)}")

if __name__ == "__main__":
    main()
