"""``recokd demo``: the main job on the built-in phantom."""

from __future__ import annotations

import argparse


#: flags that set the demo's training (a RunConfig field each); the rest are DemoConfig fields
TRAINING_FLAGS = {"seed": "seed", "device": "device", "threads": "num_threads", "augment": "augment"}


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..training.loop import check_distill_options
    from ..workflows.demo import DemoConfig, run_demo

    # the distillation options as `recokd distill` checks them (--lambda-max nan would train a NaN student);
    # the training options (--threads, --seed) are RunConfig's own checks, the sizes run_demo's
    check_distill_options(width_factor=args.width_factor, lambda_max=args.lambda_max)
    make = DemoConfig.quick if args.quick else DemoConfig
    given = {k: v for k, v in vars(args).items() if v is not None}
    overrides = {k: v for k, v in given.items() if k in DemoConfig.__dataclass_fields__ and k != "training"}
    if args.no_progress:
        overrides["progress"] = False
    cfg = make(**overrides)
    training = {field: given[flag] for flag, field in TRAINING_FLAGS.items() if flag in given}
    summary = run_demo(replace(cfg, training=replace(cfg.training, **training)) if training else cfg)
    print()
    print(summary["table"])
    print(f"\nResults, weights and figure written to {summary['output']} "
          f"(total {summary['wall_seconds']:.0f} s on {summary['device']}, {summary['torch_threads']} threads).")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.loader import AUGMENT_PRESETS
    from ..workflows.demo import DemoConfig

    demo = sub.add_parser(
        "demo",
        help="train a teacher and label-scarce students (labels only, + the teacher's labels of unlabelled "
             "scans, + ReCo-KD) on the built-in phantom and compare them",
        description="The main job, end to end on the built-in phantom (no data needed): trains a teacher on "
        "every labelled case, then students that keep only a few labels (--labeled) and learn from labels "
        "alone, from the teacher's labels of the other scans too, and from those plus ReCo-KD, all for the same "
        "steps; prints and writes a table (the share of the labels-only -> teacher gap each recovers) and a figure.",
    )
    demo.add_argument("-o", "--output", help="output folder (default: ./recokd_demo_output)")
    demo.add_argument("--steps", type=int, help=f"training steps of the teacher and of each student (default {DemoConfig.steps})")
    demo.add_argument("--train-cases", dest="train_cases", type=int, help="phantom training cases (default 16)")
    demo.add_argument("--test-cases", dest="test_cases", type=int, help="phantom test cases (default 6)")
    demo.add_argument("--labeled", dest="labeled_cases", type=int,
                      help=f"training cases the students keep labelled (default {DemoConfig.labeled_cases}; the "
                           "others are scans without labels, labelled by the teacher; 0: all labelled)")
    demo.add_argument("--equal-labels", dest="equal_labels", action="store_true", default=None,
                      help="also compare no KD with ReCo-KD when the students have every label, as the teacher")
    demo.add_argument("--method", help="KD method for the distilled student (default recokd)")
    demo.add_argument("--lambda-max", dest="lambda_max", type=float, help="final KD weight λ (default: the method's)")
    demo.add_argument("--width-factor", dest="width_factor", type=float, help="student width divisor R (default 4)")
    demo.add_argument("--taps", choices=["encoder", "decoder"], help="feature levels to distil (default encoder)")
    demo.add_argument("--augment", choices=AUGMENT_PRESETS,
                      help="augmentation preset, as recokd train (default none; the README says why)")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--device", help="auto (default: CUDA when present, else CPU), cpu, cuda or mps")
    demo.add_argument("--threads", type=int, help="CPU threads (default: torch's, i.e. the physical cores)")
    demo.add_argument("--quick", action="store_true", help="a tiny, seconds-long run to check the installation")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace an earlier demo's results in the output folder (default: refuse)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=run)
