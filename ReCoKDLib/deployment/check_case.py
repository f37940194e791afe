"""A bundle's check case: one window of a real image, preprocessed as the network sees it, with the labels
the network gives it at fp32.

It lets a machine decide whether a cheaper arithmetic is safe *for this model* before using it:
``recokd predict --precision auto`` runs the window at bfloat16 and keeps bf16 only when its labels agree
with the stored fp32 labels on at least :data:`AGREEMENT` of the voxels (see
:func:`~ReCoKDLib.inference.backends.resolve_precision`). The window is centred on the labelled structures
(where rounding changes a label, it changes it at a boundary), and is stored as the optional bundle member
``check.safetensors`` (tensors ``image`` float16 (C, *patch), the normalised intensities rounded to half
precision to keep the bundle small, and ``labels`` uint8 (*patch), the fp32 network's labels of exactly that
rounded image): tensors only, never pickled.

``recokd export`` adds one from the run's first validation case when the run's dataset is reachable;
:func:`~ReCoKDLib.deployment.bundle.with_check_case` adds one to an existing bundle (``scripts/add_check_cases.py``
did so for the shipped models, from held-out cases of their datasets).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..data.datasets import LoadedCase
from ..data.preprocessing import preprocess_case
from ..errors import ReCoKDError

__all__ = ["CHECK_MEMBER", "AGREEMENT", "make_check_case", "read_check_case", "label_agreement"]

CHECK_MEMBER = "check.safetensors"
#: the share of voxels a cheaper arithmetic must label as fp32 does, on the check case
AGREEMENT = 0.999


def _window(pre_image: np.ndarray, pre_label: np.ndarray | None, patch: tuple[int, ...]) -> np.ndarray:
    """The patch-sized window of ``pre_image`` (C, D, H, W) centred on the foreground's bounding box (the
    image's centre without one), zero-padded where the image is smaller."""
    shape = pre_image.shape[1:]
    if pre_label is not None and np.any(pre_label > 0):
        where = np.argwhere(pre_label > 0)
        centre = (where.min(0) + where.max(0)) // 2
    else:
        centre = np.asarray(shape) // 2
    pads, slices = [(0, 0)], [slice(None)]
    for c, n, p in zip(centre, shape, patch):
        start = int(min(max(c - p // 2, 0), max(n - p, 0)))
        stop = min(start + p, n)
        slices.append(slice(start, stop))
        pads.append((0, p - (stop - start)))
    return np.pad(pre_image[tuple(slices)], pads).astype(np.float32)


def make_check_case(bundle: Any, case: LoadedCase) -> bytes:
    """The ``check.safetensors`` bytes for ``bundle`` from one loaded case (image (C, D, H, W) in the training
    data's orientation; its label, when given, centres the window)."""
    from safetensors.numpy import save

    pre = preprocess_case(case, bundle.plans)
    image = _window(pre.image, pre.label, tuple(int(p) for p in bundle.plans.patch_size)).astype(np.float16)
    network = bundle.build_network("cpu")
    with torch.inference_mode():
        labels = network(torch.from_numpy(image.astype(np.float32))[None]).argmax(1)[0].numpy().astype(np.uint8)
    return save({"image": image, "labels": labels})


def read_check_case(data: bytes, where: str = "bundle") -> tuple[torch.Tensor, torch.Tensor]:
    """``(image (1, C, *patch) float32, labels (*patch) uint8)`` from ``check.safetensors`` bytes."""
    from safetensors.numpy import load

    try:
        tensors = load(data)
        image, labels = tensors["image"], tensors["labels"]
    except Exception as exc:  # safetensors raises its own error types on malformed bytes
        raise ReCoKDError(f"{where}: {CHECK_MEMBER} is not a check case ({type(exc).__name__}); re-export the "
                          "model") from None
    if image.ndim != 4 or labels.shape != image.shape[1:]:
        raise ReCoKDError(f"{where}: {CHECK_MEMBER} holds an image of shape {image.shape} and labels of shape "
                          f"{labels.shape}; re-export the model")
    return torch.from_numpy(image.astype(np.float32))[None], torch.from_numpy(labels)


def label_agreement(network: Callable[[torch.Tensor], torch.Tensor], data: bytes, where: str = "bundle") -> float:
    """The share of the check window's voxels that ``network`` labels as the stored fp32 labels."""
    image, labels = read_check_case(data, where)
    with torch.inference_mode():
        predicted = network(image).float().argmax(1)[0]
    return float((predicted == labels.long()).float().mean())
