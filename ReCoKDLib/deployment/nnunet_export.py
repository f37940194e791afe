"""A ReCoKD model as an nnU-Net v2 results folder, for ``nnUNetv2_predict``, SlicerNNUnet and the like.

``recokd export RUN --format nnunet -o DIR`` writes::

    DIR/Dataset<NNN>_<name>/nnUNetTrainer__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  dataset_fingerprint.json  fold_0/checkpoint_final.pth

The network becomes nnU-Net's stock ``PlainConvUNet`` (``dynamic_network_architectures``): ReCoKD's U-Net
(MONAI ``DynUNet`` with nnU-Net's conventions) has the same blocks — per stage two (conv, instance norm,
leaky ReLU), the first conv strided; transposed-conv up-sampling of kernel = stride; the up-sampled map
concatenated before the skip; a 1x1x1 output conv — so every weight maps one to one, and the export runs
both networks on a random patch and refuses unless their logits agree to 1e-4. What cannot be mapped is
refused in one line: DynUNet's decoder convolves level *i* with level *i+1*'s kernel where PlainConvUNet
uses level *i*'s, so plans whose kernels differ between neighbouring levels have no stock equivalent.

Preprocessing: nnU-Net's ``DefaultPreprocessor`` does what ReCoKD's does (crop to the non-zero box, normalise
— Z-score over the crop, or CT clipping with the training foreground's statistics —, resample to the
plan's spacing with an order-3 spline); the plans carry ReCoKD's spacing, normalisation statistics and
resampling order, with every axis interpolated together (``force_separate_z`` False, as ReCoKD). The two
resamplers are different implementations of the same spline (skimage's clips to the input range;
nnU-Net resamples logits back before the argmax, ReCoKD the labels after it), so where an image must be
resampled the labels differ at some edges. nnU-Net never reorients images to the training direction
nor applies the bundle's post-processing, as ``recokd predict`` does: :func:`export_notes` says so, and
``dataset.json`` records both. The checkpoint holds only what ``torch.load(weights_only=True)`` accepts;
it is for prediction (nnU-Net's training, validation and model-zip commands need files a training writes).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ReCoKDError
from ..models.unet import SegUNet, UNetSpec
from .card import trained_without_spacing

__all__ = ["NNUNET_CONFIGURATION", "NNUNET_MODEL_FOLDER", "export_notes", "export_nnunet", "nnunet_architecture",
           "nnunet_labels", "to_plain_conv_unet"]

NNUNET_TRAINER = "nnUNetTrainer"
NNUNET_PLANS = "nnUNetPlans"
NNUNET_CONFIGURATION = "3d_fullres"
NNUNET_MODEL_FOLDER = f"{NNUNET_TRAINER}__{NNUNET_PLANS}__{NNUNET_CONFIGURATION}"
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
#: the largest |logit difference| allowed between ReCoKD's network and the exported one on the check patch
LOGIT_TOLERANCE = 1e-4
_NORMALISATION = {"zscore": "ZScoreNormalization", "ct": "CTNormalization"}


def nnunet_architecture(spec: UNetSpec) -> dict[str, Any]:
    """The plans' ``architecture`` entry of the stock ``PlainConvUNet`` that computes what ``spec``'s network
    computes (deep supervision off: nnU-Net's predictor builds it so).

    Raises:
        ReCoKDError: the network has no stock equivalent (names what differs).
    """
    kernels = [list(k) for k in spec.kernel_sizes]
    for level in range(spec.num_levels - 1):
        if kernels[level] != kernels[level + 1] and spec.decoder_kernels != "own":
            raise ReCoKDError(
                f"network {spec.name!r} cannot be exported to nnU-Net: its decoder convolves level {level} with "
                f"level {level + 1}'s kernel {kernels[level + 1]} (MONAI DynUNet) where nnU-Net's PlainConvUNet "
                f"uses level {level}'s {kernels[level]}; no stock nnU-Net class computes it (export it as a "
                "ReCoKD bundle, ONNX or TorchScript instead; students of nnU-Net teachers use nnU-Net's kernels)")
    n = spec.num_levels
    return {
        "network_class_name": PLAIN_CONV_UNET,
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(spec.filters),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": kernels,
            "strides": [list(s) for s in spec.strides],
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": False,  # DynUNet's convolutions have none (its 1x1x1 output conv has one in both)
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True, "negative_slope": 0.01},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _build_plain_conv_unet(architecture: dict[str, Any], in_channels: int, out_channels: int) -> torch.nn.Module:
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        raise ReCoKDError("exporting to nnU-Net needs dynamic_network_architectures: "
                          "pip install \"recokd[nnunet]\" (with the pinned torch)") from None
    kwargs = dict(architecture["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, dropout_op=None, nonlin=torch.nn.LeakyReLU)
    return PlainConvUNet(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **kwargs)


def _basic_block_pairs(ours: torch.nn.Module, theirs: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(source, target) module pairs of one stage: MONAI UnetBasicBlock -> nnU-Net StackedConvBlocks."""
    return [(ours.conv1.conv, theirs.convs[0].conv), (ours.norm1, theirs.convs[0].norm),
            (ours.conv2.conv, theirs.convs[1].conv), (ours.norm2, theirs.convs[1].norm)]


def to_plain_conv_unet(network: SegUNet) -> tuple[torch.nn.Module, dict[str, Any]]:
    """nnU-Net's stock ``PlainConvUNet`` with ``network``'s weights, and its plans ``architecture`` entry.

    The lower decoder stages' segmentation heads (deep supervision; unused when nnU-Net predicts) are kept
    where ReCoKD trained one, and zero otherwise.
    """
    spec = network.spec
    architecture = nnunet_architecture(spec)
    stock = _build_plain_conv_unet(architecture, spec.in_channels, spec.out_channels)
    encoder_blocks = [network.input_block, *network.downsamples, network.bottleneck]
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    for ours, theirs in zip(encoder_blocks, stock.encoder.stages):
        pairs += _basic_block_pairs(ours, theirs[0])
    for up, stage, transpconv in zip(network.upsamples, stock.decoder.stages, stock.decoder.transpconvs):
        pairs.append((up.transp_conv.conv, transpconv))
        pairs += _basic_block_pairs(up.conv_block, stage)
    seg_layers = stock.decoder.seg_layers
    pairs.append((network.output_block.conv.conv, seg_layers[-1]))
    heads = list(network.deep_supervision_heads) if network.deep_supervision else []
    with torch.no_grad():
        for layer in seg_layers[:-1]:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
        for i, head in enumerate(heads):  # DynUNet's head i sits one level below the previous: seg_layers[-2 - i]
            if i + 2 <= len(seg_layers):
                pairs.append((head.conv.conv, seg_layers[-2 - i]))
        for source, target in pairs:
            for name in ("weight", "bias"):
                a, b = getattr(source, name, None), getattr(target, name, None)
                if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
                    raise ReCoKDError(f"cannot map {type(source).__name__}.{name} {None if a is None else tuple(a.shape)} "
                                      f"onto PlainConvUNet's {None if b is None else tuple(b.shape)}; the network is "
                                      "not the U-Net nnU-Net's class builds")
                if a is not None:
                    b.copy_(a)
    stock.eval()
    return stock, architecture


def _check_same_logits(network: SegUNet, stock: torch.nn.Module, patch, where: str) -> float:
    """Both networks on one random window of the plan's patch size: the largest |logit difference|."""
    shape = [int(p) for p in patch]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, network.spec.in_channels, *shape, generator=generator)
    network.eval()
    with torch.no_grad():
        ours, theirs = network(x), stock(x)
    difference = float((ours - theirs).abs().max())
    if not difference <= LOGIT_TOLERANCE:
        raise ReCoKDError(f"{where}: the nnU-Net network's logits differ from ReCoKD's by up to {difference:.2e} "
                          f"(tolerance {LOGIT_TOLERANCE:g}); nothing was written")
    return difference


def _dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ReCoKDError(f"--dataset-id must be 1..999 (nnU-Net's Dataset<NNN> numbers), got {dataset_id}")
    clean = re.sub(r"^Dataset\d{3}_", "", re.sub(r"[^A-Za-z0-9_-]+", "", name.replace(" ", "_"))) or "ReCoKD"
    return f"Dataset{int(dataset_id):03d}_{clean}"


def _plans_json(bundle, architecture: dict[str, Any], dataset_folder: str) -> dict[str, Any]:
    plans = bundle.plans
    schemes, intensity = [], {}
    for c, norm in enumerate(plans.normalisation):
        if norm.scheme not in _NORMALISATION:
            raise ReCoKDError(f"normalisation {norm.scheme!r} of channel {c} has no nnU-Net equivalent")
        schemes.append(_NORMALISATION[norm.scheme])
        if norm.scheme == "ct":
            intensity[str(c)] = {"mean": norm.mean, "std": norm.std, "percentile_00_5": norm.lower,
                                 "percentile_99_5": norm.upper, "median": norm.mean,
                                 "min": norm.lower, "max": norm.upper}
        else:  # nnU-Net records them for every channel; Z-score does not read them
            intensity[str(c)] = {"mean": 0.0, "std": 1.0, "percentile_00_5": 0.0, "percentile_99_5": 0.0,
                                 "median": 0.0, "min": 0.0, "max": 0.0}
    order = int(plans.resampling.get("image_order", 3))
    spacing = [float(s) for s in plans.target_spacing]
    median = [int(s) for s in plans.median_shape] if all(plans.median_shape) else [int(p) for p in plans.patch_size]
    configuration = {
        "data_identifier": f"{NNUNET_PLANS}_{NNUNET_CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(plans.batch_size),
        "patch_size": [int(p) for p in plans.patch_size],
        "median_image_size_in_voxels": median,
        "spacing": spacing,
        "normalization_schemes": schemes,
        "use_mask_for_norm": [False] * len(schemes),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        # force_separate_z False: every axis interpolated together, as ReCoKD does (None would resample the
        # low-resolution axis of anisotropic images by nearest neighbour)
        "resampling_fn_data_kwargs": {"is_seg": False, "order": order, "order_z": 0, "force_separate_z": False},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": False},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": False},
        "architecture": architecture,
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_folder,
        "plans_name": NNUNET_PLANS,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": median,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {NNUNET_CONFIGURATION: configuration},
        "experiment_planner_used": "ReCoKD export (ReCoKD plans, mapped)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity,
    }


def nnunet_labels(labels) -> dict[str, int]:
    """``dataset.json`` labels as nnU-Net needs them: one per network output, value 0 named ``background``,
    values without a name as ``label_<v>`` (ReCoKD's names); ReCoKD's ``ignore`` is left out (nnU-Net wants it
    at max + 1, and no prediction carries it)."""
    names = list(labels.names)
    names[0] = "background"
    return {name: value for value, name in enumerate(names)}


def _dataset_json(bundle, num_training: int) -> dict[str, Any]:
    return {
        "channel_names": {str(k): v for k, v in sorted(bundle.channel_names.items())},
        "labels": nnunet_labels(bundle.labels),
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
        "name": bundle.name,
        "description": f"ReCoKD {bundle.role} exported for nnU-Net v2: {bundle.describe()}",
        "licence": str(bundle.provenance.get("license") or "see the model's card"),
        "reference": "ReCoKD (Region- and Context-aware Knowledge Distillation, arXiv 2601.08301)",
        # for the record (nnU-Net ignores extra keys): what ReCoKD's own predictor does beyond nnU-Net's
        "recokd_reference_direction": list(bundle.reference_direction) if bundle.reference_direction else None,
        "recokd_postprocessing": bundle.postprocessing,
    }


def export_nnunet(source: Any, output: str | Path, dataset_id: int = 999, overwrite: bool = False) -> Path:
    """Write ``source`` (a ``.recokd`` bundle, bundle folder or training run folder, or a bundle opened with
    :func:`~ReCoKDLib.deployment.bundle.open_model`) as an nnU-Net v2 results
    folder under ``output``; returns the model folder ``.../Dataset<NNN>_<name>/nnUNetTrainer__nnUNetPlans__3d_fullres``.

    Raises:
        ReCoKDError: one line when the model cannot be expressed in nnU-Net (nothing is written), the model
            is already an nnU-Net folder, or the target exists (``overwrite`` replaces an earlier export only).
    """
    from .bundle import open_model

    bundle = open_model(source) if isinstance(source, (str, Path)) else source
    name = source if isinstance(source, (str, Path)) else (
        getattr(bundle, "source", None) or getattr(getattr(bundle, "model", None), "folder", None) or bundle.name)
    where = f"model {name}"
    if not hasattr(bundle, "spec"):
        raise ReCoKDError(f"{name} is already an nnU-Net results folder; use it as it is")
    network = bundle.build_network()
    try:
        stock, architecture = to_plain_conv_unet(network)
    except ReCoKDError as exc:
        raise ReCoKDError(f"{where}: {exc}") from None
    _check_same_logits(network, stock, bundle.plans.patch_size, where)
    dataset_folder = _dataset_folder_name(dataset_id, bundle.plans.dataset_name or bundle.name)
    target = Path(output) / dataset_folder / NNUNET_MODEL_FOLDER
    if target.exists():
        if not overwrite:
            raise ReCoKDError(f"{target} exists; choose another -o or --dataset-id, or pass --overwrite to replace it")
        if not (target / "plans.json").is_file() or not (target / "fold_0").is_dir():
            raise ReCoKDError(f"{target} exists and is not an nnU-Net model folder; --overwrite replaces only an "
                              "earlier export, so choose another -o")
    plans_json = _plans_json(bundle, architecture, dataset_folder)
    config = dict(bundle.provenance.get("config") or {})
    num_training = int(config.get("num_training_cases") or bundle.provenance.get("num_training_cases") or 0)
    dataset_json = _dataset_json(bundle, num_training)
    mirror = bundle.mirror_axes
    checkpoint = {  # the keys nnUNetPredictor reads, and only types weights_only=True accepts
        "network_weights": stock.state_dict(),  # (aliased keys share storage: saved once)
        "init_args": {"plans": plans_json, "configuration": NNUNET_CONFIGURATION, "fold": 0,
                      "dataset_json": dataset_json},
        "trainer_name": NNUNET_TRAINER,
        # None, not (): nnU-Net skips mirroring only for None (an empty tuple fails its TTA)
        "inference_allowed_mirroring_axes": tuple(int(a) for a in mirror) if mirror else None,
        "current_epoch": int(bundle.provenance.get("epochs") or 0),
        "recokd": {"name": bundle.name, "role": bundle.role, "method": str(bundle.provenance.get("method") or "")},
    }
    fingerprint = {  # not the raw cases' (ReCoKD keeps a summary only): the plan's spacing and median shape
        "note": "written by ReCoKD's export from its plans: spacings and shapes are the plan's, not the raw cases'",
        "spacings": [plans_json["original_median_spacing_after_transp"]],
        "shapes_after_crop": [plans_json["original_median_shape_after_transp"]],
        "foreground_intensity_properties_per_channel": plans_json["foreground_intensity_properties_per_channel"],
        "median_relative_size_after_cropping": 1.0,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".recokd-nnunet-", dir=target.parent))
    try:  # written beside the target, then moved into place: never a half-written model folder
        (staging / "fold_0").mkdir()
        for name, content in (("plans.json", plans_json), ("dataset.json", dataset_json),
                              ("dataset_fingerprint.json", fingerprint)):
            (staging / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        torch.save(checkpoint, staging / "fold_0" / "checkpoint_final.pth")
        torch.load(staging / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)  # safe to load
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_notes(bundle) -> list[str]:
    """What nnU-Net will do differently from ``recokd predict`` with this model, one line each."""
    notes = []
    direction = getattr(bundle, "reference_direction", None)
    if direction is not None and not np.allclose(np.asarray(direction, dtype=float), np.eye(3).ravel(), atol=1e-4):
        notes.append("note: recokd predict reorients inputs to the training direction "
                     f"{[round(v, 3) for v in direction]}; nnU-Net never reorients: give it images in that orientation")
    else:
        notes.append("note: nnU-Net never reorients images: give it images oriented as the training data were")
    if trained_without_spacing(getattr(getattr(bundle, "plans", None), "fingerprint", None) or {}):
        # (1 x 1 x 1 everywhere: 1 mm data, or voxel units; recokd predict refuses other spacings for it, nnU-Net
        # would resample them to 1 mm)
        notes.append("note: every training case had spacing 1 x 1 x 1; if that was voxel units (no physical spacing), "
                     "give nnU-Net images with spacing 1 x 1 x 1 at the training resolution, as recokd predict asks")
    if getattr(bundle, "postprocessing", "none") != "none":
        notes.append(f"note: the model's post-processing ({bundle.postprocessing}) is not applied by nnU-Net's "
                     "predictor; apply it to the predictions yourself (recokd predict applies it)")
    return notes
