"""Runs on real datasets: plan and preprocess, then train a teacher or distil a student into a run
folder (see README, "Training on your data"). Used by ``recokd plan``, ``recokd train`` and
``recokd distill``; works alone or under ``torchrun``.

A run folder holds ``run.json``, ``plans.json``, ``network.json``, ``checkpoint_latest.pt``,
``checkpoint_best.pt``, ``model_best.safetensors`` / ``model_final.safetensors`` (EMA weights),
``log.csv``, ``tensorboard/`` and ``curves.png``.

A cache (``--cache``, :func:`results_root`) holds its own plan (``plans.json``, ``network.json``: what
``recokd plan`` writes), ``plans_<key>/`` for a training given other planner options
(:func:`plans_folder`), and the preprocessed cases of each preprocessing in ``<plans hash>/``; several
processes may share it (locks, atomic writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..data.datasets import DatasetInfo, open_dataset
from ..data.fingerprint import compute_fingerprint
from ..data.loader import AugmentConfig, PatchBatches
from ..data.nnunet_plans import plans_from_nnunet
from ..data.planning import PLANNER_DEFAULTS, Plans, coarser_plans, plan_experiment
from ..data.preprocessing import load_preprocessed, preprocess_dataset
from ..data.validation import require_valid
from ..deployment.registry import sha256_file
from ..distill.distiller import Distiller
from ..errors import ReCoKDError
from ..kd_methods import DEFAULT_METHOD, DEFAULT_METHOD_WITH_TEACHER_LABELS
from ..losses.registry import KD_METHODS, resolve_method
from ..models.nnunet import open_nnunet_model
from ..utils.nnunet_layout import is_nnunet_folder
from ..models.unet import UNetSpec, build_unet, dynunet_tap_names
from ..models.weights import load_weights
from ..utils.io import atomic_write_text, new_folder, read_json, remove_partial_files
from ..utils.labels import IGNORE_LABEL, TEACHER_LABEL
from ..utils.locks import locked_folder, waiting_lock
from ..utils.runtime import configure_cpu, resolve_device, usable_cores
from ..training.loop import (DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase, augment_name,
                             rank_batch_size,
                             check_distill_options, check_training_options)
from ..training.memory import check_training_memory
from ..training.splits import fixed_split, kfold_split, read_case_list
from ..training.unlabeled import TeacherTargets, case_fractions, split_labeled, teacher_targets, unlabeled_records

RUN_VERSION = 1
TEMPERATURE_TERMS = ("msard", "logit_kd", "cwd")


def results_root(dataset_name: str, cache: str | Path | None = None) -> Path:
    """Where plans and preprocessed data of a dataset go: ``cache``, else ``$RECOKD_RESULTS/<name>``,
    else ``./recokd_runs/<name>`` (never inside the dataset folder)."""
    if cache:
        return Path(cache)
    base = os.environ.get("RECOKD_RESULTS")
    return Path(base) / dataset_name if base else Path("recokd_runs") / dataset_name


# --------------------------------------------------------------------------------------------------
# distributed


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_distributed(device: str) -> tuple[torch.device, int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join the process group (env://;
    NCCL on GPUs, gloo on CPUs) and pick this rank's device; otherwise resolve ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world <= 1:
        return resolved, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return resolved, dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------------------------------
# planning


@dataclass
class PlannerOptions:
    """The planner options of ``recokd plan`` / ``train`` (``None``: :data:`PLANNER_DEFAULTS`' value),
    checked when made, so that a bad value is refused before anything is read or written."""

    patch_budget: int | None = None
    max_levels: int | None = None
    base_filters: int | None = None
    max_filters: int | None = None

    def __post_init__(self) -> None:
        for name, least in (("patch_budget", 1), ("max_levels", 3), ("base_filters", 1), ("max_filters", 1)):
            value = getattr(self, name)
            whole = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and (not whole or value < least):
                raise ReCoKDError(f"{_PLANNER_FLAGS[name]} must be {'' if whole else 'a whole number '}>= {least}, "
                                  f"got {value}")
        options = self.effective()
        if options["base_filters"] > options["max_filters"]:
            raise ReCoKDError(f"--base-filters {options['base_filters']} exceeds --max-filters "
                              f"{options['max_filters']}; give a --max-filters at least as large")

    def kwargs(self) -> dict[str, int]:
        """The options given, under :func:`~ReCoKDLib.data.planning.plan_experiment`'s names."""
        names = {"patch_budget": "patch_budget_voxels", "max_levels": "max_levels", "base_filters": "base_filters",
                 "max_filters": "max_filters"}
        return {names[k]: v for k, v in self.__dict__.items() if v is not None}

    def effective(self) -> dict[str, int]:
        """Every option, the defaults filled in: what the plan is made with (and records in ``planner``)."""
        return {**PLANNER_DEFAULTS, **self.kwargs()}

    def key(self) -> str:
        """A short hash of :meth:`effective`: the cache folder ``plans_<key>`` of a plan made with these options."""
        canonical = json.dumps(self.effective(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]

    def made(self, plans_path: Path) -> bool:
        """Whether the plan in ``plans_path`` exists and was made with these options (its ``planner`` record)."""
        try:
            recorded = read_json(plans_path, "plans file").get("planner") or {}
        except ReCoKDError:
            return False
        return isinstance(recorded, dict) and {k: recorded.get(k) for k in PLANNER_DEFAULTS} == self.effective()


_PLANNER_FLAGS = {"patch_budget": "--patch-budget", "max_levels": "--max-levels", "base_filters": "--base-filters",
                  "max_filters": "--max-filters"}
#: the lock of a cache folder's planning (``<folder>/.plans.lock``)
PLANS_LOCK = ".plans.lock"


def plans_folder(root: Path, planner: PlannerOptions, replan: bool = False) -> Path:
    """The folder of a cache ``root`` holding the plan (``plans.json``, ``network.json``) for ``planner``.

    ``root`` itself holds the cache's own plan: the one ``recokd plan`` writes (``replan``), and the one a
    ``recokd train`` without planner options uses, whatever it was planned with (caches written before
    keyed plans stay readable). A training given planner options uses ``root``'s plan only when it was made
    with exactly those options, else ``root/plans_<key>`` (:meth:`PlannerOptions.key`): trainings sharing a
    ``--cache`` with different planner options each get their own plan and network.
    """
    if replan or not planner.kwargs() or planner.made(root / "plans.json"):
        return root
    return root / f"plans_{planner.key()}"


def _tell(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare_plans(
    dataset: DatasetInfo,
    cache: str | Path | None = None,
    planner: PlannerOptions | None = None,
    replan: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    preprocess: bool = True,
) -> tuple[Plans, UNetSpec, Path, Path]:
    """Validate, fingerprint, plan and preprocess ``dataset`` (rank 0; the others wait and read).

    The plan goes to :func:`plans_folder` (``<root>/plans.json`` and ``network.json``, the planned
    teacher, or ``<root>/plans_<key>/`` for other planner options) and is reused when present unless
    ``replan``; ``preprocess=False`` only plans. Each plan folder is planned under its lock
    (:data:`PLANS_LOCK`), so a second process given the same options waits and reuses the first one's
    plan; every file is written atomically. The preprocessed cases go to ``<root>/<plans hash>/`` (locked
    by :func:`~ReCoKDLib.data.preprocessing.preprocess_dataset`).
    Returns (plans, teacher network, results root, folder of the preprocessed cases).
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ReCoKDError(f"--workers must be >= 0, got {num_workers}")
    root = results_root(dataset.name, cache)
    check_cache_folder(root)
    planner = planner or PlannerOptions()
    if _is_main():
        folder = plans_folder(root, planner, replan)
        found = None
        while found is None:
            plans_path = folder / "plans.json"
            # a training given options reads the cache's own plan but never re-plans it (recokd plan's to write)
            borrowed = folder == root and bool(planner.kwargs()) and not replan
            with new_folder(folder):  # a dataset that fails validation or planning leaves no cache folder
                with waiting_lock(folder / PLANS_LOCK, f"the planning in {folder}", on_wait=_tell):
                    if borrowed and not planner.made(plans_path):  # re-planned meanwhile with other options
                        folder = root / f"plans_{planner.key()}"
                        continue
                    own = folder == root and not planner.kwargs()  # the cache's plan, whatever its options
                    reuse = plans_path.is_file() and (own or planner.made(plans_path))
                    if replan or not reuse:
                        require_valid(dataset, check_test=False, progress=progress)
                        fingerprint = compute_fingerprint(dataset, progress=progress)
                        plans, network = plan_experiment(fingerprint, **planner.kwargs())
                        fingerprint.save(folder / "fingerprint.json")
                        # the network first: a plans.json (what is looked for) always has its network.json beside it
                        atomic_write_text(folder / "network.json", network.to_json() + "\n")
                        plans.save(plans_path)
                    plans = Plans.load(plans_path)
                    found = plans, planned_network(plans_path, plans)
        if preprocess:
            preprocess_dataset(dataset, found[0], root, num_workers=num_workers, progress=progress)
    _barrier()
    if not _is_main():  # the plan rank 0 settled on is where plans_folder now points
        plans_path = plans_folder(root, planner, replan) / "plans.json"
        plans = Plans.load(plans_path)
        found = plans, planned_network(plans_path, plans)
    plans, network = found
    return plans, network, root, root / plans.plans_hash()


def planned_network(plans_path: str | Path, plans: Plans) -> UNetSpec:
    """The teacher network planned with ``plans_path``: the ``network.json`` beside it (or, for a plan
    written before that file existed, the plan's own ``network`` entry), checked against the plan."""
    plans_path = Path(plans_path)
    network_path = plans_path.parent / "network.json"
    if network_path.is_file():
        spec = UNetSpec.from_dict(_read_json(network_path, "network description"))
    else:
        legacy = _read_json(plans_path, "plans file").get("network")
        if not isinstance(legacy, dict):
            raise ReCoKDError(f"{plans_path} has no network.json beside it; plan the experiment again (recokd plan)")
        spec = UNetSpec.from_dict(legacy)
    plans.check_network(spec, str(network_path))
    return spec


def plan_summary(dataset: DatasetInfo, plans: Plans, spec: UNetSpec, folder: Path) -> str:
    lines = [
        f"dataset      {dataset.name} ({len(dataset.training)} training cases, {dataset.num_channels} channel(s), "
        f"{plans.num_classes - 1} foreground class(es): {', '.join(dataset.labels.foreground_names)})",
        f"spacing      {[round(s, 3) for s in plans.target_spacing]} mm (target)",
        f"median shape {list(plans.median_shape)} voxels after resampling",
        f"patch        {list(plans.patch_size)}, batch {plans.batch_size}",
        f"network      {spec.num_levels} levels, filters {list(spec.filters)}, strides {[list(s) for s in spec.strides]}",
        f"normalise    {', '.join(n.scheme for n in plans.normalisation)}",
        f"cache        {folder}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# training


def _check_patch(patch: tuple[int, ...], spec: UNetSpec) -> None:
    bad = [p for p, d in zip(patch, spec.divisor) if p % d]
    if len(patch) != 3 or bad:
        raise ReCoKDError(f"patch size {list(patch)} must be 3 multiples of the network's total stride {list(spec.divisor)}")


#: the command-line names of RunConfig's fields (``recokd train/distill --NAME``); ``no_*`` flags negate
_CLI_TO_CONFIG = {"epochs": "epochs", "iters_per_epoch": "iters_per_epoch", "batch_size": "batch_size",
                  "patch_size": "patch_size", "optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay",
                  "grad_clip": "grad_clip", "ema_decay": "ema_decay", "elastic": "elastic", "workers": "num_workers",
                  "val_every": "val_every", "val_max_cases": "val_max_cases", "checkpoint_every": "checkpoint_every",
                  "seed": "seed", "device": "device", "deterministic": "deterministic", "threads": "num_threads",
                  "batch_per_process": "batch_per_process", "val_patches": "val_patches", "amp_dtype": "amp_dtype",
                  "augment": "augment", "foreground_fraction": "foreground_fraction",
                  "adapter_lr_scale": "adapter_lr_scale", "unlabeled_fraction": "unlabeled_fraction",
                  "teacher_targets": "teacher_targets", "teacher_confidence": "teacher_confidence",
                  "compile": "compile"}  # from adapter_lr_scale: distill only
_CLI_NEGATED = {"no_amp": "amp"}


def gpu_preset(cores: int | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """``--preset gpu``: (training options, teacher planner options) for a research group's GPU, where an
    option given on the command line wins. nnU-Net v2's 3d_fullres schedule (1000 epochs of 250 iterations,
    its augmentation, a 128³-voxel patch budget and 32-320 filters), workers from the machine's cores (one left
    free, at most 12), and validation on 100 fixed patches per epoch with whole cases at the end. Not yet
    timed on a GPU: ``scripts/gpu_check.sh`` measures seconds per iteration (nnU-Net's own epochs of this shape
    take about 100 s on a recent data-centre GPU, the figure the issue compares with)."""
    # the workers are per process: under torchrun the machine's cores are shared by its processes
    cores = (cores or usable_cores()) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)  # (a job's share)
    training = {"epochs": 1000, "iters_per_epoch": 250, "augment": "nnunet", "num_workers": max(2, min(12, cores - 1)),
                "val_patches": 100, "val_every": 1}
    planner = {"patch_budget": 128 ** 3, "base_filters": 32, "max_filters": 320}
    return training, planner
#: store_true flags that are RunConfig fields of the same name (given: True; else the field's default)
_CLI_FLAGS = ("elastic", "deterministic", "batch_per_process", "compile")
#: what a resumed run may change (applied and recorded); everything else comes from its run.json, and
#: giving it another value with --resume is refused (the weights would no longer be one run's)
RESUMABLE_OPTIONS = ("device", "num_workers", "num_threads", "compile")
#: student channels = teacher's / R (``--width-factor``)
DEFAULT_WIDTH_FACTOR = 4.0
_CONFIG_TO_FLAG = {**{name: "--" + cli.replace("_", "-") for cli, name in _CLI_TO_CONFIG.items()},
                   **{name: "--" + cli.replace("_", "-") for cli, name in _CLI_NEGATED.items()}}


@dataclass
class RunSpec:
    """One ``recokd train`` (role ``teacher``) or ``recokd distill`` (role ``student``) run, typed.

    Built from the command line (:meth:`from_args`); a resumed run takes its identity, plan, schedule
    and distillation settings from its own ``run.json`` (:meth:`resumed_from`). :func:`run_training`
    reads nothing else. ``training`` holds the :class:`~ReCoKDLib.training.loop.RunConfig` fields given
    explicitly; :meth:`config` fills the rest from RunConfig's defaults (the one place they live) and
    the plan (patch and batch size).
    """

    role: str
    dataset: str
    output: str
    cache: str | None = None
    fold: int | str = 0
    val_cases_file: str | None = None
    plans_file: str | None = None  # teacher: a plans.json instead of planning
    planner: PlannerOptions = field(default_factory=PlannerOptions)  # teacher: planner options
    teacher: str | None = None  # student: the teacher's run folder, or an nnU-Net v2 results folder
    teacher_folds: str | None = None  # nnU-Net teacher: "0", "0,1,2" or "all" (fold_all); None: every numbered fold
    teacher_checkpoint: str | None = None  # nnU-Net teacher: "final" (default) or "best"
    method: str = "none"
    taps: str = "encoder"
    width_factor: float | None = None
    lambda_max: float | None = None
    temperature: float | None = None
    warmup_fraction: float = 0.6
    unlabeled: tuple[str, ...] = ()  # student: folders of unlabelled scans the teacher labels
    labeled_cases_file: str | None = None  # student: only these training cases keep their labels
    student_spacing_factor: int = 1  # student: works at this many times the teacher's spacing (a fast student)
    training: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    stop_after_epochs: int | None = None
    progress: bool = True
    given: frozenset[str] = frozenset()  # the run-identity fields set on the command line (checked on resume)

    def __post_init__(self) -> None:
        """Refuse a numeric option that would give an untrained, non-finite or impossible run before
        anything is read or written (no run folder is made): the Python API and the command line alike."""
        check_training_options(self.training)
        check_distill_options(self.width_factor, self.lambda_max, self.temperature, self.warmup_fraction)
        stop = self.stop_after_epochs
        if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool) or stop < 1):
            raise ReCoKDError(f"--stop-after-epochs must be >= 1, got {stop}")

    @classmethod
    def from_args(cls, args: Any, role: str) -> "RunSpec":
        """From the parsed ``recokd train`` / ``distill`` arguments."""
        training = {name: getattr(args, cli) for cli, name in _CLI_TO_CONFIG.items() if getattr(args, cli, None) is not None}
        training.update({name: not getattr(args, cli) for cli, name in _CLI_NEGATED.items() if getattr(args, cli, False)})
        for flag in _CLI_FLAGS:  # store_true flags: only when given
            if not getattr(args, flag, False):
                training.pop(flag, None)
        if getattr(args, "no_augment", False):  # --no-augment: --augment none
            if training.get("augment", "none") != "none":
                raise ReCoKDError("give --augment or --no-augment, not both")
            training["augment"] = "none"
        identity = {"fold": args.fold, "val_cases_file": args.val_cases}
        if role == "student":
            identity.update(teacher=args.teacher, method=args.method, taps=args.taps, width_factor=args.width_factor,
                            lambda_max=args.lambda_max, temperature=args.temperature,
                            warmup_fraction=args.warmup_fraction, teacher_folds=args.teacher_folds,
                            teacher_checkpoint=args.teacher_checkpoint,
                            unlabeled=tuple(args.unlabeled) if args.unlabeled else None,
                            labeled_cases_file=args.labeled_cases,
                            student_spacing_factor=getattr(args, "student_spacing_factor", None))
        if getattr(args, "preset", "cpu") == "gpu":  # its values where the command line gave none
            preset_training, preset_planner = gpu_preset()
            training = {**preset_training, **training}
            for name, value in preset_planner.items():
                if getattr(args, name, None) is None:
                    setattr(args, name, value)
        given = {k: v for k, v in identity.items() if v is not None}
        spec = cls(role=role, dataset=args.dataset, output=args.output, cache=args.cache, training=training,
                   resume=args.resume, stop_after_epochs=args.stop_after_epochs, progress=not args.no_progress,
                   given=frozenset(given), **given)
        if role == "teacher":
            spec.plans_file = args.plans
            spec.planner = PlannerOptions(args.patch_budget, args.max_levels, args.base_filters, args.max_filters)
        else:  # the student's defaults, for what was not given
            teacher_labelled = bool(given.get("unlabeled") or given.get("labeled_cases_file"))
            spec.method = given.get("method", DEFAULT_METHOD_WITH_TEACHER_LABELS if teacher_labelled else DEFAULT_METHOD)
            if teacher_labelled and "method" not in given and not args.resume:
                _tell(f"method: {spec.method} (the default with teacher-labelled scans: ReCo-KD's feature terms added "
                      "nothing measurable on top of the teacher's labels, for 1.5-3x the time; docs/results.md); "
                      "--method recokd adds them")
            spec.width_factor = given.get("width_factor", DEFAULT_WIDTH_FACTOR)
        return spec

    def resumed_from(self, saved: dict[str, Any]) -> "RunSpec":
        """This invocation continuing the run described by ``saved`` (its ``run.json``): the run's own
        settings, plus what may change on resume (:data:`RESUMABLE_OPTIONS`, ``--stop-after-epochs``).

        Raises:
            ReCoKDError: an option given now differs from the run's; the line lists each (flag, value
                given, value of the run).
        """
        kd = saved.get("kd_options") or {}
        changed = self._changes_from(saved)
        if changed:
            raise ReCoKDError(f"{self.output} was started with other settings ({'; '.join(changed)}); resume with the "
                              f"run's values (or without these options), or start a new run in another -o folder. "
                              f"Only {', '.join(_CONFIG_TO_FLAG[o] for o in RESUMABLE_OPTIONS)} may change on resume")
        val_file = self.val_cases_file or saved.get("val_cases_file")  # a given list was checked equal above
        if val_file and not Path(val_file).is_file():  # a run moved without naming its list again
            raise ReCoKDError(f"{self.output} was started with --val-cases {val_file}, which does not exist here; "
                              f"resume with --val-cases naming a list of the same cases")
        teacher = self.teacher if "teacher" in self.given else saved.get("teacher_run")
        if self.role == "student" and teacher and not Path(teacher).exists():  # moved without naming it again
            raise ReCoKDError(f"{self.output} was distilled from the teacher {teacher}, which does not exist here; "
                              f"resume with --teacher naming the same teacher")
        resumable = {k: v for k, v in self.training.items() if k in RESUMABLE_OPTIONS}
        resumable.setdefault("device", "auto")  # the device is this invocation's, never the saved one's
        resumable.setdefault("compile", False)  # so is compiling (a flag: absent means off)
        # a teacher continues with the plan and network it started with: its own plans.json and network.json
        own_plans = str(Path(self.output) / "plans.json") if self.role == "teacher" else self.plans_file
        return replace(
            self, plans_file=own_plans, planner=PlannerOptions(),
            fold=saved["fold"], val_cases_file=val_file,
            teacher=teacher, method=saved.get("method") or "none", taps=saved.get("taps") or "encoder",
            width_factor=saved.get("width_factor"), lambda_max=saved.get("lambda_max"),
            temperature=kd.get("temperature"), warmup_fraction=kd.get("warmup_fraction", 0.6),
            teacher_folds=saved.get("teacher_folds"), teacher_checkpoint=saved.get("teacher_checkpoint"),
            unlabeled=tuple(saved.get("unlabeled") or ()), labeled_cases_file=saved.get("labeled_cases_file"),
            student_spacing_factor=int(saved.get("student_spacing_factor") or 1),
            # a run saved before global batches existed drew --batch-size in every process: it keeps doing so
            training={"batch_per_process": True, "amp_dtype": "fp16", **saved["config"], **resumable},
        )

    def _changes_from(self, saved: dict[str, Any]) -> list[str]:
        """``--flag given (run: saved)`` for every option given now that differs from the saved run."""
        def same(a: Any, b: Any) -> bool:
            norm = (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
            return norm(a) == norm(b)

        kd = saved.get("kd_options") or {}
        saved_identity = {
            "fold": saved.get("fold"), "val_cases_file": saved.get("val_cases_file"),
            "teacher": saved.get("teacher_run"), "method": saved.get("method"), "taps": saved.get("taps"),
            "width_factor": saved.get("width_factor"), "lambda_max": saved.get("lambda_max"),
            "temperature": kd.get("temperature"), "warmup_fraction": kd.get("warmup_fraction"),
            "teacher_folds": saved.get("teacher_folds"), "teacher_checkpoint": saved.get("teacher_checkpoint"),
            "unlabeled": saved.get("unlabeled") or [], "labeled_cases_file": saved.get("labeled_cases_file"),
            "student_spacing_factor": saved.get("student_spacing_factor") or 1,
        }
        flags = {"val_cases_file": "--val-cases", "width_factor": "--width-factor", "lambda_max": "--lambda-max",
                 "student_spacing_factor": "--student-spacing-factor",
                 "warmup_fraction": "--warmup-fraction", "teacher_folds": "--teacher-folds",
                 "teacher_checkpoint": "--teacher-checkpoint", "labeled_cases_file": "--labeled-cases"}
        changed = []
        for name in sorted(self.given):
            mine, theirs = getattr(self, name), saved_identity.get(name)
            if name == "val_cases_file" and mine and Path(mine).is_file() \
                    and sorted(read_case_list(mine)) == sorted(saved.get("val_cases") or []):
                continue  # the run's cases from a list elsewhere: a copied or moved run with its split file
            if name == "unlabeled":
                mine = [str(Path(m).resolve()) for m in mine]
            if name == "labeled_cases_file" and mine and Path(mine).is_file() \
                    and sorted(read_case_list(mine)) == sorted(saved.get("labeled_cases") or []):
                continue  # the same labelled cases, from a list elsewhere
            if name in ("teacher", "val_cases_file") and mine is not None and theirs is not None:
                if name == "teacher" and not (Path(mine) / "run.json").is_file() and is_nnunet_folder(mine):
                    mine = _nnunet_model_folder(mine)  # a dataset's results folder names its one model
                mine, theirs = str(Path(mine).resolve()), str(Path(theirs).resolve())
                if name == "teacher" and mine != theirs and saved.get("teacher_sha256"):
                    continue  # a moved teacher: _run compares its weights with the recorded checksum
            if not same(mine, theirs):
                changed.append(f"{flags.get(name, '--' + name)} {mine} (run: {theirs})")
        if self.role == "teacher":
            changed += self._plan_changes(saved)
        config = saved.get("config") or {}
        for name, value in sorted(self.training.items()):
            saved_value = augment_name(config[name]) if name == "augment" and name in config else config.get(name)
            if name not in RESUMABLE_OPTIONS and name in config and not same(value, saved_value):
                flag = _CONFIG_TO_FLAG.get(name, name)
                shown = "" if flag.startswith("--no-") or isinstance(value, bool) else f" {value}"
                changed.append(f"{flag}{shown} (run: {saved_value})")
        return changed

    def _plan_changes(self, saved: dict[str, Any]) -> list[str]:
        """A resumed teacher's planner options or ``--plans`` that would plan another network or preprocessing
        (compared with the options ``run.json`` records, else those of the run's own ``plans.json``)."""
        own = Path(self.output) / "plans.json"
        if not own.is_file():
            return []
        recorded = saved.get("planner") or _read_json(own, "plans file").get("planner") or {}
        flags = {"patch_budget_voxels": "--patch-budget", "max_levels": "--max-levels", "base_filters": "--base-filters",
                 "max_filters": "--max-filters"}
        changed = [f"{flags[k]} {v} (run: {recorded.get(k)})" for k, v in self.planner.kwargs().items()
                   if recorded.get(k) != v]
        if self.plans_file and Path(self.plans_file).resolve() != own.resolve():
            given, mine = Plans.load(self.plans_file), Plans.load(own)
            if (given.plans_hash() != mine.plans_hash()
                    or planned_network(self.plans_file, given) != planned_network(own, mine)):
                changed.append(f"--plans {self.plans_file} (run: another plan or network)")
        return changed

    def config(self, plans: Plans) -> RunConfig:
        """The run's :class:`RunConfig`: the explicit options, else the plan's patch and batch size and the
        optimiser's learning rate (0.01 for SGD, 1e-3 for AdamW), else RunConfig's defaults."""
        given = dict(self.training)
        given.setdefault("patch_size", tuple(plans.patch_size))
        given.setdefault("batch_size", plans.batch_size)
        if "lr" not in given:
            given["lr"] = 1e-3 if given.get("optimizer") == "adamw" else RunConfig.lr
        return RunConfig.from_dict(given)


def _nnunet_model_folder(path: str | Path) -> Path:
    try:
        return open_nnunet_model(path).folder
    except ReCoKDError:
        return Path(path)


#: what one more fold of an nnU-Net teacher costs a distillation step (issue 33: five folds, ~3.5x slower)
ENSEMBLE_COST = "every fold runs forward at every step: five folds made a step ~3.5x slower"


def _parse_folds(text: str | None) -> list[str] | None:
    """``--teacher-folds``: ``"0"``, ``"0,1,2"``, ``"all"`` (nnU-Net's fold_all) or ``"every"``; ``None`` (as
    ``"every"``): every numbered fold."""
    if text is None or str(text).strip() == "every":
        return None
    folds = [f.strip() for f in str(text).split(",") if f.strip()]
    if not folds or any(not (f.isdigit() or f == "all") for f in folds):
        raise ReCoKDError(f"--teacher-folds takes fold numbers separated by commas, or 'all' (nnU-Net's fold_all), got {text!r}")
    return folds


def _check_teacher_data(dataset: DatasetInfo, plans: Plans, teacher: Path) -> None:
    """The distillation data must be labelled and imaged as the nnU-Net teacher's were."""
    if dataset.num_channels != plans.num_channels:
        raise ReCoKDError(f"dataset '{dataset.name}' has {dataset.num_channels} channel(s) but the nnU-Net teacher {teacher} "
                          f"takes {plans.num_channels} ({', '.join(plans.channel_names.values())}); distil on data "
                          "acquired as the teacher's")
    if dict(dataset.labels) != dict(plans.labels):
        raise ReCoKDError(f"dataset '{dataset.name}' labels {dict(dataset.labels)} differ from the nnU-Net teacher's "
                          f"dataset.json {dict(plans.labels)} ({teacher}); relabel the data to the teacher's values")


def _teacher_sha256(teacher_run: Path, nnunet_teacher: Any) -> str:
    """sha256 (hex) of the weights a student distils from: a ``recokd train`` run's model_best.safetensors,
    or an nnU-Net model's checkpoints in use (fold by fold)."""
    if nnunet_teacher is None:
        return sha256_file(teacher_run / "model_best.safetensors")
    h = hashlib.sha256()
    for fold, path in sorted(nnunet_teacher.checkpoints.items()):
        h.update(f"{fold}:{sha256_file(path)};".encode())
    return h.hexdigest()


#: files that mark a folder as something a run or a cache must never write into
_FOREIGN_MARKERS = {"bundle.json": "a model bundle", "dataset.json": "a dataset"}


def _unlabelled_targets(config: RunConfig, targets: TeacherTargets | None, case: Any, case_id: str) -> np.ndarray:
    """The training target of an unlabelled scan for ``--teacher-targets`` and ``--teacher-confidence``."""
    shape = case.image.shape[1:]  # uint8: the special values 254 and 255 fit, in an eighth of int64's memory
    if config.teacher_targets == "patch":
        return np.full(shape, TEACHER_LABEL, np.uint8)
    if config.teacher_targets == "soft":
        return np.full(shape, IGNORE_LABEL, np.uint8)
    label = targets.labels[case_id].astype(np.uint8)
    if config.teacher_confidence > 0:
        label = np.where(targets.confidence[case_id] < round(255 * config.teacher_confidence), IGNORE_LABEL, label)
    return label


def _teacher_labelled_cases(run_spec: RunSpec, dataset: DatasetInfo, plans: Plans, root: Path, train_ids: list[str],
                            cases: dict, teacher: torch.nn.Module, teacher_sha256: str, device: torch.device,
                            progress: bool, label_less: list[str], teacher_targets_mode: str = "hard"
                            ) -> tuple[list[str], list[str], TeacherTargets | None]:
    """A student's (labelled training ids, unlabelled ids, the teacher's labels of the unlabelled): the scans
    of ``--unlabeled`` (checked, preprocessed with the teacher's plan), the training cases ``--labeled-cases``
    leaves out and those ``dataset.json`` lists without a label; ``cases`` gains the unlabelled ones. The
    teacher labels each once (cached by its weights)."""
    train_ids, hidden = split_labeled(train_ids, run_spec.labeled_cases_file)
    records = unlabeled_records(run_spec.unlabeled, dataset, progress=progress) if run_spec.unlabeled else []
    if records:
        if _is_main():
            preprocess_dataset(dataset, plans, root, progress=progress, cases=records)
        _barrier()
    unlabeled_ids = hidden + list(label_less) + [r.case_id for r in records]
    if not unlabeled_ids:
        return train_ids, [], None
    if teacher_targets_mode != "hard":  # nothing to label ahead: the step's teacher forward, or no target
        for i in unlabeled_ids:
            if i not in cases:
                cases[i] = load_preprocessed(root, plans, i)
        return train_ids, unlabeled_ids, None
    for i in unlabeled_ids:
        if i not in cases:
            cases[i] = load_preprocessed(root, plans, i)
    folder = Path(root) / f"teacher-labels-{plans.plans_hash()[:12]}-{teacher_sha256[:12]}"
    unlabelled = [cases[i] for i in unlabeled_ids]
    if _is_main():
        teacher.to(device)
        teacher_targets(teacher, unlabelled, plans.patch_size, folder, device=device, progress=progress)
    _barrier()
    targets = teacher_targets(teacher, unlabelled, plans.patch_size, folder, device=device, progress=False)
    if _is_main():
        _tell(f"{len(unlabeled_ids)} unlabeled case(s) labelled by the teacher (cached in {folder}); "
              f"{len(train_ids)} labelled training case(s)")
    return train_ids, unlabeled_ids, targets


def check_run_folder(output: str | Path, cache: str | Path | None = None) -> None:
    """The overwrite rule (:mod:`ReCoKDLib.utils.outputs`) for a run folder: ``-o`` is new, empty, or holds
    a run (``run.json``: resumed, or refused without ``--resume`` further on); a folder of other files (a
    bundle, a dataset, the cache, ``docs/``) is refused before anything is written. ``--cache`` is checked
    by :func:`check_cache_folder`."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ReCoKDError(f"-o {out} is a file; give a folder for the run")
    if cache is not None and out.resolve() == Path(cache).resolve():
        raise ReCoKDError(f"-o {out} is also the --cache folder; give the run a folder of its own")
    if out.is_dir() and not (out / "run.json").is_file():
        names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if names:
            raise ReCoKDError(f"-o {out} holds other files ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), "
                              "not a run; choose a new or empty folder")
    if cache is not None:
        check_cache_folder(cache)


def check_cache_folder(cache: str | Path) -> None:
    """A ``--cache`` folder holds plans and preprocessed cases only: a run folder, a bundle or a dataset
    given as ``--cache`` is refused before its files are replaced by a plan."""
    root = Path(cache)
    if root.exists() and not root.is_dir():
        raise ReCoKDError(f"--cache {root} is a file; give a folder for the plans and preprocessed cases")
    if not root.is_dir():
        return
    if (root / "run.json").is_file():
        raise ReCoKDError(f"--cache {root} is a run folder; give the cache a folder of its own")
    for marker, what in _FOREIGN_MARKERS.items():
        if (root / marker).is_file():
            raise ReCoKDError(f"--cache {root} holds {what} ({marker}); give the cache a folder of its own")


def _read_json(path: Path, what: str) -> dict:
    return read_json(path, what, hint="is this a finished run folder?")


def run_training(run_spec: RunSpec) -> int:
    """``recokd train`` (role ``teacher``) and ``recokd distill`` (role ``student``) of one :class:`RunSpec`."""
    check_run_folder(run_spec.output, run_spec.cache)
    device, rank, world = init_distributed(run_spec.training.get("device", "auto"))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if rank != 0:
            return _run(run_spec, device, rank, world)
        with locked_folder(run_spec.output):  # one process per run folder (the others are refused, naming it)
            return _run(run_spec, device, rank, world)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(run_spec: RunSpec, device: torch.device, rank: int, world: int) -> int:
    out, role, progress = Path(run_spec.output), run_spec.role, run_spec.progress
    if rank == 0:
        remove_partial_files(out)  # left by a kill during a checkpoint write; this process holds the folder
    saved = _read_json(out / "run.json", "run file") if run_spec.resume and (out / "run.json").is_file() else None
    # a run's weights (its checkpoints may have been deleted to save space) are never replaced unasked
    if not run_spec.resume and ((out / "checkpoint_latest.pt").is_file() or any(out.glob("model_*.safetensors"))):
        raise ReCoKDError(f"{out} already holds a run; add --resume to continue it or choose another -o folder")
    if saved is not None and saved.get("role") != role:
        raise ReCoKDError(f"{out} holds a {saved.get('role')} run; resume it with the matching command")
    if saved is not None:
        run_spec = run_spec.resumed_from(saved)

    dataset = open_dataset(run_spec.dataset)
    teacher_run = nnunet_teacher = None
    if role == "student":
        teacher_run = Path(run_spec.teacher)
        if not (teacher_run / "run.json").is_file() and is_nnunet_folder(teacher_run):
            # an nnU-Net v2 model: its own plans preprocess the data, its topology is the student's template
            nnunet_teacher = open_nnunet_model(teacher_run, _parse_folds(run_spec.teacher_folds),
                                               run_spec.teacher_checkpoint or "final")
            found = list(nnunet_teacher.checkpoints)
            if run_spec.teacher_folds is None and len(found) > 1:
                # one fold by default: the ensemble's cost is every step's, its gain only the targets'
                _tell(f"nnU-Net teacher: fold {found[0]} of folds {', '.join(found)} (one fold by default; "
                     f"{ENSEMBLE_COST}; --teacher-folds every distils from their ensemble)")
                nnunet_teacher = open_nnunet_model(teacher_run, found[:1], run_spec.teacher_checkpoint or "final")
            teacher_run = nnunet_teacher.folder
            plans, teacher_spec = plans_from_nnunet(nnunet_teacher), nnunet_teacher.unet_spec()
            _check_teacher_data(dataset, plans, teacher_run)
            nnunet_network = nnunet_teacher.teacher()  # every checkpoint read before anything is written
        else:
            if teacher_run.is_dir() and not (teacher_run / "run.json").is_file():
                raise ReCoKDError(f"{teacher_run} is neither a `recokd train` run (no run.json) nor an nnU-Net v2 results "
                                  "folder (no plans.json and dataset.json, nor a <trainer>__<plans>__<configuration> "
                                  "folder); pass one of them")
            if run_spec.teacher_folds is not None or run_spec.teacher_checkpoint is not None:
                raise ReCoKDError("--teacher-folds and --teacher-checkpoint are for nnU-Net teachers; "
                                  f"{teacher_run} is not an nnU-Net results folder")
            teacher_info = _read_json(teacher_run / "run.json", "teacher run file")
            if teacher_info.get("role") != "teacher":
                raise ReCoKDError(f"{teacher_run} is not a teacher run (role {teacher_info.get('role')!r}); "
                                  "pass a `recokd train` run or an nnU-Net v2 results folder")
            plans = Plans.load(teacher_run / "plans.json")
            teacher_spec = UNetSpec.from_json((teacher_run / "network.json").read_text())
        root = results_root(dataset.name, run_spec.cache)
        student_topology, teacher_scale = teacher_spec, (1, 1, 1)
        if run_spec.student_spacing_factor != 1:  # a fast student: its own, coarser plan and topology
            if run_spec.unlabeled or run_spec.labeled_cases_file:
                raise ReCoKDError("--student-spacing-factor does not combine with --unlabeled or --labeled-cases yet "
                                  "(the teacher's labels of unlabeled scans are made on the teacher's grid)")
            plans, student_topology, teacher_scale = coarser_plans(plans, teacher_spec, run_spec.student_spacing_factor)
        if _is_main():
            preprocess_dataset(dataset, plans, root, progress=progress)
        _barrier()
    else:
        if run_spec.plans_file:
            plans = Plans.load(run_spec.plans_file)
            teacher_spec = planned_network(run_spec.plans_file, plans)
            root = results_root(dataset.name, run_spec.cache)
            if _is_main():
                preprocess_dataset(dataset, plans, root, progress=progress)
            _barrier()
        else:
            plans, teacher_spec, root, _ = prepare_plans(dataset, run_spec.cache, run_spec.planner, progress=progress)
    if dataset.num_channels != plans.num_channels or dataset.labels != plans.labels:
        raise ReCoKDError(f"the plan (labels {plans.labels}) does not fit dataset '{dataset.name}' (labels {dataset.labels})")

    config = run_spec.config(plans)
    fold = run_spec.fold
    configure_cpu(config.num_threads)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":  # fixed patch shapes: let cuDNN pick its fastest convolution once
        torch.backends.cudnn.benchmark = True
    scale = teacher_scale if role == "student" else (1, 1, 1)
    _check_patch(tuple(p * s for p, s in zip(config.patch_size, scale)), teacher_spec)
    topology = student_topology if role == "student" else teacher_spec
    _check_patch(config.patch_size, topology)
    # before the cases are loaded and the run folder written: a patch too large gets the process killed later
    trained_spec = teacher_spec if role == "teacher" else topology.student(float(run_spec.width_factor))
    per_rank = rank_batch_size(config.batch_size, world, rank, config.batch_per_process)
    check_training_memory(trained_spec, config.patch_size, per_rank, device,
                          teacher=teacher_spec if role == "student" else None, teacher_scale=scale,
                          half_precision=bool(config.amp and device.type == "cuda"),
                          processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), what=f"the {role}")

    # training cases dataset.json lists without a label: a student's unlabelled scans (the teacher labels them)
    label_less = [r.case_id for r in dataset.training if r.label_file is None]
    if label_less and role == "teacher":
        raise ReCoKDError(f"training case {label_less[0]!r} of {dataset.root} has no label ({len(label_less)} such); a "
                          "teacher trains on labelled cases only: add their labels, or use them as unlabelled scans "
                          "of a student (recokd distill)")
    ids = [r.case_id for r in dataset.training if r.label_file is not None]
    val_file = run_spec.val_cases_file
    train_ids, val_ids = fixed_split(ids, val_file) if val_file else kfold_split(ids, fold, config.seed)

    cases = {i: load_preprocessed(root, plans, i) for i in train_ids}
    missing = [i for i, c in cases.items() if c.label is None]
    if missing:
        raise ReCoKDError(f"training case {missing[0]!r} has no label; every training case needs one")
    val_cases = []
    # whole-case validation is spread over the processes (EpochTrainer.validate_cases): rank 0 holds every
    # validation case (it also draws the validation patches), the others only their share of the scored ones
    scored = val_ids[: config.val_max_cases] if config.val_max_cases else val_ids
    for i in (val_ids if rank == 0 else scored[rank::world]):
        c = cases.get(i) or load_preprocessed(root, plans, i)
        # validated whole every epoch: copied out of the memory-mapped cache once
        val_cases.append(ValCase(i, torch.from_numpy(np.array(c.image)), torch.from_numpy(c.label.astype(np.int64))))

    torch.manual_seed(config.seed)
    num_classes = plans.num_classes
    width_factor = lambda_max = teacher_sha256 = None
    method, taps = "none", "encoder"
    if role == "teacher":
        spec = teacher_spec
        network = build_unet(spec)
        module = SegTrainModule(network)
    else:
        method, taps, width_factor = run_spec.method, run_spec.taps, float(run_spec.width_factor)
        temperature, warmup, lam_arg = run_spec.temperature, run_spec.warmup_fraction, run_spec.lambda_max
        if method not in KD_METHODS:
            raise ReCoKDError(f"unknown KD method {method!r}; choose one of {', '.join(KD_METHODS)}")
        terms, _ = resolve_method(method)
        term_options = {t: {"temperature": temperature} for t in terms if t in TEMPERATURE_TERMS} if temperature else None
        if nnunet_teacher is not None:
            teacher = nnunet_network
            tap_names_t, probe = teacher.tap_names(taps), teacher.probe_shape()
        else:
            teacher = build_unet(teacher_spec)
            load_weights(teacher, teacher_run / "model_best.safetensors")
            tap_names_t, probe = dynunet_tap_names(teacher_spec, taps), None
        spec = student_topology.student(width_factor)
        network = build_unet(spec)
        distiller = Distiller(teacher, network, tap_names_t, dynunet_tap_names(spec, taps), num_classes, method,
                              probe_shape=probe, lambda_max=lam_arg, warmup_fraction=warmup, term_options=term_options,
                              teacher_scale=teacher_scale)
        lambda_max = distiller.lambda_max
        module = DistillTrainModule(distiller)
        teacher_sha256 = _teacher_sha256(teacher_run, nnunet_teacher)
        if saved is not None and saved.get("teacher_sha256") not in (None, teacher_sha256):
            raise ReCoKDError(f"{out} was distilled from other teacher weights than {teacher_run} holds now; resume with "
                              f"the teacher it started with, or start a new run in another -o folder")

    unlabeled_ids: list[str] = []
    targets = None
    if role == "student":
        train_ids, unlabeled_ids, targets = _teacher_labelled_cases(run_spec, dataset, plans, root, train_ids, cases,
                                                                    teacher, teacher_sha256, device, progress,
                                                                    label_less, config.teacher_targets)
        if config.teacher_targets == "soft" and unlabeled_ids and not len(distiller.kd_terms):
            raise ReCoKDError("--teacher-targets soft gives the unlabeled scans no segmentation target, so they teach "
                              "only through the KD terms; choose a method with some (e.g. --method logit)")
    images = [cases[i].image for i in train_ids]
    labels = [cases[i].label for i in train_ids]
    if unlabeled_ids:  # the teacher's labels (or none), never a hidden case's own
        images += [cases[i].image for i in unlabeled_ids]
        labels += [_unlabelled_targets(config, targets, cases[i], i) for i in unlabeled_ids]
    data = PatchBatches(
        images, labels, config.patch_size,
        batch_size=per_rank, foreground_fraction=config.foreground_fraction, seed=config.seed, rank=rank,
        augment=AugmentConfig.preset(config.augment, config.patch_size, elastic=config.elastic), length=config.total_steps,
        case_weights=case_fractions(len(train_ids), len(unlabeled_ids), config.unlabeled_fraction),
    )
    run_info = {
        "version": RUN_VERSION,
        "role": role,
        "dataset": str(dataset.root),
        "dataset_name": dataset.name,
        "labels": dict(plans.labels),
        "channel_names": {str(k): v for k, v in plans.channel_names.items()},
        "method": method,
        "teacher_run": str(teacher_run.resolve()) if teacher_run else None,
        "teacher_kind": ("nnunet" if nnunet_teacher is not None else "recokd") if teacher_run else None,
        "teacher_folds": ",".join(nnunet_teacher.checkpoints) if nnunet_teacher is not None else None,
        "teacher_checkpoint": (run_spec.teacher_checkpoint or "final") if nnunet_teacher is not None else None,
        "teacher_sha256": teacher_sha256,  # a resumed student checks its teacher by weights, wherever it lies now
        "width_factor": width_factor,
        "fold": fold if not val_file else "fixed",
        "seed": config.seed,
        "config": config.to_dict(),
        # every planner option the plan (patch, network) was made with, as the plan records them
        "planner": dict(plans.planner),
        "taps": taps,
        "lambda_max": lambda_max,
        "kd_options": {"temperature": temperature, "warmup_fraction": warmup} if role == "student" else None,
        "val_cases_file": str(val_file) if val_file else None,
        "train_cases": train_ids,
        "val_cases": val_ids,
        # unlabelled scans: their folders, the training cases used without their labels, and where the
        # teacher's labels of them are cached
        "unlabeled": [str(Path(f).resolve()) for f in run_spec.unlabeled] if role == "student" else [],
        "labeled_cases_file": run_spec.labeled_cases_file if role == "student" else None,
        "labeled_cases": train_ids if role == "student" and run_spec.labeled_cases_file else None,
        "unlabeled_cases": len(unlabeled_ids),
        "teacher_labels": str(targets.folder) if targets is not None else None,
        # a fast student: its grid is the teacher's coarsened by these factors (D, H, W)
        "student_spacing_factor": run_spec.student_spacing_factor if role == "student" else None,
        "teacher_scale": list(teacher_scale) if role == "student" else None,
        "world_size": world,
        # patches each process draws per step (the global --batch-size split over them)
        "batch_per_rank": [data.batch_size if r == rank else rank_batch_size(config.batch_size, world, r,
                                                                             config.batch_per_process) for r in range(world)],
        "metrics": {},
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # the run's plan is the one it trained with: its patch is the window the predictor and the ONNX
        # export use; its network (a student's, not the teacher's) is network.json alone
        replace(plans, patch_size=tuple(config.patch_size)).save(out / "plans.json")
        atomic_write_text(out / "network.json", spec.to_json() + "\n")
    _barrier()
    trainer = EpochTrainer(
        module, network, lambda: build_unet(spec), data, val_cases, num_classes, plans.labels.foreground_names, config, out,
        run_info, name=f"{role} {method}" if role == "student" else "teacher", progress=progress, device=device,
    )
    if run_spec.resume and (out / "checkpoint_latest.pt").is_file():
        trainer.resume()
        if rank == 0:
            print(f"resuming {out} at iteration {trainer.step}/{config.total_steps} "
                  f"(epoch {trainer.step // config.iters_per_epoch + 1})", flush=True)
    elif run_spec.resume and rank == 0:
        print(f"no checkpoint in {out}; starting from the beginning", flush=True)
    trainer.write_run_json()
    if trainer.step >= config.total_steps:
        if not (out / "model_final.safetensors").is_file():  # killed after the last checkpoint, before the end
            trainer.finish()
        if rank == 0:
            print(f"{out} has finished already ({config.total_steps} iterations)")
        return 0
    trainer.fit(stop_after_epochs=run_spec.stop_after_epochs)
    if rank == 0:
        best = trainer.best
        if trainer.step >= config.total_steps:
            print(f"{role} finished: best EMA validation mean Dice {best.get('best_dice_mean', float('nan')):.3f} "
                  f"at epoch {best.get('best_epoch')}; run folder {out}")
        else:
            print(f"stopped after epoch {trainer.step // config.iters_per_epoch} as asked; continue with --resume")
    return 0
