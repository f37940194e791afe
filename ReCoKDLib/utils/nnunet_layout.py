"""How an nnU-Net v2 results folder is laid out (torch-free, for the Slicer module's checks too)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ReCoKDError

__all__ = ["MODEL_DIR", "NNUNetLayout", "fold_key", "is_nnunet_folder", "locate_nnunet_model"]

#: a model folder's name: ``<trainer>__<plans>__<configuration>``
MODEL_DIR = re.compile(r"^(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<configuration>[^_].*)$")


def is_nnunet_folder(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 model folder (``plans.json`` and ``dataset.json``), or a results
    folder holding ``<trainer>__<plans>__<configuration>`` model folders."""
    path = Path(path)
    if (path / "plans.json").is_file() and (path / "dataset.json").is_file():
        return True
    return path.is_dir() and any(MODEL_DIR.match(d.name) and (d / "plans.json").is_file()
                                 for d in path.iterdir() if d.is_dir())


@dataclass
class NNUNetLayout:
    """What an nnU-Net model folder holds, read without torch: its folder, JSON files and chosen folds."""

    folder: Path
    dataset_json: dict
    plans_json: dict
    folds: list[str]  # the folds chosen (numbers as strings, or "all")
    available: list[str]  # every fold with the checkpoint

    @property
    def configuration(self) -> str | None:
        """From the folder name ``<trainer>__<plans>__<configuration>`` (None when renamed)."""
        match = MODEL_DIR.match(self.folder.name)
        return match.group("configuration") if match else None


def fold_key(fold: str | int) -> str:
    return "all" if str(fold).strip() == "all" else str(int(str(fold).strip()))


def locate_nnunet_model(path: str | Path, folds: Sequence[str | int] | str | int | None = None,
                        checkpoint_file: str = "checkpoint_final.pth", fold_hint: str = "choose folds that have one",
                        missing_hint: str = "train a fold with nnU-Net first") -> NNUNetLayout:
    """Find and check an nnU-Net v2 model folder, torch-free (the Slicer module's model list uses it too).

    Args:
        path: a model folder (``<trainer>__<plans>__<configuration>``, holding plans.json, dataset.json and
            ``fold_*``) or a dataset's results folder that holds exactly one such folder.
        folds: fold numbers (or ``"all"`` for nnU-Net's fold_all; a string may list them, ``"0,1"``); ``None``:
            every numbered fold with a checkpoint (fold_all if there is no other), as nnU-Net's predictor chooses.
        checkpoint_file: the checkpoint each chosen fold must hold.

    Raises:
        ReCoKDError: one line naming the folder and the fix (not an nnU-Net results folder, several models
            to choose from, a missing fold or checkpoint, unreadable JSON) -- the most common failures of
            copied results folders.
    """
    from .io import read_json

    path = Path(path)
    if not path.is_dir():
        raise ReCoKDError(f"{path} is not a folder; pass an nnU-Net v2 results folder "
                          "(…/nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>)")
    if not ((path / "plans.json").is_file() and (path / "dataset.json").is_file()):
        models = sorted(d for d in path.iterdir() if d.is_dir() and MODEL_DIR.match(d.name) and (d / "plans.json").is_file())
        if not models:
            raise ReCoKDError(f"{path} is not an nnU-Net v2 results folder (no plans.json and dataset.json, and no "
                              "<trainer>__<plans>__<configuration> folder in it); pass the model folder nnU-Net trained")
        if len(models) > 1:
            raise ReCoKDError(f"{path} holds {len(models)} nnU-Net models ({', '.join(m.name for m in models)}); "
                              f"pass one of them, e.g. {models[0]}")
        path = models[0]
    dataset_json = read_json(path / "dataset.json", "nnU-Net dataset.json", hint="copy the results folder again")
    plans_json = read_json(path / "plans.json", "nnU-Net plans.json", hint="copy the results folder again")
    available = sorted((d.name[len("fold_"):] for d in path.glob("fold_*") if (d / checkpoint_file).is_file()),
                       key=lambda f: (f == "all", int(f) if f.isdigit() else 0))
    if folds is None or folds == "auto" or folds == "":  # as nnU-Net's predictor: the numbered folds (fold_all only alone)
        chosen = [f for f in available if f != "all"] or available
    else:
        items: Any = folds.split(",") if isinstance(folds, str) else ([folds] if isinstance(folds, int) else folds)
        try:
            chosen = [fold_key(f) for f in items]
        except ValueError:
            raise ReCoKDError(f"folds must be numbers or 'all' (e.g. 0,1,2), got {folds!r}") from None
    if not chosen:
        raise ReCoKDError(f"{path} has no fold_*/{checkpoint_file}; {missing_hint}")
    missing = [f for f in chosen if f not in available]
    if missing:
        raise ReCoKDError(f"{path} has no fold_{missing[0]}/{checkpoint_file} (folds with one: "
                          f"{', '.join(available) or 'none'}); {fold_hint}")
    return NNUNetLayout(path, dataset_json, plans_json, chosen, available)
