"""``recokd train DATASET -o RUN``: train a teacher (also the options shared with ``distill``)."""

from __future__ import annotations

import argparse

from . import add_command
from .plan import add_cache_argument, add_planner_arguments


DESCRIPTION = (
    "Plans and preprocesses the dataset when needed, then trains the planned teacher U-Net on "
    "patches (foreground oversampling, augmentation), validating its EMA each epoch. Runs under torchrun too."
)


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (refused before any data is read)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``distill``. The training options default to None: their defaults
    live in one place, :class:`~ReCoKDLib.training.loop.RunConfig`, and are quoted from it here."""
    from ..data.loader import AUGMENT_PRESETS
    from ..training.loop import RunConfig as D  # the defaults
    p.add_argument("dataset", help="dataset folder (holds dataset.json)")
    p.add_argument("-o", "--output", required=True, help="run folder to write (or to continue with --resume)")
    add_cache_argument(p)
    p.add_argument("--fold", help="cross-validation fold 0-4, or 'all' (default 0)")
    p.add_argument("--val-cases", dest="val_cases", help="file of validation case ids, one per line (instead of folds)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                   help="cpu (default): the CPU-sized defaults below; gpu: nnU-Net's schedule for a GPU (1000 epochs x "
                        "250 iterations, nnunet augmentation, a 128^3 patch budget and 32-320 filters for a teacher, "
                        "workers from the cores, --val-patches 100); any option given explicitly wins")
    p.add_argument("--epochs", type=int, help=f"epochs (default {D.epochs})")
    p.add_argument("--iters-per-epoch", dest="iters_per_epoch", type=int,
                   help=f"iterations per epoch (default {D.iters_per_epoch}; nnU-Net uses 250)")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help="patches per iteration, over all processes of a torchrun: each draws its share, so N GPUs see "
                        "the same samples per step as one, N times faster; --lr applies to this global batch "
                        "(default: the plan's)")
    p.add_argument("--batch-per-process", dest="batch_per_process", action="store_true",
                   help="under torchrun, each process draws --batch-size patches itself (N times the global batch)")
    p.add_argument("--patch-size", dest="patch_size", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="training patch (default: plan's)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"],
                   help=f"sgd (Nesterov, momentum {D.momentum}) or adamw (default {D.optimizer})")
    p.add_argument("--lr", type=float, help=f"initial learning rate, poly decay (default {D.lr} for sgd, 1e-3 for adamw)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help=f"weight decay (default {D.weight_decay:g})")
    p.add_argument("--grad-clip", dest="grad_clip", type=float, help=f"gradient-norm clip (default {D.grad_clip:g}; 0: off)")
    p.add_argument("--ema-decay", dest="ema_decay", type=float,
                   help=f"EMA decay of the weights validated and exported (default {D.ema_decay})")
    p.add_argument("--augment", choices=AUGMENT_PRESETS,
                   help=f"data augmentation: none, light (in-plane rotation/scaling, mild intensity) or nnunet "
                   f"(default {D.augment}; thin-slab patches are rotated in-plane only)")
    p.add_argument("--no-augment", dest="no_augment", action="store_true", help="the same as --augment none")
    p.add_argument("--elastic", action="store_true", help="add elastic deformation (slow on CPU)")
    p.add_argument("--foreground-fraction", dest="foreground_fraction", type=fraction,
                   help=f"share of each batch's patches centred on a labelled voxel (default {D.foreground_fraction:.3g})")
    p.add_argument("--workers", type=int, help=f"background data-loading processes (default {D.num_workers})")
    p.add_argument("--val-every", dest="val_every", type=int, help=f"validate every N epochs (default {D.val_every})")
    p.add_argument("--val-patches", dest="val_patches", type=int,
                   help="score each validated epoch on N fixed patches of the validation cases (pseudo-Dice, as "
                        "nnU-Net: seconds instead of minutes on large datasets) and whole cases once at the end "
                        "(run.json: final_case_dice_mean); default 0: whole cases every validated epoch")
    p.add_argument("--val-max-cases", dest="val_max_cases", type=int,
                   help=f"validate on at most N cases (default {D.val_max_cases}: all)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int,
                   help=f"also checkpoint every K iterations (default {D.checkpoint_every}: at epoch ends only)")
    p.add_argument("--resume", action="store_true", help="continue the run in -o from its latest checkpoint")
    p.add_argument("--stop-after-epochs", dest="stop_after_epochs", type=int,
                   help="stop (checkpointed) after N epochs of this invocation; continue later with --resume")
    p.add_argument("--seed", type=int, help=f"random seed (default {D.seed})")
    p.add_argument("--device", help=f"auto, cpu, cuda or mps (default {D.device})")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    p.add_argument("--no-amp", dest="no_amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--amp-dtype", dest="amp_dtype", choices=["auto", "bf16", "fp16"],
                   help="mixed precision on CUDA: auto (default) = bf16 where the GPU computes it, else fp16 with loss "
                        "scaling whose overflowing steps are skipped (log.csv: loss_skipped); KD terms stay fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (opt-in: its first steps compile for minutes, then it runs "
                        "faster on GPUs; the weights and checkpoints are the same; may change on --resume)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: torch's)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")


def run_role(args: argparse.Namespace, role: str) -> int:
    """``recokd train`` (``teacher``) or ``distill`` (``student``): the arguments as a RunSpec, then the run."""
    from ..training.splits import parse_fold
    from ..workflows.runs import RunSpec, run_training

    args.fold = parse_fold(args.fold) if args.fold is not None else None
    return run_training(RunSpec.from_args(args, role))


def run(args: argparse.Namespace) -> int:
    return run_role(args, "teacher")


def add_run_parser(sub: argparse._SubParsersAction, name: str, help: str, description: str,
                   func) -> argparse.ArgumentParser:
    """A ``train`` / ``distill`` sub-command with the options both share; the caller adds its own."""
    p = add_command(sub, name, func, help=help, description=description)
    add_run_arguments(p)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = add_run_parser(sub, "train", help="train a teacher network on a dataset", description=DESCRIPTION, func=run)
    p.add_argument("--plans", help="use this plans.json (and the network.json beside it, the teacher network) instead of planning")
    add_planner_arguments(p)
