"""Fingerprinting, experiment planning and preprocessing (nnU-Net style).

Real data comes from the shared folder (fixture ``shared_data``; tests skip without it). Whole-dataset
fingerprints are computed for LA2018-lowres and ACDC-subset (about a second each); cache tests run on
tiny datasets written to tmp_path from crops of real cases or synthetic arrays.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import ReCoKDLib.data.preprocessing as prep
from ReCoKDLib.data.datasets import LoadedCase, load_case, open_dataset
from ReCoKDLib.utils.geometry import ImageGeometry
from ReCoKDLib.data.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, compute_fingerprint
from ReCoKDLib.data.phantom import generate_case
from ReCoKDLib.data.planning import (
    DEFAULT_PATCH_BUDGET,
    PLANS_VERSION,
    Plans,
    normalisation_scheme,
    plan_experiment,
)
from ReCoKDLib.data.preprocessing import (
    crop_to_nonzero,
    load_preprocessed,
    normalise,
    preprocess_case,
    preprocess_dataset,
    resample_label,
    resampled_shape,
    resize_image,
    resize_label,
    restore_label,
)
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.models.unet import UNetSpec, build_unet


# --------------------------------------------------------------------------------------------------
# helpers and fixtures


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * float((x & y).sum()) / max(float(x.sum() + y.sum()), 1.0)


def write_dataset(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], channels: dict, labels: dict,
                  spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write (C, D, H, W) images and (D, H, W) labels in the nnU-Net v2 raw layout; spacing in (D, H, W)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, (image, label) in cases.items():
        for c in range(image.shape[0]):
            img = sitk.GetImageFromArray(image[c].astype(np.float32))
            img.SetSpacing(tuple(reversed(spacing)))
            sitk.WriteImage(img, str(root / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
        lab = sitk.GetImageFromArray(label.astype(np.uint8))
        lab.SetSpacing(tuple(reversed(spacing)))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"{case}.nii.gz"))
    meta = {"name": root.name, "channel_names": {str(k): v for k, v in channels.items()}, "labels": dict(labels),
            "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def la(shared_data):
    return open_dataset(shared_data / "LA2018-lowres")


@pytest.fixture(scope="module")
def acdc(shared_data):
    return open_dataset(shared_data / "ACDC-subset")


@pytest.fixture(scope="module")
def la_fingerprint(la):
    return compute_fingerprint(la, progress=False)


@pytest.fixture(scope="module")
def acdc_fingerprint(acdc):
    return compute_fingerprint(acdc, progress=False)


@pytest.fixture(scope="module")
def la_experiment(la_fingerprint):
    return plan_experiment(la_fingerprint)


@pytest.fixture(scope="module")
def la_plans(la_experiment):
    return la_experiment.plans


@pytest.fixture(scope="module")
def acdc_experiment(acdc_fingerprint):
    return plan_experiment(acdc_fingerprint)


@pytest.fixture(scope="module")
def acdc_plans(acdc_experiment):
    return acdc_experiment.plans


@pytest.fixture
def tiny_la(la, tmp_path):
    """Three real LA cases cropped to 24 x 40 x 40 around the atrium, in tmp_path."""
    cases = {}
    for record in la.training[:3]:
        case = load_case(record, la)
        centre = [int(np.mean(ix)) for ix in np.nonzero(case.label)]
        sl = tuple(slice(max(c - h, 0), max(c - h, 0) + 2 * h) for c, h in zip(centre, (12, 20, 20)))
        cases[record.case_id] = (case.image[(slice(None),) + sl], case.label[sl])
    return open_dataset(write_dataset(tmp_path / "tinyLA", cases, la.channel_names, la.labels, (1.25,) * 3))


def check_plan(experiment, fingerprint: Fingerprint, min_feature_size: int = 4) -> UNetSpec:
    """Invariants every plan and its teacher network must satisfy."""
    plans, spec = experiment
    assert len(spec.kernel_sizes) == len(spec.strides) == len(spec.filters) == spec.num_levels >= 3
    assert spec.strides[0] == (1, 1, 1)
    assert all(p % d == 0 for p, d in zip(plans.patch_size, spec.divisor))
    assert all(p <= m for p, m in zip(plans.patch_size, plans.median_shape))
    assert np.prod(plans.patch_size) <= DEFAULT_PATCH_BUDGET
    # no axis is down-sampled below min_feature_size
    assert all(p // d >= min_feature_size or d == 1 for p, d in zip(plans.patch_size, spec.divisor))
    assert spec.in_channels == len(fingerprint.channel_names)
    assert spec.out_channels == max(fingerprint.labels.values()) + 1
    assert plans.batch_size == 2 and plans.version == PLANS_VERSION
    return spec


# --------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_la(la, la_fingerprint):
    fp = la_fingerprint
    assert len(fp.cases) == len(la.training) == 80
    assert fp.median_spacing == (1.25, 1.25, 1.25)
    assert fp.min_shape[0] == fp.max_shape[0] == 44
    assert all(lo <= m <= hi for lo, m, hi in zip(fp.min_shape, fp.median_shape, fp.max_shape))
    stats = fp.foreground_intensity[0]
    assert 0 < stats.num_samples <= 80 * 10000
    assert stats.min <= stats.percentile_00_5 <= stats.median <= stats.percentile_99_5 <= stats.max
    assert stats.std > 0
    # deterministic: a second computation gives the same JSON
    assert compute_fingerprint(la, progress=False).to_json() == fp.to_json()


def test_fingerprint_json_round_trip(la_fingerprint, tmp_path):
    path = tmp_path / "fingerprint.json"
    la_fingerprint.save(path)
    again = Fingerprint.load(path)
    assert again == la_fingerprint
    assert again.to_json() == la_fingerprint.to_json()
    data = json.loads(path.read_text())
    data["version"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ReCoKDError, match="version"):
        Fingerprint.load(path)


def test_fingerprint_sampling_is_seeded(tiny_la):
    a = compute_fingerprint(tiny_la, progress=False, max_foreground_samples=50, seed=1)
    b = compute_fingerprint(tiny_la, progress=False, max_foreground_samples=50, seed=1)
    c = compute_fingerprint(tiny_la, progress=False, max_foreground_samples=50, seed=2)
    assert a.to_json() == b.to_json()
    assert a.foreground_intensity[0].num_samples == 150
    assert a.foreground_intensity[0] != c.foreground_intensity[0]


# --------------------------------------------------------------------------------------------------
# planning


def test_plans_la(la_fingerprint, la_experiment):
    p = la_experiment.plans
    spec = check_plan(la_experiment, la_fingerprint)
    assert p.target_spacing == (1.25, 1.25, 1.25)
    assert p.median_shape == (44, 71, 96)
    assert [n.scheme for n in p.normalisation] == ["zscore"]
    assert spec.filters == tuple(min(32 * 2**k, 320) for k in range(spec.num_levels))
    assert all(k == (3, 3, 3) for k in spec.kernel_sizes)  # isotropic data
    build_unet(spec)  # the plan describes a buildable network


def test_plans_acdc_thin_axis(acdc_fingerprint, acdc_experiment):
    p = acdc_experiment.plans
    spec = check_plan(acdc_experiment, acdc_fingerprint)
    assert p.target_spacing == (1.0, 1.0, 1.0)  # the (lost, identity) spacing
    slices = acdc_fingerprint.median_shape[0]
    assert p.patch_size[0] <= slices <= 17
    # the 6-17 slice axis is down-sampled at most while its feature map keeps >= 4 voxels
    assert spec.divisor[0] <= p.patch_size[0] // 4
    assert p.patch_size[0] // spec.divisor[0] >= 4
    assert sum(s[0] == 2 for s in spec.strides) < sum(s[1] == 2 for s in spec.strides)


def test_plans_stable_and_json_round_trip(la_fingerprint, la_plans, tmp_path):
    assert plan_experiment(la_fingerprint).plans.to_json() == la_plans.to_json()
    path = tmp_path / "plans.json"
    la_plans.save(path)
    text = path.read_text()
    assert text.startswith("{\n  ")  # indented, human-editable
    loaded = Plans.load(path)
    assert loaded == la_plans and loaded.to_json() == la_plans.to_json()
    assert loaded.plans_hash() == la_plans.plans_hash()
    # planning from a reloaded fingerprint gives the same plan
    la_fingerprint.save(tmp_path / "fp.json")
    assert plan_experiment(Fingerprint.load(tmp_path / "fp.json")) == plan_experiment(la_fingerprint)


def test_plans_hash_covers_preprocessing_only(la_plans):
    h = la_plans.plans_hash()
    assert len(h) == 64
    assert replace(la_plans, batch_size=4).plans_hash() == h
    assert la_plans.with_target_spacing((1.0, 1.0, 1.0)).plans_hash() != h
    assert replace(la_plans, channel_names={0: "T2"}).plans_hash() != h
    assert replace(la_plans, resampling={"image_order": 1, "label": "linear"}).plans_hash() != h


def test_plans_anisotropic():
    # thick-slice data: 5 mm slices (a few thinner), 0.7 mm in plane
    z = [5, 5, 5, 4, 2.5, 5, 6, 5, 5, 3]
    n = [20, 22, 18, 25, 40, 21, 17, 19, 20, 33]
    cases = tuple(CaseFingerprint(f"c{i}", (s, 0.7, 0.7), (k, 512, 512), (k, 400, 420)) for i, (s, k) in enumerate(zip(z, n)))
    fp = Fingerprint("aniso", {0: "MRI"}, {"background": 0, "a": 1}, cases, (IntensityStats(0),))
    p, spec = plan_experiment(fp)
    check_plan((p, spec), fp)
    assert p.target_spacing[1:] == (0.7, 0.7)
    assert p.target_spacing[0] == pytest.approx(np.percentile(z, 10))  # not the 5 mm median
    # the high-resolution axes are down-sampled first, with 1x3x3 kernels while z is coarser
    assert spec.strides[1] == (1, 2, 2) and spec.kernel_sizes[0] == (1, 3, 3)
    assert (2, 2, 2) in spec.strides


def test_plans_too_small_or_bad_settings():
    cases = (CaseFingerprint("a", (1.0, 1.0, 1.0), (10, 10, 10), (10, 10, 10)),)
    fp = Fingerprint("small", {0: "MRI"}, {"background": 0, "a": 1}, cases, (IntensityStats(0),))
    with pytest.raises(ReCoKDError, match="down-sampling"):
        plan_experiment(fp)
    with pytest.raises(ReCoKDError, match="max_levels"):
        plan_experiment(fp, max_levels=2)


def test_plans_load_errors(la_plans, tmp_path):
    path = tmp_path / "plans.json"
    with pytest.raises(ReCoKDError, match="does not exist"):
        Plans.load(path)
    path.write_text("{not json")
    with pytest.raises(ReCoKDError, match="not valid JSON"):
        Plans.load(path)
    data = la_plans.to_dict()
    for key, value, message in [
        ("version", 0, "version"),
        ("normalisation", [{"scheme": "minmax"}], "unknown normalisation"),
        ("target_spacing", [1, 1], "target_spacing"),
    ]:
        path.write_text(json.dumps({**data, key: value}))
        with pytest.raises(ReCoKDError, match=message) as info:
            Plans.load(path)
        assert "\n" not in str(info.value)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "labels"}))
    with pytest.raises(ReCoKDError, match="labels"):
        Plans.load(path)
    assert "network" not in data  # network.json is the only network description
    path.write_text(json.dumps({**data, "network": {"ignored": True}}))  # plans written before it: still read
    assert Plans.load(path) == la_plans


def test_normalisation_scheme_names():
    assert [normalisation_scheme(n) for n in ("CT", "ct", "CT_venous", "contrast CT", "ceCT")] == ["ct"] * 4 + ["zscore"]
    assert [normalisation_scheme(n) for n in ("MRI", "T1c", "OCT", "vector", "cine-MRI")] == ["zscore"] * 5


def test_ct_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(2):
        label = np.zeros((16, 20, 20), np.uint8)
        label[4:12, 5:15, 5:15] = 1
        ct = rng.normal(-800, 100, label.shape)  # air-like background
        ct[label == 1] = rng.normal(60, 40, int(label.sum()))
        ct.flat[np.flatnonzero(label)[:5]] = 3000  # a few bright outliers (metal), clipped away
        mri = rng.normal(100 * (i + 1), 20, label.shape)
        cases[f"case{i}"] = (np.stack([ct, mri]).astype(np.float32), label)
    ds = open_dataset(write_dataset(tmp_path / "ct", cases, {0: "CT", 1: "T2"}, {"background": 0, "organ": 1}))
    plans, _ = plan_experiment(compute_fingerprint(ds, progress=False), patch_budget_voxels=16**3)
    ct_norm, mr_norm = plans.normalisation
    assert (ct_norm.scheme, mr_norm.scheme) == ("ct", "zscore")
    foreground = np.concatenate([img[0][lab == 1] for img, lab in cases.values()]).astype(np.float64)
    assert ct_norm.lower == pytest.approx(np.percentile(foreground, 0.5))
    assert ct_norm.upper == pytest.approx(np.percentile(foreground, 99.5))
    assert ct_norm.mean == pytest.approx(foreground.mean()) and ct_norm.std == pytest.approx(foreground.std())
    # the CT statistics are stored in the plan (JSON)
    assert plans.to_dict()["normalisation"][0]["lower"] == ct_norm.lower

    image = cases["case1"][0]
    out = normalise(image, plans)
    expected = (np.clip(image[0], ct_norm.lower, ct_norm.upper) - ct_norm.mean) / ct_norm.std
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    assert out[0].min() == pytest.approx((ct_norm.lower - ct_norm.mean) / ct_norm.std, rel=1e-5)
    assert out[1].mean() == pytest.approx(0, abs=1e-5) and out[1].std() == pytest.approx(1, abs=1e-4)
    assert out.dtype == np.float32


# --------------------------------------------------------------------------------------------------
# resampling


def test_resampled_shape():
    assert resampled_shape((44, 70, 91), (1.25,) * 3, (1.25,) * 3) == (44, 70, 91)
    assert resampled_shape((44, 70, 91), (1.25,) * 3, (1.0, 1.0, 3.0)) == (55, 88, 38)


@pytest.mark.parametrize("n_out", [5, 7, 20])
def test_resampling_grid_keeps_the_volume_edges(n_out):
    # a linear ramp along W, resampled linearly: output voxel i samples input position (i + 0.5) * n/n' - 0.5
    n = 10
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32), (1, 3, 4, n)).copy()
    out = resize_image(ramp, (3, 4, n_out), order=1)[0, 1, 2]
    expected = np.clip((np.arange(n_out) + 0.5) * n / n_out - 0.5, 0, n - 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_image_and_label_resampling_share_one_grid():
    # a binary mask resampled as an image (linear) and as a label (one-hot linear) must agree
    label = generate_case(3, (32, 32, 32)).label > 0
    for shape in [(45, 45, 20), (20, 25, 45)]:
        as_image = resize_image(label[None].astype(np.float32), shape, order=1)[0] > 0.5
        as_label = resize_label(label.astype(np.uint8), shape) == 1
        assert (as_image == as_label).mean() > 0.999


def test_label_resampling_round_trip_phantom():
    case = generate_case(0, (64, 64, 64))
    spacing, target = (1.25,) * 3, (0.9, 0.9, 0.9)
    up = resample_label(case.label, spacing, target, num_classes=5)
    assert up.shape == (89, 89, 89) and up.dtype == case.label.dtype
    back = resize_label(up, case.label.shape)
    for value in range(5):
        assert dice(case.label, back, value) >= 0.98, value
    with pytest.raises(ReCoKDError):
        resample_label(case.label, spacing, target, num_classes=3)


@pytest.mark.parametrize(
    "spacing, target",
    [((1.25, 1.25, 1.25), (0.9, 0.9, 0.9)), ((3.0, 1.0, 1.0), (1.0, 1.0, 1.0)), ((1.0, 1.0, 3.0), (1.0, 0.8, 1.0))],
)
def test_label_resampling_round_trip_real(la, spacing, target):
    label = load_case(la.training[1], la).label
    there = resample_label(label, spacing, target, num_classes=2)
    assert there.shape == resampled_shape(label.shape, spacing, target)
    back = resize_label(there, label.shape)
    assert dice(label, back, 1) >= 0.98 and dice(label, back, 0) >= 0.98
    nearest = resize_label(resize_label(label, there.shape, "nearest"), label.shape, "nearest")
    assert dice(label, nearest, 1) >= 0.98


def test_label_resampling_multiclass_keeps_every_class_aligned():
    # three nested boxes: the interpolated labels keep each box's centre and extent
    label = np.zeros((20, 30, 30), np.uint8)
    label[2:18, 5:25, 5:25] = 1
    label[5:15, 10:20, 10:20] = 2
    label[8:12, 13:17, 13:17] = 3
    out = resize_label(label, (40, 60, 60))
    for value, (lo, hi) in zip((1, 2, 3), ((2, 18), (5, 15), (8, 12))):
        z = np.nonzero((out >= value).any(axis=(1, 2)))[0]
        assert (z[0], z[-1] + 1) == (2 * lo, 2 * hi)


# --------------------------------------------------------------------------------------------------
# preprocessing one case


def test_crop_to_nonzero():
    image = np.zeros((2, 10, 12, 14), np.float32)
    image[0, 2:5, 3:7, 4:9] = 1
    image[1, 6, 1, 10] = -2  # non-zero in the other channel only
    label = np.zeros((10, 12, 14), np.uint8)
    label[8, 5, 5] = 1  # foreground outside the image's non-zero box is kept
    img, lab, bbox = crop_to_nonzero(image, label)
    assert bbox == ((2, 9), (1, 7), (4, 11))
    assert img.shape == (2, 7, 6, 7) and lab.shape == (7, 6, 7) and lab.sum() == 1
    _, none, full = crop_to_nonzero(np.zeros((1, 3, 4, 5), np.float32))
    assert none is None and full == ((0, 3), (0, 4), (0, 5))


def test_preprocess_and_restore_exact_la(la, la_plans):
    case = load_case(la.training[0], la)
    out = preprocess_case(case, la_plans)
    props = out.properties
    assert out.image.dtype == np.float32 and out.label.dtype == np.uint8
    assert out.image.shape == (1, *props["shape_after_resampling"]) and out.label.shape == out.image.shape[1:]
    assert props["original_shape"] == list(case.label.shape)
    assert props["geometry"]["spacing"] == [1.25] * 3 and props["geometry"]["direction"] == list(case.geometry.direction)
    assert abs(float(out.image.mean())) < 1e-3 and abs(float(out.image.std()) - 1) < 1e-3
    json.dumps(props)  # JSON-ready
    restored = restore_label(out.label, props)
    assert restored.shape == case.label.shape and np.array_equal(restored, case.label)


def test_preprocess_and_restore_exact_acdc(acdc, acdc_plans):
    case = load_case(acdc.training[0], acdc)
    out = preprocess_case(case, acdc_plans)
    assert set(np.unique(out.label)) == set(np.unique(case.label)) == {0, 1, 2, 3}
    assert np.array_equal(restore_label(out.label, out.properties), case.label)


def test_preprocess_and_restore_with_resampling(la, la_plans):
    plans = la_plans.with_target_spacing((1.0, 1.0, 1.6))
    case = load_case(la.training[2], la)
    out = preprocess_case(case, plans)
    crop = out.properties["shape_after_crop"]
    assert out.properties["shape_after_resampling"] == list(resampled_shape(crop, case.geometry.spacing_dhw, plans.target_spacing))
    restored = restore_label(out.label, out.properties)
    assert restored.shape == case.label.shape
    assert dice(case.label, restored, 1) >= 0.98
    assert dice(case.label, restore_label(out.label, out.properties, mode="nearest"), 1) >= 0.98
    with pytest.raises(ReCoKDError, match="plan space"):
        restore_label(case.label, out.properties)


def test_preprocess_case_channel_mismatch(la_plans):
    case = LoadedCase(np.zeros((2, 8, 8, 8), np.float32), None, ImageGeometry((1.0, 1.0, 1.0)), "x")
    with pytest.raises(ReCoKDError, match="2 channel") as info:
        preprocess_case(case, la_plans)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# dataset cache


def test_cache_runs_once_and_per_plan(tiny_la, tmp_path, monkeypatch):
    plans, _ = plan_experiment(compute_fingerprint(tiny_la, progress=False))
    cache = tmp_path / "cache"
    folder = preprocess_dataset(tiny_la, plans, cache, progress=False)
    assert folder == cache / plans.plans_hash()
    ids = [r.case_id for r in tiny_la.training]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i}_{a}.npy" for i in ids for a in ("image", "label")] + [f"{i}.json" for i in ids] + ["plans.json"])
    assert Plans.load(folder / "plans.json") == plans
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    calls = []
    real = prep.preprocess_case
    monkeypatch.setattr(prep, "preprocess_case", lambda case, p: calls.append(case.case_id) or real(case, p))
    assert preprocess_dataset(tiny_la, plans, cache, progress=False) == folder
    assert calls == [] and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

    # loading: arrays as preprocessed, no pickle
    loaded = load_preprocessed(cache, plans, ids[0])
    direct = preprocess_case(load_case(tiny_la.training[0], tiny_la), plans)
    np.testing.assert_array_equal(loaded.image, direct.image)
    np.testing.assert_array_equal(loaded.label, direct.label)
    assert loaded.properties == json.loads(json.dumps(direct.properties))
    # memory-mapped copy-on-write: nothing is read until a patch is drawn, and a write stays in this process
    assert isinstance(loaded.image, np.memmap) and isinstance(loaded.label, np.memmap) and loaded.label.dtype == np.uint8
    torch.from_numpy(loaded.image).mul_(0)  # in place, as an augmentation might: no crash, the cache unchanged
    np.testing.assert_array_equal(load_preprocessed(cache, plans, ids[0]).image, direct.image)
    # a spawned data-loading worker receives the maps as file names (sharing the pages), not as copies
    from multiprocessing.reduction import ForkingPickler

    fresh = load_preprocessed(cache, plans, ids[0])
    for array, expected in ((fresh.image, direct.image), (fresh.label, direct.label)):
        blob = bytes(ForkingPickler.dumps(array))
        assert len(blob) < 1000 < array.nbytes
        back = ForkingPickler.loads(blob)
        assert isinstance(back, np.memmap)
        np.testing.assert_array_equal(back, expected)
        assert len(bytes(ForkingPickler.dumps(back))) < 1000  # and on to the next process alike
    assert type(fresh.image.max()) is np.float32 and type(fresh.image + 1) is np.ndarray  # results: plain values
    part = fresh.image[:, 1:3]
    assert len(bytes(ForkingPickler.dumps(part))) > part.nbytes  # a slice travels by value
    np.testing.assert_array_equal(ForkingPickler.loads(ForkingPickler.dumps(part)), direct.image[:, 1:3])
    from ReCoKDLib.data.loader import PatchBatches

    batches = PatchBatches([fresh.image], [fresh.label], patch_size=(4, 4, 4))  # as the training loop builds it
    centres = sum(c.nbytes for per_case in batches.centres for c in per_case.values())  # (capped per class)
    assert len(bytes(ForkingPickler.dumps(batches))) < centres + 10_000 < centres + fresh.label.nbytes

    # a plan with other preprocessing goes to a new folder; the old cache is left alone
    other = plans.with_target_spacing((1.0, 1.0, 1.0))
    other_folder = preprocess_dataset(tiny_la, other, cache, progress=False)
    assert other_folder != folder and other_folder.parent == cache
    assert sorted(calls) == sorted(ids)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert load_preprocessed(cache, other, ids[0]).image.shape != loaded.image.shape
    with pytest.raises(ReCoKDError, match="not preprocessed"):
        load_preprocessed(cache, plans.with_target_spacing((2.0, 2.0, 2.0)), ids[0])
    # a cache written before (one .npz per case) is still read, whole
    legacy = folder / f"{ids[0]}.npz"
    np.savez(legacy, image=direct.image, label=direct.label)
    for array in ("image", "label"):
        (folder / f"{ids[0]}_{array}.npy").unlink()
    old = load_preprocessed(cache, plans, ids[0])
    np.testing.assert_array_equal(old.image, direct.image)
    np.testing.assert_array_equal(old.label, direct.label)
    assert not isinstance(old.image, np.memmap)


def test_cache_refuses_pickles_and_partial_writes(tiny_la, tmp_path, monkeypatch):
    plans, _ = plan_experiment(compute_fingerprint(tiny_la, progress=False))
    cache = tmp_path / "cache"
    folder = cache / plans.plans_hash()
    first = tiny_la.training[0].case_id

    # an interrupted write (np.save fails half-way) leaves neither the case nor a temporary file
    real_save = np.save

    def failing_save(file, array, **kwargs):
        file.write(b"\x93NUMPY half an array")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(tiny_la, plans, cache, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["plans.json"]
    monkeypatch.setattr(np, "save", real_save)
    preprocess_dataset(tiny_la, plans, cache, progress=False)
    assert load_preprocessed(cache, plans, first).label is not None

    # a cached file holding a pickled object array is refused, not unpickled (the .npy and a legacy .npz)
    np.save(folder / f"{first}_image.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReCoKDError, match="unreadable"):
        load_preprocessed(cache, plans, first)
    for array in ("image", "label"):
        (folder / f"{first}_{array}.npy").unlink()
    np.savez(folder / f"{first}.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ReCoKDError, match="unreadable"):
        load_preprocessed(cache, plans, first)


def test_preprocess_dataset_rejects_other_dataset(tiny_la, acdc_plans, tmp_path):
    with pytest.raises(ReCoKDError, match="does not fit"):
        preprocess_dataset(tiny_la, acdc_plans, tmp_path / "cache", progress=False)
