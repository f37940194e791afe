"""Atomic file writes: readers see the old file or the complete new one, never a part."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator


_UMASK = os.umask(0o022)  # read the process umask once (os.umask can only read it by setting it)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then rename it onto ``path``.

    The temporary name ends with ``path``'s own name, so writers that choose the format by extension
    (SimpleITK, safetensors, numpy's ``.npz``) behave as for the final file. The data is flushed to
    disk before the rename, so a crash cannot leave an empty file under the final name. On any failure
    the temporary file is removed. The file gets the usual mode (0666 less the umask, e.g. 0644).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}.partial.{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # one mode for every file ReCoKD writes, whatever the writer (safetensors creates 0600): the umask's
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


#: what :func:`atomic_write` names its temporary files: ``.<8 hex>.partial.<final name>``
PARTIAL_PATTERN = ".????????.partial.*"


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left in ``folder`` (call it only while no
    other process writes there, e.g. holding the folder's lock). Returns what was removed."""
    removed = []
    for path in sorted(Path(folder).glob(PARTIAL_PATTERN)):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def new_folder(folder: str | Path) -> Iterator[Path]:
    """Create ``folder`` (and its parents) for the ``with`` block; when the block raises, remove the
    folders this call created that are still empty, so a failed start leaves nothing behind."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for path in missing:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break  # not empty (or not ours to remove): stop climbing
        raise


def read_json(path: str | Path, what: str, hint: str = "fix or recreate it", kind: type | None = dict) -> Any:
    """The JSON document in ``path``; any failure (missing, unreadable, not JSON, not a ``kind``) is one
    :class:`~ReCoKDLib.errors.ReCoKDError` line naming ``what`` and the file, ending with ``hint``."""
    from ..errors import ReCoKDError

    path = Path(path)
    if not path.is_file():
        raise ReCoKDError(f"{what} {path} does not exist; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReCoKDError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); {hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReCoKDError(f"cannot read {what} {path} ({exc}); {hint}") from None
    if kind is not None and not isinstance(data, kind):
        raise ReCoKDError(f"{what} {path} is not a JSON {'object' if kind is dict else kind.__name__}; {hint}")
    return data


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (JSON has no NaN/inf), tuples as lists and dict
    keys as strings, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class JSONDocument:
    """``to_json`` and an atomic ``save`` for a class that has ``to_dict()`` (plans, fingerprints), and
    :meth:`reading`, which turns what a hand-edited or damaged document breaks into one line."""

    @staticmethod
    @contextmanager
    def reading(source: str, fix: str) -> Iterator[None]:
        """Around ``from_dict``: a missing key or a malformed value becomes one
        :class:`~ReCoKDLib.errors.ReCoKDError` naming ``source`` and ending with ``fix``."""
        from ..errors import ReCoKDError

        try:
            yield
        except ReCoKDError as exc:
            raise ReCoKDError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
        except KeyError as exc:
            raise ReCoKDError(f"{source} lacks the key {exc.args[0]!r}; {fix}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ReCoKDError(f"{source} is malformed ({exc}); {fix}") from None

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> None:
        """Write the document as indented, human-editable JSON (atomically)."""
        atomic_write_text(path, self.to_json() + "\n")
