"""Patch sampling, metrics, a real (short) distillation on the phantom, and the demo command."""

import json

import numpy as np
import pytest
import torch

from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import generate_dataset
from ReCoKDLib.data.sampling import PatchSampler
from ReCoKDLib.distill import Distiller
from ReCoKDLib.models import build_pair, dynunet_tap_names, isotropic_spec
from ReCoKDLib.training import Case, DistillationTrainer, TrainConfig, Trainer, dice_per_class


def test_patch_sampler_oversamples_foreground_and_pads():
    label = torch.zeros(40, 40, 40, dtype=torch.long)
    label[5:7, 30:32, 10:12] = 2  # an 8-voxel structure
    image = torch.randn(1, 40, 40, 40)
    sampler = PatchSampler([image], [label], (16, 16, 16), batch_size=3, seed=1)
    hits = 0
    for _ in range(20):
        x, y = sampler.next()
        assert x.shape == (3, 1, 16, 16, 16) and y.shape == (3, 1, 16, 16, 16)
        assert (y[2] == 2).any(), "the last third of each batch must contain foreground"
        hits += int((y[0] == 2).any())
    assert hits < 20  # the rest are placed at random
    small = PatchSampler([torch.randn(1, 8, 20, 20)], [torch.ones(8, 20, 20)], (16, 16, 16), batch_size=1)
    x, y = small.next()
    assert x.shape == (1, 1, 16, 16, 16) and int((y == 0).sum()) > 0  # padded with background


def test_dice_per_class_values():
    ref = torch.zeros(4, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(ref)
    ref[0, :2] = 1  # 8 voxels
    pred[0, :1] = 1  # 4 of them
    ref[3, 3, 3] = 2
    pred[3, 3, 3] = 2
    d = dice_per_class(pred, ref, num_classes=4)
    assert d[0] == pytest.approx(2 * 4 / 12) and d[1] == pytest.approx(1.0) and np.isnan(d[2])


def test_short_distillation_on_phantom_lowers_kd_terms_and_seg_loss():
    phantoms = generate_dataset(3, seed=3, shape=(32, 32, 32))
    cases = [Case(p.name, torch.from_numpy(p.image), torch.from_numpy(p.label.astype(np.int64))) for p in phantoms]
    spec = isotropic_spec(1, 5, num_levels=3, filters=[16, 32, 64])
    torch.manual_seed(0)
    teacher, student = build_pair(spec, 4)
    # A briefly trained teacher: its features carry structure worth imitating.
    teacher_config = TrainConfig(steps=20, patch_size=(32, 32, 32), optimizer="adamw", lr=3e-3, device="cpu")
    Trainer(teacher, 5, cases, config=teacher_config).fit(progress=False)
    taps = dynunet_tap_names(spec)
    distiller = Distiller(teacher, student, taps, taps, num_classes=5, warmup_fraction=0.0)
    config = TrainConfig(steps=30, batch_size=2, patch_size=(32, 32, 32), optimizer="adamw", lr=3e-3, seed=0,
                         device="cpu")
    history = DistillationTrainer(distiller, cases, config=config).fit(progress=False)
    distiller.close()
    steps = history.steps
    assert len(steps) == 30

    def mean(key, part):
        return float(np.mean([s[key] for s in part]))

    for key in ("seg", "msard_fg", "msard_bg", "msard_att", "msca"):
        first, last = mean(key, steps[:5]), mean(key, steps[-5:])
        assert last < first, f"{key}: {first:.4f} -> {last:.4f}"


def test_demo_quick_writes_table_weights_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "-o", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "student + ReCo-KD" in printed and "gap" in printed
    for name in ("results.md", "results.json", "demo.png", "teacher.safetensors", "student_recokd.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in summary["results"]] == ["teacher", "student (no KD)", "student + ReCo-KD"]
    teacher, student = (summary["results"][i]["parameters"] for i in (0, 1))
    assert student < teacher
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--quick", "--method", "magic"], "unknown KD method 'magic'"),
        (["demo", "--quick", "--train-cases", "0"], "--train-cases must be >= 1, got 0"),
        (["demo", "--quick", "--device", "tpu"], "unknown device 'tpu'"),
        (["demo", "--quick", "--taps", "decoder", "--width-factor", "0.5"], "--width-factor must be >= 1"),
    ],
)
def test_demo_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--no-progress", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
