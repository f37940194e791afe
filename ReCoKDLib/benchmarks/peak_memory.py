"""``python -m ReCoKDLib.benchmarks.peak_memory MODEL IMAGE [IMAGE…]``: segment one volume in this fresh
process and print its peak resident memory as JSON (see :func:`~ReCoKDLib.benchmarks.inference.peak_ram_mb`)."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _high_water_mb() -> float:
    """This process's peak resident memory. On Linux the memory map's own high-water mark (``VmHWM``): the
    rusage figure (``ru_maxrss``) survives fork and exec, so a fresh process started by a large one (a
    benchmark holding other models) would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ReCoKDLib.benchmarks.peak_memory")
    parser.add_argument("model")
    parser.add_argument("images", nargs="+", help="one file per channel")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--force", action="store_true", help="skip the input checks (as recokd predict --force)")
    args = parser.parse_args(argv)

    from ..data.datasets import read_image
    from ..inference.predictor import Predictor

    images = [read_image(p) for p in args.images]
    predictor = Predictor(args.model, device=args.device, backend=args.backend, precision=args.precision,
                          threads=args.threads, postprocess="none", progress=False, log=lambda m: None,
                          check_spacing=not args.force)
    predictor.network  # noqa: B018 - the engine is built (and an ONNX graph loaded) before the baseline
    loaded = _high_water_mb()
    predictor.predict_image(images, name="memory")
    print(json.dumps({"peak_mb": _high_water_mb(), "loaded_mb": loaded}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
