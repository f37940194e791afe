"""Side-by-side benchmark of several models (teacher, student without KD, ReCo-KD and baseline
students) on the same cases, in one run.

Per model: mean and per-class Dice and HD95, parameters, FLOPs of one forward pass on one patch
(``torch.utils.flop_counter.FlopCounterMode``), peak memory while predicting one volume (CUDA:
``max_memory_allocated``; CPU: peak bytes of live torch tensors, tracked per op, and a fresh process's peak
resident memory on the largest volume, every engine included), seconds per volume (median over timing rounds
in which every model segments every volume in turn: :func:`timed_rounds`), the speed-up against the teacher
per round (median and range), and the share of the teacher–student gap each student recovers:
``(Dice_m − Dice_noKD) / (Dice_teacher − Dice_noKD)``.

Speed checks: our whole predictor (preprocessing, resampling back included) versus one plain MONAI
``sliding_window_inference`` call with the same network, window and overlap on the same volume
(overhead %, target ≤ 10 %), and the teacher's latency over each student's (target ≥ 5× at R = 4).
"""

from __future__ import annotations

import json
import math
import statistics
import weakref
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils._python_dispatch import TorchDispatchMode

from ..deployment.bundle import Bundle, open_model
from ..errors import ReCoKDError
from ..data.datasets import group_cases
from ..inference.predictor import Predictor
from ..inference.sliding_window import nnunet_window_weights
from ..models import count_parameters
from ..utils.io import atomic_write, json_safe
from ..evaluation.metrics import read_label_map, score_case, summarise
from ..utils.geometry import ImageGeometry

__all__ = ["ModelResult", "count_flops", "run_benchmark", "benchmark_table", "benchmark_chart", "parse_models"]

OVERHEAD_TARGET = 0.10
SPEEDUP_TARGET = 5.0


def count_flops(network: torch.nn.Module, in_channels: int, patch: Sequence[int]) -> int:
    """FLOPs of one eval-mode forward pass on one patch (1, C, *patch)."""
    from torch.utils.flop_counter import FlopCounterMode

    network.eval()
    x = torch.zeros(1, in_channels, *patch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(x)
    return int(counter.get_total_flops())


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the torch tensors allocated while active (device-independent, exact, deterministic).

    Every op's output storage is counted once, with a reference count over the tensors (views
    included) that use it, and released when the last of them is garbage-collected. Tensors that
    existed before (the weights) and numpy buffers never wrapped in a tensor are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [size, 1]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self._track(t)
        return out

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


@dataclass
class ModelResult:
    name: str
    role: str
    method: str | None
    parameters: int
    flops: int
    seconds_per_volume: float
    plain_monai_seconds: float
    peak_memory_mb: float
    summary: dict[str, dict[str, float]]
    per_case: list[dict[str, Any]] = field(default_factory=list)
    gap_recovered: float | None = None
    backend: str = "torch"
    model: str = ""  # the model's name (``name`` adds the backend when several are compared)
    round_seconds: list[float] = field(default_factory=list)  # mean seconds per volume in each timing round
    peak_ram_mb: float = math.nan  # a fresh process's peak resident memory on the largest volume (CPU)

    @property
    def overhead(self) -> float:
        return self.seconds_per_volume / self.plain_monai_seconds - 1 if self.plain_monai_seconds > 0 else math.nan


def parse_models(items: Sequence[str]) -> dict[str, str]:
    """``["teacher=runs/t", "recokd=s.recokd"]`` -> ordered dict name -> path."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ReCoKDError(f"--models entry {item!r} is not NAME=PATH; e.g. teacher=runs/teacher")
        name, path = item.split("=", 1)
        if not name or name in out:
            raise ReCoKDError(f"--models entry {item!r} has an empty or repeated name")
        out[name] = path
    return out


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection are not what a user waits for per volume
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plain_monai_seconds(predictor: Predictor, volumes: Sequence[Sequence[Any]], repeats: int) -> float:
    """Median seconds per volume of one plain MONAI ``sliding_window_inference`` call with the predictor's
    network, window, overlap and blending on the already preprocessed volume: it visits the same windows as
    the predictor, so the difference is what the pipeline adds (checks, reorientation, resampling in and
    out, the window wrapper). ``volumes``: per case, one SimpleITK image per channel."""
    import SimpleITK as sitk

    network, dev = predictor.network, predictor.device
    blend = predictor.window_weights
    weights = nnunet_window_weights(predictor.roi_size) if blend == "nnunet" else None
    plains = []
    for imgs in volumes:
        geometry = ImageGeometry.of(imgs[0])
        array = np.stack([sitk.GetArrayFromImage(i).astype(np.float32) for i in imgs])
        _, pre = predictor.preprocess(array, geometry.spacing, geometry.origin, geometry.direction)
        raw = torch.from_numpy(pre.image)[None]

        def plain() -> None:
            with torch.inference_mode():
                sliding_window_inference(raw.to(dev), predictor.roi_size, predictor.sw_batch_size, network,
                                         overlap=predictor.overlap, mode="constant" if blend == "constant" else "gaussian",
                                         roi_weight_map=weights).argmax(1)

        plains.append(_time(plain, repeats))
    return statistics.median(plains)


def timed_rounds(predictors: Sequence[Predictor], volumes: Sequence[Sequence[Any]], repeats: int) -> list[list[float]]:
    """Per predictor, its mean seconds per volume in each of ``repeats`` rounds.

    After one warm-up volume each, every round lets each predictor segment every volume once, in turn, the
    order rotated by one each round: load that changes while the benchmark runs (another job starting, the
    CPU's clock) then falls on every model alike, and the ratio of two models within a round compares
    like with like. Timing the models one after another moved the teacher/student ratio by up to 40 %
    between two runs on a shared machine (issue 32)."""
    if not predictors or not volumes:
        return [[] for _ in predictors]
    for predictor in predictors:
        predictor.predict_image(list(volumes[0]), name="warm-up")
    seconds: list[list[float]] = [[] for _ in predictors]
    for r in range(max(repeats, 1)):
        order = list(range(len(predictors)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            tick = time.perf_counter()
            for imgs in volumes:
                predictors[i].predict_image(list(imgs), name="timing")
            seconds[i].append((time.perf_counter() - tick) / len(volumes))
    return seconds


def round_ratios(slow: Sequence[float], fast: Sequence[float]) -> list[float]:
    """Per round, how many times faster ``fast`` ran than ``slow``."""
    return [a / b for a, b in zip(slow, fast) if b > 0]


def ratio_text(ratios: Sequence[float]) -> str:
    """``7.2× [6.9–7.6]``: the median over rounds and its range."""
    if not ratios:
        return ""
    low, high = min(ratios), max(ratios)
    spread = f" [{low:.1f}–{high:.1f}]" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.1f}×{spread}"


def peak_ram_mb(model: str | Path, images: Sequence[str | Path], backend: str = "torch", precision: str = "fp32",
                threads: int | None = None, device: str = "cpu", timeout: float = 1800) -> dict[str, float]:
    """Peak resident memory of a fresh process that loads ``model`` and segments ``images`` (one volume, one
    file per channel) as ``recokd predict`` would: ``{"peak_mb": …, "loaded_mb": …}``, the process's high-water
    mark after the prediction and after loading the model, libraries included. A fresh process, because in
    a process that has already run other models the allocator reuses their freed memory and the peak says
    nothing about one model. NaN values where the OS does not report it (Windows)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "ReCoKDLib.benchmarks.peak_memory", str(model), *map(str, images),
               "--backend", backend, "--precision", precision, "--device", device]
    if threads:
        command += ["--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"peak memory of {model}: not measured (over {timeout:.0f} s)", file=sys.stderr)
        return {"peak_mb": math.nan, "loaded_mb": math.nan}
    if done.returncode != 0:  # e.g. killed for memory: the timings already made are kept, this figure is NaN
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        print(f"peak memory of {model}: not measured ({last})", file=sys.stderr)
        return {"peak_mb": math.nan, "loaded_mb": math.nan}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(
    models: dict[str, str | Path | Bundle],
    images: str | Path,
    labels: str | Path,
    device: str = "cpu",
    repeats: int = 3,
    overlap: float = 0.5,
    max_cases: int | None = None,
    teacher: str | None = None,
    no_kd: str | None = None,
    tolerance_mm: float = 2.0,
    threads: int | None = None,
    backends: Sequence[str] = ("torch",),
    log=print,
) -> list[ModelResult]:
    """Evaluate and time each model on the same cases; see the module docstring.

    Args:
        models: name -> bundle / bundle path / run folder.
        images: folder of images (``case_0000.nii.gz`` …); labels: folder of ``case.nii.gz``.
        repeats: timing repeats per volume (after one warm-up run); the median per volume, then the
            median over volumes, is reported.
        threads: CPU threads for torch during the benchmark (default: torch's).
        teacher, no_kd: names of the teacher and the student trained without KD (default: by the
            bundles' role and method).
        backends: engines to run each model with (``torch``, ``onnxruntime``, ``auto``); with several, each
            model gets one row per backend, named ``model (backend)``, and speed-ups and the gap are
            computed within a backend.
    """
    from ..data.datasets import read_image

    cases = group_cases(images)
    label_files = {k: v[0] for k, v in group_cases(labels).items()}
    ids = [c for c in cases if c in label_files][: max_cases or None]
    if not ids:
        raise ReCoKDError(f"no image in {images} has a same-named label in {labels}; name them case_0000.nii.gz / case.nii.gz")
    loaded = []
    for case in ids:
        imgs = [read_image(p) for p in cases[case]]
        ref, ref_geometry = read_label_map(label_files[case])
        loaded.append((case, imgs, ref, ref_geometry.spacing_dhw))
    rows: list[tuple[ModelResult, Predictor, Any]] = []
    for name, source in models.items():
        bundle = source if isinstance(source, Bundle) else open_model(source)
        for backend in backends:
            row = _benchmark_one(name, bundle, backend, len(backends) > 1, loaded, device, overlap, threads,
                                 tolerance_mm, log)
            if row is not None:
                rows.append((*row, source))
    volumes = [imgs for _, imgs, _, _ in loaded]
    # timed after scoring, every model in turn in each round (timed_rounds), so that load changing under the
    # benchmark falls on all of them alike
    rounds = timed_rounds([p for _, p, _ in rows], volumes, repeats)
    largest = max(range(len(loaded)), key=lambda i: math.prod(loaded[i][1][0].GetSize()))
    for (result, predictor, source), seconds in zip(rows, rounds):
        result.round_seconds = seconds
        result.seconds_per_volume = statistics.median(seconds)
        result.plain_monai_seconds = plain_monai_seconds(predictor, volumes, repeats)
        path = source if not isinstance(source, Bundle) else source.source
        if predictor.device.type == "cpu" and path is not None and Path(path).exists():
            files = cases[loaded[largest][0]]
            result.peak_ram_mb = peak_ram_mb(path, files, result.backend, "fp32", threads)["peak_mb"]
        log(f"{result.name}: mean Dice {result.summary['dice']['mean']:.4f}, {result.seconds_per_volume:.2f} s/volume")
    results = [r for r, _, _ in rows]
    for group in {r.backend for r in results}:
        _gap([r for r in results if r.backend == group], teacher, no_kd)
    return results


def _benchmark_one(name: str, bundle: Any, backend: str, several: bool, loaded: list, device: str, overlap: float,
                   threads: int | None, tolerance_mm: float, log) -> tuple[ModelResult, Predictor] | None:
    """The model scored on every case, and its predictor (timed later, with the others)."""
    import SimpleITK as sitk

    # the networks are compared as they are: a bundle's recorded post-processing is not applied (run
    # folders have none), so that every model is scored and timed alike
    predictor = Predictor(bundle, device=device, overlap=overlap, progress=False, threads=threads,
                          postprocess="none", backend=backend)
    if backend != "auto" and predictor.backend != backend:
        log(f"{name}: skipped with {backend} (ran {predictor.backend})")
        return None
    label = f"{name} ({predictor.backend})" if several else name
    names = bundle.labels.names
    per_case, scores = [], []
    for case, imgs, ref, spacing in loaded:
        pred = sitk.GetArrayFromImage(predictor.predict_image(imgs, name=case))
        s = score_case(pred, ref, spacing, names, tolerance_mm, case)
        scores.append(s)
        per_case.append({"case": case, **{m: s.scores[m] for m in ("dice", "hd95", "nsd")}})
    dev = predictor.device
    imgs = loaded[0][1]
    if predictor.backend != "torch":
        peak = math.nan  # ONNX Runtime's own memory is not visible as torch tensors
    elif dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        predictor.predict_image(imgs, name="memory")
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        with _PeakTensorMemory() as tracker:
            predictor.predict_image(imgs, name="memory")
        peak = tracker.megabytes
    net_cpu = bundle.build_network("cpu")
    p = bundle.provenance
    result = ModelResult(
        name=label, role=bundle.role, method=p.get("method"), parameters=count_parameters(net_cpu),
        flops=count_flops(net_cpu, bundle.plans.num_channels, bundle.plans.patch_size),
        seconds_per_volume=math.nan, plain_monai_seconds=math.nan, peak_memory_mb=peak,
        summary=summarise(scores), per_case=per_case, backend=predictor.backend, model=name)
    return result, predictor


def _gap(results: list[ModelResult], teacher: str | None, no_kd: str | None) -> None:
    by_name = {r.model or r.name: r for r in results}
    t = by_name.get(teacher) if teacher else next((r for r in results if r.role == "teacher"), None)
    s = by_name.get(no_kd) if no_kd else next(
        (r for r in results if r.role == "student" and (r.method in (None, "none"))), None)
    if t is None or s is None:
        return
    gap = t.summary["dice"]["mean"] - s.summary["dice"]["mean"]
    for r in results:
        if r.role == "student" and abs(gap) > 1e-9:
            r.gap_recovered = (r.summary["dice"]["mean"] - s.summary["dice"]["mean"]) / gap


def benchmark_table(results: Sequence[ModelResult]) -> str:
    """Markdown: per model Dice (mean and per class), HD95, parameters, FLOPs, memory, time, gap."""
    if not results:
        return ""
    classes = [c for c in results[0].summary["dice"] if c != "mean"]
    head = ["model", "role", "method", "backend", "mean Dice", *[f"Dice {c}" for c in classes], "mean HD95 (mm)",
            "params", "GFLOPs/patch", "peak tensor MB", "peak RAM MB", "s/volume", "× vs teacher [range]", "MONAI s",
            "overhead", "gap recovered"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        gap = "" if r.gap_recovered is None else f"{100 * r.gap_recovered:.0f} %"
        peak = "n/a" if math.isnan(r.peak_memory_mb) else f"{r.peak_memory_mb:.0f}"
        ram = "n/a" if math.isnan(r.peak_ram_mb) else f"{r.peak_ram_mb:.0f}"
        teacher = next((t for t in results if t.role == "teacher" and t.backend == r.backend), None)
        speedup = ratio_text(round_ratios(teacher.round_seconds, r.round_seconds)) if teacher and r is not teacher else ""
        row = [r.name, r.role, r.method or "", r.backend, f"{r.summary['dice']['mean']:.4f}",
               *[f"{r.summary['dice'][c]:.4f}" for c in classes], f"{r.summary['hd95']['mean']:.2f}",
               f"{r.parameters:,}", f"{r.flops / 1e9:.2f}", peak, ram, f"{r.seconds_per_volume:.3f}", speedup,
               f"{r.plain_monai_seconds:.3f}", f"{100 * r.overhead:+.1f} %", gap]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for r in results:
        ok = "ok" if r.overhead <= OVERHEAD_TARGET else "above target"
        notes.append(f"- {r.name}: predictor overhead vs plain MONAI {100 * r.overhead:+.1f} % (target ≤ {100 * OVERHEAD_TARGET:.0f} %, {ok})")
        teacher = next((t for t in results if t.role == "teacher" and t.backend == r.backend), None)
        ratios = round_ratios(teacher.round_seconds, r.round_seconds) if teacher is not None else []
        if r.role == "student" and ratios:
            ok = "ok" if statistics.median(ratios) >= SPEEDUP_TARGET else "below target"
            notes.append(f"- {r.name}: {ratio_text(ratios)} faster than the teacher on {r.backend}, median [range] over "
                         f"timing rounds (target ≥ {SPEEDUP_TARGET:g}× at R = 4, {ok})")
    notes += best_backend_notes(results)
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def fastest_per_model(results: Sequence[Any]) -> dict[str, Any]:
    """Model name -> its fastest row over the backends (rows with ``seconds_per_volume`` and ``backend``)."""
    best: dict[str, Any] = {}
    for r in results:
        key = getattr(r, "model", "") or r.name
        if key not in best or r.seconds_per_volume < best[key].seconds_per_volume:
            best[key] = r
    return best


def best_backend_notes(results: Sequence[Any]) -> list[str]:
    """With several backends: each student's fastest backend against the teacher's fastest."""
    if len({r.backend for r in results}) < 2:
        return []
    best = fastest_per_model(results)
    teacher = next((r for r in best.values() if r.role == "teacher"), None)
    if teacher is None:
        return []
    return [f"- {key}, best backend each: {r.backend} {r.seconds_per_volume:.3f} s against the teacher's "
            f"{teacher.backend} {teacher.seconds_per_volume:.3f} s: {teacher.seconds_per_volume / r.seconds_per_volume:.1f}×"
            for key, r in best.items() if r.role == "student" and r.seconds_per_volume > 0]


def benchmark_chart(results: Sequence[ModelResult], path: str | Path) -> Path:
    """A PNG: mean Dice per model (bars) and seconds per volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(names), 3.5))
    axes[0].bar(names, [r.summary["dice"]["mean"] for r in results], color="tab:blue")
    axes[0].set_ylabel("mean Dice")
    axes[0].set_ylim(0, 1)
    axes[1].bar(names, [r.seconds_per_volume for r in results], color="tab:orange")
    axes[1].set_ylabel("seconds / volume")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def results_json(results: Sequence[ModelResult]) -> str:
    return json.dumps([json_safe({**r.__dict__, "overhead": r.overhead}) for r in results], indent=2)
