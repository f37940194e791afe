"""Python packages ReCoKDLib needs inside 3D Slicer: check, and install after the user agrees.

Nothing is installed at import time. :func:`installDependencies` is called by the module on first
use, after a confirmation:

- PyTorch comes from the *PyTorch* extension (``PyTorchUtils.installTorch``) with
  ``torchVersionRequirement=">=MINIMUM_TORCH"``, which picks the wheel matching the machine's CUDA
  driver, or the CPU build when there is no GPU. An installed torch older than the minimum counts as
  missing: the user is told its version in one line and offered the upgrade;
- the other packages are installed with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12), else
  ``slicer.util.pip_install``, under a constraints file that pins the numpy and SimpleITK Slicer
  ships with, and the torch (and torchvision) the PyTorch extension chose, so an install never replaces
  them;
- an nnU-Net v2 results folder as the model or the teacher also needs nnU-Net's network classes
  (:data:`NNUNET_REQUIREMENTS`, asked for only then: they bring timm and its dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from typing import Callable

__all__ = ["REQUIREMENTS", "NNUNET_REQUIREMENTS", "MINIMUM_TORCH", "TORCH_REQUIREMENT", "missingDependencies", "torchProblem",
           "installDependencies", "protectedPins"]

#: oldest torch ReCoKDLib runs on (``torch.OutOfMemoryError``, ``torch.load(weights_only=True)`` defaults)
MINIMUM_TORCH = "2.5"
TORCH_REQUIREMENT = f">={MINIMUM_TORCH}"

#: import name -> pip requirement (torch is handled by the PyTorch extension); Resources/requirements.txt lists the same
REQUIREMENTS = {
    "monai": "monai>=1.4",
    "safetensors": "safetensors>=0.4",
    "jsonschema": "jsonschema>=4.18",
    "scipy": "scipy>=1.9",
    "tqdm": "tqdm>=4.60",
}
#: what an nnU-Net v2 results folder needs besides (the stock network classes its plans name)
NNUNET_REQUIREMENTS = {"dynamic_network_architectures": "dynamic-network-architectures>=0.4"}
PROTECTED = ("numpy", "SimpleITK")
#: installed by the PyTorch extension for this machine's GPU driver: pinned too, never replaced by pip
TORCH_PACKAGES = ("torch", "torchvision")


def _versionTuple(text: str) -> tuple[int, ...]:
    """``"2.4.1+cu121"`` -> ``(2, 4, 1)`` (enough to compare release numbers)."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def installedTorchVersion() -> str | None:
    """The installed torch's version (read from its metadata, without importing it), or None."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torchProblem() -> str | None:
    """One line when torch is missing or older than :data:`MINIMUM_TORCH`, else None."""
    version = installedTorchVersion()
    if version is None and importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    if version is not None and _versionTuple(version) < _versionTuple(MINIMUM_TORCH):
        return (f"PyTorch {version} is installed but ReCoKD needs {MINIMUM_TORCH} or newer; "
                "upgrade it through the PyTorch extension (Segment asks to do it)")
    return None


def _requirements(nnunet: bool) -> dict:
    return {**REQUIREMENTS, **(NNUNET_REQUIREMENTS if nnunet else {})}


def missingDependencies(nnunet: bool = False) -> list[str]:
    """Import names of the packages to install (``torch`` first when missing or too old); with ``nnunet``,
    also what an nnU-Net results folder needs."""
    importlib.invalidate_caches()  # a package pip installed during this session must be seen
    missing = ["torch"] if torchProblem() else []
    return missing + [name for name in _requirements(nnunet) if importlib.util.find_spec(name) is None]


def protectedPins() -> list[str]:
    """``name==version`` of the packages an install must not replace: Slicer's numpy and SimpleITK, and the
    torch build the PyTorch extension installed (a requirement such as timm's torchvision would otherwise
    let pip swap it for a default build)."""
    from importlib import metadata

    pins = []
    for name in PROTECTED + TORCH_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def _installTorch() -> None:
    try:
        import PyTorchUtils  # the PyTorch extension (declared in EXTENSION_DEPENDS)
    except ImportError:
        raise RuntimeError("PyTorch is missing or too old and the PyTorch extension is not installed; install "
                           "'PyTorch' from the Extensions Manager and restart Slicer") from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch could not be installed; see the PyTorch module for details")
    problem = torchProblem()
    if problem:
        raise RuntimeError(problem + "; restart Slicer (an older torch stays loaded until then)")


def _pipInstall(requirements: list[str], constraints: str, log: Callable[[str], None]) -> None:
    log("installing " + " ".join(requirements))
    try:
        from slicer import packaging as slicerPackaging  # Slicer >= 5.12
        pipEnsure = slicerPackaging.pip_ensure
    except (ImportError, AttributeError):
        pipEnsure = None
    if pipEnsure is not None:
        # the module already asked; pip_ensure must not ask again, and must install under ctest too
        pipEnsure(requirements, constraints=constraints, prompt_install=False, requester="ReCoKD",
                  skip_in_testing=False)
        return
    import slicer.util

    slicer.util.pip_install(" ".join(f'"{r}"' for r in requirements) + f' -c "{constraints}"')


def installDependencies(confirm: Callable[[str], bool] | None = None, log: Callable[[str], None] = print,
                        nnunet: bool = False) -> bool:
    """Install what :func:`missingDependencies` lists (``nnunet``: with an nnU-Net folder's needs);
    ``confirm(message)`` is asked first.

    Returns True when everything is importable afterwards. Raises RuntimeError with one line on failure.
    """
    missing = missingDependencies(nnunet)
    if not missing:
        return True
    problem = torchProblem() if "torch" in missing else None
    names = ["PyTorch" if m == "torch" else m for m in missing]
    message = ((problem + ". " if problem else "")
               + "ReCoKD needs these Python packages: " + ", ".join(names)
               + ". Install them now? (This can take a few minutes; Slicer's numpy and SimpleITK are kept.)")
    if confirm is not None and not confirm(message):
        raise RuntimeError("the required Python packages were not installed: " + ", ".join(names))
    if "torch" in missing:
        _installTorch()
        missing.remove("torch")
    requirements = [_requirements(nnunet)[name] for name in missing]
    if requirements:
        fd, constraints = tempfile.mkstemp(prefix="recokd-constraints-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(protectedPins()) + "\n")
        try:
            _pipInstall(requirements, constraints, log)
        finally:
            os.unlink(constraints)
    still = missingDependencies(nnunet)
    if still:
        raise RuntimeError("these packages are still missing after the install: " + ", ".join(still)
                           + "; restart Slicer and try again, or see the Python console for pip's message")
    return True
