"""``recokd plan DATASET``: validate, fingerprint, plan and preprocess a dataset."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import open_dataset
    from ..workflows.runs import PlannerOptions, plan_summary, plans_folder, prepare_plans

    planner = PlannerOptions(args.patch_budget, args.max_levels, args.base_filters, args.max_filters)  # checked first
    dataset = open_dataset(args.dataset)
    plans, network, root, folder = prepare_plans(dataset, args.cache, planner, replan=True, progress=not args.no_progress,
                                        num_workers=args.workers)
    written = plans_folder(root, planner, replan=True)  # the cache's own plan: `recokd train` without options uses it
    print(plan_summary(dataset, plans, network, folder))
    print(f"plan written to {written / 'plans.json'}, the teacher network to {written / 'network.json'}")
    return 0


def add_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="folder for the plan and the preprocessed cases "
                   "(default $RECOKD_RESULTS/<dataset name> or ./recokd_runs/<dataset name>)")


def add_planner_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patch-budget", dest="patch_budget", type=int,
                   help="most voxels in a training patch (default 96^3 = 884736)")
    p.add_argument("--max-levels", dest="max_levels", type=int, help="most U-Net levels (default 6)")
    p.add_argument("--base-filters", dest="base_filters", type=int, help="teacher channels at full resolution (default 32)")
    p.add_argument("--max-filters", dest="max_filters", type=int, help="teacher channel cap (default 320)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="validate a dataset, plan the experiment and preprocess the cases",
        description="Checks every case of an nnU-Net or MSD dataset folder, computes its fingerprint, plans "
        "spacing, patch and teacher network (nnU-Net rules), and preprocesses the training cases into a cache.",
    )
    p.add_argument("dataset", help="dataset folder (holds dataset.json)")
    add_cache_argument(p)
    add_planner_arguments(p)
    p.add_argument("--workers", type=int, default=0, help="preprocessing processes (default 0: this one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
