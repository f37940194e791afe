"""``recokd distill DATASET --teacher RUN -o RUN2``: train a student with ReCo-KD or a baseline."""

from __future__ import annotations

import argparse

from ..errors import ReCoKDError
from .train import add_run_parser, run_role


DESCRIPTION = (
    "Trains a student (the teacher's topology, channels / R) with labels plus a distillation "
    "method; the teacher comes from a `recokd train` run folder or an nnU-Net v2 results folder "
    "(whose plans then preprocess the data) and stays frozen."
)


def run(args: argparse.Namespace) -> int:
    if not args.resume and not args.teacher:
        raise ReCoKDError("distill needs --teacher RUN (a folder written by `recokd train`, or an nnU-Net v2 results folder)")
    return run_role(args, "student")


def register(sub: argparse._SubParsersAction) -> None:
    from ..kd_methods import KD_METHODS

    p = add_run_parser(sub, "distill", help="distil a trained teacher into a compact student", description=DESCRIPTION, func=run)
    p.add_argument("--teacher", help="teacher: a run folder from `recokd train`, or an nnU-Net v2 results folder "
                   "(<trainer>__<plans>__<configuration>, or the dataset's results folder holding one)")
    p.add_argument("--teacher-folds", "--folds", dest="teacher_folds",
                   help="nnU-Net teacher: folds to ensemble, e.g. 0 or 0,1,2,3,4, 'every' for every numbered fold "
                        "with a checkpoint, or 'all' for fold_all (default: the first numbered fold; every fold of an "
                        "ensemble runs forward at every step: five folds made a step ~3.5x slower)")
    p.add_argument("--teacher-checkpoint", dest="teacher_checkpoint", choices=["final", "best"],
                   help="nnU-Net teacher: checkpoint_final.pth (default) or checkpoint_best.pth")
    p.add_argument("--method", choices=list(KD_METHODS),
                   help="distillation method (default recokd; with --unlabeled or --labeled-cases: none, the teacher's "
                   "labels alone, which ReCo-KD's terms did not improve on; none = no KD terms; defaults justified "
                   "in docs/results.md)")
    p.add_argument("--lambda-max", dest="lambda_max", type=float, help="final KD weight λ (default: the method's)")
    p.add_argument("--temperature", type=float, help="temperature of the attention / softmax terms (default: the term's)")
    p.add_argument("--warmup-fraction", dest="warmup_fraction", type=float,
                   help="share of training over which λ rises from 0 (default 0.6)")
    p.add_argument("--taps", choices=["encoder", "decoder"], help="feature levels (default encoder)")
    p.add_argument("--adapter-lr-scale", dest="adapter_lr_scale", type=float,
                   help="learning rate of the adapters and KD terms relative to the student's (default 1)")
    p.add_argument("--width-factor", dest="width_factor", type=float,
                   help="student channels = teacher's / R, at least 8 (default 4)")
    p.add_argument("--student-spacing-factor", dest="student_spacing_factor", type=int, choices=[1, 2, 4, 8],
                   help="a fast student: it works at this many times the teacher's spacing (its own coarser plan, patch "
                        "and topology; the teacher sees each patch upsampled, its outputs averaged back as soft targets, "
                        "feature taps paired by resolution); predictions are resampled back to the input grid as always "
                        "(default 1)")
    p.add_argument("--unlabeled", nargs="+", metavar="DIR",
                   help="folders of scans without labels (one file per case, or <case>_0000, _0001, ... per channel; or a "
                        "dataset folder, whose labels are not read): the teacher labels them once and they join the training")
    p.add_argument("--labeled-cases", dest="labeled_cases", metavar="FILE",
                   help="keep the labels of these training cases only (one id per line); the split's other training "
                        "cases are used as unlabeled scans, labelled by the teacher")
    p.add_argument("--unlabeled-fraction", dest="unlabeled_fraction", type=float,
                   help="share of training patches drawn from unlabeled scans (default: every case alike)")
    p.add_argument("--teacher-targets", dest="teacher_targets", choices=["hard", "patch", "soft"],
                   help="targets of unlabeled scans: hard (default: the teacher's arg-max of the whole scan, computed once), "
                        "patch (its arg-max of each training patch) or soft (none: only the KD terms learn from them)")
    p.add_argument("--teacher-confidence", dest="teacher_confidence", type=float,
                   help="hard targets: leave out voxels where the teacher's top probability is below this (default 0)")
