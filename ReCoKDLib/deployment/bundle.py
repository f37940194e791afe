"""Model bundles: one ``.recokd`` file (a zip) or folder holding everything needed to run a network.

Members (a flat layout; nothing else is allowed):

``bundle.json``
    the manifest (validated against ``resources/bundle.schema.json``): format and version, name,
    role (teacher / student), labels ``{name: value}``, colours ``{name: [r, g, b]}`` (0..1),
    channel names, the training data's direction (optional, used to reorient inputs), the sha256 of
    every other member, and the training provenance (dataset, KD method, teacher, width factor,
    seed, validation metrics, configuration).
``network.json``
    the :class:`~ReCoKDLib.models.UNetSpec` of the network.
``plans.json``
    the :class:`~ReCoKDLib.data.planning.Plans` that say how to preprocess an image (target
    spacing, normalisation per channel, patch size, channel names, labels).
``weights.safetensors``
    the weights (safetensors: tensors only, never pickled code).
``check.safetensors`` (optional)
    the check case: one window of a real image and the network's fp32 labels of it, against which a
    cheaper arithmetic is checked before it is used (:mod:`~ReCoKDLib.deployment.check_case`).

Loading is defensive because bundles are downloaded: member names must be plain top-level names
(no absolute paths, no ``..``, no symlinks), only ``.json`` and ``.safetensors`` members are read
(a ``.pt``/``.pkl`` member is refused, so nothing is ever unpickled), the total uncompressed size is
bounded (zip bombs), every member's sha256 must match the manifest, and the manifest's schema and
version are checked. Every refusal is a one-line :class:`~ReCoKDLib.errors.ReCoKDError`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import stat
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from .. import __version__
from ..data.augmentation import trained_mirror_axes
from ..data.planning import Plans
from ..errors import ReCoKDError
from ..utils.io import atomic_write, read_json
from ..utils.labels import LabelSet
from ..models import SegUNet, UNetSpec, build_unet, load_weights, save_weights

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MAX_BUNDLE_BYTES",
    "Bundle",
    "load_bundle",
    "bundle_from_run",
    "export_run",
    "validate_manifest",
]

BUNDLE_FORMAT = "recokd-bundle"
#: Bumped when the bundle layout or manifest changes meaning; loaders refuse other versions.
BUNDLE_VERSION = 1
#: Default bound on the total uncompressed size of a bundle's members (zip-bomb guard).
MAX_BUNDLE_BYTES = 2 * 1024**3
# zip-bomb guard: a member above this size may not inflate more than this ratio (weights hardly compress)
_BOMB_MIN_BYTES = 64 * 1024**2
_BOMB_RATIO = 100
MANIFEST = "bundle.json"
MEMBERS = ("network.json", "plans.json", "weights.safetensors")
OPTIONAL_MEMBERS = ("check.safetensors",)
ALLOWED_SUFFIXES = (".json", ".safetensors")

# a fixed timestamp makes identical bundles byte-identical (reproducible builds, stable sha256)
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_manifest(manifest: Any, source: str = "bundle") -> None:
    """Check a manifest's format, version and schema; raise a one-line :class:`ReCoKDError`."""
    import jsonschema

    from ..resources import load_schema

    if not isinstance(manifest, dict):
        raise ReCoKDError(f"{source}: {MANIFEST} is not a JSON object; re-export the model with recokd export")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ReCoKDError(f"{source} is not a ReCoKD bundle ({MANIFEST} format is {manifest.get('format')!r}); "
                          "pass a file made by recokd export")
    if manifest.get("version") != BUNDLE_VERSION:
        raise ReCoKDError(
            f"{source} has bundle version {manifest.get('version')!r} but this ReCoKD ({__version__}) reads version "
            f"{BUNDLE_VERSION}; re-export the model or install the matching ReCoKD"
        )
    validator = jsonschema.Draft202012Validator(load_schema("bundle"))
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        message = " ".join(err.message.split())
        if len(message) > 160:
            message = message[:157] + "..."
        raise ReCoKDError(f"{source}: {MANIFEST} is invalid at {where}: {message}; re-export the model with recokd export")


@dataclass
class Bundle:
    """A loaded (or freshly assembled) model bundle.

    Attributes:
        manifest: the ``bundle.json`` content.
        spec: the network architecture.
        plans: the preprocessing plan.
        weights: the raw safetensors bytes.
        source: where it was loaded from (``None`` when built in memory).
    """

    manifest: dict[str, Any]
    spec: UNetSpec
    plans: Plans
    weights: bytes
    source: Path | None = field(default=None, compare=False)
    check: bytes | None = field(default=None, compare=False)  # check.safetensors, when the bundle has one

    # -- convenient views ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def role(self) -> str:
        return str(self.manifest["role"])

    @property
    def labels(self) -> LabelSet:
        """The model's classes: name -> value (background included), colours and terminology."""
        m = self.manifest
        return LabelSet(m["labels"], m.get("colors"), m.get("terminology"), source=f"bundle {self.name}")

    @property
    def channel_names(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.manifest["channel_names"].items()}

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.manifest.get("provenance", {}))

    @property
    def mirror_axes(self) -> tuple[int, ...] | None:
        """The spatial axes (0 = D, 1 = H, 2 = W) the network saw mirrored in training: the only axes mirror
        test-time augmentation may flip (flips it never saw are views it was not trained on). From the
        manifest, else from the training augmentation in the provenance (bundles written before the
        manifest recorded it); ``None`` when unknown."""
        if "mirror_axes" in self.manifest:
            return tuple(int(a) for a in self.manifest["mirror_axes"])
        config = self.provenance.get("config") or {}
        return trained_mirror_axes(config.get("augment"), config.get("patch_size"))

    @property
    def postprocessing(self) -> str:
        """The label post-processing the predictor applies unless told otherwise (``none`` if unrecorded)."""
        return str(self.manifest.get("postprocessing", "none"))

    @property
    def reference_direction(self) -> tuple[float, ...] | None:
        """The training images' direction cosines (SimpleITK, row-major 3x3), when recorded."""
        d = self.manifest.get("reference_direction")
        return None if d is None else tuple(float(v) for v in d)

    @property
    def num_classes(self) -> int:
        return self.spec.out_channels

    def describe(self) -> str:
        p = self.provenance
        bits = [f"{self.name} ({self.role}", f"{self.num_classes} classes", f"{self.plans.num_channels} channel(s)"]
        if p.get("method"):
            bits.append(f"method {p['method']}")
        return ", ".join(bits) + ")"

    # -- network ------------------------------------------------------------------------------
    def build_network(self, device: str | None = None) -> SegUNet:
        """The network with the bundle's weights, in eval mode (on ``device`` if given)."""
        network = build_unet(self.spec)
        # load_weights wants a file (safetensors re-links DynUNet's aliased blocks); a temp file is cheap
        with tempfile.TemporaryDirectory(prefix="recokd-") as tmp:
            path = Path(tmp) / "weights.safetensors"
            path.write_bytes(self.weights)
            try:
                load_weights(network, path)
            except ReCoKDError as exc:
                where = self.source or self.name
                text = str(exc).replace(f"weights file {path}", "its weights").replace(f"weights {path}", "its weights")
                raise ReCoKDError(f"bundle {where}: {text.replace(str(path), 'its weights')}") from None
        network.eval()
        return network.to(device) if device is not None else network

    # -- writing ------------------------------------------------------------------------------
    def _member_bytes(self) -> dict[str, bytes]:
        members = {
            "network.json": (self.spec.to_json() + "\n").encode("utf-8"),
            "plans.json": (self.plans.to_json() + "\n").encode("utf-8"),
            "weights.safetensors": self.weights,
        }
        if self.check is not None:
            members["check.safetensors"] = self.check
        manifest = dict(self.manifest)
        manifest["files"] = {name: _sha256(data) for name, data in members.items()}
        validate_manifest(manifest, "the bundle being written")
        self.manifest = manifest
        members[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        return members

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the bundle: a zip when ``path`` ends in ``.recokd`` or ``.zip``, else a folder.

        ``path`` must be new (an empty folder counts as new) or, with ``overwrite``, an earlier bundle:
        anything else there (a run, a dataset, another file) is never written over. The zip is written
        to a temporary file next to ``path``, read back (every member's CRC) and renamed, so an
        interrupted or failed export never leaves a partial bundle; a folder is filled member by member
        the same way, the manifest last.
        """
        from ..utils.io import WriteVerificationError
        from ..utils.outputs import check_output_file, check_output_folder

        path = Path(path)
        members = self._member_bytes()
        zipped = path.suffix.lower() in (".recokd", ".zip")
        if zipped:
            check_output_file(path, overwrite=overwrite, kind="model bundle", is_kind=_is_bundle_file)
        else:
            if path.exists() and not path.is_dir():
                raise ReCoKDError(f"{path} exists and is not a folder; choose a path ending in .recokd for a single file")
            check_output_folder(path, overwrite=overwrite, kind="model bundle", is_own=_is_bundle_folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        if zipped:
            def write_zip(tmp: Path) -> None:
                with zipfile.ZipFile(tmp, "w") as zf:
                    for name in (MANIFEST, *(m for m in (*MEMBERS, *OPTIONAL_MEMBERS) if m in members)):
                        info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                        # weights are dense floats: deflating them costs time and saves little (the check
                        # case's labels deflate well)
                        info.compress_type = zipfile.ZIP_STORED if name == "weights.safetensors" else zipfile.ZIP_DEFLATED
                        info.external_attr = (stat.S_IFREG | 0o644) << 16
                        zf.writestr(info, members[name])

            def read_back(tmp: Path) -> None:
                with zipfile.ZipFile(tmp) as zf:
                    if zf.testzip() is not None or sorted(zf.namelist()) != sorted(members):
                        raise WriteVerificationError("the written bundle does not read back whole")

            atomic_write(path, write_zip, verify=read_back)
        else:
            _save_folder(path, members)
        self.source = path
        return path


def _save_folder(path: Path, members: dict[str, bytes]) -> None:
    """Write a folder bundle whole or not at all: the members (each verified) go to a temporary sibling
    folder, which then takes the place of ``path``; an earlier bundle there is moved aside first and put
    back if the swap fails, so a full disk never leaves a mix of old and new members."""
    import shutil
    import uuid

    staging = path.with_name(f".{uuid.uuid4().hex[:8]}-p{os.getpid()}.partial.{path.name}")
    aside = path.with_name(f".{uuid.uuid4().hex[:8]}-p{os.getpid()}.earlier.{path.name}")
    try:
        staging.mkdir(parents=True)
        for name in (*(m for m in members if m != MANIFEST), MANIFEST):
            data = members[name]
            atomic_write(staging / name, lambda tmp, data=data: tmp.write_bytes(data), expected_size=len(data))
        if path.exists():  # an earlier bundle (checked by save) or an empty folder
            os.replace(path, aside)
        try:
            os.replace(staging, path)
        except OSError:
            if aside.exists() and not path.exists():
                os.replace(aside, path)
            raise
    except OSError as exc:
        from ..utils.io import write_error

        raise write_error(path, exc.strerror or str(exc), exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)


def _is_bundle_file(path: Path) -> bool:
    """Whether ``path`` is an earlier bundle (a zip holding the manifest), which an export may replace."""
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _is_bundle_folder(path: Path) -> bool:
    """Whether folder ``path`` holds an earlier folder bundle and nothing else (a partial one counts)."""
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    return bool(names) and names <= {MANIFEST, *MEMBERS, *OPTIONAL_MEMBERS}


# --------------------------------------------------------------------------------------------------
# loading


def _check_member_name(name: str, source: Path) -> None:
    """Refuse names that could escape the bundle or hold code (see the module docstring)."""
    if "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ReCoKDError(f"bundle {source} has a member with an absolute or non-portable path {name!r}; refusing to load it")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ReCoKDError(f"bundle {source} has a member {name!r} that escapes the bundle ('..'); refusing to load it")
    if len(parts) != 1 or name.endswith("/"):
        raise ReCoKDError(f"bundle {source} has a nested member {name!r}; bundles are flat, re-export with recokd export")
    if not name.endswith(ALLOWED_SUFFIXES):
        raise ReCoKDError(
            f"bundle {source} has a member {name!r} that is neither .json nor .safetensors; bundles never hold "
            "pickled code (.pt/.pkl), refusing to load it — re-export with recokd export"
        )


def _read_zip(path: Path, max_bytes: int) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ReCoKDError(f"cannot open bundle {path}: {exc}; pass a .recokd file made by recokd export") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise ReCoKDError(f"bundle {path} has duplicate member names; refusing to load it")
        for info in infos:
            _check_member_name(info.filename, path)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ReCoKDError(f"bundle {path} member {info.filename!r} is a symbolic link; refusing to load it")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise ReCoKDError(
                f"bundle {path} would unpack to {declared} bytes, above the limit of {max_bytes}; "
                "refusing a possible zip bomb (raise max_bytes if the model really is that large)"
            )
        for info in infos:  # weights barely compress: a large member that inflates 100-fold is a bomb
            if info.file_size > _BOMB_MIN_BYTES and info.file_size > _BOMB_RATIO * max(info.compress_size, 1):
                raise ReCoKDError(
                    f"bundle {path} member {info.filename!r} would inflate {info.compress_size} bytes to "
                    f"{info.file_size}; refusing a possible zip bomb, download or export the model again"
                )
        out: dict[str, bytes] = {}
        total = 0
        for info in infos:
            if info.filename not in (MANIFEST, *MEMBERS, *OPTIONAL_MEMBERS):
                continue  # unknown .json/.safetensors members (future additions) are not read
            # the declared size can lie: read at most what is left of the budget, plus one byte
            try:
                with zf.open(info) as f:
                    data = f.read(max_bytes - total + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # CRC error, false sizes, truncation
                raise ReCoKDError(f"bundle {path} is damaged (member {info.filename!r}: {' '.join(str(exc).split())}); "
                                  "download or export the model again") from None
            total += len(data)
            if total > max_bytes or len(data) != info.file_size:
                raise ReCoKDError(
                    f"bundle {path} member {info.filename!r} unpacks to more than declared or beyond {max_bytes} bytes; "
                    "refusing a possible zip bomb"
                )
            out[info.filename] = data
        return out


def _read_folder(path: Path, max_bytes: int) -> dict[str, bytes]:
    root = path.resolve()
    out: dict[str, bytes] = {}
    total = 0
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") and entry.name.endswith(".partial"):
            continue
        if entry.is_symlink():
            raise ReCoKDError(f"bundle {path} member {entry.name!r} is a symbolic link; refusing to load it")
        if entry.is_dir():
            raise ReCoKDError(f"bundle {path} has a nested folder {entry.name!r}; bundles are flat, re-export with recokd export")
        _check_member_name(entry.name, path)
        if entry.resolve().parent != root:
            raise ReCoKDError(f"bundle {path} member {entry.name!r} resolves outside the bundle; refusing to load it")
        if entry.name not in (MANIFEST, *MEMBERS, *OPTIONAL_MEMBERS):
            continue
        total += entry.stat().st_size
        if total > max_bytes:
            raise ReCoKDError(f"bundle {path} holds more than {max_bytes} bytes; raise max_bytes if the model really is that large")
        out[entry.name] = entry.read_bytes()
    return out


def _json_member(members: dict[str, bytes], name: str, source: Path) -> Any:
    try:
        return json.loads(members[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReCoKDError(f"bundle {source}: {name} is not valid JSON ({exc}); re-export the model") from None


def load_bundle(path: str | Path, max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
    """Load and check a bundle (``.recokd`` zip or folder).

    Args:
        path: the bundle.
        max_bytes: bound on the total uncompressed size of the members read.

    Returns:
        the :class:`Bundle`; its weights are checked against the network when it is built
        (:meth:`Bundle.build_network`).

    Raises:
        ReCoKDError: one line naming the bundle and the problem (missing, not a bundle, unsafe member,
            wrong version, schema violation, checksum mismatch, inconsistent plan and network).
    """
    path = Path(path)
    if path.is_dir():
        members = _read_folder(path, max_bytes)
    elif path.is_file():
        members = _read_zip(path, max_bytes)
    else:
        raise ReCoKDError(f"model bundle {path} does not exist; check the path or export one with recokd export RUN -o {path.name or 'model.recokd'}")
    if MANIFEST not in members:
        raise ReCoKDError(f"{path} has no {MANIFEST}, so it is not a ReCoKD bundle; export one with recokd export")
    manifest = _json_member(members, MANIFEST, path)
    validate_manifest(manifest, f"bundle {path}")
    for name in MEMBERS:
        if name not in members:
            raise ReCoKDError(f"bundle {path} lacks {name}; re-export the model with recokd export")
        if _sha256(members[name]) != manifest["files"][name]:
            raise ReCoKDError(f"bundle {path}: {name} does not match its sha256 in {MANIFEST} (corrupt or tampered); re-download or re-export it")
    check = None
    for name in OPTIONAL_MEMBERS:  # listed in the manifest: present and intact, or the bundle is refused
        if name in manifest["files"]:
            if name not in members:
                raise ReCoKDError(f"bundle {path} lacks {name}, which its {MANIFEST} lists; re-export the model")
            if _sha256(members[name]) != manifest["files"][name]:
                raise ReCoKDError(f"bundle {path}: {name} does not match its sha256 in {MANIFEST} (corrupt or "
                                  "tampered); re-download or re-export it")
            check = members[name]
    spec = UNetSpec.from_dict(_json_member(members, "network.json", path))
    plans = Plans.from_dict(_json_member(members, "plans.json", path), source=f"bundle {path} plans.json")
    from ..models.weights import check_finite_weight_bytes

    # weights of a diverged training predict background everywhere: refused on load, not on the user's images
    check_finite_weight_bytes(members["weights.safetensors"], f"bundle {path} weights.safetensors")
    bundle = Bundle(manifest=manifest, spec=spec, plans=plans, weights=members["weights.safetensors"], source=path,
                    check=check)
    _check_consistency(bundle, str(path))
    return bundle


def _check_consistency(bundle: Bundle, where: str) -> None:
    plans = bundle.plans
    plans.check_network(bundle.spec, f"bundle {where}", fix="re-export the model")
    if bundle.labels != plans.labels:
        raise ReCoKDError(f"bundle {where}: labels {dict(bundle.labels)} differ from the plan's {dict(plans.labels)}; re-export the model")


# --------------------------------------------------------------------------------------------------
# from a training run


def _read_run_json(path: Path, what: str) -> dict[str, Any]:
    return read_json(path, what, hint="pass a training run folder (run.json, plans.json, network.json, weights); "
                                      "if it is one, it is damaged")


def _reference_direction_of_run(run: dict[str, Any]) -> list[float] | None:
    """The direction of the run's first training image, when the dataset is still reachable."""
    dataset = run.get("dataset")
    if not dataset:
        return None
    try:
        from ..data.datasets import open_dataset, read_header

        info = open_dataset(dataset)
        if not info.training:
            return None
        return list(read_header(info.training[0].image_files[0]).geometry.direction)
    except Exception:  # best effort: a missing dataset only loses the reorientation hint
        return None


def bundle_from_run(
    run_dir: str | Path,
    name: str | None = None,
    weights: str = "best",
    reference_direction: Any = None,
    description: str | None = None,
    terminology: Mapping[str, Any] | None = None,
    test_metrics: Mapping[str, Any] | None = None,
    license: str | None = None,
    postprocessing: str | None = None,
    card: Mapping[str, Any] | None = None,
) -> Bundle:
    """Assemble a bundle from a training run folder (``run.json``, ``plans.json``, ``network.json``,
    ``model_best.safetensors`` / ``model_final.safetensors``).

    Args:
        run_dir: the run folder.
        name: bundle name; default the folder name.
        weights: ``"best"`` (EMA weights at the best validation epoch) or ``"final"``.
        reference_direction: the training images' direction (9 values); default read from the run's
            dataset when reachable, else not recorded (inputs are then used in their stored axis order,
            exactly as in training).
        terminology: per label name, standard codes (``category``, ``type``, ... as [scheme, value, meaning]).
        test_metrics: scores on held-out cases (``recokd evaluate --json``), kept in the provenance.
        license: the model's terms of use (those of its training data), kept in the provenance.
        postprocessing: the label post-processing predictions of this model get by default
            (:mod:`~ReCoKDLib.inference.postprocessing`; choose it on held-out cases); not recorded: none.

    Raises:
        ReCoKDError: a file is missing or malformed, or the weights do not fit the network.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReCoKDError(f"run folder {run_dir} does not exist; pass the folder a training command wrote")
    if weights not in ("best", "final"):
        raise ReCoKDError(f"weights must be 'best' or 'final', got {weights!r}")
    run = _read_run_json(run_dir / "run.json", "run description")
    if run.get("version") != 1:
        raise ReCoKDError(f"{run_dir / 'run.json'} has version {run.get('version')!r}; this ReCoKD reads run version 1")
    role = run.get("role")
    if role not in ("teacher", "student"):
        raise ReCoKDError(f"{run_dir / 'run.json'} has role {role!r}; expected 'teacher' or 'student'")
    # a run that never finished an epoch holds untrained weights (e.g. --epochs 0 before it was refused)
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    completed = run.get("epochs_completed")
    planned = [config.get(k) for k in ("epochs", "iters_per_epoch")]
    if completed == 0 or all(isinstance(v, int) for v in planned) and planned[0] * planned[1] < 1:
        raise ReCoKDError(f"run {run_dir} never finished a training epoch, so its weights are untrained; train it "
                          "(--resume, or a new run with --epochs >= 1) before exporting")
    plans = Plans.load(run_dir / "plans.json")
    spec = UNetSpec.from_dict(_read_run_json(run_dir / "network.json", "network description"))
    weights_path = run_dir / f"model_{weights}.safetensors"
    if not weights_path.is_file():
        raise ReCoKDError(f"{weights_path} does not exist; the run has not finished (or pass --weights final)")
    # fail at export, not on the user's machine, when the weights do not fit or are NaN/Inf (load_weights)
    load_weights(build_unet(spec), weights_path)
    labels = LabelSet(run.get("labels") or plans.labels, run.get("colors"), terminology, source=f"run {run_dir}")
    channel_names = run.get("channel_names") or plans.channel_names
    if reference_direction is None:
        reference_direction = _reference_direction_of_run(run)
    provenance = {
        "dataset_name": run.get("dataset_name", plans.dataset_name),
        "method": run.get("method"),
        # the teacher run's folder name only: a shipped bundle should not carry the trainer's local paths
        "teacher": Path(run["teacher_run"]).name if run.get("teacher_run") else None,
        "width_factor": run.get("width_factor"),
        "fold": run.get("fold"),
        "seed": run.get("seed"),
        "lambda_max": run.get("lambda_max"),
        "taps": run.get("taps"),
        "metrics": dict(run.get("metrics") or {}),
        "config": dict(run.get("config") or {}),
        "weights": weights,
    }
    if test_metrics is not None:
        provenance["test_metrics"] = dict(test_metrics)
    if license:
        provenance["license"] = str(license)
    description = description or f"{role} trained on {provenance['dataset_name']}" + (
        f" with {provenance['method']}" if provenance["method"] else "")
    manifest = _manifest(name or run_dir.resolve().name, role, labels, channel_names, reference_direction,
                         provenance, description, created=weights_path.stat().st_mtime)
    if postprocessing is not None:
        manifest["postprocessing"] = postprocessing
    if card is not None:  # the author's statements of the model card (deployment/card.py)
        from .card import check_card

        manifest["card"] = check_card(dict(card), f"the model card of run {run_dir}")
    config = run.get("config") or {}
    mirrored = trained_mirror_axes(config.get("augment"), config.get("patch_size"))
    if mirrored is not None:
        manifest["mirror_axes"] = list(mirrored)
    bundle = Bundle(manifest=manifest, spec=spec, plans=plans, weights=weights_path.read_bytes(), source=None)
    validate_manifest(manifest, f"the bundle of run {run_dir}")
    _check_consistency(bundle, str(run_dir))
    bundle.check = _check_case_of_run(run, bundle)
    return bundle


def _check_case_of_run(run: dict[str, Any], bundle: Bundle) -> bytes | None:
    """The check case (:mod:`.check_case`) from the run's first validation case (else its first training
    case), when the run's dataset is still reachable; ``None`` otherwise (``--precision auto`` then keeps
    fp32 for this model)."""
    dataset = run.get("dataset")
    if not dataset:
        return None
    try:
        from ..data.datasets import load_case, open_dataset
        from .check_case import make_check_case

        info = open_dataset(dataset)
        records = {r.case_id: r for r in info.training}
        wanted = [c for c in (run.get("val_cases") or []) + (run.get("train_cases") or []) if c in records]
        record = records[wanted[0]] if wanted else (info.training[0] if info.training else None)
        return make_check_case(bundle, load_case(record, info)) if record is not None else None
    except (ReCoKDError, OSError, ValueError) as exc:  # best effort: a moved dataset only costs the check case
        print(f"note: no check case from the run's data ({exc}); --precision auto will keep fp32 for this model",
              file=sys.stderr)
        return None


def with_check_case(bundle: Bundle, image_files: Sequence[str | Path], label_file: str | Path | None = None) -> Bundle:
    """``bundle`` with a check case (:mod:`.check_case`) made from one image (one file per channel, in the
    orientation the model was trained in) and, optionally, its label map (which centres the window)."""
    import numpy as np
    import SimpleITK as sitk

    from ..data.datasets import LoadedCase, read_image
    from ..utils.geometry import ImageGeometry
    from .check_case import make_check_case

    images = [read_image(p) for p in image_files]
    array = np.stack([sitk.GetArrayFromImage(i).astype(np.float32) for i in images])
    label = sitk.GetArrayFromImage(read_image(label_file)).astype(np.uint8) if label_file is not None else None
    case = LoadedCase(image=array, label=label, geometry=ImageGeometry.of(images[0]), case_id=Path(image_files[0]).name)
    bundle.check = make_check_case(bundle, case)
    return bundle


def _created(when: float | None) -> str:
    """The manifest's ``created`` time: ``$SOURCE_DATE_EPOCH`` (reproducible builds) when set, else
    ``when`` (e.g. the weights file's time, so that exporting a run twice gives one file), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    seconds = float(epoch) if epoch and epoch.strip().isdigit() else when
    moment = _dt.datetime.now(_dt.timezone.utc) if seconds is None else _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    return moment.replace(microsecond=0).isoformat()


def _manifest(name: str, role: str, labels: LabelSet, channel_names: Mapping[Any, str], reference_direction: Any,
              provenance: Mapping[str, Any], description: str | None = None, created: float | None = None) -> dict[str, Any]:
    """A bundle manifest (its member checksums are filled in when it is written)."""
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "name": name,
        **({"description": description} if description else {}),
        "recokd_version": __version__,
        "created": _created(created),
        "role": role,
        **labels.display_json(),
        "channel_names": {str(k): str(v) for k, v in channel_names.items()},
        "reference_direction": None if reference_direction is None else [float(v) for v in reference_direction],
        "files": {m: "0" * 64 for m in MEMBERS},
        "provenance": dict(provenance),
    }
    return manifest


def bundle_from_network(
    network: SegUNet,
    plans: Plans,
    name: str,
    role: str = "student",
    provenance: Mapping[str, Any] | None = None,
    colors: Mapping[str, Any] | None = None,
    reference_direction: Any = None,
    terminology: Mapping[str, Any] | None = None,
) -> Bundle:
    """Assemble a bundle from a network in memory (used by tests and notebooks)."""
    with tempfile.TemporaryDirectory(prefix="recokd-") as tmp:
        weights = save_weights(network, Path(tmp) / "w.safetensors").read_bytes()
    labels = plans.labels.with_display(colors=colors, terminology=terminology)
    manifest = _manifest(name, role, labels, plans.channel_names, reference_direction, provenance or {})
    bundle = Bundle(manifest=manifest, spec=network.spec, plans=plans, weights=weights)
    validate_manifest(manifest, f"bundle {name}")
    _check_consistency(bundle, name)
    return bundle


def export_run(run_dir: str | Path, output: str | Path, overwrite: bool = False, **kwargs: Any) -> Path:
    """``recokd export RUN -o OUTPUT``: :func:`bundle_from_run` then :meth:`Bundle.save`."""
    return bundle_from_run(run_dir, **kwargs).save(output, overwrite=overwrite)


def open_model(path: str | Path, max_bytes: int = MAX_BUNDLE_BYTES) -> Bundle:
    """A bundle from a ``.recokd`` file / bundle folder, or assembled from a training run folder; an
    nnU-Net v2 results folder gives a bundle-like view of its fold ensemble (all folds with a final
    checkpoint; see :mod:`ReCoKDLib.models.nnunet`)."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).is_file() and not (path / "run.json").is_file():
        from ..utils.nnunet_layout import is_nnunet_folder
        from .nnunet_model import open_nnunet_view

        if is_nnunet_folder(path):
            return open_nnunet_view(path)  # type: ignore[return-value]
    if path.is_dir() and (path / "run.json").is_file() and not (path / MANIFEST).is_file():
        return bundle_from_run(path)
    return load_bundle(path, max_bytes=max_bytes)


def bundle_bytes(bundle: Bundle) -> bytes:
    """The bundle as ``.recokd`` zip bytes (for checksums in registries)."""
    source = bundle.source
    with tempfile.TemporaryDirectory(prefix="recokd-") as tmp:
        data = bundle.save(Path(tmp) / "b.recokd").read_bytes()
    bundle.source = source
    return data


__all__ += ["bundle_from_network", "open_model", "bundle_bytes", "with_check_case"]
