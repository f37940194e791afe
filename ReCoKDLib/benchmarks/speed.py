"""How fast a student is against its teacher at real nnU-Net widths (``recokd benchmark-speed``).

Speed does not depend on what the weights learnt, so this benchmark needs no trained model: from a
dataset's plan and planned topology it builds a teacher at nnU-Net's widths (``base`` filters doubling
per level up to ``cap``: 32…320 by default) and its students at width factors R (channels / R, at least
8), with seeded random weights, and times the whole predictor on real volumes of the dataset with each
engine and precision, side by side in one process, round by round in turn. Reported per model and engine:
parameters, FLOPs of one patch, seconds per volume (median over rounds, after a warm-up), the speed-up
against the teacher on the same engine and precision per round (median and range), against the teacher's
fastest engine, the share of voxels labelled as PyTorch fp32 labels them, a fresh process's peak RAM on
the largest volume, and the predictor's overhead against one bare MONAI ``sliding_window_inference`` call
on the same network and preprocessed volume.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.planning import Plans
from ..deployment.bundle import Bundle, bundle_from_network
from ..inference.predictor import Predictor
from ..models import count_parameters
from ..models.unet import UNetSpec, build_unet, nnunet_filters
from ..errors import ReCoKDError
from ..utils.runtime import cpu_description
from .inference import (OVERHEAD_TARGET, count_flops, fastest_per_model, peak_ram_mb, plain_monai_seconds, ratio_text,
                        round_ratios, timed_rounds)

__all__ = ["SpeedResult", "width_ladder", "run_speed_benchmark", "speed_table"]


@dataclass
class SpeedResult:
    """One model on one engine at one precision. ``round_seconds``: its mean seconds per volume in each round
    (:func:`~ReCoKDLib.benchmarks.inference.timed_rounds`); ``speedups``: per round, how many times faster than
    the teacher on the same engine and precision; ``agreement``: the share of voxels whose label equals the
    same model's PyTorch fp32 labels; ``peak_ram_mb``: a fresh process's peak resident memory while
    segmenting the largest volume."""

    name: str
    role: str
    filters: tuple[int, ...]
    backend: str
    parameters: int
    flops: int
    seconds_per_volume: float
    plain_monai_seconds: float
    precision: str = "fp32"
    round_seconds: list[float] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    agreement: float = math.nan
    peak_ram_mb: float = math.nan

    @property
    def engine(self) -> str:
        return self.backend if self.precision == "fp32" else f"{self.backend} {self.precision}"

    @property
    def overhead(self) -> float:
        return self.seconds_per_volume / self.plain_monai_seconds - 1 if self.plain_monai_seconds > 0 else math.nan


def width_ladder(plans: Plans, topology: UNetSpec, base: int = 32, cap: int = 320,
                 width_factors: Sequence[float] = (4, 8), seed: int = 0) -> dict[str, Bundle]:
    """``{"teacher": …, "student R=4": …, …}``: bundles with random weights on ``topology``'s levels,
    kernels and strides, the teacher at filters ``base·2^k`` capped at ``cap``."""
    teacher = replace(topology, filters=tuple(nnunet_filters(topology.num_levels, base, cap)),
                      name=f"teacher-{base}-{cap}")
    specs = {"teacher": ("teacher", teacher)}
    for r in width_factors:
        specs[f"student R={r:g}"] = ("student", teacher.student(r))
    bundles = {}
    for i, (name, (role, spec)) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        bundles[name] = bundle_from_network(build_unet(spec).eval(), plans, name.replace(" ", "_").replace("=", ""),
                                            role=role)
    return bundles


def _largest(volume_files: Sequence[Sequence[Path]]) -> Sequence[Path]:
    import SimpleITK as sitk

    def voxels(files: Sequence[Path]) -> int:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(files[0]))
        reader.ReadImageInformation()
        return math.prod(reader.GetSize())

    return max(volume_files, key=voxels)


def run_speed_benchmark(bundles: dict[str, Bundle], volume_files: Sequence[Sequence[Path]], backends: Sequence[str],
                        threads: int | None = None, repeats: int = 3, overlap: float = 0.5, sw_batch_size: int = 2,
                        precisions: Sequence[str] = ("fp32",), memory: bool = True, log=print) -> list[SpeedResult]:
    """Time every bundle with every engine and precision on the same volumes, round by round in turn
    (:func:`~ReCoKDLib.benchmarks.inference.timed_rounds`), with each one's label agreement with PyTorch fp32
    and (``memory``) the peak RAM of a fresh process on the largest volume. ``volume_files``: per volume, one
    file per channel."""
    import SimpleITK as sitk

    from ..data.datasets import read_image

    volumes = [[read_image(p) for p in files] for files in volume_files]
    entries: list[tuple[SpeedResult, Predictor, Bundle]] = []
    for name, bundle in bundles.items():
        net = bundle.build_network("cpu")
        params, flops = count_parameters(net), count_flops(net, bundle.plans.num_channels, bundle.plans.patch_size)

        def predictor(backend: str, precision: str) -> Predictor:
            return Predictor(bundle, device="cpu", threads=threads, overlap=overlap, sw_batch_size=sw_batch_size,
                             backend=backend, precision=precision, postprocess="none", log=log)

        reference = [sitk.GetArrayFromImage(predictor("torch", "fp32").predict_image(v, name="reference"))
                     for v in volumes]
        for backend in backends:
            for precision in precisions:
                try:
                    p = predictor(backend, precision)
                    chosen = p.backend
                except ReCoKDError as exc:
                    log(f"{name}: skipped with {backend} {precision} ({exc})")
                    continue
                if backend != "auto" and chosen != backend:
                    log(f"{name}: skipped with {backend} (ran {chosen})")
                    continue
                agreement = float(np.mean([np.mean(sitk.GetArrayFromImage(p.predict_image(v, name="check")) == ref)
                                           for v, ref in zip(volumes, reference)]))
                entries.append((SpeedResult(name, bundle.role, bundle.spec.filters, chosen, params, flops, math.nan,
                                            math.nan, precision=precision, agreement=agreement), p, bundle))
    rounds = timed_rounds([p for _, p, _ in entries], volumes, repeats)
    largest = _largest(volume_files)
    with tempfile.TemporaryDirectory(prefix="recokd-speed-") as tmp:
        for (result, predictor, bundle), seconds in zip(entries, rounds):
            result.round_seconds = seconds
            result.seconds_per_volume = statistics.median(seconds)
            result.plain_monai_seconds = plain_monai_seconds(predictor, volumes, repeats)
            if memory:
                path = Path(tmp) / f"{bundle.name}.recokd"
                if not path.exists():
                    bundle.save(path)
                result.peak_ram_mb = peak_ram_mb(path, largest, result.backend, result.precision, threads)["peak_mb"]
            log(f"{result.name} ({result.engine}): {result.seconds_per_volume:.3f} s/volume over {len(seconds)} "
                f"round(s), labels {100 * result.agreement:.2f} % as PyTorch fp32, peak RAM {result.peak_ram_mb:.0f} MB")
    results = [r for r, _, _ in entries]
    for r in results:
        teacher = next((t for t in results if t.role == "teacher" and t.engine == r.engine), None)
        if teacher is not None:
            r.speedups = round_ratios(teacher.round_seconds, r.round_seconds)
    return results


def speed_table(results: Sequence[SpeedResult], caption: str = "") -> str:
    """Markdown table plus notes (targets: R = 4 ≥ 8×, R = 8 ≥ 12× against the teacher on the same engine and
    precision, per round; overhead ≤ 10 %)."""
    teachers = {r.engine: r for r in results if r.role == "teacher"}
    best_teacher = min(teachers.values(), key=lambda r: r.seconds_per_volume) if teachers else None
    head = ["model", "filters", "params", "GFLOPs/patch", "engine", "s/volume", "× vs teacher (same engine), median "
            "[range] over rounds", "× vs teacher (its best)", "labels = PyTorch fp32", "peak RAM MB", "bare MONAI s",
            "overhead"]
    lines = ([caption, ""] if caption else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.filters[0]}…{max(r.filters)}", f"{r.parameters / 1e6:.2f} M", f"{r.flops / 1e9:.1f}",
               r.engine, f"{r.seconds_per_volume:.3f}", ratio_text(r.speedups) if r.role != "teacher" else "1×",
               f"{best_teacher.seconds_per_volume / r.seconds_per_volume:.1f}" if best_teacher else "",
               f"{100 * r.agreement:.2f} %" if math.isfinite(r.agreement) else "",
               f"{r.peak_ram_mb:.0f}" if math.isfinite(r.peak_ram_mb) else "n/a",
               f"{r.plain_monai_seconds:.3f}", f"{100 * r.overhead:+.1f} %"]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    targets = {4.0: 8.0, 8.0: 12.0}
    for r in results:
        if r.role != "student" or not r.speedups:
            continue
        factor = float(r.name.split("R=")[1]) if "R=" in r.name else None
        target = targets.get(factor) if factor is not None else None
        median = statistics.median(r.speedups)
        verdict = "" if target is None else f" (target ≥ {target:g}×, {'ok' if median >= target else 'below target'})"
        notes.append(f"- {r.name} on {r.engine}: {ratio_text(r.speedups)} faster than the teacher on the same engine"
                     f"{verdict}")
    best = fastest_per_model(results)
    if best_teacher is not None:
        for name, r in best.items():
            if r.role == "student":
                notes.append(f"- {name}: fastest on {r.engine}, {best_teacher.seconds_per_volume / r.seconds_per_volume:.1f}× "
                             f"the teacher on its fastest ({best_teacher.engine})")
    worst = max((r.overhead for r in results), default=math.nan)
    notes.append(f"- predictor overhead against bare MONAI: at most {100 * worst:+.1f} % "
                 f"(target ≤ {100 * OVERHEAD_TARGET:.0f} %, {'ok' if worst <= OVERHEAD_TARGET else 'above target'})")
    notes.append(f"- machine: {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
