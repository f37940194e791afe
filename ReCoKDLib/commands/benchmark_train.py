"""``recokd benchmark-train [DATASET]``: training throughput and peak memory per configuration."""

from __future__ import annotations

import argparse

from . import add_command


DESCRIPTION = (
    "Times optimiser steps of teacher training, student training without KD and distillation "
    "with each KD method on a fixed random batch shaped as the dataset's plan (or phantom-sized when no "
    "dataset is given), and reports the KD overhead ratio distill / (student step + teacher forward)."
)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.unet import isotropic_spec
    from ..benchmarks.training import DEFAULT_METHODS, benchmark_training, format_table
    from ..utils.runtime import configure_cpu, resolve_device

    configure_cpu(args.threads)
    device = resolve_device(args.device)
    if args.dataset:
        from ..data.datasets import open_dataset
        from ..workflows.runs import PlannerOptions, prepare_plans

        plans, spec, _, _ = prepare_plans(open_dataset(args.dataset), args.cache, PlannerOptions(), progress=False,
                                          preprocess=False)
        patch, batch = tuple(plans.patch_size), plans.batch_size
        source = f"dataset {plans.dataset_name}"
    else:
        spec = isotropic_spec(1, 5, num_levels=args.levels)
        patch, batch, source = (64, 64, 64), 2, "phantom-sized input (1 channel, 5 classes)"
    patch = tuple(args.patch_size) if args.patch_size else patch
    batch = args.batch_size or batch
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    print(f"benchmark on {device} ({torch.get_num_threads()} threads): {source}, patch {list(patch)}, batch {batch}, "
          f"teacher filters {list(spec.filters)}, student R={args.width_factor:g}, median of {args.iters} interleaved rounds")
    bench = benchmark_training(spec, patch, batch, args.width_factor, methods, args.iters, args.warmup, device,
                               amp=not args.no_amp, memory=not args.no_memory, log=print)
    print()
    print(format_table(bench))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "benchmark-train", run, help="measure training iterations/s and peak memory, with and without KD", description=DESCRIPTION)
    p.add_argument("dataset", nargs="?", help="dataset folder (its plan sets network, patch and batch)")
    p.add_argument("--cache", help="plan/cache folder (as for `recokd plan`)")
    p.add_argument("--patch-size", dest="patch_size", type=int, nargs=3, metavar=("D", "H", "W"))
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--levels", type=int, default=5, help="U-Net levels without a dataset (default 5)")
    p.add_argument("--width-factor", dest="width_factor", type=float, default=4.0)
    p.add_argument("--methods", help=f"comma-separated KD methods (default {','.join(('recokd', 'recokd-gc', 'logit', 'fitnet', 'cwd', 'skd'))})")
    p.add_argument("--iters", type=int, default=5,
                   help="timed rounds, one step of every configuration each; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each configuration first (default 1)")
    p.add_argument("--no-memory", dest="no_memory", action="store_true",
                   help="skip the peak-memory measurement (on CPUs one fresh process per configuration)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-amp", dest="no_amp", action="store_true")
