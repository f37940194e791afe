"""Finding ReCoKDLib from the scripted module, wherever the module runs from.

A build tree copies ``ReCoKDLib/`` into the module's folder; a source checkout has it beside ``ReCoKD/``
(Extension Wizard → *Select Extension* puts only the module folder on ``sys.path``). :func:`locate`
makes ``import ReCoKDLib`` work in both; :func:`error` says, in one line, why it does not.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["locate", "error", "root"]

_error = ""


def locate(moduleDir: str | Path) -> str:
    """Put the folder holding ``ReCoKDLib`` on ``sys.path`` if needed and import it; returns :func:`error`.

    Never raises: the module must load, and show the reason in its panel.
    """
    global _error
    moduleDir = Path(moduleDir).resolve()
    if importlib.util.find_spec("ReCoKDLib") is None:
        for folder in (moduleDir, moduleDir.parent):
            if (folder / "ReCoKDLib" / "__init__.py").is_file():
                sys.path.insert(0, str(folder))
                break
    try:
        import ReCoKDLib  # noqa: F401 - light: the package imports no torch
        _error = ""
    except Exception as exc:  # noqa: BLE001 - any failure becomes one message in the panel
        _error = (f"ReCoKD cannot load its library ReCoKDLib ({type(exc).__name__}: {exc}); reinstall the extension, "
                  "or in the Extension Wizard select the repository's root folder (the one holding ReCoKD/ and "
                  "ReCoKDLib/)")
    return _error


def error() -> str:
    """Why ReCoKDLib cannot be used ("" when it can)."""
    return _error


def root() -> Path:
    """The folder that holds the ``ReCoKDLib`` package (what background processes get on ``PYTHONPATH``)."""
    spec = importlib.util.find_spec("ReCoKDLib")
    return Path(spec.origin).resolve().parent.parent
