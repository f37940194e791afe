"""Reading segmentation datasets in the nnU-Net v2 "raw" layout and the Medical Segmentation Decathlon layout.

Two layouts are recognised from ``dataset.json``:

``nnunet`` (nnU-Net v2 raw)
    ``imagesTr/<case>_<channel:04d><file_ending>``, ``labelsTr/<case><file_ending>``, optional
    ``imagesTs/`` + ``labelsTs/``. ``dataset.json`` has ``channel_names`` ({"0": "FLAIR", ...}),
    ``labels`` (name -> integer value), ``numTraining`` and ``file_ending``. The optional nnU-Net
    ``dataset`` key (explicit per-case file lists) is honoured too.

``msd`` (Medical Segmentation Decathlon)
    ``dataset.json`` has ``modality`` ({"0": "MRI", ...}), ``labels`` (value string -> name),
    ``training`` (a list of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``)
    and ``test`` (a list of image paths). A multi-channel image is ONE 4D file whose 4th dimension
    holds the channels.

Anything SimpleITK reads (NIfTI, NRRD, MHA, ...) works. Arrays use numpy axis order: a SimpleITK
image of size (x, y, z) becomes an array of shape (D, H, W) = (z, y, x); a 4D image of size
(x, y, z, c) becomes (C, D, H, W).

Nothing here checks the data beyond what loading needs; :mod:`ReCoKDLib.data.validation` reports
every problem of a dataset at once.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import ReCoKDError
from ..utils.geometry import ImageGeometry
from ..utils.labels import LabelSet

__all__ = [
    "CaseRecord",
    "DatasetInfo",
    "ImageHeader",
    "LoadedCase",
    "IMAGE_FILE_ENDINGS",
    "open_dataset",
    "load_case",
    "read_image",
    "read_header",
    "split_file_ending",
    "dicom_series_files",
    "read_dicom_series",
    "available_memory_bytes",
    "image_size_limit",
]

#: File endings recognised as images, compound endings first so that ``.nii.gz`` wins over ``.gz``.
IMAGE_FILE_ENDINGS: tuple[str, ...] = (
    ".nii.gz",
    ".nrrd.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".tif",
    ".tiff",
)

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_READ_HINT = "check the file is a valid NIfTI/NRRD/MHA image"


# --------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class CaseRecord:
    """The files of one case, as the dataset layout says they should be (they may not exist).

    Attributes:
        case_id: the case identifier (file name without channel suffix and ending).
        image_files: one file per channel (nnU-Net layout) or one file holding all channels (MSD).
        label_file: the label map, or ``None`` for an unlabelled (test) case.
        layout: ``"nnunet"`` or ``"msd"``.
    """

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None
    layout: str


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` and the folder listing say about a dataset.

    Attributes:
        root: the dataset folder (holds ``dataset.json``).
        name: ``dataset.json``'s ``name``, else the folder name.
        layout: ``"nnunet"`` or ``"msd"``.
        channel_names: channel index -> name (nnU-Net ``channel_names`` / MSD ``modality``).
        labels: label name -> integer value, background (0) included, for both layouts.
        file_ending: image file ending, e.g. ``".nii.gz"``.
        training: the training cases, sorted by case id (nnU-Net) or in ``dataset.json`` order (MSD).
        test: the test cases (``imagesTs``, with ``labelsTs`` labels when that folder exists).
        num_training_declared: ``numTraining`` from ``dataset.json``, when given.
        unexpected_files: image files in the layout's folders that fit no case (wrong name or ending);
            :func:`~ReCoKDLib.data.validation.validate_dataset` reports them.
    """

    root: Path
    name: str
    layout: str
    channel_names: dict[int, str]
    labels: LabelSet
    file_ending: str
    training: tuple[CaseRecord, ...]
    test: tuple[CaseRecord, ...]
    num_training_declared: int | None = None
    unexpected_files: tuple[Path, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of output classes (the label set's)."""
        return self.labels.num_classes

    @property
    def num_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)


@dataclass
class LoadedCase:
    """One case in memory.

    Attributes:
        image: float32 array (C, D, H, W).
        label: uint8 (or int16 when values exceed 255) array (D, H, W), or ``None``.
        geometry: the first image file's :class:`~ReCoKDLib.utils.geometry.ImageGeometry` ((x, y, z),
            LPS); ``geometry.spacing_dhw`` is the voxel size in the arrays' order.
        case_id: the case identifier.
    """

    image: np.ndarray
    label: np.ndarray | None
    geometry: ImageGeometry
    case_id: str


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file, read without its voxels (see :func:`read_header`).

    ``size`` is in SimpleITK order (x, y, z[, c]); ``geometry`` keeps only the first (up to three)
    spatial dimensions.
    """

    path: Path
    dimension: int
    size: tuple[int, ...]
    geometry: ImageGeometry
    components: int
    pixel_type: str

    @property
    def spatial_size(self) -> tuple[int, ...]:
        """Size of the (up to three) spatial dimensions, SimpleITK order (x, y, z)."""
        return self.size[:3]

    @property
    def num_channels(self) -> int:
        """Channels held by the file: the 4th dimension (if any) times the components per voxel."""
        extent = self.size[3] if self.dimension == 4 else 1
        return extent * self.components

    @property
    def is_2d(self) -> bool:
        """True for an image with fewer than three spatial dimensions or a spatial size of 1."""
        return self.dimension < 3 or any(s <= 1 for s in self.spatial_size)


# --------------------------------------------------------------------------------------------------
# reading single files


def _sitk_reason(exc: BaseException) -> str:
    """The informative part of a SimpleITK/ITK exception message, on one line."""
    text = " ".join(str(exc).split())
    for marker in ("sitk::ERROR:", "itk::ERROR:", "ERROR:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1].strip()
            break
    if len(text) > 200:  # cut at a word boundary, never mid-word
        text = text[:197].rsplit(" ", 1)[0] + " ..."
    return text or type(exc).__name__


class _ReadFailure(Exception):
    """Internal: a file could not be read; ``reason`` is one line without the path."""

    def __init__(self, path: Path, reason: str):
        reason = reason.replace(f'"{path}"', "this file").replace(str(path), "this file")
        super().__init__(reason)
        self.path = path
        self.reason = reason

    def to_error(self) -> ReCoKDError:
        return ReCoKDError(f"cannot read {self.path}: {self.reason}; {_READ_HINT}")


def _read_image(path: Path) -> sitk.Image:
    """The image in ``path``, after a header-only check that the file can hold the voxels its header
    declares and that they fit in memory (:func:`_check_declared_size`): a tiny file claiming a huge
    image is refused before ITK allocates it."""
    if not path.is_file():
        raise _ReadFailure(path, "file not found")
    with _itk_name(path) as name:
        reader = _file_reader(path, name)
        try:
            reader.ReadImageInformation()
        except Exception as exc:  # SimpleITK raises RuntimeError; anything else is just as fatal
            raise _ReadFailure(path, _sitk_reason(exc).replace(name, str(path))) from exc
        _check_declared_size(path, reader)
        try:
            return reader.Execute()
        except Exception as exc:
            reason = _sitk_reason(exc).replace(name, str(path))
            if "No such file or directory" in reason:  # ITK reports a stale errno for a file it could not read whole
                reason = f"the file is damaged or truncated ({path.stat().st_size} bytes; ITK could not read all its voxels)"
            raise _ReadFailure(path, reason) from exc


# -- which reader, by a file ending in any case --------------------------------------------------------

#: ITK readers that are chosen by ending; ITK matches endings case-sensitively (it finds no reader for
#: ``.MHA``), so ReCoKD names the reader itself
_IMAGE_IO = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO"}


def _file_reader(path: Path, name: str) -> sitk.ImageFileReader:
    """A reader of ``name`` (``path`` or its alias, see :func:`_itk_name`) with the ImageIO of the ending."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    ending = split_file_ending(path.name)[1]
    io = _IMAGE_IO.get(ending.lower())
    if io is not None and ending != ending.lower():
        reader.SetImageIO(io)
    return reader


@contextmanager
def _itk_name(path: Path) -> Iterator[str]:
    """The name ITK should open ``path`` by: the path itself, or, for a NIfTI whose ending mixes cases
    (``.Nii``, ``.nii.GZ``: niftilib refuses those, ``.NII`` it reads), a link with the lower-case ending
    in a temporary folder (a copy where links cannot be made)."""
    ending = split_file_ending(path.name)[1]
    if ending.lower() not in (".nii", ".nii.gz") or ending in (ending.lower(), ending.upper()):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="recokd-read-") as tmp:
        alias = Path(tmp) / f"image{ending.lower()}"
        try:
            os.symlink(path.resolve(), alias)
        except OSError:  # e.g. Windows without the symlink privilege
            shutil.copyfile(path, alias)
        yield str(alias)


# -- what a header declares, checked before the voxels are read ----------------------------------------

#: deflate (gzip, zlib) turns at most 258 bytes into 2 bits: no compressed file holds more than this
#: many times its own size
_DEFLATE_MAX_RATIO = 1032
#: the limit on an image's declared voxel data, in GiB; default: the memory available now
MAX_IMAGE_ENV = "RECOKD_MAX_IMAGE_GIB"


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get now: Linux's ``MemAvailable``, else the free physical pages,
    else the physical memory; None where none of these is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return int(os.sysconf(pages)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            continue
    return None


def image_size_limit() -> tuple[int | None, str]:
    """The most bytes of voxel data an image file may declare, and what set it: ``$RECOKD_MAX_IMAGE_GIB``
    when set, else the memory available now (None: no limit known)."""
    raw = os.environ.get(MAX_IMAGE_ENV, "").strip()
    if raw:
        try:
            gib = float(raw)
        except ValueError:
            gib = float("nan")
        if not (math.isfinite(gib) and gib > 0):
            raise ReCoKDError(f"{MAX_IMAGE_ENV}={raw!r} is not a positive number of GiB; set it to e.g. 16, or unset it")
        return int(gib * 2**30), f"the {MAX_IMAGE_ENV} limit of {gib:g} GiB"
    available = available_memory_bytes()
    if available is None:
        return None, ""
    return available, f"the {available / 2**30:.3g} GiB of memory available"


def _storage(path: Path) -> tuple[str | None, int]:
    """How ``path`` stores its voxels, from its name and header text: ``("raw", header bytes)`` for
    uncompressed data in the file itself, ``("deflate", 0)`` for gzip/zlib data in the file itself, or
    ``(None, 0)`` when unknown or in another file (.mhd/.nhdr, detached data, bzip2, text)."""
    ending = split_file_ending(path.name)[1].lower()
    if ending == ".nii":
        return "raw", 348  # the smallest NIfTI header
    if ending.endswith(".gz"):
        return "deflate", 0
    if ending not in (".mha", ".nrrd"):
        return None, 0
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    if ending == ".mha":
        fields: dict[str, str] = {}
        end = 0
        for line in head.splitlines(keepends=True):
            end += len(line)
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip().lower()
            if key.strip().lower() == "elementdatafile":  # the header's last line; the data follows
                if value.strip().lower() != "local":
                    return None, 0
                return ("deflate", 0) if fields.get("compresseddata") == "true" else ("raw", end)
        return None, 0
    end = head.find("\n\n")
    if end < 0:
        return None, 0
    fields = {}
    for line in head[:end].splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lstrip("=").strip().lower()
    if "data file" in fields or "datafile" in fields:
        return None, 0
    encoding = fields.get("encoding", "")
    if encoding == "raw":
        return "raw", end + 2
    return ("deflate", 0) if encoding in ("gzip", "gz") else (None, 0)


def _component_bytes(pixel_id: int) -> int:
    """Bytes of one component of a SimpleITK pixel type (8 for a complex of two 32-bit floats)."""
    try:
        return int(sitk.Image([1, 1], pixel_id, 1).GetSizeOfPixelComponent())
    except Exception:  # noqa: BLE001 - a type SimpleITK cannot allocate: read the bits from its name
        match = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(pixel_id))
        return int(match.group(1)) // 8 if match else 8


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _amount(nbytes: int) -> str:
    """``nbytes`` for a reader: bytes below a MiB, else MiB or GiB."""
    if nbytes < 2**20:
        return f"{nbytes} bytes"
    return f"{nbytes / 2**20:.3g} MiB" if nbytes < 2**30 else _gib(nbytes)


def _check_declared_size(path: Path, reader: sitk.ImageFileReader) -> None:
    """Raise :class:`_ReadFailure` when the header (read, ``reader``) declares more voxel data than the file
    can hold (raw data: the file is shorter; deflate: beyond its best ratio), or than the limit of
    :func:`image_size_limit`. Costs the header only."""
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    nbytes = math.prod(size) * components * _component_bytes(reader.GetPixelID())
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    what = f"{' x '.join(map(str, size))} voxels of {pixel}" + (f" ({components} components)" if components > 1 else "")
    on_disk = path.stat().st_size
    try:
        kind, header = _storage(path)
    except OSError:
        kind, header = None, 0
    if kind == "raw" and on_disk < header + nbytes:
        raise _ReadFailure(path, f"the file is damaged or truncated: it holds {_amount(on_disk)}, but its header declares "
                                 f"{what} ({_amount(nbytes)} of voxel data)")
    if kind == "deflate" and nbytes > _DEFLATE_MAX_RATIO * on_disk:
        raise _ReadFailure(path, f"the file is damaged or truncated: its header declares {what} ({_amount(nbytes)}), more "
                                 f"than its {_amount(on_disk)} of compressed data can hold")
    limit, source = image_size_limit()
    if limit is not None and nbytes > limit:
        raise _ReadFailure(path, f"its header declares {what} ({_gib(nbytes)}), more than {source} "
                                 f"(set {MAX_IMAGE_ENV} to allow larger images)")


@dataclass(frozen=True)
class NiftiScan:
    """What a direct read of a single-file NIfTI found (see :func:`scan_nifti`); ``error`` is one
    line without the path or the fix."""

    error: str | None = None
    n_nan: int = 0
    n_inf: int = 0


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype code -> numpy float kind


def scan_nifti(path: Path) -> NiftiScan | None:
    """Read a single-file NIfTI (``.nii``/``.nii.gz``) directly, without ITK.

    ITK silently zero-fills data missing from a truncated file and, through niftilib, replaces
    NaN/Inf floats by 0 when reading; this scan sees the file as written. Returns ``None`` for
    other formats (or a NIfTI header it does not understand).
    """
    name = path.name.lower()
    compressed = name.endswith(".nii.gz")
    if not (compressed or name.endswith(".nii")):
        return None
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            content = fh.read()
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return NiftiScan(error=f"corrupt compressed data ({reason})")
    if len(content) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", content[:4])[0]
        if sizeof_hdr in (348, 540):
            break
    else:
        return None
    if sizeof_hdr == 348:
        if content[344:348] != b"n+1\0":
            return None
        dims = struct.unpack(endian + "8h", content[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", content[70:74])
        vox_offset = int(struct.unpack(endian + "f", content[108:112])[0])
    else:
        if len(content) < 540 or content[4:8] != b"n+2\0":
            return None
        datatype, bitpix = struct.unpack(endian + "2h", content[12:16])
        dims = struct.unpack(endian + "8q", content[16:80])
        vox_offset = int(struct.unpack(endian + "q", content[168:176])[0])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    nvox = math.prod(max(int(d), 1) for d in dims[1 : ndim + 1])
    needed = vox_offset + nvox * bitpix // 8
    if len(content) < needed:
        return NiftiScan(error=f"truncated: holds {len(content)} bytes but its header needs {needed}")
    kind = _NIFTI_FLOAT_TYPES.get(datatype)
    if kind is None:
        return NiftiScan()
    data = np.frombuffer(content, dtype=np.dtype(endian + kind), count=nvox, offset=vox_offset)
    if np.isfinite(data).all():
        return NiftiScan()
    return NiftiScan(n_nan=int(np.isnan(data).sum()), n_inf=int(np.isinf(data).sum()))



def read_image(path: str | Path, verify: bool = False) -> sitk.Image:
    """Read an image with SimpleITK, turning any failure into a one-line :class:`ReCoKDError`.

    The message is ``cannot read <path>: <reason>; check the file is a valid NIfTI/NRRD/MHA image``.
    ``verify`` also reads a NIfTI file directly (:func:`scan_nifti`), because ITK zero-fills a truncated
    file and turns NaN/Inf voxels into 0 without a word: both become errors (prediction uses it).
    """
    path = Path(path)
    try:
        image = _read_image(path)
    except _ReadFailure as failure:
        raise failure.to_error() from failure.__cause__
    scan = scan_nifti(path) if verify else None
    if scan is not None and scan.error is not None:
        raise ReCoKDError(f"cannot read {path}: {scan.error}; {_READ_HINT} (re-export or re-copy it)")
    if scan is not None and (scan.n_nan or scan.n_inf):
        raise ReCoKDError(f"{path} holds {scan.n_nan} NaN and {scan.n_inf} infinite voxel value(s), which ITK would "
                          "read as 0; replace them with finite values before segmenting")
    return image


def _read_header(path: Path) -> ImageHeader:
    if not path.is_file():
        raise _ReadFailure(path, "file not found")
    with _itk_name(path) as name:
        reader = _file_reader(path, name)
        try:
            reader.ReadImageInformation()
        except Exception as exc:
            raise _ReadFailure(path, _sitk_reason(exc).replace(name, str(path))) from exc
    return ImageHeader(
        path=path,
        dimension=reader.GetDimension(),
        size=tuple(int(s) for s in reader.GetSize()),
        geometry=ImageGeometry.of(reader),
        components=int(reader.GetNumberOfComponents()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )


def read_header(path: str | Path) -> ImageHeader:
    """Read an image file's header only (cheap: no voxel data), raising :class:`ReCoKDError` on failure."""
    try:
        return _read_header(Path(path))
    except _ReadFailure as failure:
        raise failure.to_error() from failure.__cause__


def split_file_ending(name: str) -> tuple[str, str]:
    """Split a file name into (stem, ending), knowing compound endings such as ``.nii.gz``."""
    lower = name.lower()
    for ending in IMAGE_FILE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], name[-len(ending):]
    suffix = Path(name).suffix
    return (name[: -len(suffix)], suffix) if suffix else (name, "")


# --------------------------------------------------------------------------------------------------
# dataset.json parsing


def _load_json(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ReCoKDError(
            f"dataset folder {root} does not exist or is not a folder; pass the folder that holds dataset.json"
        )
    path = root / "dataset.json"
    if not path.is_file():
        raise ReCoKDError(
            f"{root} has no dataset.json; a dataset folder needs one in the nnU-Net v2 "
            "(channel_names, labels, file_ending) or Medical Segmentation Decathlon (modality, labels, training) layout"
        )
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json keeps the last of two equal keys: a case listed twice would silently drop one
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ReCoKDError(f"{path} names {', '.join(repr(k) for k in repeated[:5])} twice in one object; "
                              "give every case, label and channel one entry")
        return dict(pairs)

    try:
        meta = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise ReCoKDError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); fix the file"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReCoKDError(f"cannot read {path}: {exc}; check the file's permissions and encoding") from exc
    if not isinstance(meta, dict):
        raise ReCoKDError(f"{path} must hold a JSON object, not {type(meta).__name__}; fix the file")
    return meta


def _parse_channels(raw: Any, key: str, json_path: Path) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise ReCoKDError(
            f'{json_path}: "{key}" must be a non-empty object such as {{"0": "MRI"}}; fix dataset.json'
        )
    channels: dict[int, str] = {}
    for k, v in raw.items():
        try:
            index = int(k)
        except (TypeError, ValueError):
            raise ReCoKDError(
                f'{json_path}: "{key}" key {k!r} is not a channel index; use "0", "1", ... as keys'
            ) from None
        channels[index] = str(v)
    if sorted(channels) != list(range(len(channels))):
        raise ReCoKDError(
            f'{json_path}: "{key}" indices {sorted(channels)} are not 0..{len(channels) - 1}; number the channels from 0 without gaps'
        )
    return dict(sorted(channels.items()))


def _dataset_info(root: Path, meta: dict[str, Any], layout: str, channels: dict[int, str], labels: LabelSet,
                  ending: str, training: Sequence[CaseRecord], test: Sequence[CaseRecord],
                  unexpected: Sequence[Path] = ()) -> DatasetInfo:
    declared = meta.get("numTraining")
    return DatasetInfo(root=root, name=str(meta.get("name") or root.name), layout=layout, channel_names=channels,
                       labels=labels, file_ending=ending, training=tuple(training), test=tuple(test),
                       num_training_declared=declared if isinstance(declared, int) and not isinstance(declared, bool) else None,
                       unexpected_files=tuple(unexpected))


def _resolve(root: Path, rel: Any, json_path: Path, what: str) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise ReCoKDError(f"{json_path}: {what} must be a file path string, got {rel!r}; fix dataset.json")
    p = Path(rel)
    return p if p.is_absolute() else (root / p)


# --------------------------------------------------------------------------------------------------
# layouts


def _scan_folder(folder: Path, ending: str, case_of) -> tuple[set[str], list[Path], dict[str, Path]]:
    """Case ids in ``folder``, the image files that fit no case, and each fitting file by its stem.
    ``case_of(stem)`` gives ``(case id or None, fits)`` for a file named ``stem + ending``. The ending
    matches in any case (``.NII.GZ`` for ``.nii.gz``), as on a case-insensitive disk; of two files that
    differ only there, the one spelt as ``ending`` is taken and the other reported."""
    cases: set[str] = set()
    unexpected: list[Path] = []
    files: dict[str, Path] = {}
    if not folder.is_dir():
        return cases, unexpected, files
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if not f.name.lower().endswith(ending.lower()) or len(f.name) <= len(ending):
            if split_file_ending(f.name)[1].lower() in IMAGE_FILE_ENDINGS:
                unexpected.append(f)
            continue
        stem = f.name[: -len(ending)]
        case, fits = case_of(stem)
        if case is not None:
            cases.add(case)
        if not fits:
            unexpected.append(f)
            continue
        if stem in files:  # the same stem twice, endings differing in case only
            keep, other = (f, files[stem]) if f.name.endswith(ending) else (files[stem], f)
            files[stem] = keep
            unexpected.append(other)
        else:
            files[stem] = f
    return cases, unexpected, files


def _scan_nnunet_folder(folder: Path, ending: str, num_channels: int) -> tuple[set[str], list[Path], dict[str, Path]]:
    """Case ids found in an nnU-Net images folder (``<case>_<channel:04d>``), the files that fit no case,
    and the fitting files by stem."""
    def case_of(stem: str):
        m = _CHANNEL_SUFFIX.match(stem)
        if m is None:
            return None, False
        return m.group("case"), int(m.group("channel")) < num_channels

    return _scan_folder(folder, ending, case_of)


def _scan_label_folder(folder: Path, ending: str) -> tuple[set[str], list[Path], dict[str, Path]]:
    return _scan_folder(folder, ending, lambda stem: (stem, True))


def _nnunet_split(
    root: Path, images: str, labels: str, ending: str, num_channels: int, labels_required: bool
) -> tuple[tuple[CaseRecord, ...], list[Path]]:
    image_dir, label_dir = root / images, root / labels
    image_cases, unexpected, image_files = _scan_nnunet_folder(image_dir, ending, num_channels)
    has_labels = labels_required or label_dir.is_dir()
    label_cases: set[str] = set()
    label_files: dict[str, Path] = {}
    if has_labels:
        label_cases, stray, label_files = _scan_label_folder(label_dir, ending)
        unexpected += stray

    def image_file(case: str, channel: int) -> Path:  # the file found (its ending in any case), else the expected name
        stem = f"{case}_{channel:04d}"
        return image_files.get(stem, image_dir / f"{stem}{ending}")

    records = tuple(
        CaseRecord(
            case_id=case,
            image_files=tuple(image_file(case, c) for c in range(num_channels)),
            label_file=label_files.get(case, label_dir / f"{case}{ending}") if has_labels else None,
            layout="nnunet",
        )
        for case in sorted(image_cases | label_cases)
    )
    return records, unexpected


def _infer_file_ending(root: Path, json_path: Path) -> str:
    """The one image ending in imagesTr (endings differing only in case count as one: the commoner spelling)."""
    endings: dict[str, list[str]] = {}
    folder = root / "imagesTr"
    if folder.is_dir():
        for f in folder.iterdir():
            stem, ending = split_file_ending(f.name)
            if ending.lower() in IMAGE_FILE_ENDINGS and _CHANNEL_SUFFIX.match(stem):
                endings.setdefault(ending.lower(), []).append(ending)
    if len(endings) == 1:
        spellings = next(iter(endings.values()))
        return max(sorted(set(spellings)), key=spellings.count)
    raise ReCoKDError(
        f'{json_path} has no "file_ending" and it cannot be inferred from imagesTr; add e.g. "file_ending": ".nii.gz"'
    )


def _open_nnunet(root: Path, meta: dict[str, Any], json_path: Path) -> DatasetInfo:
    channels = _parse_channels(meta.get("channel_names"), "channel_names", json_path)
    labels = LabelSet.parse(meta.get("labels"), str(json_path))
    ending = meta.get("file_ending")
    if ending is None:
        ending = _infer_file_ending(root, json_path)
    if not isinstance(ending, str) or not ending.startswith("."):
        raise ReCoKDError(f'{json_path}: "file_ending" must look like ".nii.gz", got {ending!r}; fix dataset.json')

    unexpected: list[Path] = []
    explicit = meta.get("dataset")
    if explicit is not None:
        # nnU-Net v2's optional explicit file list: {case: {"images": [...], "label": "..."}}
        if not isinstance(explicit, dict):
            raise ReCoKDError(f'{json_path}: "dataset" must map case ids to {{"images": [...], "label": ...}}')
        training_list = []
        for case, entry in explicit.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
                raise ReCoKDError(f'{json_path}: "dataset" entry {case!r} needs an "images" list; fix dataset.json')
            images = tuple(_resolve(root, p, json_path, f"image of case {case!r}") for p in entry["images"])
            label = entry.get("label")
            training_list.append(
                CaseRecord(
                    case_id=str(case),
                    image_files=images,
                    label_file=_resolve(root, label, json_path, f"label of case {case!r}") if label else None,
                    layout="nnunet",
                )
            )
        training = tuple(training_list)
    else:
        if not (root / "imagesTr").is_dir():
            raise ReCoKDError(
                f"{root} has no imagesTr folder; the nnU-Net layout keeps training images in imagesTr/<case>_0000{ending}"
            )
        training, unexpected = _nnunet_split(root, "imagesTr", "labelsTr", ending, len(channels), True)
    test, stray = _nnunet_split(root, "imagesTs", "labelsTs", ending, len(channels), False)
    unexpected += stray
    return _dataset_info(root, meta, "nnunet", channels, labels, ending, training, test, unexpected)


def _open_msd(root: Path, meta: dict[str, Any], json_path: Path) -> DatasetInfo:
    channels = _parse_channels(meta.get("modality"), "modality", json_path)
    labels = LabelSet.parse(meta.get("labels"), str(json_path))
    entries = meta.get("training")
    if not isinstance(entries, list):
        raise ReCoKDError(
            f'{json_path}: "training" must be a list of {{"image": ..., "label": ...}} entries; fix dataset.json'
        )
    training: list[CaseRecord] = []
    endings: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise ReCoKDError(f'{json_path}: training entry {i} has no "image"; fix dataset.json')
        image = _resolve(root, entry["image"], json_path, f"training entry {i} image")
        label = entry.get("label")
        stem, ending = split_file_ending(image.name)
        endings.append(ending)
        training.append(
            CaseRecord(
                case_id=stem,
                image_files=(image,),
                label_file=_resolve(root, label, json_path, f"training entry {i} label") if label else None,
                layout="msd",
            )
        )
    raw_test = meta.get("test", [])
    if not isinstance(raw_test, list):
        raise ReCoKDError(f'{json_path}: "test" must be a list of image paths; fix dataset.json')
    labels_ts = root / "labelsTs"
    test: list[CaseRecord] = []
    for i, entry in enumerate(raw_test):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        image = _resolve(root, rel, json_path, f"test entry {i}")
        stem, ending = split_file_ending(image.name)
        label: Path | None = None
        if isinstance(entry, dict) and entry.get("label"):
            label = _resolve(root, entry["label"], json_path, f"test entry {i} label")
        elif (labels_ts / image.name).is_file():
            label = labels_ts / image.name
        test.append(CaseRecord(case_id=stem, image_files=(image,), label_file=label, layout="msd"))
    file_ending = meta.get("file_ending") if isinstance(meta.get("file_ending"), str) else None
    if file_ending is None:
        file_ending = max(set(endings), key=endings.count) if endings else ".nii.gz"
    return _dataset_info(root, meta, "msd", channels, labels, file_ending, training, test)


def open_dataset(root: str | Path) -> DatasetInfo:
    """Read ``dataset.json`` and list the cases of a dataset folder, detecting its layout.

    ``channel_names`` selects the nnU-Net v2 layout, ``modality`` the MSD layout. Files are listed
    but not opened; use :func:`~ReCoKDLib.data.validation.validate_dataset` to check them.

    Raises:
        ReCoKDError: the folder or its ``dataset.json`` is missing, or ``dataset.json`` is malformed.
    """
    root = Path(root).expanduser().resolve()
    meta = _load_json(root)
    json_path = root / "dataset.json"
    if "channel_names" in meta:
        return _open_nnunet(root, meta, json_path)
    if "modality" in meta:
        return _open_msd(root, meta, json_path)
    raise ReCoKDError(
        f'{json_path} has neither "channel_names" (nnU-Net v2) nor "modality" (Medical Segmentation Decathlon); '
        "add the one that matches the folder layout"
    )


# --------------------------------------------------------------------------------------------------
# loading


def _channels_of(image: sitk.Image, path: Path) -> np.ndarray:
    """Array (n_channels, D, H, W) of a 3D (one channel) or 4D (channels last in SimpleITK) image."""
    dim = image.GetDimension()
    view = sitk.GetArrayViewFromImage(image)
    if dim < 3:
        raise ReCoKDError(
            f"{path} is a {dim}D image of size {image.GetSize()}; ReCoKD segments 3D volumes, supply a 3D image"
        )
    if dim > 4:
        raise ReCoKDError(f"{path} has {dim} dimensions; supply a 3D image (or 4D with channels last)")
    if image.GetNumberOfComponentsPerPixel() > 1:
        # vector voxels: view is (..., D, H, W, k); components become channels
        view = np.moveaxis(view, -1, 0)
        view = view.reshape((-1,) + view.shape[-3:])
    elif dim == 3:
        view = view[np.newaxis]
    return view.astype(np.float32, copy=True)


def _label_array(image: sitk.Image, path: Path) -> np.ndarray:
    dim = image.GetDimension()
    view = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1 or dim not in (3, 4) or (dim == 4 and view.shape[0] != 1):
        raise ReCoKDError(
            f"{path} is not a 3D label map (size {image.GetSize()}, "
            f"{image.GetNumberOfComponentsPerPixel()} components); supply one integer value per voxel in 3D"
        )
    if dim == 4:
        view = view[0]
    if view.size == 0:
        raise ReCoKDError(f"{path} is empty; supply a non-empty label map")
    if np.issubdtype(view.dtype, np.floating):
        if not np.isfinite(view).all() or not np.array_equal(view, np.round(view)):
            raise ReCoKDError(f"{path} holds non-integer label values; save the label map with integer values")
    lo, hi = float(view.min()), float(view.max())
    if lo >= 0 and hi <= np.iinfo(np.uint8).max:
        return view.astype(np.uint8, copy=True)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return view.astype(np.int16, copy=True)
    raise ReCoKDError(f"{path} holds label values from {lo:g} to {hi:g}; label values must fit in int16")


def load_case(record: CaseRecord, dataset: DatasetInfo) -> LoadedCase:
    """Read one case into numpy arrays: image (C, D, H, W) float32 and label (D, H, W).

    Channels come from one file per channel (nnU-Net) or the 4th dimension of one file (MSD). The
    geometry (spacing, origin, direction) is the first image file's. Label values are not checked
    against ``dataset.json`` here; :func:`~ReCoKDLib.data.validation.validate_dataset` does that
    (note that SimpleITK reads NaN/Inf voxels of a NIfTI file as 0; validation reports them).

    Raises:
        ReCoKDError: naming the file, when a file is missing or unreadable, the channel count differs
            from ``dataset.json``, or the channels and the label do not share one voxel grid.
    """
    if not record.image_files:
        raise ReCoKDError(f"case {record.case_id!r} of {dataset.root} lists no image files; fix dataset.json")
    arrays: list[np.ndarray] = []
    geometry = None
    for path in record.image_files:
        image = read_image(path)
        arr = _channels_of(image, path)
        if geometry is None:
            geometry = ImageGeometry.of(image)
        elif arr.shape[1:] != arrays[0].shape[1:]:
            raise ReCoKDError(
                f"{path} has shape {arr.shape[1:]} (D, H, W) but {record.image_files[0].name} has "
                f"{arrays[0].shape[1:]}; all channels of a case must share one voxel grid"
            )
        arrays.append(arr)
    image_array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    if image_array.shape[0] != dataset.num_channels:
        raise ReCoKDError(
            f"case {record.case_id!r} ({record.image_files[0]}) has {image_array.shape[0]} channels but "
            f"dataset.json declares {dataset.num_channels} ({', '.join(dataset.channel_names.values())}); "
            "fix the image or dataset.json"
        )
    label = None
    if record.label_file is not None:
        label = _label_array(read_image(record.label_file), record.label_file)
        if label.shape != image_array.shape[1:]:
            raise ReCoKDError(
                f"{record.label_file} has shape {label.shape} (D, H, W) but its image has "
                f"{image_array.shape[1:]}; the label must share the image's voxel grid"
            )
    assert geometry is not None
    return LoadedCase(image=image_array, label=label, geometry=geometry, case_id=record.case_id)


def dataset_fields(name: str, channel_names: dict[int, str], labels: LabelSet) -> dict[str, Any]:
    """What a fingerprint or plan records of its dataset, as JSON: name, channels and labels."""
    return {"dataset_name": name, "channel_names": {str(k): v for k, v in channel_names.items()},
            "labels": labels.to_json()}


def select_cases(dataset_path: str | Path, cases: str | Sequence[str]):
    """The dataset and the case records named by ``cases``: ``"test"`` (its test split) or training case ids.

    Raises:
        ReCoKDError: a named case is not a training case of the dataset.
    """
    dataset = open_dataset(dataset_path)
    records = dataset.test if cases == "test" else [r for r in dataset.training if r.case_id in set(cases)]
    if cases != "test" and len(records) != len(cases):
        missing = sorted(set(cases) - {r.case_id for r in dataset.training})
        raise ReCoKDError(f"case(s) {', '.join(missing[:5])} are not training cases of {dataset_path}; check the split")
    return dataset, records


def group_cases(folder: str | Path) -> dict[str, list[Path]]:
    """Image files of a folder grouped by case: ``case_0000.nii.gz``, ``case_0001.nii.gz`` are the
    channels of ``case``; a file without the suffix is a one-channel case. Sorted by case id."""
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        stem, ending = split_file_ending(path.name)
        if ending.lower() not in IMAGE_FILE_ENDINGS:
            continue
        m = _CHANNEL_SUFFIX.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if channel in cases.setdefault(case, {}):
            raise ReCoKDError(f"{folder} has two files for case {case!r} channel {channel}; keep one")
        cases[case][channel] = path
    out: dict[str, list[Path]] = {}
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(len(channels))):
            raise ReCoKDError(f"case {case!r} in {folder} has channels {sorted(channels)}; number them _0000, _0001, ... without gaps")
        out[case] = [channels[c] for c in sorted(channels)]
    return out


# --------------------------------------------------------------------------------------------------
# DICOM series


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK's warnings (printed to stderr: "No Series were found", "Non uniform sampling") off for the block:
    what they say becomes an error line or a None here."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _series_label(folder: Path, series_id: str) -> str:
    """``<uid> '<SeriesDescription>' (<n> files)`` of one series in ``folder``, for an error line."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
    description = ""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            description = f" {reader.GetMetaData('0008|103e').strip()!r}"
    except (RuntimeError, IndexError):
        pass
    return f"{series_id}{description} ({len(files)} files)"


def dicom_series_files(folder: str | Path, series_id: str | None = None) -> list[Path] | None:
    """The files of the DICOM series in ``folder`` (not its subfolders), in slice order (GDCM sorts them
    by position), or None when the folder holds no DICOM series (or is not a folder).

    Args:
        series_id: the SeriesInstanceUID to take when the folder holds several.

    Raises:
        ReCoKDError: the folder holds several series and ``series_id`` picks none of them; the line
            names each series (UID, description, file count) and how to pick one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    with _itk_warnings_off():
        try:
            ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        except RuntimeError:
            return None
        if not ids:
            return None
        def shown() -> str:  # for an error line only: it reads one header per series
            return ", ".join(_series_label(folder, uid) for uid in ids[:5]) + (", ..." if len(ids) > 5 else "")

        if series_id is not None and series_id not in ids:
            raise ReCoKDError(f"{folder} holds no DICOM series {series_id!r} (it holds {shown()}); give one of those UIDs")
        if series_id is None and len(ids) > 1:
            raise ReCoKDError(f"{folder} holds {len(ids)} DICOM series: {shown()}; segment one series at a time: put "
                              "its files in a folder of their own, or convert it to one file (e.g. dcm2niix, or "
                              "SimpleITK's ImageSeriesReader) and give that file")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id or ids[0])
    return [Path(f) for f in files]


def read_dicom_series(folder: str | Path, series_id: str | None = None) -> sitk.Image:
    """The DICOM series in ``folder`` as one 3D image, with ITK's geometry (spacing from the slice
    positions, origin of the first slice, direction from the image orientation; LPS, as every file
    ReCoKD reads).

    Raises:
        ReCoKDError: one line when the folder holds no DICOM series, several (see
            :func:`dicom_series_files`), slices that are not evenly spaced (a missing slice would
            distort the volume), or files ITK cannot read.
    """
    folder = Path(folder)
    files = dicom_series_files(folder, series_id)
    if files is None:
        raise ReCoKDError(f"{folder} holds no DICOM series; give a folder of one series' DICOM files, or an image file "
                          "(.nii.gz, .nrrd, .mha)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    with _itk_warnings_off():
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise ReCoKDError(f"cannot read the DICOM series in {folder}: {_sitk_reason(exc)}; check the files, or "
                              "convert the series with dcm2niix and give the result") from None
    if image.HasMetaDataKey("ITK_non_uniform_sampling_deviation"):  # ITK's mark (its value is not a string)
        raise ReCoKDError(f"the {len(files)} slices of the DICOM series in {folder} are not evenly spaced (a slice "
                          "missing, or a gantry tilt?); add the missing slices, or convert the series with dcm2niix "
                          "and give the result")
    return image
