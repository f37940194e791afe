"""The 3D Slicer module's logic under plain Python, with the real MRML data model from ``slicer-core``.

No Qt here: the Widget is covered by static checks (the .ui file has every widget the code uses, the
parameter-node bindings name real fields, the file compiles); the Slicer-application self-test
(``ReCoKDTest``) must at least compile. The segment path runs for real: volume node -> temporary
NRRD -> ``python -m ReCoKDLib.inference.slicer_bridge`` in a background process -> segmentation node.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core, or .[test])")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ReCoKD"
sys.path.insert(0, str(MODULE_DIR))

import ReCoKD as module  # noqa: E402
from bundle_helpers import tiny_network, tiny_plans  # noqa: E402
from ReCoKDLib.deployment.bundle import bundle_from_network  # noqa: E402
from ReCoKDLib.inference.predictor import Predictor  # noqa: E402
from ReCoKDSlicer import jobs  # noqa: E402

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _oblique_ijk_to_ras() -> np.ndarray:
    """Oblique rotation (30° about one axis, 20° about another), anisotropic spacing, offset origin."""
    a, b = np.deg2rad(30), np.deg2rad(20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = (rz @ rx) @ np.diag([0.8, 1.2, 2.5])
    m[:3, 3] = (-31.0, 14.5, 120.25)
    return m


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slicer")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene  # slicer.util's helpers use the global scene
    # Slicer's Segmentations module registers the labelmap -> surface converter at start; slicer-core does not
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not any(isinstance(r, slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule) for r in factory.GetConverterRules()):
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())  # as Slicer's Sequences module does
    plans = tiny_plans(num_classes=3, spacing=(1.0, 1.0, 1.0))
    colors = {"background": [0, 0, 0], "organ": [0.9, 0.1, 0.2], "kidney": [0.1, 0.7, 0.3]}
    # a reference direction makes the predictor reorient the input: a wrong RAS->LPS conversion would show
    bundle = bundle_from_network(tiny_network(plans, seed=3), plans, "tiny", colors=colors, reference_direction=IDENTITY)
    bundle_path = bundle.save(folder / "tiny.recokd")
    plans2 = tiny_plans(num_classes=3, channels=2)
    bundle2_path = bundle_from_network(tiny_network(plans2), plans2, "twochannel").save(folder / "twochannel.recokd")
    rng = np.random.default_rng(0)
    array = (rng.random((18, 22, 26)) + np.linspace(0, 1, 26)[None, None, :]).astype(np.float32)  # (K, J, I), no symmetry
    volume = slicer.util.addVolumeFromArray(array, ijkToRAS=_oblique_ijk_to_ras(), name="CT")
    logic = module.ReCoKDLogic(scene=scene, modelsFolder=folder / "models", registries=[])
    yield {"scene": scene, "folder": folder, "bundle": bundle, "bundle_path": bundle_path, "bundle2_path": bundle2_path,
           "array": array, "volume": volume, "logic": logic}
    if getattr(slicer, "mrmlScene", None) is scene:
        del slicer.mrmlScene


def _expected_labels(bundle, array: np.ndarray) -> np.ndarray:
    """The predictor's labels for the same voxels, the LPS geometry derived here independently."""
    m = _oblique_ijk_to_ras()
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction_lps = np.diag([-1, -1, 1]) @ (m[:3, :3] / spacing)
    origin_lps = np.array([-m[0, 3], -m[1, 3], m[2, 3]])
    predictor = Predictor(bundle, device="cpu")
    return predictor.predict_array(array, spacing, origin_lps, direction_lps.ravel())


def _segment_on_volume_grid(scene, node, segment_id, volume) -> np.ndarray:
    """A segment exported onto the volume's voxel grid (K, J, I), as Slicer's Segmentations module does."""
    import vtk

    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    try:
        assert segmentations_logic.ExportSegmentsToLabelmapNode(node, ids, labelmap, volume)
        return np.array(slicer.util.arrayFromVolume(labelmap), copy=True)
    finally:
        scene.RemoveNode(labelmap)


def _dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s


def test_segment_matches_predictor_in_volume_geometry(env):
    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    item = sh.GetItemByDataNode(volume)
    if item:  # in the Slicer application every node has an item; slicer-core creates none by itself
        sh.SetItemParent(item, study)
    else:
        sh.CreateItem(study, volume)
    expected = _expected_labels(env["bundle"], env["array"])
    # the check is only meaningful when the labels are varied and not symmetric under an axis flip
    assert 0.05 < (expected == 1).mean() < 0.95 or 0.05 < (expected == 2).mean() < 0.95
    assert all((expected != np.flip(expected, axis=a)).mean() > 0.02 for a in range(3))

    before = scene.GetNumberOfNodes()
    fractions = []
    node = logic.segment([volume], env["bundle_path"], device="cpu", progress=fractions.append)
    assert node is not None and node.GetName() == "CT – tiny"
    assert fractions and fractions[-1] == 1.0
    assert node.GetAttribute("ReCoKD.device") == "cpu" and float(node.GetAttribute("ReCoKD.seconds")) > 0
    assert "on cpu" in logic.lastMessage and "CT – tiny" in logic.lastMessage
    assert scene.GetNumberOfNodes() > before
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["organ", "kidney"]
    for name, value in (("organ", 1), ("kidney", 2)):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        assert np.allclose(segment.GetColor(), env["bundle"].labels.colors[name], atol=1e-6)
        got = _segment_on_volume_grid(env["scene"], node, segmentation.GetSegmentIdBySegmentName(name), volume)
        assert got.shape == expected.shape
        want = expected == value
        assert _dice(got > 0, want) >= 0.99, name
        assert (got > 0).sum() == want.sum()
    ref = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert ref is volume
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert logic.segmentationTask is None  # finished and cleaned up
    surface = "Closed surface"
    assert segmentation.ContainsRepresentation(surface)  # shown in 3D
    scene.RemoveNode(node)
    flat = logic.segment([volume], env["bundle_path"], device="cpu", show3D=False)  # the panel's Show 3D unticked
    assert not flat.GetSegmentation().ContainsRepresentation(surface) and flat.GetSegmentation().GetNumberOfSegments() == 2
    scene.RemoveNode(flat)


def test_wrong_number_of_volumes_is_refused(env):
    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    before = scene.GetNumberOfNodes()
    with pytest.raises(module.ReCoKDError, match=r"needs 2 input volume\(s\) \(MRI0, MRI1\) but 1 were given"):
        logic.segment([volume], env["bundle2_path"], device="cpu")
    with pytest.raises(module.ReCoKDError, match="needs 1 input volume"):
        logic.segment([volume, volume], env["bundle_path"], device="cpu")
    with pytest.raises(module.ReCoKDError, match="device must be one of"):
        logic.segment([volume], env["bundle_path"], device="tpu")
    assert scene.GetNumberOfNodes() == before
    assert logic.segmentationTask is None


def test_failed_job_leaves_scene_unchanged_with_one_message(env, tmp_path):
    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    broken = tmp_path / "broken.recokd"
    with zipfile.ZipFile(env["bundle_path"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:-8] + b"corrupt!" if name == "weights.safetensors" else data)
    before = scene.GetNumberOfNodes()
    with pytest.raises(module.ReCoKDError) as info:
        logic.segment([volume], broken, device="cpu")
    message = str(info.value)
    assert "sha256" in message and "\n" not in message
    assert scene.GetNumberOfNodes() == before


def test_cancel_kills_process_tree_and_leaves_scene(env):
    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    before = scene.GetNumberOfNodes()
    logic.debugDelay = 5.0  # seconds per window: the job cannot finish before we cancel
    finished = []
    try:
        task = logic.segment([volume], env["bundle_path"], device="cpu", wait=False, onFinished=finished.append)
    finally:
        logic.debugDelay = 0.0
    deadline = time.monotonic() + 120
    while not any(line.startswith("PROGRESS") for line in task.job.lines):
        assert task.poll() == jobs.RUNNING, task.job.error
        assert time.monotonic() < deadline, "the segmentation process never reported progress"
        time.sleep(0.1)
    pid, tmpdir = task.job.pid, task.tmpdir
    logic.cancel()
    assert task.state == jobs.CANCELLED
    assert finished == [task] and "cancelled" in task.message
    assert not jobs.processGroupAlive(pid)
    assert not Path(tmpdir).exists()
    assert scene.GetNumberOfNodes() == before
    assert logic.segmentationTask is None


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX process groups")
def test_cancel_kills_grandchildren(tmp_path):
    job = jobs.BackgroundJob(["/bin/sh", "-c", "sleep 60 & sleep 60 & echo started; wait"], name="sleepers").start()
    deadline = time.monotonic() + 20
    while "started" not in job.lines and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.poll() == jobs.RUNNING
    job.cancel()
    assert job.state == jobs.CANCELLED
    assert not jobs.processGroupAlive(job.pid)


def test_bad_registry_entry_is_skipped_with_a_warning(env, tmp_path):
    good = {"name": "good-model", "url": "good.recokd", "sha256": "a" * 64, "description": "fine"}
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"version": 1, "models": [
        good,
        {"name": "bad sha", "url": "x.recokd", "sha256": "not-a-hash"},
        "not an object",
        {"name": "good-model", "url": "dup.recokd", "sha256": "b" * 64},
    ]}))
    unreadable = tmp_path / "broken.json"
    unreadable.write_text("{not json")
    logic = module.ReCoKDLogic(scene=env["scene"], modelsFolder=env["folder"], registries=[registry, unreadable, tmp_path / "missing.json"])
    sources = logic.availableModels()
    registry_names = [s.name for s in sources if s.kind == "registry"]
    assert registry_names == ["good-model"]
    assert {"tiny", "twochannel"} <= {s.name for s in sources if s.kind == "file"}
    assert len(logic.warnings) == 5
    assert any("entry 1" in w and "skipped" in w for w in logic.warnings)
    assert any("broken.json" in w for w in logic.warnings)
    # a registry model is fetched by the background process: its channels are not known in advance
    assert logic.modelInfo("good-model") is None
    info = logic.modelInfo(env["bundle_path"])
    assert info.numChannels == 1 and info.labels == {"background": 0, "organ": 1, "kidney": 2}
    # once fetched, its verified copy in the models folder (the cache) is the registry entry, listed once
    copy = Path(env["folder"]) / f"good-model-{'a' * 12}.recokd"
    shutil.copyfile(env["bundle_path"], copy)
    try:
        names = [s.name for s in logic.availableModels()]
        assert names.count("good-model") == 1 and copy.stem not in names
        assert logic.modelInfo("good-model").labels == info.labels
    finally:
        copy.unlink()


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in for Slicer's python: `-m ReCoKDLib.cli distill|train|export ...` without torch."""
    script = tmp_path / "fakepython"
    script.write_text(f"""#!{sys.executable}
import os, sys, pathlib, time
args = sys.argv[sys.argv.index("ReCoKDLib.cli") + 1:]
out = pathlib.Path(args[args.index("-o") + 1])
if args[0] == "export":
    time.sleep(float(os.environ.get("FAKE_EXPORT_SECONDS", "0")))
    out.write_bytes(b"bundle")
    print("bundle:", out)
    print("ARGS", " ".join(args))
    sys.exit(0)
out.mkdir(parents=True, exist_ok=True)
epochs = int(args[args.index("--epochs") + 1])
rows = ["epoch,lr,loss_seg,loss_kd,dice_mean"]
for e in range(1, epochs + 1):
    rows.append(f"{{e}},0.01,{{1.0 / e}},{{0.5 / e}},{{0.2 * e}}")
    (out / "log.csv").write_text("\\n".join(rows) + "\\n")
    print("epoch", e, flush=True)
print("ARGS", " ".join(args))
""")
    script.chmod(0o755)
    return script


@pytest.mark.skipif(sys.platform.startswith("win"), reason="uses a POSIX script as the interpreter")
def test_stop_during_the_export_ends_the_task_once_and_resume_exports(env, tmp_path, monkeypatch):
    from ReCoKDSlicer import logic as slicer_logic

    monkeypatch.setattr(slicer_logic, "pythonExecutable", lambda: str(_fake_python(tmp_path)))
    monkeypatch.setenv("FAKE_EXPORT_SECONDS", "60")
    models_folder = tmp_path / "models"
    logic = module.ReCoKDLogic(scene=env["scene"], modelsFolder=models_folder, registries=[])
    ended = []
    task = logic.distill(str(tmp_path / "Dataset001"), str(tmp_path / "teacher"), epochs=2,
                         outputFolder=str(tmp_path / "student"), device="cpu", wait=False, onFinished=ended.append)
    deadline = time.monotonic() + 60
    while task._exportJob is None:  # the training ends, the export starts (and takes its time)
        task.poll()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert task.state == jobs.RUNNING and ended == []
    logic.stopTraining()
    assert ended == [task] and task.state == jobs.CANCELLED and task.bundlePath is None
    assert "Resume exports" in task.message and not list(models_folder.glob("*.recokd"))
    for _ in range(3):  # later polls (the widget's timer) do not end it again, nor call it failed
        task.poll()
    assert ended == [task] and task.state == jobs.CANCELLED
    monkeypatch.setenv("FAKE_EXPORT_SECONDS", "0")
    again = logic.resumeTraining(wait=True)
    assert again.state == jobs.SUCCEEDED and again.bundlePath.is_file()
    # a stop during the training itself ends the task too (cancelled, onFinished once)
    monkeypatch.setenv("FAKE_EXPORT_SECONDS", "60")
    task3 = logic.distill(str(tmp_path / "Dataset001"), str(tmp_path / "teacher"), epochs=2,
                          outputFolder=str(tmp_path / "student3"), device="cpu", wait=False, onFinished=ended.append)
    logic.stopTraining()
    assert ended[1:] == [again, task3] and task3.state == jobs.CANCELLED  # (Resume keeps onFinished)


@pytest.mark.skipif(sys.platform.startswith("win"), reason="uses a POSIX script as the interpreter")
def test_distill_runs_in_background_and_exports_the_student(env, tmp_path, monkeypatch):
    from ReCoKDSlicer import logic as slicer_logic

    monkeypatch.setattr(slicer_logic, "pythonExecutable", lambda: str(_fake_python(tmp_path)))
    models_folder = tmp_path / "models"
    logic = module.ReCoKDLogic(scene=env["scene"], modelsFolder=models_folder, registries=[])
    seen = []
    task = logic.distill(str(tmp_path / "Dataset001"), str(tmp_path / "teacher"), method="msard", widthFactor=2,
                         epochs=3, outputFolder=str(tmp_path / "student"), device="cpu", wait=True,
                         progress=lambda t: seen.append(t.progress))
    assert task.state == jobs.SUCCEEDED
    assert [r["epoch"] for r in task.history] == [1.0, 2.0, 3.0]
    assert task.history[-1]["dice_mean"] == pytest.approx(0.6) and "loss_kd" in task.history[0]
    args = next(line for line in task.job.lines if line.startswith("ARGS")).split()[1:]
    assert args[0] == "distill" and args[args.index("--teacher") + 1] == str(tmp_path / "teacher")
    assert args[args.index("--method") + 1] == "msard" and float(args[args.index("--width-factor") + 1]) == 2.0
    # named by dataset, method, width and run (two students never share a model-list name)
    name = f"Dataset001_msard_R2_{hashlib.sha256(str((tmp_path / 'student').resolve()).encode()).hexdigest()[:6]}"
    assert task.bundlePath == models_folder / f"{name}.recokd" and task.bundlePath.is_file()
    assert name in [s.name for s in logic.availableModels()]
    # the bundle's own name (results and segment tags say it) is the file's, not the run folder's
    exported = next(line for line in task._exportJob.lines if line.startswith("ARGS")).split()[1:]
    assert exported[exported.index("--name") + 1] == name
    # resume restarts the same command with --resume
    task2 = logic.resumeTraining(wait=True)
    args2 = next(line for line in task2.job.lines if line.startswith("ARGS")).split()[1:]
    assert args2.count("--resume") == 1 and args2[:-2] == args[:-1]
    # the second export does not replace the first student's bundle (the overwrite rule): it takes a free name
    assert task2.bundlePath == models_folder / f"{name}-2.recokd" and (models_folder / f"{name}.recokd").is_file()
    exported = next(line for line in task2._exportJob.lines if line.startswith("ARGS")).split()[1:]
    assert exported[exported.index("--name") + 1] == f"{name}-2"
    other = logic.distill(str(tmp_path / "Dataset002"), str(tmp_path / "teacher"), method="msard", widthFactor=2,
                          epochs=1, outputFolder=str(tmp_path / "student"), device="cpu", wait=True)
    assert other.bundlePath.name.startswith("Dataset002_msard_R2_")  # another dataset: another name
    teacher = logic.trainTeacher(str(tmp_path / "Dataset001"), str(tmp_path / "teacher"), epochs=2, device="cpu")
    args3 = next(line for line in teacher.job.lines if line.startswith("ARGS")).split()[1:]
    assert teacher.state == jobs.SUCCEEDED and teacher.bundlePath is None and len(teacher.history) == 2
    assert args3[:4] == ["train", str(tmp_path / "Dataset001"), "-o", str(tmp_path / "teacher")]
    with pytest.raises(module.ReCoKDError, match="teacher"):
        logic.distill(str(tmp_path / "Dataset001"), None, wait=True)
    with pytest.raises(module.ReCoKDError, match="KD method"):
        logic.distill(str(tmp_path / "Dataset001"), "t", method="bogus")


@pytest.mark.skipif(sys.platform.startswith("win"), reason="uses a POSIX script as the interpreter")
def test_an_nnunet_results_folder_is_a_teacher_in_the_training_panel(env, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ReCoKDSlicer import logic as slicer_logic

    monkeypatch.setattr(slicer_logic, "pythonExecutable", lambda: str(_fake_python(tmp_path)))
    dataset = tmp_path / "Dataset001"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}")
    model = tmp_path / "nnUNet_results" / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (model / name).write_text("{}")
    logic = module.ReCoKDLogic(scene=env["scene"], modelsFolder=tmp_path / "models", registries=[])
    params = SimpleNamespace(datasetFolder=str(dataset), teacherPath=str(model.parent), trainTeacherFirst=False,
                             kdMethod="recokd", widthFactor=4.0, epochs=2, outputFolder=str(tmp_path / "student"),
                             device="cpu")
    task = logic.trainWithParameters(params, wait=True)
    args = next(line for line in task.job.lines if line.startswith("ARGS")).split()[1:]
    assert args[0] == "distill" and args[args.index("--teacher") + 1] == str(model.parent)
    task = logic.distill(str(dataset), str(model), epochs=1, outputFolder=str(tmp_path / "s2"), teacherFolds="0,1",
                         wait=True)
    args = next(line for line in task.job.lines if line.startswith("ARGS")).split()[1:]
    assert args[args.index("--teacher-folds") + 1] == "0,1"
    assert "--teacher-folds" not in next(line for line in logic.trainWithParameters(params, wait=True).job.lines
                                         if line.startswith("ARGS"))  # empty box: the library's default
    params.teacherFolds = "every"  # the panel's Teacher folds box
    args = next(line for line in logic.trainWithParameters(params, wait=True).job.lines if line.startswith("ARGS"))
    assert args.split()[args.split().index("--teacher-folds") + 1] == "every"
    params.trainTeacherFirst = True  # a teacher trained first is not an nnU-Net folder: one line
    with pytest.raises(module.ReCoKDError, match="teacher folds apply to nnU-Net teachers"):
        logic.trainWithParameters(params, wait=True)
    params.trainTeacherFirst, params.teacherFolds = False, ""
    params.teacherPath = str(tmp_path / "models")
    with pytest.raises(module.ReCoKDError, match="neither a training run folder .* nor an nnU-Net v2 results folder"):
        logic.trainWithParameters(params, wait=True)


def test_kd_methods_come_from_the_library_without_torch():
    """One list of method names, torch-free, that the panel and `recokd distill --method` both use."""
    import subprocess

    from ReCoKDLib.losses.registry import KD_METHODS

    assert module.KD_METHODS[:2] == ("auto", "recokd") and set(module.KD_METHODS[1:]) == set(KD_METHODS)
    code = "import sys, ReCoKDLib.kd_methods; assert 'torch' not in sys.modules, 'kd_methods imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- static checks of the GUI (no Qt here) -------------------------------------------------------


def _ui_widgets():
    tree = ET.parse(MODULE_DIR / "Resources" / "UI" / "ReCoKD.ui")
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    return tree, widgets


def test_ui_file_has_every_widget_the_code_uses():
    _, widgets = _ui_widgets()
    source = (MODULE_DIR / "ReCoKD.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no self.ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used in ReCoKD.py but absent from ReCoKD.ui: {missing}"


def test_ui_parameter_bindings_name_parameter_node_fields():
    tree, _ = _ui_widgets()
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    assert bound, "no widget is bound to the parameter node"
    source = (MODULE_DIR / "ReCoKD.py").read_text(encoding="utf-8")
    block = source[source.index("class ReCoKDParameterNode"):source.index("else:\n    ReCoKDParameterNode = None")]
    fields = set(re.findall(r"^\s+(\w+):", block, flags=re.M))
    assert set(bound.values()) <= fields, sorted(set(bound.values()) - fields)


def test_module_files_compile_and_selftest_exists(tmp_path):
    for path in [MODULE_DIR / "ReCoKD.py", *sorted((MODULE_DIR / "ReCoKDSlicer").glob("*.py"))]:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)
    assert issubclass(module.ReCoKDTest, module.ScriptedLoadableModuleTest)
    assert hasattr(module.ReCoKDTest, "runTest") and hasattr(module.ReCoKDTest, "test_segment_phantom")
    assert module.ReCoKDWidget and module.ReCoKD(None) is not None


def test_bridge_reports_errors_in_one_line(tmp_path, capsys):
    from ReCoKDLib.inference import slicer_bridge

    code = slicer_bridge.main(["segment", "--model", str(tmp_path / "nope.recokd"), "--inputs", str(tmp_path / "a.nrrd"),
                               "--output", str(tmp_path / "out.nrrd")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and out[-1].startswith("ERROR ") and "does not exist" in out[-1]


def test_bridge_asks_on_input_check_findings_and_force_skips_them(tmp_path, capsys):
    """--ask: the findings as CHECK lines and status 3 before the network runs (nothing written); no flag:
    warnings in the log and the labels written, as `recokd predict`; --force: no checks at all."""
    import numpy as np
    import SimpleITK as sitk

    from ReCoKDLib.inference import slicer_bridge

    model = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models" / "la2018-left-atrium.recokd"
    image = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 64, 48)) * 100).astype(np.float32))
    image.SetSpacing((1.25, 1.25, 3.0))  # 3 mm slices; the model saw at most 1.25 mm
    sitk.WriteImage(image, str(tmp_path / "lge.nrrd"))
    common = ["segment", "--model", str(model), "--inputs", str(tmp_path / "lge.nrrd"), "--device", "cpu", "--backend", "torch"]
    code = slicer_bridge.main(common + ["--output", str(tmp_path / "a.nrrd"), "--ask"])
    out = capsys.readouterr().out.splitlines()
    checks = [line for line in out if line.startswith("CHECK ")]
    assert code == 3 and checks and "far from the training range" in checks[0] and out[-1].startswith("ERROR ")
    assert not (tmp_path / "a.nrrd").exists() and not any(line.startswith("PROGRESS 0.5") for line in out)
    assert slicer_bridge.main(common + ["--output", str(tmp_path / "b.nrrd")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line[len("LOG warning: "):] for line in out if line.startswith("LOG warning: ")] == [c[6:] for c in checks]
    assert (tmp_path / "b.nrrd").is_file()
    assert slicer_bridge.main(common + ["--output", str(tmp_path / "c.nrrd"), "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any("warning" in line for line in out) and (tmp_path / "c.nrrd").is_file()


def test_dependency_check_installs_nothing_at_import():
    from ReCoKDSlicer import dependencies

    assert dependencies.missingDependencies() == []  # the test environment has everything
    assert any(p.startswith("numpy==") for p in dependencies.protectedPins())


def test_selftest_passes_under_slicer_core(monkeypatch, tmp_path):
    """The in-Slicer self-test (ReCoKDTest) also runs here, on its own scene, minus the GUI pauses."""
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))  # the sample is written under the per-user folder
    test = module.ReCoKDTest()
    test.delayDisplay = lambda message: None
    test.runTest()


def test_module_runs_from_a_source_checkout_without_recokd_installed(env, tmp_path):
    """Extension Wizard → Select Extension puts only ``<checkout>/ReCoKD`` on sys.path: the module must find
    ``<checkout>/ReCoKDLib`` itself, and segment with it (the background process included)."""
    import shutil
    import subprocess

    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("ReCoKD", "ReCoKDLib"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=ignore)
    script = tmp_path / "slicer_startup.py"
    script.write_text(f"""
import importlib.util, sys
# the test environment has recokd installed (editable); Slicer's Python does not: hide it
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r}, {str(MODULE_DIR)!r})]
for name in [n for n in sys.modules if n.startswith("ReCoKD")]:
    del sys.modules[name]
assert importlib.util.find_spec("ReCoKDLib") is None, "ReCoKDLib is still importable"
sys.path.insert(0, {str(checkout / "ReCoKD")!r})   # what Slicer adds for the selected module
import numpy as np, slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
import ReCoKD
assert ReCoKD.LIBRARY_ERROR == "", ReCoKD.LIBRARY_ERROR
import ReCoKDLib
assert ReCoKDLib.__file__.startswith({str(checkout)!r}), ReCoKDLib.__file__
volume = slicer.util.addVolumeFromArray(np.random.default_rng(0).random((10, 12, 14)).astype(np.float32), name="CT")
logic = ReCoKD.ReCoKDLogic(modelsFolder={str(tmp_path / "models")!r}, registries=[])
node = logic.segment([volume], {str(env["bundle_path"])!r}, device="cpu")
print("SEGMENTS", node.GetSegmentation().GetNumberOfSegments())
""")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SEGMENTS 2" in result.stdout


def test_a_missing_library_is_one_message_not_an_import_error(tmp_path):
    """Only the module folder, no ReCoKDLib anywhere: the module still imports and says what to do."""
    import shutil
    import subprocess

    shutil.copytree(MODULE_DIR, tmp_path / "ReCoKD", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r}, {str(MODULE_DIR)!r})]
sys.path.insert(0, {str(tmp_path / "ReCoKD")!r})
import slicer, ReCoKD
print("ERROR", ReCoKD.LIBRARY_ERROR)
try:
    ReCoKD.ReCoKDLogic(modelsFolder={str(tmp_path)!r}, registries=[]).segment([object()], "x")
except ReCoKD.ReCoKDError as exc:
    print("RAISED", exc)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ERROR ReCoKD cannot load its library ReCoKDLib (ModuleNotFoundError")
    assert "Extension Wizard" in lines[0] and lines[1].startswith("RAISED ReCoKD cannot load its library")


def test_a_registry_model_lists_its_channels_before_it_is_fetched(env, tmp_path):
    entry = {"name": "brain-2ch", "url": "https://example.org/brain-2ch.recokd", "sha256": "c" * 64,
             "channels": ["FLAIR", "T1c"], "labels": {"background": 0, "tumour": 1}}
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"version": 1, "models": [entry]}))
    logic = module.ReCoKDLogic(scene=env["scene"], modelsFolder=tmp_path / "models", registries=[registry])
    info = logic.modelInfo("brain-2ch")
    assert info.channelNames == ["FLAIR", "T1c"] and info.numChannels == 2
    with pytest.raises(module.ReCoKDError, match=r"needs 2 input volume\(s\) \(FLAIR, T1c\)"):
        logic.segment([env["volume"]], "brain-2ch", device="cpu")


def test_fast_runs_the_models_fast_variant_and_a_model_without_one_refuses(env, tmp_path):
    """The panel's *Fast* (``segment(fast=True)``) runs the model its registry entry names as ``fast``."""
    from ReCoKDLib.deployment.registry import make_entry

    plans = tiny_plans(num_classes=3, spacing=(1.0, 1.0, 1.0))
    fast_path = bundle_from_network(tiny_network(plans, seed=5), plans, "tiny-fast").save(tmp_path / "tiny-fast.recokd")
    entries = [make_entry(env["bundle_path"], name="tiny-reg"), make_entry(fast_path, name="tiny-reg-fast")]
    entries[0]["fast"] = "tiny-reg-fast"
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"version": 1, "models": entries}))
    logic = module.ReCoKDLogic(scene=env["scene"], modelsFolder=tmp_path / "models", registries=[registry])
    assert logic.fastVariant("tiny-reg").name == "tiny-reg-fast"
    assert logic.fastVariant("tiny-reg-fast") is None and logic.fastVariant(env["bundle_path"]) is None
    nodes = [logic.segment([env["volume"]], "tiny-reg", device="cpu", fast=fast) for fast in (False, True)]
    try:
        assert [n.GetAttribute("ReCoKD.model") for n in nodes] == ["tiny", "tiny-fast"]
        assert nodes[1].GetName() == "CT – tiny-fast"
        with pytest.raises(module.ReCoKDError, match=r"^model 'tiny-reg-fast' has no fast variant; untick Fast$"):
            logic.segment([env["volume"]], "tiny-reg-fast", device="cpu", fast=True)
        # a model and its fast variant are one model to an output: either replaces the other's segments there
        for fast in (True, False):
            logic.segment([env["volume"]], "tiny-reg", device="cpu", fast=fast, outputSegmentation=nodes[0])
            names = [_segment_names(nodes[0]), [_segment_tag(nodes[0], i) for i in range(2)]]
            assert names == [["organ", "kidney"], ["tiny-fast" if fast else "tiny"] * 2], names
    finally:
        for node in nodes:
            env["scene"].RemoveNode(node)
    # a registry whose 'fast' names the model itself, or a model the list lacks, says so in one line
    for named in ("tiny-reg", "nowhere"):
        entries[0]["fast"] = named
        registry.write_text(json.dumps({"version": 1, "models": entries}))
        assert logic.fastVariant("tiny-reg") is None
        with pytest.raises(module.ReCoKDError, match="no fast variant|not in the model list"):
            logic.segment([env["volume"]], "tiny-reg", device="cpu", fast=True)


def _segment_tag(node, index: int) -> str:
    import vtk

    value = vtk.reference("")
    node.GetSegmentation().GetNthSegment(index).GetTag("ReCoKD.model", value)
    return str(value)


def test_terminology_entry_string_round_trip():
    from ReCoKDSlicer import terminology

    codes = {"category": ["SCT", "49755003", "Morphologically Altered Structure"], "type": ["SCT", "4147007", "Mass"],
             "anatomic_region": ["SCT", "10200004", "Liver"]}
    text = terminology.entryString(codes)
    assert text == ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
                    "~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")
    assert terminology.parseEntryString(text) == codes
    with pytest.raises(ValueError):
        terminology.entryString({"category": ["SCT", "1"], "type": ["SCT", "2", "x"]})


def _real_signature(path: Path, function: str) -> set[str]:
    """Argument names of ``function`` as defined in Slicer's real source (read, not imported)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return {a.arg for a in node.args.args + node.args.kwonlyargs}
    raise AssertionError(f"{function} not found in {path}")


SLICER_PYTHON = ROOT.parent / "shared" / "slicer-python"


def test_installer_asks_pytorch_for_the_minimum_and_uses_pip_ensure(monkeypatch):
    import types

    from ReCoKDSlicer import dependencies

    calls = {}

    class FakeLogic:
        def installTorch(self, **kwargs):
            calls["installTorch"] = kwargs
            monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: "2.13.0")
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeLogic))
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kwargs: calls.setdefault("pip_ensure", (requirements, kwargs))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    # an old torch counts as missing, with one line that names both versions
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: "2.0.1+cu118")
    problem = dependencies.torchProblem()
    assert "PyTorch 2.0.1+cu118 is installed but ReCoKD needs 2.5 or newer" in problem and "\n" not in problem
    real_find_spec = dependencies.importlib.util.find_spec
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name: None if name == "tqdm" and "pip_ensure" not in calls else real_find_spec(name))
    asked = []
    assert dependencies.installDependencies(confirm=lambda message: asked.append(message) or True, log=lambda m: None)
    assert "2.0.1" in asked[0] and "tqdm" in asked[0]
    assert calls["installTorch"] == {"askConfirmation": False, "torchVersionRequirement": ">=2.5"}
    requirements, kwargs = calls["pip_ensure"]
    assert requirements == ["tqdm>=4.60"] and kwargs["prompt_install"] is False and kwargs["constraints"]
    # the keywords exist in the real functions
    if SLICER_PYTHON.is_dir():
        assert set(calls["installTorch"]) <= _real_signature(SLICER_PYTHON / "PyTorchUtils" / "PyTorchUtils.py", "installTorch")
        assert set(kwargs) <= _real_signature(SLICER_PYTHON / "slicer" / "packaging.py", "pip_ensure")
    # an nnU-Net folder's model also needs nnU-Net's network classes, installed with the PyTorch extension's
    # torch (and torchvision) pinned: timm, which they bring, must not make pip replace that build
    pins = {}
    packaging.pip_ensure = lambda requirements, **kw: pins.update(
        requirements=requirements, text=Path(kw["constraints"]).read_text(encoding="utf-8"))
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name: None if name == "dynamic_network_architectures" and not pins else real_find_spec(name))
    assert dependencies.missingDependencies() == [] and dependencies.missingDependencies(nnunet=True) == [
        "dynamic_network_architectures"]
    assert dependencies.installDependencies(log=lambda m: None, nnunet=True)
    assert pins["requirements"] == ["dynamic-network-architectures>=0.4"]
    from importlib import metadata

    assert f"torch=={metadata.version('torch')}" in pins["text"].split()
    # declining installs nothing and says so in one line
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: "2.0.1")
    with pytest.raises(RuntimeError, match="were not installed: PyTorch"):
        dependencies.installDependencies(confirm=lambda message: False)


def test_minimum_torch_matches_the_package_requirement():
    from ReCoKDSlicer import dependencies

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"torch>={dependencies.MINIMUM_TORCH}"' in pyproject


def test_channels_under_different_transforms_are_refused_whichever_has_one(env):
    scene, logic = env["scene"], env["logic"]
    first = env["volume"]
    second = slicer.util.addVolumeFromArray(env["array"], ijkToRAS=_oblique_ijk_to_ras(), name="CT2")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    try:
        for moved in (first, second):  # the check used to look only at channels after the first
            moved.SetAndObserveTransformNodeID(transform.GetID())
            before = scene.GetNumberOfNodes()
            with pytest.raises(module.ReCoKDError, match="under different transforms; harden the transforms"):
                logic.segment([first, second], env["bundle2_path"], device="cpu")
            assert scene.GetNumberOfNodes() == before
            moved.SetAndObserveTransformNodeID(None)
    finally:
        scene.RemoveNode(transform)
        scene.RemoveNode(second)


def _site_packages_without(tmp_path: Path, *hidden: str) -> Path:
    """A folder mirroring this environment's site-packages (by links) minus the ``hidden`` distributions,
    to run ``python -S`` as if they had never been installed (Slicer's Python before the first install)."""
    import site
    import sysconfig

    source = Path(sysconfig.get_paths()["purelib"])
    assert source in [Path(p) for p in site.getsitepackages()] or source.is_dir()
    mirror = tmp_path / "site-packages"
    mirror.mkdir()
    for entry in source.iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if stem in hidden or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
            continue
        (mirror / entry.name).symlink_to(entry)
    return mirror


def test_without_torch_the_module_loads_lists_models_and_writes_the_sample(tmp_path):
    """Slicer before the first Segment click: no torch, no monai. The module, the model list and the
    sample data must work; the self-test says it is skipped and why."""
    import os
    import subprocess

    mirror = _site_packages_without(tmp_path, "torch", "monai", "nvidia", "triton")
    code = f"""
import sys
sys.path.insert(0, {str(MODULE_DIR)!r})
import importlib.util
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("ReCoKDLib") is None
import slicer
slicer.mrmlScene = slicer.vtkMRMLScene()
import ReCoKD
assert ReCoKD.LIBRARY_ERROR == "", ReCoKD.LIBRARY_ERROR
logic = ReCoKD.ReCoKDLogic()
print("MODELS", sorted(s.name for s in logic.availableModels()))
print("INFO", logic.modelInfo("la2018-left-atrium").channelNames)
import json
print("CARD", json.dumps(logic.modelCardRows("acdc-heart")))
print("SAMPLE", ReCoKD.samplePhantomPath().is_file())
test = ReCoKD.ReCoKDTest()
test.delayDisplay = lambda message: print("SAID", message)
test.runTest()
import unittest  # what ctest runs (slicer.testing.runUnitTest): the test_* methods, through unittest
result = unittest.TextTestRunner(verbosity=0).run(unittest.TestLoader().loadTestsFromTestCase(ReCoKD.ReCoKDTest))
print("CTEST", result.testsRun, len(result.skipped), len(result.failures) + len(result.errors))
"""
    env = {**os.environ, "RECOKD_HOME": str(tmp_path / "home"), "PYTHONPATH": str(mirror)}
    env.pop("RECOKD_REGISTRY", None)
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "'la2018-left-atrium'" in out and "'phantom-abdomen'" in out
    assert "INFO ['LGE-MRI']" in out and "SAMPLE True" in out
    # the model card before PyTorch is installed is the card `recokd models acdc-heart` prints
    import json

    from ReCoKDLib.deployment.bundle import load_bundle
    from ReCoKDLib.deployment.card import model_card

    shown = json.loads(next(line for line in out.splitlines() if line.startswith("CARD "))[5:])
    shipped = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models" / "acdc-heart.recokd"
    assert [tuple(row) for row in shown] == model_card(load_bundle(shipped))
    assert "SAID ReCoKDTest skipped: these Python packages are missing: torch, monai" in out
    assert "CTEST 1 1 0" in out


def test_the_model_box_shows_the_cards_accuracy_limits_and_terms():
    """The module showed "test Dice 0.823" for acdc-heart: one fold's frames with post-processing. It now
    shows the card's cross-validated figure with how it was measured, the limits and the terms."""
    from ReCoKDSlicer import models

    shipped = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"
    text = models.readBundleInfo(shipped / "acdc-heart.recokd").summary()
    assert "Accuracy: cross-validated 0.793 +- 0.017" in text and "test Dice" not in text
    assert "Limitations: expects spacing 1 x 1 x 1" in text
    assert "Intended use: research only, not for clinical use" in text and "Terms: Research and non-commercial" in text
    for name in ("la2018-left-atrium", "phantom-abdomen"):
        assert "Accuracy: " in models.readBundleInfo(shipped / f"{name}.recokd").summary()


@pytest.mark.skipif(sys.platform.startswith("win"), reason="tells a dead process by its pid (POSIX)")
def test_temp_folders_of_a_killed_slicer_are_removed_at_start(env, tmp_path, monkeypatch):
    """A segmentation's temporary folder holds the patient's image: one whose Slicer is gone is removed when
    the logic starts; one of a running Slicer (or too young to tell) is kept."""
    import subprocess
    import tempfile

    from ReCoKDSlicer import logic as slicer_logic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "tmp"
    root.mkdir()

    def folder(name, owner=None, age_s=0.0):
        f = root / name
        f.mkdir()
        (f / "input_0.nrrd").write_bytes(b"patient")
        if owner is not None:
            (f / "owner.pid").write_text(str(owner))
        if age_s:
            t = time.time() - age_s
            os.utime(f, (t, t))
        return f

    orphan = folder("ReCoKD-orphan", owner=dead.pid)
    mine = folder("ReCoKD-mine", owner=os.getpid())
    young = folder("ReCoKD-young")  # no owner file (an older version wrote none): kept for a day
    old = folder("ReCoKD-old", age_s=2 * 24 * 3600)
    other = folder("SomethingElse-1", owner=dead.pid)
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    module.onStartupCompleted()  # Slicer's start, before the module is opened
    assert not orphan.exists() and not old.exists()
    assert mine.exists() and young.exists() and other.exists()
    orphan2 = folder("ReCoKD-orphan2", owner=dead.pid)  # (a Slicer killed since)
    module.ReCoKDLogic(scene=env["scene"], modelsFolder=env["folder"], registries=[])  # the module opened
    assert not orphan2.exists() and mine.exists() and young.exists() and other.exists()
    assert slicer_logic.cleanStaleTempFolders(root) == []  # nothing more to remove


def test_a_result_whose_input_left_the_scene_is_discarded_in_one_line(env):
    """An input volume removed (or the scene closed) during Segment: the result is not added anywhere."""
    scene, logic = env["scene"], env["logic"]
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "to be removed")
    volume.Copy(env["volume"])
    volume.SetName("to be removed")
    before = scene.GetNumberOfNodes()
    logic.debugDelay = 0.5
    finished = []
    try:
        task = logic.segment([volume], env["bundle_path"], device="cpu", wait=False, onFinished=finished.append)
    finally:
        logic.debugDelay = 0.0
    scene.RemoveNode(volume)  # the user deletes the input mid-run
    deadline = time.monotonic() + 120
    while task.poll() == jobs.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert task.state == jobs.FAILED and task.segmentationNode is None and finished == [task]
    assert "'to be removed' was removed from the scene" in task.message and "\n" not in task.message
    assert scene.GetNumberOfNodes() == before - 1  # the volume went; no segmentation (nor its display) came


@pytest.mark.parametrize("how", ["closed", "replaced"])
def test_a_result_whose_scene_was_closed_or_replaced_is_discarded(env, how):
    """The scene closed (File > Close Scene clears it) or the logic given another scene during Segment: the
    old result lands in no scene."""
    scene = slicer.vtkMRMLScene()
    logic = module.ReCoKDLogic(scene=scene, modelsFolder=env["folder"] / "models", registries=[])
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    volume.Copy(env["volume"])
    logic.debugDelay = 0.5
    task = logic.segment([volume], env["bundle_path"], device="cpu", wait=False)
    logic.debugDelay = 0.0
    if how == "closed":
        scene.Clear(0)
    else:
        logic.scene = slicer.vtkMRMLScene()
    deadline = time.monotonic() + 120
    while task.poll() == jobs.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert task.state == jobs.FAILED and task.segmentationNode is None and "\n" not in task.message
    assert ("the scene was closed" if how == "closed" else "the scene changed") in task.message
    for target in (scene, logic.scene):
        assert target.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_the_module_and_its_logic_never_import_matplotlib_in_slicers_process(env, tmp_path):
    """Slicer's own Python must not load matplotlib (it clashes with Slicer's Qt and slows the start): the
    module, its logic's model list, model cards and training plot run without it (a fresh interpreter)."""
    import subprocess

    code = f"""
import sys
sys.path.insert(0, {str(MODULE_DIR)!r})
import slicer
import ReCoKD
from ReCoKDSlicer import logic
L = logic.ReCoKDLogic(scene=slicer.vtkMRMLScene(), modelsFolder={str(env["folder"])!r}, registries=[])
assert L.availableModels()
L.modelInfo({str(env["bundle_path"])!r}); L.modelCardRows({str(env["bundle_path"])!r})
L.plotTrainingHistory([{{"epoch": 1.0, "loss_seg": 1.0, "dice_mean": 0.5}}, {{"epoch": 2.0, "loss_seg": 0.5, "dice_mean": 0.7}}])
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib")
print("MATPLOTLIB", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MATPLOTLIB []" in done.stdout, done.stdout[-500:]


def test_other_channels_are_resampled_onto_the_first_channels_grid(env, tmp_path):
    """The background process gets every channel on channel 1's grid (size, spacing, origin, direction)."""
    import SimpleITK as sitk

    scene, logic = env["scene"], env["logic"]
    first = env["volume"]
    second = slicer.util.addVolumeFromArray(env["array"][::2, :, ::2].copy(), ijkToRAS=_oblique_ijk_to_ras(), name="MR2")
    try:
        written = logic._writeInputs([first, second], tmp_path)
        a, b = (sitk.ReadImage(str(p)) for p in written)
        assert b.GetSize() == a.GetSize() and np.allclose(b.GetSpacing(), a.GetSpacing())
        assert np.allclose(b.GetOrigin(), a.GetOrigin()) and np.allclose(b.GetDirection(), a.GetDirection())
    finally:
        scene.RemoveNode(second)


def test_the_result_lies_under_the_inputs_transform(env):
    """Inputs under a (shared) transform: the segmentation is placed under it too, so it overlays them."""
    scene, logic = env["scene"], env["logic"]
    first = env["volume"]
    second = slicer.util.addVolumeFromArray(env["array"], ijkToRAS=_oblique_ijk_to_ras(), name="CT2")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node = None
    try:
        for volume in (first, second):
            volume.SetAndObserveTransformNodeID(transform.GetID())
        node = logic.segment([first, second], env["bundle2_path"], device="cpu", show3D=False)
        assert node.GetParentTransformNode() is transform
    finally:
        for volume in (first, second):
            volume.SetAndObserveTransformNodeID(None)
        for n in (node, second, transform):
            if n is not None:
                scene.RemoveNode(n)


def test_the_device_list_offers_what_pytorch_can_and_refuses_what_is_missing(env):
    """auto / cpu / cuda / mps in the panel; a device this machine lacks is refused in one line that names
    the way out, and no node is added."""
    import torch

    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    assert list(module.DEVICES) == ["auto", "cpu", "cuda", "mps"]
    missing = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if not ok]
    before = scene.GetNumberOfNodes()
    for device in missing:
        with pytest.raises(module.ReCoKDError) as info:
            logic.segment([volume], env["bundle_path"], device=device)
        assert device in str(info.value) and "cpu" in str(info.value) and "\n" not in str(info.value)
    assert scene.GetNumberOfNodes() == before and logic.segmentationTask is None


def test_a_registry_download_reports_its_bytes_and_the_job_reads_them(env, tmp_path):
    """The bridge reports a registry model's download (FETCH lines; none once it is cached) and the
    background job keeps the latest figures for the panel."""
    import subprocess

    import SimpleITK as sitk

    from ReCoKDLib.deployment.registry import sha256_file

    size = Path(env["bundle_path"]).stat().st_size
    entry = {"name": "tiny-remote", "url": Path(env["bundle_path"]).resolve().as_uri(),
             "sha256": sha256_file(env["bundle_path"]), "size": size}
    image = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(env["array"].astype(np.float32)), str(image))
    command = [sys.executable, "-m", "ReCoKDLib.inference.slicer_bridge", "segment", "--registry-entry", json.dumps(entry),
               "--inputs", str(image), "--output", str(tmp_path / "labels.nrrd"), "--device", "cpu"]
    environment = dict(os.environ, RECOKD_HOME=str(tmp_path / "home"))
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert first.returncode == 0, first.stdout[-1000:] + first.stderr[-1000:]
    fetch = [line.split()[1:] for line in first.stdout.splitlines() if line.startswith("FETCH ")]
    assert fetch and fetch[-1] == [str(size), str(size)]
    command[command.index("--output") + 1] = str(tmp_path / "labels2.nrrd")
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert again.returncode == 0 and "FETCH" not in again.stdout  # from the cache: nothing to download

    job = jobs.BackgroundJob([sys.executable, "-c", "print('FETCH 1048576 4194304', flush=True)"], name="fetch").start()
    deadline = time.monotonic() + 30
    while job.poll() == jobs.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.download == (1048576, 4194304)


def _segment_names(node) -> list:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def test_an_existing_output_keeps_other_segments_and_this_models_are_replaced(env, monkeypatch):
    """Writing into a chosen segmentation: the user's own segments stay, this model's earlier result is
    replaced (no duplicates on a second run), a structure subset keeps only those, and a failure while the
    new segments are added leaves the node as it was."""
    from ReCoKDSlicer import geometry

    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.GetSegmentation().AddEmptySegment("tumour", "tumour")
    try:
        before = scene.GetNumberOfNodes()
        assert logic.segment([volume], env["bundle_path"], device="cpu", show3D=False, outputSegmentation=node) is node
        assert _segment_names(node) == ["tumour", "organ", "kidney"] and scene.GetNumberOfNodes() == before
        logic.segment([volume], env["bundle_path"], device="cpu", show3D=False, outputSegmentation=node)
        assert _segment_names(node) == ["tumour", "organ", "kidney"]  # replaced, not piled up
        logic.segment([volume], env["bundle_path"], device="cpu", show3D=False, outputSegmentation=node,
                      structures=["kidney"])
        assert _segment_names(node) == ["tumour", "kidney"]
        kidney = _segment_on_volume_grid(scene, node, node.GetSegmentation().GetSegmentIdBySegmentName("kidney"), volume)
        assert (kidney > 0).sum() == (_expected_labels(env["bundle"], env["array"]) == 2).sum()

        calls = []
        real = geometry.orientedImageFromArray

        def failing(*args, **kwargs):  # the second new segment cannot be made
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return real(*args, **kwargs)

        monkeypatch.setattr(geometry, "orientedImageFromArray", failing)
        with pytest.raises(module.ReCoKDError, match="could not load the result"):
            logic.segment([volume], env["bundle_path"], device="cpu", show3D=False, outputSegmentation=node)
        assert _segment_names(node) == ["tumour", "kidney"]  # the earlier result, untouched
    finally:
        scene.RemoveNode(node)


def test_structures_and_outputs_the_model_cannot_use_are_refused_before_it_runs(env):
    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    before = scene.GetNumberOfNodes()
    with pytest.raises(module.ReCoKDError, match=r"^model 'tiny' has no structure 'liver'; it segments organ, kidney$"):
        logic.segment([volume], env["bundle_path"], device="cpu", structures=["organ", "liver"])
    with pytest.raises(module.ReCoKDError, match="no structure chosen; choose at least one of organ, kidney"):
        logic.segment([volume], env["bundle_path"], device="cpu", structures=[])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "elsewhere")
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moved result")
    other.SetAndObserveTransformNodeID(transform.GetID())
    try:
        with pytest.raises(module.ReCoKDError, match="'moved result' and the input 'CT' are under different transforms"):
            logic.segment([volume], env["bundle_path"], device="cpu", outputSegmentation=other)
        assert scene.GetNumberOfNodes() == before + 2 and logic.segmentationTask is None
    finally:
        scene.RemoveNode(other)
        scene.RemoveNode(transform)


def test_the_panel_output_becomes_the_result_and_another_volume_gets_a_new_node(env):
    """Segment twice from the parameter node: one node, replaced; a result made for another volume is not
    overwritten when the input changes (a new node is made and becomes the output)."""
    import types

    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    p = types.SimpleNamespace(inputVolume=volume, inputVolume2=None, inputVolume3=None, inputVolume4=None,
                              model=str(env["bundle_path"]), device="cpu", tta=False, skipInputChecks=True,
                              show3D=False, outputSegmentation=None, skippedStructures=["organ"])
    made = []
    second = slicer.util.addVolumeFromArray(env["array"], ijkToRAS=_oblique_ijk_to_ras(), name="CT second")
    try:
        first = logic.segmentWithParameters(p, wait=True)
        made.append(first)
        assert p.outputSegmentation is first and _segment_names(first) == ["kidney"]
        assert logic.segmentWithParameters(p, wait=True) is first
        assert len(list(scene.GetNodesByClass("vtkMRMLSegmentationNode"))) == 1
        p.inputVolume = second
        other = logic.segmentWithParameters(p, wait=True)
        made.append(other)
        assert other is not first and p.outputSegmentation is other and _segment_names(first) == ["kidney"]
        assert other.GetName() == "CT second – tiny"
    finally:
        for n in made + [second]:
            scene.RemoveNode(n)


def test_the_engine_note_says_when_the_chosen_device_is_slow(env):
    from ReCoKDSlicer import models

    logic = env["logic"]
    student = logic.modelInfo(env["bundle_path"])
    teacher = models.BundleInfo(name="big", labels=student.labels, channelNames=["image"], role="teacher")
    logic.devicesSeen = set()
    try:
        assert logic.engineNote("auto", student) == "" and logic.engineNote("cpu", student) == ""
        assert "teacher-size network on the CPU (when no GPU is found)" in logic.engineNote("auto", teacher)
        assert "MPS" in logic.engineNote("mps", student)
        logic.devicesSeen = {"cuda"}
        assert "although this computer has a CUDA GPU" in logic.engineNote("cpu", student)
        assert logic.engineNote("auto", teacher) == ""  # auto takes the GPU
        logic.devicesSeen = set()
        env["scene"].RemoveNode(logic.segment([env["volume"]], env["bundle_path"], device="cpu", show3D=False))
        assert logic.devicesSeen == {"cpu"}  # a run tells the device it used (a CUDA one: the GPU note above)
    finally:
        logic.devicesSeen = set()


def _untranslated_texts(source: str, logic: bool = False) -> list:
    """User-facing literals of the module file not passed through ``_()``: texts given to labels, buttons,
    titles, the module's help and acknowledgement, message boxes, file dialogs and the self-test's display;
    with ``logic``, also the messages of the logic's files (ReCoKDSlicer/): texts assigned to a task's or
    job's ``message``, ``error`` and ``lastMessage`` and the texts of the errors it raises.
    An f-string is never translatable (its placeholders are filled before the lookup): ``_("{x}").format()``."""
    import ast

    tree = ast.parse(source)
    targets = {"text", "title", "helpText", "acknowledgementText", "placeholderText"}
    calls = {"errorDisplay": None, "delayDisplay": None, "_ask": (0, 1, 2), "getOpenFileName": (1, 3),
             "getExistingDirectory": (1,)}
    if logic:
        targets |= {"message", "error", "lastMessage"}
        calls.update({"ReCoKDError": None, "InputCheckError": None})
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def inside_tr(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "translate"):
                return True
        return False

    def literals(expr):
        for node in ast.walk(expr):
            if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.Constant) and re.search("[A-Za-z]{2}", v.value)
                                                       for v in node.values):
                yield node
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search("[A-Za-z]{2}", node.value)
                  and not isinstance(parents.get(node), ast.JoinedStr)):
                yield node

    def assigned(target, value):
        """The values assigned to a guarded attribute (``a.error = ...``, ``a.state, a.error = x, ...``)."""
        if isinstance(target, ast.Attribute):
            return [value] if target.attr in targets else []
        if isinstance(target, ast.Tuple):
            if isinstance(value, ast.Tuple) and len(value.elts) == len(target.elts):
                return [v for t, e in zip(target.elts, value.elts) for v in assigned(t, e)]
            return [value] if any(assigned(t, value) for t in target.elts) else []
        return []

    found = []
    for node in ast.walk(tree):
        values = []
        if isinstance(node, ast.Assign):
            values = [v for t in node.targets for v in assigned(t, node.value)]
        elif isinstance(node, ast.AugAssign):  # a.message += "; ..."
            values = assigned(node.target, node.value)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in calls:
                values = [a for i, a in enumerate(node.args) if calls[name] is None or i in calls[name]]
        for value in values:
            for literal in literals(value):
                if not inside_tr(literal) or isinstance(literal, ast.JoinedStr):
                    found.append(f"line {literal.lineno}: {ast.unparse(literal)[:60]}")
    return found


def test_the_panels_texts_are_translatable():
    """Every text the module shows goes through Slicer's ``_()`` (slicer.i18n.tr), as Slicer's own modules do."""
    source = (MODULE_DIR / "ReCoKD.py").read_text(encoding="utf-8")
    assert "from ReCoKDSlicer.i18n import _, translate" in source  # slicer.i18n's tr, re-exported (one fallback)
    assert _untranslated_texts(source) == []
    # the check itself finds what it guards against
    assert len(_untranslated_texts('w.text = "Segment"\nw.text = _(f"on {d}")\nslicer.util.errorDisplay(f"failed: {e}")\n'
                                   'e.placeholderText = "all: 0"\nqt.QFileDialog.getExistingDirectory(w, "Add a folder")\n')) == 5


@pytest.mark.parametrize("name", ["logic.py", "models.py", "jobs.py"])
def test_the_logics_messages_are_translatable(name):
    """The messages the logic hands the panel (a task's message, a job's error, the errors it raises) go through
    ``_()`` too: ReCoKDSlicer/i18n.py's, which is slicer.i18n.tr inside Slicer."""
    source = (MODULE_DIR / "ReCoKDSlicer" / name).read_text(encoding="utf-8")
    assert "from .i18n import _" in source
    assert _untranslated_texts(source, logic=True) == []
    # the check itself finds what it guards against (and lets a translated text and a passed-on error through)
    planted = ('raise ReCoKDError(f"no model {m}")\nt.message = "done"\nj.state, j.error = FAILED, "gone"\n'
               't.message += f"; {n} warning(s)"\nt.error = _("failed: {e}").format(e=e)\nraise ReCoKDError(str(exc))\n')
    assert len(_untranslated_texts(planted, logic=True)) == 4
    assert _untranslated_texts(planted) == []  # the panel's check alone guards other attributes


def test_the_acknowledgement_cites_the_data_of_every_shipped_model():
    """A model trained on public data asks to be cited (its terms): the module's acknowledgement names it."""
    import types

    from ReCoKDLib.deployment.registry import builtin_registry_path

    registry = json.loads(Path(builtin_registry_path()).read_text(encoding="utf-8"))
    text = module.ReCoKD(types.SimpleNamespace()).parent.acknowledgementText
    assert registry["models"]
    for entry in registry["models"]:
        assert entry["name"] in text
        for author in re.findall(r"([A-Z][a-z]+) et al", entry.get("license", "")):
            assert f"{author} et al" in text, (entry["name"], author)


def _cine(scene, arrays, name="cine"):
    """A sequence of volumes (one per array, oblique geometry) in a browser; returns (browser, sequence, proxy)."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    for t, array in enumerate(arrays):
        frame = slicer.util.addVolumeFromArray(array, ijkToRAS=_oblique_ijk_to_ras(), name=f"{name} {t}")
        sequence.SetDataNodeAtValue(frame, str(t * 40))  # ms
        scene.RemoveNode(frame)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)
    sequences.UpdateProxyNodesFromSequences(browser)
    return browser, sequence, browser.GetProxyNode(sequence)


def _voxels(segmentation_node, name) -> int:
    segmentation = segmentation_node.GetSegmentation()
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segmentation.GetSegmentIdBySegmentName(name), image)
    from vtk.util import numpy_support

    scalars = image.GetPointData().GetScalars()
    return int((numpy_support.vtk_to_numpy(scalars) > 0).sum()) if scalars is not None else 0


def test_a_cine_sequence_is_segmented_frame_by_frame_into_a_sequence_that_plays_with_it(env):
    """Every frame of a sequence input, with progress over all frames; the result is a segmentation sequence
    in the input's browser (each frame the model's labels of that frame); Segment again replaces it; the
    shown frame alone when allFrames is off."""
    scene, logic = env["scene"], env["logic"]
    arrays = [env["array"], np.flip(env["array"], 2).copy(), env["array"] ** 2]
    browser, sequence, proxy = _cine(scene, arrays)
    expected = [_expected_labels(env["bundle"], a) for a in arrays]
    assert len({int((e == 2).sum()) for e in expected}) == 3  # the frames differ: a frame mix-up shows
    made = []
    try:
        assert logic.sequenceBrowserOf(proxy) is browser and logic.sequenceBrowserOf(env["volume"]) is None
        fractions = []
        shown = logic.segment([proxy], env["bundle_path"], device="cpu", show3D=False, structures=["kidney"],
                              progress=fractions.append)
        out = browser.GetSequenceNode(shown)
        made += [shown, out]
        assert out is not None and out.GetName() == "cine – tiny" and out.GetNumberOfDataNodes() == 3
        assert out.GetIndexName() == sequence.GetIndexName() and out.GetNthIndexValue(2) == "80"
        for f in range(3):
            frame = out.GetNthDataNode(f)
            assert _segment_names(frame) == ["kidney"]
            assert _voxels(frame, "kidney") == int((expected[f] == 2).sum()), f
        assert fractions[-1] == 1.0 and fractions == sorted(fractions)
        browser.SetSelectedItemNumber(1)
        logic._updateProxies(browser)
        assert _voxels(shown, "kidney") == int((expected[1] == 2).sum())  # it plays with the images
        # again: the earlier result is replaced, not piled up
        again = logic.segment([proxy], env["bundle_path"], device="cpu", show3D=False)
        made += [again, browser.GetSequenceNode(again)]
        outputs = [n for n in scene.GetNodesByClass("vtkMRMLSequenceNode") if n.GetAttribute("ReCoKD.model") == "tiny"]
        assert outputs == [browser.GetSequenceNode(again)] and not scene.IsNodePresent(out)
        assert len([n for n in scene.GetNodesByClass("vtkMRMLSegmentationNode")]) == 1
        assert _segment_names(again) == ["organ", "kidney"]
        # the shown frame only
        single = logic.segment([proxy], env["bundle_path"], device="cpu", show3D=False, allFrames=False)
        made.append(single)
        assert browser.GetSequenceNode(single) is None and _voxels(single, "kidney") == int((expected[1] == 2).sum())
    finally:
        for n in made + [browser, sequence, proxy]:
            if n is not None and scene.IsNodePresent(n):
                scene.RemoveNode(n)


def test_cancelling_a_cine_run_adds_nothing_and_reports_the_frame(env):
    scene, logic = env["scene"], env["logic"]
    browser, sequence, proxy = _cine(scene, [env["array"]] * 4, name="cine2")
    before = scene.GetNumberOfNodes()
    logic.debugDelay = 0.3
    try:
        task = logic.segment([proxy], env["bundle_path"], device="cpu", wait=False)
        deadline = time.monotonic() + 120
        while task.poll() == jobs.RUNNING and task.job.frame[0] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert task.job.frame == (2, 4) and 0.25 <= task.progress < 0.75
        task.cancel()
        assert task.state == jobs.CANCELLED and scene.GetNumberOfNodes() == before
        assert browser.GetNumberOfSynchronizedSequenceNodes() == 0
    finally:
        logic.debugDelay = 0.0
        for n in (browser, sequence, proxy):
            scene.RemoveNode(n)


def test_an_nnunet_results_folder_segments_with_the_folds_chosen_and_an_incomplete_one_is_one_line(env, tmp_path):
    """An nnU-Net v2 results folder in the model list (here a student exported with --format nnunet, one fold):
    Segment runs it through nnU-Net's conventions (the library's nnU-Net view), folds are passed on, a fold it
    lacks and the incomplete folders users most often copy are refused in one line naming what is missing."""
    import shutil

    from ReCoKDLib.deployment.nnunet_export import export_nnunet

    scene, volume, logic = env["scene"], env["volume"], env["logic"]
    folder = export_nnunet(env["bundle_path"], tmp_path / "results", dataset_id=12)
    source = logic.modelFolderSource(folder.parent)
    info = logic.modelInfo(source)
    assert (info.nnunetFolds, info.channelNames, info.labels.foreground_names) == (["0"], ["MRI0"], ["organ", "kidney"])
    node = logic.segment([volume], source, device="cpu", folds="0", show3D=False, force=True)  # (a tiny plan)
    try:
        m = _oblique_ijk_to_ras()
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        direction = (np.diag([-1, -1, 1]) @ (m[:3, :3] / spacing)).ravel()
        expected = Predictor(folder, device="cpu", check_spacing=False).predict_array(env["array"], spacing, None, direction)
        for name, value in (("organ", 1), ("kidney", 2)):
            got = _segment_on_volume_grid(scene, node, node.GetSegmentation().GetSegmentIdBySegmentName(name), volume)
            assert (got > 0).sum() == (expected == value).sum() > 0, name
    finally:
        scene.RemoveNode(node)
    task = logic.segment([volume], source, device="cpu", folds="0", force=True, wait=False)
    task.cancel()
    assert ("--folds", "0") in zip(task.job.command, task.job.command[1:])  # the chosen folds reach the process
    with pytest.raises(module.ReCoKDError, match=r"has no fold_1/checkpoint_final.pth \(folds with one: 0\); choose "
                                                 r"folds that have one \(Folds box\)$"):
        logic.segment([volume], source, device="cpu", folds="1")
    with pytest.raises(module.ReCoKDError, match="folds apply to nnU-Net results folders"):
        logic.segment([volume], env["bundle_path"], device="cpu", folds="0")
    two = tmp_path / "two"
    shutil.copytree(folder.parent, two)
    shutil.copytree(two / folder.name, two / "nnUNetTrainer__nnUNetPlans__2d")
    with pytest.raises(module.ReCoKDError, match=r"holds 2 nnU-Net models .*; pass one of them"):
        logic.modelFolderSource(two)
    (two / folder.name / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(module.ReCoKDError, match=r"has no fold_\*/checkpoint_final.pth; train a fold first"):
        logic.modelFolderSource(two / folder.name)
    with pytest.raises(module.ReCoKDError, match="neither an nnU-Net v2 results folder .* nor a ReCoKD bundle"):
        logic.modelFolderSource(tmp_path)  # the top folder above Dataset012_Tiny: nothing nnU-Net reads


def test_looking_nodes_up_by_class_holds_no_reference_to_them(env):
    """``GetNodesByClass`` hands over a collection the caller must release; kept, it holds every node it
    lists (a closed scene's cine volumes stayed in memory): the module's lookups release it."""
    import gc

    from ReCoKDSlicer import logic as logic_module

    scene = env["scene"]
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "lookup")
    try:
        gc.collect()
        before = browser.GetReferenceCount()
        for _ in range(3):
            assert browser in logic_module.nodesByClass(scene, "vtkMRMLSequenceBrowserNode")
            env["logic"].sequenceBrowserOf(env["volume"])
        gc.collect()
        assert browser.GetReferenceCount() == before
    finally:
        scene.RemoveNode(browser)


def test_the_panels_auto_method_follows_the_librarys_defaults(env, tmp_path, monkeypatch):
    """*auto* (the panel's default) runs ReCo-KD, or the teacher's labels alone when unlabeled scans are given
    (the library's defaults), always as an explicit --method, so the exported bundle is named after it."""
    logic = env["logic"]
    started = []
    monkeypatch.setattr(logic, "_startTraining", lambda role, args, *rest, **kw: started.append(args))
    scans = tmp_path / "scans"
    scans.mkdir()
    logic.distill(str(tmp_path), teacher=str(tmp_path), outputFolder=str(tmp_path / "a"))
    logic.distill(str(tmp_path), teacher=str(tmp_path), outputFolder=str(tmp_path / "b"), unlabeledFolders=[scans])
    logic.distill(str(tmp_path), teacher=str(tmp_path), outputFolder=str(tmp_path / "c"), unlabeledFolders=[scans],
                  method="recokd")
    assert [a[a.index("--method") + 1] for a in started] == ["recokd", "none", "recokd"]
