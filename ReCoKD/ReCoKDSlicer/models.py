"""The Segment panel's model list: registry entries, the models folder, and files the user picks.

Robustness rules (what users of other segmentation extensions complain about):

- a registry whose file is unreadable, or one entry that is malformed, never breaks the module: the
  entry (or file) is skipped with a warning and the rest is listed;
- registry models are fetched once into the per-user cache (outside Slicer's version folders, see
  :func:`ReCoKDLib.deployment.registry.default_cache_dir`) and verified by sha256; the cache is listed too;
- reading a bundle's labels and channels needs no torch (the manifest is plain JSON), so the model
  list works before the heavy dependencies are installed.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .i18n import _

__all__ = ["ModelSource", "BundleInfo", "readRegistry", "scanModelsFolder", "readBundleInfo", "defaultModelsFolder",
           "defaultRunsFolder", "builtinRegistry", "localBundlePath", "registryInfo", "cachedCopyName"]

log = logging.getLogger("ReCoKD")


@dataclass
class ModelSource:
    """One entry of the model list.

    ``kind`` is ``"file"`` (a bundle file / folder / run folder on disk) or ``"registry"`` (fetched
    by the background process on first use; ``entry`` is the registry item, ``base`` the registry's
    folder for relative URLs).
    """

    name: str
    kind: str
    path: str = ""
    entry: dict = field(default_factory=dict)
    base: str = ""
    description: str = ""

    @property
    def label(self) -> str:
        where = _("registry") if self.kind == "registry" else Path(self.path).parent.name or self.path
        return f"{self.name} ({where})"

    @property
    def key(self) -> str:
        """What the parameter node stores to find this entry again: the name, or a loaded file's path."""
        return self.path if self.kind == "file" and not self.inFolder else self.name

    inFolder: bool = False  # a bundle found in the models folder (listed by name)


@dataclass
class BundleInfo:
    """What the module needs to know about a bundle without loading the network."""

    name: str
    labels: Any  # ReCoKDLib.utils.labels.LabelSet (names, values, colours, terminology); None when not known yet
    channelNames: list[str]
    provenance: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)  # the author's model-card statements (recokd export --card)
    cardRows: list = field(default_factory=list)  # the whole model card, (heading, text) rows; [] when not known yet
    mirrorAxes: Any = None  # the axes the network saw mirrored in training; () none; None not known
    role: str = ""  # "teacher" or "student" (the bundle's manifest); "" when not known
    nnunetFolds: list = field(default_factory=list)  # an nnU-Net results folder: the folds with a final checkpoint

    @property
    def cardText(self) -> str:
        """The model card as aligned lines (as ``recokd models NAME`` prints it); "" when not known yet."""
        width = max((len(h) for h, _text in self.cardRows), default=0)
        return "\n".join(f"{h:<{width}}  {t}" for h, t in self.cardRows)

    @property
    def ttaFactor(self) -> int:
        """How many times slower mirror test-time augmentation makes it (1: not available)."""
        return 2 ** len(self.mirrorAxes) if self.mirrorAxes else (1 if self.mirrorAxes == () else 8)

    @property
    def numChannels(self) -> int:
        return len(self.channelNames)

    def summary(self) -> str:
        """The model box's text: structures and channels, how accurate it is and how that was measured (the
        card's statement, else the held-out figure with its case count), its intended use and terms."""
        if self.labels:
            text = _("{name}: {structures} structure(s), {channels} channel(s)").format(
                name=self.name, structures=len(self.labels.foreground()), channels=self.numChannels)
        else:
            text = _("{name}: {channels} channel(s); fetched on first use").format(
                name=self.name, channels=self.numChannels)
        test = self.provenance.get("test_metrics") or {}
        if self.card.get("accuracy"):
            text += "\n" + _("Accuracy: {accuracy}").format(accuracy=self.card["accuracy"])
        elif isinstance(test.get("dice_mean"), (int, float)):
            text += "\n" + _("Accuracy: mean Dice {dice:.3f} on {cases} held-out case(s); no cross-validated figure "
                             "recorded").format(dice=test["dice_mean"], cases=test.get("num_cases", "?"))
        if self.card.get("limitations"):
            text += "\n" + _("Limitations: {limitations}").format(limitations=self.card["limitations"])
        use = self.card["intended_use"] if "intended_use" in self.card else _("research only, not for clinical use")
        text += "\n" + _("Intended use: {use}").format(use=use)
        if self.provenance.get("license"):
            text += "\n" + _("Terms: {terms}").format(terms=self.provenance["license"])
        return text


def defaultModelsFolder() -> Path:
    """The per-user model folder (``$RECOKD_HOME/models`` or the platform cache, see ReCoKDLib)."""
    try:
        from ReCoKDLib.deployment.registry import default_cache_dir

        return default_cache_dir()
    except ImportError:  # pragma: no cover - ReCoKDLib ships with the module
        return Path.home() / ".cache" / "recokd" / "models"


def defaultRunsFolder() -> Path:
    """Where the Training panel writes runs when no output folder is given (beside the models folder)."""
    return defaultModelsFolder().parent / "runs"


def builtinRegistry() -> Path | None:
    """The model registry shipped with ReCoKDLib (its models work offline), or None when absent."""
    try:
        from ReCoKDLib.deployment.registry import builtin_registry_path

        return builtin_registry_path()
    except ImportError:  # pragma: no cover - ReCoKDLib ships with the module
        return None


def localBundlePath(source: "ModelSource") -> Path | None:
    """The bundle file behind a source when it is on this disk already (files; registry entries with a local URL)."""
    if source.kind == "file":
        return Path(source.path)
    url = str(source.entry.get("url", ""))
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        candidate = Path(unquote(urlparse(url).path))
    elif "://" in url:
        return None
    else:
        candidate = Path(url) if Path(url).is_absolute() else Path(source.base) / url
    return candidate if candidate.is_file() else None


def cachedCopyName(source: "ModelSource") -> str | None:
    """The file name a fetched registry model has in the models folder (the cache: ``<name>-<sha256[:12]>.recokd``,
    as ReCoKDLib's ``fetch_model`` writes it); None for a file source."""
    if source.kind != "registry":
        return None
    return f"{source.name}-{str(source.entry.get('sha256', ''))[:12]}.recokd"


def registryInfo(source: "ModelSource") -> BundleInfo | None:
    """What a registry entry itself says (channels, labels) for a model that is not on this disk."""
    channels = source.entry.get("channels")
    if not isinstance(channels, list) or not channels:
        return None
    labels = source.entry.get("labels")
    return BundleInfo(name=source.name, labels=_labelSet(labels, f"registry entry {source.name}") if labels else None,
                      channelNames=[str(c) for c in channels])


def _labelSet(labels, where: str, colors=None, terminology=None):
    """ReCoKDLib's LabelSet (torch-free), or ValueError naming ``where``."""
    from ReCoKDLib.utils.labels import LabelSet

    return LabelSet(labels, colors if isinstance(colors, dict) else None,
                    terminology if isinstance(terminology, dict) else None, source=where)


def _entrySchema() -> dict | None:
    try:
        from ReCoKDLib.resources import load_schema

        return load_schema("registry")["properties"]["models"]["items"]
    except Exception:  # noqa: BLE001 - schema unavailable: fall back to the minimal checks below
        return None


def _entryProblem(item: Any, schema: dict | None) -> str | None:
    if not isinstance(item, dict):
        return "is not an object"
    if schema is not None:
        try:
            import jsonschema

            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(item), key=lambda e: list(e.absolute_path))
            if errors:
                return " ".join(errors[0].message.split())[:160]
            return None
        except ImportError:
            pass
    for key in ("name", "url", "sha256"):
        if not isinstance(item.get(key), str) or not item.get(key):
            return f"lacks '{key}'"
    if len(item["sha256"]) != 64:
        return "has a malformed sha256"
    return None


def readRegistry(path: str | Path, warn: Callable[[str], None] | None = None) -> list[ModelSource]:
    """The valid entries of a registry file; bad entries (or an unreadable file) are skipped with a warning."""
    warn = warn or log.warning
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warn(f"model registry {path} skipped: cannot read it ({exc})")
        return []
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        warn(f"model registry {path} skipped: it has no 'models' list")
        return []
    if data.get("version") != 1:
        warn(f"model registry {path}: version {data.get('version')!r} is not 1; reading the entries that are valid")
    schema = _entrySchema()
    sources: list[ModelSource] = []
    seen: set[str] = set()
    for i, item in enumerate(data["models"]):
        problem = _entryProblem(item, schema)
        if problem is None and item["name"] in seen:
            problem = "repeats an earlier name"
        if problem:
            name = item.get("name") if isinstance(item, dict) else None
            warn(f"model registry {path}: entry {i} ({name or 'unnamed'}) skipped: {problem}")
            continue
        seen.add(item["name"])
        sources.append(ModelSource(name=item["name"], kind="registry", entry=dict(item), base=str(path.parent),
                                   description=str(item.get("description", ""))))
    return sources


def _isBundle(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in (".recokd", ".zip")
    return path.is_dir() and ((path / "bundle.json").is_file() or (path / "run.json").is_file() or isNnunetFolder(path))


def isNnunetFolder(path) -> bool:
    """Whether ``path`` is an nnU-Net v2 results folder (a model folder, or a dataset folder holding one)."""
    from ReCoKDLib.utils.nnunet_layout import is_nnunet_folder

    return Path(path).is_dir() and is_nnunet_folder(path)


def nnunetInfo(path, folds=None) -> BundleInfo:
    """An nnU-Net v2 results folder (a teacher, or a student ReCoKD exported with ``--format nnunet``) as the
    model list sees it: labels and channels from its dataset.json, the folds that have a final checkpoint,
    its spacing; torch-free.

    Raises:
        ValueError: one line when the folder is incomplete (no model folder, several, no dataset.json or
            plans.json, no fold with checkpoint_final.pth, a fold asked for that has none).
    """
    from ReCoKDLib.errors import ReCoKDError
    from ReCoKDLib.utils.nnunet_layout import locate_nnunet_model

    try:
        layout = locate_nnunet_model(path, folds, fold_hint="choose folds that have one (Folds box)",
                                     missing_hint="train a fold first, or copy the whole results folder "
                                     "(fold_0 ... with their checkpoint_final.pth)")
    except ReCoKDError as exc:
        raise ValueError(str(exc)) from None
    dataset = layout.dataset_json
    labels = dataset.get("labels") or {}
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise ValueError(_("{path}: region-based labels are not supported; use a model trained on plain "
                           "labels").format(path=layout.folder / "dataset.json"))
    channels = dataset.get("channel_names") or dataset.get("modality") or {"0": "image"}
    channelNames = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    configuration = layout.configuration or "?"
    conf = (layout.plans_json.get("configurations") or {}).get(configuration) or {}
    exported = str(dataset.get("description", "")).startswith("ReCoKD student")
    name = layout.folder.parent.name if layout.folder.parent.name.startswith("Dataset") else layout.folder.name
    model = (_("nnU-Net v2 results folder {folder} (a ReCoKD student)") if exported
             else _("nnU-Net v2 results folder {folder}")).format(folder=layout.folder)
    rows = [("model", model),
            ("folds", _("{folds} (with a final checkpoint: {available})").format(
                folds=", ".join(layout.folds), available=", ".join(layout.available))),
            ("input", _("{channels}; {configuration} at spacing {spacing} mm (array axes, after transpose "
                        "{transpose})").format(channels=", ".join(channelNames), configuration=configuration,
                                               spacing=conf.get("spacing", "?"),
                                               transpose=layout.plans_json.get("transpose_forward", [0, 1, 2]))),
            ("terms", str(dataset.get("licence") or dataset.get("license") or
                          _("not stated in its dataset.json: ask the model's source"))),
            ("intended use", _("research only, not for clinical use"))]
    return BundleInfo(name=name, labels=_labelSet(labels, str(layout.folder / "dataset.json")), channelNames=channelNames,
                      provenance={"source": "nnU-Net v2"}, cardRows=rows, role="student" if exported else "teacher",
                      nnunetFolds=list(layout.available))


def scanModelsFolder(folder: str | Path) -> list[ModelSource]:
    """Bundles (``*.recokd`` files, bundle folders) in ``folder``, sorted by name; unreadable ones skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    sources = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not _isBundle(path):
            continue
        sources.append(ModelSource(name=path.stem if path.is_file() else path.name, kind="file", path=str(path),
                                   inFolder=True))
    return sources


def _readManifest(path: Path) -> tuple[dict, dict]:
    """``bundle.json`` and ``plans.json`` of a bundle file or folder (a run folder: its run.json's view)."""
    if path.is_dir():
        if (path / "bundle.json").is_file():
            plans = path / "plans.json"
            return (json.loads((path / "bundle.json").read_text(encoding="utf-8")),
                    json.loads(plans.read_text(encoding="utf-8")) if plans.is_file() else {})
        if (path / "run.json").is_file():  # a training run folder: labels and channels from the run
            run = json.loads((path / "run.json").read_text(encoding="utf-8"))
            plans = json.loads((path / "plans.json").read_text(encoding="utf-8")) if (path / "plans.json").is_file() else {}
            labels = run.get("labels") or plans.get("labels") or {}
            return ({"name": path.name, "role": "training run", "labels": labels, "colors": run.get("colors") or {},
                     "channel_names": run.get("channel_names") or plans.get("channel_names") or {"0": "image"},
                     "provenance": {"config": run.get("config") or {}}}, plans)
        raise ValueError(_("{path} is neither a bundle folder nor a training run folder").format(path=path))
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        return (json.loads(zf.read("bundle.json").decode("utf-8")),
                json.loads(zf.read("plans.json").decode("utf-8")) if "plans.json" in names else {})


def readBundleInfo(path: str | Path) -> BundleInfo:
    """Name, labels, colours and channel names of a bundle (or run folder), read from its JSON only.

    Raises:
        ValueError: one line when the file is missing or is not a ReCoKD bundle. (The full checks --
            checksums, schema, weights -- run in the background process that loads the network.)
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(_("model {path} does not exist; check the path").format(path=path))
    if isNnunetFolder(path) and not (path / "bundle.json").is_file() and not (path / "run.json").is_file():
        return nnunetInfo(path)
    try:
        manifest, plans = _readManifest(path)
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(_("{path} is not a ReCoKD model bundle ({error}); export one with recokd export").format(
            path=path, error=exc)) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("labels"), dict) or not manifest["labels"]:
        raise ValueError(_("{path} has no labels in its manifest; re-export it with recokd export").format(path=path))
    # run folders lack colours (they get the defaults); bundles always carry them
    labels = _labelSet(manifest["labels"], str(path), manifest.get("colors"), manifest.get("terminology"))
    channels = manifest.get("channel_names") or {"0": "image"}
    channelNames = [str(channels[k]) for k in sorted(channels, key=lambda s: int(s))]
    provenance = manifest.get("provenance") if isinstance(manifest.get("provenance"), dict) else {}
    card = manifest.get("card") if isinstance(manifest.get("card"), dict) else {}
    cardRows, mirrorAxes = _card(manifest, plans if isinstance(plans, dict) else {}, path)
    return BundleInfo(name=str(manifest.get("name") or path.stem), labels=labels, channelNames=channelNames,
                      provenance=provenance, card=card, cardRows=cardRows, mirrorAxes=mirrorAxes,
                      role=str(manifest.get("role") or ""))


def _card(manifest: dict, plans: dict, path: Path) -> tuple[list, Any]:
    """The model card's rows and the trained mirror axes, torch-free; a card that cannot be derived (an
    odd plan) is said so in its one row rather than breaking the model list."""
    try:
        from ReCoKDLib.data.augmentation import trained_mirror_axes
        from ReCoKDLib.deployment.card import card_rows

        config = (manifest.get("provenance") or {}).get("config") or {}
        mirrorAxes = (tuple(int(a) for a in manifest["mirror_axes"]) if "mirror_axes" in manifest
                      else trained_mirror_axes(config.get("augment"), config.get("patch_size")))
        return card_rows(manifest, plans, mirrorAxes), mirrorAxes
    except Exception as exc:  # noqa: BLE001 - the list must stay usable; the background process checks fully
        log.warning(f"model card of {path} not shown: {exc}")
        return [("model card", _("cannot be shown ({error}); re-export the model with recokd export").format(
            error=exc))], None
