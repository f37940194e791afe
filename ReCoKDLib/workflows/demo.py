"""``recokd demo``: the main job on the built-in phantom, end to end.

It generates a phantom dataset and trains a teacher on every labelled case: the strong teacher a clinic has.
The students, all of one width, trained for as many steps from the same initial weights and seed, stand
where the clinic stands: only ``labeled_cases`` of the training cases keep their labels, the others are
scans without labels. One student learns from the labels alone, one also from the teacher's labels of
the unlabelled scans (``recokd distill --unlabeled``), one from those plus ReCo-KD's feature terms. All
are evaluated on held-out phantom cases; the table gives each student's share of the labels-only → teacher
gap recovered. ``equal_labels`` adds the comparison at equal labels (every training case labelled for the
students too: no KD against ReCo-KD). It writes the tables (markdown + JSON), the weights (safetensors)
and a figure.

Training runs through the same loop as ``recokd train`` / ``distill`` (:class:`EpochTrainer`: the batch
stream of :class:`~ReCoKDLib.data.loader.PatchBatches` over the in-memory cases, EMA, validation with the
loop's Dice), each model in a run folder under ``<output>/runs``; the EMA weights are evaluated and saved.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.loader import AugmentConfig, PatchBatches
from ..data.phantom import PHANTOM_LABELS, generate_dataset
from ..distill import Distiller
from ..errors import ReCoKDError
from ..inference import predict_labels
from ..models import build_pair, count_parameters, dynunet_tap_names, isotropic_spec, save_weights
from ..training.loop import DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase, check_distill_options
from ..utils.runtime import configure_cpu, resolve_device
from ..utils.io import atomic_write_text
from ..utils.outputs import check_output_folder


def demo_training(**overrides) -> RunConfig:
    """The demo's optimisation and bookkeeping: ``recokd train``'s :class:`RunConfig` with the CPU-sized
    choices the demo was measured with (AdamW 3e-3, batch 2, 48³ patches, no augmentation, in-process
    data); the schedule length is set per model from :attr:`DemoConfig.steps`."""
    base = dict(batch_size=2, patch_size=(48, 48, 48), optimizer="adamw", lr=3e-3, augment="none", num_workers=0)
    base.update(overrides)
    return RunConfig(**base)


@dataclass
class DemoConfig:
    """What the demo builds and compares, with defaults sized for 2 CPU cores and about 20 minutes; how each
    model trains is ``training`` (seed, device, threads, augmentation, optimiser, patch)."""

    output: str = "recokd_demo_output"
    train_cases: int = 16
    test_cases: int = 6
    size: int = 64
    filters: tuple[int, ...] = (16, 32, 64, 128)
    width_factor: float = 4
    # the teacher and both students train equally long, so that the gap is the student's width, not its
    # training time (issue 14's paired design)
    steps: int = 800
    # the students' labelled training cases; the others are unlabelled scans the teacher labels (0, or as
    # many as train_cases: every case labelled, the equal-labels comparison alone)
    labeled_cases: int = 2
    equal_labels: bool = False  # also run no KD vs ReCo-KD with every training case labelled
    method: str = "recokd"
    lambda_max: float | None = None
    taps: str = "encoder"
    timing_repeats: int = 3
    progress: bool = True
    overwrite: bool = False  # replace an earlier demo's output folder (the overwrite rule, utils/outputs.py)
    training: RunConfig = field(default_factory=demo_training)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A seconds-long configuration for smoke tests (numbers are meaningless)."""
        base = dict(train_cases=3, test_cases=2, size=32, filters=(8, 16, 32), steps=3, timing_repeats=1, labeled_cases=1,
                    training=demo_training(patch_size=(32, 32, 32)))
        base.update(overrides)
        return cls(**base)


@dataclass
class ModelResult:
    name: str
    dice: dict[str, float]
    dice_mean: float
    parameters: int
    seconds_per_volume: float
    train_seconds: float
    history: list[dict] = field(default_factory=list, repr=False)
    gap_recovered: float | None = None  # of the table's reference → teacher gap (students after the reference)


def _check(cfg: DemoConfig) -> None:
    for flag, value, low in (("--train-cases", cfg.train_cases, 1), ("--test-cases", cfg.test_cases, 1),
                             ("--steps", cfg.steps, 1), ("--width-factor", cfg.width_factor, 1),
                             ("--labeled", cfg.labeled_cases, 0)):
        if value < low:
            raise ReCoKDError(f"{flag} must be >= {low}, got {value}")
    check_distill_options(width_factor=cfg.width_factor, lambda_max=cfg.lambda_max)  # the Python API too
    if max(cfg.training.patch_size) > cfg.size:
        raise ReCoKDError(f"patch size {list(cfg.training.patch_size)} exceeds the phantom size {cfg.size}; "
                          "lower the patch size")


def _to_cases(phantoms) -> list[ValCase]:
    return [ValCase(p.name, torch.from_numpy(p.image), torch.from_numpy(p.label.astype(np.int64))) for p in phantoms]


def _schedule(steps: int) -> tuple[int, int]:
    """``steps`` as epochs × iterations per epoch (at most 50 per epoch, exactly ``steps`` in all)."""
    per_epoch = next(d for d in range(min(steps, 50), 0, -1) if steps % d == 0)
    return steps // per_epoch, per_epoch


def _train(name: str, module, network, make_network, cfg: "DemoConfig", train_cases, test_cases,
           label_names, run_dir: Path, device) -> EpochTrainer:
    """One model through the epoch loop (validated on the test cases at the end)."""
    epochs, per_epoch = _schedule(cfg.steps)
    config = replace(cfg.training, epochs=epochs, iters_per_epoch=per_epoch, val_every=epochs, device=str(device))
    batches = PatchBatches([c.image.numpy() for c in train_cases], [c.label.numpy() for c in train_cases],
                           config.patch_size, batch_size=config.batch_size,
                           foreground_fraction=config.foreground_fraction, seed=config.seed,
                           augment=AugmentConfig.preset(config.augment, config.patch_size, elastic=config.elastic),
                           length=config.total_steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"version": 1, "role": "teacher" if isinstance(module, SegTrainModule) else "student",
            "dataset_name": "ReCoKD phantom (demo)", "config": config.to_dict(), "metrics": {}}
    trainer = EpochTrainer(module, network, make_network, batches, test_cases, len(label_names) + 1, label_names,
                           config, run_dir, info, name=name, progress=cfg.progress, device=device)
    trainer.fit()
    return trainer


def _evaluate(name, trainer: EpochTrainer, cases, cfg, device, label_names) -> tuple[ModelResult, list]:
    """Dice from the loop's final validation (the EMA weights on the test cases); CPU time per volume and
    the predictions for the figure from the same weights."""
    net = trainer.ema_net
    roi = cfg.training.patch_size
    times, predictions = [], []
    for case in cases:
        for _ in range(max(cfg.timing_repeats, 1)):
            start = time.perf_counter()
            pred = predict_labels(net, case.image, roi, device=device)
            times.append(time.perf_counter() - start)
        predictions.append(pred)
    final = trainer.history[-1]
    result = ModelResult(
        name=name,
        dice={n: float(final[f"dice_{n}"]) for n in label_names},
        dice_mean=float(final["dice_mean"]),
        parameters=count_parameters(net),
        seconds_per_volume=statistics.median(times),
        train_seconds=float(sum(r.get("seconds", 0.0) for r in trainer.history)),
        history=trainer.history,
    )
    return result, predictions


def gap_recovered(teacher: float, student: float, distilled: float) -> float | None:
    """Share of the teacher–student gap that distillation closes: ``(D_kd − D_s) / (D_t − D_s)``."""
    gap = teacher - student
    if gap <= 1e-9:
        return None
    return (distilled - student) / gap


def format_table(results: list[ModelResult], label_names: list[str]) -> str:
    """The models' per-class and mean Dice, size and speed; after the teacher and the reference student (the
    first two rows), each student's share of the reference → teacher gap recovered, with the classes where
    the gap is (≥ 0.02)."""
    head = ["model", *label_names, "mean Dice", "gap recovered", "parameters", "CPU s/volume"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher, reference = results[0], results[1]
    notes = []
    for i, r in enumerate(results):
        share = gap_recovered(teacher.dice_mean, reference.dice_mean, r.dice_mean) if i >= 2 else None
        shown = "" if i < 2 else ("n/a" if share is None else f"{100 * share:.1f} %")
        cells = [r.name, *(f"{r.dice[n]:.3f}" for n in label_names), f"{r.dice_mean:.3f}", shown,
                 f"{r.parameters:,}", f"{r.seconds_per_volume:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
        if i >= 2:
            per_class = [f"{n} {100 * c:.0f} % of {teacher.dice[n] - reference.dice[n]:.3f}" for n in label_names
                         if teacher.dice[n] - reference.dice[n] >= 0.02
                         and (c := gap_recovered(teacher.dice[n], reference.dice[n], r.dice[n])) is not None]
            if per_class:
                notes.append(f"{r.name}: {', '.join(per_class)}")
    lines.append("")
    lines.append(f"Gap recovered: the share of the gap in mean Dice between '{reference.name}' and the teacher that "
                 "a student closes" + (" (per class, where the gap is ≥ 0.02: " + "; ".join(notes) + ")" if notes else "")
                 + ("; n/a: the reference is not below the teacher" if teacher.dice_mean - reference.dice_mean <= 1e-9 else ""))
    return "\n".join(lines)


#: what a demo writes into its output folder (an interrupted one, a part of it)
_DEMO_FILES = {"runs", "results.md", "results.json", "demo.png", "teacher_spec.json", "student_spec.json"}


def _is_demo_output(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier (possibly interrupted) demo and nothing else."""
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    return bool(names) and all(n in _DEMO_FILES or n.endswith(".safetensors") for n in names)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo; returns the results dictionary that is also written to ``results.json``."""
    _check(cfg)
    out = Path(cfg.output).expanduser().resolve()
    check_output_folder(out, overwrite=cfg.overwrite, kind="demo output", is_own=_is_demo_output, option="--output")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReCoKDError(f"cannot create the output folder {out}: {e.strerror}; choose another with --output")
    configure_cpu(cfg.training.num_threads)
    device = resolve_device(cfg.training.device)
    seed = cfg.training.seed
    started = time.perf_counter()

    label_names = PHANTOM_LABELS.foreground_names
    num_classes = PHANTOM_LABELS.num_classes
    phantoms = generate_dataset(cfg.train_cases + cfg.test_cases, seed=seed, shape=(cfg.size,) * 3)
    cases = _to_cases(phantoms)
    train, test = cases[: cfg.train_cases], cases[cfg.train_cases :]

    spec = isotropic_spec(1, num_classes, num_levels=len(cfg.filters), filters=cfg.filters, name="teacher")
    patch = tuple(cfg.training.patch_size)
    if any(p % d for p, d in zip(patch, spec.divisor)):
        raise ReCoKDError(f"patch size {list(patch)} is not a multiple of the network's stride {spec.divisor[0]}")

    def make_teacher():
        return build_pair(spec, cfg.width_factor)[0]

    def make_student():
        return build_pair(spec, cfg.width_factor)[1]

    runs = out / "runs"
    torch.manual_seed(seed)
    teacher = make_teacher()
    t_run = _train("teacher", SegTrainModule(teacher), teacher, make_teacher, cfg, train, test, label_names,
                   runs / "teacher", device)

    # Every student starts from the same initial weights and sees the same batch stream (seed); the teacher
    # it learns from is the teacher's EMA weights, as `recokd distill` loads them.
    torch.manual_seed(seed + 1)
    init_state = {k: v.clone() for k, v in make_student().state_dict().items()}
    taps = dynunet_tap_names(spec, cfg.taps)
    kd = "ReCo-KD" if cfg.method == "recokd" else cfg.method
    lambda_max = None

    def student(name: str, folder: str, method: str, cases) -> ModelResult:
        nonlocal lambda_max
        net = make_student()
        net.load_state_dict(init_state)
        if method == "none":
            run = _train(name, SegTrainModule(net), net, make_student, cfg, cases, test, label_names, runs / folder, device)
        else:
            with Distiller(t_run.ema_net, net, taps, taps, num_classes, method=method, lambda_max=cfg.lambda_max,
                           probe_shape=(1, 1, *patch)) as distiller:
                run = _train(name, DistillTrainModule(distiller), net, make_student, cfg, cases, test, label_names,
                             runs / folder, device)
                lambda_max = distiller.lambda_max
        save_weights(run.ema_net, out / f"{folder}.safetensors")
        result, preds = _evaluate(name, run, test, cfg, device, label_names)
        predictions[name] = preds
        return result

    predictions: dict = {}
    teacher_result, predictions["teacher"] = _evaluate("teacher", t_run, test, cfg, device, label_names)
    save_weights(t_run.ema_net, out / "teacher.safetensors")
    scarce = 0 < cfg.labeled_cases < cfg.train_cases
    tables = []
    if scarce:
        labelled, unlabelled = train[: cfg.labeled_cases], train[cfg.labeled_cases:]
        # the teacher labels the scans without labels, whole (sliding window), once
        teacher_labelled = [ValCase(c.name, c.image, predict_labels(t_run.ema_net, c.image, patch, device=device))
                            for c in unlabelled]
        n, m = len(labelled), len(unlabelled)
        results = [teacher_result,
                   student(f"student, {n} labelled", "student_labels_only", "none", labelled),
                   student(f"+ teacher labels of {m} unlabelled", "student_teacher_labels", "none",
                           labelled + teacher_labelled),
                   student(f"+ teacher labels + {kd}", f"student_teacher_labels_{cfg.method}", cfg.method,
                           labelled + teacher_labelled)]
        tables.append((f"Students with {n} labelled and {m} unlabelled training cases "
                       f"(the teacher learnt from all {cfg.train_cases} labelled)", results))
    if not scarce or cfg.equal_labels:
        results = [teacher_result,
                   student("student (no KD)", "student_none", "none", train),
                   student(f"student + {kd}", f"student_{cfg.method}", cfg.method, train)]
        tables.append((f"Students with all {cfg.train_cases} training cases labelled, as the teacher", results))
    for table in tables:
        for r in table[1][2:]:
            r.gap_recovered = gap_recovered(teacher_result.dice_mean, table[1][1].dice_mean, r.dice_mean)
    text = "\n\n".join(f"{title}:\n\n{format_table(results, label_names)}" for title, results in tables)
    atomic_write_text(out / "teacher_spec.json", spec.to_json())
    atomic_write_text(out / "student_spec.json", spec.student(cfg.width_factor).to_json())

    from .reporting import demo_figure  # matplotlib only when a figure is drawn

    figure = out / "demo.png"
    shown = [teacher_result] + [r for _, results in tables for r in results[1:]]
    demo_figure(figure, test, predictions, shown, label_names, [PHANTOM_LABELS.colors[n] for n in label_names])
    summary = {
        "config": {**asdict(cfg), "filters": list(cfg.filters), "lambda_max": lambda_max,
                   "training": cfg.training.to_dict()},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "tables": [{"title": title, "results": [{k: v for k, v in asdict(r).items() if k != "history"} for r in results]}
                   for title, results in tables],
        "wall_seconds": time.perf_counter() - started,
    }
    machine = f"{device}, {torch.get_num_threads()} threads"
    md = (f"# ReCoKD demo on the built-in phantom\n\n{text}\n\nMeasured on {machine}; "
          f"{cfg.test_cases} test volumes of {cfg.size}³; total wall time {summary['wall_seconds']:.0f} s.\n")
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    summary["table"] = text
    summary["output"] = str(out)
    return summary
