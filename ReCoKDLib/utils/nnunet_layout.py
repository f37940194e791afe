"""How an nnU-Net v2 results folder is laid out (torch-free, for the Slicer module's checks too)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["MODEL_DIR", "is_nnunet_folder"]

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
