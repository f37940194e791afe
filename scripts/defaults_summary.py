#!/usr/bin/env python
"""Table of scripts/measure_defaults.sh's runs: each training variant's test Dice per seed and its paired
difference to the default (``none``) run of the same seed, with a 95 % Student-t interval over the seeds,
from the ``eval_la_<variant>_s<seed>.json`` files written by ``recokd evaluate``.

    python scripts/defaults_summary.py WORK
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from ReCoKDLib.workflows.study_report import paired_difference

LABELS = {"none": "default", "patch32x64x64": "patch 32×64×64", "fg0": "foreground oversampling 0",
          "fg1": "foreground oversampling 1", "noema": "EMA off", "lr1e-3": "lr 1e-3", "lr1e-2": "lr 1e-2"}


def runs_by_variant(work: Path) -> dict[str, list[dict]]:
    """``{variant: [{"summary": {...}, "seed": s}, ...]}`` from the finished evaluations in ``work``."""
    found: dict[str, list[dict]] = {}
    for path in sorted(work.glob("eval_la_*_s*.json")):
        m = re.fullmatch(r"eval_la_(.+)_s(\d+)\.json", path.name)
        if m:
            found.setdefault(m.group(1), []).append({"summary": json.loads(path.read_text())["mean"],
                                                     "seed": int(m.group(2))})
    return {v: sorted(r, key=lambda r: r["seed"]) for v, r in found.items()}


def table(runs: dict[str, list[dict]]) -> str:
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    head = ["variant", *[f"seed {s}" for s in seeds], "mean", "HD95 (mm)", "Δ Dice to default (95 % CI)",
            "seeds better"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [v for v in LABELS if v in runs] + sorted(v for v in runs if v not in LABELS)
    for v in order:
        by_seed = {r["seed"]: r["summary"]["dice"]["mean"] for r in runs[v]}
        cells = [f"{by_seed[s]:.3f}" if s in by_seed else "–" for s in seeds]
        hd = np.mean([r["summary"]["hd95"]["mean"] for r in runs[v]])
        if v == "none" or "none" not in runs:
            diff, better = "–", "–"
        else:
            d = paired_difference(runs[v], runs["none"])
            diff = (f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d["n"] > 1 else
                    f"{d['mean']:+.3f}" if d["n"] else "–")
            better = f"{d['wins']}/{d['n']}" if d["n"] else "–"
        lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(cells) +
                     f" | {np.mean(list(by_seed.values())):.3f} | {hd:.2f} | {diff} | {better} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    runs = runs_by_variant(ap.parse_args().work)
    if not runs:
        raise SystemExit("no eval_la_<variant>_s<seed>.json in that folder: run scripts/measure_defaults.sh first")
    print(table(runs), end="")


if __name__ == "__main__":
    main()
