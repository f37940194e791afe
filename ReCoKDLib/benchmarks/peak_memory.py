"""``python -m ReCoKDLib.benchmarks.peak_memory MODEL IMAGE [IMAGE…]``: segment one volume in this fresh
process and print its peak resident memory as JSON (see :func:`~ReCoKDLib.benchmarks.inference.peak_ram_mb`)."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _high_water_mb() -> float:
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
    args = parser.parse_args(argv)

    from ..data.datasets import read_image
    from ..inference.predictor import Predictor

    images = [read_image(p) for p in args.images]
    predictor = Predictor(args.model, device=args.device, backend=args.backend, precision=args.precision,
                          threads=args.threads, postprocess="none", progress=False, log=lambda m: None)
    predictor.network  # noqa: B018 - the engine is built (and an ONNX graph loaded) before the baseline
    loaded = _high_water_mb()
    predictor.predict_image(images, name="memory")
    print(json.dumps({"peak_mb": _high_water_mb(), "loaded_mb": loaded}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
