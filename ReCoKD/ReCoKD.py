"""ReCoKD: segment volumes with distilled students and train them, in 3D Slicer.

Module, Widget, Logic and Test classes following Slicer's scripted-module template. The parameter
node (``ReCoKDParameterNode``) holds the panel's state, so a saved scene restores it; the Widget only
binds controls to it and forwards clicks; the Logic reads its inputs from the parameter node (or
from plain arguments in the Python console) and never touches a widget. The Logic is free of Qt: it
runs in Slicer's Python console, in ``Slicer --no-main-window --python-script`` and, for the test
suite, under plain Python with the ``slicer-core`` package (where ``qt``, ``ctk`` and
``slicer.ScriptedLoadableModule`` are absent, so this file falls back to plain base classes).

All heavy work (PyTorch) happens in a background process, ``<Slicer's python> -m
ReCoKDLib.inference.slicer_bridge``, which reports progress line by line; the GUI polls it from a timer, so it
never freezes, and Cancel kills the whole process tree.

Console example::

    logic = slicer.util.getModuleLogic("ReCoKD")          # or ReCoKD.ReCoKDLogic()
    print(logic.modelCard("/path/model.recokd"))                 # what it expects, how accurate, its terms
    seg = logic.segment([slicer.util.getNode("MRHead")], "/path/model.recokd", device="auto")
"""

import logging
import platform
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Annotated

import slicer
import vtk

try:  # inside the Slicer application
    import ctk
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
    from slicer.parameterNodeWrapper import (
        Choice,
        GuiConnector,
        WithinRange,
        parameterNodeGuiConnector,
        parameterNodeWrapper,
        unannotatedType,
    )
except ImportError:  # Slicer < 5.2 or slicer-core: no typed parameter node
    parameterNodeWrapper = None

# the module's folder holds ReCoKDSlicer/ (and ReCoKDLib/ once built); a source checkout has ReCoKDLib/ beside it
_MODULE_DIR = Path(__file__).resolve().parent
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

from ReCoKDSlicer.i18n import _, translate  # noqa: E402 - slicer.i18n's tr (the user's language), else English
from ReCoKDSlicer import library  # noqa: E402

LIBRARY_ERROR = library.locate(_MODULE_DIR)  # "" when ReCoKDLib imports; else shown in the panel

from ReCoKDSlicer import logic as _logic  # noqa: E402
from ReCoKDSlicer import models  # noqa: E402
from ReCoKDSlicer.jobs import FAILED, RUNNING  # noqa: E402
from ReCoKDSlicer.logic import (  # noqa: E402,F401 - the module's public names, as before the split
    DEVICES,
    KD_METHODS,
    SAMPLE_MODEL,
    SAMPLE_NAME,
    ReCoKDError,
    SegmentationTask,
    TrainingTask,
    samplePhantomPath,
)

log = logging.getLogger("ReCoKD")


#
# Module
#


class ReCoKD(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        if parent is None:
            return
        self.parent.title = _("ReCoKD")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ReCoKD contributors"]
        self.parent.helpText = _(
            "Segment volumes with compact students distilled by ReCo-KD (region- and context-aware knowledge "
            "distillation), and train new ones. The network runs in a background process: the GUI stays "
            "responsive, progress is shown and Cancel stops it at once. Try it: Sample Data → ReCoKD → "
            "ReCoKD phantom, then Segment with the phantom-abdomen model."
        )
        self.parent.acknowledgementText = _(
            "ReCo-KD follows Lan et al., arXiv 2601.08301. Built on MONAI, PyTorch and SimpleITK. The shipped "
            "models were trained on public data; cite it when you publish results made with them: "
            "la2018-left-atrium on the 2018 Atrial Segmentation Challenge (Xiong et al., Medical Image Analysis "
            "67:101832, 2021; via the UA-MT repository, Yu et al., MICCAI 2019), acdc-heart on ACDC (Bernard et "
            "al., IEEE Transactions on Medical Imaging 37(11):2514-2525, 2018); phantom-abdomen on synthetic "
            "phantoms made by ReCoKD. Research use only, not for clinical use."
        )
        if HAVE_SLICER_GUI and getattr(slicer, "app", None) is not None:
            slicer.app.connect("startupCompleted()", onStartupCompleted)


#: PyTorch's Metal backend exists only on Apple-silicon Macs
_MACHINE_OFFERS_MPS = sys.platform == "darwin" and platform.machine() == "arm64"


def onStartupCompleted() -> None:
    """At Slicer's start: the sample data, and the temporary folders (patient images) a killed Slicer left
    behind are removed now, not only when the module is first opened."""
    registerSampleData()
    try:
        _logic.cleanStaleTempFolders()
    except Exception as exc:  # noqa: BLE001 - a clean-up must never break Slicer's startup
        logging.warning("ReCoKD: stale temporary folders were not removed: %s", exc)


def registerSampleData() -> None:
    """Add *ReCoKD phantom* to the Sample Data module (the volume is generated locally, nothing is downloaded)."""
    if library.error():
        return
    try:
        import SampleData

        path = samplePhantomPath()
        icon = _MODULE_DIR / "Resources" / "Icons" / "ReCoKD.png"
        register = SampleData.SampleDataLogic.registerCustomSampleDataSource
        common = dict(category="ReCoKD", sampleName=SAMPLE_NAME, uris=path.as_uri(), fileNames=path.name,
                      nodeNames=SAMPLE_NAME, thumbnailFileName=str(icon))
        try:
            register(**common, loadFileTypes="VolumeFile")  # Slicer >= 5.8
        except TypeError:
            register(**common, loadFileType="VolumeFile")
    except Exception as exc:  # noqa: BLE001 - a sample must never break Slicer's startup
        log.warning(f"ReCoKD sample data not registered: {exc}")


#
# Parameter node
#

if parameterNodeWrapper is not None:

    class PathLineEditToStrConnector(GuiConnector):
        """A ``ctkPathLineEdit`` bound to a ``str`` where "" means unset (Slicer's ``Path`` connector
        reads an empty box as ``Path('.')``, i.e. the working folder)."""

        @staticmethod
        def canRepresent(widget, datatype) -> bool:
            return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str  # noqa: E721

        @staticmethod
        def create(widget, datatype):
            return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) else None

        def __init__(self, widget):
            super().__init__()
            self._widget = widget

        # CTK emits currentPathChanged only for valid input, and "" never is: clearing the box is seen
        # through validInputChanged
        def _connect(self):
            self._widget.currentPathChanged.connect(self.changed)
            self._widget.validInputChanged.connect(self.changed)

        def _disconnect(self):
            self._widget.currentPathChanged.disconnect(self.changed)
            self._widget.validInputChanged.disconnect(self.changed)

        def widget(self):
            return self._widget

        def read(self) -> str:
            return str(self._widget.currentPath or "").strip()

        def write(self, value: str) -> None:
            if (value or "") != (self._widget.currentPath or ""):
                self._widget.currentPath = value or ""

    from slicer.parameterNodeWrapper import guiConnectors as _guiConnectors

    # registered once per Slicer session (a developer Reload must not append a second copy)
    if not any(c.__name__ == PathLineEditToStrConnector.__name__ for c in _guiConnectors._registeredGuiConnectors):
        parameterNodeGuiConnector(PathLineEditToStrConnector)

    @parameterNodeWrapper
    class ReCoKDParameterNode:
        """The panel's state. Paths are ``str``: "" means not chosen."""

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        inputVolume2: slicer.vtkMRMLScalarVolumeNode
        inputVolume3: slicer.vtkMRMLScalarVolumeNode
        inputVolume4: slicer.vtkMRMLScalarVolumeNode
        model: str = ""  # a model name (registry, models folder) or a bundle path
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        tta: bool = False  # mirror test-time augmentation (only along the model's trained mirror axes)
        fast: bool = False  # run the model's fast variant (its registry entry's "fast")
        skipInputChecks: bool = False  # segment without checking the input against the training data
        show3D: bool = True  # build the result's closed surfaces (3D views)
        outputSegmentation: slicer.vtkMRMLSegmentationNode  # None: a new one (then the result, for Segment again)
        skippedStructures: list[str]  # structures left out of the output (empty: all of them)
        allFrames: bool = True  # an input shown by a sequence browser (cine, 4D): segment every frame
        nnunetFolds: str = ""  # an nnU-Net results folder as the model: folds to ensemble ("": all with a checkpoint)
        datasetFolder: str = ""
        teacherPath: str = ""
        teacherFolds: str = ""  # an nnU-Net teacher: folds to ensemble ("": fold 0, as recokd distill; "every")
        unlabeledFolder: str = ""  # scans without labels: the teacher labels them for the student
        trainTeacherFirst: bool = False
        kdMethod: Annotated[str, Choice(list(KD_METHODS))] = "auto"
        widthFactor: Annotated[float, WithinRange(1.0, 16.0)] = 4.0
        epochs: Annotated[int, WithinRange(1, 10000)] = 50
        outputFolder: str = ""
else:
    ReCoKDParameterNode = None


#
# Logic: the Qt-free ReCoKDSlicer.logic, plus the module's parameter node
#


class ReCoKDLogic(_logic.ReCoKDLogic):
    __doc__ = _logic.ReCoKDLogic.__doc__

    def getParameterNode(self):
        """The module's parameter node, wrapped (None where Slicer's parameterNodeWrapper is absent)."""
        if ReCoKDParameterNode is None:
            return None
        return ReCoKDParameterNode(super().getParameterNode())


#
# Widget
#


class ReCoKDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: a Segment panel and a Training panel (layout in Resources/UI/ReCoKD.ui), bound to the parameter node."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._modelSources = []
        self._plotted = 0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ReCoKD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ReCoKDLogic()
        self.logic.onTrainingLine = self.ui.logTextEdit.appendPlainText

        self.ui.segmentProgressBar.setVisible(False)
        self.ui.trainingProgressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelFromFile)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.modelCardButton.connect("clicked(bool)", self.onModelCard)
        self.ui.structuresComboBox.connect("checkedIndexesChanged()", self.onStructuresChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.ui.resumeTrainingButton.connect("clicked(bool)", self.onResumeTraining)

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        if library.error():  # the panel stays usable enough to show why
            self.ui.statusLabel.text = library.error()
            self.ui.segmentButton.enabled = False
            self.ui.startTrainingButton.enabled = False
        self.refreshModels()
        self.initializeParameterNode()

    def onReload(self):
        """Developer mode's Reload: the module's own package (ReCoKDSlicer) is imported anew too, so an
        edit to the logic takes effect without restarting Slicer (Slicer re-runs only ReCoKD.py)."""
        for name in [n for n in sys.modules if n == "ReCoKDSlicer" or n.startswith("ReCoKDSlicer.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self):
        """Module unloaded or Slicer closing: nothing may keep running (a stopped training keeps its checkpoint)."""
        if self.logic is not None:
            self.logic.cancel()
            self.logic.stopTraining()
        if self._timer is not None:
            self._timer.stop()
        self.exit()
        self.removeObservers()

    # -- parameter node ---------------------------------------------------------------------------
    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.setParameterNode(None)

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
        if not parameterNode.model and self._modelSources:
            parameterNode.model = self._modelSources[0].key
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode):
        """Bind the controls to ``parameterNode`` (None: unbind)."""
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self.exit()
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self._offerOnlyThisMachinesDevices(parameterNode)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def _offerOnlyThisMachinesDevices(self, parameterNode):
        """The device list offers Apple's Metal (mps) only where PyTorch has it: Apple-silicon macOS (a scene
        saved there keeps its choice here, and Segment then says in one line that this machine lacks it).
        mps is the binding's last choice, so removing it leaves the others' indices as the binding reads them."""
        combo = self.ui.deviceComboBox
        if (not _MACHINE_OFFERS_MPS and parameterNode.device != "mps" and combo.count == len(DEVICES)
                and combo.itemText(combo.count - 1) == "mps"):
            combo.removeItem(combo.count - 1)

    def _isNnunetFolder(self, path: str) -> bool:
        """models.isNnunetFolder, asked again only when the path changes: the GUI updates on every change of
        the parameter node, and a results folder's check lists the folder."""
        if getattr(self, "_nnunetFolderChecked", (None, False))[0] != path:
            self._nnunetFolderChecked = (path, models.isNnunetFolder(path))
        return self._nnunetFolderChecked[1]

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """What the binding cannot express: the model selection, visible channels, button states."""
        p = self._parameterNode
        if p is None:
            return
        keys = [s.key for s in self._modelSources]
        if p.model and p.model not in keys and Path(p.model).exists():  # a bundle loaded from file in a saved scene
            self._addModelSource(models.ModelSource(name=Path(p.model).stem, kind="file", path=p.model))
            keys = [s.key for s in self._modelSources]
        index = keys.index(p.model) if p.model in keys else -1
        if self.ui.modelComboBox.currentIndex != index:
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.setCurrentIndex(index)
            self.ui.modelComboBox.blockSignals(wasBlocked)
        self._updateChannelSelectors()
        segmenting = self.logic.segmentationTask is not None and self.logic.segmentationTask.state == RUNNING
        someStructure = self.ui.structuresComboBox.count == 0 or not self.ui.structuresComboBox.noneChecked()
        self.ui.segmentButton.enabled = not library.error() and (segmenting or bool(p.inputVolume and p.model
                                                                                    and someStructure))
        browser = self.logic.sequenceBrowserOf(p.inputVolume)
        self.ui.allFramesCheckBox.visible = browser is not None
        if browser is not None:
            frames = browser.GetSequenceNode(p.inputVolume).GetNumberOfDataNodes()
            self.ui.allFramesCheckBox.text = _("All {count} frames").format(count=frames)
        self.ui.engineNoteLabel.text = self.logic.engineNote(p.device, self._modelInfo(p.model) if p.model else None)
        self.ui.teacherPathLineEdit.enabled = not p.trainTeacherFirst
        nnunetTeacher = bool(not p.trainTeacherFirst and p.teacherPath and self._isNnunetFolder(p.teacherPath))
        self.ui.teacherFoldsLineEdit.visible = self.ui.teacherFoldsLabel.visible = nnunetTeacher
        training = self.logic.trainingTask is not None and self.logic.trainingTask.state == RUNNING
        self.ui.startTrainingButton.enabled = not library.error() and not training and bool(
            p.datasetFolder and (p.teacherPath or p.trainTeacherFirst))
        self.ui.stopTrainingButton.enabled = training
        self.ui.resumeTrainingButton.enabled = not training and self.logic.trainingTask is not None

    # -- models -----------------------------------------------------------------------------------
    def refreshModels(self, _checked=False):
        """Fill the model list (never opens a dialog; a file is picked only with 'Load from file…')."""
        self._modelSources = self.logic.availableModels()
        self._modelInfoCache = self._fastVariantCache = (None, None)
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for source in self._modelSources:
            combo.addItem(source.label)
        combo.blockSignals(wasBlocked)
        if self.logic.warnings:
            self.ui.statusLabel.text = _("{count} model entr(y/ies) skipped; see the Python console").format(
                count=len(self.logic.warnings))
        self.updateGUIFromParameterNode()

    def _addModelSource(self, source):
        self._modelSources.append(source)
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.addItem(source.label)
        self.ui.modelComboBox.blockSignals(wasBlocked)

    def onLoadModelFromFile(self, _checked=False):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Load a ReCoKD model"), "",
                                              _("ReCoKD bundles (*.recokd *.zip)"))
        if not path:
            return
        source = models.ModelSource(name=Path(path).stem, kind="file", path=path)
        if source.key not in [s.key for s in self._modelSources]:
            self._addModelSource(source)
        if self._parameterNode is not None:
            self._parameterNode.model = source.key

    def onAddModelFolder(self, _checked=False):
        path = qt.QFileDialog.getExistingDirectory(self.parent, _("Add a model folder (nnU-Net results or ReCoKD)"))
        if not path:
            return
        try:
            source = self.logic.modelFolderSource(path)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        if source.key not in [s.key for s in self._modelSources]:
            self._addModelSource(source)
        if self._parameterNode is not None:
            self._parameterNode.model = source.key

    def onModelChanged(self, index):
        if self._parameterNode is not None and 0 <= index < len(self._modelSources):
            self._parameterNode.model = self._modelSources[index].key

    def _modelInfo(self, model):
        """The model's info, read once per selection (the node changes on every keystroke elsewhere)."""
        if getattr(self, "_modelInfoCache", (None, None))[0] != model:
            try:
                info = self.logic.modelInfo(model)
            except Exception as exc:  # noqa: BLE001 - a broken bundle or entry: say so, keep the panel alive
                self.ui.statusLabel.text = str(exc)
                info = None
            self._modelInfoCache = (model, info)
        return self._modelInfoCache[1]

    def _updateChannelSelectors(self):
        p = self._parameterNode
        info = self._modelInfo(p.model) if p is not None and p.model else None
        channels = info.channelNames if info else ["image"]
        for i, (selector, label) in enumerate(self._volumeSelectors()):
            visible = i < len(channels)
            selector.setVisible(visible)
            label.setVisible(visible)
            if visible:
                label.text = f"{channels[i]}:" if len(channels) > 1 else _("Input volume:")
                selector.setToolTip(channels[i])
        self._updateTtaCheckBox(info)
        self._updateFastCheckBox(p.model if p is not None else "")
        self._updateStructures(info)
        folds = bool(info is not None and info.nnunetFolds)
        self.ui.nnunetFoldsLineEdit.visible = self.ui.nnunetFoldsLabel.visible = folds
        if folds:
            self.ui.nnunetFoldsLineEdit.placeholderText = _("all: {folds}").format(folds=", ".join(info.nnunetFolds))
        self.ui.modelCardButton.enabled = bool(p is not None and p.model)
        if info is None:
            self.ui.modelInfoLabel.text = ""
            return
        self.ui.modelInfoLabel.text = info.summary()  # the model card's essentials: accuracy, limits, terms

    def _updateStructures(self, info):
        """The model's structures, each ticked unless the parameter node leaves it out."""
        combo = self.ui.structuresComboBox
        names = info.labels.foreground_names if info is not None and info.labels else []
        skipped = set(self._parameterNode.skippedStructures) if self._parameterNode is not None else set()
        wasBlocked = combo.blockSignals(True)
        if [combo.itemText(i) for i in range(combo.count)] != names:
            combo.clear()
            for name in names:
                combo.addItem(name)
        for i, name in enumerate(names):
            state = qt.Qt.Unchecked if name in skipped else qt.Qt.Checked
            if combo.checkState(combo.model().index(i, 0)) != state:
                combo.setCheckState(combo.model().index(i, 0), state)
        combo.blockSignals(wasBlocked)
        combo.enabled = bool(names)

    def onStructuresChanged(self):
        p = self._parameterNode
        combo = self.ui.structuresComboBox
        if p is None:
            return
        checked = {index.row() for index in combo.checkedIndexes()}
        skipped = [combo.itemText(i) for i in range(combo.count) if i not in checked]
        if list(p.skippedStructures) != skipped:
            p.skippedStructures = skipped

    def _updateTtaCheckBox(self, info):
        """Say what mirror TTA costs for this model, or that it has none (left enabled while checked, so it
        can be unchecked)."""
        box, factor = self.ui.ttaCheckBox, info.ttaFactor if info is not None else 8
        if factor > 1:
            box.text = _("Mirror test-time augmentation ({factor}x slower)").format(factor=factor)
        else:
            box.text = _("Mirror test-time augmentation (not available: trained without mirroring)")
        box.enabled = factor > 1 or bool(self._parameterNode is not None and self._parameterNode.tta)

    def _updateFastCheckBox(self, model):
        """Name the model's fast variant, or say it has none (left enabled while checked, so it can be unchecked)."""
        if getattr(self, "_fastVariantCache", (None, None))[0] != model:  # looked up once per selection
            self._fastVariantCache = (model, self.logic.fastVariant(model) if model else None)
        variant, box = self._fastVariantCache[1], self.ui.fastCheckBox
        box.text = _("Fast ({name})").format(name=variant.name) if variant is not None else \
            _("Fast (this model has no fast variant)")
        box.enabled = variant is not None or bool(self._parameterNode is not None and self._parameterNode.fast)

    def _volumeSelectors(self):
        return [(self.ui.inputVolumeSelector, self.ui.inputVolumeSelectorLabel),
                (self.ui.inputVolumeSelector2, self.ui.inputVolumeSelector2Label),
                (self.ui.inputVolumeSelector3, self.ui.inputVolumeSelector3Label),
                (self.ui.inputVolumeSelector4, self.ui.inputVolumeSelector4Label)]

    def onModelCard(self, _checked=False):
        p = self._parameterNode
        if p is None or not p.model:
            return
        try:
            rows = self.logic.modelCardRows(p.model)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._ask(_("Model card: {name}").format(name=_modelName(p.model)), _cardHtml(rows), None)

    def _ask(self, title, text, acceptText, warning=False) -> bool:
        """A message box; with ``acceptText``, that button and Cancel (returns whether it was chosen)."""
        box = qt.QMessageBox(self.parent)
        box.setWindowTitle(title)
        box.setIcon(qt.QMessageBox.Warning if warning else qt.QMessageBox.Information)
        box.setText(text)
        if acceptText is None:
            box.addButton(qt.QMessageBox.Close)
            box.exec_()
            return False
        accept = box.addButton(acceptText, qt.QMessageBox.AcceptRole)
        cancel = box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(cancel if warning else accept)
        box.exec_()
        return box.clickedButton() == accept

    # -- segment ----------------------------------------------------------------------------------
    def _ensureDependencies(self, model: str = "") -> bool:
        """Install what ReCoKD needs, after asking; ``model``: the model or teacher to run (an nnU-Net results
        folder needs nnU-Net's network classes too)."""
        from ReCoKDSlicer import dependencies

        nnunet = bool(model) and models.isNnunetFolder(model)
        if not dependencies.missingDependencies(nnunet):
            return True
        try:  # the user is asked first; pip and the PyTorch extension show their own progress
            dependencies.installDependencies(confirm=slicer.util.confirmOkCancelDisplay, nnunet=nnunet)
        except Exception as exc:  # noqa: BLE001 - declined or failed: one message, no traceback
            slicer.util.errorDisplay(_("ReCoKD cannot run yet: {reason}").format(reason=exc))
            return False
        return True

    def onSegmentButton(self):
        task = self.logic.segmentationTask
        if task is not None and task.state == RUNNING:
            self.logic.cancel()
            return
        p = self._parameterNode
        variant = self.logic.fastVariant(p.model) if p.model and p.fast else None
        running = variant.name if variant is not None else p.model  # with Fast, its fast variant runs
        try:  # the model's card before its first use: what it expects, how accurate it is, its terms
            if running and not self.logic.modelCardSeen(running):
                if not self._ask(_("Model card: {name}").format(name=_modelName(running)),
                                 _cardHtml(self.logic.modelCardRows(running)) + "<p>" +
                                 _("Segment with this model? (The card stays one click away: <i>Model card…</i>)") +
                                 "</p>", _("Segment")):
                    return
                self.logic.markModelCardSeen(running)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        if not self._ensureDependencies(running):
            return
        self._startSegmentation(lambda: self.logic.segmentWithParameters(p, wait=False, onFinished=self.onSegmentFinished))

    def _startSegmentation(self, start):
        try:
            start()
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.segmentButton.text = _("Cancel")
        self.ui.segmentProgressBar.setValue(0)
        self.ui.segmentProgressBar.setVisible(True)
        self.ui.statusLabel.text = _("Segmenting…")
        self._timer.start()

    def onSegmentFinished(self, task):
        self.ui.segmentButton.text = _("Segment")
        self.ui.segmentProgressBar.setVisible(False)
        self.ui.statusLabel.text = task.message
        if task.segmentationNode is not None:
            if not _shownInASliceView(task.volumeNodes[0]):  # else leave the user's view layers as they are
                slicer.util.setSliceViewerLayers(background=task.volumeNodes[0])
        elif task.inputWarnings:  # stopped before the network ran: the user decides
            title = _("The input is unlike the model's training data")
            self.ui.statusLabel.text = title
            text = "".join(f"<p>{_escape(line)}</p>" for line in task.inputWarnings)
            if self._ask(title, text + "<p>" + _("Segment anyway?") + "</p>", _("Segment anyway"), warning=True):
                self._startSegmentation(lambda: self.logic.segmentAnyway(task, onFinished=self.onSegmentFinished))
                return
            self.ui.statusLabel.text = _("Segmentation cancelled after the input checks; nothing was added to the scene")
        elif task.state == FAILED:
            slicer.util.errorDisplay(task.message)
        self.updateGUIFromParameterNode()

    # -- training ---------------------------------------------------------------------------------
    def onStartTraining(self, _checked=False):
        if not self._ensureDependencies("" if self._parameterNode.trainTeacherFirst else self._parameterNode.teacherPath):
            return
        self.ui.logTextEdit.clear()
        try:
            self.logic.trainWithParameters(self._parameterNode, wait=False, onFinished=self.onTrainingFinished)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._plotted = 0
        self.ui.trainingProgressBar.setValue(0)
        self.ui.trainingProgressBar.setVisible(True)
        self._timer.start()
        self.updateGUIFromParameterNode()

    def onStopTraining(self):
        task = self.logic.trainingTask
        self.logic.stopTraining()  # the task ends: its onFinished (onTrainingFinished, when started here) reports
        self.ui.trainingProgressBar.setValue(0)
        self.ui.trainingProgressBar.setVisible(False)
        if task is not None and task.onFinished is None:  # started from the console
            self.ui.logTextEdit.appendPlainText(task.message)
        self.updateGUIFromParameterNode()

    def onResumeTraining(self):
        try:
            self.logic.resumeTraining(onFinished=self.onTrainingFinished)
        except ReCoKDError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.trainingProgressBar.setVisible(True)
        self._timer.start()
        self.updateGUIFromParameterNode()

    def onTrainingFinished(self, task):
        self.ui.trainingProgressBar.setVisible(False)
        self.ui.logTextEdit.appendPlainText(task.message)
        self.logic.plotTrainingHistory(task.history)
        if task.bundlePath is not None:
            self.refreshModels()
        self.updateGUIFromParameterNode()

    # -- timer ------------------------------------------------------------------------------------
    def onTimer(self):
        self.logic.poll()
        task = self.logic.segmentationTask
        if task is not None and task.state == RUNNING:
            done, total = task.job.download
            if done and not task.job.device:  # still fetching the registry model (the network has not started)
                self.ui.segmentProgressBar.setValue(int(100 * done / total) if total else 0)
                self.ui.statusLabel.text = (_("Downloading the model: {done:.1f} of {total:.1f} MB") if total else
                                            _("Downloading the model: {done:.1f} MB")).format(done=done / 1e6,
                                                                                             total=total / 1e6)
            else:
                self.ui.segmentProgressBar.setValue(int(100 * task.progress))
                frame, frames = task.job.frame
                if frames > 1:
                    self.ui.statusLabel.text = _("Segmenting frame {frame} of {frames} on {device}: {seconds:.0f} s").format(
                        frame=frame, frames=frames, device=task.job.device or "…", seconds=task.job.elapsed)
                else:
                    self.ui.statusLabel.text = _("Segmenting on {device}: {seconds:.0f} s").format(
                        device=task.job.device or "…", seconds=task.job.elapsed)
        training = self.logic.trainingTask
        if training is not None:
            self.ui.trainingProgressBar.setValue(int(100 * training.progress))
            if training.history and len(training.history) != self._plotted:
                self._plotted = len(training.history)
                self.logic.plotTrainingHistory(training.history)
        if (task is None or task.state != RUNNING) and (training is None or training.state != RUNNING):
            self._timer.stop()


def _shownInASliceView(volume) -> bool:
    """Whether some slice view shows ``volume`` (as background or foreground layer)."""
    scene = volume.GetScene() or slicer.mrmlScene
    for composite in _logic.nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
        if volume.GetID() in (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()):
            return True
    return False


def _modelName(model: str) -> str:
    """A model's name for a title: a bundle path's file name without its ending."""
    return Path(model).stem if ("/" in model or "\\" in model) else model


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cardHtml(rows) -> str:
    """Model-card rows as a two-column table (a message box's proportional font breaks aligned text)."""
    cells = "".join(f"<tr><td valign='top'><b>{_escape(h)}</b></td><td>{_escape(t)}</td></tr>" for h, t in rows)
    return f"<table cellspacing='4'>{cells}</table>"


#
# Test (runs inside Slicer: Developer mode → Reload and Test, or `Slicer --testing --python-code ...`)
#


class ReCoKDTest(ScriptedLoadableModuleTest):
    """Segments the sample phantom with the shipped phantom model through the whole background-process path."""

    @staticmethod
    def skipReason() -> str:
        """Why the test cannot run here ("" when it can): no library, or PyTorch/MONAI not installed yet."""
        if library.error():
            return library.error()
        from ReCoKDSlicer import dependencies

        missing = dependencies.missingDependencies()
        return f"these Python packages are missing: {', '.join(missing)}" if missing else ""

    def setUp(self):
        reason = self.skipReason()  # ctest runs test_* through unittest: skip there as well
        if reason:
            self.skipTest(f"{reason} (open the module and click Segment to install them)")
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = self.skipReason()
        if reason:
            self.delayDisplay(_("ReCoKDTest skipped: {reason} (open the module and click Segment to install "
                                "them)").format(reason=reason))
            return
        self.setUp()
        self.test_segment_phantom()

    def test_segment_phantom(self):
        self.delayDisplay(_("Loading the sample phantom"))
        folder = Path(tempfile.mkdtemp(prefix="ReCoKDTest-"))
        try:
            logic = ReCoKDLogic(modelsFolder=folder)
            volume = logic.loadSample()
            before = slicer.mrmlScene.GetNumberOfNodes()
            self.delayDisplay(_("Segmenting"))
            node = logic.segment([volume], SAMPLE_MODEL, device="cpu")
            self.assertEqual(node.GetName(), f"{SAMPLE_NAME} – {SAMPLE_MODEL}")
            self.assertEqual(node.GetSegmentation().GetNumberOfSegments(), 4)
            self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), before)
            with self.assertRaises(ReCoKDError):
                logic.segment([volume, volume], SAMPLE_MODEL, device="cpu")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay(_("Test passed"))
