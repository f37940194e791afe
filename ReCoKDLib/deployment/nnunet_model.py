"""An nnU-Net v2 results folder seen as a bundle: what ``recokd predict -m <nnU-Net folder>``,
``recokd benchmark`` and the :class:`~ReCoKDLib.inference.Predictor` read of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data.nnunet_plans import plans_from_nnunet
from ..models.nnunet import NNUNetModel, NNUNetTeacher, open_nnunet_model

__all__ = ["NNUNetModelView", "open_nnunet_view"]


class NNUNetModelView:
    """The part of a :class:`~ReCoKDLib.deployment.bundle.Bundle` the predictor reads, for an nnU-Net model:
    its plans (as ReCoKD plans), labels, channels, and the fold ensemble as the network. No post-processing
    and no reorientation: nnU-Net works in the image's array axes, and so does this view; windows are
    blended with nnU-Net's own Gaussian, so the labels are nnU-Net's."""

    role = "teacher"
    window_weights = "nnunet"
    postprocessing = "none"
    reference_direction = None

    def __init__(self, model: NNUNetModel):
        self.model = model
        self.plans = plans_from_nnunet(model)
        self.labels = model.labels
        self.channel_names = model.channel_names
        self.name = model.folder.name
        self.num_classes = self.labels.num_classes
        self.provenance = {"source": "nnU-Net v2", "folder": str(model.folder), "folds": list(model.checkpoints)}

    def describe(self) -> str:
        return self.model.describe()

    def build_network(self, device: str | None = None) -> NNUNetTeacher:
        net = self.model.teacher()
        return net.to(device) if device is not None else net


def open_nnunet_view(path: str | Path, folds: Sequence[str | int] | None = None, checkpoint: str = "final") -> NNUNetModelView:
    """:func:`~ReCoKDLib.models.nnunet.open_nnunet_model` as a bundle-like view."""
    return NNUNetModelView(open_nnunet_model(path, folds, checkpoint))
