"""Tests of the synthetic phantom generator (ReCoKDLib.data.phantom)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ReCoKDLib.data.phantom import (
    PHANTOM_COLORS,
    PHANTOM_LABELS,
    PhantomCase,
    generate_case,
    generate_dataset,
    save_dataset_nnunet,
)
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.utils.geometry import ImageGeometry

ORGAN, KIDNEY, VESSEL, LESION = (PHANTOM_LABELS[k] for k in ("organ", "kidney", "vessel", "lesion"))


@pytest.fixture(scope="module")
def cases():
    return generate_dataset(5, seed=0)


def _count_components(mask: np.ndarray) -> int:
    """Number of 26-connected components of a 3D bool mask (max-id propagation with max_pool3d)."""
    if not mask.any():
        return 0
    nz = np.nonzero(mask)
    mask = mask[tuple(slice(i.min(), i.max() + 1) for i in nz)]  # crop: fewer voxels per iteration
    m = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    ids = torch.arange(1, m.numel() + 1, dtype=torch.float64).reshape(m.shape) * m
    while True:
        new = F.max_pool3d(ids, 3, stride=1, padding=1) * m
        if torch.equal(new, ids):
            return int(torch.unique(ids[m]).numel())
        ids = new


def _erosion_keep(mask: np.ndarray) -> float:
    """Fraction of a mask's voxels that survive a 3x3x3 erosion (min-filter as -max_pool3d(-x))."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    eroded = -F.max_pool3d(-m, 3, stride=1, padding=1)
    return float(eroded.sum() / m.sum())


def test_constants():
    assert PHANTOM_LABELS == {"background": 0, "organ": 1, "kidney": 2, "vessel": 3, "lesion": 4}
    assert set(PHANTOM_COLORS) == set(PHANTOM_LABELS)
    for rgb in PHANTOM_COLORS.values():
        assert len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb)


def test_deterministic():
    a, b, c = generate_case(5), generate_case(5), generate_case(6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.name == "phantom_005"
    assert not np.array_equal(a.label, c.label)
    assert not np.allclose(a.image, c.image)


def test_dataset_prefix_and_names():
    small, large = generate_dataset(2, seed=3), generate_dataset(3, seed=3)
    assert [c.name for c in large] == ["phantom_000", "phantom_001", "phantom_002"]
    for s, l in zip(small, large):
        np.testing.assert_array_equal(s.image, l.image)
        np.testing.assert_array_equal(s.label, l.label)
    assert not np.array_equal(large[0].label, large[1].label)
    assert not np.array_equal(generate_dataset(1, seed=4)[0].label, large[0].label)


def test_case_arrays(cases):
    for case in cases:
        assert isinstance(case, PhantomCase)
        assert case.image.dtype == np.float32 and case.image.shape == (1, 64, 64, 64)
        assert case.label.dtype == np.uint8 and case.label.shape == (64, 64, 64)
        assert case.geometry.spacing == (1.0, 1.0, 1.0)
        assert np.isfinite(case.image).all()
        assert abs(float(case.image.mean())) < 1e-3
        assert abs(float(case.image.std()) - 1.0) < 1e-3


def test_labels_and_volume_fractions(cases):
    for case in cases:
        label = case.label
        assert set(np.unique(label).tolist()) == set(PHANTOM_LABELS.values())
        frac = {v: float(np.mean(label == v)) for v in PHANTOM_LABELS.values()}
        assert 0.07 < frac[ORGAN] < 0.25  # large organ
        assert 0.015 < frac[KIDNEY] < 0.045  # two medium organs
        assert 0 < frac[VESSEL] < frac[ORGAN] / 10  # thin
        assert 0 < frac[LESION] < 0.005  # small


def test_connectivity(cases):
    for case in cases:
        kidney = case.label == KIDNEY
        assert _count_components(kidney) == 2
        half = kidney.shape[2] // 2
        assert kidney[:, :, :half].any() and kidney[:, :, half:].any()  # one left, one right
        assert _count_components(case.label == VESSEL) == 1
        assert 2 <= _count_components(case.label == LESION) <= 4


def test_vessel_is_thin(cases):
    for case in cases:
        assert _erosion_keep(case.label == VESSEL) < 0.25
        assert _erosion_keep(case.label == ORGAN) > 0.5


def test_intensities(cases):
    for case in cases:
        image, label = case.image[0], case.label
        mean = {v: float(image[label == v].mean()) for v in PHANTOM_LABELS.values()}
        assert mean[ORGAN] - mean[0] > 0.3
        assert mean[VESSEL] - mean[ORGAN] > 0.2
        assert abs(mean[KIDNEY] - mean[ORGAN]) > 0.05
        assert abs(mean[LESION] - mean[ORGAN]) > 0.15
        # noise: the organ's interior is not flat
        interior = -F.max_pool3d(-torch.from_numpy((label == ORGAN).astype(np.float32))[None, None], 5, 1, 2)
        assert float(image[interior[0, 0].numpy() > 0].std()) > 0.05


def test_other_shapes():
    case = generate_case(1, shape=(32, 48, 40))
    assert case.image.shape == (1, 32, 48, 40) and case.label.shape == (32, 48, 40)
    assert set(np.unique(case.label).tolist()) == set(PHANTOM_LABELS.values())


def test_save_dataset_nnunet(cases, tmp_path):
    out = save_dataset_nnunet(cases[:2], tmp_path / "Dataset999_Phantom")
    assert out == tmp_path / "Dataset999_Phantom"
    for case in cases[:2]:
        image = sitk.ReadImage(str(out / "imagesTr" / f"{case.name}_0000.nii.gz"))
        label = sitk.ReadImage(str(out / "labelsTr" / f"{case.name}.nii.gz"))
        assert image.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), case.label)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), case.image[0])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == PHANTOM_LABELS
    assert meta["numTraining"] == 2
    assert meta["file_ending"] == ".nii.gz"


def test_save_keeps_axis_order_and_spacing(tmp_path):
    label = np.zeros((32, 40, 48), dtype=np.uint8)
    label[1, 2, 3] = 4
    case = PhantomCase(np.zeros((1, 32, 40, 48), np.float32), label, ImageGeometry.from_spacing_dhw((2.0, 1.5, 1.0)), "axes")
    out = save_dataset_nnunet([case], tmp_path)
    read = sitk.ReadImage(str(out / "labelsTr" / "axes.nii.gz"))
    assert read.GetSize() == (48, 40, 32)  # (x=W, y=H, z=D)
    assert read.GetSpacing() == pytest.approx((1.0, 1.5, 2.0))
    assert read[3, 2, 1] == 4


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 64, 64), (64, 16, 64), (64.0, 64, 64), "abc", None])
def test_bad_shape(shape):
    with pytest.raises(ReCoKDError) as info:
        generate_case(0, shape=shape)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_cases", [0, -2, 1.5])
def test_bad_num_cases(num_cases):
    with pytest.raises(ReCoKDError):
        generate_dataset(num_cases)


def test_bad_seed_and_empty_save(tmp_path):
    with pytest.raises(ReCoKDError):
        generate_case(-1)
    with pytest.raises(ReCoKDError):
        generate_dataset(2, seed=-1)
    with pytest.raises(ReCoKDError):
        save_dataset_nnunet([], tmp_path)
    with pytest.raises(ReCoKDError):
        generate_dataset(2, shape=(64, 64, 8))
