"""An nnU-Net v2 results folder as a teacher (``recokd distill … --teacher <nnU-Net results folder>``).

An nnU-Net v2 model is a folder ``<trainer>__<plans>__<configuration>/`` holding ``dataset.json``,
``plans.json`` and ``fold_<k>/checkpoint_final.pth`` (or ``checkpoint_best.pth``). This module

- finds that folder (:func:`open_nnunet_model`; a dataset's results folder with one model in it will do);
- builds the exact network with nnU-Net's own architecture package, ``dynamic_network_architectures``
  (``pip install recokd[nnunet]``), from the plans' ``architecture`` entry — only the U-Nets it knows
  (:data:`SUPPORTED_ARCHITECTURES`), and only ``torch.nn`` classes for the arguments the plans name by
  import path, so a plans file cannot make ReCoKD import arbitrary code;
- loads the weights with ``torch.load(weights_only=True)``: the numpy scalars nnU-Net keeps in its
  training log are allowed, anything else the safe loader refuses is named in a one-line error (never a
  silent full unpickle);
- translates the topology into a :class:`~ReCoKDLib.models.unet.UNetSpec` for the student (the
  preprocessing becomes ReCoKD plans in :mod:`ReCoKDLib.data.nnunet_plans`);
- wraps one or several folds as :class:`NNUNetTeacher` (several folds: the mean of their softmax).

Supported: 3D configurations (with nnU-Net's axis transpose, which the teacher applies inside: everything
else works in the image array's axes), label-based (not region-based) training, and the normalisations
ReCoKD implements (Z-score and CT). Anything else is refused by name before anything is written.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ReCoKDError
from ..utils.labels import LabelSet
from ..utils.nnunet_layout import MODEL_DIR as _MODEL_DIR, is_nnunet_folder, locate_nnunet_model
from .unet import UNetSpec

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "NNUNetModel",
    "NNUNetTeacher",
    "is_nnunet_folder",
    "open_nnunet_model",
    "load_nnunet_checkpoint",
]

#: plans ``network_class_name`` -> (module, class) of ``dynamic_network_architectures``
SUPPORTED_ARCHITECTURES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet":
        ("dynamic_network_architectures.architectures.unet", "PlainConvUNet"),
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet":
        ("dynamic_network_architectures.architectures.unet", "ResidualEncoderUNet"),
}

# the only objects a plans file may name in ``_kw_requires_import`` (nnU-Net writes these)
_IMPORTABLE: dict[str, type] = {}
for _cls in (nn.Conv3d, nn.InstanceNorm3d, nn.BatchNorm3d, nn.GroupNorm, nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.GELU,
             nn.Dropout3d, nn.Dropout):
    _IMPORTABLE[f"{_cls.__module__}.{_cls.__name__}"] = _cls
    _IMPORTABLE[f"torch.nn.{_cls.__name__}"] = _cls

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


def _numpy_safe_globals() -> list[Any]:
    """The numpy objects nnU-Net's checkpoints hold (training-log scalars) that are safe to rebuild."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                          np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType")
                    if hasattr(dtypes, n)]
    return allowed


def load_nnunet_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an nnU-Net v2 checkpoint with ``torch.load(weights_only=True)`` (plus numpy scalars).

    Raises:
        ReCoKDError: missing, corrupt, or holding objects the safe loader refuses (named), or without
            ``network_weights``.
    """
    path = Path(path)
    if not path.is_file():
        raise ReCoKDError(f"{path} does not exist; train that fold with nnU-Net or choose another with --teacher-folds")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - only for the message
            names = []
        allowed = {f"{o.__module__}.{o.__qualname__}" if not isinstance(o, tuple) else o[1] for o in _numpy_safe_globals()}
        refused = [n for n in names if n not in allowed] or names
        raise ReCoKDError(
            f"{path} holds objects that the safe loader (torch.load weights_only=True) refuses: "
            f"{', '.join(refused) or 'unknown'}; ReCoKD never unpickles arbitrary objects — re-save the checkpoint "
            "with plain tensors, e.g. torch.save({'network_weights': ckpt['network_weights'], 'init_args': ...}, path) "
            "in a trusted session") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReCoKDError(f"cannot read nnU-Net checkpoint {path} ({first}); the file is truncated or not a "
                          "PyTorch checkpoint — copy it again from the training machine") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ReCoKDError(f"{path} is not an nnU-Net v2 checkpoint (no 'network_weights'); pass a fold's "
                          "checkpoint_final.pth or checkpoint_best.pth")
    return checkpoint


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a compiled or DDP-wrapped network carry ``_orig_mod.`` / ``module.`` prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


@dataclass
class NNUNetModel:
    """One nnU-Net v2 model folder (``<trainer>__<plans>__<configuration>``), read and checked.

    Attributes:
        folder: the model folder.
        configuration: the plans configuration the model was trained with (e.g. ``3d_fullres``).
        dataset_json, plans_json: the folder's ``dataset.json`` and ``plans.json``.
        checkpoints: fold -> checkpoint file, for the folds in use.
    """

    folder: Path
    configuration: str
    dataset_json: dict[str, Any]
    plans_json: dict[str, Any]
    checkpoints: dict[str, Path]

    # -- plans --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The configuration's entry of ``plans.json``, with ``inherits_from`` resolved."""
        configs = self.plans_json.get("configurations") or {}
        seen: list[str] = []
        name, merged = self.configuration, {}
        while name is not None:
            if name in seen or name not in configs:
                raise ReCoKDError(f"{self.folder / 'plans.json'} has no usable configuration {name!r} "
                                  f"(it has {', '.join(configs) or 'none'}); pass the model folder of a trained configuration")
            seen.append(name)
            entry = configs[name]
            merged = {**entry, **merged}
            name = entry.get("inherits_from")
        return merged

    @property
    def labels(self) -> LabelSet:
        raw = self.dataset_json.get("labels") or {}
        regions = [k for k, v in raw.items() if isinstance(v, (list, tuple))]
        if regions:
            raise ReCoKDError(f"{self.folder / 'dataset.json'}: region-based labels ({', '.join(regions)}) are not "
                              "supported; distil a model trained on plain labels")
        return LabelSet(raw, source=str(self.folder / "dataset.json"))

    @property
    def channel_names(self) -> dict[int, str]:
        raw = self.dataset_json.get("channel_names") or self.dataset_json.get("modality") or {}
        return {int(k): str(v) for k, v in raw.items()}

    @property
    def transpose(self) -> tuple[int, int, int]:
        """``transpose_forward``: nnU-Net's network axis ``i`` is the image array's axis ``transpose[i]``."""
        fwd = [int(a) for a in self.plans_json.get("transpose_forward", [0, 1, 2])]
        back = [int(a) for a in self.plans_json.get("transpose_backward", [0, 1, 2])]
        if sorted(fwd) != [0, 1, 2] or sorted(back) != [0, 1, 2] or [fwd[b] for b in back] != [0, 1, 2]:
            raise ReCoKDError(f"{self.folder / 'plans.json'}: transpose_forward {fwd} / transpose_backward {back} are "
                              "not a permutation and its inverse; the plans file is damaged")
        return tuple(fwd)  # type: ignore[return-value]

    def to_image_axes(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """Per-axis values of the plans (network axes) in the image array's axis order."""
        fwd = self.transpose
        return tuple(values[fwd.index(j)] for j in range(3))

    # -- networks -----------------------------------------------------------------------------
    def _architecture(self) -> tuple[type, dict[str, Any]]:
        conf = self.config()
        where = f"{self.folder / 'plans.json'} ({self.configuration})"
        arch = conf.get("architecture")
        if not isinstance(arch, dict):
            raise ReCoKDError(f"{where} has no 'architecture' entry (plans of nnU-Net before v2.4); re-plan the dataset "
                              "with a current nnU-Net v2 or use a newer results folder")
        name = str(arch.get("network_class_name"))
        if name not in SUPPORTED_ARCHITECTURES:
            short = ", ".join(k.rsplit(".", 1)[1] for k in SUPPORTED_ARCHITECTURES)
            raise ReCoKDError(f"{where}: architecture {name} is not supported (supported: {short})")
        kwargs = dict(arch.get("arch_kwargs") or {})
        for key in arch.get("_kw_requires_import") or []:
            value = kwargs.get(key)
            if value is None:
                continue
            if value not in _IMPORTABLE:
                raise ReCoKDError(f"{where}: arch_kwargs[{key!r}] = {value!r} is not one of the torch.nn classes "
                                  "ReCoKD builds nnU-Net networks with")
            kwargs[key] = _IMPORTABLE[value]
        if kwargs.get("conv_op") is not nn.Conv3d:
            raise ReCoKDError(f"{where}: configuration {self.configuration!r} is not 3D (conv_op "
                              f"{arch.get('arch_kwargs', {}).get('conv_op')}); use a 3d_fullres or 3d_lowres model")
        module, cls_name = SUPPORTED_ARCHITECTURES[name]
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except ImportError:
            raise ReCoKDError("nnU-Net teachers need nnU-Net's architecture package: pip install "
                              "'recokd[nnunet]' (after the pinned torch)") from None
        return cls, kwargs

    def build_network(self, deep_supervision: bool = False) -> nn.Module:
        """The configuration's network with fresh weights (eval mode)."""
        cls, kwargs = self._architecture()
        try:
            net = cls(input_channels=len(self.channel_names), num_classes=self.labels.num_classes,
                      deep_supervision=deep_supervision, **kwargs)
        except TypeError as exc:
            raise ReCoKDError(f"{self.folder / 'plans.json'}: arch_kwargs do not fit {cls.__name__} ({exc}); "
                              "is dynamic_network_architectures older than the nnU-Net that wrote the plans?") from None
        return net.eval()

    def load_fold(self, fold: str) -> nn.Module:
        """The network of one fold with its trained weights (strict)."""
        path = self.checkpoints[fold]
        checkpoint = load_nnunet_checkpoint(path)
        trained = (checkpoint.get("init_args") or {}).get("configuration")
        if trained is not None and trained != self.configuration:
            raise ReCoKDError(f"{path} was trained with configuration {trained!r}, not {self.configuration!r}; "
                              "the checkpoint is in the wrong model folder")
        net = self.build_network()
        try:
            net.load_state_dict(_strip_prefixes(checkpoint["network_weights"]), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ReCoKDError(f"{path} does not fit the network its plans.json describes ({first}); "
                              "the checkpoint and plans come from different models") from None
        return net.eval()

    def unet_spec(self) -> UNetSpec:
        """A ReCoKD :class:`UNetSpec` with the teacher's levels, kernels, strides and widths (the student's
        template: ``unet_spec().student(R)``)."""
        _, kwargs = self._architecture()
        n = int(kwargs["n_stages"])
        features = kwargs["features_per_stage"]
        features = [features] * n if isinstance(features, int) else list(features)

        def triples(values):  # per level, in the image's axis order (a plain number: every level, every axis)
            values = values if isinstance(values, (list, tuple)) else [values] * n
            return tuple(self.to_image_axes(v if isinstance(v, (list, tuple)) else (v, v, v)) for v in values)

        return UNetSpec(in_channels=len(self.channel_names), out_channels=self.labels.num_classes,
                        kernel_sizes=triples(kwargs["kernel_sizes"]), strides=triples(kwargs["strides"]),
                        filters=tuple(features), name=f"nnunet-{self.configuration}",
                        decoder_kernels="own")  # PlainConvUNet's decoder: a student is a narrower copy of it

    def teacher(self) -> "NNUNetTeacher":
        """The folds in use, loaded, as one frozen teacher."""
        return NNUNetTeacher([self.load_fold(f) for f in self.checkpoints], self.to_image_axes(self.config()["patch_size"]),
                             len(self.channel_names), self.transpose)

    def describe(self) -> str:
        return (f"nnU-Net v2 model {self.folder.name} (folds {', '.join(self.checkpoints)}; "
                f"{len(self.labels) - 1} class(es): {', '.join(self.labels.foreground_names)})")


class NNUNetTeacher(nn.Module):
    """One or several nnU-Net fold networks as one teacher.

    Shapes: input (B, C, D, H, W) in the image array's axes, D/H/W multiples of the network's total
    stride; output logits (B, K, D, H, W). With several folds the output is ``log(mean_f softmax(z_f))`` —
    the log of the ensemble's mean probability, so softmax of it is what nnU-Net's ensemble predicts.
    Feature taps (:meth:`tap_names`) come from the first fold: features of separately trained networks
    are not aligned channel by channel, so they are not averaged. A model whose plans transpose the axes
    (``transpose``, nnU-Net's ``transpose_forward``) gets its input transposed as nnU-Net does, and hands
    its logits and (through :attr:`feature_transform`, which :class:`~ReCoKDLib.models.taps.FeatureTaps`
    applies) its tapped features back in the image's axes.
    """

    def __init__(self, members: Sequence[nn.Module], patch_size: Sequence[int], in_channels: int,
                 transpose: Sequence[int] = (0, 1, 2)):
        super().__init__()
        if not members:
            raise ReCoKDError("an nnU-Net teacher needs at least one fold")
        self.members = nn.ModuleList(members)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.in_channels = int(in_channels)
        self.transpose = tuple(int(a) for a in transpose)
        self._forward_dims = (0, 1, *(2 + a for a in self.transpose))
        self._backward_dims = (0, 1, *(2 + self.transpose.index(j) for j in range(3)))
        self.feature_transform = None if self.transpose == (0, 1, 2) else self._to_image_axes
        for m in self.members:
            decoder = getattr(m, "decoder", None)
            if decoder is not None and hasattr(decoder, "deep_supervision"):
                decoder.deep_supervision = False

    @property
    def num_stages(self) -> int:
        return len(self.members[0].encoder.stages)

    def tap_names(self, where: str = "encoder") -> list[str]:
        """Module names of the first fold's level outputs, highest resolution first: ``encoder`` every
        encoder stage but the bottleneck; ``decoder`` every decoder stage (same resolutions)."""
        n = self.num_stages
        if where == "encoder":
            return [f"members.0.encoder.stages.{i}" for i in range(n - 1)]
        if where == "decoder":
            return [f"members.0.decoder.stages.{i}" for i in reversed(range(n - 1))]
        raise ReCoKDError(f"unknown tap set {where!r}; choose 'encoder' or 'decoder'")

    def probe_shape(self) -> tuple[int, ...]:
        return (1, self.in_channels, *self.patch_size)

    def _to_image_axes(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(self._backward_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_transform is not None:
            x = x.permute(self._forward_dims)
        if len(self.members) == 1:
            out = self.members[0](x)
        else:
            probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
            out = torch.log(probs.clamp_min(1e-12))
        return out if self.feature_transform is None else self._to_image_axes(out)


def open_nnunet_model(path: str | Path, folds: Sequence[str | int] | str | None = None,
                      checkpoint: str = "final") -> NNUNetModel:
    """Find and check an nnU-Net v2 model folder.

    Args:
        path: a model folder (``<trainer>__<plans>__<configuration>``, holding plans.json, dataset.json and
            ``fold_*``) or a dataset's results folder that holds exactly one such folder.
        folds: fold numbers (or ``"all"`` for nnU-Net's fold_all); ``None``: every numbered fold with a
            checkpoint (fold_all if there is no other), as nnU-Net's predictor chooses.
        checkpoint: ``"final"`` (checkpoint_final.pth) or ``"best"`` (checkpoint_best.pth).

    Raises:
        ReCoKDError: one line naming the folder and the fix (not an nnU-Net results folder, several models
            to choose from, a missing fold or checkpoint, unreadable JSON).
    """
    if checkpoint not in CHECKPOINTS:
        raise ReCoKDError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    name = CHECKPOINTS[checkpoint]
    layout = locate_nnunet_model(path, folds, name, fold_hint="choose those with --teacher-folds",
                                 missing_hint="train a fold with nnU-Net first"
                                 + (" or use --teacher-checkpoint best" if checkpoint == "final" else ""))
    path, dataset_json, plans_json, chosen = layout.folder, layout.dataset_json, layout.plans_json, layout.folds
    match = _MODEL_DIR.match(path.name)
    configuration = match.group("configuration") if match else None
    if configuration is None:  # a renamed folder: the first checkpoint says which configuration it trained
        configuration = (load_nnunet_checkpoint(path / f"fold_{chosen[0]}" / name).get("init_args") or {}).get("configuration")
        if not configuration:
            raise ReCoKDError(f"{path}: cannot tell the configuration (folder not named <trainer>__<plans>__<configuration> "
                              "and no init_args in its checkpoint); restore nnU-Net's folder name")
    model = NNUNetModel(path, str(configuration), dataset_json, plans_json,
                        {f: path / f"fold_{f}" / name for f in chosen})
    model.config()  # the configuration exists
    return model
