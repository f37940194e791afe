"""ImageGeometry: the one image-geometry type, its axis order, and the RAS <-> LPS conversion."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.utils.geometry import ImageGeometry, dhw_to_xyz, xyz_to_dhw

ROOT = Path(__file__).resolve().parents[1]
OBLIQUE = tuple(np.linalg.qr(np.array([[1.0, 0.2, 0.1], [0.3, 1.0, 0.0], [0.0, 0.4, 1.0]]))[0].ravel())


def _image(shape_dhw=(4, 5, 6)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.zeros(shape_dhw, np.float32))
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection(OBLIQUE)
    return image


def test_of_reads_the_file_order_and_spacing_dhw_is_the_array_order() -> None:
    g = ImageGeometry.of(_image())
    assert g.spacing == (0.5, 0.75, 2.0) and g.origin == (10.0, -5.0, 3.0)
    assert g.direction == pytest.approx(OBLIQUE)
    assert g.spacing_dhw == (2.0, 0.75, 0.5)
    # the array of the same image is (D, H, W): its first axis is the z spacing
    assert sitk.GetArrayFromImage(_image()).shape == (4, 5, 6)
    assert ImageGeometry.from_spacing_dhw(g.spacing_dhw, g.origin, g.direction) == g


def test_of_a_4d_image_keeps_the_spatial_part() -> None:
    image = sitk.Image([6, 5, 4, 2], sitk.sitkFloat32)
    image.SetSpacing((0.5, 0.75, 2.0, 1.0))
    image.SetOrigin((1.0, 2.0, 3.0, 0.0))
    d4 = np.eye(4)
    d4[:3, :3] = np.reshape(OBLIQUE, (3, 3))
    image.SetDirection(tuple(d4.ravel()))
    g = ImageGeometry.of(image)
    assert g.spacing == (0.5, 0.75, 2.0) and g.origin == (1.0, 2.0, 3.0)
    assert g.direction == pytest.approx(OBLIQUE)


def test_apply_to_and_json_round_trip() -> None:
    g = ImageGeometry.of(_image())
    copy = g.apply_to(sitk.GetImageFromArray(np.ones((4, 5, 6), np.uint8)))
    assert ImageGeometry.of(copy) == g
    assert ImageGeometry.from_json(json.loads(json.dumps(g.to_json()))) == g


def test_matches_tolerates_round_off_only() -> None:
    g = ImageGeometry.of(_image())
    assert g.matches(ImageGeometry(tuple(s * (1 + 1e-6) for s in g.spacing), g.origin, g.direction))
    assert not g.matches(ImageGeometry(g.spacing, (10.01, -5.0, 3.0), g.direction))
    assert not g.matches(ImageGeometry(tuple(s * 1.01 for s in g.spacing), g.origin, g.direction))
    assert not g.matches(ImageGeometry(g.spacing, g.origin))  # identity vs oblique


def test_ras_round_trip_and_known_matrix() -> None:
    g = ImageGeometry.of(_image())
    assert ImageGeometry.from_ijk_to_ras(g.ijk_to_ras()).matches(g)
    # an identity LPS image: RAS negates x and y (Slicer shows LPS-identity images as "flipped")
    m = ImageGeometry((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)).ijk_to_ras()
    np.testing.assert_allclose(m, [[-1, 0, 0, -4], [0, -2, 0, -5], [0, 0, 3, 6], [0, 0, 0, 1]])
    with pytest.raises(ReCoKDError, match="zero voxel size"):
        ImageGeometry.from_ijk_to_ras(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_axis_order_helpers_are_inverse() -> None:
    assert xyz_to_dhw((1, 2, 3)) == (3, 2, 1) and dhw_to_xyz(xyz_to_dhw((1, 2, 3))) == (1, 2, 3)


def test_no_module_reads_or_writes_image_geometry_by_hand() -> None:
    """SimpleITK's Get/Set Spacing/Origin/Direction are called in utils/geometry.py only: everything
    else goes through ImageGeometry, so the (x, y, z) <-> (D, H, W) flip has one owner."""
    calls = {"GetSpacing", "SetSpacing", "GetOrigin", "SetOrigin", "GetDirection", "SetDirection"}
    offenders = []
    for path in sorted([*(ROOT / "ReCoKDLib").rglob("*.py"), *(ROOT / "ReCoKD").rglob("*.py")]):
        if path.name == "geometry.py" and path.parent.name == "utils":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in calls:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert offenders == []
