"""Prediction: geometry (direction, anisotropic spacing, origin), files and folders, bad input, fallbacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import ReCoKDLib.inference.predictor as predictor_module
from bundle_helpers import ThresholdNet, make_run, phantom_volume, threshold_bundle, tiny_network, tiny_plans, write_image
from ReCoKDLib.models import build_unet, isotropic_spec
from ReCoKDLib.deployment.bundle import export_run
from ReCoKDLib.cli import main
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.data.datasets import group_cases
from ReCoKDLib.inference.predictor import Predictor, orientation_to

# axes permuted and flipped: image x runs along physical -y, y along +z, z along -x
DIRECTION = (0.0, 0.0, -1.0,
             -1.0, 0.0, 0.0,
             0.0, 1.0, 0.0)
SPACING = (0.9, 1.3, 2.6)  # anisotropic (x, y, z)
ORIGIN = (12.5, -40.0, 7.25)


def _sphere_in_geometry(shape, spacing, origin, direction, centre, radius):
    """Label (D, H, W) of a physical sphere, drawn voxel by voxel in the given geometry."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    idx = np.stack([i, j, k], -1).reshape(-1, 3) * np.asarray(spacing)
    points = np.asarray(origin) + idx @ np.asarray(direction).reshape(3, 3).T
    return (np.linalg.norm(points - np.asarray(centre), axis=1) < radius).reshape(shape).astype(np.uint8)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("reference", [None, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)])
def test_geometry_labels_come_back_aligned(tmp_path, reference):
    shape = (14, 26, 30)  # (D, H, W)
    centre = np.asarray(ORIGIN) + np.asarray(DIRECTION).reshape(3, 3) @ (np.asarray(SPACING) * np.array([14, 13, 7]))
    truth = _sphere_in_geometry(shape, SPACING, ORIGIN, DIRECTION, centre, radius=13.0)
    assert 0.05 < truth.mean() < 0.5
    rng = np.random.default_rng(1)
    image = (truth + 0.2 + 0.02 * rng.standard_normal(shape)).astype(np.float32)
    bundle = threshold_bundle(target_spacing=(1.5, 1.1, 1.7), reference_direction=reference)
    predictor = Predictor(bundle, device="cpu", network=ThresholdNet())
    labels = predictor.predict_array(image, SPACING, ORIGIN, DIRECTION)
    assert labels.shape == shape
    assert _dice(labels == 1, truth == 1) >= 0.95
    # the same through a file: output written with the input's exact geometry
    src = write_image(image, tmp_path / "case_0000.nrrd", SPACING, ORIGIN, DIRECTION)
    out = predictor.predict_files([src], tmp_path / "out" / "case.nrrd")
    written = sitk.ReadImage(str(out))
    assert written.GetSpacing() == pytest.approx(SPACING) and written.GetOrigin() == pytest.approx(ORIGIN)
    assert written.GetDirection() == pytest.approx(DIRECTION)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)


def test_orientation_keeps_physical_points():
    o = orientation_to(DIRECTION, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    img = sitk.GetImageFromArray(arr)
    img.SetDirection(DIRECTION)
    img.SetSpacing(SPACING)
    ref = sitk.DICOMOrient(img, "LPS")  # SimpleITK's own exact reorientation to the identity direction
    np.testing.assert_array_equal(o.apply(arr), sitk.GetArrayFromImage(ref))
    np.testing.assert_array_equal(o.invert(o.apply(arr)), arr)
    assert o.spacing(SPACING[::-1]) == pytest.approx(ref.GetSpacing()[::-1])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return export_run(make_run(root / "run", plans=tiny_plans(num_classes=3)), root / "m.recokd")


def test_cli_folder_and_file(tmp_path, model_path):
    inp = tmp_path / "in"
    for name in ("a", "b"):
        write_image(phantom_volume((20, 20, 20), seed=len(name)), inp / f"{name}_0000.nii.gz", (1.2, 1.0, 0.8))
    assert group_cases(inp) == {"a": [inp / "a_0000.nii.gz"], "b": [inp / "b_0000.nii.gz"]}
    assert main(["predict", "-m", str(model_path), "-i", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress", "--threads", "1"]) == 0
    for name in ("a", "b"):
        img = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert img.GetSize() == (20, 20, 20) and img.GetSpacing() == pytest.approx((1.2, 1.0, 0.8))
    assert main(["predict", "-m", str(model_path), "-i", str(inp / "a_0000.nii.gz"), "-o", str(tmp_path / "single"),
                 "--device", "cpu", "--no-progress", "--tta"]) == 0
    assert (tmp_path / "single" / "a.nii.gz").is_file()


@pytest.mark.parametrize(
    "array, message",
    [
        (np.ones((20, 20), np.float32), "2D image"),
        (np.ones((2, 16, 16, 16), np.float32), "2 channel"),
        (np.full((16, 16, 16), 3.0, np.float32), "constant"),
        (np.where(np.eye(16)[None] > 0, np.nan, 1.0).repeat(16, 0).astype(np.float32), "NaN"),
        (np.random.default_rng(0).random((1, 16, 16)).astype(np.float32), "single slice"),
    ],
)
def test_bad_arrays_give_one_line(model_path, array, message):
    predictor = Predictor(model_path, device="cpu")
    with pytest.raises(ReCoKDError, match=message) as info:
        predictor.predict_array(array, (1.0, 1.0, 1.0), name="scan.nii.gz")
    assert "scan.nii.gz" in str(info.value) and "\n" not in str(info.value)


def test_bad_files_leave_no_output(tmp_path, model_path, capsys):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"not an image")
    const = write_image(np.zeros((16, 16, 16), np.float32), tmp_path / "const.nii.gz")
    out = tmp_path / "out"
    for src in (garbage, const):
        assert main(["predict", "-m", str(model_path), "-i", str(src), "-o", str(out / "x.nii.gz"),
                     "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(src) in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())
    assert main(["predict", "-m", str(tmp_path / "missing.recokd"), "-i", str(const), "-o", str(out)]) == 2
    assert "missing.recokd" in capsys.readouterr().err


def test_oom_falls_back_to_smaller_batch_then_cpu(model_path, monkeypatch):
    real = predictor_module._sliding_window
    calls = []

    def fake(network, image, roi, overlap, sw, device, mirror_axes, on_windows, *rest):
        calls.append((device.type, sw))
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(network, image, roi, overlap, sw, device, mirror_axes, on_windows, *rest)

    monkeypatch.setattr(predictor_module, "_sliding_window", fake)
    messages = []
    predictor = Predictor(model_path, device="cpu", sw_batch_size=4, log=messages.append)
    predictor.device = torch.device("cuda")  # pretend: the fake never touches a GPU
    labels = predictor.predict_array(phantom_volume((16, 16, 16)), (1.0, 1.0, 1.0))
    assert labels.shape == (16, 16, 16)
    assert calls == [("cuda", 4), ("cuda", 1), ("cpu", 4)]
    assert len(messages) == 2 and all("out of GPU memory" in m for m in messages) and "cpu" in messages[-1]
    assert predictor.device.type == "cpu"  # later cases go straight to what worked


def test_progress_callback_reaches_one(model_path):
    fractions = []
    predictor = Predictor(model_path, device="cpu", progress=fractions.append, overlap=0.5)
    predictor.predict_array(phantom_volume((24, 24, 24)), (1.0, 1.0, 1.0))
    assert fractions and fractions[-1] == pytest.approx(1.0)
    assert fractions == sorted(fractions)


def test_multichannel_case_by_suffix(tmp_path):
    path = export_run(make_run(tmp_path / "run2", plans=tiny_plans(channels=2)), tmp_path / "two.recokd")
    inp = tmp_path / "in"
    write_image(phantom_volume((18, 18, 18), seed=1), inp / "p_0000.nii.gz")
    write_image(phantom_volume((18, 18, 18), seed=2) ** 2, inp / "p_0001.nii.gz")
    write_image(phantom_volume((18, 18, 18), seed=3), inp / "q_0000.nii.gz")  # lacks its second channel
    assert [len(v) for v in group_cases(inp).values()] == [2, 1]
    predictor = Predictor(path, device="cpu")
    out = predictor.predict_files(group_cases(inp)["p"], tmp_path / "out" / "p.nii.gz")
    assert sitk.ReadImage(str(out)).GetSize() == (18, 18, 18)
    with pytest.raises(ReCoKDError, match=r"q_0000.nii.gz has 1 channel\(s\) but model 'run2' expects 2.*_0001"):
        predictor.predict_files(group_cases(inp)["q"], tmp_path / "out" / "q.nii.gz")
    assert not (tmp_path / "out" / "q.nii.gz").exists()


def test_slicer_geometry_conversion():
    from ReCoKDLib.inference.predictor import geometry_from_ijk_to_ras

    m = np.asarray(DIRECTION).reshape(3, 3) * np.asarray(SPACING)  # LPS, columns scaled by spacing
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1, -1, 1]) @ m
    ijk_to_ras[:3, 3] = np.diag([-1, -1, 1]) @ np.asarray(ORIGIN)
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras)
    assert spacing == pytest.approx(SPACING) and origin == pytest.approx(ORIGIN) and direction == pytest.approx(DIRECTION)


def test_mirror_tta_runs_every_flip():
    calls = []

    class Counting(ThresholdNet):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    bundle = threshold_bundle(target_spacing=(1.0, 1.0, 1.0))
    image = phantom_volume((16, 16, 16))
    plain = Predictor(bundle, device="cpu", network=Counting()).predict_array(image, (1.0, 1.0, 1.0))
    n_plain = len(calls)
    tta = Predictor(bundle, device="cpu", network=Counting(), mirror_tta=True).predict_array(image, (1.0, 1.0, 1.0))
    assert len(calls) - n_plain == 8 * n_plain  # all 8 mirror images of each window batch
    np.testing.assert_array_equal(plain, tta)  # a threshold is flip-equivariant


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from ReCoKDLib.deployment.bundle import bundle_from_network, load_bundle

    plans = tiny_plans()
    good = bundle_from_network(tiny_network(plans), plans, "good")
    wide = tiny_plans()
    other = build_unet(isotropic_spec(1, 3, num_levels=3, filters=[16, 32, 64]))
    bad = bundle_from_network(other, wide, "bad")
    good.weights = bad.weights  # a bundle whose weights belong to another network (checksums re-made on save)
    path = good.save(tmp_path / "mismatch.recokd")
    with pytest.raises(ReCoKDError, match="do not fit this network") as info:
        Predictor(load_bundle(path), device="cpu")
    assert "mismatch.recokd" in str(info.value) and ": its weights do not fit" in str(info.value)


def test_folder_with_a_bad_case_writes_the_others(tmp_path, model_path, capsys):
    inp = tmp_path / "in"
    write_image(phantom_volume((16, 16, 16)), inp / "good_0000.mha")
    write_image(np.zeros((16, 16, 16), np.float32), inp / "blank_0000.mhd")  # constant, and a two-file format
    code = main(["predict", "-m", str(model_path), "-i", str(inp), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "blank_0000.mhd" in err and "constant" in err and "1 of 2 case(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.mha"]
    with pytest.raises(ReCoKDError, match="two-file format; use .mha"):
        Predictor(model_path, device="cpu").predict_files([inp / "good_0000.mha"], tmp_path / "x.mhd")


def test_largest_component_postprocessing():
    from ReCoKDLib.inference.postprocessing import postprocess_labels

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1      # the structure
    labels[4:8, 4:8, 10:14] = 2       # a class touching it
    labels[15:17, 15:17, 15:17] = 1   # a stray island of class 1
    labels[16:18, 2:4, 16:18] = 2     # a stray island of class 2, smaller than its main piece
    fg = postprocess_labels(labels, "largest-foreground")
    assert fg[15:17, 15:17, 15:17].max() == 0 and fg[16:18, 2:4, 16:18].max() == 0
    assert (fg[2:10, 2:10, 2:10] == 1).all() and (fg[4:8, 4:8, 10:14] == 2).all()  # touching classes kept together
    per_class = postprocess_labels(labels, "largest-per-class")
    assert np.array_equal(per_class, fg)
    assert postprocess_labels(labels, "none") is labels
    # per class differs from foreground when a class is split by another: class 2 in two pieces, both on the organ
    split = labels.copy()
    split[4:8, 4:8, 10:14] = 0
    split[3:5, 3:5, 10:12] = 2
    split[7:9, 7:9, 10:13] = 2
    assert (postprocess_labels(split, "largest-foreground") == 2).sum() == 4 * 2 + 4 * 3
    assert (postprocess_labels(split, "largest-per-class") == 2).sum() == 4 * 3
    with pytest.raises(ReCoKDError, match="not one of none, largest-foreground"):
        postprocess_labels(labels, "smooth")


def test_predictor_postprocesses_as_the_bundle_says(tmp_path, model_path):
    from ReCoKDLib.deployment.bundle import load_bundle

    image = np.full((24, 24, 24), -1.0, np.float32)
    image[2:14, 2:14, 2:14] = 1.0
    image[19:22, 19:22, 19:22] = 1.0  # a far, small bright island: a false positive of the threshold net
    bundle = threshold_bundle(target_spacing=(1.0, 1.0, 1.0))
    raw = Predictor(bundle, device="cpu", network=ThresholdNet()).predict_array(image, (1.0, 1.0, 1.0))
    assert raw[20, 20, 20] == 1 and raw[5, 5, 5] == 1
    cleaned = Predictor(bundle, device="cpu", network=ThresholdNet(), postprocess="largest-foreground").predict_array(
        image, (1.0, 1.0, 1.0))
    assert cleaned[20, 20, 20] == 0 and np.array_equal(cleaned[:16, :16, :16], raw[:16, :16, :16])
    bundle.manifest["postprocessing"] = "largest-foreground"
    by_default = Predictor(bundle, device="cpu", network=ThresholdNet()).predict_array(image, (1.0, 1.0, 1.0))
    assert np.array_equal(by_default, cleaned)
    # recorded at export, kept through save and load (the schema checks the value)
    path = export_run(make_run(tmp_path / "run", plans=tiny_plans(num_classes=3)), tmp_path / "pp.recokd",
                      postprocessing="largest-per-class")
    assert load_bundle(path).postprocessing == "largest-per-class"
    assert load_bundle(model_path).postprocessing == "none"
    with pytest.raises(ReCoKDError, match="post-processing 'blur' is not one of"):
        Predictor(model_path, device="cpu", postprocess="blur")


def test_tta_mirrors_only_the_axes_the_model_was_trained_mirrored_along(tmp_path, capsys):
    """A bundle records the axes its training mirrored (from the run's --augment); TTA flips only those and
    is refused for a model trained without mirroring (issue 28: TTA cost the shipped ACDC model 0.52 Dice)."""
    import json as _json

    from bundle_helpers import make_run
    from ReCoKDLib.deployment.bundle import export_run, load_bundle

    for augment, axes in (("none", []), ("light", []), ("nnunet", [0, 1, 2]), (False, [])):
        run = make_run(tmp_path / f"run_{augment}")
        info = _json.loads((run / "run.json").read_text())
        info["config"] = {"augment": augment, "patch_size": [16, 16, 16]}
        (run / "run.json").write_text(_json.dumps(info))
        bundle = load_bundle(export_run(run, tmp_path / f"{augment}.recokd"))
        assert bundle.manifest["mirror_axes"] == axes and list(bundle.mirror_axes) == axes
    with pytest.raises(ReCoKDError, match="trained without mirroring.*run it without --tta"):
        Predictor(tmp_path / "none.recokd", device="cpu", mirror_tta=True)
    scan = write_image(phantom_volume((16, 16, 16)), tmp_path / "scan.nii.gz")
    assert main(["predict", "-m", str(tmp_path / "none.recokd"), "-i", str(scan), "-o", str(tmp_path / "o.nii.gz"),
                 "--device", "cpu", "--no-progress", "--tta"]) == 2
    assert "trained without mirroring" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()
    assert Predictor(tmp_path / "nnunet.recokd", device="cpu", mirror_tta=True).mirror_axes == (0, 1, 2)
    # only the recorded axes are flipped: 2 of them, 4 views per window batch
    bundle = threshold_bundle(target_spacing=(1.0, 1.0, 1.0))
    bundle.manifest["mirror_axes"] = [1, 2]
    calls = []

    class Counting(ThresholdNet):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    predictor = Predictor(bundle, device="cpu", network=Counting(), mirror_tta=True)
    assert predictor.mirror_axes == (1, 2)
    predictor.predict_array(phantom_volume((16, 16, 16)), (1.0, 1.0, 1.0))
    plain = len(calls)
    calls.clear()
    Predictor(bundle, device="cpu", network=Counting()).predict_array(phantom_volume((16, 16, 16)), (1.0, 1.0, 1.0))
    assert plain == 4 * len(calls)


def test_the_shipped_models_record_no_mirroring_and_refuse_tta():
    from ReCoKDLib.deployment.bundle import load_bundle

    models = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"
    for path in sorted(models.glob("*.recokd")):
        assert load_bundle(path).mirror_axes == (), path.name  # trained with --augment none (their provenance)
        with pytest.raises(ReCoKDError, match="trained without mirroring"):
            Predictor(path, device="cpu", mirror_tta=True)


SHIPPED = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"


def test_input_checks_fire_on_what_the_shipped_models_never_saw(tmp_path, capsys):
    """Issue 28's conditions, made from the shipped bundles' own plans: a real-spacing scan for the
    spacing-less ACDC model is refused (it scored 0.465, 12x slower), a wider field of view than the
    LA2018 crops warns (it scored 0.24-0.49), an odd spacing warns; nothing fires on the training
    distribution, on storage changes or on a linear intensity rescaling; --force skips them."""
    rng = np.random.default_rng(0)
    acdc = Predictor(SHIPPED / "acdc-heart.recokd", device="cpu")
    la = Predictor(SHIPPED / "la2018-left-atrium.recokd", device="cpu")
    frame = rng.random((1, 9, 256, 216), dtype=np.float32)
    assert acdc.input_warnings(frame, (1.0, 1.0, 1.0)) == []
    with pytest.raises(ReCoKDError, match="trained on images without physical spacing.*set the header spacing to 1 x 1 x 1"):
        acdc.input_warnings(frame, (10.0, 1.5, 1.5))
    crop = rng.random((1, 44, 71, 96), dtype=np.float32)
    assert la.input_warnings(crop, (1.25, 1.25, 1.25)) == []
    assert la.input_warnings(crop * 37.0 + 500.0, (1.25, 1.25, 1.25)) == []  # z-scored: rescaling changes nothing
    wider = np.pad(crop, ((0, 0), (24, 24), (24, 24), (24, 24)))
    lines = la.input_warnings(wider, (1.25, 1.25, 1.25))
    assert any("field of view" in line and "far larger than the training cases'" in line for line in lines), lines
    assert any("far from the training range" in line for line in la.input_warnings(crop, (3.0, 1.25, 1.25)))
    # through the command line: the refusal is one line before any work; the stored file flipped is no different
    scan = tmp_path / "frame.nii.gz"
    image = sitk.GetImageFromArray(frame[0])
    image.SetSpacing((1.5, 1.5, 10.0))
    sitk.WriteImage(image, str(scan))
    argv = ["predict", "-m", str(SHIPPED / "acdc-heart.recokd"), "-i", str(scan), "-o", str(tmp_path / "o.nii.gz"),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "without physical spacing" in err and "--force" in err and not (tmp_path / "o.nii.gz").exists()
    forced = Predictor(SHIPPED / "acdc-heart.recokd", device="cpu", check_spacing=False)
    forced.preprocess(frame[0][:, :32, :32], (1.5, 1.5, 10.0), name="forced")  # no check: preprocessing goes ahead


def test_a_run_far_longer_than_usual_is_refused_and_a_longer_one_warns():
    la = Predictor(SHIPPED / "la2018-left-atrium.recokd", device="cpu")
    big = np.zeros((1, 132, 213, 288), np.float32)  # 3x the median crop per axis: about 27x the windows
    with pytest.raises(ReCoKDError, match=r"needs \d+ windows at the model's spacing, \d+x a typical"):
        la.input_warnings(big, (1.25, 1.25, 1.25))
    lines = la.input_warnings(np.zeros((1, 88, 142, 96), np.float32), (1.25, 1.25, 1.25))
    assert any("windows" in line and "it will take that much longer" in line for line in lines), lines


def test_a_front_end_that_asks_gets_every_finding_and_only_input_checks_are_skippable():
    """confirm_warnings=True (3D Slicer's 'Segment anyway?'): the findings are raised together as an
    InputCheckError before preprocessing; refusals are InputCheckErrors too (--force skips them), while an
    error no --force can fix (mirror TTA on a model trained without mirroring) is a plain ReCoKDError."""
    from ReCoKDLib.errors import InputCheckError

    crop = np.random.default_rng(1).random((44, 71, 96), dtype=np.float32)
    la = Predictor(SHIPPED / "la2018-left-atrium.recokd", device="cpu", confirm_warnings=True)
    expected = la.input_warnings(crop[None], (3.0, 1.25, 1.25), "crop")
    with pytest.raises(InputCheckError) as info:
        la.preprocess(crop, (1.25, 1.25, 3.0), name="crop")  # SimpleITK's (x, y, z) order
    assert info.value.lines == expected and len(expected) >= 1
    la.preprocess(crop, (1.25, 1.25, 1.25), name="crop")  # nothing found: goes ahead
    acdc = Predictor(SHIPPED / "acdc-heart.recokd", device="cpu")
    with pytest.raises(InputCheckError, match="without physical spacing"):
        acdc.preprocess(crop[:9], (1.5, 1.5, 10.0), name="frame")
    with pytest.raises(ReCoKDError) as plain:
        Predictor(SHIPPED / "acdc-heart.recokd", device="cpu", mirror_tta=True)
    assert not isinstance(plain.value, InputCheckError)
