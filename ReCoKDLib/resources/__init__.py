"""Data files shipped with the package (JSON schemas). Read them with :func:`load_schema`."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_schema(name: str) -> dict[str, Any]:
    """The JSON schema ``<name>.schema.json`` shipped in this folder (``"bundle"`` or ``"registry"``)."""
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
