"""The module's Widget through Slicer's *real* Python layer (``../shared/slicer-python``).

``setup()``, ``enter()``, parameter changes in both directions, a saved-scene restore, a Segment click
and ``exit()`` run through Slicer's own ``parameterNodeWrapper`` and ``ScriptedLoadableModuleWidget``,
with stand-ins only for the C++ widget classes the ``.ui`` declares (``Testing/slicer_standins.py``).
A binding the real Slicer refuses (a ``str`` on a combo box without ``Choice``, ...) fails here too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core, or .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "ReCoKD" / "ReCoKD.py"
SLICER_PYTHON = Path(__file__).resolve().parents[2] / "shared" / "slicer-python"
if not (SLICER_PYTHON / "slicer" / "parameterNodeWrapper").is_dir():
    pytest.skip(f"Slicer's Python layer not found at {SLICER_PYTHON}; these tests need ../shared/slicer-python",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_standins  # noqa: E402
from bundle_helpers import tiny_network, tiny_plans  # noqa: E402


def _blocked_packages(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes the packages ReCoKD's pip extras add but Slicer's Python lacks
    (matplotlib, tensorboard, onnx, onnxruntime) unimportable."""
    for name in ("matplotlib", "tensorboard", "onnx", "onnxruntime"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed in Slicer')\n")
    return folder


@pytest.fixture
def gui(monkeypatch, tmp_path):
    """The module loaded as Slicer loads it, on a fresh scene, with an isolated per-user folder."""
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECOKD_REGISTRY", raising=False)
    # the background processes see only what Slicer's Python has after the module's install step
    monkeypatch.setenv("PYTHONPATH", str(_blocked_packages(tmp_path / "blocked")))
    errors: list[str] = []
    slicer_standins.install(monkeypatch, SLICER_PYTHON, MODULE_FILE, errors)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    slicer_standins.QFileDialog.calls, slicer_standins.QFileDialog.answers = [], []
    slicer_standins.QMessageBox.answers, slicer_standins.QMessageBox.shown = [], []
    module = slicer_standins.load_module_fresh(monkeypatch, MODULE_FILE)
    assert module.ReCoKDParameterNode is not None, "the real parameterNodeWrapper was not picked up"
    return module, scene, errors


_WIDGETS: list = []


@pytest.fixture(autouse=True)
def _cleanup_widgets():
    """Remove every widget's scene observers, as Slicer does when a module is unloaded."""
    yield
    while _WIDGETS:
        _WIDGETS.pop().cleanup()


def _new_widget(module):
    parent = slicer.qMRMLWidget()
    parent.setLayout(slicer_standins.QLayout())
    parent.isEntered = True
    widget = module.ReCoKDWidget(parent)
    _WIDGETS.append(widget)
    widget.setup()
    widget.enter()
    return widget


def _tiny_bundle(folder: Path) -> Path:
    from ReCoKDLib.deployment.bundle import bundle_from_network

    plans = tiny_plans(num_classes=3, spacing=(1.0, 1.0, 1.0))
    terms = {"organ": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "113343008", "Organ"]}}
    return bundle_from_network(tiny_network(plans, seed=3), plans, "tiny", terminology=terms).save(folder / "tiny.recokd")


def test_setup_enter_change_exit_through_the_real_parameter_node_wrapper(gui):
    module, scene, errors = gui
    volume = slicer.util.addVolumeFromArray(np.zeros((8, 9, 10), np.float32), name="CT")
    widget = _new_widget(module)
    ui, p = widget.ui, widget._parameterNode
    assert slicer_standins.QFileDialog.calls == [], "setup() opened a file dialog"
    # combo boxes filled by the Choice-annotated bindings, in the declared order
    offered = [d for d in module.DEVICES if d != "mps" or module._MACHINE_OFFERS_MPS]  # (mps: Apple silicon)
    assert ui.deviceComboBox.items == offered and ui.deviceComboBox.currentText == "auto"
    assert ui.kdMethodComboBox.items == list(module.KD_METHODS) and ui.kdMethodComboBox.currentText == "auto"
    # empty paths stay empty (not ".", the working folder)
    for box, field in ((ui.datasetPathLineEdit, "datasetFolder"), (ui.teacherPathLineEdit, "teacherPath"),
                       (ui.outputPathLineEdit, "outputFolder")):
        assert box.currentPath == "" and getattr(p, field) == ""
    assert p.inputVolume is volume and ui.inputVolumeSelector.currentNode() is volume
    # the shipped models are listed from the first open, and one is selected
    names = [s.name for s in widget._modelSources]
    assert "la2018-left-atrium" in names and "phantom-abdomen" in names
    assert p.model in names and ui.modelComboBox.currentIndex == names.index(p.model)
    # the console's logic.segment() runs what the panel runs by default (no mirror TTA, input checks on)
    import inspect

    defaults = inspect.signature(type(widget.logic).segment).parameters
    assert not ui.ttaCheckBox.checked and p.tta is False and defaults["tta"].default is p.tta
    assert not ui.skipInputChecksCheckBox.checked and p.skipInputChecks is False and defaults["force"].default is False
    # the TTA option says what it costs for the selected model, or that the model has none
    assert ui.ttaCheckBox.text == "Mirror test-time augmentation (not available: trained without mirroring)"
    assert not ui.ttaCheckBox.enabled  # every shipped model was trained without mirroring
    # the model box shows the card's accuracy and terms, not one fold's test Dice
    assert "Intended use:" in ui.modelInfoLabel.text and "test Dice" not in ui.modelInfoLabel.text
    # GUI -> parameter node
    ui.kdMethodComboBox.currentIndex = list(module.KD_METHODS).index("cwd")
    ui.datasetPathLineEdit.currentPath = "/data/Dataset001_Liver"
    ui.widthFactorSpinBox.value = 8.0
    ui.skipInputChecksCheckBox.checked = True
    assert (p.kdMethod, p.datasetFolder, p.widthFactor, p.skipInputChecks) == ("cwd", "/data/Dataset001_Liver", 8.0, True)
    assert p.show3D and ui.show3DCheckBox.checked  # on by default
    ui.show3DCheckBox.checked = False
    assert p.show3D is False
    p.tta = True  # e.g. a saved scene: the box stays enabled while checked, so it can be unchecked
    assert ui.ttaCheckBox.checked and ui.ttaCheckBox.enabled
    # parameter node -> GUI
    p.epochs = 7
    p.device = "cpu"
    assert ui.epochsSpinBox.value == 7 and ui.deviceComboBox.currentText == "cpu"
    # the validators bound the spin boxes, with the same limits as the .ui declares
    import xml.etree.ElementTree as ET

    declared = {w.get("name"): {p_.get("name"): slicer_standins._value(p_) for p_ in w.findall("property")}
                for w in ET.parse(MODULE_FILE.parent / "Resources" / "UI" / "ReCoKD.ui").iter("widget")}
    for name in ("widthFactorSpinBox", "epochsSpinBox"):
        box = getattr(ui, name)
        assert (box.minimum, box.maximum) == (declared[name]["minimum"], declared[name]["maximum"]), name
    # the logic reads the node: no teacher chosen is refused, not taken for "."
    with pytest.raises(module.ReCoKDError, match="holds no dataset.json"):
        widget.logic.trainWithParameters(p)
    widget.exit()
    ui.kdMethodComboBox.currentIndex = 0  # unbound now: the node keeps its value
    assert p.kdMethod == "cwd"
    widget.exit()  # twice is harmless
    widget.cleanup()
    assert errors == []


def test_a_saved_scene_restores_the_panel(gui, tmp_path):
    module, scene, errors = gui
    widget = _new_widget(module)
    p = widget._parameterNode
    p.kdMethod, p.epochs, p.teacherPath, p.model = "logit", 12, "/runs/teacher", "phantom-abdomen"
    path = tmp_path / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()
    widget.exit()
    restored = slicer.vtkMRMLScene()
    restored.SetURL(str(path))
    assert restored.Import()
    slicer.mrmlScene = restored
    widget2 = _new_widget(module)
    ui = widget2.ui
    assert ui.kdMethodComboBox.currentText == "logit" and ui.epochsSpinBox.value == 12
    assert ui.teacherPathLineEdit.currentPath == "/runs/teacher"
    assert widget2._modelSources[ui.modelComboBox.currentIndex].name == "phantom-abdomen"
    widget2.exit()


def test_segment_button_runs_in_the_background_and_adds_named_coded_segments(gui, tmp_path):
    module, scene, errors = gui
    models_folder = Path(tmp_path / "home" / "models")
    models_folder.mkdir(parents=True)
    _tiny_bundle(models_folder)
    rng = np.random.default_rng(0)
    volume = slicer.util.addVolumeFromArray((rng.random((12, 14, 16)) * 100).astype(np.float32), name="CT")
    widget = _new_widget(module)
    ui, p = widget.ui, widget._parameterNode
    names = [s.name for s in widget._modelSources]
    ui.modelComboBox.currentIndex = names.index("tiny")
    assert p.model == "tiny" and p.inputVolume is volume
    assert ui.inputVolumeSelectorLabel.visible and not ui.inputVolumeSelector2Label.visible
    # a model whose training augmentation is not recorded may mirror all three axes
    assert ui.ttaCheckBox.text == "Mirror test-time augmentation (8x slower)" and ui.ttaCheckBox.enabled
    slicer_standins.QMessageBox.answers = ["Segment"]  # its model card comes first
    ui.segmentButton.click()
    assert ui.segmentButton.text == "Cancel" and widget._timer.active
    deadline = time.monotonic() + 120
    while widget._timer.active:
        widget.onTimer()
        assert time.monotonic() < deadline, "the segmentation never finished"
        time.sleep(0.05)
    assert errors == [], errors
    assert ui.segmentButton.text == "Segment" and not ui.segmentProgressBar.visible
    node = scene.GetFirstNodeByName("CT – tiny")
    assert node is not None and "done in" in ui.statusLabel.text
    segmentation = node.GetSegmentation()
    organ = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("organ"))
    import vtk

    tag = vtk.reference("")
    assert organ.GetTag(organ.GetTerminologyEntryTagName(), tag)
    assert str(tag) == ("Segmentation category and type - DICOM master list~SCT^85756007^Tissue~SCT^113343008^Organ~^^"
                   "~~^^~^^")
    kidney = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("kidney"))
    other = vtk.reference("")
    kidney.GetTag(kidney.GetTerminologyEntryTagName(), other)  # Slicer's default; no codes were invented for it
    assert "113343008" not in str(other)
    widget.exit()


def test_stop_resets_the_progress_bar_and_the_library_error_is_one_message(gui, monkeypatch):
    module, scene, errors = gui
    widget = _new_widget(module)
    ui = widget.ui
    ui.trainingProgressBar.setValue(40)
    ui.trainingProgressBar.setVisible(True)
    widget.onStopTraining()
    assert ui.trainingProgressBar.value == 0 and not ui.trainingProgressBar.visible
    widget.exit()
    # a library that cannot be imported: the panel says so in one line and the buttons are off
    from ReCoKDSlicer import library

    monkeypatch.setattr(library, "_error", "ReCoKD cannot load its library ReCoKDLib (ImportError: x)")
    widget2 = _new_widget(module)
    assert widget2.ui.statusLabel.text.startswith("ReCoKD cannot load its library")
    assert not widget2.ui.segmentButton.enabled and not widget2.ui.startTrainingButton.enabled
    with pytest.raises(module.ReCoKDError, match="cannot load its library"):
        widget2.logic.segment([object()], "x")
    widget2.exit()


def test_training_from_the_panel_ends_with_the_student_in_the_model_list_without_matplotlib(gui, tmp_path, monkeypatch):
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    module, scene, errors = gui
    dataset = save_dataset_nnunet(generate_dataset(4, seed=5, shape=(32, 32, 32)), tmp_path / "Dataset901_Tiny")
    widget = _new_widget(module)
    ui, p, logic = widget.ui, widget._parameterNode, widget.logic
    logic.extraTrainingArgs = ["--iters-per-epoch", "2", "--batch-size", "1", "--val-max-cases", "1", "--workers", "0",
                               "--threads", "1", "--cache", str(tmp_path / "cache")]
    logic.extraTeacherArgs = ["--base-filters", "8", "--max-filters", "16", "--max-levels", "3", "--patch-budget", "8192"]
    assert not ui.startTrainingButton.enabled  # nothing chosen yet
    ui.datasetPathLineEdit.currentPath = str(dataset)
    ui.trainTeacherCheckBox.checked = True
    ui.epochsSpinBox.value = 2
    ui.outputPathLineEdit.currentPath = str(tmp_path / "runs" / "student")
    assert not ui.teacherPathLineEdit.enabled and ui.startTrainingButton.enabled
    # clearing a path box unsets the field (CTK reports an empty box only as invalid input)
    ui.outputPathLineEdit.currentPath = ""
    assert p.outputFolder == ""
    ui.datasetPathLineEdit.currentPath = ""
    assert p.datasetFolder == "" and not ui.startTrainingButton.enabled
    ui.datasetPathLineEdit.currentPath = str(dataset)
    ui.outputPathLineEdit.currentPath = str(tmp_path / "runs" / "student")
    # the clinic's own scans, without labels (the Training panel's "Unlabeled scans" folder)
    import SimpleITK as sitk

    scans = tmp_path / "scans"
    scans.mkdir()
    for case in generate_dataset(2, seed=21, shape=(32, 32, 32)):
        sitk.WriteImage(sitk.GetImageFromArray(case.image[0]), str(scans / f"scan{case.name[-3:]}.nii.gz"))
    ui.unlabeledPathLineEdit.currentPath = str(scans)
    assert p.unlabeledFolder == str(scans)
    ui.startTrainingButton.click()
    assert ui.trainingProgressBar.visible and not ui.startTrainingButton.enabled
    deadline = time.monotonic() + 600
    while widget._timer.active:
        widget.onTimer()
        assert time.monotonic() < deadline, "the training never finished"
        time.sleep(0.2)
    log = ui.logTextEdit.toPlainText()
    assert errors == [], errors + [log[-2000:]]
    task = logic.trainingTask
    assert task.role == "student" and task.state == "succeeded", log[-2000:]
    bundle = task.bundlePath
    assert bundle.parent == tmp_path / "home" / "models" and bundle.is_file()
    # KD method 'auto' with unlabeled scans resolves to the library's default for teacher labels: none
    assert bundle.name.startswith(f"{Path(p.datasetFolder).name}_none_R4_"), bundle.name
    assert bundle.stem in [s.name for s in widget._modelSources]  # the list was refreshed
    import json

    student_run = json.loads((tmp_path / "runs" / "student" / "run.json").read_text())
    assert student_run["unlabeled"] == [str(scans.resolve())] and student_run["unlabeled_cases"] == 2
    for run in (tmp_path / "runs" / "student_teacher", tmp_path / "runs" / "student"):
        assert (run / "model_final.safetensors").is_file() and (run / "log.csv").is_file()
        assert not (run / "curves.png").exists()  # no matplotlib: the PNG is skipped, nothing fails
    # the curves are Slicer plot nodes built from log.csv: one series per loss term and Dice column
    chart = scene.GetFirstNodeByClass("vtkMRMLPlotChartNode")
    series = {chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())}
    assert {"loss_seg", "loss_total", "dice_mean"} <= series, series
    table = scene.GetFirstNodeByClass("vtkMRMLTableNode")
    assert table.GetNumberOfRows() == 2
    assert "training finished; student bundle" in log


def test_console_segment_with_wait_keeps_the_gui_responsive(gui, tmp_path):
    module, scene, errors = gui
    bundle = _tiny_bundle(tmp_path)
    volume = slicer.util.addVolumeFromArray(np.random.default_rng(1).random((10, 11, 12)).astype(np.float32), name="CT")
    logic = module.ReCoKDLogic(modelsFolder=tmp_path / "models", registries=[])
    before = slicer.app.processed
    node = logic.segment([volume], bundle, device="cpu")  # wait=True, as typed in the console
    assert node is not None and slicer.app.processed > before
    # a job's error names the volume, not the temporary file it was written to
    flat = slicer.util.addVolumeFromArray(np.ones((10, 11, 12), np.float32), name="Flat")
    with pytest.raises(module.ReCoKDError, match=r"^volume 'Flat' channel 0 is constant") as info:
        logic.segment([flat], bundle, device="cpu")
    assert "/tmp" not in str(info.value) and "input_0000" not in str(info.value)


def test_sample_data_is_registered_at_startup_and_written_locally(gui, tmp_path, monkeypatch):
    import types

    module, scene, errors = gui
    registered = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileTypes=None, loadFiles=None, loadFileProperties={}, checksums=None,
                                           loadFileType=None):  # Slicer's signature (Modules/Scripted/SampleData)
            registered.append(dict(category=category, sampleName=sampleName, uris=uris, fileNames=fileNames,
                                   thumbnailFileName=thumbnailFileName, loadFileTypes=loadFileTypes))

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    module.ReCoKD(parent)  # the real ScriptedLoadableModule.__init__ runs first
    assert parent.title == "ReCoKD" and parent.categories == ["Segmentation"]
    startup = [slot for signal, slot in slicer.app.connections if signal == "startupCompleted()"]
    assert startup == [module.onStartupCompleted]  # the sample data, and stale temp folders removed
    startup[0]()  # Slicer emits startupCompleted()
    assert len(registered) == 1 and registered[0]["category"] == "ReCoKD"
    uri = registered[0]["uris"]
    assert uri.startswith("file://") and registered[0]["fileNames"] == "ReCoKDPhantom.nrrd"
    sample = Path(uri[len("file://"):])
    assert sample.is_file() and sample.is_relative_to(tmp_path / "home")  # generated, in the per-user folder
    assert Path(registered[0]["thumbnailFileName"]).is_file()
    # the sample loads and is segmented by the shipped phantom model with its named, coded structures
    logic = module.ReCoKDLogic(modelsFolder=tmp_path / "models")
    volume = logic.loadSample()
    node = logic.segment([volume], module.SAMPLE_MODEL, device="cpu")
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["organ", "kidney", "vessel", "lesion"]


def _run_timer(widget, seconds=180):
    deadline = time.monotonic() + seconds
    while widget._timer.active:
        widget.onTimer()
        assert time.monotonic() < deadline, "the segmentation never finished"
        time.sleep(0.05)


def test_the_model_card_comes_before_a_models_first_segment_and_stays_one_click_away(gui, tmp_path):
    module, scene, errors = gui
    boxes = slicer_standins.QMessageBox
    slicer.util.addVolumeFromArray((np.random.default_rng(0).random((12, 14, 16)) * 100).astype(np.float32), name="CT")
    models_folder = tmp_path / "home" / "models"
    models_folder.mkdir(parents=True)
    _tiny_bundle(models_folder)
    widget = _new_widget(module)
    ui, p = widget.ui, widget._parameterNode
    p.model = "tiny"
    # one click: the whole card, the same rows `recokd models` prints
    boxes.answers = ["Close"]
    ui.modelCardButton.click()
    title, text, buttons = boxes.shown[-1]
    from ReCoKDLib.deployment.bundle import load_bundle
    from ReCoKDLib.deployment.card import model_card

    assert title == "Model card: tiny" and buttons == ["Close"]
    for heading, line in model_card(load_bundle(models_folder / "tiny.recokd")):
        assert f"<b>{heading}</b></td><td>{module._escape(line)}</td>" in text, heading
    # the first Segment shows it first; Cancel runs nothing and is asked again next time
    boxes.answers = ["Cancel"]
    ui.segmentButton.click()
    assert boxes.shown[-1][0] == "Model card: tiny" and boxes.shown[-1][2] == ["Segment", "Cancel"]
    assert "intended use" in boxes.shown[-1][1] and widget.logic.segmentationTask is None
    assert ui.segmentButton.text == "Segment" and not widget._timer.active
    boxes.answers = ["Segment"]
    ui.segmentButton.click()
    _run_timer(widget)
    assert errors == [] and scene.GetFirstNodeByName("CT – tiny") is not None
    # seen once: the next Segment asks nothing (an unexpected box fails the stand-in), in a new panel too
    shown = len(boxes.shown)
    widget2 = _new_widget(module)
    widget2._parameterNode.model = "tiny"
    widget2.ui.segmentButton.click()
    _run_timer(widget2)
    assert len(boxes.shown) == shown and errors == []
    # a changed card is a new card
    from ReCoKDLib.deployment.bundle import bundle_from_network

    plans = tiny_plans(num_classes=3, spacing=(1.0, 1.0, 1.0))
    changed = bundle_from_network(tiny_network(plans, seed=3), plans, "tiny")
    changed.manifest["card"] = {"limitations": "a new finding"}
    changed.save(models_folder / "tiny.recokd", overwrite=True)
    widget2._modelInfoCache = (None, None)
    assert not widget2.logic.modelCardSeen("tiny")


def test_input_check_findings_ask_segment_anyway_or_cancel(gui, tmp_path):
    """A volume unlike the model's training data (la2018-left-atrium: 1.25 mm crops around the atrium; here
    3 mm slices) stops before the network runs, with the findings and 'Segment anyway' / 'Cancel'."""
    module, scene, errors = gui
    boxes = slicer_standins.QMessageBox
    rng = np.random.default_rng(2)
    volume = slicer.util.addVolumeFromArray((rng.random((20, 64, 48)) * 100).astype(np.float32), name="LGE")
    volume.SetSpacing(1.25, 1.25, 3.0)  # x, y, z: the slices are 3 mm apart, training's at most 1.25
    widget = _new_widget(module)
    ui, p = widget.ui, widget._parameterNode
    p.model, p.inputVolume = "la2018-left-atrium", volume
    boxes.answers = ["Segment", "Cancel"]  # the card, then the findings
    ui.segmentButton.click()
    _run_timer(widget)
    title, text, buttons = boxes.shown[-1]
    assert title == "The input is unlike the model's training data" and buttons == ["Segment anyway", "Cancel"]
    assert "volume 'LGE'" in text and "far from the training range" in text and "/tmp" not in text
    assert scene.GetFirstNodeByName("LGE – la2018-left-atrium") is None and errors == []
    assert "cancelled after the input checks" in ui.statusLabel.text and ui.segmentButton.text == "Segment"
    # Segment anyway: the same request again, without the checks
    boxes.answers = ["Segment anyway"]
    ui.segmentButton.click()
    _run_timer(widget)  # the findings again, answered; then the segmentation itself
    assert errors == [] and not boxes.answers  # run with --force: a second question would have failed the stand-in
    first = scene.GetFirstNodeByName("LGE – la2018-left-atrium")
    assert first is not None and p.outputSegmentation is first  # the result is the panel's output now
    assert ui.outputSegmentationSelector.currentNode() is first  # and the selector shows it
    # the checkbox skips the checks up front: no question at all; the result replaces the first (no second node)
    p.skipInputChecks = True
    ui.segmentButton.click()
    _run_timer(widget)
    assert list(scene.GetNodesByClass("vtkMRMLSegmentationNode")) == [first] and errors == []
    assert first.GetSegmentation().GetNumberOfSegments() == 1 and not boxes.answers


def test_a_spacing_less_model_refuses_a_real_spacing_volume_in_one_line_in_the_console(gui, tmp_path):
    """acdc-heart was trained without physical spacing: a scan with its scanner spacing is refused (it scored
    0.465) unless forced; the message speaks of the console's force=True, not of --force."""
    module, scene, errors = gui
    volume = slicer.util.addVolumeFromArray(np.random.default_rng(3).random((8, 40, 40)).astype(np.float32), name="Cine")
    volume.SetSpacing(1.5, 1.5, 10.0)
    logic = module.ReCoKDLogic(modelsFolder=tmp_path / "models")
    with pytest.raises(module.ReCoKDError) as info:
        logic.segment([volume], "acdc-heart", device="cpu")
    message = str(info.value)
    assert "without physical spacing" in message and "force=True" in message and "--force" not in message
    assert "\n" not in message and scene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None
    # confirmWarnings: the same finding, as the panel's question would show it
    task = logic.segment([volume], "acdc-heart", device="cpu", confirmWarnings=True, wait=False)
    while task.poll() == "running":
        time.sleep(0.05)
    assert len(task.inputWarnings) == 1 and "without physical spacing" in task.inputWarnings[0]
    node = logic.segment([volume], "acdc-heart", device="cpu", force=True)
    assert node is not None


def test_developer_reload_imports_the_modules_package_anew(gui, monkeypatch):
    """Slicer's Reload re-runs ReCoKD.py only; the widget drops ReCoKDSlicer.* first so they are re-imported."""
    import importlib

    module, _, _ = gui
    widget = _new_widget(module)
    reloaded = []
    monkeypatch.setattr(slicer.util, "reloadScriptedModule", reloaded.append)
    saved = {n: m for n, m in sys.modules.items() if n == "ReCoKDSlicer" or n.startswith("ReCoKDSlicer.")}
    old = sys.modules["ReCoKDSlicer.logic"]
    try:
        widget.onReload()
        assert reloaded == ["ReCoKD"]
        assert importlib.import_module("ReCoKDSlicer.logic") is not old
    finally:
        sys.modules.update(saved)  # the other tests keep the classes they imported


def test_a_result_shows_its_volume_only_where_no_view_shows_it(gui, monkeypatch):
    """The user's slice-view layers stay as they are when a view already shows the segmented volume."""
    from types import SimpleNamespace

    module, scene, _ = gui
    widget = _new_widget(module)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR")
    shown = []
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: shown.append(kw))
    task = SimpleNamespace(segmentationNode=object(), volumeNodes=[volume], message="done", inputWarnings=[])
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetBackgroundVolumeID(other.GetID())
    widget.onSegmentFinished(task)  # the views show another volume: the result's volume is brought up
    assert shown == [{"background": volume}]
    composite.SetForegroundVolumeID(volume.GetID())
    widget.onSegmentFinished(task)  # already shown (as foreground): nothing changes
    assert len(shown) == 1


def _widget_with_the_tiny_model(module, tmp_path):
    """A panel with the tiny model (in the per-user models folder) and an 8³ volume selected."""
    models_folder = Path(tmp_path / "home" / "models")
    models_folder.mkdir(parents=True)
    _tiny_bundle(models_folder)
    volume = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.float32), name="CT")
    widget = _new_widget(module)
    widget._parameterNode.model, widget._parameterNode.inputVolume = "tiny", volume
    return widget, volume


def test_segment_takes_its_choices_from_the_parameter_node_not_the_controls(gui, tmp_path):
    """The parameter node is the state: controls that disagree with it (signals blocked) are not read."""
    module, scene, _ = gui
    widget, volume = _widget_with_the_tiny_model(module, tmp_path)
    ui, p, logic = widget.ui, widget._parameterNode, widget.logic
    p.inputVolume, p.tta, p.skipInputChecks, p.show3D, p.device = volume, True, True, False, "cpu"
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "earlier result")
    p.outputSegmentation, p.skippedStructures = output, ["kidney"]
    for box, value in ((ui.ttaCheckBox, False), (ui.skipInputChecksCheckBox, False), (ui.show3DCheckBox, True)):
        box.blockSignals(True)
        box.checked = value  # the control now disagrees with the node
        box.blockSignals(False)
    calls = []
    logic.segment = lambda volumes, model, **kw: calls.append((volumes, model, kw))
    logic.markModelCardSeen("tiny")
    widget._ensureDependencies = lambda model="": True
    ui.segmentButton.click()
    widget._timer.stop()
    assert len(calls) == 1
    volumes, model, kw = calls[0]
    assert volumes == [volume] and model == "tiny"
    assert (kw["tta"], kw["force"], kw["show3D"], kw["device"]) == (True, True, False, "cpu")
    assert kw["outputSegmentation"] is output and kw["structures"] == ["organ"]


def test_the_fast_box_names_the_models_fast_variant_and_segment_passes_it_on(gui, tmp_path, monkeypatch):
    """*Fast* is offered where the model list names a fast variant (a registry entry's ``fast``), stored in the
    parameter node, and handed to the logic's segment()."""
    from ReCoKDLib.deployment.registry import make_entry

    module, scene, _ = gui
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    tiny = _tiny_bundle(bundles)
    entries = [make_entry(tiny, name="tiny-reg"), make_entry(tiny, name="tiny-reg-fast")]
    entries[0]["fast"] = "tiny-reg-fast"
    (tmp_path / "registry.json").write_text(json.dumps({"version": 1, "models": entries}))
    monkeypatch.setenv("RECOKD_REGISTRY", str(tmp_path / "registry.json"))
    widget, volume = _widget_with_the_tiny_model(module, tmp_path)
    ui, p, logic = widget.ui, widget._parameterNode, widget.logic
    assert not p.fast and not ui.fastCheckBox.checked
    assert ui.fastCheckBox.text == "Fast (this model has no fast variant)" and not ui.fastCheckBox.enabled  # "tiny"
    p.model = "tiny-reg"
    assert ui.fastCheckBox.text == "Fast (tiny-reg-fast)" and ui.fastCheckBox.enabled
    ui.fastCheckBox.checked = True  # GUI -> node
    assert p.fast is True
    calls, asked = [], []
    logic.segment = lambda volumes, model, **kw: calls.append((model, kw))
    widget._ensureDependencies = lambda model="": asked.append(model) or True
    slicer_standins.QMessageBox.answers = ["Segment"]
    ui.segmentButton.click()
    widget._timer.stop()
    assert [(m, kw["fast"]) for m, kw in calls] == [("tiny-reg", True)]
    # what runs is the fast model: its card comes first, and its dependencies are the ones checked
    assert slicer_standins.QMessageBox.shown[-1][0] == "Model card: tiny-reg-fast" and asked == ["tiny-reg-fast"]
    assert logic.modelCardSeen("tiny-reg-fast") and not logic.modelCardSeen("tiny-reg")
    p.model = "tiny"  # a model without one: the box says so, and stays enabled while checked (to be unticked)
    assert ui.fastCheckBox.text == "Fast (this model has no fast variant)" and ui.fastCheckBox.enabled
    p.fast = False
    assert not ui.fastCheckBox.enabled and not ui.fastCheckBox.checked


def test_the_structure_list_follows_the_model_and_the_parameter_node(gui, tmp_path):
    """Unticking a structure is stored in the parameter node (and back); with none ticked Segment is off."""
    module, scene, _ = gui
    widget, _volume = _widget_with_the_tiny_model(module, tmp_path)
    ui, p = widget.ui, widget._parameterNode
    combo = ui.structuresComboBox
    assert [combo.itemText(i) for i in range(combo.count)] == ["organ", "kidney"] and combo.allChecked()
    assert list(p.skippedStructures) == [] and ui.segmentButton.enabled
    combo.setCheckState(combo.model().index(1, 0), slicer_standins.Qt.Unchecked)  # the user unticks kidney
    assert list(p.skippedStructures) == ["kidney"]
    p.skippedStructures = ["organ", "kidney"]  # e.g. a saved scene, or the console
    assert combo.noneChecked() and not ui.segmentButton.enabled
    p.skippedStructures = []
    assert combo.allChecked() and ui.segmentButton.enabled
    p.model = "la2018-left-atrium"  # another model: its own structures
    assert [combo.itemText(i) for i in range(combo.count)] == ["left_atrium"]


def test_the_segment_progress_bar_moves_while_the_windows_run(gui, tmp_path):
    module, scene, errors = gui
    models_folder = Path(tmp_path / "home" / "models")
    models_folder.mkdir(parents=True)
    _tiny_bundle(models_folder)
    volume = slicer.util.addVolumeFromArray(np.random.default_rng(1).random((40, 40, 40)).astype(np.float32), name="CT")
    widget = _new_widget(module)
    ui, p, logic = widget.ui, widget._parameterNode, widget.logic
    p.model, p.inputVolume, p.show3D = "tiny", volume, False
    logic.markModelCardSeen("tiny")
    logic.debugDelay = 0.05  # seconds per sliding window, so that the timer sees the run between its ends
    ui.segmentButton.click()
    seen = set()
    deadline = time.monotonic() + 180
    while widget._timer.active:
        widget.onTimer()
        if ui.segmentProgressBar.visible:
            seen.add(ui.segmentProgressBar.value)
        assert time.monotonic() < deadline, "the segmentation never finished"
        time.sleep(0.05)
    assert errors == [], errors
    assert scene.GetFirstNodeByName("CT – tiny") is not None
    assert any(0 < v < 100 for v in seen), sorted(seen)  # it moved, before the end
    widget.exit()


def test_every_control_has_a_tooltip():
    """Each control the user can touch or read (inputs, buttons, progress bars, the log) says what it does."""
    import xml.etree.ElementTree as ET

    passive = {"QLabel", "QWidget", "qMRMLWidget", "ctkCollapsibleButton", "QGroupBox", "QFrame"}
    missing = [w.get("name") for w in ET.parse(MODULE_FILE.parent / "Resources" / "UI" / "ReCoKD.ui").iter("widget")
               if w.get("class") not in passive
               and not any(p.get("name") == "toolTip" and (p.findtext("string") or "").strip() for p in w.findall("property"))]
    assert missing == []


def test_the_panel_shows_a_registry_models_download(gui):
    """While the model is fetched (before the network runs), the bar and the status show the download."""
    from types import SimpleNamespace

    module, _, _ = gui
    widget = _new_widget(module)
    job = SimpleNamespace(download=(5_000_000, 10_000_000), device="", elapsed=1.0, frame=(0, 0))
    widget.logic.segmentationTask = SimpleNamespace(poll=lambda: "running", state="running", progress=0.0, job=job)
    widget._timer.start()
    widget.onTimer()
    assert widget.ui.segmentProgressBar.value == 50
    assert widget.ui.statusLabel.text == "Downloading the model: 5.0 of 10.0 MB"
    job.device = "cpu"  # the network runs: the bar is the segmentation's again
    widget.onTimer()
    assert widget.ui.segmentProgressBar.value == 0 and widget.ui.statusLabel.text.startswith("Segmenting on cpu")
    widget.logic.segmentationTask = None
    widget._timer.stop()


def test_a_sequence_input_offers_all_frames_and_the_status_counts_them(gui):
    """A volume shown by a sequence browser (a cine): the 'All N frames' switch appears (bound to the
    parameter node), and while the frames run the status says which one."""
    from types import SimpleNamespace

    module, scene, _ = gui
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    static = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), name="CT")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    for t in range(3):
        frame = slicer.util.addVolumeFromArray(np.full((4, 5, 6), t, np.float32), name=f"frame {t}")
        sequence.SetDataNodeAtValue(frame, str(t))
        scene.RemoveNode(frame)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    sequences.UpdateProxyNodesFromSequences(browser)
    widget = _new_widget(module)
    ui, p = widget.ui, widget._parameterNode
    p.inputVolume = static
    assert not ui.allFramesCheckBox.visible
    p.inputVolume = browser.GetProxyNode(sequence)
    assert ui.allFramesCheckBox.visible and ui.allFramesCheckBox.text == "All 3 frames" and p.allFrames
    ui.allFramesCheckBox.click()
    assert p.allFrames is False
    job = SimpleNamespace(download=(0, 0), device="cpu", elapsed=3.0, frame=(2, 3))
    widget.logic.segmentationTask = SimpleNamespace(poll=lambda: "running", state="running", progress=0.5, job=job)
    widget._timer.start()
    widget.onTimer()
    assert ui.statusLabel.text == "Segmenting frame 2 of 3 on cpu: 3 s" and ui.segmentProgressBar.value == 50
    widget.logic.segmentationTask = None


def test_add_model_folder_lists_an_nnunet_results_folder_with_its_folds(gui, tmp_path):
    """*Add model folder…* takes an nnU-Net v2 results folder: it is listed and selected, its channels and
    structures come from its dataset.json, and the Folds box appears (saying which folds there are); an
    incomplete folder is one message and changes nothing."""
    from ReCoKDLib.deployment.nnunet_export import export_nnunet

    module, scene, errors = gui
    folder = export_nnunet(_tiny_bundle(tmp_path), tmp_path / "results", dataset_id=12)
    widget = _new_widget(module)
    ui, p = widget.ui, widget._parameterNode
    assert not ui.nnunetFoldsLineEdit.visible  # a ReCoKD model is selected
    slicer_standins.QFileDialog.answers = [str(folder.parent)]  # the Dataset012_Tiny folder
    ui.addModelFolderButton.click()
    assert errors == [] and p.model == str(folder.parent) and widget._modelSources[-1].name == "Dataset012_Tiny"
    assert ui.nnunetFoldsLineEdit.visible and ui.nnunetFoldsLineEdit.placeholderText == "all: 0"
    # Segment with it installs nnU-Net's network classes too (when missing), the dataset folder as for ReCoKD's
    from ReCoKDSlicer import dependencies

    asked = []
    real_missing = dependencies.missingDependencies
    try:
        dependencies.missingDependencies = lambda nnunet=False: asked.append(nnunet) or []
        assert widget._ensureDependencies(p.model) and widget._ensureDependencies(str(folder))
        assert widget._ensureDependencies(str(tmp_path / "tiny.recokd")) and widget._ensureDependencies("")
    finally:
        dependencies.missingDependencies = real_missing
    assert asked == [True, True, False, False]
    combo = ui.structuresComboBox
    assert [combo.itemText(i) for i in range(combo.count)] == ["organ", "kidney"]
    p.inputVolume = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.float32), name="MR")
    p.nnunetFolds = "0"  # the Folds box
    calls = []
    widget.logic.segment = lambda volumes, model, **kw: calls.append(kw)
    widget.logic.markModelCardSeen(p.model)
    widget._ensureDependencies = lambda model="": True
    ui.segmentButton.click()
    widget._timer.stop()
    assert len(calls) == 1 and calls[0]["folds"] == "0"  # the chosen folds reach the segmentation
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(folder.parent, broken)
    (broken / folder.name / "fold_0" / "checkpoint_final.pth").unlink()
    count = len(widget._modelSources)
    slicer_standins.QFileDialog.answers = [str(broken)]
    ui.addModelFolderButton.click()
    assert len(errors) == 1 and "has no fold_*/checkpoint_final.pth; train a fold first, or copy the whole" in errors[0]
    assert len(widget._modelSources) == count and p.model == str(folder.parent)


def test_the_panel_shows_the_engine_note_for_the_chosen_device(gui, tmp_path):
    """The note under the device list follows the chosen device (the logic's engineNote)."""
    widget, _volume = _widget_with_the_tiny_model(gui[0], tmp_path)
    widget.logic.devicesSeen = {"cuda"}  # an earlier segmentation ran on the GPU
    widget._parameterNode.device = "cpu"
    assert "although this computer has a CUDA GPU" in widget.ui.engineNoteLabel.text
    widget._parameterNode.device = "auto"
    assert widget.ui.engineNoteLabel.text == ""


def test_the_device_list_offers_mps_only_where_pytorch_has_it(gui, monkeypatch):
    """auto / cpu / cuda everywhere; Apple's Metal (mps) on Apple-silicon Macs only, unless a saved scene
    chose it (kept, so the choice is not silently changed; Segment then refuses it in one line)."""
    module = gui[0]
    combo_items = lambda w: [w.ui.deviceComboBox.itemText(i) for i in range(w.ui.deviceComboBox.count)]  # noqa: E731
    monkeypatch.setattr(module, "_MACHINE_OFFERS_MPS", False)
    widget = _new_widget(module)
    assert combo_items(widget) == ["auto", "cpu", "cuda"]
    widget.ui.deviceComboBox.currentIndex = 2  # the binding still reads each choice right
    assert widget._parameterNode.device == "cuda"
    widget._parameterNode.device = "mps"  # (a scene saved on a Mac)
    widget.setParameterNode(widget._parameterNode)
    assert combo_items(widget) == ["auto", "cpu", "cuda", "mps"] and widget.ui.deviceComboBox.currentText == "mps"
    widget._parameterNode.device = "auto"
    monkeypatch.setattr(module, "_MACHINE_OFFERS_MPS", True)
    widget.setParameterNode(widget._parameterNode)
    assert combo_items(widget) == ["auto", "cpu", "cuda", "mps"]


def test_the_teacher_folds_box_shows_for_an_nnunet_teacher_only(gui, tmp_path):
    from ReCoKDLib.deployment.nnunet_export import export_nnunet

    folder = export_nnunet(_tiny_bundle(tmp_path), tmp_path / "results", dataset_id=13)
    widget = _new_widget(gui[0])
    ui, p = widget.ui, widget._parameterNode
    assert not ui.teacherFoldsLineEdit.visible
    p.teacherPath = str(folder.parent)  # an nnU-Net teacher (its dataset folder)
    assert ui.teacherFoldsLineEdit.visible and ui.teacherFoldsLabel.visible
    p.trainTeacherFirst = True  # the teacher will be trained here: no folds
    assert not ui.teacherFoldsLineEdit.visible
    p.trainTeacherFirst, p.teacherPath = False, str(tmp_path)  # a plain folder
    assert not ui.teacherFoldsLineEdit.visible
