"""ReCoKD: segment volumes with distilled students and train them, in 3D Slicer.

Module, Widget, Logic and Test classes following Slicer's scripted-module template. The Logic is
free of Qt: it runs in Slicer's Python console, in ``Slicer --no-main-window --python-script`` and,
for the test suite, under plain Python with the ``slicer-core`` package (where ``qt``, ``ctk`` and
``slicer.ScriptedLoadableModule`` are absent, so this file falls back to plain base classes).

All heavy work (PyTorch) happens in a background process, ``<Slicer's python> -m
ReCoKDLib.slicer_bridge``, which reports progress line by line; the GUI polls it from a timer, so it
never freezes, and Cancel kills the whole process tree.

Console example::

    logic = slicer.util.getModuleLogic("ReCoKD")          # or ReCoKD.ReCoKDLogic()
    seg = logic.segment([slicer.util.getNode("MRHead")], "/path/model.recokd", device="auto", fast=True)
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import unittest
from pathlib import Path

import slicer

try:  # inside the Slicer application
    import ctk  # noqa: F401 - the .ui's ctk widgets need it loaded
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_SLICER_GUI = True
except ImportError:  # plain Python with slicer-core: the Logic works, the Widget is never built
    HAVE_SLICER_GUI = False

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

try:
    from slicer.parameterNodeWrapper import parameterNodeWrapper
except ImportError:  # Slicer < 5.2 or slicer-core: no typed parameter node
    parameterNodeWrapper = None

# the module's folder holds ReCoKDSlicer/ and, once installed, ReCoKDLib/
_MODULE_DIR = Path(__file__).resolve().parent
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

from ReCoKDSlicer import geometry, models  # noqa: E402
from ReCoKDSlicer.jobs import FAILED, RUNNING, SUCCEEDED, BackgroundJob  # noqa: E402

log = logging.getLogger("ReCoKD")

# the choices of `recokd distill --method` (kept in sync by Testing/test_slicer_module.py; no torch import here)
KD_METHODS = ("recokd", "recokd-gc", "none", "msard", "msca", "logit", "fitnet", "cwd", "skd")
DEVICES = ("auto", "cpu", "cuda")


class ReCoKDError(RuntimeError):
    """A one-line message for the user (wrong inputs, failed or cancelled job)."""


def _libraryRoot() -> Path:
    """The folder that holds the ``ReCoKDLib`` package (the module folder once installed, the source tree otherwise)."""
    import ReCoKDLib

    return Path(ReCoKDLib.__file__).resolve().parent.parent


def pythonExecutable() -> str:
    """The Python that runs background jobs: Slicer's ``PythonSlicer`` inside Slicer, else this interpreter."""
    if HAVE_SLICER_GUI:
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


#
# Module
#


class ReCoKD(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        if parent is None:
            return
        self.parent.title = "ReCoKD"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ReCoKD contributors"]
        self.parent.helpText = (
            "Segment volumes with compact students distilled by ReCo-KD (region- and context-aware knowledge "
            "distillation), and train new ones. The network runs in a background process: the GUI stays "
            "responsive, progress is shown and Cancel stops it at once."
        )
        self.parent.acknowledgementText = (
            "ReCo-KD follows Lan et al., arXiv 2601.08301. Built on MONAI and PyTorch."
        )


#
# Parameter node
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class ReCoKDParameterNode:
        inputVolume: slicer.vtkMRMLScalarVolumeNode
        inputVolume2: slicer.vtkMRMLScalarVolumeNode
        inputVolume3: slicer.vtkMRMLScalarVolumeNode
        inputVolume4: slicer.vtkMRMLScalarVolumeNode
        device: str = "auto"
        fast: bool = True
        datasetFolder: Path
        teacherPath: Path
        trainTeacherFirst: bool = False
        kdMethod: str = "recokd"
        widthFactor: float = 4.0
        epochs: int = 50
        outputFolder: Path
else:
    ReCoKDParameterNode = None


#
# Logic
#


class SegmentationTask:
    """A running segmentation: the background job plus what is needed to build the result node."""

    def __init__(self, logic, job, volumeNodes, info, modelName, tmpdir, output, onFinished=None):
        self.logic = logic
        self.job = job
        self.volumeNodes = volumeNodes
        self.info = info
        self.modelName = modelName
        self.tmpdir = tmpdir
        self.output = output
        self.onFinished = onFinished
        self.segmentationNode = None
        self.message = ""

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
        if state == SUCCEEDED:
            try:
                self.segmentationNode = self.logic._createSegmentationNode(self)
                self.message = (f"'{self.segmentationNode.GetName()}' done in {self.job.elapsed:.1f} s "
                                f"on {self.job.device or 'unknown device'}")
                self.segmentationNode.SetAttribute("ReCoKD.device", self.job.device or "")
                self.segmentationNode.SetAttribute("ReCoKD.seconds", f"{self.job.elapsed:.2f}")
                self.segmentationNode.SetAttribute("ReCoKD.model", self.modelName)
            except Exception as exc:  # noqa: BLE001 - the scene is left as it was
                if self.segmentationNode is not None:
                    self.logic.scene.RemoveNode(self.segmentationNode)
                    self.segmentationNode = None
                self.job.state = FAILED
                self.job.error = f"could not load the result: {exc}"
        if self.job.finished:
            if self.job.state != SUCCEEDED:
                self.message = self.job.error
            self.logic.lastMessage = self.message
            self._cleanup()
            if self.onFinished is not None:
                self.onFinished(self)
        return self.job.state

    def cancel(self) -> None:
        if self.job.finished:
            return
        self.job.cancel()
        self.message = self.logic.lastMessage = "segmentation cancelled; nothing was added to the scene"
        self._cleanup()
        if self.onFinished is not None:
            self.onFinished(self)

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.logic.segmentationTask is self:
            self.logic.segmentationTask = None


class TrainingTask:
    """A running ``recokd train`` / ``distill``: progress from the run folder's ``log.csv``, then export."""

    def __init__(self, logic, job, role, outputFolder, epochs, command, onFinished=None):
        self.logic = logic
        self.job = job
        self.role = role
        self.outputFolder = Path(outputFolder)
        self.epochs = int(epochs)
        self.command = command
        self.onFinished = onFinished
        self.history: list[dict] = []
        self.bundlePath = None  # Path of the exported student bundle
        self.message = ""
        self._exportJob = None

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
        import csv

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
            self.message = "training finished" if state == SUCCEEDED else self.job.error
            if self.onFinished is not None:
                self.onFinished(self)
        return self.state

    def _startExport(self) -> None:
        folder = Path(self.logic.modelsFolder)
        folder.mkdir(parents=True, exist_ok=True)
        self.bundlePath = folder / f"{self.outputFolder.name}.recokd"
        command = [pythonExecutable(), "-m", "ReCoKDLib.slicer_bridge", "cli", "export", str(self.outputFolder),
                   "-o", str(self.bundlePath)]
        self._exportJob = BackgroundJob(command, env=_jobEnvironment(), name="export").start()

    def _finishExport(self) -> None:
        if self._exportJob.state == SUCCEEDED:
            self.message = f"training finished; student bundle {self.bundlePath} added to the model list"
        else:
            self.job.state = FAILED
            self.job.error = self.message = f"training finished but the export failed: {self._exportJob.error}"
            self.bundlePath = None
        if self.onFinished is not None:
            self.onFinished(self)

    def stop(self) -> None:
        """Stop now (the run keeps its last epoch checkpoint; :meth:`ReCoKDLogic.resumeTraining` continues it)."""
        if self._exportJob is not None:
            self._exportJob.cancel()
        self.job.cancel()
        self.message = "training stopped; Resume continues from the last finished epoch"


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
        registries: model registry files to list (default ``$RECOKD_REGISTRY`` when set).
    """

    def __init__(self, scene=None, modelsFolder=None, registries=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        self.modelsFolder = Path(modelsFolder) if modelsFolder else models.defaultModelsFolder()
        if registries is None:
            registries = [os.environ["RECOKD_REGISTRY"]] if os.environ.get("RECOKD_REGISTRY") else []
        self.registries = [Path(r) for r in registries]
        self.warnings: list[str] = []
        self.lastMessage = ""  # the last segmentation's outcome: elapsed time and device, or the error
        self.segmentationTask = None
        self.trainingTask = None
        self.debugDelay = 0.0  # seconds per sliding window; test hook only
        self.timeout = None  # seconds; wait=True cancels after it

    def getParameterNode(self):
        if ReCoKDParameterNode is None:
            return None
        return ReCoKDParameterNode(super().getParameterNode())

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
        sources += models.scanModelsFolder(self.modelsFolder)
        return sources

    def _resolve(self, model):
        """A :class:`~ReCoKDSlicer.models.ModelSource` for a path, a model name or a source."""
        if isinstance(model, models.ModelSource):
            return model
        path = Path(str(model)).expanduser()
        if path.exists():
            return models.ModelSource(name=path.stem if path.is_file() else path.name, kind="file", path=str(path))
        for source in self.availableModels():
            if source.name == str(model):
                return source
        raise ReCoKDError(f"model {model} is neither a file nor a known model name; use 'Load from file…' or check the registry")

    def modelInfo(self, model):
        """Labels, colours and channel names of a local model (None for a registry model not fetched yet)."""
        source = self._resolve(model)
        if source.kind != "file":
            return None
        try:
            return models.readBundleInfo(source.path)
        except ValueError as exc:
            raise ReCoKDError(str(exc)) from None

    # -- segmentation -----------------------------------------------------------------------------
    def segment(self, volumeNodes, model, device="auto", fast=False, wait=True, progress=None, onFinished=None):
        """Segment ``volumeNodes`` (one per model channel) with ``model``.

        Args:
            volumeNodes: a scalar volume node or a list of them (channel order of the model).
            model: bundle path, model name (registry / models folder), or a ModelSource.
            device: ``auto`` (GPU when available, else CPU), ``cpu`` or ``cuda``.
            fast: no test-time augmentation (about 8x faster).
            wait: block until done and return the segmentation node; else return a
                :class:`SegmentationTask` to :meth:`poll` (and ``cancel()``).
            progress: ``progress(fraction)`` called while waiting.
            onFinished: ``onFinished(task)`` called when the task ends (success, failure or cancel).

        Raises:
            ReCoKDError: a one-line reason; the scene is left unchanged.
        """
        if self.segmentationTask is not None and self.segmentationTask.state == RUNNING:
            raise ReCoKDError("a segmentation is already running; wait for it or cancel it")
        if device not in DEVICES:
            raise ReCoKDError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if volumeNodes is None:
            raise ReCoKDError("select an input volume")
        if not isinstance(volumeNodes, (list, tuple)):
            volumeNodes = [volumeNodes]
        volumeNodes = [v for v in volumeNodes if v is not None]
        if not volumeNodes:
            raise ReCoKDError("select an input volume")
        source = self._resolve(model)
        info = self.modelInfo(source)
        if info is not None and len(volumeNodes) != info.numChannels:
            raise ReCoKDError(
                f"model '{info.name}' needs {info.numChannels} input volume(s) ({', '.join(info.channelNames)}) "
                f"but {len(volumeNodes)} were given; select one volume per channel"
            )
        tmpdir = tempfile.mkdtemp(prefix="ReCoKD-")
        try:
            inputs = self._writeInputs(volumeNodes, Path(tmpdir))
        except Exception as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ReCoKDError(str(exc)) from None
        output = Path(tmpdir) / "labels.nrrd"
        command = [pythonExecutable(), "-m", "ReCoKDLib.slicer_bridge", "segment", "--inputs", *map(str, inputs),
                   "--output", str(output), "--device", device]
        if source.kind == "registry":
            command += ["--registry-entry", json.dumps(source.entry), "--registry-base", source.base]
        else:
            command += ["--model", source.path]
        if not fast:
            command.append("--tta")
        if self.debugDelay:
            command += ["--debug-delay", str(self.debugDelay)]
        job = BackgroundJob(command, env=_jobEnvironment(), name="segmentation")
        task = SegmentationTask(self, job, volumeNodes, info, info.name if info else source.name, tmpdir, output,
                                onFinished=onFinished)
        try:
            job.start()
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ReCoKDError(f"cannot start the segmentation process ({exc}); check the Python installation") from None
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
                time.sleep(0.1)
        except BaseException:  # e.g. Ctrl-C in a headless script: never leave the process running
            task.cancel()
            raise
        if task.state != SUCCEEDED:
            raise ReCoKDError(task.message or "segmentation failed")
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

    def _writeInputs(self, volumeNodes, folder: Path) -> list[Path]:
        import SimpleITK as sitk

        reference = None
        paths = []
        for i, node in enumerate(volumeNodes):
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ReCoKDError(f"'{node.GetName()}' is not a scalar volume; select an image volume for channel {i}")
            if node.GetParentTransformNode() is not None and i > 0 and volumeNodes[0].GetParentTransformNode() != node.GetParentTransformNode():
                raise ReCoKDError(f"'{node.GetName()}' is under a different transform than '{volumeNodes[0].GetName()}'; harden the transforms first")
            image = geometry.volumeNodeToImage(node)
            if reference is None:
                reference = image
            else:
                image = geometry.imageOnVolumeGrid(image, reference)  # channels on the first volume's grid
            path = folder / f"input_{i:04d}.nrrd"
            sitk.WriteImage(image, str(path), useCompression=False)
            paths.append(path)
        return paths

    def _createSegmentationNode(self, task: SegmentationTask):
        """Build '<volume> – <model>' from the job's label file; on any error nothing stays in the scene."""
        import numpy as np
        import SimpleITK as sitk

        volume = task.volumeNodes[0]
        reference = geometry.volumeNodeToImage(volume)
        label_image = geometry.imageOnVolumeGrid(sitk.ReadImage(str(task.output)), reference, interpolator="nearest")
        labels = sitk.GetArrayFromImage(label_image)
        info = task.info or models.readBundleInfo(self._cachedBundle(task))
        ijkToRas = geometry.ijkToRasArray(volume)
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} – {task.modelName}")
        try:
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            if volume.GetParentTransformNode() is not None:
                node.SetAndObserveTransformNodeID(volume.GetParentTransformNode().GetID())
            node.CreateDefaultDisplayNodes()
            segmentation = node.GetSegmentation()
            for name, value in sorted(info.labels.items(), key=lambda kv: kv[1]):
                if value == 0 or name == "ignore":
                    continue
                mask = (labels == value).astype(np.uint8)
                image = geometry.orientedImageFromArray(mask, ijkToRas)
                segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(image, name, list(info.colors[name]))
                if not segment_id:
                    raise ReCoKDError(f"could not add segment {name}")
            if hasattr(segmentation, "CollapseBinaryLabelmaps"):
                segmentation.CollapseBinaryLabelmaps(False)
            self._placeInStudy(node, volume)
            if HAVE_SLICER_GUI and hasattr(node, "CreateClosedSurfaceRepresentation"):
                node.CreateClosedSurfaceRepresentation()  # shown in 3D
        except Exception:
            scene.RemoveNode(node)
            raise
        return node

    def _cachedBundle(self, task) -> Path:
        # a registry model: the background process fetched it into the cache under <name>-<sha[:12]>.recokd
        source = self._resolve(task.modelName)
        from ReCoKDLib.model_registry import default_cache_dir

        return default_cache_dir() / f"{source.entry['name']}-{source.entry['sha256'][:12]}.recokd"

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

    # -- training ---------------------------------------------------------------------------------
    def _startTraining(self, role, arguments, outputFolder, epochs, wait, progress, onFinished):
        if self.trainingTask is not None and self.trainingTask.state == RUNNING:
            raise ReCoKDError("a training is already running; stop it first")
        command = [pythonExecutable(), "-m", "ReCoKDLib.slicer_bridge", "cli", *map(str, arguments), "--no-progress"]
        job = BackgroundJob(command, env=_jobEnvironment(), name=f"{role} training")
        task = TrainingTask(self, job, role, outputFolder, epochs, command, onFinished=onFinished)
        try:
            job.start()
        except OSError as exc:
            raise ReCoKDError(f"cannot start the training process ({exc})") from None
        self.trainingTask = task
        if not wait:
            return task
        try:
            while task.poll() == RUNNING:
                if progress is not None:
                    progress(task)
                time.sleep(0.5)
        except BaseException:  # e.g. Ctrl-C: stop the run (it keeps its last checkpoint)
            task.stop()
            raise
        if task.state != SUCCEEDED:
            raise ReCoKDError(task.message or "training failed")
        return task

    def trainTeacher(self, datasetFolder, outputFolder, epochs=50, device="auto", resume=False, extraArgs=(),
                     wait=True, progress=None, onFinished=None):
        """``recokd train DATASET -o OUTPUT`` in the background; returns the finished (or running) task."""
        args = ["train", datasetFolder, "-o", outputFolder, "--epochs", int(epochs), "--device", device, *extraArgs]
        if resume:
            args.append("--resume")
        return self._startTraining("teacher", args, outputFolder, epochs, wait, progress, onFinished)

    def distill(self, datasetFolder, teacher, method="recokd", widthFactor=4, epochs=50, outputFolder=None,
                device="auto", resume=False, extraArgs=(), wait=True, progress=None, onFinished=None):
        """``recokd distill`` in the background, then ``recokd export`` of the student into the models folder.

        Args:
            datasetFolder: nnU-Net or MSD dataset folder (holds dataset.json).
            teacher: teacher run folder (from :meth:`trainTeacher` / ``recokd train``).
            method: KD method (``recokd`` default; baselines selectable).
            widthFactor: student channels = teacher's / R.
            outputFolder: run folder (default ``<dataset>/runs/student_<method>``).
        """
        if method not in KD_METHODS:
            raise ReCoKDError(f"KD method must be one of {', '.join(KD_METHODS)}, got {method!r}")
        if not resume and not teacher:
            raise ReCoKDError("select a teacher run, or train a teacher first")
        outputFolder = outputFolder or str(Path(datasetFolder) / "runs" / f"student_{method}")
        args = ["distill", datasetFolder, "-o", outputFolder, "--method", method, "--width-factor", float(widthFactor),
                "--epochs", int(epochs), "--device", device, *extraArgs]
        if teacher:
            args += ["--teacher", teacher]
        if resume:
            args.append("--resume")
        return self._startTraining("student", args, outputFolder, epochs, wait, progress, onFinished)

    def stopTraining(self) -> None:
        if self.trainingTask is not None:
            self.trainingTask.stop()

    def resumeTraining(self, wait=False, progress=None, onFinished=None):
        """Restart the last training with ``--resume`` (continues from its latest checkpoint)."""
        task = self.trainingTask
        if task is None:
            raise ReCoKDError("there is no training to resume")
        if task.state == RUNNING:
            raise ReCoKDError("the training is still running")
        args = [a for a in task.command[task.command.index("cli") + 1:] if a not in ("--resume", "--no-progress")]
        args.append("--resume")
        self.trainingTask = None
        return self._startTraining(task.role, args, task.outputFolder, task.epochs, wait, progress, onFinished)


#
# Widget
#


class ReCoKDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: a Segment panel and a Training panel (layout in Resources/UI/ReCoKD.ui)."""

    LOAD_FROM_FILE = "Load from file…"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._timer = None
        self._modelSources = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ReCoKD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ReCoKDLogic()

        self.ui.deviceComboBox.addItems(list(DEVICES))
        self.ui.kdMethodComboBox.addItems(list(KD_METHODS))
        self.ui.segmentProgressBar.setVisible(False)
        self.ui.trainingProgressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.ui.resumeTrainingButton.connect("clicked(bool)", self.onResumeTraining)

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        if self.logic is not None:
            self.logic.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    # -- parameter node ---------------------------------------------------------------------------
    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None and hasattr(self._parameterNode, "disconnectGui"):
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.exit()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = self.logic.getParameterNode()
        if parameterNode is None:
            return
        if not parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                parameterNode.inputVolume = first
        self._parameterNode = parameterNode
        self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)

    # -- models -----------------------------------------------------------------------------------
    def refreshModels(self, _=None):
        self._modelSources = self.logic.availableModels()
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for source in self._modelSources:
            combo.addItem(source.label)
        combo.addItem(self.LOAD_FROM_FILE)
        combo.blockSignals(False)
        if self.logic.warnings:
            self.ui.statusLabel.text = f"{len(self.logic.warnings)} model entr(y/ies) skipped; see the Python console"
        self.onModelChanged(combo.currentIndex)

    def onModelChanged(self, index):
        if index == len(self._modelSources):  # Load from file…
            path = qt.QFileDialog.getOpenFileName(self.parent, "Load a ReCoKD model", "", "ReCoKD bundles (*.recokd *.zip)")
            if path:
                self._modelSources.append(models.ModelSource(name=Path(path).stem, kind="file", path=path))
                self.ui.modelComboBox.insertItem(index, self._modelSources[-1].label)
                self.ui.modelComboBox.setCurrentIndex(index)
            return
        self._updateChannelSelectors()

    def _currentModel(self):
        index = self.ui.modelComboBox.currentIndex
        return self._modelSources[index] if 0 <= index < len(self._modelSources) else None

    def _updateChannelSelectors(self):
        source = self._currentModel()
        info = None
        if source is not None:
            try:
                info = self.logic.modelInfo(source)
            except ReCoKDError as exc:
                self.ui.statusLabel.text = str(exc)
        channels = info.channelNames if info else ["image"]
        selectors = self._volumeSelectors()
        for i, selector in enumerate(selectors):
            selector.setVisible(i < len(channels))
            selector.setToolTip(channels[i] if i < len(channels) else "")
        self.ui.modelInfoLabel.text = (f"{info.name}: {len(info.labels) - 1} structures, "
                                       f"{info.numChannels} channel(s)") if info else ""

    def _volumeSelectors(self):
        return [self.ui.inputVolumeSelector, self.ui.inputVolumeSelector2, self.ui.inputVolumeSelector3,
                self.ui.inputVolumeSelector4]

    # -- segment ----------------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        from ReCoKDSlicer import dependencies

        if not dependencies.missingDependencies():
            return True
        with slicer.util.tryWithErrorDisplay("Failed to install the Python packages ReCoKD needs.", waitCursor=True):
            dependencies.installDependencies(confirm=slicer.util.confirmOkCancelDisplay)
        return not dependencies.missingDependencies()  # the context manager showed any error

    def onSegmentButton(self):
        task = self.logic.segmentationTask
        if task is not None and task.state == RUNNING:
            self.logic.cancel()
            return
        if not self._ensureDependencies():
            return
        source = self._currentModel()
        if source is None:
            slicer.util.errorDisplay("Select a model (or 'Load from file…').")
            return
        volumes = [s.currentNode() for s in self._volumeSelectors() if s.visible and s.currentNode()]
        try:
            self.logic.segment(volumes, source, device=self.ui.deviceComboBox.currentText,
                               fast=self.ui.fastCheckBox.checked, wait=False, onFinished=self.onSegmentFinished)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.segmentButton.text = "Cancel"
        self.ui.segmentProgressBar.setValue(0)
        self.ui.segmentProgressBar.setVisible(True)
        self.ui.statusLabel.text = "Segmenting…"
        self._timer.start()

    def onSegmentFinished(self, task):
        self.ui.segmentButton.text = "Segment"
        self.ui.segmentProgressBar.setVisible(False)
        self.ui.statusLabel.text = task.message
        if task.segmentationNode is not None:
            slicer.util.setSliceViewerLayers(background=task.volumeNodes[0])
        elif task.state == FAILED:
            slicer.util.errorDisplay(task.message)

    # -- training ---------------------------------------------------------------------------------
    def onStartTraining(self, _checked=False):
        if not self._ensureDependencies():
            return
        dataset = self.ui.datasetPathLineEdit.currentPath
        teacher = self.ui.teacherPathLineEdit.currentPath
        output = self.ui.outputPathLineEdit.currentPath or None
        epochs = int(self.ui.epochsSpinBox.value)
        self.ui.logTextEdit.clear()
        try:
            if self.ui.trainTeacherCheckBox.checked:
                task = self.logic.trainTeacher(dataset, output or str(Path(dataset) / "runs" / "teacher"), epochs=epochs,
                                               device=self.ui.deviceComboBox.currentText, wait=False,
                                               onFinished=self.onTrainingFinished)
            else:
                task = self.logic.distill(dataset, teacher, method=self.ui.kdMethodComboBox.currentText,
                                          widthFactor=self.ui.widthFactorSpinBox.value, epochs=epochs,
                                          outputFolder=output, device=self.ui.deviceComboBox.currentText,
                                          wait=False, onFinished=self.onTrainingFinished)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        task.job.onLine = self.ui.logTextEdit.appendPlainText
        self.ui.trainingProgressBar.setVisible(True)
        self._timer.start()

    def onStopTraining(self):
        self.logic.stopTraining()
        self.ui.logTextEdit.appendPlainText("stopped; Resume continues from the last finished epoch")

    def onResumeTraining(self):
        try:
            task = self.logic.resumeTraining(onFinished=self.onTrainingFinished)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        task.job.onLine = self.ui.logTextEdit.appendPlainText
        self._timer.start()

    def onTrainingFinished(self, task):
        self.ui.trainingProgressBar.setVisible(False)
        self.ui.logTextEdit.appendPlainText(task.message)
        if task.bundlePath is not None:
            self.refreshModels()

    def _plotHistory(self, history):
        """Loss terms and validation Dice per epoch in a Slicer plot (its chart, table and series nodes reused)."""
        import numpy as np

        if not history:
            return
        keys = [k for k in history[0] if k.startswith("loss_") or k == "dice_mean"]
        if not keys:
            return
        rows = [[float(r.get("epoch", i + 1))] + [r[k] if isinstance(r.get(k), float) else np.nan for k in keys]
                for i, r in enumerate(history)]
        if not hasattr(self, "_plotNodes"):
            self._plotNodes = {}
        slicer.util.plot(np.array(rows, dtype=float), xColumnIndex=0, columnNames=["epoch", *keys],
                         title="ReCoKD training", nodes=self._plotNodes)

    # -- timer ------------------------------------------------------------------------------------
    def onTimer(self):
        self.logic.poll()
        task = self.logic.segmentationTask
        if task is not None and task.state == RUNNING:
            self.ui.segmentProgressBar.setValue(int(100 * task.progress))
            self.ui.statusLabel.text = f"Segmenting on {task.job.device or '…'}: {task.job.elapsed:.0f} s"
        training = self.logic.trainingTask
        if training is not None:
            self.ui.trainingProgressBar.setValue(int(100 * training.progress))
            if training.history and len(training.history) != getattr(self, "_plotted", 0):
                self._plotted = len(training.history)
                self._plotHistory(training.history)
        if (task is None or task.state != RUNNING) and (training is None or training.state != RUNNING):
            self._timer.stop()


#
# Test (runs inside Slicer: Developer mode → Reload and Test, or `Slicer --testing --python-code ...`)
#


class ReCoKDTest(ScriptedLoadableModuleTest):
    """Segments a phantom with a tiny bundle through the whole background-process path."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom()

    def _tinyBundle(self, folder: Path) -> Path:
        from ReCoKDLib.bundle import bundle_from_network
        from ReCoKDLib.data.planning import ChannelNormalisation, Plans
        from ReCoKDLib.models import build_unet, isotropic_spec

        spec = isotropic_spec(1, 2, num_levels=3, filters=[8, 16, 32])
        plans = Plans(dataset_name="Phantom", channel_names={0: "CT"}, labels={"background": 0, "organ": 1},
                      target_spacing=(1.0, 1.0, 1.0), normalisation=(ChannelNormalisation("zscore"),),
                      patch_size=(16, 16, 16), network=spec.to_dict())
        network = build_unet(plans.unet_spec).eval()
        return bundle_from_network(network, plans, "phantom-test").save(folder / "phantom-test.recokd")

    def test_segment_phantom(self):
        import numpy as np

        self.delayDisplay("Building a phantom and a tiny bundle")
        folder = Path(tempfile.mkdtemp(prefix="ReCoKDTest-"))
        bundle = self._tinyBundle(folder)
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 28)], indexing="ij")
        array = (((z / 0.6) ** 2 + (y / 0.5) ** 2 + (x / 0.7) ** 2) < 1).astype(np.float32) * 100 + 10
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS=np.array([[0, 1.5, 0, 10], [-1, 0, 0, 5], [0, 0, 2, -3], [0, 0, 0, 1]], dtype=float),
                                                name="phantom")
        logic = ReCoKDLogic(modelsFolder=folder)
        before = slicer.mrmlScene.GetNumberOfNodes()
        self.delayDisplay("Segmenting")
        node = logic.segment([volume], bundle, device="cpu", fast=True)
        self.assertEqual(node.GetName(), "phantom – phantom-test")
        self.assertEqual(node.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
        with self.assertRaises(ReCoKDError):
            logic.segment([volume, volume], bundle, device="cpu", fast=True)
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
