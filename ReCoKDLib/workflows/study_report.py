"""The report of a distillation study (:mod:`ReCoKDLib.workflows.study`): tables, figures and a JSON
of every aggregate, rebuilt from the runs' ``eval.json`` files and the latency benchmarks.

Aggregation: a run's score is the mean over its evaluation cases (per class; ``mean`` = mean over
classes). A variant's figure is the mean ± sample std over its runs (seeds, or folds under
cross-validation). The teacher's figure is the mean over its runs (one per fold). The share of the
teacher–student gap a variant recovers is ``(D_variant − D_noKD) / (D_teacher − D_noKD)`` on those
means, per class and overall, with D_noKD the no-KD student of the same width R and D_teacher the mean
of the teachers of the variant's runs' folds. The paired table gives each variant's difference to that
no-KD student run by run (same seed and fold), with a 95 % Student-t interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..utils.io import atomic_write, atomic_write_text, json_safe

METRIC_NAMES = {"dice": "Dice", "hd95": "HD95 (mm)", "nsd": "NSD"}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def _pct(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def collect(jobs, out: Path) -> dict[str, Any]:
    """Scores of every finished training job: ``{dataset: {group: {variant: [summary, ...]}}}`` with the
    teacher under group ``teacher``."""
    found: dict[str, Any] = {}
    for j in jobs:
        if j.kind != "train" or not j.done():
            continue
        ev = _read(j.marker)
        dname = j.name.split("/")[0]
        group = j.spec.get("group", "teacher")
        variant = j.spec.get("variant", "teacher")
        fold = j.spec.get("fold")
        if variant == "teacher":  # teacher_f<k> under cross-validation, else the one teacher (fold 0)
            fold = int(j.name.rsplit("_f", 1)[1]) if "/teacher_f" in j.name else 0
        found.setdefault(dname, {}).setdefault(group, {}).setdefault(variant, []).append(
            {**ev, "job": j.name, "seed": j.spec.get("seed"), "fold": fold})
    return found


def _class_names(runs: list[dict]) -> list[str]:
    return [c for c in runs[0]["summary"]["dice"] if c != "mean"]


def aggregate(runs: list[dict], metric: str, cls: str = "mean") -> tuple[float, float, int]:
    return _stats([r["summary"][metric].get(cls) for r in runs])


def _gap(v: float, none: float, teacher: float) -> float:
    return (v - none) / (teacher - none) if all(map(math.isfinite, (v, none, teacher))) and abs(teacher - none) > 1e-9 else math.nan


def width_of(variant: dict[str, Any]) -> float:
    """A variant's width factor R (the study's default is 4)."""
    return float(variant.get("width_factor", 4))


def is_baseline(variant: dict[str, Any]) -> bool:
    """A variant others are compared with: labels only (method ``none``, no teacher-labelled scans)."""
    return variant["method"] == "none" and not variant.get("unlabeled")


def reference_of(name: str, variants: dict[str, dict[str, Any]]) -> str | None:
    """The labels-only variant a variant is compared with: method ``none`` without teacher-labelled
    scans, at the same width R."""
    r = width_of(variants[name])
    return next((n for n, v in variants.items() if is_baseline(v) and width_of(v) == r), None)


#: variant keys that only shape the KD terms (a variant without KD has no use for them)
KD_ONLY_KEYS = {"lambda_max", "taps", "temperature", "warmup_fraction", "adapter_lr_scale"}


def kd_counterpart_of(name: str, variants: dict[str, dict[str, Any]]) -> str | None:
    """The variant that differs from ``name`` only by having no KD terms (method ``none``, the same width
    and targets), so that the pair isolates what the KD terms add; ``None`` for a variant without KD or
    without such a counterpart."""
    v = variants[name]
    if v["method"] == "none":
        return None
    want = {k: x for k, x in v.items() if k not in KD_ONLY_KEYS and k != "method"}
    return next((n for n, u in variants.items() if u["method"] == "none"
                 and {k: x for k, x in u.items() if k not in KD_ONLY_KEYS and k != "method"} == want), None)


def kd_over_teacher_labels(name: str, variants: dict[str, dict[str, Any]]) -> str | None:
    """:func:`kd_counterpart_of` where that counterpart learns from teacher-labelled scans (against labels
    only, the main paired table already compares)."""
    ref = kd_counterpart_of(name, variants)
    return ref if ref is not None and not is_baseline(variants[ref]) else None


def paired_difference(runs: list[dict], reference: list[dict], cls: str = "mean", metric: str = "dice",
                      confidence: float = 0.95) -> dict[str, float]:
    """Mean paired difference ``D_variant − D_reference`` over the runs both have (same seed and fold),
    with a two-sided Student-t interval: ``d̄ ± t_{n−1} · s_d / √n``.

    Returns ``{"mean", "low", "high", "n", "wins"}`` (``wins``: runs where the variant is higher); the
    interval is NaN with fewer than two pairs.
    """
    from scipy import stats

    ref = {(r.get("seed"), r.get("fold")): r["summary"][metric].get(cls) for r in reference}
    diffs = [r["summary"][metric].get(cls) - ref[key] for r in runs
             if (key := (r.get("seed"), r.get("fold"))) in ref and r["summary"][metric].get(cls) is not None
             and ref[key] is not None and math.isfinite(r["summary"][metric][cls]) and math.isfinite(ref[key])]
    n = len(diffs)
    if not n:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "wins": 0}
    mean = float(np.mean(diffs))
    half = (float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(diffs, ddof=1) / math.sqrt(n))
            if n > 1 else math.nan)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "wins": int(sum(d > 0 for d in diffs))}


def paired_table(data: dict[str, Any], variants: dict[str, dict[str, Any]], group: str = "main",
                 baseline: dict[str, Any] | None = None,
                 reference: Callable[[str, dict[str, dict[str, Any]]], str | None] | None = None) -> tuple[str, dict]:
    """Markdown table of every distillation variant's paired Dice difference to no-KD at the same width
    (per class and mean, 95 % interval over seeds), and its numbers.

    ``baseline``: the ``main`` group's data and variants, for an ablation group without its own no-KD runs.
    ``reference``: which variant each one is compared with (default :func:`reference_of`, labels only;
    :func:`kd_counterpart_of`: the same targets without KD terms); variants without one are left out.
    """
    reference = reference or reference_of
    runs_of = data.get(group, {})
    all_variants = dict(variants)
    base_runs = dict(runs_of)
    if baseline is not None:
        for n, v in baseline["variants"].items():
            if is_baseline(v) and n not in all_variants:
                all_variants[n], base_runs[n] = v, baseline["runs"].get(n, [])
    some = next((r for r in base_runs.values() if r), None)
    if not some:
        return "No paired runs yet.\n", {}
    classes = ["mean", *_class_names(some)]
    head = ["variant", "vs", "R", "pairs", *[f"Δ Dice {c} (95 % CI)" for c in classes], "seeds better"]
    rows, numbers = [], {}
    for name, v in variants.items():
        ref = reference(name, all_variants)
        if is_baseline(v) or ref is None:
            continue
        diffs = {c: paired_difference(runs_of.get(name, []), base_runs.get(ref, []), c) for c in classes}
        numbers[name] = {"reference": ref, "width_factor": width_of(v), "dice": diffs}
        m = diffs["mean"]
        cells = [f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d["n"] > 1 else
                 (f"{d['mean']:+.3f}" if d["n"] else "–") for d in diffs.values()]
        rows.append([name, ref, f"{width_of(v):g}", str(m["n"]), *cells, f"{m['wins']}/{m['n']}" if m["n"] else "–"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n", numbers


def paired_figure(numbers: dict[str, dict], title: str, path: Path) -> Path | None:
    """One panel per class: each variant's paired difference to no-KD with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in numbers.items() if e["dice"]["mean"]["n"]]
    if not names:
        return None
    classes = list(numbers[names[0]]["dice"])
    fig, axes = plt.subplots(1, len(classes), figsize=(2.9 * len(classes) + 1.2, 0.45 * len(names) + 1.4),
                             sharey=True, squeeze=False)
    y = np.arange(len(names))[::-1]
    for ax, c in zip(axes[0], classes):
        for yi, n in zip(y, names):
            d = numbers[n]["dice"][c]
            color = "tab:red" if n.startswith("recokd") else "tab:blue"
            if math.isfinite(d["low"]):
                ax.plot([d["low"], d["high"]], [yi, yi], color=color, linewidth=2)
            ax.plot([d["mean"]], [yi], "o", color=color)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"Dice {c}", fontsize=9)
        ax.set_xlabel("Δ vs no-KD (same R)", fontsize=8)
    axes[0][0].set_yticks(y, [f"{n} (R={numbers[n]['width_factor']:g})" for n in names], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def main_table(dname: str, data: dict[str, Any], latency: list[dict] | None, expected: Sequence[str],
               variants: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict]:
    """Markdown table of the teacher and the main student variants of one dataset, and its numbers."""
    teacher = data.get("teacher", {}).get("teacher", [])
    main = data.get("main", {})
    some = teacher or next(iter(main.values()), [])
    if not some:
        return f"No finished runs for {dname} yet.\n", {}
    classes = _class_names(some)
    t_means = {c: aggregate(teacher, "dice", c)[0] for c in ["mean", *classes]} if teacher else {}
    variants = variants or {n: {"method": "none" if n == "none" else n} for n in expected}
    reference_means = {}
    for n in expected:
        ref = reference_of(n, variants) if n in variants and not is_baseline(variants[n]) else None
        runs = main.get(ref, []) if ref else []
        reference_means[n] = {c: aggregate(runs, "dice", c)[0] for c in ["mean", *classes]} if runs else {}
    lat = fastest_rows(latency or [])  # several backends: each model on its fastest
    several = len({r.get("backend", "torch") for r in latency or []}) > 1
    head = ["model", "runs", "mean Dice", *[f"Dice {c}" for c in classes], "HD95 (mm)", "NSD", "gap recovered",
            *[f"gap {c}" for c in classes], "params", "GFLOPs/patch", "s/volume (CPU)", "speed-up"]
    rows, numbers = [], {}
    for name in ["teacher", *expected]:
        runs = teacher if name == "teacher" else main.get(name, [])
        if not runs:
            rows.append([name, "0 (not run yet)"] + ["–"] * (len(head) - 2))
            continue
        d = aggregate(runs, "dice")
        entry = {"runs": len(runs), "dice": {c: aggregate(runs, "dice", c)[:2] for c in ["mean", *classes]},
                 "hd95": aggregate(runs, "hd95")[:2], "nsd": aggregate(runs, "nsd")[:2]}
        n_means = reference_means.get(name, {})
        if name != "teacher" and t_means and n_means:
            # the teacher each run learnt from (its fold's), so that folds of unequal difficulty do not
            # bias the gap when the seeds do not cover the folds evenly
            t_of = {r["fold"]: r for r in teacher}
            matched = [t_of[r["fold"]] for r in runs if r["fold"] in t_of] or teacher
            entry["gap"] = {c: _gap(entry["dice"][c][0], n_means[c], aggregate(matched, "dice", c)[0])
                            for c in ["mean", *classes]}
        gaps = entry.get("gap", {})
        lt, tl = lat.get(name), lat.get("teacher")
        ref = reference_of(name, variants) if name in variants else None
        same = lat.get(ref) if ref else None  # students of one width share one architecture
        speed = tl["seconds_per_volume"] / lt["seconds_per_volume"] if lt and tl and name != "teacher" else math.nan
        entry.update({"parameters": lt["parameters"] if lt else None, "flops": lt["flops"] if lt else None,
                      "seconds_per_volume": lt["seconds_per_volume"] if lt else None, "speedup": speed})
        numbers[name] = entry
        rows.append([
            name, str(len(runs)), f"**{_fmt(*d[:2])}**" if name == "recokd" else _fmt(*d[:2]),
            *[_fmt(*entry["dice"][c]) for c in classes], _fmt(*entry["hd95"], digits=2), _fmt(*entry["nsd"]),
            "" if "gap" not in entry else _pct(gaps.get("mean")),
            *["" if "gap" not in entry else _pct(gaps.get(c)) for c in classes],
            f"{(lt or same)['parameters']:,}" if (lt or same) else "–",
            f"{(lt or same)['flops'] / 1e9:.2f}" if (lt or same) else "–",
            (f"{lt['seconds_per_volume']:.3f}" + (f" ({lt['backend']})" if several else "")) if lt else "–",
            f"{speed:.1f}×" if math.isfinite(speed) else "–"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n", numbers


def fastest_rows(latency: Sequence[dict]) -> dict[str, dict]:
    """Model name -> its fastest latency row (``benchmark.json`` rows; with one backend, simply by name)."""
    best: dict[str, dict] = {}
    for r in latency:
        key = r.get("model") or r["name"]
        if key not in best or r["seconds_per_volume"] < best[key]["seconds_per_volume"]:
            best[key] = r
    return best


def latency_table(latency: Sequence[dict]) -> str:
    """Markdown table of the latency benchmark, one row per model and backend: parameters, FLOPs of one
    patch, seconds per volume, the speed-up against the teacher on the same backend (per timing round, median
    and range, where the rows have rounds) and on its fastest, a fresh process's peak RAM, and the
    predictor's overhead against a bare MONAI ``sliding_window_inference`` call."""
    from ..benchmarks.inference import ratio_text, round_ratios

    if not latency:
        return ""
    teachers = {r.get("backend", "torch"): r for r in latency if r.get("role") == "teacher"}
    best_teacher = min(teachers.values(), key=lambda r: r["seconds_per_volume"]) if teachers else None
    head = ["model", "backend", "params", "GFLOPs/patch", "s/volume", "× vs teacher (same backend) [range]",
            "× vs teacher (its best)", "peak RAM MB", "bare MONAI s", "overhead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in latency:
        same = teachers.get(r.get("backend", "torch"))
        sec, plain = r["seconds_per_volume"], r.get("plain_monai_seconds") or math.nan
        ratios = round_ratios(same.get("round_seconds") or [], r.get("round_seconds") or []) if same else []
        ram = r.get("peak_ram_mb")
        row = [r.get("model") or r["name"], r.get("backend", "torch"), f"{r['parameters']:,}",
               f"{r['flops'] / 1e9:.2f}", f"{sec:.3f}",
               (ratio_text(ratios) if ratios else f"{same['seconds_per_volume'] / sec:.1f}×") if same else "–",
               f"{best_teacher['seconds_per_volume'] / sec:.1f}×" if best_teacher else "–",
               f"{ram:.0f}" if isinstance(ram, (int, float)) and math.isfinite(ram) else "–",
               f"{plain:.3f}" if math.isfinite(plain) else "–",
               f"{100 * (sec / plain - 1):+.1f} %" if math.isfinite(plain) and plain > 0 else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def ablation_table(data: dict[str, Any], ablations: dict[str, dict], students: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table of the ablation variants (plus the main recokd / none at the same seeds)."""
    abl = data.get("ablation", {})
    main = data.get("main", {})
    teacher = data.get("teacher", {}).get("teacher", [])
    seeds = sorted({r["seed"] for runs in abl.values() for r in runs})
    t_mean = aggregate(teacher, "dice")[0] if teacher else math.nan

    def at_seeds(runs):
        return [r for r in runs if r["seed"] in seeds] if seeds else runs

    base_none = {4.0: at_seeds(main.get("none", []))}
    for name, v in ablations.items():
        if v["method"] == "none":
            base_none[float(v.get("width_factor", 4))] = abl.get(name, [])
    head = ["variant", "what changes", "R", "runs", "mean Dice", "Δ vs no-KD (same R)", "gap recovered"]
    rows, numbers = [], {}
    entries = [(n, v, at_seeds(main.get(n, [])), "main") for n, v in students.items() if n in ("recokd", "none")]
    entries += [(n, v, abl.get(n, []), "ablation") for n, v in ablations.items()]
    for name, v, runs, _ in entries:
        r_factor = float(v.get("width_factor", 4))
        what = ", ".join(f"{k}={val}" for k, val in v.items() if k != "width_factor") or "–"
        if not runs:
            rows.append([name, what, f"{r_factor:g}", "0 (not run yet)", "–", "–", "–"])
            continue
        m, s, n = aggregate(runs, "dice")
        nm = aggregate(base_none.get(r_factor, []), "dice")[0]
        delta = m - nm if math.isfinite(nm) else math.nan
        gap = _gap(m, nm, t_mean) if v["method"] != "none" else math.nan
        numbers[name] = {"dice": (m, s), "runs": n, "delta": delta, "gap": gap, "width_factor": r_factor}
        rows.append([name, what, f"{r_factor:g}", str(n), _fmt(m, s),
                     "" if v["method"] == "none" else (f"{delta:+.3f}" if math.isfinite(delta) else "–"),
                     "" if v["method"] == "none" else _pct(gap)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n", numbers


def dice_chart(numbers: dict[str, dict], title: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in numbers if n != "teacher"]
    if not names:
        return None
    means = [numbers[n]["dice"]["mean"][0] for n in names]
    stds = [numbers[n]["dice"]["mean"][1] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.6))
    colors = ["tab:red" if n == "recokd" else ("tab:gray" if n == "none" else "tab:blue") for n in names]
    ax.bar(names, means, yerr=[s if math.isfinite(s) else 0 for s in stds], color=colors, capsize=4)
    if "teacher" in numbers:
        t = numbers["teacher"]["dice"]["mean"][0]
        ax.axhline(t, color="black", linestyle="--", linewidth=1)
        ax.text(len(names) - 0.5, t, f" teacher {t:.3f}", va="bottom", ha="right", fontsize=8)
    finite = [m for m in means if math.isfinite(m)]
    low = min(finite + [numbers.get("teacher", {}).get("dice", {}).get("mean", (1, 0))[0]]) if finite else 0
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_ylabel("mean Dice (± std over runs)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def labeled_numbers(config, found: dict[str, Any]) -> dict[str, Any]:
    """Per data source (a dataset's path, or ``phantom``) of the label-scarce datasets: for each number of
    labelled cases, each variant's mean Dice with a 95 % t interval of the mean over runs, and the teacher's
    mean: ``{source: {"teacher": {n: mean}, "variants": {variant: {n: {"mean", "low", "high", "runs"}}}}}``."""
    from scipy import stats

    out: dict[str, Any] = {}
    for dname, d in config.datasets.items():
        if d.labeled is None or dname not in found:
            continue
        source = str(d.path) if d.path is not None else "phantom"
        entry = out.setdefault(source, {"datasets": [], "teacher": {}, "variants": {}})
        entry["datasets"].append(dname)
        teacher = found[dname].get("teacher", {}).get("teacher", [])
        if teacher:
            entry["teacher"][d.labeled] = aggregate(teacher, "dice")[0]
        for variant, runs in found[dname].get("main", {}).items():
            mean, std, n = aggregate(runs, "dice")
            half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
            entry["variants"].setdefault(variant, {})[d.labeled] = {"mean": mean, "low": mean - half,
                                                                     "high": mean + half, "runs": n}
    return out


def labeled_figure(numbers: dict[str, Any], path: Path) -> Path | None:
    """One panel per data source: mean Dice against the number of labelled cases, a line per variant with
    its 95 % interval, the teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s for s, e in numbers.items() if e["variants"]]
    if not sources:
        return None
    fig, axes = plt.subplots(1, len(sources), figsize=(4.6 * len(sources) + 1.5, 3.8), squeeze=False)
    for ax, source in zip(axes[0], sources):
        e = numbers[source]
        for k, (variant, points) in enumerate(sorted(e["variants"].items())):
            xs = sorted(points)
            shift = (k - (len(e["variants"]) - 1) / 2) * 0.06 * max(1, max(xs) - min(xs) or 1)  # overlapping bars apart
            ys = [points[x]["mean"] for x in xs]
            lows = [points[x]["mean"] - points[x]["low"] if math.isfinite(points[x]["low"]) else 0 for x in xs]
            highs = [points[x]["high"] - points[x]["mean"] if math.isfinite(points[x]["high"]) else 0 for x in xs]
            ax.errorbar([x + shift for x in xs], ys, yerr=[lows, highs], marker="o", capsize=3, label=variant)
        if e["teacher"]:
            ts = sorted(e["teacher"])
            ax.plot(ts, [e["teacher"][t] for t in ts], "k--", marker="_", label="teacher (all labels)")
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("mean Dice (95 % CI)")
        ax.set_title(Path(source).name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def contour_figure(panels: list[dict], path: Path) -> Path | None:
    """One row per dataset: the image slice with the reference and each model's contours.

    ``panels``: ``{"title", "image" (H, W), "reference" (H, W), "predictions": {name: (H, W)}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        return None
    ncols = 1 + max(len(p["predictions"]) for p in panels)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(2.8 * ncols, 2.9 * len(panels)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, p in zip(axes, panels):
        items = [("reference", p["reference"])] + list(p["predictions"].items())
        for ax, (name, lab) in zip(row, items):
            ax.imshow(p["image"], cmap="gray")
            for v in range(1, int(max(p["reference"].max(), lab.max())) + 1):
                if (lab == v).any():
                    ax.contour(lab == v, levels=[0.5], colors=[cmap(v - 1)], linewidths=1.2)
            dice = p.get("dice", {}).get(name)
            ax.set_title(f"{name}" + (f"\nslice Dice {dice:.3f}" if dice is not None else ""), fontsize=8)
            ax.axis("off")
        row[0].set_title(f"{p['title']}\nreference", fontsize=8)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=cmap(i), label=n) for i, n in enumerate(p.get("classes", []))]
        if handles:
            row[0].legend(handles=handles, fontsize=6, loc="lower left", framealpha=0.6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _slice_panel(dname: str, data: dict, names: dict[str, str], jobs, cases_of) -> dict | None:
    """Predict one held-out case with the fold-0 / seed-0 runs of ``names`` and cut the slice where
    the reference's foreground is largest."""
    import SimpleITK as sitk

    from ..deployment.bundle import bundle_from_run
    from ..data.datasets import read_image
    from ..inference.predictor import Predictor

    by_run = {j.name: j for j in jobs}
    chosen: dict[str, Any] = {}
    for label, variant in names.items():
        pool = data.get("teacher", {}).get("teacher", []) if variant == "teacher" else data.get("main", {}).get(variant, [])
        runs = sorted(pool, key=lambda r: (r.get("fold") or 0, r.get("seed") or 0))
        if not runs:
            return None
        chosen[label] = by_run[runs[0]["job"]]
    first = next(iter(chosen.values()))
    dataset, records = cases_of(first.spec["eval"]["dataset"], first.spec["eval"]["cases"])
    if not records:
        return None
    # the case where the teacher is neither best nor worst: the median teacher Dice
    t_cases = _read(chosen[next(iter(chosen))].marker)["cases"]
    order = sorted(t_cases, key=lambda c: c["dice"].get("mean", 0) or 0)
    pick = order[len(order) // 2]["case"]
    record = next(r for r in records if r.case_id == pick)
    images = [read_image(p) for p in record.image_files]
    ref = sitk.GetArrayFromImage(read_image(record.label_file)).astype(np.int64)
    z = int(np.argmax((ref > 0).reshape(ref.shape[0], -1).sum(1)))
    image = sitk.GetArrayFromImage(images[0])[z]
    preds, dice = {}, {}
    bundles = {label: bundle_from_run(job.folder, weights="final") for label, job in chosen.items()}
    for label, bundle in bundles.items():
        pred = sitk.GetArrayFromImage(Predictor(bundle, device="cpu", progress=False).predict_image(images, name=pick))[z]
        preds[label] = pred
        fg_p, fg_r = pred > 0, ref[z] > 0
        scores = [2 * ((pred == v) & (ref[z] == v)).sum() / max((pred == v).sum() + (ref[z] == v).sum(), 1)
                  for v in np.unique(ref[z]) if v > 0]
        dice[label] = float(np.mean(scores)) if scores else float(fg_p.sum() == fg_r.sum() == 0)
    classes = next(iter(bundles.values())).labels.foreground_names
    return {"title": f"{dname} {pick} slice {z}", "image": image, "reference": ref[z], "predictions": preds,
            "dice": dice, "classes": classes}


def build_report(config, out: str | Path, jobs, log: Callable[[str], None] = print, figures: bool = True) -> Path:
    """Write ``report.md``, ``results.json`` and the figures of a study into ``out`` from whichever of
    ``jobs`` (the study's :func:`~ReCoKDLib.workflows.study.plan_jobs`) have finished."""
    from ..data.datasets import select_cases

    out = Path(out).resolve()
    found = collect(jobs, out)
    wall = _read(out / "wall_times.json") or {}
    config_name = _relative(config.source) if config.source else "CONFIG"
    parts = [f"# {config.name}\n", "Generated by `recokd benchmark-study` from the finished runs; every figure is "
             "measured, runs still missing are listed as such.\n",
             f"- command: `recokd benchmark-study {config_name} -o {_relative(out)}` (run it again to resume)",
             f"- machine: {machine_description()}",
             f"- schedule: {config.jobs} job(s) at a time, {config.threads_per_job} CPU thread(s) each; training "
             f"options {json.dumps(config.training)}; planner {json.dumps(config.planner)}\n"]
    results: dict[str, Any] = {"datasets": {}, "ablations": {}}
    panels = []
    for dname, d in config.datasets.items():
        data = found.get(dname, {})
        latency = _read(out / "latency" / dname / "benchmark.json")
        students = {n: v for n, v in config.students.items() if d.runs(n)}
        table, numbers = main_table(dname, data, latency, list(students), students)
        if latency:
            table += ("\nLatency per model and backend (the teacher and seed 0's students; overhead: the "
                      "whole predictor against one bare MONAI `sliding_window_inference` call on the same network "
                      "and preprocessed volume):\n\n" + latency_table(latency))
        paired, paired_numbers = paired_table(data, students)
        results["datasets"][dname] = numbers
        results.setdefault("paired", {})[dname] = paired_numbers
        if any(kd_over_teacher_labels(n, students) for n in students):  # what KD adds to the teacher's labels alone
            kd_paired, kd_numbers = paired_table(data, students, reference=kd_over_teacher_labels)
            results.setdefault("paired_kd_terms", {})[dname] = kd_numbers
            paired += ("\nWhat the KD terms add to the same targets: paired differences to the variant that differs "
                       "only by having no KD terms (same seed, labelled cases, teacher labels and batch order):\n\n"
                       + kd_paired)
        how = ("its test cases (imagesTs)" if d.evaluate_on == "test" else
               f"{d.folds}-fold cross-validation (run i: seed i, fold i mod {d.folds}; scores on the held-out fold)")
        parts += [f"## {dname}\n", f"Scored on {how}; mean ± std over runs. "
                  "Gap recovered = (D − D_noKD) / (D_teacher − D_noKD), D_noKD the no-KD student of the same "
                  "width R. Latency: "
                  f"{config.latency.get('threads', 2)} CPU thread(s), whole predictor per volume, median of "
                  f"{config.latency.get('repeats', 3)} repeats.\n", table,
                  "Paired differences to the no-KD student of the same width R (same seed, initial weights and "
                  "batch order; under cross-validation also the same fold): mean over pairs [95 % Student-t "
                  "interval].\n", paired]
        if figures and numbers:
            chart = dice_chart(numbers, f"{dname}: students vs teacher", out / f"dice_{dname}.png")
            if chart:
                parts.append(f"![{dname} Dice]({chart.name})\n")
            forest = paired_figure(paired_numbers, f"{dname}: paired Dice difference to no-KD (95 % CI)",
                                   out / f"paired_{dname}.png")
            if forest:
                parts.append(f"![{dname} paired differences]({forest.name})\n")
            try:
                panel = _slice_panel(dname, data, {"teacher": "teacher", "no-KD": "none", "ReCo-KD": "recokd"}, jobs,
                                     select_cases)
            except Exception as exc:  # a figure must not lose the tables
                log(f"contour figure for {dname} skipped: {exc}")
                panel = None
            if panel:
                panels.append(panel)
    if config.ablations:
        data = found.get(config.ablation_dataset, {})
        table, numbers = ablation_table(data, config.ablations, config.students)
        paired, paired_numbers = paired_table(data, config.ablations, group="ablation",
                                              baseline={"variants": config.students, "runs": data.get("main", {})})
        results["ablations"] = numbers
        results["ablations_paired"] = paired_numbers
        parts += [f"## Ablations ({config.ablation_dataset}, seeds {config.ablation_seeds})\n", table,
                  "Paired differences to the main no-KD student of the same width and seed:\n", paired]
    scarce = labeled_numbers(config, found)
    if scarce:
        results["labeled"] = scarce
        fig = labeled_figure(scarce, out / "dice_vs_labeled.png") if figures else None
        parts += ["## Dice against the number of labelled cases\n",
                  "Label-scarce datasets (`labeled` in the config), grouped by their data: mean Dice per variant "
                  "with a 95 % Student-t interval of the mean over runs; the dashed line is the teacher, trained on "
                  "every labelled case.\n"] + ([f"![Dice vs labelled cases]({fig.name})\n"] if fig else [])
    if figures and panels:
        fig = contour_figure(panels, out / "contours.png")
        parts.append(f"![contours]({fig.name})\n")
    parts += ["## Commands\n", "Every job runs one `recokd` command in a subprocess, then scores the run; the exact "
              f"command lines of all jobs are in `{_relative(out / 'logs')}/*.job.json`. One of each kind:\n", "```bash"]
    shown: set[tuple[str, str]] = set()
    for j in jobs:
        key = (j.name.split("/")[0], j.kind if j.kind != "train" else j.spec["argv"][0])
        if j.kind in ("plan", "train") and key not in shown:
            shown.add(key)
            parts.append("recokd " + " ".join(_quote(a) for a in j.spec["argv"]))
    parts.append("```\n")
    if wall:
        parts += ["## Wall time per job\n", "| job | minutes |", "|---|---|"]
        parts += [f"| {k} | {v / 60:.1f} |" for k, v in sorted(wall.items())]
        parts.append(f"\nTotal: {sum(wall.values()) / 3600:.2f} h of job time ({config.jobs} jobs in parallel).\n")
    missing = [j.name for j in jobs if not j.done()]
    if missing:
        parts += ["## Not finished yet\n", ", ".join(missing) + "\n"]
    text = "\n".join(parts)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "results.json", json.dumps(json_safe(results), indent=1) + "\n")
    log(f"report written to {out / 'report.md'}")
    return out / "report.md"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(_relative(Path(arg)) if arg.startswith("/") else arg)


def _relative(path: Path) -> str:
    import os

    rel = os.path.relpath(path)
    return rel if not rel.startswith("../..") else str(path)


def machine_description() -> str:
    """CPU model, cores, memory, GPU and library versions of this machine, in one line."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import monai

    return (f"{cpu}, {os.cpu_count()} logical CPUs{mem}, {gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}")
