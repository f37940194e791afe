"""Render the Slicer module's result to Screenshots/ReCoKD-segment.png.

Runs the module's own logic (``ReCoKD.ReCoKDLogic``, under the ``slicer-core`` MRML model): loads the
sample phantom, segments it with the shipped ``phantom-abdomen`` model in the background process,
exports each segment of the resulting segmentation node back onto the volume's grid, as Slicer's
Segmentations module does, and draws three orthogonal slices with the segments' colours, names and
terminology codes. (No Slicer GUI exists on the build machines; this is the same node, drawn.)

    .venv/bin/python scripts/render_screenshot.py [OUTPUT.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ReCoKD"))


def main(output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer
    import vtk
    from matplotlib.patches import Patch

    slicer.mrmlScene = scene = slicer.vtkMRMLScene()
    import ReCoKD
    from ReCoKDSlicer import terminology

    with tempfile.TemporaryDirectory() as tmp:
        logic = ReCoKD.ReCoKDLogic(scene=scene, modelsFolder=Path(tmp) / "models")
        volume = logic.loadSample()
        node = logic.segment([volume], ReCoKD.SAMPLE_MODEL, device="cpu")
    image = slicer.util.arrayFromVolume(volume)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    segmentation = node.GetSegmentation()
    overlay = np.zeros(image.shape + (4,), np.float32)
    legend = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        seg_logic.ExportSegmentsToLabelmapNode(node, ids, labelmap, volume)
        mask = slicer.util.arrayFromVolume(labelmap) > 0
        scene.RemoveNode(labelmap)
        color = segment.GetColor()
        overlay[mask] = (*color, 0.55)
        tag = vtk.reference("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        codes = terminology.parseEntryString(str(tag))
        legend.append(Patch(color=color, label=f"{segment.GetName()}  ({codes['type'][2]}, SCT {codes['type'][1]})"))
    centre = [s // 2 for s in image.shape]
    views = [("axial", image[centre[0]], overlay[centre[0]]), ("coronal", image[:, centre[1]], overlay[:, centre[1]]),
             ("sagittal", image[:, :, centre[2]], overlay[:, :, centre[2]])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    for ax, (title, slab, colour) in zip(axes, views):
        ax.imshow(slab, cmap="gray", origin="lower")
        ax.imshow(colour, origin="lower")
        ax.set_title(title, color="white")
        ax.axis("off")
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), frameon=False, labelcolor="white", fontsize=9)
    fig.suptitle(f"ReCoKD module, Segment on the sample: {logic.lastMessage}", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, facecolor="black")
    return output


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "Screenshots" / "ReCoKD-segment.png"))
