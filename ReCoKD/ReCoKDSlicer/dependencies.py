"""Python packages ReCoKDLib needs inside 3D Slicer: check, and install after the user agrees.

Nothing is installed at import time. :func:`installDependencies` is called by the module on first
use, after a confirmation:

- PyTorch comes from the *PyTorch* extension (``PyTorchUtils``), which picks the wheel matching the
  machine's CUDA driver, or the CPU build when there is no GPU (the CPU fallback users ask for);
- the other packages are installed with pip under a constraints file that pins the numpy and
  SimpleITK Slicer ships with, so an install never replaces Slicer's own copies;
- ``slicer.pydeps.pip_ensure`` is used where available (Slicer >= 5.11), else
  ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Callable

__all__ = ["REQUIREMENTS", "missingDependencies", "installDependencies", "protectedPins"]

#: import name -> pip requirement (torch is handled by the PyTorch extension)
REQUIREMENTS = {
    "monai": "monai>=1.4",
    "safetensors": "safetensors>=0.4",
    "jsonschema": "jsonschema>=4.18",
    "scipy": "scipy>=1.9",
    "tqdm": "tqdm>=4.60",
}
PROTECTED = ("numpy", "SimpleITK")


def missingDependencies() -> list[str]:
    """Import names of the packages that are not installed (``torch`` first when missing)."""
    missing = [] if importlib.util.find_spec("torch") else ["torch"]
    return missing + [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


def protectedPins() -> list[str]:
    """``name==version`` of the packages an install must not replace."""
    from importlib import metadata

    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def installDependencies(confirm: Callable[[str], bool] | None = None, log: Callable[[str], None] = print) -> bool:
    """Install what :func:`missingDependencies` lists; ``confirm(message)`` is asked first.

    Returns True when everything is importable afterwards. Raises RuntimeError with one line on failure.
    """
    missing = missingDependencies()
    if not missing:
        return True
    message = ("ReCoKD needs these Python packages, which are not installed yet: " + ", ".join(missing)
               + ". Install them now? (This can take a few minutes; Slicer's numpy and SimpleITK are kept.)")
    if confirm is not None and not confirm(message):
        raise RuntimeError("the required Python packages were not installed: " + ", ".join(missing))
    if "torch" in missing:
        try:
            import PyTorchUtils  # the PyTorch extension (declared in EXTENSION_DEPENDS)
        except ImportError:
            raise RuntimeError("PyTorch is missing and the PyTorch extension is not installed; install 'PyTorch' "
                               "from the Extensions Manager and restart Slicer") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        if torch is None:
            raise RuntimeError("PyTorch could not be installed; see the PyTorch module for details")
        missing.remove("torch")
    requirements = [REQUIREMENTS[name] for name in missing]
    if requirements:
        fd, constraints = tempfile.mkstemp(prefix="recokd-constraints-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(protectedPins()) + "\n")
        try:
            log("installing " + " ".join(requirements))
            try:
                import slicer.pydeps  # Slicer >= 5.11
                from packaging.requirements import Requirement

                slicer.pydeps.pip_ensure([Requirement(r) for r in requirements], constraints=constraints,
                                         requester="ReCoKD")
            except (ImportError, AttributeError):
                import slicer.util

                slicer.util.pip_install(" ".join(f'"{r}"' for r in requirements) + f' -c "{constraints}"')
        finally:
            os.unlink(constraints)
    still = missingDependencies()
    if still:
        raise RuntimeError("these packages are still missing after the install: " + ", ".join(still)
                           + "; restart Slicer and try again, or see the Python console for pip's message")
    return True
