#!/usr/bin/env python
"""Which cheap CPU inference options pay, per network: seconds per batch of sliding-window patches for
PyTorch fp32 (the default), ``channels_last_3d`` memory format, bfloat16 autocast, and ONNX Runtime, at
batch sizes 1, 2 and 4 (windows per call), on a teacher at nnU-Net widths and its students. Random
weights (speed does not depend on them); the patch and topology of a dataset's plan.

    python scripts/cpu_inference_options.py PLANS.json [--threads 2] [--repeats 3] [--base-filters 32 --max-filters 320]

Prints a markdown table: seconds per window (median of repeats after a warm-up) and the ratio to fp32 at
batch 1 of the same network. The predictor keeps what wins here (docs/results.md, "Inference speed").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ReCoKDLib.benchmarks.speed import width_ladder
from ReCoKDLib.data.planning import Plans
from ReCoKDLib.inference.export import OnnxNetwork, export_onnx
from ReCoKDLib.workflows.runs import planned_network


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-filters", type=int, default=32)
    ap.add_argument("--max-filters", type=int, default=320)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plans = Plans.load(args.plans)
    bundles = width_ladder(plans, planned_network(args.plans, plans), args.base_filters, args.max_filters)
    patch = tuple(plans.patch_size)
    print(f"{plans.dataset_name}: patch {'x'.join(map(str, patch))}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| network | option | " + " | ".join(f"s/window at batch {b}" for b in args.batches) + " | × vs fp32 batch 1 |")
    print("|---|---|" + "---|" * (len(args.batches) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for name, bundle in bundles.items():
            net = bundle.build_network("cpu").eval()
            onnx_path = export_onnx(bundle, Path(tmp) / f"{name.replace(' ', '_')}.onnx")
            ort = OnnxNetwork(onnx_path, threads=args.threads)
            options = {
                "torch fp32": lambda x: net(x),
                "torch channels_last_3d": lambda x: net(x.contiguous(memory_format=torch.channels_last_3d)),
                "torch bf16 autocast": lambda x: _bf16(net, x),
                "onnxruntime fp32": lambda x: ort(x),
            }
            cl_net = None
            baseline = None
            for option, fn in options.items():
                if option == "torch channels_last_3d" and cl_net is None:
                    cl_net = net.to(memory_format=torch.channels_last_3d)
                per_window = []
                for b in args.batches:
                    x = torch.randn(b, plans.num_channels, *patch)
                    with torch.inference_mode():
                        per_window.append(_median_seconds(lambda: fn(x), args.repeats) / b)
                if option == "torch channels_last_3d":
                    net.to(memory_format=torch.contiguous_format)
                baseline = baseline or per_window[0]
                best = min(per_window)
                print(f"| {name} | {option} | " + " | ".join(f"{s:.3f}" for s in per_window) + f" | {baseline / best:.2f} |")


def _bf16(net, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x)


if __name__ == "__main__":
    main()
