"""The ReCoKD module's logic: segmentation and training tasks, Qt-free.

Works in Slicer's Python console, in ``Slicer --no-main-window --python-script`` and, for the test
suite, under plain Python with ``slicer-core``. Every heavy step is a background process
(``<python> -m ReCoKDLib.inference.slicer_bridge`` to segment, ``<python> -m ReCoKDLib.cli`` to train and
export) polled without blocking; results become MRML nodes on the main thread. Inputs come from plain
arguments or from the module's parameter node (:meth:`ReCoKDLogic.segmentWithParameters`,
:meth:`ReCoKDLogic.trainWithParameters`); nothing here reads a widget.
"""

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import slicer
import vtk

from . import geometry, library, models, terminology
from .i18n import _
from .jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, BackgroundJob, processAlive

try:  # inside Slicer: the template's base class (parameter nodes, module name)
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core
    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            pass

try:  # the choices of `recokd distill --method`, from ReCoKDLib's torch-free list (default first)
    from ReCoKDLib.kd_methods import method_names

    KD_METHODS = ("auto", *method_names())  # auto: the library's default (ReCo-KD; none with unlabeled scans)
except ImportError:  # no library: library.error() says so, and nothing can be trained
    KD_METHODS = ("auto", "recokd")

try:  # torch-free too
    from ReCoKDLib.utils.nnunet_layout import is_nnunet_folder
except ImportError:
    def is_nnunet_folder(path) -> bool:  # type: ignore[misc]
        return False

log = logging.getLogger("ReCoKD")

DEVICES = ("auto", "cpu", "cuda", "mps")  # mps: Apple Metal, only when asked for (never auto)
SAMPLE_NAME = "ReCoKDPhantom"
SAMPLE_MODEL = "phantom-abdomen"


def _inSlicerApplication() -> bool:
    return hasattr(getattr(slicer, "app", None), "processEvents")


class ReCoKDError(RuntimeError):
    """A one-line message for the user (wrong inputs, failed or cancelled job)."""


def _requireLibrary() -> None:
    if library.error():
        raise ReCoKDError(library.error())


def _libraryRoot() -> Path:
    _requireLibrary()
    return library.root()


def pythonExecutable() -> str:
    """The Python that runs background jobs: Slicer's ``PythonSlicer`` inside Slicer, else this interpreter."""
    if _inSlicerApplication():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def _jobEnvironment() -> dict:
    env = dict(os.environ)
    root = str(_libraryRoot())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def _processEvents() -> None:
    """Keep Slicer's GUI alive while the console waits for a job (no-op without Qt)."""
    if _inSlicerApplication():
        slicer.app.processEvents()


def samplePhantomPath(folder=None) -> Path:
    """The sample volume (the built-in phantom, held-out seed), written on first use; returns its path."""
    _requireLibrary()
    from ReCoKDLib.data.phantom import write_sample_volume

    folder = Path(folder) if folder else models.defaultModelsFolder().parent / "samples"
    return write_sample_volume(folder / f"{SAMPLE_NAME}.nrrd")


#: the segment tag naming the model that made a segment (so that running it again replaces only its own)
MODEL_TAG = "ReCoKD.model"
#: the attribute of a segmentation ReCoKD created naming its input volume's node ID
INPUT_ATTRIBUTE = "ReCoKD.inputVolume"


def _chosenStructures(info, structures) -> list:
    """The model's structure names to keep: all (``structures`` None) or those named, refused in one line
    when a name is not the model's or none is left."""
    names = info.labels.foreground_names
    if structures is None:
        return names
    unknown = [n for n in structures if n not in names]
    if unknown:
        raise ReCoKDError(_("model '{name}' has no structure {unknown}; it segments {structures}").format(
            name=info.name, unknown=", ".join(map(repr, unknown)), structures=", ".join(names)))
    if not structures:
        raise ReCoKDError(_("no structure chosen; choose at least one of {structures}").format(
            structures=", ".join(names)))
    return [n for n in names if n in structures]


def nodesByClass(scene, className: str) -> list:
    """The scene's nodes of a class, as a list. ``GetNodesByClass`` hands its caller a collection to release
    (as ``slicer.util.getNodesByClass`` does): kept, it would hold every node it lists after the scene closes."""
    if scene is None:
        return []
    collection = scene.GetNodesByClass(className)
    try:
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)


def _tagValue(modelName: str) -> str:
    """The model's name as a segment tag value: a .seg.nrrd stores tags as ``key:value|...``."""
    return re.sub(r"[|:]", "_", modelName)


def _segmentsMadeBy(segmentation, modelName: str, sameModel=()) -> list:
    """IDs of the segments ``modelName`` (or a model in ``sameModel``: its full or fast variant) made in
    ``segmentation`` (tagged when they were added)."""
    names = {_tagValue(n) for n in (modelName, *sameModel)}
    made = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = vtk.reference("")
        if segment.GetTag(MODEL_TAG, value) and str(value) in names:
            made.append(segmentation.GetNthSegmentID(i))
    return made


class SegmentationTask:
    """A running segmentation: the background job plus what is needed to build the result node.

    ``inputWarnings``: when the task was started with ``confirmWarnings`` and the input checks found the
    input unlike the model's training data, the findings (one line each): the job stopped before running
    the network, and :meth:`ReCoKDLogic.segmentAnyway` runs it again without the checks. ``warnings``: the
    checks' findings of a task that went on regardless (the console's default, as ``recokd predict``).
    """

    def __init__(self, logic, job, volumeNodes, info, modelName, tmpdir, output, onFinished=None, request=None,
                 sequence=None):
        self.logic = logic
        #: (browser, input sequence, frames) when every frame of a sequence is segmented: ``frames[i]`` holds
        #: frame i's node per channel; None for one volume
        self.sequence = sequence
        self.request = dict(request or {})  # segment()'s arguments, for segmentAnyway()
        self.inputWarnings: list[str] = []
        self.warnings: list[str] = []
        self.job = job
        self.volumeNodes = volumeNodes
        self.scene = logic.scene  # the scene the result belongs to
        self.info = info
        self.modelName = modelName
        self.sameModel: list = []  # its full or fast variant's name: their segments in the output are replaced too
        self.tmpdir = tmpdir
        self.output = output
        self.onFinished = onFinished
        self.segmentationNode = None
        self.message = ""
        #: the panel's parameter node, when started from it: its output becomes the result (Segment again
        #: then replaces this result instead of adding a second node)
        self.parameterNode = None

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def progress(self) -> float:
        return self.job.progress

    def poll(self) -> str:
        """Advance (never blocks); on success builds the segmentation node (call from the main thread)."""
        if self.job.finished:
            return self.job.state
        state = self.job.poll()
        gone = self._inputGone() if state == SUCCEEDED else None
        if gone:  # a result must never land beside the wrong image, or in another scene
            self.job.state = FAILED
            self.job.error = _("the result was discarded: {reason}; segment it again").format(reason=gone)
        elif state == SUCCEEDED:
            try:
                if self.sequence is not None:
                    self.segmentationNode = self.logic._createSegmentationSequence(self)
                else:
                    self.segmentationNode = self.logic._createSegmentationNode(self)
                self.message = _("'{name}' done in {seconds:.1f} s on {device}").format(
                    name=self.segmentationNode.GetName(), seconds=self.job.elapsed,
                    device=self.job.device or _("unknown device"))
                self.segmentationNode.SetAttribute("ReCoKD.device", self.job.device or "")
                self.segmentationNode.SetAttribute("ReCoKD.seconds", f"{self.job.elapsed:.2f}")
                self.segmentationNode.SetAttribute("ReCoKD.model", self.modelName)
                if self.job.device:
                    self.logic.devicesSeen.add(self.job.device.split(":")[0])
                if (self.parameterNode is not None and hasattr(self.parameterNode, "outputSegmentation")
                        and self.sequence is None):  # (a sequence's result is replaced through its browser)
                    self.parameterNode.outputSegmentation = self.segmentationNode
                self.warnings = list(dict.fromkeys(  # (each frame of a sequence repeats its input's findings)
                    self._userMessage(line.partition("warning: ")[2]) for line in self.job.lines
                    if line.startswith("LOG warning: ")))
                if self.warnings:
                    self.message += _("; {count} input warning(s): {warnings}").format(
                        count=len(self.warnings), warnings=" ".join(self.warnings))
                    for line in self.warnings:
                        log.warning(line)
            except Exception as exc:  # noqa: BLE001 - the scene is left as it was
                if self.segmentationNode is not None:
                    self.logic.scene.RemoveNode(self.segmentationNode)
                    self.segmentationNode = None
                self.job.state = FAILED
                self.job.error = _("could not load the result: {error}").format(error=exc)
        if self.job.finished:
            if self.job.state != SUCCEEDED:
                self.message = self._userMessage(self.job.error)
                if self.job.checks and self.request.get("confirmWarnings"):
                    self.inputWarnings = [self._userMessage(line) for line in self.job.checks]
            self.logic.lastMessage = self.message
            self._cleanup()
            if self.onFinished is not None:
                self.onFinished(self)
        return self.job.state

    def _inputGone(self) -> str:
        """Why the inputs the job started from are no longer there ("" when they are): the scene was
        replaced or closed, or an input volume was removed from it during the run."""
        scene = self.logic.scene
        if scene is not self.scene:
            return _("the scene changed during the segmentation")
        for node in self.volumeNodes:
            if not scene.IsNodePresent(node):
                return _("volume '{name}' was removed from the scene (or the scene was closed) during the "
                         "segmentation").format(name=node.GetName())
        if self.sequence is not None:
            for node in self.sequence[:2]:
                if not scene.IsNodePresent(node):
                    return _("'{name}' was removed from the scene during the segmentation").format(name=node.GetName())
        return ""

    def _userMessage(self, text: str) -> str:
        """The job speaks of its temporary input files and the command line's options; the user knows the
        volumes and the panel (or the console's arguments)."""
        frames = self.sequence[2] if self.sequence is not None else [self.volumeNodes]
        for f in range(len(frames)):
            for i, node in enumerate(self.volumeNodes):
                here = f"volume '{node.GetName()}'" + (f" (frame {f + 1})" if len(frames) > 1 else "")
                text = text.replace(str(Path(self.tmpdir) / f"input_{f * len(self.volumeNodes) + i:04d}.nrrd"), here)
        for option, here in _OPTIONS_HERE:
            text = text.replace(option, here)
        return text

    def cancel(self) -> None:
        if self.job.finished:
            return
        self.job.cancel()
        self.message = self.logic.lastMessage = _("segmentation cancelled; nothing was added to the scene")
        self._cleanup()
        if self.onFinished is not None:
            self.onFinished(self)

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.logic.segmentationTask is self:
            self.logic.segmentationTask = None


#: the library's advice names command-line options; in Slicer they are a checkbox (or an argument)
_OPTIONS_HERE = (("pass --force to segment it anyway", "tick 'Skip input checks' (force=True in the console) to "
                  "segment it anyway"),
                 ("run it without --tta", "untick 'Mirror test-time augmentation' (tta=False in the console)"))


class TrainingTask:
    """A running ``recokd train`` / ``distill``: progress from the run folder's ``log.csv``, then export.

    ``followUp(task)``, when set, starts the next step (the distillation after a teacher trained first)
    and returns its task; :attr:`ReCoKDLogic.trainingTask` then points at that step.
    """

    def __init__(self, logic, job, role, outputFolder, epochs, arguments, onFinished=None, followUp=None):
        self.logic = logic
        self.job = job
        self.role = role
        self.outputFolder = Path(outputFolder)
        self.epochs = int(epochs)
        self.arguments = list(arguments)  # the `recokd` arguments, for Resume
        self.onFinished = onFinished
        self.followUp = followUp
        self.history: list[dict] = []
        self.bundlePath = None  # Path of the exported student bundle
        self.message = ""
        self._exportJob = None
        self._ended = False  # onFinished has run (or the next step of the chain took over)

    @property
    def state(self) -> str:
        if self._exportJob is not None and not self._exportJob.finished:
            return RUNNING
        return self.job.state

    @property
    def progress(self) -> float:
        return min(len(self.history) / max(self.epochs, 1), 1.0)

    def readHistory(self) -> list[dict]:
        """The per-epoch rows (epoch, lr, loss_*, dice_*) written so far."""
        path = self.outputFolder / "log.csv"
        if path.is_file():
            try:
                with open(path, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
                self.history = [{k: _number(v) for k, v in row.items()} for row in rows]
            except (OSError, csv.Error):
                pass
        return self.history

    def poll(self) -> str:
        if self._ended:
            return self.state
        if self._exportJob is not None:
            state = self._exportJob.poll()
            if state != RUNNING:
                self._finishExport()
            return self.state
        if self.job.finished:
            return self.job.state
        state = self.job.poll()
        self.readHistory()
        if state == SUCCEEDED and self.role == "student":
            self._startExport()
            return self.state
        if state != RUNNING:
            self._finish()
        return self.state

    def _finish(self) -> None:
        if self.job.state == SUCCEEDED and self.followUp is not None:
            try:
                self.followUp(self)
                self._ended = True
                return  # the next step reports when the whole chain ends
            except ReCoKDError as exc:
                self.job.state, self.job.error = FAILED, str(exc)
        self.message = _("training finished") if self.job.state == SUCCEEDED else self.job.error
        self._end()

    def _startExport(self) -> None:
        folder = Path(self.logic.modelsFolder)
        folder.mkdir(parents=True, exist_ok=True)
        self.bundlePath = freeBundlePath(folder, studentBundleStem(self.arguments, self.outputFolder))
        # the bundle's own name is its file's: results, segment tags and the list all say the same, unique name
        command = [pythonExecutable(), "-m", "ReCoKDLib.cli", "export", str(self.outputFolder), "-o", str(self.bundlePath),
                   "--name", self.bundlePath.stem]
        self._exportJob = BackgroundJob(command, env=_jobEnvironment(), name="export",
                                        onLine=self.logic.onTrainingLine).start()

    def _finishExport(self) -> None:
        if self._exportJob.state == SUCCEEDED:
            self.message = _("training finished; student bundle {path} added to the model list").format(
                path=self.bundlePath)
        else:
            self.job.state = FAILED
            self.job.error = self.message = _("training finished but the export failed: {error}").format(
                error=self._exportJob.error)
            self.bundlePath = None
        self._end()

    def _end(self) -> None:
        self._ended = True
        if self.onFinished is not None:
            self.onFinished(self)

    def stop(self) -> None:
        """Stop now (the run keeps its last epoch checkpoint; :meth:`ReCoKDLogic.resumeTraining` continues it).
        The task then ends like any other: cancelled, and ``onFinished`` runs, also when the stop comes
        during the export (the bundle is then not in the model list; Resume exports it)."""
        if self._ended:
            return
        exporting = self._exportJob is not None and not self._exportJob.finished
        if exporting:
            self._exportJob.cancel()
            self.bundlePath = None
        self.job.cancel()
        if exporting:  # the training itself had succeeded: the task did not
            self.job.state, self.job.error = CANCELLED, _("the export was cancelled")
            self.message = _("stopped during the export; Resume exports the trained student")
        else:
            self.message = _("training stopped; Resume continues from the last finished epoch")
        self._end()


#: a segmentation's temporary folder (it holds the patient's image): its name, and the file naming its Slicer
TEMP_PREFIX, OWNER_FILE = "ReCoKD-", "owner.pid"
#: a folder without an owner file is left alone for this long (it may be another Slicer's, just made)
STALE_WITHOUT_OWNER_S = 24 * 3600


def cleanStaleTempFolders(root=None) -> list:
    """Remove the temporary folders of segmentations whose Slicer is gone (killed, crashed): they hold
    patient images. A folder is stale when the process named in its owner file no longer exists (where
    that cannot be told, or without an owner file: when it is older than a day). Returns the removed paths."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink():
                continue
            try:
                alive = processAlive(int((folder / OWNER_FILE).read_text(encoding="utf-8").strip()))
            except (OSError, ValueError):
                alive = None
            if alive is None:
                alive = time.time() - folder.stat().st_mtime < STALE_WITHOUT_OWNER_S
            if alive:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except OSError:
            continue
    return removed


def studentBundleStem(arguments, outputFolder) -> str:
    """The model-list name of a distilled student, ``<dataset>_<method>_R<width>_<id>``: two students of other
    datasets, methods or widths never share a name, and ``id`` (from the run folder) tells apart two runs of
    the same settings while staying the same for one run exported again."""
    args = [str(a) for a in arguments]

    def option(flag, default):
        return args[args.index(flag) + 1] if flag in args[:-1] else default

    dataset = Path(args[1]).name if len(args) > 1 else "dataset"
    width = _number(option("--width-factor", "4"))
    width = f"{width:g}" if isinstance(width, float) else str(width)
    run_id = hashlib.sha256(str(Path(outputFolder).resolve()).encode("utf-8")).hexdigest()[:6]
    stem = f"{dataset}_{option('--method', 'recokd')}_R{width}_{run_id}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", stem)


def freeBundlePath(folder: Path, stem: str) -> Path:
    """``folder/stem.recokd``, or ``stem-2.recokd``, ``stem-3.recokd``, ... when taken: an export from the
    module never replaces a bundle already in the model list (the library refuses to without --overwrite)."""
    candidate, n = folder / f"{stem}.recokd", 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}.recokd"
    return candidate


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


class ReCoKDLogic(ScriptedLoadableModuleLogic):
    """Segment volumes and train students; usable from the Python console and headless Slicer.

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        modelsFolder: where trained students are exported and bundles are found (default: ReCoKD's
            per-user model folder, outside Slicer's version folders).
        registries: model registry files to list (default: the registry shipped with ReCoKDLib, then
            ``$RECOKD_REGISTRY`` when set).
        runsFolder: where the Training panel writes runs when no output folder is chosen.
    """

    def __init__(self, scene=None, modelsFolder=None, registries=None, runsFolder=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        self.modelsFolder = Path(modelsFolder) if modelsFolder else models.defaultModelsFolder()
        self.runsFolder = Path(runsFolder) if runsFolder else models.defaultRunsFolder()
        if registries is None:
            registries = [r for r in (models.builtinRegistry(), os.environ.get("RECOKD_REGISTRY")) if r]
        self.registries = [Path(r) for r in registries]
        self.warnings: list[str] = []
        self.lastMessage = ""  # the last segmentation's outcome: elapsed time and device, or the error
        self.devicesSeen: set = set()  # devices segmentations ran on ("cuda": this computer has a usable GPU)
        self.segmentationTask = None
        self.trainingTask = None
        self.onTrainingLine = None  # called with each output line of training jobs (the log pane)
        self.extraTrainingArgs: list = []  # extra `recokd train/distill` options for runs started from the panel
        self.extraTeacherArgs: list = []  # ... for the teacher only (e.g. planner options: --base-filters 16)
        # the inference engine: auto = ONNX Runtime on the CPU when installed (faster for students), else PyTorch
        self.backend = "auto"
        self.debugDelay = 0.0  # seconds per sliding window; test hook only
        self.timeout = None  # seconds; wait=True cancels after it
        self._plotNodes: dict = {}
        for folder in cleanStaleTempFolders():  # left by a Slicer that was killed mid-segmentation
            log.info(f"removed the stale temporary folder {folder}")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    # -- models -----------------------------------------------------------------------------------
    def availableModels(self) -> list:
        """Registry entries (bad ones skipped with a warning) and the bundles in the models folder."""
        self.warnings = []
        sources = []
        for registry in self.registries:
            sources += models.readRegistry(registry, warn=self._warn)
        cached = {models.cachedCopyName(s) for s in sources}  # a fetched registry model is listed once, by its name
        sources += [s for s in models.scanModelsFolder(self.modelsFolder) if Path(s.path).name not in cached]
        return sources

    def _localCopy(self, source):
        """The bundle file of a source on this disk: a file, a local registry URL, or a fetched registry
        model's verified copy in the models folder (the cache); None when it is still to be fetched."""
        path = models.localBundlePath(source)
        if path is None and source.kind == "registry":
            copy = Path(self.modelsFolder) / models.cachedCopyName(source)
            path = copy if copy.is_file() else None
        return path

    def _resolve(self, model):
        """A :class:`~ReCoKDSlicer.models.ModelSource` for a path, a model name or a source."""
        if isinstance(model, models.ModelSource):
            return model
        if not model:
            raise ReCoKDError(_("select a model (or 'Load from file…')"))
        for source in self.availableModels():
            if source.name == str(model):
                return source
        path = Path(str(model)).expanduser()
        if path.exists():
            return models.ModelSource(name=path.stem if path.is_file() else path.name, kind="file", path=str(path))
        raise ReCoKDError(_("model {model} is neither a file nor a known model name; use 'Load from file…' or check "
                            "the registry").format(model=model))

    def fastVariant(self, model):
        """The model's fast variant (a student at a coarser grid, named by its registry entry's ``fast``, as
        TotalSegmentator's ``--fast`` picks its 3 mm models) as a source; None where it has none."""
        try:
            source = self._resolve(model)
        except ReCoKDError:
            return None
        name = source.entry.get("fast") if source.kind == "registry" else None
        if not name or name == source.name:  # (a registry naming the model itself has no fast variant)
            return None
        return next((s for s in self.availableModels() if s.kind == "registry" and s.name == name), None)

    def _nameIfKnown(self, source) -> str:
        """The name a model's results carry (its bundle's name) when its bundle is on this disk, else ""."""
        try:
            info = self.modelInfo(source)
        except ReCoKDError:
            return ""
        return info.name if info is not None else ""

    def modelFolderSource(self, folder):
        """A model folder for the list (*Add model folder…*): an nnU-Net v2 results folder (a teacher, or a student
        exported with ``recokd export --format nnunet``), a bundle folder or a training run folder.

        Raises:
            ReCoKDError: one line when it is none of these, or an incomplete nnU-Net folder (what is missing).
        """
        path = Path(str(folder)).expanduser()
        if not path.is_dir():
            raise ReCoKDError(_("{path} is not a folder; choose an nnU-Net results folder or a ReCoKD model "
                                "folder").format(path=path))
        if not models._isBundle(path):
            raise ReCoKDError(_("{path} is neither an nnU-Net v2 results folder (plans.json, dataset.json, fold_*) "
                                "nor a ReCoKD bundle or run folder; choose the folder nnU-Net trained "
                                "(…/DatasetXXX_Name or its <trainer>__<plans>__<configuration> "
                                "folder)").format(path=path))
        try:
            info = models.readBundleInfo(path)
        except ValueError as exc:
            raise ReCoKDError(str(exc)) from None
        return models.ModelSource(name=info.name, kind="file", path=str(path))

    def modelInfo(self, model):
        """Labels, colours, channel names and terminology of a model; None for a registry model that is
        neither on this disk nor describes its channels in its entry."""
        source = self._resolve(model)
        path = self._localCopy(source)
        if path is None:
            return models.registryInfo(source)
        try:
            return models.readBundleInfo(path)
        except ValueError as exc:
            raise ReCoKDError(str(exc)) from None

    def engineNote(self, device, info=None) -> str:
        """One line on what ``device`` means for the model described by ``info`` (:meth:`modelInfo`), when it
        is slow ("" when there is nothing to say): the GPUs PyTorch can use are learnt from earlier runs
        (Slicer's own process never loads PyTorch)."""
        gpuSeen = "cuda" in self.devicesSeen
        if device == "mps":
            return _("Apple GPU (MPS): PyTorch runs some 3D operations on the CPU there, so it can be slower than "
                     "'cpu'; compare once and keep the faster")
        if device == "cpu" and gpuSeen:
            return _("The CPU is chosen although this computer has a CUDA GPU (an earlier segmentation used it): "
                     "expect it to be many times slower; 'auto' uses the GPU")
        onCpu = device == "cpu" or (device == "auto" and not gpuSeen)
        if onCpu and info is not None and info.role == "teacher":
            if device == "auto":
                return _("A teacher-size network on the CPU (when no GPU is found): expect minutes per volume; a "
                         "student distilled from it runs several times faster")
            return _("A teacher-size network on the CPU: expect minutes per volume; a student distilled from it runs "
                     "several times faster")
        return ""

    def modelCardRows(self, model) -> list:
        """The model card as (heading, text) rows: the input it expects, training data, accuracy and how it
        was measured, known limitations, intended use and licence (what ``recokd models NAME`` prints)."""
        source = self._resolve(model)
        info = self.modelInfo(source)
        if info is not None and info.cardRows:
            return list(info.cardRows)
        return [("model", f"{source.name}: {source.description or _('no description')}"),
                ("model card", _("shown once the model is fetched (on its first Segment)"))]

    def modelCard(self, model) -> str:
        """:meth:`modelCardRows` as aligned text lines (for the console)."""
        rows = self.modelCardRows(model)
        width = max(len(h) for h, _ in rows)
        return "\n".join(f"{h:<{width}}  {t}" for h, t in rows)

    def _cardsFile(self) -> Path:
        return Path(self.modelsFolder) / ".seen-model-cards.json"

    def _cardKey(self, model) -> str:
        import hashlib

        text = self.modelCard(model)
        return f"{self._resolve(model).name}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"

    def modelCardSeen(self, model) -> bool:
        """Whether this user has been shown this model's card (this very card: a changed card counts as new)."""
        try:
            seen = json.loads(self._cardsFile().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(seen, list) and self._cardKey(model) in seen

    def markModelCardSeen(self, model) -> None:
        """Remember that the card was shown (per user, in the models folder), so it is not shown before
        every Segment; it stays one click away (*Model card*)."""
        from ReCoKDLib.utils.io import atomic_write_text

        try:
            seen = json.loads(self._cardsFile().read_text(encoding="utf-8"))
            seen = seen if isinstance(seen, list) else []
        except (OSError, ValueError):
            seen = []
        key = self._cardKey(model)
        if key not in seen:
            self._cardsFile().parent.mkdir(parents=True, exist_ok=True)
            try:
                atomic_write_text(self._cardsFile(), json.dumps(seen + [key], indent=1) + "\n")
            except Exception as exc:  # noqa: BLE001 - not remembering only means the card is shown again
                self._warn(f"could not remember that the model card was shown ({exc})")

    # -- segmentation -----------------------------------------------------------------------------
    def inputVolumes(self, parameterNode, info=None) -> list:
        """The parameter node's input volumes, channel order, up to the model's number of channels (``info``:
        the model's :meth:`modelInfo`, when the caller has it already)."""
        volumes = [parameterNode.inputVolume, parameterNode.inputVolume2, parameterNode.inputVolume3,
                   parameterNode.inputVolume4]
        count = 1
        if parameterNode.model:
            info = info if info is not None else self.modelInfo(parameterNode.model)
            count = info.numChannels if info is not None else 1
        return [v for v in volumes[:count] if v is not None]

    def segmentWithParameters(self, parameterNode, wait=False, progress=None, onFinished=None):
        """:meth:`segment` with the inputs, model, device, test-time augmentation and input-check choice of the
        parameter node (the Segment button); input-check warnings stop it for the user's answer
        (``confirmWarnings``; the panel offers *Segment anyway*, see :meth:`segmentAnyway`)."""
        if not parameterNode.model:
            raise ReCoKDError(_("select a model (or 'Load from file…')"))
        info = self.modelInfo(parameterNode.model)  # read once: labels, channels, folds
        volumes = self.inputVolumes(parameterNode, info)
        output = getattr(parameterNode, "outputSegmentation", None)  # (a node saved before the field has none)
        if output is not None and volumes and output.GetAttribute(INPUT_ATTRIBUTE) not in (None, volumes[0].GetID()):
            output = None  # ReCoKD made it for another volume: never overwrite that, start a new one
        structures = None
        skipped = list(getattr(parameterNode, "skippedStructures", None) or [])
        if skipped and info is not None and info.labels:
            structures = [n for n in info.labels.foreground_names if n not in skipped]
        allFrames = getattr(parameterNode, "allFrames", True)
        folds = (getattr(parameterNode, "nnunetFolds", "") or None) if info is not None and info.nnunetFolds else None
        result = self.segment(volumes, parameterNode.model, device=parameterNode.device,
                              tta=parameterNode.tta, force=parameterNode.skipInputChecks, confirmWarnings=True,
                              show3D=getattr(parameterNode, "show3D", True), outputSegmentation=output,
                              structures=structures, allFrames=allFrames, folds=folds,
                              fast=bool(getattr(parameterNode, "fast", False)), wait=wait, progress=progress,
                              onFinished=onFinished)
        if isinstance(result, SegmentationTask):
            result.parameterNode = parameterNode  # told the output when it is done (see SegmentationTask.poll)
        elif hasattr(parameterNode, "outputSegmentation") and not (allFrames and self.sequenceBrowserOf(volumes[0])):
            parameterNode.outputSegmentation = result
        return result

    def segmentAnyway(self, task, wait=False, progress=None, onFinished=None):
        """Run a task that stopped on input-check warnings again, without the checks (*Segment anyway*)."""
        request = dict(task.request, force=True, confirmWarnings=False)
        again = self.segment(**request, wait=wait, progress=progress, onFinished=onFinished)
        if isinstance(again, SegmentationTask):
            again.parameterNode = task.parameterNode
        elif task.parameterNode is not None and hasattr(task.parameterNode, "outputSegmentation"):
            task.parameterNode.outputSegmentation = again
        return again

    def segment(self, volumeNodes, model, device="auto", tta=False, force=False, confirmWarnings=False, show3D=True,
                outputSegmentation=None, structures=None, allFrames=True, folds=None, fast=False, wait=True,
                progress=None, onFinished=None):
        """Segment ``volumeNodes`` (one per model channel) with ``model``.

        Before the network runs, the input is checked against the model's training data (spacing, field of
        view, size, intensities: ``recokd predict``'s checks). An input the model cannot work on is refused
        in one line; the other findings are logged, the segmentation goes on, and ``task.warnings`` lists them.

        Args:
            volumeNodes: a scalar volume node or a list of them (channel order of the model).
            model: bundle path, model name (registry / models folder), or a ModelSource.
            device: ``auto`` (GPU when available, else CPU), ``cpu`` or ``cuda``.
            tta: mirror test-time augmentation along the axes the model was trained mirrored along (2^n x
                slower); a model trained without mirroring refuses it in one line. Off by default, as in the panel.
            force: skip the input checks (the panel's *Skip input checks*; ``recokd predict --force``).
            confirmWarnings: stop before the network runs when the checks find anything, with the findings in
                ``task.inputWarnings`` (``wait=True``: raised as one ReCoKDError); :meth:`segmentAnyway` goes on.
            show3D: also build the segments' closed surfaces, shown in 3D views (the panel's *Show 3D*); off,
                only the labelmap is made (faster on large results).
            outputSegmentation: a segmentation node to write into (the panel's *Output segmentation*): the
                segments this model made there before are replaced, all others kept. None: a new node
                '<volume> – <model>'. It must lie under the same transform as the input.
            structures: the names of the structures to keep (None: all). The network computes every structure
                anyway: a subset is not faster to predict, only to load (and to build 3D surfaces for).
            folds: an nnU-Net results folder as the model: the folds to ensemble (``"0"``, ``"0,1,2"``; None or
                "": every fold with a final checkpoint, as nnU-Net's predictor chooses).
            fast: run the model's fast variant instead (:meth:`fastVariant`; the panel's *Fast*); a model
                without one is refused in one line.
            allFrames: when the first volume is the proxy of a sequence (a cine loaded as a sequence, shown one
                frame at a time), segment every frame: the result is a segmentation sequence in the same
                browser, played with the images (``outputSegmentation`` does not apply; Segment again replaces
                this model's earlier sequence). Other channels that are proxies in that browser give their
                frame at the same index; any other volume is used for every frame. False: the shown frame only.
            wait: block until done and return the segmentation node (the GUI keeps processing events);
                else return a :class:`SegmentationTask` to :meth:`poll` (and ``cancel()``).
            progress: ``progress(fraction)`` called while waiting.
            onFinished: ``onFinished(task)`` called when the task ends (success, failure or cancel).

        Raises:
            ReCoKDError: a one-line reason; the scene is left unchanged.
        """
        request = dict(volumeNodes=volumeNodes, model=model, device=device, tta=tta, force=force,
                       confirmWarnings=confirmWarnings, show3D=bool(show3D), outputSegmentation=outputSegmentation,
                       structures=None if structures is None else list(structures), allFrames=bool(allFrames),
                       folds=folds, fast=bool(fast))
        _requireLibrary()
        if self.segmentationTask is not None and self.segmentationTask.state == RUNNING:
            raise ReCoKDError(_("a segmentation is already running; wait for it or cancel it"))
        if device not in DEVICES:
            raise ReCoKDError(_("device must be one of {devices}, got {device}").format(
                devices=", ".join(DEVICES), device=repr(device)))
        if volumeNodes is None:
            raise ReCoKDError(_("select an input volume"))
        if not isinstance(volumeNodes, (list, tuple)):
            volumeNodes = [volumeNodes]
        volumeNodes = [v for v in volumeNodes if v is not None]
        if not volumeNodes:
            raise ReCoKDError(_("select an input volume"))
        source = self._resolve(model)
        variant = self.fastVariant(source)
        if fast and variant is None:
            named = source.entry.get("fast") if source.kind == "registry" else None
            if named and named != source.name:
                raise ReCoKDError(_("model '{name}' names '{fast}' as its fast variant, which is not in the model list "
                                    "(see the registry's warnings); untick Fast").format(name=source.name, fast=named))
            raise ReCoKDError(_("model '{name}' has no fast variant; untick Fast").format(name=source.name))
        # a model and its fast variant are one model to the output: either replaces the other's segments there
        family = [self._nameIfKnown(s) for s in (source, variant)] if variant is not None else []  # (read only then)
        if fast:
            source = variant
        info = self.modelInfo(source)
        if info is not None and len(volumeNodes) != info.numChannels:
            raise ReCoKDError(
                _("model '{name}' needs {count} input volume(s) ({channels}) but {given} were given; select one "
                  "volume per channel").format(name=info.name, count=info.numChannels,
                                               channels=", ".join(info.channelNames), given=len(volumeNodes))
            )
        if folds:
            if info is None or not info.nnunetFolds:
                raise ReCoKDError(_("folds apply to nnU-Net results folders; '{name}' is a ReCoKD model").format(
                    name=source.name))
            try:
                models.nnunetInfo(models.localBundlePath(source), folds)
            except ValueError as exc:
                raise ReCoKDError(str(exc)) from None
        if structures is not None and info is not None and info.labels:
            _chosenStructures(info, structures)  # refused now, not after the network ran
        if outputSegmentation is not None:
            if not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
                raise ReCoKDError(_("'{name}' is not a segmentation; choose a segmentation node as the output (or "
                                    "none, for a new one)").format(name=outputSegmentation.GetName()))
            if outputSegmentation.GetParentTransformNode() is not volumeNodes[0].GetParentTransformNode():
                raise ReCoKDError(_("the output segmentation '{output}' and the input '{input}' are under different "
                                    "transforms; choose another output (or none, for a new one)").format(
                    output=outputSegmentation.GetName(), input=volumeNodes[0].GetName()))
        browser = self.sequenceBrowserOf(volumeNodes[0]) if allFrames else None
        sequence = (browser, browser.GetSequenceNode(volumeNodes[0]), self._frames(browser, volumeNodes)) if browser else None
        tmpdir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        (Path(tmpdir) / OWNER_FILE).write_text(str(os.getpid()), encoding="utf-8")  # see cleanStaleTempFolders
        try:
            inputs = self._writeInputs(volumeNodes, Path(tmpdir), frames=sequence[2] if sequence else None)
        except Exception as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ReCoKDError(str(exc)) from None
        output = Path(tmpdir) / ("frames" if sequence else "labels.nrrd")
        command = [pythonExecutable(), "-m", "ReCoKDLib.inference.slicer_bridge", "segment", "--inputs", *map(str, inputs),
                   "--output", str(output), "--device", device]
        if sequence:
            command += ["--frames", str(len(sequence[2]))]
        local = models.localBundlePath(source)
        if source.kind == "registry" and local is None:
            command += ["--registry-entry", json.dumps(source.entry), "--registry-base", source.base]
        else:
            command += ["--model", str(local)]
        if folds:
            command += ["--folds", str(folds)]
        if tta:
            command.append("--tta")
        if force:
            command.append("--force")
        elif confirmWarnings:
            command.append("--ask")
        command += ["--backend", self.backend]
        if self.debugDelay:
            command += ["--debug-delay", str(self.debugDelay)]
        job = BackgroundJob(command, env=_jobEnvironment(), name="segmentation")
        bundleInfo = info if info is not None and info.labels else None  # else read from the fetched bundle
        task = SegmentationTask(self, job, volumeNodes, bundleInfo, info.name if info else source.name, tmpdir, output,
                                onFinished=onFinished, request=request, sequence=sequence)
        task.sameModel = [n for n in family if n and n != task.modelName]
        try:
            job.start()
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ReCoKDError(_("cannot start the segmentation process ({error}); check the Python "
                                "installation").format(error=exc)) from None
        self.segmentationTask = task
        if not wait:
            return task
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while task.poll() == RUNNING:
                if progress is not None:
                    progress(task.progress)
                if deadline is not None and time.monotonic() > deadline:
                    task.cancel()
                    break
                _processEvents()
                time.sleep(0.05)
        except BaseException:  # e.g. Ctrl-C in a headless script: never leave the process running
            task.cancel()
            raise
        if task.inputWarnings:
            raise ReCoKDError(_("the input is unlike the model's training data: {findings}; segment with force=True "
                                "to go on anyway").format(findings=" ".join(task.inputWarnings)))
        if task.state != SUCCEEDED:
            raise ReCoKDError(task.message or _("segmentation failed"))
        if progress is not None:
            progress(1.0)
        log.info(task.message)
        return task.segmentationNode

    def poll(self):
        """Advance the running segmentation and training (for the GUI's timer); returns the segmentation state."""
        if self.trainingTask is not None and self.trainingTask.state == RUNNING:
            self.trainingTask.poll()
        if self.segmentationTask is None:
            return None
        return self.segmentationTask.poll()

    def cancel(self) -> None:
        """Cancel the running segmentation (kills its process tree; the scene is left as it was)."""
        if self.segmentationTask is not None:
            self.segmentationTask.cancel()

    def _writeInputs(self, volumeNodes, folder: Path, frames=None) -> list[Path]:
        """The inputs as files for the background process: ``input_0000.nrrd`` ... one per channel (of each
        frame in turn, with ``frames``), every channel on the first channel's grid."""
        from ReCoKDLib.errors import ReCoKDError as LibraryError
        from ReCoKDLib.utils.io import atomic_write_image

        first = volumeNodes[0]
        for i, node in enumerate(volumeNodes):
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ReCoKDError(_("'{name}' is not a scalar volume; select an image volume for channel "
                                    "{channel}").format(name=node.GetName(), channel=i + 1))
            if node.GetParentTransformNode() is not first.GetParentTransformNode():
                raise ReCoKDError(_("'{name}' and '{first}' are under different transforms; harden the transforms "
                                    "(Data module) first").format(name=node.GetName(), first=first.GetName()))
        paths = []
        for nodes in frames or [volumeNodes]:
            reference = None
            for i, node in enumerate(nodes):
                if not node.IsA("vtkMRMLScalarVolumeNode"):  # a frame of a sequence that holds something else
                    raise ReCoKDError(_("a frame of '{name}' is a {nodeClass}, not an image volume; segment a "
                                        "sequence of volumes").format(name=volumeNodes[i].GetName(),
                                                                      nodeClass=node.GetClassName()))
                image = geometry.volumeNodeToImage(node)
                if reference is None:
                    reference = image
                else:
                    image = geometry.imageOnVolumeGrid(image, reference)  # channels on the first volume's grid
                path = folder / f"input_{len(paths):04d}.nrrd"
                try:  # verified: a full temporary disk is one line, not a truncated input
                    atomic_write_image(image, path, use_compression=False)
                except LibraryError as exc:
                    raise ReCoKDError(str(exc)) from None
                paths.append(path)
        return paths

    # -- sequences (cine, 4D) -----------------------------------------------------------------------
    def sequenceBrowserOf(self, volume):
        """The sequence browser that shows ``volume`` as the proxy of a sequence of more than one frame (a
        cine or other time series), or None."""
        if volume is None or self.scene is None:
            return None
        for browser in nodesByClass(self.scene, "vtkMRMLSequenceBrowserNode"):
            if browser.IsProxyNodeID(volume.GetID()):
                sequence = browser.GetSequenceNode(volume)
                if sequence is not None and sequence.GetNumberOfDataNodes() > 1:
                    return browser
        return None

    def _frames(self, browser, volumeNodes) -> list:
        """Per frame of the first volume's sequence, the node of each channel at that frame's index."""
        master = browser.GetSequenceNode(volumeNodes[0])
        frames = []
        for f in range(master.GetNumberOfDataNodes()):
            index = master.GetNthIndexValue(f)
            nodes = []
            for volume in volumeNodes:
                sequence = browser.GetSequenceNode(volume) if browser.IsProxyNodeID(volume.GetID()) else None
                node = volume if sequence is None else sequence.GetDataNodeAtValue(index)
                if node is None:
                    raise ReCoKDError(_("'{name}' has no frame at {indexName} {index} where '{master}' has one; "
                                        "channels must have the same frames").format(
                        name=sequence.GetName(), indexName=master.GetIndexName(), index=index, master=master.GetName()))
                nodes.append(node)
            frames.append(nodes)
        return frames

    def _updateProxies(self, browser) -> None:
        """Show the browser's selected frame in its proxy nodes (Slicer's Sequences module logic; under
        slicer-core, a logic of the same class)."""
        modules = getattr(slicer, "modules", None)
        sequencesLogic = modules.sequences.logic() if modules is not None and hasattr(modules, "sequences") else None
        if sequencesLogic is None:
            sequencesLogic = slicer.vtkSlicerSequencesLogic()
            sequencesLogic.SetMRMLScene(self.scene)
        sequencesLogic.UpdateProxyNodesFromSequences(browser)

    def _createSegmentationSequence(self, task: SegmentationTask):
        """The frames' labels as a segmentation sequence '<sequence> – <model>' in the input's browser (so it
        plays with the images); this model's earlier sequence for the same input is replaced. Returns the
        proxy segmentation node (the frame on show); on any error the scene is left as it was."""
        browser, master, frames = task.sequence
        info = self._resultInfo(task)
        chosen = _chosenStructures(info, task.request.get("structures"))
        scene = self.scene
        volume = task.volumeNodes[0]
        earlier = []
        for node in nodesByClass(scene, "vtkMRMLSequenceNode"):
            if (browser.IsSynchronizedSequenceNodeID(node.GetID())
                    and node.GetAttribute(MODEL_TAG) in (task.modelName, *task.sameModel)
                    and node.GetAttribute(INPUT_ATTRIBUTE) == master.GetID()):
                earlier.append(node)
        name = f"{master.GetName()} – {task.modelName}"
        out = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        proxy = None
        try:
            out.SetIndexName(master.GetIndexName())
            out.SetIndexUnit(master.GetIndexUnit())
            out.SetIndexType(master.GetIndexType())
            out.SetAttribute(MODEL_TAG, task.modelName)
            out.SetAttribute(INPUT_ATTRIBUTE, master.GetID())
            for f, nodes in enumerate(frames):
                segmentationNode = slicer.vtkMRMLSegmentationNode()  # copied into the sequence, never in the scene
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(nodes[0])
                labels = self._readLabels(Path(task.output) / f"frame_{f:04d}.nrrd", nodes[0])
                self._addSegments(segmentationNode, labels, geometry.ijkToRasArray(nodes[0]), info, chosen, task.modelName)
                segmentation = segmentationNode.GetSegmentation()
                if hasattr(segmentation, "CollapseBinaryLabelmaps"):
                    segmentation.CollapseBinaryLabelmaps(False)
                if task.request.get("show3D", True) and hasattr(segmentationNode, "CreateClosedSurfaceRepresentation"):
                    segmentationNode.CreateClosedSurfaceRepresentation()
                out.SetDataNodeAtValue(segmentationNode, master.GetNthIndexValue(f))
            browser.AddSynchronizedSequenceNode(out)
            self._updateProxies(browser)
            proxy = browser.GetProxyNode(out)
            if proxy is None:
                raise ReCoKDError(_("the sequence browser '{name}' made no node to show the result").format(
                    name=browser.GetName()))
            if proxy.GetDisplayNode() is None:
                proxy.CreateDefaultDisplayNodes()
            if volume.GetParentTransformNode() is not None:
                proxy.SetAndObserveTransformNodeID(volume.GetParentTransformNode().GetID())
            self._placeInStudy(proxy, volume)
        except Exception:
            if proxy is not None:
                scene.RemoveNode(proxy)
            if browser.IsSynchronizedSequenceNodeID(out.GetID()):
                browser.RemoveSynchronizedSequenceNode(out.GetID())
            scene.RemoveNode(out)
            raise
        for node in earlier:  # only now: a failure above leaves the earlier result in place
            earlierProxy = browser.GetProxyNode(node)
            browser.RemoveSynchronizedSequenceNode(node.GetID())  # (removes the proxy it made, too)
            if earlierProxy is not None and scene.IsNodePresent(earlierProxy):
                scene.RemoveNode(earlierProxy)
            scene.RemoveNode(node)
        return proxy

    def _createSegmentationNode(self, task: SegmentationTask):
        """Write the job's labels into the chosen output node (replacing the segments this model made there
        before, keeping all others) or into a new '<volume> – <model>'; on any error the scene is left as
        it was (a new node removed, an existing one without the segments just added)."""
        volume = task.volumeNodes[0]
        labels = self._readLabels(task.output, volume)
        info = self._resultInfo(task)
        chosen = _chosenStructures(info, task.request.get("structures"))
        ijkToRas = geometry.ijkToRasArray(volume)
        scene = self.scene
        target = task.request.get("outputSegmentation")
        reuse = target is not None and scene.IsNodePresent(target)
        node = target if reuse else scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                            f"{volume.GetName()} – {task.modelName}")
        segmentation = node.GetSegmentation()
        added = []
        try:
            if not reuse:
                node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
                node.SetAttribute(INPUT_ATTRIBUTE, volume.GetID())
                if volume.GetParentTransformNode() is not None:
                    node.SetAndObserveTransformNodeID(volume.GetParentTransformNode().GetID())
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            previous = _segmentsMadeBy(segmentation, task.modelName, task.sameModel)
            self._addSegments(node, labels, ijkToRas, info, chosen, task.modelName, added)
            for segment_id in previous:  # only now: a failure above leaves the earlier result in place
                segmentation.RemoveSegment(segment_id)
            if not reuse and hasattr(segmentation, "CollapseBinaryLabelmaps"):
                # one shared labelmap for the new node; in a node of the user's, merging into layers of another
                # geometry would resample (and shift) this result, so its segments keep their own layers
                segmentation.CollapseBinaryLabelmaps(False)
            if not reuse:
                self._placeInStudy(node, volume)
            if task.request.get("show3D", True) and hasattr(node, "CreateClosedSurfaceRepresentation"):
                node.CreateClosedSurfaceRepresentation()  # shown in 3D
        except Exception:
            if reuse:
                for segment_id in added:
                    segmentation.RemoveSegment(segment_id)
            else:
                scene.RemoveNode(node)
            raise
        return node

    def _resultInfo(self, task: SegmentationTask):
        """The model's labels for building the result (a registry model's from the bundle the process fetched)."""
        if task.info is not None:
            return task.info
        if not task.job.model:
            raise ReCoKDError(_("the segmentation process did not say which model file it used"))
        return models.readBundleInfo(task.job.model)

    def _readLabels(self, path, volume):
        """The label file the process wrote, as an array on ``volume``'s voxel grid (K, J, I)."""
        import SimpleITK as sitk

        reference = geometry.volumeNodeToImage(volume)
        image = geometry.imageOnVolumeGrid(sitk.ReadImage(str(path)), reference, interpolator="nearest")
        return sitk.GetArrayFromImage(image)

    def _addSegments(self, node, labels, ijkToRas, info, chosen, modelName, added=None) -> list:
        """One segment per chosen structure (name, colour, terminology, tagged with the model); the IDs are
        appended to ``added`` as they are made, so that a caller can undo a partial result."""
        import numpy as np

        added = [] if added is None else added
        segmentation = node.GetSegmentation()
        for name, value in info.labels.foreground():
            if name not in chosen:
                continue
            image = geometry.orientedImageFromArray((labels == value).astype(np.uint8), ijkToRas)
            segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(image, name, list(info.labels.colors[name]))
            if not segment_id:
                raise ReCoKDError(_("could not add segment {name}").format(name=name))
            added.append(segment_id)
            segment = segmentation.GetSegment(segment_id)
            segment.SetTag(MODEL_TAG, _tagValue(modelName))
            codes = info.labels.terminology.get(name)
            if codes:
                segment.SetTag(segment.GetTerminologyEntryTagName(), terminology.entryString(codes))
        return added

    def _placeInStudy(self, node, volume) -> None:
        shClass = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
        if shClass is None:
            return
        sh = shClass.GetSubjectHierarchyNode(self.scene)
        if sh is None:
            return
        volumeItem = sh.GetItemByDataNode(volume)
        if not volumeItem:
            return
        parent = sh.GetItemParent(volumeItem)
        if not parent or parent == sh.GetSceneItemID():
            return
        nodeItem = sh.GetItemByDataNode(node)
        if nodeItem:
            sh.SetItemParent(nodeItem, parent)
        else:  # without Slicer's subject-hierarchy plugins (slicer-core) nodes get no item automatically
            sh.CreateItem(parent, node)

    def loadSample(self):
        """The sample volume (*ReCoKD phantom*) in the scene, as Sample Data loads it."""
        path = samplePhantomPath()
        inSlicer = hasattr(getattr(slicer, "app", None), "ioManager")
        node = slicer.util.loadVolume(str(path)) if inSlicer else _loadVolumeNoGui(self.scene, path)
        node.SetName(SAMPLE_NAME)
        return node

    # -- training ---------------------------------------------------------------------------------
    def _startTraining(self, role, arguments, outputFolder, epochs, wait, progress, onFinished, followUp=None):
        _requireLibrary()
        if self.trainingTask is not None and self.trainingTask.state == RUNNING:
            raise ReCoKDError(_("a training is already running; stop it first"))
        arguments = [str(a) for a in arguments]
        command = [pythonExecutable(), "-m", "ReCoKDLib.cli", *arguments, "--no-progress"]
        job = BackgroundJob(command, env=_jobEnvironment(), name=f"{role} training", onLine=self.onTrainingLine)
        task = TrainingTask(self, job, role, outputFolder, epochs, arguments, onFinished=onFinished, followUp=followUp)
        try:
            job.start()
        except OSError as exc:
            raise ReCoKDError(_("cannot start the training process ({error})").format(error=exc)) from None
        self.trainingTask = task
        return self.waitForTraining(progress) if wait else task

    def waitForTraining(self, progress=None):
        """Block (processing GUI events) until the training, and any step it chains to, has ended."""
        task = self.trainingTask
        try:
            while True:
                task = self.trainingTask
                if task.poll() == RUNNING or self.trainingTask is not task:
                    if progress is not None:
                        progress(self.trainingTask)
                    _processEvents()
                    time.sleep(0.2)
                    continue
                break
        except BaseException:  # e.g. Ctrl-C: stop the run (it keeps its last checkpoint)
            self.trainingTask.stop()
            raise
        if task.state != SUCCEEDED:
            raise ReCoKDError(task.message or _("training failed"))
        return task

    def trainTeacher(self, datasetFolder, outputFolder, epochs=50, device="auto", resume=False, extraArgs=(),
                     wait=True, progress=None, onFinished=None, followUp=None):
        """``recokd train DATASET -o OUTPUT`` in the background; returns the finished (or running) task."""
        args = ["train", datasetFolder, "-o", outputFolder, "--epochs", int(epochs), "--device", device, *extraArgs]
        if resume:
            args.append("--resume")
        return self._startTraining("teacher", args, outputFolder, epochs, wait, progress, onFinished, followUp)

    def distill(self, datasetFolder, teacher, method="auto", widthFactor=4, epochs=50, outputFolder=None,
                device="auto", resume=False, extraArgs=(), wait=True, progress=None, onFinished=None,
                teacherFolds=None, unlabeledFolders=()):
        """``recokd distill`` in the background, then ``recokd export`` of the student into the models folder.

        Args:
            datasetFolder: nnU-Net or MSD dataset folder (holds dataset.json).
            teacher: teacher run folder (from :meth:`trainTeacher` / ``recokd train``), or an nnU-Net v2
                results folder (its plans then preprocess the data).
            teacherFolds: nnU-Net teacher only: folds to ensemble, e.g. ``"0"``, ``"0,1,2,3,4"`` or ``"every"``
                (default: fold 0, as ``recokd distill``; the Training panel's *Teacher folds*)
            method: KD method: ``auto`` (the default of ``recokd distill``: ReCo-KD, or ``none`` -- the teacher's
                labels alone -- with unlabeled scans, which ReCo-KD's terms did not improve on; docs/results.md),
                ``recokd`` or a baseline.
            widthFactor: student channels = teacher's / R.
            outputFolder: run folder (default ``<runs folder>/<dataset>/student_<method>``).
            unlabeledFolders: folders of scans without labels (``recokd distill --unlabeled``): the teacher
                labels each once and they join the training (a clinic's own scans).
        """
        if method not in KD_METHODS:
            raise ReCoKDError(_("KD method must be one of {methods}, got {method}").format(
                methods=", ".join(KD_METHODS), method=repr(method)))
        if method == "auto":  # the library's defaults, by what the evidence supports (ReCoKDLib.kd_methods)
            from ReCoKDLib.kd_methods import DEFAULT_METHOD, DEFAULT_METHOD_WITH_TEACHER_LABELS

            method = DEFAULT_METHOD_WITH_TEACHER_LABELS if unlabeledFolders else DEFAULT_METHOD
        if not resume and not teacher:
            raise ReCoKDError(_("select a teacher run, or train a teacher first"))
        outputFolder = outputFolder or str(self.runsFolder / Path(datasetFolder).name / f"student_{method}")
        args = ["distill", datasetFolder, "-o", outputFolder, "--method", method, "--width-factor", float(widthFactor),
                "--epochs", int(epochs), "--device", device, *extraArgs]
        if teacher:
            args += ["--teacher", teacher]
        if teacherFolds:
            args += ["--teacher-folds", str(teacherFolds)]
        if isinstance(unlabeledFolders, (str, Path)):
            unlabeledFolders = [unlabeledFolders]
        for folder in unlabeledFolders or ():
            if not Path(folder).is_dir():
                raise ReCoKDError(_("unlabeled scans folder {folder} does not exist; select a folder of images").format(
                    folder=folder))
        if unlabeledFolders and not resume:
            args += ["--unlabeled", *map(str, unlabeledFolders)]
        if resume:
            args.append("--resume")
        return self._startTraining("student", args, outputFolder, epochs, wait, progress, onFinished)

    def trainWithParameters(self, parameterNode, wait=False, progress=None, onFinished=None, extraArgs=()):
        """The Start button: distil a student from the parameter node's dataset, teacher, method, R, epochs
        and unlabelled scans; with *Train a teacher first*, train the teacher, then distil from it."""
        p = parameterNode
        dataset = (p.datasetFolder or "").strip()
        if not dataset:
            raise ReCoKDError(_("select a dataset folder (nnU-Net or MSD layout, holding dataset.json)"))
        if not (Path(dataset) / "dataset.json").is_file():
            raise ReCoKDError(_("{dataset} holds no dataset.json; select a dataset folder in nnU-Net or MSD "
                                "layout").format(dataset=dataset))
        teacher = (p.teacherPath or "").strip()
        if not p.trainTeacherFirst and not teacher:
            raise ReCoKDError(_("select a teacher run folder, or tick 'Train a teacher first'"))
        if not p.trainTeacherFirst and not ((Path(teacher) / "run.json").is_file() or is_nnunet_folder(teacher)):
            raise ReCoKDError(_("{teacher} is neither a training run folder (no run.json) nor an nnU-Net v2 "
                                "results folder; select a `recokd train` run or an nnU-Net model "
                                "folder").format(teacher=teacher))
        method, width, epochs = p.kdMethod, float(p.widthFactor), int(p.epochs)
        extraArgs = [*self.extraTrainingArgs, *extraArgs]
        output = (p.outputFolder or "").strip() or str(self.runsFolder / Path(dataset).name / f"student_{method}")
        device = p.device
        folder = (getattr(p, "unlabeledFolder", "") or "").strip()  # (a node saved before the field existed)
        unlabeled = [folder] if folder else []
        teacherFolds = (getattr(p, "teacherFolds", "") or "").strip() or None  # (a node saved before the field)
        if teacherFolds and (p.trainTeacherFirst or not is_nnunet_folder(teacher)):
            raise ReCoKDError(_("teacher folds apply to nnU-Net teachers; clear Teacher folds, or choose an nnU-Net "
                                "results folder as the teacher"))
        if unlabeled and not Path(unlabeled[0]).is_dir():
            raise ReCoKDError(_("unlabeled scans folder {folder} does not exist; select a folder of images").format(
                folder=unlabeled[0]))

        def distil(teacherTask=None):
            return self.distill(dataset, str(teacherTask.outputFolder) if teacherTask else teacher, method=method,
                                widthFactor=width, epochs=epochs, outputFolder=output, device=device,
                                extraArgs=extraArgs, wait=False, onFinished=onFinished, unlabeledFolders=unlabeled,
                                teacherFolds=teacherFolds)

        if not p.trainTeacherFirst:
            task = distil()
            return self.waitForTraining(progress) if wait else task
        teacherOutput = str(Path(output).parent / f"{Path(output).name}_teacher")
        task = self.trainTeacher(dataset, teacherOutput, epochs=epochs, device=device,
                                 extraArgs=[*extraArgs, *self.extraTeacherArgs],
                                 wait=False, onFinished=onFinished, followUp=distil)
        return self.waitForTraining(progress) if wait else task

    def stopTraining(self) -> None:
        if self.trainingTask is not None:
            self.trainingTask.stop()

    def resumeTraining(self, wait=False, progress=None, onFinished=None):
        """Restart the last training with ``--resume`` (continues from its latest checkpoint)."""
        task = self.trainingTask
        if task is None:
            raise ReCoKDError(_("there is no training to resume"))
        if task.state == RUNNING:
            raise ReCoKDError(_("the training is still running"))
        args = [a for a in task.arguments if a != "--resume"] + ["--resume"]
        self.trainingTask = None
        return self._startTraining(task.role, args, task.outputFolder, task.epochs, wait, progress,
                                   onFinished or task.onFinished, task.followUp)

    def plotTrainingHistory(self, history=None):
        """Loss terms and validation Dice per epoch (from ``log.csv``) as a Slicer plot: one table node,
        one series per column, one chart (nodes reused on each call). Returns the chart node or None."""
        if history is None:
            history = self.trainingTask.history if self.trainingTask is not None else []
        if not history:
            return None
        keys = [k for k in history[0] if k.startswith("loss_") or k.startswith("dice_")]
        if not keys:
            return None
        scene = self.scene
        table, chart = self._plotNodes.get("table"), self._plotNodes.get("chart")
        created = False
        if table is None or chart is None or not scene.IsNodePresent(table) or not scene.IsNodePresent(chart):
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", "ReCoKD training log")
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "ReCoKD training")
            chart.SetXAxisTitle(_("epoch"))
            chart.SetYAxisTitle(_("loss / validation Dice"))
            self._plotNodes = {"table": table, "chart": chart, "series": {}}
            created = True
        vtkTable = table.GetTable()
        vtkTable.Initialize()
        for column in ["epoch", *keys]:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            for i, row in enumerate(history):
                value = row.get(column, i + 1) if column == "epoch" else row.get(column)
                array.InsertNextValue(value if isinstance(value, float) else float("nan"))
            vtkTable.AddColumn(array)
        table.Modified()
        for key in keys:
            series = self._plotNodes["series"].get(key)
            if series is None or not scene.IsNodePresent(series):
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", key)
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName("epoch")
                series.SetYColumnName(key)
                series.SetPlotType(series.PlotTypeScatter)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
                self._plotNodes["series"][key] = series
        if created and hasattr(getattr(slicer, "modules", None), "plots"):
            slicer.modules.plots.logic().ShowChartInLayout(chart)  # once: never pull the user's layout away again
        return chart


def _loadVolumeNoGui(scene, path: Path):
    """Load a volume file into ``scene`` without Slicer's IO manager (slicer-core)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    from ReCoKDLib.utils.geometry import ImageGeometry

    ijkToRas = ImageGeometry.of(image).ijk_to_ras()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    try:
        return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=ijkToRas, name=path.stem)
    finally:
        if previous is not None:
            slicer.mrmlScene = previous
