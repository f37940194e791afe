"""Dataset reading (nnU-Net v2 and MSD layouts) and validation.

Real data comes from the shared folder (fixture ``shared_data``; tests skip without it). Test
datasets are built in tmp_path from small crops of real cases or from synthetic arrays.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ReCoKDLib.data.datasets import (
    CaseRecord,
    DatasetInfo,
    LoadedCase,
    load_case,
    open_dataset,
    read_header,
    read_image,
)
from ReCoKDLib.data.validation import (
    DatasetValidationError,
    Problem,
    require_valid,
    validate_case,
    validate_dataset,
)
from ReCoKDLib.errors import ReCoKDError

LA_LABELS = {"background": 0, "left_atrium": 1}
BRATS_LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non_enhancing_tumor": 3, "enhancing_tumor": 4}


# --------------------------------------------------------------------------------------------------
# helpers


def _dataset_dir(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"shared dataset {name} not found under {shared_data}")
    return path


def _crop(image: sitk.Image, size: tuple[int, int, int], center: tuple[int, int, int] | None = None) -> sitk.Image:
    """Crop ``size`` (x, y, z) voxels around ``center`` (x, y, z; default: image centre), keeping geometry."""
    full = image.GetSize()
    center = center or tuple(s // 2 for s in full)
    start = [min(max(c - s // 2, 0), f - s) for c, s, f in zip(center, size, full)]
    return image[start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]


def _foreground_center(label: sitk.Image) -> tuple[int, int, int]:
    zyx = np.argwhere(sitk.GetArrayViewFromImage(label) > 0).mean(axis=0)
    return tuple(int(round(v)) for v in zyx[::-1])  # type: ignore[return-value]


def _write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _write_json(root: Path, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))


def _by_file(problems: list[Problem], root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.file.relative_to(root).as_posix(), []).append(p.message)
    return out


# --------------------------------------------------------------------------------------------------
# reading the shared datasets


def test_open_la2018(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "LA2018-lowres"))
    assert ds.layout == "nnunet"
    assert ds.name == "LA2018-lowres"
    assert ds.file_ending == ".nii.gz"
    assert len(ds.training) == 80 and len(ds.test) == 10
    assert ds.num_channels == 1 and ds.channel_names == {0: "LGE-MRI"}
    assert ds.labels == LA_LABELS
    assert ds.num_classes == 2 and ds.labels.names == ["background", "left_atrium"]
    assert all(r.label_file is not None and r.label_file.is_file() for r in ds.training + ds.test)
    assert all(len(r.image_files) == 1 and r.image_files[0].is_file() for r in ds.training + ds.test)
    assert [r.case_id for r in ds.training] == sorted(r.case_id for r in ds.training)
    assert not ds.unexpected_files


def test_open_acdc(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "ACDC-subset"))
    assert len(ds.training) == 48 and ds.test == ()
    assert ds.num_channels == 1
    assert ds.num_classes == 4
    assert ds.labels.names == ["background", "right_ventricle", "myocardium", "left_ventricle"]


def test_open_brats(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "BraTS2015-subset"))
    assert len(ds.training) == 6 and ds.test == ()
    assert ds.channel_names == {0: "FLAIR", 1: "T1c"} and ds.num_channels == 2
    assert ds.labels == BRATS_LABELS and ds.num_classes == 5
    rec = ds.training[0]
    assert [f.name for f in rec.image_files] == [f"{rec.case_id}_0000.nii.gz", f"{rec.case_id}_0001.nii.gz"]


def test_load_la2018_case(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "LA2018-lowres"))
    rec = ds.training[0]
    case = load_case(rec, ds)
    assert isinstance(case, LoadedCase) and case.case_id == rec.case_id
    ref = sitk.ReadImage(str(rec.image_files[0]))
    assert case.image.dtype == np.float32
    assert case.image.shape == (1,) + tuple(reversed(ref.GetSize()))
    assert case.label is not None and case.label.dtype == np.uint8 and case.label.shape == case.image.shape[1:]
    assert set(np.unique(case.label)) <= {0, 1} and case.label.any()
    np.testing.assert_array_equal(case.image[0], sitk.GetArrayFromImage(ref))
    g = case.geometry
    assert g.spacing == pytest.approx(ref.GetSpacing()) and g.spacing_dhw == pytest.approx(tuple(reversed(ref.GetSpacing())))
    assert g.origin == pytest.approx(ref.GetOrigin()) and g.direction == pytest.approx(ref.GetDirection())
    test_case = load_case(ds.test[0], ds)
    assert test_case.label is not None and test_case.label.shape == test_case.image.shape[1:]


def test_load_acdc_case(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "ACDC-subset"))
    case = load_case(ds.training[0], ds)
    c, d, h, w = case.image.shape
    assert c == 1 and 6 <= d <= 17 and min(h, w) >= 154
    assert case.label is not None and case.label.shape == (d, h, w)
    assert set(np.unique(case.label)) <= {0, 1, 2, 3}


def test_load_brats_case_two_channels(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "BraTS2015-subset"))
    case = load_case(ds.training[0], ds)
    assert case.image.shape == (2, 155, 240, 240) and case.image.dtype == np.float32
    assert case.label is not None and case.label.shape == (155, 240, 240) and case.label.dtype == np.uint8
    assert set(np.unique(case.label)) <= set(BRATS_LABELS.values())
    assert not np.array_equal(case.image[0], case.image[1])  # FLAIR and T1c are different channels
    assert case.geometry.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_la2018_validates_clean(shared_data: Path) -> None:
    ds = open_dataset(_dataset_dir(shared_data, "LA2018-lowres"))
    start = time.perf_counter()
    problems = validate_dataset(ds, progress=False)
    elapsed = time.perf_counter() - start
    assert problems == [], "\n".join(map(str, problems))
    assert elapsed < 30, f"validating LA2018-lowres took {elapsed:.1f} s"


def test_acdc_and_brats_cases_validate_clean(shared_data: Path) -> None:
    acdc = open_dataset(_dataset_dir(shared_data, "ACDC-subset"))
    brats = open_dataset(_dataset_dir(shared_data, "BraTS2015-subset"))
    problems = [p for rec in acdc.training[:3] for p in validate_case(rec, acdc)]
    problems += validate_case(brats.training[0], brats)
    assert problems == [], "\n".join(map(str, problems))


# --------------------------------------------------------------------------------------------------
# MSD layout, built from crops of BraTS


@pytest.fixture(scope="module")
def brats_crops(shared_data: Path) -> list[tuple[str, list[sitk.Image], sitk.Image]]:
    """Three 32^3 crops (around the tumour) of BraTS cases: (case id, [FLAIR, T1c], label)."""
    ds = open_dataset(_dataset_dir(shared_data, "BraTS2015-subset"))
    crops = []
    for rec in ds.training[:3]:
        label = sitk.ReadImage(str(rec.label_file))
        center = _foreground_center(label)
        channels = [_crop(sitk.ReadImage(str(f)), (32, 32, 32), center) for f in rec.image_files]
        crops.append((rec.case_id, channels, _crop(label, (32, 32, 32), center)))
    return crops


def _write_nnunet_copy(root: Path, crops, channel_names: dict, labels: dict) -> None:
    for case_id, channels, label in crops:
        for c, img in enumerate(channels):
            _write(img, root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
        _write(label, root / "labelsTr" / f"{case_id}.nii.gz")
    _write_json(
        root,
        {
            "name": "crops",
            "channel_names": channel_names,
            "labels": labels,
            "numTraining": len(crops),
            "file_ending": ".nii.gz",
        },
    )


def _write_msd_copy(root: Path, crops, test_crops) -> None:
    training = []
    for case_id, channels, label in crops:
        _write(sitk.JoinSeries(channels), root / "imagesTr" / f"{case_id}.nii.gz")
        _write(label, root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    test = []
    for case_id, channels, _ in test_crops:
        _write(sitk.JoinSeries(channels), root / "imagesTs" / f"{case_id}.nii.gz")
        test.append(f"./imagesTs/{case_id}.nii.gz")
    _write_json(
        root,
        {
            "name": "crops-msd",
            "modality": {"0": "FLAIR", "1": "T1c"},
            "labels": {str(v): k for k, v in BRATS_LABELS.items()},
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        },
    )


def test_msd_layout_reads_like_nnunet(tmp_path: Path, brats_crops) -> None:
    train, test = brats_crops[:2], brats_crops[2:]
    _write_nnunet_copy(tmp_path / "nnunet", train, {"0": "FLAIR", "1": "T1c"}, BRATS_LABELS)
    _write_msd_copy(tmp_path / "msd", train, test)
    nn, msd = open_dataset(tmp_path / "nnunet"), open_dataset(tmp_path / "msd")

    assert msd.layout == "msd" and nn.layout == "nnunet"
    assert msd.channel_names == nn.channel_names == {0: "FLAIR", 1: "T1c"}
    assert msd.labels == nn.labels == BRATS_LABELS
    assert msd.file_ending == ".nii.gz"
    assert [r.case_id for r in msd.training] == [r.case_id for r in nn.training]
    assert all(len(r.image_files) == 1 and r.layout == "msd" for r in msd.training)
    assert len(msd.test) == 1 and msd.test[0].label_file is None

    for a_rec, b_rec in zip(nn.training, msd.training):
        a, b = load_case(a_rec, nn), load_case(b_rec, msd)
        assert b.image.shape == (2, 32, 32, 32) and b.image.dtype == np.float32
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.geometry.spacing == pytest.approx(b.geometry.spacing)
        assert a.geometry.origin == pytest.approx(b.geometry.origin, abs=1e-4)
        assert a.geometry.direction == pytest.approx(b.geometry.direction)
        assert len(b.geometry.origin) == 3 and len(b.geometry.direction) == 9
    case_id, channels, _ = test[0]
    loaded = load_case(msd.test[0], msd)
    assert loaded.label is None
    np.testing.assert_array_equal(loaded.image[1], sitk.GetArrayFromImage(channels[1]))

    assert validate_dataset(msd, progress=False) == []
    assert validate_dataset(nn, progress=False) == []


def test_msd_channel_count_mismatch(tmp_path: Path, brats_crops) -> None:
    root = tmp_path / "msd"
    _write_msd_copy(root, brats_crops[:2], [])
    case_id, channels, _ = brats_crops[0]
    bad = _write(sitk.JoinSeries(channels + [channels[0]]), root / "imagesTr" / f"{case_id}.nii.gz")
    ds = open_dataset(root)
    problems = validate_dataset(ds, progress=False)
    assert [p.file for p in problems] == [bad]
    assert "holds 3 channels" in problems[0].message and "'modality' lists 2" in problems[0].message
    with pytest.raises(ReCoKDError, match="3 channels"):
        load_case(ds.training[0], ds)


# --------------------------------------------------------------------------------------------------
# synthetic datasets: file formats, axis order


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_formats_and_axis_order(tmp_path: Path, ending: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(4, 6, 8)).astype(np.float32)  # (D, H, W) = sitk (z, y, x)
    lab = (arr > 0).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((10.0, -5.0, 3.0))
    lbl = sitk.GetImageFromArray(lab)
    lbl.CopyInformation(img)
    _write(img, tmp_path / "imagesTr" / f"case_0000{ending}")
    _write(lbl, tmp_path / "labelsTr" / f"case{ending}")
    _write_json(
        tmp_path,
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "fg": 1}, "numTraining": 1, "file_ending": ending},
    )
    ds = open_dataset(tmp_path)
    assert ds.file_ending == ending and len(ds.training) == 1
    case = load_case(ds.training[0], ds)
    assert case.image.shape == (1, 4, 6, 8)
    assert case.geometry.spacing_dhw == pytest.approx((2.0, 0.75, 0.5))  # numpy axis order
    assert case.geometry.spacing == pytest.approx((0.5, 0.75, 2.0))  # the file's (x, y, z)
    assert case.geometry.origin == pytest.approx((10.0, -5.0, 3.0))
    np.testing.assert_allclose(case.image[0], arr)
    np.testing.assert_array_equal(case.label, lab)
    assert validate_dataset(ds, progress=False) == []
    require_valid(ds, progress=False)  # a clean dataset passes silently
    header = read_header(ds.training[0].image_files[0])
    assert header.size == (8, 6, 4) and not header.is_2d


def test_nnunet_explicit_file_list(tmp_path: Path, capsys) -> None:
    """nnU-Net v2's optional "dataset" key lists each case's files explicitly."""
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    for c in range(2):
        _write(sitk.GetImageFromArray(arr + c), tmp_path / "scans" / f"s1_ch{c}.nii.gz")
    _write(sitk.GetImageFromArray((arr > 30).astype(np.uint8)), tmp_path / "masks" / "s1.nii.gz")
    _write_json(
        tmp_path,
        {
            "channel_names": {"0": "A", "1": "B"},
            "labels": {"background": 0, "fg": 1},
            "numTraining": 1,
            "file_ending": ".nii.gz",
            "dataset": {"s1": {"images": ["scans/s1_ch0.nii.gz", "scans/s1_ch1.nii.gz"], "label": "masks/s1.nii.gz"}},
        },
    )
    ds = open_dataset(tmp_path)
    assert [r.case_id for r in ds.training] == ["s1"]
    case = load_case(ds.training[0], ds)
    assert case.image.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(case.image[1], arr + 1)
    assert validate_dataset(ds) == []  # with the progress bar on
    capsys.readouterr()


def test_labels_normalised_and_ignore_label(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    _write_json(
        tmp_path,
        {
            "channel_names": {"1": "T2", "0": "T1"},
            "labels": {"background": 0, "a": 1, "c": 3, "ignore": 4},
            "file_ending": ".nii.gz",
        },
    )
    ds = open_dataset(tmp_path)
    assert ds.channel_names == {0: "T1", 1: "T2"}
    assert ds.labels.ignore_label == 4 and ds.num_classes == 4
    assert ds.labels.names == ["background", "a", "label_2", "c"]


# --------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "meta, match",
    [
        (None, "has no dataset.json"),
        ("{not json", "not valid JSON"),
        ({"labels": {"background": 0}}, "neither"),
        ({"channel_names": {"0": "MRI"}, "labels": {"fg": 1}, "file_ending": ".nii.gz"}, "background value 0"),
        ({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "wt": [1, 2]}, "file_ending": ".nii.gz"}, "region"),
        ({"channel_names": {"0": "MRI", "2": "T2"}, "labels": {"background": 0}, "file_ending": ".nii.gz"}, "without gaps"),
        ({"modality": {"0": "MRI"}, "labels": {"0": "background"}}, '"training" must be a list'),
    ],
)
def test_open_dataset_errors(tmp_path: Path, meta, match: str) -> None:
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    if isinstance(meta, str):
        (root / "dataset.json").write_text(meta)
    elif meta is not None:
        _write_json(root, meta)
    with pytest.raises(ReCoKDError, match=match) as info:
        open_dataset(root)
    assert "\n" not in str(info.value)


def test_open_dataset_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ReCoKDError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")


def test_read_image_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(os.urandom(300))
    for path in (garbage, tmp_path / "missing.nii.gz"):
        with pytest.raises(ReCoKDError) as info:
            read_image(path)
        msg = str(info.value)
        assert msg.startswith(f"cannot read {path}: ") and "check the file is a valid NIfTI/NRRD/MHA image" in msg
        assert "\n" not in msg


# --------------------------------------------------------------------------------------------------
# validation: every problem at once, each naming its file


@pytest.fixture(scope="module")
def la_crops(shared_data: Path) -> list[tuple[sitk.Image, sitk.Image]]:
    """Three 24x24x12 crops (around the atrium) of LA2018-lowres cases: (image, label)."""
    ds = open_dataset(_dataset_dir(shared_data, "LA2018-lowres"))
    crops = []
    for rec in ds.training[:3]:
        label = sitk.ReadImage(str(rec.label_file))
        center = _foreground_center(label)
        image = sitk.ReadImage(str(rec.image_files[0]))
        crops.append((_crop(image, (24, 24, 12), center), _crop(label, (24, 24, 12), center)))
    return crops


def _build_broken_dataset(root: Path, crops) -> dict[str, list[str]]:
    """A 2-channel nnU-Net dataset with one corruption per case; returns {relative file: [message keywords]}."""

    def case(name: str, k: int, split: str = "Tr"):
        image, label = crops[k % len(crops)]
        ch0 = sitk.Image(image)
        ch1 = sitk.Cast(image * -1.0, sitk.sitkFloat32)
        paths = (
            root / f"images{split}" / f"{name}_0000.nii.gz",
            root / f"images{split}" / f"{name}_0001.nii.gz",
            root / f"labels{split}" / f"{name}.nii.gz",
        )
        for img, p in zip((ch0, ch1, sitk.Image(label)), paths):
            _write(img, p)
        return (ch0, ch1, sitk.Image(label)), paths

    expected: dict[str, list[str]] = {}

    def expect(path: Path, *keywords: str) -> None:
        expected.setdefault(path.relative_to(root).as_posix(), []).extend(keywords)

    case("clean", 0)

    _, (c0, c1, lab) = case("missing_channel", 1)
    c1.unlink()
    expect(c1, "missing channel 0001 (LGE-negated)")

    _, (c0, c1, lab) = case("missing_label", 2)
    lab.unlink()
    expect(lab, "missing label")

    _, (c0, c1, lab) = case("orphan_label", 0)
    c0.unlink()
    c1.unlink()
    expect(c0, "missing image channel 0000")
    expect(c1, "missing image channel 0001")

    (i0, i1, l), (c0, c1, lab) = case("size_mismatch", 1)
    _write(i1[:, :, :10], c1)
    expect(c1, "size 24x24x10 differs")

    (i0, i1, l), (c0, c1, lab) = case("spacing_mismatch", 2)
    l.SetSpacing(tuple(s * 1.1 for s in l.GetSpacing()))
    _write(l, lab)
    expect(lab, "spacing")

    (i0, i1, l), (c0, c1, lab) = case("origin_mismatch", 0)
    i1.SetOrigin(tuple(o + d for o, d in zip(i1.GetOrigin(), (2.0, 0.0, 0.0))))
    _write(i1, c1)
    expect(c1, "origin")

    (i0, i1, l), (c0, c1, lab) = case("direction_mismatch", 1)
    l.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # LA is (-1, -1, 1)
    _write(l, lab)
    expect(lab, "direction")

    (i0, i1, l), (c0, c1, lab) = case("undeclared_label", 2)
    arr = sitk.GetArrayFromImage(l)
    arr[0, 0, 0], arr[-1, -1, -1] = 3, 7
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(l)
    _write(bad, lab)
    expect(lab, "label values 3, 7 not declared")

    _, (c0, c1, lab) = case("corrupt", 0)
    c0.write_bytes(os.urandom(2000))
    expect(c0, "unreadable")

    _, (c0, c1, lab) = case("truncated", 1)
    data = c1.read_bytes()
    c1.write_bytes(data[: len(data) // 2])
    expect(c1, "corrupt compressed data")

    (i0, i1, l), (c0, c1, lab) = case("flat_2d", 2)
    _write(i1[:, :, 5], c1)  # a true 2D image
    expect(c1, "is 2D")

    (i0, i1, l), (c0, c1, lab) = case("singleton_slice", 0)
    _write(i0[:, :, 5:6], c0)  # 3D with one slice
    expect(c0, "is 2D")

    (i0, i1, l), (c0, c1, lab) = case("nan_voxels", 1)
    arr = sitk.GetArrayFromImage(i0)
    arr[1, 2, 3], arr[2, 3, 4], arr[3, 4, 5] = np.nan, np.nan, np.inf
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(i0)
    _write(bad, c0)
    expect(c0, "2 NaN and 1 Inf voxels")

    # stray files in imagesTr
    _write(crops[0][0], root / "imagesTr" / "clean_0002.nii.gz")
    expect(root / "imagesTr" / "clean_0002.nii.gz", "channel 0002 is beyond the 2 channels")
    _write(crops[0][0], root / "imagesTr" / "readme.nii.gz")
    expect(root / "imagesTr" / "readme.nii.gz", "fits no case")

    # a test case with an undeclared label value
    (i0, i1, l), (c0, c1, lab) = case("test_case", 0, split="Ts")
    arr = sitk.GetArrayFromImage(l)
    arr[0, 0, 0] = 5
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(l)
    _write(bad, lab)
    expect(lab, "label value 5 not declared")

    _write_json(
        root,
        {
            "name": "broken",
            "channel_names": {"0": "LGE", "1": "LGE-negated"},
            "labels": LA_LABELS,
            "numTraining": 99,
            "file_ending": ".nii.gz",
        },
    )
    expect(root / "dataset.json", "numTraining is 99 but 14 training cases")
    return expected


def test_validation_reports_every_problem(tmp_path: Path, la_crops) -> None:
    root = tmp_path / "broken"
    expected = _build_broken_dataset(root, la_crops)
    ds = open_dataset(root)
    assert len(ds.training) == 14 and len(ds.test) == 1

    problems = validate_dataset(ds, progress=False)
    got = _by_file(problems, ds.root)
    assert sorted(got) == sorted(expected), "\n".join(map(str, problems))
    for rel, keywords in expected.items():
        messages = got[rel]
        assert len(messages) == len(keywords), f"{rel}: {messages}"
        for kw in keywords:
            assert any(kw in m for m in messages), f"{rel}: {kw!r} not in {messages}"
    for p in problems:
        assert "\n" not in p.message and str(p) == f"{p.file}: {p.message}"
    assert not any("clean_0000" in str(p.file) or "labelsTr/clean" in str(p.file) for p in problems)

    # check_test=False skips imagesTs/labelsTs
    without_test = validate_dataset(ds, check_test=False, progress=False)
    assert len(without_test) == len(problems) - 1
    assert not any("labelsTs" in str(p.file) for p in without_test)

    # require_valid lists the count and every problem, one per line
    with pytest.raises(DatasetValidationError) as info:
        require_valid(ds, progress=False)
    err = info.value
    assert isinstance(err, ReCoKDError) and err.problems == problems
    lines = str(err).splitlines()
    assert f"has {len(problems)} problems" in lines[0]
    assert lines[1:] == [f"  {p}" for p in problems]


def test_tolerance_controls_geometry_checks(tmp_path: Path, la_crops) -> None:
    image, label = la_crops[0]
    shifted = sitk.Image(label)
    shifted.SetOrigin(tuple(o + 0.01 for o in label.GetOrigin()))
    _write(image, tmp_path / "imagesTr" / "a_0000.nii.gz")
    lab = _write(shifted, tmp_path / "labelsTr" / "a.nii.gz")
    _write_json(
        tmp_path, {"channel_names": {"0": "LGE"}, "labels": LA_LABELS, "numTraining": 1, "file_ending": ".nii.gz"}
    )
    ds = open_dataset(tmp_path)
    strict = validate_dataset(ds, progress=False)
    assert [p.file for p in strict] == [lab] and "origin" in strict[0].message
    assert validate_dataset(ds, progress=False, tolerance=0.1) == []


def test_load_case_errors_name_the_file(tmp_path: Path, la_crops) -> None:
    image, label = la_crops[0]
    c0 = _write(image, tmp_path / "imagesTr" / "a_0000.nii.gz")
    _write(label[:, :, :10], tmp_path / "labelsTr" / "a.nii.gz")
    _write(image, tmp_path / "imagesTr" / "b_0000.nii.gz")
    _write(label, tmp_path / "labelsTr" / "b.nii.gz")
    _write_json(
        tmp_path, {"channel_names": {"0": "LGE"}, "labels": LA_LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
    )
    ds = open_dataset(tmp_path)
    with pytest.raises(ReCoKDError, match=r"labelsTr/a\.nii\.gz has shape"):
        load_case(ds.training[0], ds)
    (tmp_path / "imagesTr" / "b_0000.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(ReCoKDError, match=r"cannot read .*imagesTr/b_0000\.nii\.gz"):
        load_case(ds.training[1], ds)
    assert c0.is_file()


def test_records_are_frozen(tmp_path: Path) -> None:
    rec = CaseRecord("x", (tmp_path / "x_0000.nii.gz",), None, "nnunet")
    with pytest.raises(Exception):
        rec.case_id = "y"  # type: ignore[misc]
    assert DatasetInfo.__dataclass_params__.frozen  # type: ignore[attr-defined]
