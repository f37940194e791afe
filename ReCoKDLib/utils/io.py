"""Atomic, verified file writes: readers see the old file or the complete new one, never a part.

Every file ReCoKD writes goes through :func:`atomic_write`: the data goes to a temporary sibling,
is checked (not empty, the expected size where known, a read-back where the caller or the file's
kind gives one), flushed to disk, and only then renamed over the final name. A full disk, a quota,
a read-only folder or a writer that fails silently (ITK's NIfTI writer ignores short writes) ends
in one :class:`~ReCoKDLib.errors.ReCoKDError` line; the previous file stays as it was and no
temporary file is left behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import time
import uuid
import zipfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator


_UMASK = os.umask(0o022)  # read the process umask once (os.umask can only read it by setting it)
os.umask(_UMASK)

#: errno values that mean "this disk or folder cannot take the file"; the fix is elsewhere than the data
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: a temporary file of :func:`atomic_write`: ``.<8 hex>[-p<pid>].partial.<final name>``
_PARTIAL_NAME = re.compile(r"^\.[0-9a-f]{8}(?:-p(?P<pid>\d+))?\.partial\.(?P<final>.+)$")
#: a partial file whose writer is gone is removed once it is this old (seconds): a writer on another
#: host of a shared folder is not visible as a pid here, but it keeps its file's mtime fresh
STALE_AFTER_S = 600.0


class WriteVerificationError(Exception):
    """Raised by a verifier: the written temporary file is not what was meant (one line, no path)."""


Verifier = Callable[[Path], None]


def _free_space_note(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" ({free / 2**20:.1f} MiB free there)"


def write_error(path: Path, reason: str, exc: BaseException | None = None) -> Exception:
    """The one-line error for a write of ``path`` that did not happen: the reason, whether the disk is
    full, that an earlier file is kept, and the fix."""
    from ..errors import ReCoKDError

    code = getattr(exc, "errno", None)
    full = code in _NO_ROOM
    if not full:
        try:
            full = shutil.disk_usage(path.parent).free < 1 << 20
        except OSError:
            pass
    kept = "the earlier file there is kept" if path.exists() else "nothing was written"
    if full:
        fix = "; free space on that disk or choose another output"
    elif isinstance(exc, OSError):
        fix = "; check that the folder is writable, or choose another output"
    elif exc is None:  # the file read back wrong with room to spare: a failing disk or file system
        fix = "; check that disk, or choose another output"
    else:  # the writer itself failed (e.g. an exporter), not the disk: its reason is the whole story
        fix = ""
    return ReCoKDError(f"cannot write {path}: {reason}{_free_space_note(path.parent) if full else ''}; {kept}{fix}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    text = " ".join(str(exc).split())
    if "ERROR:" in text:  # ITK: the source location first, the reason after its last marker
        text = text.rsplit("ERROR:", 1)[1].strip()
    return (text[:157] + "...") if len(text) > 160 else (text or type(exc).__name__)


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{uuid.uuid4().hex[:8]}-p{os.getpid()}.partial.{path.name}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        return True
    return True


def is_stale_partial(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` whose writer is gone: its pid is not
    alive here and it has not changed for a minute, or it has not changed for :data:`STALE_AFTER_S`."""
    match = _PARTIAL_NAME.match(path.name)
    if not match:
        return False
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    pid = match["pid"]
    if pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid)) and age > 60:
        return True
    return age > STALE_AFTER_S


def remove_stale_partials(folder: str | Path, final_name: str | None = None) -> list[Path]:
    """Remove temporary files that killed writers left in ``folder`` (only those of ``final_name``
    when given). Safe while other processes write there: a live writer's file is never stale."""
    removed = []
    try:
        candidates = sorted(Path(folder).iterdir())
    except OSError:
        return removed
    for path in candidates:
        match = _PARTIAL_NAME.match(path.name)
        # case-blind: an image named SEG.NII.GZ is written under a lower-case temporary name
        if match and (final_name is None or match["final"].lower() == final_name.lower()) and is_stale_partial(path):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], object], verify: Verifier | None = None,
                 expected_size: int | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, check it, then rename it onto ``path``.

    The temporary name ends with ``path``'s own name, so writers that choose the format by extension
    (SimpleITK, safetensors, numpy's ``.npy``) behave as for the final file. Before the rename the file
    must exist and not be empty, have ``expected_size`` bytes when given, pass ``verify(tmp)`` (which
    raises :class:`WriteVerificationError` or a ReCoKDError), and pass the cheap check of its kind
    (:func:`check_written_file`: a JSON document parses, a zip's directory and members fit, a
    safetensors header matches the size, a PNG ends); then it is flushed to disk, so that a crash
    cannot leave an empty file under the final name. Temporary files of this name that a killed
    writer left here are removed first. On any failure the temporary file is removed, the previous
    ``path`` is untouched, and an OS or writer error is one ReCoKDError line (full disk included).
    The file gets the usual mode (0666 less the umask, e.g. 0644).
    """
    from ..errors import ReCoKDError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, _describe(exc), exc) from None
    remove_stale_partials(path.parent, path.name)
    tmp = _partial_name(path)
    try:
        write(tmp)
        size = tmp.stat().st_size
        if expected_size is not None and size != expected_size:
            raise WriteVerificationError(f"the written file holds {size} of {expected_size} bytes")
        if size == 0 and expected_size != 0:
            raise WriteVerificationError("the written file is empty")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_written_file(tmp, path.name)
        if verify is not None:
            verify(tmp)
        # one mode for every file ReCoKD writes, whatever the writer (safetensors creates 0600): the umask's
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except ReCoKDError:
        raise
    except WriteVerificationError as exc:
        raise write_error(path, str(exc)) from None
    except (OSError, RuntimeError, zipfile.BadZipFile, struct.error) as exc:  # RuntimeError: C++ writers (ITK, torch)
        raise write_error(path, _describe(exc), exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_written_file(path: Path, final_name: str) -> None:
    """The cheap check of a just-written file by the kind its final name says; raises
    :class:`WriteVerificationError`. Kinds without a cheap check (text, images: their writers pass a
    verifier or an expected size) pass."""
    name = final_name.lower()
    if name.endswith(".json"):
        try:
            json.loads(path.read_bytes())
        except ValueError as exc:
            raise WriteVerificationError(f"the written JSON does not read back ({exc})") from None
    elif name.endswith((".pt", ".pth", ".npz", ".zip", ".recokd")):
        _check_zip(path)
    elif name.endswith(".safetensors"):
        _check_safetensors(path)
    elif name.endswith(".npy"):
        _check_npy(path)
    elif name.endswith(".png"):
        with open(path, "rb") as f:
            f.seek(max(path.stat().st_size - 12, 0))
            if f.read(12)[4:8] != b"IEND":
                raise WriteVerificationError("the written PNG is cut short")


def _check_npy(path: Path) -> None:
    """The ``.npy`` header reads and the file holds every byte of the array it declares (truncation shows)."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError) as exc:
        raise WriteVerificationError(f"the written array's header does not read back ({exc})") from None
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.stat().st_size != expected:
        raise WriteVerificationError(f"the written array holds {path.stat().st_size} bytes, its header declares {expected}")


def _check_zip(path: Path) -> None:
    """The zip's central directory reads and every member lies inside the file (truncation shows)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + 30 + len(info.filename) + info.compress_size > size:
                    raise WriteVerificationError(f"member {info.filename} of the written zip is cut short")
    except zipfile.BadZipFile as exc:
        raise WriteVerificationError(f"the written zip is damaged ({exc})") from None


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, the JSON header, then the data the header's last
    offset ends at: the size must be exactly that."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WriteVerificationError("the written safetensors file has no header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WriteVerificationError("the written safetensors header is cut short")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise WriteVerificationError("the written safetensors header does not read back") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise WriteVerificationError(f"the written safetensors file holds {size} bytes, its header needs {8 + n + end}")


def _nifti_complete(path: Path) -> None:
    """A written NIfTI (``.nii`` or ``.nii.gz``) holds all the voxel bytes its header declares. ITK's
    NIfTI writer ignores short writes (a full disk gives a truncated file and no error), and its reader
    zero-fills what is missing, so this counts the bytes itself, streaming the decompression."""
    import gzip
    import zlib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            if len(head) < 348:
                raise WriteVerificationError(f"the written NIfTI holds only {len(head)} header bytes")
            endian = "<" if struct.unpack("<i", head[:4])[0] in (348, 540) else ">"
            if struct.unpack(endian + "i", head[:4])[0] == 348:
                dims = struct.unpack(endian + "8h", head[40:56])
                bitpix = struct.unpack(endian + "h", head[72:74])[0]
                offset = int(struct.unpack(endian + "f", head[108:112])[0])
            else:
                dims = struct.unpack(endian + "8q", head[16:80])
                bitpix = struct.unpack(endian + "h", head[14:16])[0]
                offset = int(struct.unpack(endian + "q", head[168:176])[0])
            needed = offset + math.prod(max(int(d), 1) for d in dims[1:int(dims[0]) + 1]) * bitpix // 8
            total = len(head)
            while total < needed:
                chunk = f.read(min(1 << 22, needed - total))
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise WriteVerificationError(f"the written NIfTI does not read back ({_describe(exc)})") from None
    if total < needed:
        raise WriteVerificationError(f"the written NIfTI holds {total} of the {needed} bytes its header declares")


#: image endings whose writer ITK picks by the (lower-case) name
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".tiff", ".tif")


def atomic_write_image(image: Any, path: str | Path, use_compression: bool = True) -> Path:
    """Write a SimpleITK image to ``path`` atomically and verified: a NIfTI is checked to hold every voxel
    its header declares, any other format is read back and compared voxel for voxel (ITK's writers do
    not all report a full disk). ITK chooses its writer by a lower-case ending, so ``SEG.NII.GZ`` is
    written under a lower-case temporary name first."""
    import SimpleITK as sitk
    import numpy as np

    def write(tmp: Path) -> None:
        ending = next((e for e in _IMAGE_ENDINGS if tmp.name.lower().endswith(e)), "")
        lower = tmp.with_name(tmp.name[: len(tmp.name) - len(ending)] + ending) if ending else tmp
        try:
            sitk.WriteImage(image, str(lower), useCompression=use_compression)
            if ending in (".nii", ".nii.gz"):
                _nifti_complete(lower)
            else:
                try:
                    back = sitk.ReadImage(str(lower))
                except RuntimeError as exc:
                    raise WriteVerificationError(f"the written image does not read back ({_describe(exc)})") from None
                if back.GetSize() != image.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(back),
                                                                           sitk.GetArrayViewFromImage(image)):
                    raise WriteVerificationError("the written image reads back different from what was written")
            if lower != tmp:
                os.replace(lower, tmp)
        finally:
            if lower != tmp:
                lower.unlink(missing_ok=True)

    return atomic_write(path, write)


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Remove every temporary file of :func:`atomic_write` in ``folder``, stale or not (call it only while
    no other process writes there, e.g. holding the folder's lock). Returns what was removed."""
    removed = []
    for path in sorted(Path(folder).glob(".*.partial.*")):
        if path.is_file() and _PARTIAL_NAME.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def new_folder(folder: str | Path) -> Iterator[Path]:
    """Create ``folder`` (and its parents) for the ``with`` block; when the block raises, remove the
    folders this call created that are still empty, so a failed start leaves nothing behind."""
    from ..errors import ReCoKDError

    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ReCoKDError(f"cannot create the folder {folder}: {blocking} is a file; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, _describe(exc), exc) from None
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
    """Write ``text`` (UTF-8) to ``path`` atomically, checking that every byte arrived."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), expected_size=len(data))


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
