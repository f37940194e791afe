"""How fast a student is against its teacher at real nnU-Net widths (``recokd benchmark-speed``).

Speed does not depend on what the weights learnt, so this benchmark needs no trained model: from a
dataset's plan and planned topology it builds a teacher at nnU-Net's widths (``base`` filters doubling
per level up to ``cap``: 32…320 by default) and its students at width factors R (channels / R, at least
8), with seeded random weights, and times the whole predictor on real volumes of the dataset with each
backend, side by side in one process. Reported per model and backend: parameters, FLOPs of one patch,
seconds per volume (median over repeats, after a warm-up), the speed-up against the teacher on the same
backend and against the teacher's fastest backend, and the predictor's overhead against one bare MONAI
``sliding_window_inference`` call on the same network and preprocessed volume.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from ..data.planning import Plans
from ..deployment.bundle import Bundle, bundle_from_network
from ..inference.predictor import Predictor
from ..models import count_parameters
from ..models.unet import UNetSpec, build_unet, nnunet_filters
from .inference import OVERHEAD_TARGET, count_flops, fastest_per_model, time_volumes

__all__ = ["SpeedResult", "width_ladder", "run_speed_benchmark", "speed_table"]


@dataclass
class SpeedResult:
    name: str
    role: str
    filters: tuple[int, ...]
    backend: str
    parameters: int
    flops: int
    seconds_per_volume: float
    plain_monai_seconds: float

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


def run_speed_benchmark(bundles: dict[str, Bundle], volumes: Sequence[Sequence[Any]], backends: Sequence[str],
                        threads: int | None = None, repeats: int = 2, overlap: float = 0.5, sw_batch_size: int = 2,
                        log=print) -> list[SpeedResult]:
    """Time every bundle with every backend on the same volumes (one SimpleITK image per channel each)."""
    results = []
    for name, bundle in bundles.items():
        net = bundle.build_network("cpu")
        params, flops = count_parameters(net), count_flops(net, bundle.plans.num_channels, bundle.plans.patch_size)
        for backend in backends:
            predictor = Predictor(bundle, device="cpu", threads=threads, overlap=overlap, sw_batch_size=sw_batch_size,
                                  backend=backend, postprocess="none")
            if backend != "auto" and predictor.backend != backend:
                log(f"{name}: skipped with {backend} (ran {predictor.backend})")
                continue
            seconds, plain = time_volumes(predictor, volumes, repeats)
            results.append(SpeedResult(name, bundle.role, bundle.spec.filters, predictor.backend, params, flops,
                                       seconds, plain))
            log(f"{name} ({predictor.backend}): {seconds:.3f} s/volume (bare MONAI {plain:.3f} s)")
    return results


def speed_table(results: Sequence[SpeedResult], caption: str = "") -> str:
    """Markdown table plus notes (targets: R = 4 ≥ 8×, R = 8 ≥ 12× on the best backend each; overhead ≤ 10 %)."""
    teachers = {r.backend: r for r in results if r.role == "teacher"}
    best_teacher = min(teachers.values(), key=lambda r: r.seconds_per_volume) if teachers else None
    head = ["model", "filters", "params", "GFLOPs/patch", "backend", "s/volume", "× vs teacher (same backend)",
            "× vs teacher (its best)", "bare MONAI s", "overhead"]
    lines = ([caption, ""] if caption else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        same = teachers.get(r.backend)
        row = [r.name, f"{r.filters[0]}…{max(r.filters)}", f"{r.parameters / 1e6:.2f} M", f"{r.flops / 1e9:.1f}",
               r.backend, f"{r.seconds_per_volume:.3f}",
               f"{same.seconds_per_volume / r.seconds_per_volume:.1f}" if same else "",
               f"{best_teacher.seconds_per_volume / r.seconds_per_volume:.1f}" if best_teacher else "",
               f"{r.plain_monai_seconds:.3f}", f"{100 * r.overhead:+.1f} %"]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    best = fastest_per_model(results)
    targets = {4.0: 8.0, 8.0: 12.0}
    if best_teacher is not None:
        for name, r in best.items():
            if r.role != "student":
                continue
            factor = float(name.split("R=")[1]) if "R=" in name else None
            speedup = best_teacher.seconds_per_volume / r.seconds_per_volume
            target = targets.get(factor) if factor is not None else None
            verdict = "" if target is None else f" (target ≥ {target:g}×, {'ok' if speedup >= target else 'below target'})"
            notes.append(f"- {name}: best backend {r.backend}, {speedup:.1f}× faster than the teacher on its best "
                         f"({best_teacher.backend}){verdict}")
    worst = max((r.overhead for r in results), default=math.nan)
    notes.append(f"- predictor overhead against bare MONAI: at most {100 * worst:+.1f} % "
                 f"(target ≤ {100 * OVERHEAD_TARGET:.0f} %, {'ok' if worst <= OVERHEAD_TARGET else 'above target'})")
    notes.append(f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} thread(s)")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
