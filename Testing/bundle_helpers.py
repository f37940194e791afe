"""Shared builders for the bundle / predictor / export / evaluation tests: tiny networks and run folders."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ReCoKDLib.deployment.bundle import bundle_from_network
from ReCoKDLib.data.planning import ChannelNormalisation, Plans
from ReCoKDLib.models import build_unet, isotropic_spec, save_weights

LABELS3 = {"background": 0, "organ": 1, "kidney": 2}


def tiny_plans(num_classes: int = 3, patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0), channels: int = 1) -> Plans:
    labels = LABELS3 if num_classes == 3 else {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}
    return Plans(
        dataset_name="Tiny",
        channel_names={i: f"MRI{i}" for i in range(channels)},
        labels=labels,
        target_spacing=spacing,
        normalisation=tuple(ChannelNormalisation("zscore") for _ in range(channels)),
        patch_size=patch,
    )


def tiny_network(plans: Plans, seed: int = 0):
    """A 3-level U-Net for ``plans`` (8/16/32 filters), seeded."""
    torch.manual_seed(seed)
    return build_unet(isotropic_spec(plans.num_channels, plans.num_classes, num_levels=3, filters=[8, 16, 32])).eval()


def make_run(folder: Path, role: str = "student", method: str = "recokd", seed: int = 0, plans: Plans | None = None) -> Path:
    """A training run folder as the training pipeline writes it."""
    plans = plans or tiny_plans()
    folder.mkdir(parents=True, exist_ok=True)
    net = tiny_network(plans, seed)
    plans.save(folder / "plans.json")
    (folder / "network.json").write_text(net.spec.to_json())
    save_weights(net, folder / "model_best.safetensors")
    save_weights(net, folder / "model_final.safetensors")
    run = {
        "version": 1, "role": role, "dataset": None, "dataset_name": plans.dataset_name,
        "labels": dict(plans.labels), "channel_names": {str(k): v for k, v in plans.channel_names.items()},
        "method": method, "teacher_run": None if role == "teacher" else "runs/teacher", "width_factor": 4,
        "fold": 0, "seed": seed, "config": {"steps": 10}, "taps": "encoder", "lambda_max": 0.01,
        "metrics": {"best_epoch": 3, "best_dice_mean": 0.5, "dice_per_class": {"organ": 0.6, "kidney": 0.4}},
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


class ThresholdNet(nn.Module):
    """A fixed two-class "network": logits (−x, x), i.e. foreground where the normalised intensity > 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


def threshold_bundle(target_spacing=(1.5, 1.5, 1.5), reference_direction=None):
    plans = tiny_plans(num_classes=2, spacing=target_spacing)
    return bundle_from_network(tiny_network(plans), plans, "threshold", reference_direction=reference_direction)


def phantom_volume(shape=(32, 32, 32), seed: int = 0) -> np.ndarray:
    """A smooth blob image (D, H, W) float32 with non-zero background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = ((z / 0.6) ** 2 + (y / 0.5) ** 2 + (x / 0.7) ** 2 < 1).astype(np.float32)
    return (blob + 0.2 + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def write_image(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def rewrite_zip(src: Path, dst: Path, edit) -> Path:
    """Copy a zip, letting ``edit(members: dict[name, bytes]) -> dict`` change its members."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members = edit(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst
