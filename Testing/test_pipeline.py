"""plan → train → distill end to end through the CLI on a tiny phantom dataset; splits; the batch stream."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ReCoKDLib.cli import main
from ReCoKDLib.data.loader import AugmentConfig, PatchBatches, batch_loader
from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet
from ReCoKDLib.models import UNetSpec, build_unet, load_weights
from ReCoKDLib.training.splits import fixed_split, kfold_split

TINY = ["--epochs", "2", "--iters-per-epoch", "2", "--patch-size", "16", "32", "32", "--threads", "1",
        "--no-progress", "--workers", "0"]
PLANNER = ["--patch-budget", "32768", "--max-levels", "4", "--base-filters", "8", "--max-filters", "32"]
RUN_FILES = ["run.json", "plans.json", "network.json", "checkpoint_latest.pt", "checkpoint_best.pt",
             "model_best.safetensors", "model_final.safetensors", "log.csv", "curves.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = save_dataset_nnunet(generate_dataset(5, shape=(32, 32, 32)), root / "ds")
    cache = root / "cache"
    assert main(["plan", str(data), "--cache", str(cache), *PLANNER, "--no-progress"]) == 0
    assert (cache / "plans.json").is_file()
    teacher = root / "teacher"
    assert main(["train", str(data), "-o", str(teacher), "--cache", str(cache), *TINY]) == 0
    student = root / "student"
    assert main(["distill", str(data), "--teacher", str(teacher), "-o", str(student), "--cache", str(cache),
                 "--method", "recokd", "--width-factor", "2", "--temperature", "0.5", *TINY]) == 0
    return {"data": data, "cache": cache, "teacher": teacher, "student": student}


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_run_folder_has_every_file_and_loads_safely(runs, role):
    run = runs[role]
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["version"] == 1 and info["role"] == role
    assert info["labels"]["organ"] == 1 and info["channel_names"] == {"0": "MRI"}
    assert info["fold"] == 0 and info["seed"] == 0 and info["config"]["epochs"] == 2
    assert set(info["metrics"]) == {"best_epoch", "best_dice_mean", "dice_per_class"}
    assert set(info["metrics"]["dice_per_class"]) == {"organ", "kidney", "vessel", "lesion"}
    if role == "student":
        assert info["method"] == "recokd" and info["width_factor"] == 2.0 and info["lambda_max"] == 1.0
        assert info["teacher_run"] == str(runs["teacher"].resolve()) and info["taps"] == "encoder"
    else:
        assert info["method"] == "none" and info["teacher_run"] is None
    for which in ("latest", "best"):
        ckpt = torch.load(run / f"checkpoint_{which}.pt", weights_only=True)
        assert {"model", "trainable", "ema", "optimizer", "rng", "sampler", "epoch", "step"} <= set(ckpt)
    assert torch.load(run / "checkpoint_latest.pt", weights_only=True)["step"] == 4
    spec = UNetSpec.from_json((run / "network.json").read_text())
    net = load_weights(build_unet(spec), run / "model_best.safetensors")
    assert net.eval()(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 5, 16, 32, 32)
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"lr", "loss_seg", "loss_total", "dice_organ", "dice_mean", "seconds"} <= set(rows[0])
    if role == "student":
        assert {"loss_msard_fg", "loss_msca"} <= set(rows[0])


def test_student_is_narrower_than_teacher(runs):
    t = UNetSpec.from_json((runs["teacher"] / "network.json").read_text())
    s = UNetSpec.from_json((runs["student"] / "network.json").read_text())
    assert s.filters == tuple(max(f // 2, 8) for f in t.filters)


def test_cli_errors_are_one_line(runs, capsys, tmp_path):
    common = [str(runs["data"]), "--cache", str(runs["cache"]), *TINY]
    assert main(["train", *common, "-o", str(runs["teacher"])]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["distill", *common, "-o", str(tmp_path / "s")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert main(["distill", *common, "-o", str(tmp_path / "s"), "--teacher", str(runs["student"])]) == 2
    assert "not a teacher run" in capsys.readouterr().err
    assert main(["train", *common, "-o", str(tmp_path / "t"), "--fold", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fold 7") and err.count("\n") == 1


def test_resume_of_a_finished_run_does_nothing(runs, capsys):
    before = (runs["student"] / "checkpoint_latest.pt").stat().st_mtime_ns
    assert main(["distill", str(runs["data"]), "-o", str(runs["student"]), "--cache", str(runs["cache"]),
                 "--resume", "--threads", "1", "--no-progress"]) == 0
    assert "finished already" in capsys.readouterr().out
    assert (runs["student"] / "checkpoint_latest.pt").stat().st_mtime_ns == before


def test_kfold_split_is_deterministic_disjoint_and_covering(tmp_path):
    ids = [f"case_{i:02d}" for i in range(12)]
    folds = [kfold_split(list(reversed(ids)), k, seed=3) for k in range(5)]
    assert folds == [kfold_split(ids, k, seed=3) for k in range(5)]
    vals = [v for _, v in folds]
    assert sorted(sum(vals, [])) == ids
    for train, val in folds:
        assert not set(train) & set(val) and sorted(train + val) == ids
    assert kfold_split(ids, "all") == (ids, ids)
    (tmp_path / "val.txt").write_text("# validation\ncase_03\ncase_07\n")
    train, val = fixed_split(ids, tmp_path / "val.txt")
    assert val == ["case_03", "case_07"] and len(train) == 10


def test_batches_are_a_pure_function_of_the_index_and_oversample_foreground():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(1, 40, 40, 40)).astype(np.float32) for _ in range(2)]
    labels = [np.zeros((40, 40, 40), np.uint8) for _ in range(2)]
    labels[0][5:7, 30:32, 2:4] = 3  # one tiny structure in one case
    ds = PatchBatches(images, labels, (16, 16, 16), batch_size=3, seed=1, augment=AugmentConfig(), length=12)
    # uint8 label maps (the memory-mapped cache's) are read in place, not copied into each process
    assert all(np.shares_memory(a, b) for a, b in zip(ds.labels, labels))
    first = [ds[i] for i in range(6)]
    again = [b for b in batch_loader(ds, 0, 6, num_workers=2)]
    for (a_img, a_lab), (b_img, b_lab) in zip(first, again):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
        assert a_img.shape == (3, 1, 16, 16, 16) and a_lab.dtype == torch.uint8  # 8x less to copy than int64
        assert set(a_lab.unique().tolist()) <= {0, 3}
    assert not torch.equal(first[0][0], first[1][0])
    wide = [np.full((40, 40, 40), 300, np.int16) for _ in range(2)]  # a label value beyond uint8
    assert PatchBatches(images, wide, (16, 16, 16), batch_size=1, seed=1, length=1)[0][1].dtype == torch.int16
    plain = PatchBatches(images, labels, (16, 16, 16), batch_size=3, seed=1, augment=None, length=40)
    # the last patch of every batch is centred on a foreground voxel whenever its case has one
    hits = sum(int((plain[i][1][2] == 3).any()) for i in range(40))
    assert hits >= 10


def _crop_real_dataset(src, dst, num_cases=3, size=(32, 48, 48)):
    """Small crops (around the label's centre) of a few real cases, written as an nnU-Net dataset."""
    import SimpleITK as sitk

    meta = json.loads((src / "dataset.json").read_text())
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for label_path in sorted((src / "labelsTr").glob("*.nii.gz"))[:num_cases]:
        case = label_path.name[: -len(".nii.gz")]
        label = sitk.ReadImage(str(label_path))
        image = sitk.ReadImage(str(src / "imagesTr" / f"{case}_0000.nii.gz"))
        arr = sitk.GetArrayFromImage(label)
        centre = np.argwhere(arr > 0).mean(0).astype(int)
        lo = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, arr.shape)]
        index = [int(v) for v in reversed(lo)]  # SimpleITK (x, y, z)
        extent = [int(v) for v in reversed(size)]
        sitk.WriteImage(sitk.RegionOfInterest(image, extent, index), str(dst / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.RegionOfInterest(label, extent, index), str(dst / "labelsTr" / f"{case}.nii.gz"))
    meta["numTraining"] = num_cases
    meta.pop("numTest", None)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_train_on_small_crops_of_real_data(shared_data, tmp_path):
    src = shared_data / "LA2018-lowres"
    if not src.is_dir():
        pytest.skip("LA2018-lowres not available")
    data = _crop_real_dataset(src, tmp_path / "la_crops")
    run = tmp_path / "la_teacher"
    assert main(["train", str(data), "-o", str(run), "--cache", str(tmp_path / "cache"), *PLANNER,
                 "--epochs", "1", "--iters-per-epoch", "2", "--patch-size", "16", "32", "32", "--threads", "1",
                 "--no-progress", "--workers", "0", "--fold", "all"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["dataset_name"] == "LA2018-lowres" and info["fold"] == "all"
    assert list(info["metrics"]["dice_per_class"]) == ["left_atrium"]
    assert torch.load(run / "checkpoint_best.pt", weights_only=True)["epoch"] == 1


def test_rotated_patches_are_resampled_from_a_larger_crop():
    images = [np.ones((1, 96, 96, 96), np.float32)]
    labels = [np.zeros((96, 96, 96), np.uint8)]
    labels[0][40:56, 40:56, 40:56] = 1
    only_affine = AugmentConfig(affine_prob=1.0, flip_prob=0.0, intensity_prob=0.0, gamma_prob=0.0, noise_prob=0.0,
                                lowres_prob=0.0, rotate_degrees=30.0)
    ds = PatchBatches(images, labels, (16, 24, 24), batch_size=2, foreground_fraction=1.0, seed=0,
                      augment=only_affine, length=4)
    for i in range(4):
        img, lab = ds[i]
        assert img.shape == (2, 1, 16, 24, 24) and lab.shape == (2, 1, 16, 24, 24)
        # foreground-centred patches in the middle of a uniform volume: no empty corners after rotation
        assert torch.allclose(img, torch.ones_like(img), atol=1e-4)
        assert set(lab.unique().tolist()) <= {0, 1} and bool((lab == 1).any())


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_the_run_plan_is_the_trained_one_and_prediction_reproduces_validation_dice(runs, role, tmp_path):
    """One owner for the patch: the run's plans.json holds the patch it trained with (here --patch-size,
    not the planned one), and network.json alone describes its network; so the exported bundle predicts with the training window,
    and `recokd predict` + `recokd evaluate` on the validation case give the validation Dice of run.json."""
    from ReCoKDLib.data.planning import Plans
    from ReCoKDLib.deployment.bundle import export_run, load_bundle

    run = runs[role]
    info = json.loads((run / "run.json").read_text())
    plans = Plans.load(run / "plans.json")
    assert list(plans.patch_size) == info["config"]["patch_size"] == [16, 32, 32]
    assert "network" not in json.loads((run / "plans.json").read_text())  # network.json is the only description
    UNetSpec.from_json((run / "network.json").read_text())
    assert list(Plans.load(runs["cache"] / "plans.json").patch_size) != [16, 32, 32]  # the planned one differs
    bundle = load_bundle(export_run(run, tmp_path / f"{role}.recokd"))
    assert list(bundle.plans.patch_size) == [16, 32, 32]
    (val,) = info["val_cases"]
    (tmp_path / "pred").mkdir()
    assert main(["predict", "-m", str(tmp_path / f"{role}.recokd"), "-i", str(runs["data"] / "imagesTr" / f"{val}_0000.nii.gz"),
                 "-o", str(tmp_path / "pred" / f"{val}.nii.gz"), "--device", "cpu", "--no-progress"]) == 0
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / f"{val}.nii.gz").symlink_to(runs["data"] / "labelsTr" / f"{val}.nii.gz")
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", str(runs["data"] / "dataset.json"),
                 "--json", str(tmp_path / "e.json")]) == 0
    scored = json.loads((tmp_path / "e.json").read_text())["mean"]["dice"]
    validated = info["metrics"]["dice_per_class"]
    assert sum(v is not None and v > 0 for v in validated.values()) >= 1, validated  # something to compare
    for name, value in validated.items():
        if value is not None:
            assert scored[name] == pytest.approx(value, abs=1e-4), name
