"""Metrics, a real (short) distillation on the phantom through the epoch loop, and the demo command."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import generate_dataset
from ReCoKDLib.data.loader import AugmentConfig, PatchBatches
from ReCoKDLib.distill import Distiller
from ReCoKDLib.models import build_pair, dynunet_tap_names, isotropic_spec
from ReCoKDLib.evaluation import dice_per_class
from ReCoKDLib.training import DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase


def test_dice_per_class_values():
    ref = torch.zeros(4, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(ref)
    ref[0, :2] = 1  # 8 voxels
    pred[0, :1] = 1  # 4 of them
    ref[3, 3, 3] = 2
    pred[3, 3, 3] = 2
    d = dice_per_class(pred, ref, num_classes=4)
    assert d[0] == pytest.approx(2 * 4 / 12) and d[1] == pytest.approx(1.0) and np.isnan(d[2])


def _loop(module, network, make, cases, steps, run_dir, val=(), **config):
    config = RunConfig(epochs=steps // 5, iters_per_epoch=5, batch_size=2, patch_size=(32, 32, 32), optimizer="adamw",
                       lr=3e-3, num_workers=0, augment=False, device="cpu", **config)
    batches = PatchBatches([c.image.numpy() for c in cases], [c.label.numpy() for c in cases], config.patch_size,
                           batch_size=2, seed=0, augment=AugmentConfig(enabled=False), length=steps)
    trainer = EpochTrainer(module, network, make, batches, val, 5, ["organ", "kidney", "vessel", "lesion"], config,
                           run_dir, {"metrics": {}}, progress=False)
    trainer.fit()
    return trainer


def _phantom_cases_and_pair(n_cases):
    """In-memory phantom cases and an untrained teacher/student pair (R = 4) of a small 3-level U-Net."""
    phantoms = generate_dataset(n_cases, seed=3, shape=(32, 32, 32))
    cases = [ValCase(p.name, torch.from_numpy(p.image), torch.from_numpy(p.label.astype(np.int64))) for p in phantoms]
    spec = isotropic_spec(1, 5, num_levels=3, filters=[16, 32, 64])
    torch.manual_seed(0)
    return cases, spec, *build_pair(spec, 4)


def test_short_distillation_on_phantom_lowers_kd_terms_and_seg_loss(tmp_path):
    """The same epoch loop as `recokd distill` (and the demo), on in-memory phantom cases."""
    cases, spec, teacher, student = _phantom_cases_and_pair(3)
    # A briefly trained teacher: its features carry structure worth imitating.
    _loop(SegTrainModule(teacher), teacher, lambda: build_pair(spec, 4)[0], cases, 20, tmp_path / "teacher")
    taps = dynunet_tap_names(spec)
    distiller = Distiller(teacher, student, taps, taps, num_classes=5, warmup_fraction=0.0)
    run = _loop(DistillTrainModule(distiller), student, lambda: build_pair(spec, 4)[1], cases, 30, tmp_path / "student",
                val=cases[:1])
    distiller.close()
    rows = run.history
    assert len(rows) == 6 and "dice_mean" in rows[-1]
    for key in ("seg", "msard_fg", "msard_bg", "msard_att", "msca"):
        first, last = rows[0][f"loss_{key}"], rows[-1][f"loss_{key}"]
        assert last < first, f"{key}: {first:.4f} -> {last:.4f}"


def test_adapter_lr_scale_puts_adapters_and_kd_terms_in_their_own_faster_group(tmp_path):
    """--adapter-lr-scale K: the adapters and KD terms (and only they) step with K times the student's rate."""
    cases, spec, teacher, student = _phantom_cases_and_pair(2)
    taps = dynunet_tap_names(spec)
    for scale, expected_groups in ((1.0, 1), (10.0, 2)):
        distiller = Distiller(teacher, student, taps, taps, num_classes=5, warmup_fraction=0.0)
        trainer = _loop(DistillTrainModule(distiller), student, lambda: build_pair(spec, 4)[1], cases, 5,
                        tmp_path / f"x{scale:g}", adapter_lr_scale=scale)
        groups = trainer.optimizer.param_groups
        assert len(groups) == expected_groups
        if scale != 1.0:
            aux = {id(p) for m in (distiller.adapters, distiller.kd_terms) for p in m.parameters() if p.requires_grad}
            assert aux and {id(p) for p in groups[1]["params"]} == aux
            assert not aux & {id(p) for p in groups[0]["params"]}
            assert groups[1]["lr"] == pytest.approx(scale * groups[0]["lr"]) and groups[0]["lr"] > 0
        distiller.close()
    with pytest.raises(Exception, match="adapter-lr-scale"):
        RunConfig(adapter_lr_scale=0)


def test_demo_quick_writes_table_weights_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "-o", str(out), "--device", "cpu", "--equal-labels"]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "+ teacher labels + ReCo-KD" in printed and "gap recovered" in printed
    assert "Students with 1 labelled and 2 unlabelled training cases" in printed
    assert "Students with all 3 training cases labelled" in printed
    for name in ("results.md", "results.json", "demo.png", "teacher.safetensors", "student_labels_only.safetensors",
                 "student_teacher_labels.safetensors", "student_teacher_labels_recokd.safetensors",
                 "student_none.safetensors", "student_recokd.safetensors"):
        assert (out / name).is_file(), name
    for run in ("teacher", "student_labels_only", "student_teacher_labels_recokd", "student_none"):  # run folders
        assert (out / "runs" / run / "log.csv").is_file() and (out / "runs" / run / "checkpoint_latest.pt").is_file()
    summary = json.loads((out / "results.json").read_text())
    scarce, equal = summary["tables"]
    assert [r["name"] for r in scarce["results"]] == ["teacher", "student, 1 labelled", "+ teacher labels of 2 unlabelled",
                                                       "+ teacher labels + ReCo-KD"]
    assert [r["name"] for r in equal["results"]] == ["teacher", "student (no KD)", "student + ReCo-KD"]
    teacher, student = (scarce["results"][i]["parameters"] for i in (0, 1))
    assert student < teacher
    # the share recovered is what the table's Dice say
    t, ref, kd = (scarce["results"][i]["dice_mean"] for i in (0, 1, 3))
    if t - ref > 1e-9:
        assert scarce["results"][3]["gap_recovered"] == pytest.approx((kd - ref) / (t - ref))
    # the students trained on what they were given: 1 labelled case, or it plus the teacher's labels of 2 more
    assert json.loads((out / "runs" / "student_labels_only" / "run.json").read_text())["config"]["epochs"] >= 1
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the overwrite rule: a second demo into the folder needs --overwrite; a folder of other files, never
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--quick", "--no-progress", "-o", str(out), "--device", "cpu"]) == 2
    assert "holds an earlier demo output; pass --overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("mine")
    assert main(["demo", "--quick", "--no-progress", "-o", str(tmp_path / "docs"), "--overwrite"]) == 2
    assert "holding other files" in capsys.readouterr().err and (tmp_path / "docs" / "notes.md").read_text() == "mine"
    assert main(["demo", "--quick", "--no-progress", "-o", str(out), "--device", "cpu", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--quick", "--method", "magic"], "unknown KD method 'magic'"),
        (["demo", "--quick", "--train-cases", "0"], "--train-cases must be >= 1, got 0"),
        (["demo", "--quick", "--device", "tpu"], "unknown device 'tpu'"),
        pytest.param(["demo", "--quick", "--device", "mps"], "no Apple Metal (MPS) device here",
                     marks=pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has MPS")),
        (["demo", "--quick", "--taps", "decoder", "--width-factor", "0.5"], "--width-factor must be >= 1"),
    ],
)
def test_demo_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--no-progress", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def _padded_fraction(augment: AugmentConfig, volume_shape, patch, n: int = 24) -> float:
    """Share of image voxels that are padding (exactly 0) in ``n`` rotated/scaled patches of a volume that
    is non-zero everywhere."""
    image = np.ones((1, *volume_shape), np.float32)
    label = np.zeros(volume_shape, np.int16)
    batches = PatchBatches([image], [label], patch, batch_size=1, seed=0,
                           augment=replace(augment, affine_prob=1.0, flip_prob=0.0, intensity_prob=0.0, gamma_prob=0.0,
                                           noise_prob=0.0, lowres_prob=0.0), length=n)
    patches = torch.cat([batches[i][0] for i in range(n)])
    return float((patches == 0).float().mean())


def test_thin_slab_patches_are_rotated_in_plane_and_carry_no_padding():
    """An 8-slice slab (ACDC-like) rotated out of plane fills its patches with padding; the presets
    rotate thin slabs in-plane only: measured here, 49 % padding with 3D rotation, 0.4 % in-plane."""
    volume, patch = (8, 96, 96), (8, 48, 48)
    assert AugmentConfig.preset("nnunet", patch).in_plane_only and not AugmentConfig.preset("nnunet", (32, 48, 48)).in_plane_only
    full_3d = _padded_fraction(AugmentConfig(in_plane_only=False), volume, patch)
    in_plane = _padded_fraction(AugmentConfig.preset("nnunet", patch), volume, patch)
    # what remains in-plane is the volume's own border (zero-padded there, as nnU-Net does), not other slices
    assert full_3d > 0.2 and in_plane < 0.01, (full_3d, in_plane)


def test_augment_presets_and_old_run_files():
    from ReCoKDLib.training.loop import RunConfig

    assert not AugmentConfig.preset("none").enabled
    light = AugmentConfig.preset("light", (32, 32, 32))
    assert light.mirror_axes == () and light.in_plane_only and light.noise_prob == 0
    assert AugmentConfig.preset("nnunet", (32, 32, 32)) == AugmentConfig()  # the default is unchanged
    assert RunConfig.from_dict({"augment": True}).augment == "nnunet" and RunConfig.from_dict({"augment": False}).augment == "none"


def test_students_of_every_method_start_alike(tmp_path, monkeypatch):
    """The paired design of a study: with one seed, every KD method's student starts from the same
    weights and sees the same batches as the no-KD student, so their difference is the method's."""
    from ReCoKDLib.data.loader import batch_loader
    from ReCoKDLib.data.phantom import save_dataset_nnunet
    from ReCoKDLib.training.loop import EpochTrainer

    data = save_dataset_nnunet(generate_dataset(4, seed=3, shape=(32, 32, 32)), tmp_path / "ds")
    common = ["--cache", str(tmp_path / "cache"), "--epochs", "1", "--iters-per-epoch", "1", "--patch-size", "16", "32", "32",
              "--workers", "0", "--threads", "1", "--no-progress", "--val-max-cases", "1", "--seed", "4"]
    assert main(["train", str(data), "-o", str(tmp_path / "teacher"), *common, "--patch-budget", "32768",
                 "--base-filters", "8", "--max-filters", "32"]) == 0
    seen = {}

    def record_start(self, stop_after_epochs=None):
        images, labels = next(iter(batch_loader(self.data, 0, 1)))
        seen[self.name] = ({k: v.clone() for k, v in self.network.state_dict().items()}, images, labels)
        return []

    monkeypatch.setattr(EpochTrainer, "fit", record_start)
    for method in ("none", "recokd", "logit", "cwd"):
        assert main(["distill", str(data), "-o", str(tmp_path / method), "--teacher", str(tmp_path / "teacher"),
                     "--method", method, *common]) == 0
    base_state, base_images, base_labels = seen.pop("student none")
    assert len(seen) == 3
    for name, (state, images, labels) in seen.items():
        assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state), name
        assert torch.equal(images, base_images) and torch.equal(labels, base_labels), name


def test_demo_table_reports_the_gap_per_class_where_there_is_one():
    from ReCoKDLib.workflows.demo import ModelResult, format_table, gap_recovered

    def model(name, organ, lesion):
        return ModelResult(name, {"organ": organ, "lesion": lesion}, (organ + lesion) / 2, 10, 0.1, 1.0)

    rows = [model("teacher", 0.97, 0.90), model("plain", 0.965, 0.67), model("kd", 0.96, 0.785)]
    text = format_table(rows, ["organ", "lesion"])
    assert gap_recovered(0.935, 0.8175, 0.8725) == pytest.approx(0.468, abs=1e-3)
    assert "| kd | 0.960 | 0.785 | 0.873 | 46.8 % |" in text  # the share, in the student's row
    last = text.splitlines()[-1]
    assert "between 'plain' and the teacher" in last
    assert "kd: lesion 50 % of 0.230" in last and "organ" not in last  # the organ's 0.005 gap is not a gap


def test_foreground_fraction_is_a_checked_training_option():
    from ReCoKDLib.errors import ReCoKDError
    from ReCoKDLib.training.loop import RunConfig
    from ReCoKDLib.workflows.runs import _CLI_TO_CONFIG

    assert _CLI_TO_CONFIG["foreground_fraction"] == "foreground_fraction"  # --foreground-fraction reaches RunConfig
    assert RunConfig(foreground_fraction=1.0).foreground_fraction == 1.0
    with pytest.raises(ReCoKDError, match="--foreground-fraction must be between 0 and 1, got 1.5"):
        RunConfig(foreground_fraction=1.5)
    # the command line refuses it before any data is read: one argparse line, exit 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "nowhere", "-o", "out", "--foreground-fraction", "1.5"])
    assert exit_info.value.code == 2


def test_demo_options_reach_the_demo_and_its_training(monkeypatch):
    import ReCoKDLib.workflows.demo as demo

    seen = {}

    def fake_run_demo(cfg):
        seen["cfg"] = cfg
        return {"table": "", "output": "x", "wall_seconds": 0.0, "device": "cpu", "torch_threads": 1}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--steps", "7", "--seed", "3", "--threads", "1", "--augment", "light", "--device", "cpu",
                 "--width-factor", "8", "--no-progress"]) == 0
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.width_factor, cfg.progress) == (7, 8, False)
    t = cfg.training
    assert (t.seed, t.num_threads, t.augment, t.device) == (3, 1, "light", "cpu")
    assert t.optimizer == "adamw" and t.patch_size == (48, 48, 48)  # the demo's own training defaults stay


def test_validation_on_fixed_patches_each_epoch_and_whole_cases_at_the_end(tmp_path, monkeypatch):
    """--val-patches N: every epoch is scored on the same N patches (pseudo-Dice), the final weights once on
    whole cases (run.json's final_case_dice_mean)."""
    import csv
    import json

    from ReCoKDLib.cli import main
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet
    from ReCoKDLib.training.loop import ValCase, validation_patches

    cases = [ValCase(f"c{i}", torch.randn(1, 20, 24, 28), torch.zeros(20, 24, 28, dtype=torch.long)) for i in range(2)]
    cases[1].label[5:8, 6:9, 7:10] = 2
    a, b = validation_patches(cases, (16, 16, 32), 4, seed=3), validation_patches(cases, (16, 16, 32), 4, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the same patches every epoch
    assert a[0].shape == (4, 1, 16, 16, 32) and a[1].shape == (4, 16, 16, 32)  # W padded from 28 to 32
    assert a[1].dtype == torch.uint8  # kept for the whole run: 8x smaller than int64
    assert (a[1][3] == 2).any()  # the fourth patch: case 1, centred on its labelled voxels

    from ReCoKDLib.training.loop import EpochTrainer

    calls = {"patches": 0, "cases": 0}
    for kind in calls:
        real = getattr(EpochTrainer, f"validate_{kind}")
        monkeypatch.setattr(EpochTrainer, f"validate_{kind}",
                            lambda self, real=real, kind=kind: calls.__setitem__(kind, calls[kind] + 1) or real(self))
    saved, real_save = [], EpochTrainer.save_checkpoint
    monkeypatch.setattr(EpochTrainer, "save_checkpoint", lambda self, which, *a, **k: saved.append(which) or
                        real_save(self, which, *a, **k))
    data = save_dataset_nnunet(generate_dataset(3, seed=2, shape=(32, 32, 32)), tmp_path / "ds")
    run = tmp_path / "run"
    assert main(["train", str(data), "-o", str(run), "--cache", str(tmp_path / "cache"), "--epochs", "2",
                 "--iters-per-epoch", "2", "--patch-size", "16", "32", "32", "--workers", "0", "--threads", "1",
                 "--no-progress", "--patch-budget", "32768", "--max-filters", "32", "--base-filters", "8",
                 "--val-patches", "4"]) == 0
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert len(rows) == 2 and all(row["dice_mean"] != "" for row in rows)
    metrics = json.loads((run / "run.json").read_text())["metrics"]
    assert 0 <= metrics["final_case_dice_mean"] <= 1 and set(metrics["final_case_dice_per_class"]) >= {"organ"}
    assert calls == {"patches": 2, "cases": 1}  # each epoch on patches, whole cases once at the end
    # one checkpoint per epoch: none before a patch validation (only whole cases can run out of memory)
    assert saved.count("latest") == 2
    # out of memory scoring whole cases at the end: the final weights are written all the same
    def no_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(EpochTrainer, "validate_cases", no_memory)
    again = tmp_path / "run2"
    assert main(["train", str(data), "-o", str(again), "--cache", str(tmp_path / "cache"), "--epochs", "1",
                 "--iters-per-epoch", "2", "--patch-size", "16", "32", "32", "--workers", "0", "--threads", "1",
                 "--no-progress", "--patch-budget", "32768", "--max-filters", "32", "--base-filters", "8",
                 "--val-patches", "4"]) == 0
    assert (again / "model_final.safetensors").is_file()
    assert "final_case_dice_mean" not in json.loads((again / "run.json").read_text())["metrics"]


def test_the_gpu_preset_sets_nnunets_schedule_where_the_command_line_is_silent():
    from ReCoKDLib.cli import build_parser
    from ReCoKDLib.workflows.runs import RunSpec, gpu_preset

    def spec(*argv, role="teacher"):
        command = "train" if role == "teacher" else "distill"
        extra = ["--teacher", "T"] if role == "student" else []
        return RunSpec.from_args(build_parser().parse_args([command, "DATA", "-o", "OUT", *extra, *argv]), role)

    gpu = spec("--preset", "gpu", "--epochs", "5")
    assert gpu.training["epochs"] == 5  # given: kept
    assert (gpu.training["iters_per_epoch"], gpu.training["augment"], gpu.training["val_patches"]) == (250, "nnunet", 100)
    assert 2 <= gpu.training["num_workers"] <= 12
    assert (gpu.planner.patch_budget, gpu.planner.base_filters, gpu.planner.max_filters) == (128 ** 3, 32, 320)
    assert spec("--preset", "gpu", "--patch-budget", "65536").planner.patch_budget == 65536
    student = spec("--preset", "gpu", role="student")
    assert student.training["iters_per_epoch"] == 250 and student.training["augment"] == "nnunet"
    cpu = spec()  # the default preset: nothing added
    assert "iters_per_epoch" not in cpu.training and cpu.planner.patch_budget is None
    assert gpu_preset(cores=64)[0]["num_workers"] == 12 and gpu_preset(cores=2)[0]["num_workers"] == 2


def test_compile_wraps_the_training_step_and_may_change_on_resume(tmp_path, monkeypatch):
    """--compile hands the step's module to torch.compile (stood in for here: compiling takes minutes on a
    CPU); the checkpoint keeps the plain module's names, and --resume may add or drop it."""
    import json

    from ReCoKDLib.cli import main
    from ReCoKDLib.data.phantom import save_dataset_nnunet

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(type(module).__name__) or module)
    data = save_dataset_nnunet(generate_dataset(3, seed=3, shape=(32, 32, 32)), tmp_path / "ds")
    args = ["train", str(data), "--cache", str(tmp_path / "cache"), "--patch-size", "16", "16", "16",
            "--iters-per-epoch", "2", "--threads", "1", "--no-progress", "--workers", "0", "--base-filters", "8",
            "--max-filters", "16", "--max-levels", "3", "-o", str(tmp_path / "run")]
    assert main([*args, "--epochs", "2", "--stop-after-epochs", "1", "--compile"]) == 0
    assert compiled == ["SegTrainModule"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["compile"] is True
    state = torch.load(tmp_path / "run" / "checkpoint_latest.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    assert main([*args, "--epochs", "2", "--resume"]) == 0 and compiled == ["SegTrainModule"]  # dropped
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["compile"] is False


def test_benchmark_train_prints_the_breakdown_and_says_what_it_did_not_measure(capsys):
    """``recokd benchmark-train``: teacher training / teacher forward / student / distillation rows and the KD
    overhead ratio; peak memory skipped with ``--no-memory`` is said so, not printed as 0."""
    from ReCoKDLib.cli import main

    assert main(["benchmark-train", "--patch-size", "16", "16", "16", "--batch-size", "1", "--levels", "3",
                 "--methods", "logit", "--iters", "1", "--warmup", "0", "--no-memory", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"teacher training", "teacher forward", "student (no KD)", "distill logit"} <= set(rows)
    assert all("not measured" in rows[name] for name in ("teacher forward", "distill logit"))
    assert re.search(r"\| distill logit \|.*\| \d+\.\d\d [✓✗] \|", rows["distill logit"])


def test_plain_training_is_told_whether_a_batch_has_left_out_voxels():
    """SegTrainModule learns from the host's look at the batch whether any voxel is IGNORE_LABEL (the masked
    loss then), instead of asking the device each step; labels with left-out voxels still train."""
    from ReCoKDLib.training.loop import SegTrainModule
    from ReCoKDLib.models import build_unet
    from ReCoKDLib.utils.labels import IGNORE_LABEL

    torch.manual_seed(0)
    module = SegTrainModule(build_unet(isotropic_spec(1, 3, num_levels=3, filters=(4, 8, 16))))
    labels = torch.randint(0, 3, (1, 1, 16, 16, 16), dtype=torch.uint8)
    assert module.check_batch(labels) is False
    labels[:, :, :8] = IGNORE_LABEL
    assert module.check_batch(labels) is True
    images = torch.randn(1, 1, 16, 16, 16)
    loss, _ = module(images, labels.long(), 0.0, checked=module.check_batch(labels))
    assert torch.isfinite(loss)
    assert float(module(images, labels.long(), 0.0, checked=True)[0].detach()) == pytest.approx(
        float(module(images, labels.long(), 0.0)[0].detach()), rel=1e-6)  # the same as the loss looking itself
