"""Volume nodes (Slicer, RAS) <-> SimpleITK images (LPS), and label arrays back onto a volume's grid.

Slicer stores a volume as a (K, J, I) voxel array plus an IJK-to-RAS matrix; ITK files use LPS. The
conversion is :mod:`ReCoKDLib.utils.geometry` (written once, shared with the predictor). Axis order:
numpy (K, J, I) = SimpleITK (z, y, x).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ijkToRasArray", "volumeNodeToImage", "imageOnVolumeGrid", "orientedImageFromArray"]


def ijkToRasArray(volumeNode) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a 4x4 numpy array."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def volumeNodeToImage(volumeNode):
    """A SimpleITK image (float32 unless integer) with the node's voxels and LPS geometry."""
    import SimpleITK as sitk
    import slicer.util

    name = volumeNode.GetName()
    image_data = volumeNode.GetImageData()
    if image_data is None:
        raise ValueError(f"volume '{name}' has no voxels; load the image again")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{name}' has {image_data.GetNumberOfScalarComponents()} components per voxel "
                         "(a colour or vector image); select a scalar volume, one per channel")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(f"volume '{name}' has shape {array.shape}; the models segment 3D volumes")
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32)
    from ReCoKDLib.utils.geometry import ImageGeometry  # the one RAS<->LPS conversion

    return ImageGeometry.from_ijk_to_ras(ijkToRasArray(volumeNode)).apply_to(sitk.GetImageFromArray(array))


def _sameGrid(a, b) -> bool:
    from ReCoKDLib.utils.geometry import ImageGeometry

    return a.GetSize() == b.GetSize() and ImageGeometry.of(a).matches(ImageGeometry.of(b))


def imageOnVolumeGrid(image, reference, interpolator: str = "linear"):
    """``image`` resampled onto ``reference``'s grid (returned unchanged when it is already on it)."""
    import SimpleITK as sitk

    if _sameGrid(image, reference):
        return image
    interp = sitk.sitkNearestNeighbor if interpolator == "nearest" else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, image.GetPixelID())


def orientedImageFromArray(array: np.ndarray, ijkToRas: np.ndarray):
    """A ``vtkOrientedImageData`` (uint8) holding ``array`` (K, J, I) with the given IJK-to-RAS matrix."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    k, j, i = array.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)[:] = array
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijkToRas[r, c]))
    image.SetImageToWorldMatrix(m)
    return image
