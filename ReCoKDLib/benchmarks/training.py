"""Training throughput: iterations per second and peak memory of teacher training, student training
without KD, and distillation with each KD method (``recokd benchmark-train``).

The KD overhead is reported as ``distill step / (student step + teacher forward)``; the target is
≤ 1.3, i.e. the distillation terms themselves add at most 30 %.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..distill.distiller import Distiller
from ..losses.segmentation import DeepSupervisedDiceCELoss
from ..models.unet import UNetSpec, build_unet, dynunet_tap_names

DEFAULT_METHODS = ("recokd", "recokd-gc", "logit", "fitnet", "cwd", "skd")


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the process maximum, a coarser bound)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class BenchResult:
    name: str
    seconds_per_iter: float
    peak_bytes: int

    @property
    def iters_per_second(self) -> float:
        return 1.0 / self.seconds_per_iter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(spec: UNetSpec, patch_size, batch_size: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, spec.in_channels, *patch_size, generator=g)
    labels = torch.randint(0, spec.out_channels, (batch_size, 1, *(max(p // 4, 1) for p in patch_size)), generator=g)
    labels = nn.functional.interpolate(labels.float(), size=tuple(patch_size), mode="nearest").long()
    return images.to(device), labels.to(device)


def _config_names(methods: Sequence[str]) -> list[str]:
    return ["teacher training", "teacher forward", "student (no KD)", *(f"distill {m}" for m in methods)]


def _build_steps(names, spec: UNetSpec, width_factor: float, images, labels, device, use_amp: bool, seed: int
                 ) -> dict[str, Callable[[], None]]:
    """One optimiser-step closure per configuration name (teacher, student, distillation)."""
    seg_loss = DeepSupervisedDiceCELoss()
    student_spec = spec.student(width_factor)

    def train_step(forward: Callable[[], torch.Tensor], params) -> Callable[[], None]:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = forward()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, 12.0)
            scaler.step(opt)
            scaler.update()

        return step

    torch.manual_seed(seed)
    frozen = build_unet(spec).to(device).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    steps: dict[str, Callable[[], None]] = {}
    for name in names:
        torch.manual_seed(seed)
        if name == "teacher training":
            net = build_unet(spec).to(device).train()
            steps[name] = train_step(lambda n=net: seg_loss(n(images), labels), list(net.parameters()))
        elif name == "teacher forward":
            @torch.no_grad()
            def forward():
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    frozen(images)

            steps[name] = forward
        elif name == "student (no KD)":
            net = build_unet(student_spec).to(device).train()
            steps[name] = train_step(lambda n=net: seg_loss(n(images), labels), list(net.parameters()))
        else:
            method = name.removeprefix("distill ")
            distiller = Distiller(frozen, build_unet(student_spec), dynunet_tap_names(spec),
                                  dynunet_tap_names(student_spec), spec.out_channels, method).to(device).train()
            steps[name] = train_step(lambda d=distiller: d(images, labels, 1.0).loss, distiller.trainable_parameters())
    return steps


def _peak_rss_probe(name, spec_dict, width_factor, patch_size, batch_size, seed, threads, queue) -> None:
    """Child process (spawned): peak resident memory of one configuration's steps above its setup
    (sampled every millisecond from /proc; the process's lifetime maximum would include import spikes)."""
    import threading

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    spec = UNetSpec.from_dict(spec_dict)
    images, labels = _inputs(spec, patch_size, batch_size, seed, device)
    step = _build_steps([name], spec, width_factor, images, labels, device, False, seed)[name]
    gc.collect()
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):
        step()
    done.set()
    sampler.join()
    queue.put(max(max(peak, _rss_bytes()) - base, 0))


def _cpu_peak_memory(name, spec, width_factor, patch_size, batch_size, seed) -> int:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_probe, args=(name, spec.to_dict(), width_factor, tuple(patch_size),
                                                     batch_size, seed, torch.get_num_threads(), queue))
    proc.start()
    try:
        return int(queue.get(timeout=3600))
    finally:
        proc.join()


def benchmark_training(
    spec: UNetSpec,
    patch_size: Sequence[int],
    batch_size: int = 2,
    width_factor: float = 4.0,
    methods: Sequence[str] = DEFAULT_METHODS,
    iters: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    amp: bool = True,
    seed: int = 0,
    memory: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time one optimiser step of each configuration on a fixed random batch (data loading excluded).

    The configurations are timed in interleaved rounds (one step of each per round; the median over
    ``iters`` rounds is reported), so a machine whose load changes affects them alike. Peak memory is
    measured per configuration alone: the CUDA allocator's peak on GPUs; on CPUs the peak resident set
    of a fresh process running two steps, above that process's size after building the models.
    """
    device = torch.device(device)
    use_amp = amp and device.type == "cuda"
    say = log or (lambda s: None)
    names = _config_names(methods)
    images, labels = _inputs(spec, patch_size, batch_size, seed, device)
    steps = _build_steps(names, spec, width_factor, images, labels, device, use_amp, seed)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        for name in names:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
        say(f"round {r + 1}/{iters}: " + ", ".join(f"{n} {t[-1] * 1000:.0f} ms" for n, t in times.items()))
    peaks: dict[str, int] = {}
    if memory:
        for name in names:
            if device.type == "cuda":
                gc.collect()
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                steps[name]()
                _sync(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) - base
            else:
                peaks[name] = _cpu_peak_memory(name, spec, width_factor, patch_size, batch_size, seed)
            say(f"peak memory {name}: {peaks[name] / 2**20:.1f} MiB")
    results = [BenchResult(n, statistics.median(times[n]), peaks.get(n, -1)) for n in names]  # -1: not measured
    by_name = {r.name: r for r in results}
    base_s = by_name["student (no KD)"].seconds_per_iter + by_name["teacher forward"].seconds_per_iter
    ratios = {m: by_name[f"distill {m}"].seconds_per_iter / base_s for m in methods}
    return {"results": results, "ratios": ratios, "baseline_seconds": base_s}


def format_table(bench: dict, target: float = 1.3) -> str:
    rows = ["| configuration | it/s | ms/it (median) | peak memory (MiB) | ratio vs student step + teacher fwd |",
            "|---|---:|---:|---:|---:|"]
    for r in bench["results"]:
        method = r.name.removeprefix("distill ") if r.name.startswith("distill ") else None
        ratio = f"{bench['ratios'][method]:.2f}" + (" ✓" if bench["ratios"][method] <= target else " ✗") if method else ""
        peak = f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes >= 0 else "not measured"
        rows.append(f"| {r.name} | {r.iters_per_second:.3f} | {r.seconds_per_iter * 1000:.1f} | {peak} | {ratio} |")
    rows.append(f"\nbaseline (student step + teacher forward): {bench['baseline_seconds'] * 1000:.1f} ms; "
                f"target ratio ≤ {target}")
    return "\n".join(rows)
