"""A fast student at a coarser grid than its teacher (``recokd distill --student-spacing-factor F``): its plan
and topology, the teacher seeing the patch upsampled with its outputs averaged back, taps paired by
resolution, and a bundle that predicts on the input's grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ReCoKDLib.cli import main
from ReCoKDLib.data.planning import coarser_plans
from ReCoKDLib.deployment.bundle import load_bundle
from ReCoKDLib.distill.distiller import Distiller
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.models.unet import build_unet, dynunet_tap_names

MODELS = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"


def test_the_coarser_plan_keeps_the_field_of_view_and_meets_the_teachers_levels():
    la = load_bundle(MODELS / "la2018-left-atrium.recokd")
    plans, spec, scale = coarser_plans(la.plans, la.spec, 2)
    assert scale == (2, 2, 2) and plans.target_spacing == (2.5, 2.5, 2.5) and plans.patch_size == (20, 20, 20)
    assert plans.planner["spacing_factor"] == 2 and plans.planner["teacher_scale"] == [2, 2, 2]
    assert spec.num_levels >= 3 and all(p % d == 0 for p, d in zip(plans.patch_size, spec.divisor))
    # ACDC's few slices keep their spacing; in-plane the teacher's first down-sampling is the coarser grid's
    acdc = load_bundle(MODELS / "acdc-heart.recokd")
    plans, spec, scale = coarser_plans(acdc.plans, acdc.spec, 2)
    assert scale == (1, 2, 2) and plans.patch_size == (8, 48, 40)
    assert spec.strides[1] == (2, 1, 1) and tuple(spec.strides[2:]) == tuple(acdc.spec.strides[2:])
    assert coarser_plans(acdc.plans, acdc.spec, 1) == (acdc.plans, acdc.spec, (1, 1, 1))
    with pytest.raises(ReCoKDError, match="must be 1, 2, 4 or 8, got 3"):
        coarser_plans(acdc.plans, acdc.spec, 3)


def test_a_scaled_teacher_sees_the_patch_upsampled_and_its_outputs_reach_the_students_grid():
    acdc = load_bundle(MODELS / "acdc-heart.recokd")
    plans, topology, scale = coarser_plans(acdc.plans, acdc.spec, 2)
    torch.manual_seed(0)
    teacher, student = build_unet(acdc.spec).eval(), build_unet(topology.student(2))
    distiller = Distiller(teacher, student, dynunet_tap_names(acdc.spec), dynunet_tap_names(topology), 4, "recokd",
                          teacher_scale=scale)
    # taps paired by resolution: every pair's teacher stride is the scale times the student's
    assert distiller.teacher_info and len(distiller.teacher_info) == len(distiller.student_info)
    for t, s in zip(distiller.teacher_info, distiller.student_info):
        assert tuple(t.stride) == tuple(a * b for a, b in zip(s.stride, scale))
    x = torch.randn(2, 1, *plans.patch_size)
    with torch.no_grad():
        got = distiller._teacher_logits(x)
        up = F.interpolate(x, scale_factor=scale, mode="trilinear", align_corners=False)
        expected = torch.log(F.avg_pool3d(torch.softmax(teacher(up), 1), scale, scale).clamp_min(1e-8))
    assert got.shape == (2, 4, *plans.patch_size) and torch.allclose(got, expected, atol=1e-5)
    labels = torch.randint(0, 4, (2, 1, *plans.patch_size))
    out = distiller(x, labels, 1.0)
    assert {"seg", "msard_fg", "msca"} <= set(out.terms) and torch.isfinite(out.loss)
    out.loss.backward()  # the student learns through every term
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_distilling_a_fast_student_gives_a_bundle_that_predicts_on_the_inputs_grid(tmp_path, capsys):
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    dataset = save_dataset_nnunet(generate_dataset(3, seed=5, shape=(48, 48, 48)), tmp_path / "ds")
    tiny = ["--epochs", "1", "--iters-per-epoch", "2", "--workers", "0", "--threads", "1", "--no-progress",
            "--val-max-cases", "1", "--cache", str(tmp_path / "cache")]
    assert main(["train", str(dataset), "-o", str(tmp_path / "teacher"), *tiny, "--patch-budget", "32768",
                 "--max-filters", "32", "--base-filters", "8"]) == 0
    fast = tmp_path / "fast"
    command = ["distill", str(dataset), "--teacher", str(tmp_path / "teacher"), "-o", str(fast), *tiny,
               "--student-spacing-factor", "2"]
    assert main(command) == 0, capsys.readouterr().err
    run = json.loads((fast / "run.json").read_text())
    assert (run["student_spacing_factor"], run["teacher_scale"]) == (2, [2, 2, 2])
    teacher_plan = json.loads((tmp_path / "teacher" / "plans.json").read_text())
    student_plan = json.loads((fast / "plans.json").read_text())
    assert student_plan["target_spacing"] == [2 * s for s in teacher_plan["target_spacing"]]
    assert main(["export", str(fast), "-o", str(tmp_path / "fast.recokd")]) == 0
    image = dataset / "imagesTr" / "phantom_000_0000.nii.gz"
    out = tmp_path / "pred.nii.gz"
    capsys.readouterr()
    assert main(["predict", "-m", str(tmp_path / "fast.recokd"), "-i", str(image), "-o", str(out), "--no-progress",
                 "--backend", "torch"]) == 0
    assert "warning" not in capsys.readouterr().err  # the training field of view is the teacher's, in mm
    labels, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(image))
    assert labels.GetSize() == source.GetSize() and labels.GetSpacing() == source.GetSpacing()
    # the factor is part of the run: resuming with another is refused; unlabeled scans are not combined yet
    assert main([*command[:-1], "4", "--resume"]) == 2
    assert "--student-spacing-factor 4 (run: 2)" in capsys.readouterr().err
    assert main([*command[:5], str(tmp_path / "other"), *command[6:], "--unlabeled", str(dataset)]) == 2
    assert "does not combine with --unlabeled" in capsys.readouterr().err


def test_a_scaled_teacher_without_paired_taps_still_distils_logits_and_its_memory_is_counted_upsampled():
    from ReCoKDLib.training.memory import estimate_training_bytes

    acdc = load_bundle(MODELS / "acdc-heart.recokd")
    plans, topology, scale = coarser_plans(acdc.plans, acdc.spec, 2)
    teacher, student = build_unet(acdc.spec).eval(), build_unet(topology.student(2))
    # the teacher tapped at its input only (stride 1): no student level meets it
    logit = Distiller(teacher, student, ["input_block"], ["input_block"], 4, "logit", teacher_scale=scale)
    assert logit.teacher_info == [] and "logit_kd" in logit(torch.randn(1, 1, *plans.patch_size),
                                                           torch.randint(0, 4, (1, 1, *plans.patch_size))).terms
    with pytest.raises(ReCoKDError, match="no student tap meets a teacher tap at an equal grid"):
        Distiller(teacher, student, ["input_block"], ["input_block"], 4, "recokd", teacher_scale=scale)
    spec = topology.student(4)
    assert estimate_training_bytes(spec, plans.patch_size, 2, acdc.spec, teacher_scale=scale) > \
        estimate_training_bytes(spec, plans.patch_size, 2, acdc.spec)
