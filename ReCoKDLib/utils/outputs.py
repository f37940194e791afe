"""The one overwrite rule, for every command, the Slicer logic and the Python API.

1. A command never writes over one of its own inputs (compared as resolved paths, hard links included).
2. It never writes over an existing file unless asked (``--overwrite``, ``overwrite=True``).
3. Even when asked, it replaces only a file of the kind it writes itself (a label map for ``predict``,
   an evaluation CSV for ``evaluate --csv``, an earlier bundle for ``export``), never a folder where a
   file goes, nor a folder that holds something else.

Every check runs before any work, and a refusal is one :class:`~ReCoKDLib.errors.ReCoKDError` line
naming the path and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ReCoKDError

OVERWRITE_HELP = "replace existing outputs of the kind this command writes (never its inputs; default: refuse)"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _refuse_file_as_folder(path: Path, option: str) -> None:
    """Refuse ``path`` when one of its parent folders is in fact a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReCoKDError(f"cannot write {path}: {parent} is a file, not a folder; choose another {option}")
            return


def refuse_inputs(path: str | Path, inputs: Iterable[str | Path], option: str = "-o") -> None:
    """Refuse ``path`` when it is (or, for a folder, holds) one of ``inputs``."""
    path = Path(path)
    for source in inputs:
        source = Path(source)
        if _same_file(path, source):
            raise ReCoKDError(f"{option} {path} is the input {source} of this command; writing it would replace "
                              f"that input, choose another {option}")


def check_output_file(path: str | Path, *, overwrite: bool, kind: str, is_kind: Callable[[Path], bool] | None = None,
                      inputs: Iterable[str | Path] = (), option: str = "-o") -> Path:
    """Check that ``path`` may be written under the overwrite rule.

    Args:
        path: the file about to be written.
        overwrite: whether the user asked to replace an existing file.
        kind: what the command writes, for the messages ("label map", "evaluation CSV").
        is_kind: whether an existing file is of that kind (default: any file is).
        inputs: the command's input files; never written over, ``overwrite`` or not.
        option: the option that named ``path``, for the messages.
    """
    path = Path(path)
    _refuse_file_as_folder(path, option)
    refuse_inputs(path, inputs, option)
    if path.is_dir():
        raise ReCoKDError(f"{option} {path} is a folder; give the path of {_a(kind)} file")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ReCoKDError(f"{path} exists; pass --overwrite to replace it, or choose another {option}")
        if not path.is_file() or (is_kind is not None and not is_kind(path)):
            raise ReCoKDError(f"{path} exists and is not {_a(kind)}; --overwrite replaces only {kind}s, "
                              f"choose another {option}")
    return path


def check_output_files(paths: Iterable[str | Path], *, overwrite: bool, kind: str,
                       is_kind: Callable[[Path], bool] | None = None, inputs: Iterable[str | Path] = (),
                       option: str = "-o") -> None:
    """:func:`check_output_file` for many outputs at once: without ``overwrite``, one line says how many
    exist already (rather than failing at the first)."""
    paths = [Path(p) for p in paths]
    inputs = list(inputs)
    existing = [p for p in paths if p.exists() and not p.is_dir()]
    if existing and not overwrite and len(paths) > 1:
        first = existing[0]
        raise ReCoKDError(f"{len(existing)} of {len(paths)} output(s) exist already in {first.parent} (e.g. "
                          f"{first.name}); pass --overwrite to replace them, or choose another {option}")
    for p in paths:
        check_output_file(p, overwrite=overwrite, kind=kind, is_kind=is_kind, inputs=inputs, option=option)


def check_output_folder(folder: str | Path, *, overwrite: bool, kind: str, is_own: Callable[[Path], bool],
                        option: str = "-o") -> Path:
    """Check that ``folder`` may receive a command's outputs: it is new or empty, or it holds an earlier
    output of the same command (``is_own``) and ``overwrite`` is given. A file, or a folder holding
    anything else (a run, a dataset, ``docs/``), is refused whatever ``overwrite`` says."""
    folder = Path(folder)
    _refuse_file_as_folder(folder, option)
    if folder.exists() and not folder.is_dir():
        raise ReCoKDError(f"{option} {folder} is a file; give a folder for the {kind}")
    if folder.is_dir() and any(folder.iterdir()):
        if not is_own(folder):
            raise ReCoKDError(f"{folder} is a folder holding other files, not an earlier {kind}; "
                              f"choose a new or empty {option}")
        if not overwrite:
            raise ReCoKDError(f"{folder} holds an earlier {kind}; pass --overwrite to replace it, or choose another {option}")
    return folder
