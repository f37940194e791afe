"""A distillation study from one JSON config: plan, teachers, students × seeds, ablations, latency,
then one report (``recokd benchmark-study CONFIG -o DIR``).

What runs (see ``configs/study.json`` for a full config):

- per dataset, a ``plan`` job (fingerprint, plans, preprocessing; the shared cache of the dataset);
- per dataset, teacher(s): ``evaluate_on: "test"`` trains one teacher on every training case and
  scores on ``imagesTs``/``labelsTs``; ``evaluate_on: "cv"`` cuts the training cases into ``folds``
  groups (cases sharing ``group_pattern``'s first match, e.g. one patient's ED and ES frames, stay
  together), trains one teacher per fold and scores each fold's held-out cases;
- per dataset, every student variant (or the dataset's ``students`` list) × every seed (or the
  dataset's ``seeds`` list; seed ``i`` uses
  fold ``i mod folds`` under CV, so three seeds are a three-fold cross-validation); every student of a
  seed starts from the same weights and sees the same batches, so each is paired with the no-KD
  student of its width;
- a dataset given as ``"phantom": {...}`` instead of a ``path`` is the demo's phantom, written into
  ``DIR/data/`` on first use (``train_cases`` for training, ``test_cases`` as its test set);
- ablation variants on one dataset; a latency benchmark per dataset (run alone, nothing in parallel):
  the teacher and the ``latency.students`` of seed 0 on ``latency.max_cases`` cases, each model with
  each of ``latency.backends`` (default ``["torch"]``; ``["torch", "onnxruntime", "openvino"]`` times each).

Every job is ``recokd train``/``recokd distill … --resume`` in a subprocess, followed by scoring the
run's final EMA weights with the same :class:`~ReCoKDLib.inference.Predictor` users run (Dice, HD95,
NSD per class, written to ``eval.json`` with a hash of the job). A job whose ``eval.json`` matches is
skipped, so an interrupted study continues where it stopped: run the same command again. Logs of
every job are in ``DIR/logs/``.

The report (``report.md``, ``results.json``, PNG figures) is rebuilt from whatever has finished; runs
not finished yet are listed as missing, never imputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ReCoKDError
from ..utils.io import atomic_write_text, json_safe
from ..utils.locks import lock_owner, try_lock
from ..data.datasets import select_cases
from .study_report import build_report

__all__ = ["StudyConfig", "Job", "load_config", "plan_jobs", "run_study", "cv_folds", "evaluate_run", "build_report"]

STUDY_VERSION = 1
METHOD_KEYS = {"method", "lambda_max", "taps", "width_factor", "temperature", "warmup_fraction", "adapter_lr_scale",
               "unlabeled", "unlabeled_fraction", "teacher_targets", "teacher_confidence", "student_spacing_factor"}


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class DatasetEntry:
    name: str
    path: Path | None  # None: the built-in phantom, written into the study folder (``phantom``)
    evaluate_on: str  # "test" or "cv"
    folds: int = 1
    group_pattern: str | None = None
    teacher_epochs: int = 10
    student_epochs: int = 4
    students: list[str] | None = None  # the student variants run on this dataset (None: all)
    phantom: dict[str, int] | None = None  # {"train_cases", "test_cases", "size", "seed"}
    seeds: list[int] | None = None  # this dataset's student seeds (None: the study's)
    labeled: int | None = None  # label-scarce: the students keep this many labelled case groups per run

    def runs(self, variant: str) -> bool:
        return self.students is None or variant in self.students

    def resolve(self, out: Path) -> Path:
        """The dataset folder; a phantom entry writes its cases (as the demo generates them: one seeded
        series, the first ``train_cases`` for training, the rest as the test set) on first use."""
        if self.path is not None:
            return self.path
        folder = out / "data" / self.name
        settings = dict(self.phantom or {})
        if not (folder / "dataset.json").is_file():
            write_phantom_dataset(folder, **settings)
        stamp = folder / "phantom.json"
        written = json.loads(stamp.read_text()) if stamp.is_file() else None
        if written != settings:
            raise ReCoKDError(f"{folder} holds a phantom made with {written} but the config asks for {settings}; "
                              "restore the config's 'phantom' settings or start the study in a new folder")
        return folder


PHANTOM_DEFAULTS = {"train_cases": 16, "test_cases": 6, "size": 64, "seed": 0}


def write_phantom_dataset(folder: Path, train_cases: int = 16, test_cases: int = 6, size: int = 64, seed: int = 0) -> Path:
    """The demo's phantom cases in the nnU-Net raw layout with a labelled test set (imagesTs/labelsTs)."""
    import shutil
    import tempfile

    from ..data.phantom import generate_dataset, save_dataset_nnunet

    cases = generate_dataset(train_cases + test_cases, seed=seed, shape=(size,) * 3)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:  # complete or absent: renamed into place
        d = save_dataset_nnunet(cases, Path(tmp) / folder.name, "Dataset998_ReCoKDPhantomStudy")
        for sub in ("imagesTs", "labelsTs"):
            (d / sub).mkdir()
        for c in cases[train_cases:]:
            shutil.move(str(d / "imagesTr" / f"{c.name}_0000.nii.gz"), d / "imagesTs")
            shutil.move(str(d / "labelsTr" / f"{c.name}.nii.gz"), d / "labelsTs")
        info = json.loads((d / "dataset.json").read_text())
        info["numTraining"] = train_cases
        (d / "dataset.json").write_text(json.dumps(info, indent=1))
        settings = {"train_cases": train_cases, "test_cases": test_cases, "size": size, "seed": seed}
        (d / "phantom.json").write_text(json.dumps(settings) + "\n")  # what resolve() checks on every use
        d.rename(folder)
    return folder


@dataclass
class StudyConfig:
    """A parsed study config (see the module docstring and ``configs/study.json``)."""

    name: str
    datasets: dict[str, DatasetEntry]
    planner: dict[str, int]
    training: dict[str, Any]
    seeds: list[int]
    students: dict[str, dict[str, Any]]
    ablation_dataset: str | None = None
    ablation_seeds: list[int] = field(default_factory=list)
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    jobs: int = 2
    threads_per_job: int = 1
    source: Path | None = None


def _variant(name: str, spec: Any, where: str) -> dict[str, Any]:
    if name == "teacher":  # the report keys the teacher model's rows by this name
        raise ReCoKDError(f"{where}: 'teacher' names the teacher model in the report; give this student variant "
                          "another name (e.g. 'teacher-labels')")
    if not isinstance(spec, dict) or "method" not in spec:
        raise ReCoKDError(f"{where}: variant {name!r} needs an object with at least a 'method'")
    unknown = set(spec) - METHOD_KEYS
    if unknown:
        raise ReCoKDError(f"{where}: variant {name!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(METHOD_KEYS)}")
    from ..kd_methods import KD_METHODS

    if spec["method"] not in KD_METHODS:
        raise ReCoKDError(f"{where}: variant {name!r} uses unknown method {spec['method']!r}; choose one of {', '.join(KD_METHODS)}")
    return dict(spec)


def _labeled(value: Any, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ReCoKDError(f"{where}: 'labeled' (labelled case groups each student keeps) must be an integer >= 1, "
                          f"got {value!r}")
    return value


def _seeds(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list) or not value or not all(isinstance(s, int) and s >= 0 for s in value)
            or len(set(value)) != len(value)):
        raise ReCoKDError(f"{where}: 'seeds' must be a non-empty list of distinct integers >= 0, got {value!r}")
    return list(value)


def load_config(path: str | Path) -> StudyConfig:
    """Read and check a study config; relative dataset paths are relative to the config file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReCoKDError(f"study config {path} does not exist; see configs/study.json for an example") from None
    except (OSError, ValueError) as exc:
        raise ReCoKDError(f"study config {path} is not readable JSON ({exc})") from None
    where = str(path)
    if not isinstance(raw, dict) or not raw.get("datasets") or not raw.get("students"):
        raise ReCoKDError(f"{where}: a study needs 'datasets' and 'students'; see configs/study.json")
    datasets = {}
    for name, d in raw["datasets"].items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ReCoKDError(f"{where}: dataset key {name!r} must be letters, digits, '-', '_' or '.'")
        ev = d.get("evaluate_on", "test")
        if ev not in ("test", "cv"):
            raise ReCoKDError(f"{where}: dataset {name!r}: evaluate_on must be 'test' or 'cv', got {ev!r}")
        folds = int(d.get("folds", 1 if ev == "test" else 3))
        if ev == "cv" and folds < 2:
            raise ReCoKDError(f"{where}: dataset {name!r}: cross-validation needs folds >= 2")
        wanted = d.get("students")
        if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted)
                                   or set(wanted) - set(raw["students"])):
            raise ReCoKDError(f"{where}: dataset {name!r}: 'students' must list names from 'students' "
                              f"({', '.join(raw['students'])}), got {wanted!r}")
        phantom = d.get("phantom")
        if phantom is not None:
            if (not isinstance(phantom, dict) or set(phantom) - set(PHANTOM_DEFAULTS)
                    or not all(isinstance(v, int) and v >= (0 if k == "seed" else 1) for k, v in phantom.items())
                    or "path" in d):
                raise ReCoKDError(f"{where}: dataset {name!r}: 'phantom' (instead of a 'path') takes integers "
                                  f"{sorted(PHANTOM_DEFAULTS)} (a seed >= 0, the others >= 1), got {phantom!r}")
            resolved = None
        elif "path" not in d:
            raise ReCoKDError(f"{where}: dataset {name!r} needs a 'path' (the folder that holds dataset.json) "
                              "or a 'phantom' ({} for the demo's phantom)")
        else:
            p = Path(os.path.expandvars(str(d["path"])))
            if not (p if p.is_absolute() else path.parent / p).is_dir():
                raise ReCoKDError(f"{where}: dataset {name!r}: {p} is not a folder; fix its 'path' "
                                  "(a relative path is relative to the config file)")
            resolved = p if p.is_absolute() else (path.parent / p).resolve()
        datasets[name] = DatasetEntry(
            name, resolved, ev, folds if ev == "cv" else 1,
            d.get("group_pattern"), int(d.get("teacher_epochs", raw.get("teacher_epochs", 10))),
            int(d.get("student_epochs", raw.get("student_epochs", 4))), wanted,
            {**PHANTOM_DEFAULTS, **phantom} if phantom is not None else None,
            _seeds(d["seeds"], f"{where}: dataset {name!r}") if "seeds" in d else None,
            _labeled(d.get("labeled"), f"{where}: dataset {name!r}"))
    students = {k: _variant(k, v, where) for k, v in raw["students"].items()}
    abl = raw.get("ablations") or {}
    ablations = {k: _variant(k, v, where) for k, v in (abl.get("variants") or {}).items()}
    abl_ds = abl.get("dataset")
    if ablations and abl_ds not in datasets:
        raise ReCoKDError(f"{where}: ablations.dataset {abl_ds!r} is not one of the datasets {list(datasets)}")
    seeds = _seeds(raw.get("seeds", [0]), where)
    latency = dict(raw.get("latency", {}))
    backends = latency.get("backends", ["torch"])
    if (not isinstance(backends, list) or not backends or len(set(backends)) != len(backends)
            or set(backends) - {"torch", "onnxruntime", "openvino"}):
        raise ReCoKDError(f"{where}: latency.backends must list distinct engines from ['torch', 'onnxruntime', 'openvino'] "
                          f"(each model is timed with each), got {backends!r}")
    return StudyConfig(
        name=str(raw.get("name", path.stem)), datasets=datasets, planner=dict(raw.get("planner", {})),
        training=dict(raw.get("training", {})), seeds=seeds, students=students, ablation_dataset=abl_ds,
        ablation_seeds=[int(s) for s in abl.get("seeds", seeds[:1])], ablations=ablations,
        latency=latency, jobs=int(raw.get("jobs", 2)),
        threads_per_job=int(raw.get("threads_per_job", 1)), source=path,
    )


# --------------------------------------------------------------------------------------------------
# splits


def cv_folds(case_ids: Sequence[str], folds: int, group_pattern: str | None = None, seed: int = 0) -> list[list[str]]:
    """Held-out case ids of each fold: groups (``group_pattern``'s first match, else the case id)
    are shuffled with ``seed`` and dealt into ``folds`` near-equal parts."""
    groups: dict[str, list[str]] = {}
    for cid in sorted(case_ids):
        m = re.search(group_pattern, cid) if group_pattern else None
        groups.setdefault(m.group(1 if m and m.groups() else 0) if m else cid, []).append(cid)
    keys = sorted(groups)
    if len(keys) < folds:
        raise ReCoKDError(f"{len(keys)} case group(s) cannot make {folds} folds; lower 'folds'")
    order = np.random.default_rng(seed).permutation(len(keys))
    return [sorted(c for i in part for c in groups[keys[i]]) for part in np.array_split(order, folds)]


# --------------------------------------------------------------------------------------------------
# jobs


@dataclass
class Job:
    """One unit of work: a training run then its scoring (``kind`` train), the dataset's plan
    (``plan``), or a latency benchmark (``latency``, run alone)."""

    name: str
    kind: str
    folder: Path
    spec: dict[str, Any]
    deps: list[str] = field(default_factory=list)

    @property
    def exclusive(self) -> bool:
        return self.kind == "latency"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def marker(self) -> Path:
        """The file whose ``job_digest`` says the job has finished with exactly this spec."""
        return self.folder / {"train": "eval.json", "plan": "plan_done.json", "latency": "latency_done.json"}[self.kind]

    def done(self) -> bool:
        try:
            return json.loads(self.marker.read_text()).get("job_digest") == self.digest
        except (OSError, ValueError, AttributeError):
            return False


def _train_options(config: StudyConfig, epochs: int, seed: int) -> list[str]:
    t = config.training
    opts = ["--epochs", str(epochs), "--iters-per-epoch", str(t.get("iters_per_epoch", 100)),
            "--optimizer", str(t.get("optimizer", "adamw")), "--seed", str(seed),
            "--val-every", str(epochs), "--val-max-cases", str(t.get("val_max_cases", 2)),
            "--workers", str(t.get("workers", 1)), "--threads", str(config.threads_per_job),
            "--device", str(t.get("device", "auto")), "--no-progress", "--resume"]
    for key, flag in (("lr", "--lr"), ("batch_size", "--batch-size"), ("weight_decay", "--weight-decay"),
                      ("augment", "--augment")):
        if key in t:
            opts += [flag, str(t[key])]
    return opts


def _labeled_cases_file(out: Path, dname: str, d: DatasetEntry, dataset_path: Path, fold: int, seed: int,
                        evaluation: dict[str, Any]) -> Path:
    """The labelled training cases of one label-scarce student: ``d.labeled`` case groups (a patient's
    frames stay together, as in the folds) drawn with the seed from the fold's training cases; the same
    for every variant of that seed and fold, so the variants stay paired."""
    from ..data.datasets import open_dataset

    held_out = set(evaluation["cases"]) if evaluation.get("cases") != "test" else set()
    train = sorted(r.case_id for r in open_dataset(dataset_path).training if r.case_id not in held_out)
    groups = cv_folds(train, len({_group(c, d.group_pattern) for c in train}), d.group_pattern, seed=seed)
    if d.labeled > len(groups):
        raise ReCoKDError(f"dataset {dname}: 'labeled' {d.labeled} exceeds the {len(groups)} training case groups")
    chosen = sorted(c for g in groups[: d.labeled] for c in g)
    path = out / "splits" / dname / f"labeled_f{fold}_s{seed}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(chosen) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def _group(case_id: str, pattern: str | None) -> str:
    m = re.search(pattern, case_id) if pattern else None
    return (m.group(1 if m.groups() else 0) if m else case_id)


def _variant_options(v: dict[str, Any]) -> list[str]:
    opts = ["--method", v["method"]]
    for key, flag in (("lambda_max", "--lambda-max"), ("taps", "--taps"), ("width_factor", "--width-factor"),
                      ("temperature", "--temperature"), ("warmup_fraction", "--warmup-fraction"),
                      ("adapter_lr_scale", "--adapter-lr-scale"), ("unlabeled_fraction", "--unlabeled-fraction"),
                      ("teacher_targets", "--teacher-targets"), ("teacher_confidence", "--teacher-confidence"),
                      ("student_spacing_factor", "--student-spacing-factor")):
        if key in v:
            opts += [flag, str(v[key])]
    return opts


def plan_jobs(config: StudyConfig, out: str | Path) -> list[Job]:
    """Every job of the study in priority order (plans, teachers, main students seed by seed,
    ablations, latency)."""
    from ..data.datasets import open_dataset

    out = Path(out).resolve()
    jobs: list[Job] = []
    teachers: dict[tuple[str, int], Job] = {}
    eval_of: dict[tuple[str, int], dict[str, Any]] = {}
    student_jobs: list[Job] = []
    paths = {dname: d.resolve(out) for dname, d in config.datasets.items()}
    for dname, d in config.datasets.items():
        dataset = open_dataset(paths[dname])
        cache = out / "cache" / dname
        planner = []
        for key, flag in (("patch_budget", "--patch-budget"), ("base_filters", "--base-filters"),
                          ("max_filters", "--max-filters"), ("max_levels", "--max-levels")):
            if key in config.planner:
                planner += [flag, str(config.planner[key])]
        plan = Job(f"{dname}/plan", "plan", out / "runs" / dname,
                   {"argv": ["plan", str(paths[dname]), "--cache", str(cache), "--no-progress", *planner]})
        jobs.append(plan)
        base = ["--cache", str(cache)]
        if d.evaluate_on == "test":
            if not dataset.test or any(r.label_file is None for r in dataset.test):
                raise ReCoKDError(f"dataset {dname} ({paths[dname]}) has no labelled test cases (imagesTs + labelsTs); "
                                  "use evaluate_on: cv")
            splits = [(0, ["--fold", "all"], {"cases": "test"})]
        else:
            folds = cv_folds([r.case_id for r in dataset.training], d.folds, d.group_pattern)
            splits = []
            for k, held_out in enumerate(folds):
                split_file = out / "splits" / dname / f"fold{k}.txt"
                split_file.parent.mkdir(parents=True, exist_ok=True)
                text = "\n".join(held_out) + "\n"
                if not split_file.is_file() or split_file.read_text() != text:
                    atomic_write_text(split_file, text)
                splits.append((k, ["--val-cases", str(split_file)], {"cases": held_out}))
        for k, split_opts, ev in splits:
            folder = out / "runs" / dname / (f"teacher_f{k}" if d.evaluate_on == "cv" else "teacher")
            argv = ["train", str(paths[dname]), "-o", str(folder), *base, "--plans", str(cache / "plans.json"), *split_opts,
                    *_train_options(config, d.teacher_epochs, k)]
            evaluation = {"dataset": str(paths[dname]), **ev}
            t = Job(f"{dname}/{folder.name}", "train", folder, {"argv": argv, "eval": evaluation}, deps=[plan.name])
            teachers[(dname, k)], eval_of[(dname, k)] = t, (split_opts, evaluation)
            jobs.append(t)

    def student(dname: str, vname: str, v: dict[str, Any], seed_index: int, seed: int, group: str) -> Job:
        d = config.datasets[dname]
        k = seed_index % d.folds
        teacher = teachers[(dname, k)]
        split_opts, evaluation = eval_of[(dname, k)]
        folder = out / "runs" / dname / f"{vname}_s{seed}"
        argv = ["distill", str(paths[dname]), "-o", str(folder), "--cache", str(out / "cache" / dname),
                "--teacher", str(teacher.folder), *split_opts, *_train_options(config, d.student_epochs, seed),
                *_variant_options(v)]
        if d.labeled:  # label-scarce: the seed's labelled cases; the others are teacher-labelled or left out
            argv += ["--labeled-cases", str(_labeled_cases_file(out, dname, d, paths[dname], k, seed, evaluation))]
            if not v.get("unlabeled"):
                argv += ["--unlabeled-fraction", "0"]
        spec = {"argv": argv, "eval": evaluation, "variant": vname, "group": group, "seed": seed, "fold": k}
        return Job(f"{dname}/{folder.name}", "train", folder, spec, deps=[teacher.name])

    for dname, d in config.datasets.items():  # a dataset's own seed list may be shorter (a costly one)
        for i, seed in enumerate(d.seeds or config.seeds):
            for vname, v in config.students.items():
                if d.runs(vname):
                    student_jobs.append(student(dname, vname, v, i, seed, "main"))
    jobs += student_jobs
    if config.ablations:
        for i, seed in enumerate(config.ablation_seeds):
            for vname, v in config.ablations.items():
                jobs.append(student(config.ablation_dataset, vname, v, i, seed, "ablation"))  # type: ignore[arg-type]
    if config.latency.get("enabled", True):
        for dname, d in config.datasets.items():
            models = {"teacher": teachers[(dname, 0)]}
            wanted = config.latency.get("students", ["none", "recokd"])
            for j in jobs:
                if j.kind == "train" and j.spec.get("variant") in wanted + config.latency.get("ablations", []) \
                        and j.name.startswith(f"{dname}/") and j.spec.get("seed") == config.seeds[0] \
                        and j.spec.get("fold") == 0:
                    models[j.spec["variant"]] = j
            spec = {"models": {n: str(j.folder) for n, j in models.items()}, "dataset": str(paths[dname]),
                    "cases": eval_of[(dname, 0)][1]["cases"], "threads": int(config.latency.get("threads", 2)),
                    "repeats": int(config.latency.get("repeats", 3)), "max_cases": int(config.latency.get("max_cases", 4))}
            if config.latency.get("backends", ["torch"]) != ["torch"]:  # (a torch-only job keeps its digest)
                spec["backends"] = list(config.latency["backends"])
            jobs.append(Job(f"{dname}/latency", "latency", out / "latency" / dname, spec,
                            deps=[j.name for j in models.values()]))
    return jobs


# --------------------------------------------------------------------------------------------------
# running


def evaluate_run(run_dir: str | Path, dataset_path: str, cases: str | Sequence[str], weights: str = "final",
                 threads: int | None = None, tolerance_mm: float = 2.0) -> dict[str, Any]:
    """Score a run's weights on ``cases`` ("test" or held-out training case ids) of a dataset with the
    user-facing predictor: per-case and mean Dice, HD95 and NSD per class."""
    from ..deployment.bundle import bundle_from_run
    from ..data.datasets import read_image
    from ..inference.predictor import Predictor
    from ..evaluation.metrics import read_label_map, score_case, summarise

    import SimpleITK as sitk

    bundle = bundle_from_run(run_dir, weights=weights)
    predictor = Predictor(bundle, device="auto", progress=False, threads=threads)
    _, records = select_cases(dataset_path, cases)
    scores, per_case = [], []
    tick = time.perf_counter()
    for r in records:
        pred = sitk.GetArrayFromImage(predictor.predict_image([read_image(p) for p in r.image_files], name=r.case_id))
        ref, ref_geometry = read_label_map(r.label_file)
        s = score_case(pred, ref, ref_geometry.spacing_dhw, bundle.labels.names, tolerance_mm, r.case_id)
        scores.append(s)
        per_case.append({"case": r.case_id, **s.scores})
    run = json.loads((Path(run_dir) / "run.json").read_text())
    return {"cases": per_case, "summary": summarise(scores), "eval_seconds": time.perf_counter() - tick,
            "train_seconds": sum(float(row.get("seconds", 0) or 0) for row in _log_rows(Path(run_dir))),
            "run": {k: run.get(k) for k in ("role", "method", "seed", "fold", "width_factor", "lambda_max", "taps")}}


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    path = run_dir / "log.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


class JobHeldElsewhere(ReCoKDError):
    """The job's lock is held by another process: it is running there."""


HELD_ELSEWHERE_EXIT = 75  # a job subprocess's exit status for JobHeldElsewhere (EX_TEMPFAIL)


def execute_job(job_file: str | Path) -> int:
    """Run one job described by a JSON file (the study's subprocess entry point); ``recokd`` itself runs
    as a child process (``python -m ReCoKDLib.cli``), so the study never imports the command line."""
    job = json.loads(Path(job_file).read_text())
    kind, folder, spec = job["kind"], Path(job["folder"]), job["spec"]
    folder.mkdir(parents=True, exist_ok=True)
    lock = try_lock(folder / ".job.lock")  # held until this process ends, however it ends
    if lock is None:
        raise JobHeldElsewhere(f"{job['name']} is already running ({lock_owner(folder / '.job.lock')}); "
                          "wait for it or stop it first")
    if kind in ("plan", "train"):
        rc = subprocess.run([sys.executable, "-m", "ReCoKDLib.cli", *map(str, spec["argv"])]).returncode
        if rc:
            return rc
    if kind == "plan":
        atomic_write_text(folder / "plan_done.json", json.dumps({"job_digest": job["digest"]}) + "\n")
    elif kind == "train":
        ev = spec["eval"]
        result = evaluate_run(folder, ev["dataset"], ev["cases"], threads=job.get("threads"))
        result["job_digest"] = job["digest"]
        atomic_write_text(folder / "eval.json", json.dumps(json_safe(result), indent=1) + "\n")
        s = result["summary"]["dice"]
        print(f"{job['name']}: mean Dice {s['mean']:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in s.items() if k != "mean"))
    elif kind == "latency":
        _latency(folder, spec)
        atomic_write_text(folder / "latency_done.json", json.dumps({"job_digest": job["digest"]}) + "\n")
    return 0


def _latency(folder: Path, spec: dict[str, Any]) -> None:
    import tempfile

    from ..benchmarks.inference import results_json, run_benchmark

    dataset, records = select_cases(spec["dataset"], spec["cases"])
    records = list(records)[: spec["max_cases"]]
    with tempfile.TemporaryDirectory() as tmp:  # run_benchmark reads folders: link the chosen cases
        imgs, labs = Path(tmp) / "images", Path(tmp) / "labels"
        imgs.mkdir()
        labs.mkdir()
        for r in records:
            for p in r.image_files:
                os.symlink(p.resolve(), imgs / p.name)
            os.symlink(r.label_file.resolve(), labs / f"{r.case_id}{dataset.file_ending}")
        results = run_benchmark(spec["models"], imgs, labs, device="cpu", repeats=spec["repeats"],
                                threads=spec["threads"], teacher="teacher", backends=spec.get("backends", ["torch"]))
    atomic_write_text(folder / "benchmark.json", results_json(results) + "\n")


def _last_error(log_path: Path) -> str:
    """The job's own one-line error (its last ``error:`` line), else its last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error:" in ln]
    return (errors or lines or ["no output"])[-1][-300:]


def _held_elsewhere(job: Job) -> bool:
    """Whether another process holds the job's lock (it is running there)."""
    if not (job.folder / ".job.lock").is_file():
        return False
    handle = try_lock(job.folder / ".job.lock")
    if handle is None:
        return True
    handle.close()
    return False


def check_study_folder(out: Path) -> None:
    """The overwrite rule for a study: -o is new, empty or an earlier study's folder (it has ``logs/``; a run
    of the same study resumes it), never a folder holding anything else (a run, a dataset, ``docs/``) is refused before anything is written."""
    if out.exists() and not out.is_dir():
        raise ReCoKDError(f"-o {out} is a file; give a folder for the study")
    if out.is_dir():
        names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        if names and "logs" not in names:
            shown = ", ".join(sorted(names)[:3])
            raise ReCoKDError(f"-o {out} holds other files ({shown}), not a study; choose a new or empty folder "
                              "(an earlier study's folder is resumed)")


def run_study(
    config: StudyConfig,
    out: str | Path,
    jobs: int | None = None,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    poll_seconds: float = 1.0,
) -> tuple[list[Job], list[str]]:
    """Run every unfinished job (``jobs`` at a time; latency jobs alone), then write the report.

    ``only``: names or prefixes (e.g. ``"ACDC-subset/"``) of the jobs to run (their finished
    dependencies are required). Returns (all jobs, names of failed or blocked jobs).
    """
    out = Path(out).resolve()
    check_study_folder(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    all_jobs = plan_jobs(config, out)
    selected = [j for j in all_jobs if not only or any(j.name == o or j.name.startswith(o) for o in only)]
    finished = {j.name for j in all_jobs if j.done()}
    pending = [j for j in selected if j.name not in finished]
    width = max(1, jobs or config.jobs)
    log(f"study {config.name}: {len(all_jobs)} jobs, {len(finished)} finished, {len(pending)} to run, "
        f"{width} at a time; logs in {out / 'logs'}")
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    failed: list[str] = []
    times_file = out / "wall_times.json"
    wall = json.loads(times_file.read_text()) if times_file.is_file() else {}
    env = dict(os.environ, OMP_NUM_THREADS=str(config.threads_per_job), PYTHONUNBUFFERED="1")
    elsewhere: set[str] = set()  # jobs another process (e.g. an earlier runner) is running: waited for
    try:
        while pending or running:
            for j in list(pending):
                if _held_elsewhere(j):
                    if j.name not in elsewhere:
                        log(f"wait   {j.name}: running in another process ({lock_owner(j.folder / '.job.lock')})")
                        elsewhere.add(j.name)
                    continue
                if j.name in elsewhere:
                    elsewhere.discard(j.name)
                    if j.done():
                        pending.remove(j)
                        finished.add(j.name)
                        log(f"done   {j.name} (in another process)")
                        continue
                waiting = [d for d in j.deps if d not in finished]
                if any(d in failed for d in waiting) or any(
                        d not in running and all(p.name != d for p in pending) for d in waiting):
                    pending.remove(j)
                    failed.append(j.name)
                    log(f"skip   {j.name}: {waiting[0]} did not finish (or is not selected)")
                    continue
                if waiting:
                    continue
                if j.exclusive and running:
                    break  # hold later jobs back so that the exclusive one gets the machine next
                if len(running) + len(elsewhere) >= width or any(r[0].exclusive for r in running.values()):
                    break  # a job running elsewhere takes a slot: the machine has no more cores for it
                j.folder.mkdir(parents=True, exist_ok=True)
                job_file = out / "logs" / (j.name.replace("/", "__") + ".job.json")
                atomic_write_text(job_file, json.dumps({"name": j.name, "kind": j.kind, "folder": str(j.folder),
                                                        "spec": j.spec, "digest": j.digest,
                                                        "threads": config.threads_per_job}, indent=1) + "\n")
                log_file = open(out / "logs" / (j.name.replace("/", "__") + ".log"), "a")
                proc = subprocess.Popen([sys.executable, "-m", "ReCoKDLib.workflows.study", str(job_file)],
                                        stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                log_file.close()
                running[j.name] = (j, proc, time.perf_counter())
                pending.remove(j)
                log(f"start  {j.name}")
            time.sleep(poll_seconds)
            for name, (j, proc, start) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                seconds = time.perf_counter() - start
                if rc == HELD_ELSEWHERE_EXIT:  # another runner took it between our check and our start
                    if j.done():  # ... and has finished it already
                        finished.add(name)
                        log(f"done   {name} (in another process)")
                    else:
                        pending.insert(0, j)  # next round sees its lock and waits for it there
                    continue
                if rc == 0 and j.done():
                    finished.add(name)
                    wall[name] = wall.get(name, 0.0) + seconds
                    atomic_write_text(times_file, json.dumps(wall, indent=1, sort_keys=True) + "\n")
                    log(f"done   {name} ({seconds / 60:.1f} min)")
                else:
                    failed.append(name)
                    log_path = out / "logs" / (name.replace("/", "__") + ".log")
                    log(f"FAILED {name} (exit {rc}): {_last_error(log_path)}; full log {log_path}")
    except KeyboardInterrupt:
        for name, (j, proc, start) in running.items():
            os.killpg(proc.pid, signal.SIGINT)
        for name, (j, proc, start) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log("interrupted: finished jobs are kept and unfinished runs resume from their last checkpoint; "
            "run the same command again to continue")
        raise
    build_report(config, out, all_jobs, log=log)
    return all_jobs, failed


if __name__ == "__main__":
    try:
        sys.exit(execute_job(sys.argv[1]))
    except JobHeldElsewhere as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(HELD_ELSEWHERE_EXIT)
    except ReCoKDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
