"""Device selection, seeding and CPU settings."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch

from ..errors import ReCoKDError


def mps_available() -> bool:
    """Whether PyTorch offers Apple's Metal (MPS) device on this machine."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; ``"cpu"``, ``"cuda[:i]"`` or ``"mps"`` as given.

    ``auto`` never picks MPS: 3D convolutions on Apple's Metal backend are incomplete in some PyTorch
    releases and unmeasured here, so MPS is used only when asked for. Asking for CUDA or MPS where this
    machine has none, or for any other device type, is a one-line error.
    """
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).lower()) if not isinstance(device, torch.device) else device
    except (RuntimeError, TypeError):
        raise ReCoKDError(f"unknown device {device!r}; use auto, cpu, cuda[:N] or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ReCoKDError(f"unknown device {device!r}; use auto, cpu, cuda[:N] or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReCoKDError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not mps_available():
        raise ReCoKDError("device 'mps' was asked for but PyTorch offers no Apple Metal (MPS) device here; "
                          "use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_cpu(num_threads: int | None = None) -> None:
    """Intra-op thread count (``None`` keeps torch's, which defaults to the physical cores) and
    flush-to-zero of denormals, which otherwise can slow CPU convolution backward passes once
    gradients become tiny."""
    torch.set_flush_denormal(True)
    if num_threads:
        if num_threads < 1:
            raise ReCoKDError(f"thread count must be >= 1, got {num_threads}")
        torch.set_num_threads(int(num_threads))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def inference_threads() -> int:
    """The default CPU thread count for prediction: one core left free for the rest of the machine (the
    Slicer GUI, another job), as 3D Slicer's AI extensions do, and never more than torch's own default
    (the physical cores). Narrow students on every core of a busy machine collapse: R = 8 took 9.6 s per
    LA2018 volume on 2 threads against 2.2 s on 1 under contention (issue 32)."""
    return max(1, min(torch.get_num_threads(), usable_cores() - 1))


class OtherLoad:
    """Context manager: how many cores *other* processes kept busy while the block ran (``other_cores``;
    ``None`` where the OS does not say, i.e. outside Linux). The machine's busy CPU time from
    ``/proc/stat`` less this process's own (every thread), over the wall time."""

    other_cores: float | None = None

    @staticmethod
    def _machine_busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        guest = sum(fields[8:10])  # counted in user and nice already
        return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "OtherLoad":
        # /proc/stat counts the whole host: inside a CPU-limited container it would report the neighbours'
        # load as ours to share, so only a process that may use every core measures it
        limited = usable_cores() < (os.cpu_count() or 1)
        self._start = (None if limited else self._machine_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self._machine_busy_seconds(), time.process_time(), time.perf_counter()
        busy0, own0, wall0 = self._start
        if busy is None or busy0 is None or wall <= wall0:
            return
        self.other_cores = max(0.0, ((busy - busy0) - (own - own0)) / (wall - wall0))


def cpu_flags() -> tuple[str, set[str]]:
    """``(model name, instruction-set flags)`` of this machine's CPU, from ``/proc/cpuinfo`` (Linux; elsewhere
    the platform's processor name and no flags)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.machine()):
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (x86 AVX-512 BF16 or AMX; Arm's BF16 extension), the
    condition for bf16 inference to be faster rather than emulated."""
    return bool(cpu_flags()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_description() -> str:
    """One line for benchmark tables: the CPU's name, usable cores and the vector extensions that decide
    inference speed (e.g. ``AMD EPYC, 2 cores, AVX2 AVX-512 VNNI AVX512-BF16``)."""
    name, flags = cpu_flags()
    known = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_bf16", "AMX-BF16"), ("asimd", "NEON"), ("bf16", "BF16")]
    extensions = " ".join(label for flag, label in known if flag in flags)
    return f"{name}, {usable_cores()} core(s)" + (f", {extensions}" if extensions else "")
