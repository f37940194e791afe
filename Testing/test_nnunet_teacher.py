"""An nnU-Net v2 results folder as the teacher: loaded as nnU-Net loads it, predicting what nnU-Net
predicts, distilled into a working bundle, and bad folders refused in one line.

The results folder is real: planned by nnU-Net's own planner, the network built by nnU-Net's own
``get_network_from_plans`` and the checkpoint saved in nnU-Net's format (see ``nnunet_folder.py``); the
reference predictions come from nnU-Net's own ``nnUNetPredictor``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_folder import DATASET, make_nnunet_results
from ReCoKDLib.cli import main
from ReCoKDLib.data.nnunet_plans import plans_from_nnunet
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.inference import Predictor
from ReCoKDLib.models.nnunet import NNUNetTeacher, load_nnunet_checkpoint, open_nnunet_model


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory) -> Path:
    """``root`` with raw/ (the dataset) and results/ (a two-fold nnU-Net model)."""
    root = tmp_path_factory.mktemp("nnunet")
    make_nnunet_results(root, cases=6, size=64, patch=(32, 32, 32), iterations=60, folds=(0, 1))
    return root


def _model_folder(root: Path) -> Path:
    return root / "results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _nnunet_predictor(model: Path, folds):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=folds)  # nnU-Net's own (trusted) loader
    return predictor


def test_teacher_gives_the_logits_of_the_network_nnunet_loads(nnunet):
    model = open_nnunet_model(nnunet / "results" / DATASET, folds=[0])  # the dataset folder names its one model
    assert model.folder == _model_folder(nnunet) and model.configuration == "3d_fullres"
    ours = model.teacher()
    reference = _nnunet_predictor(model.folder, (0,))
    theirs = reference.network
    theirs.load_state_dict(reference.list_of_parameters[0])
    theirs.eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape == (1, 5, 32, 32, 32)
    assert (a - b).abs().max().item() <= 1e-5


def test_several_folds_are_the_mean_of_their_softmax(nnunet):
    model = open_nnunet_model(_model_folder(nnunet))
    assert list(model.checkpoints) == ["0", "1"]
    ensemble = model.teacher()
    singles = [open_nnunet_model(_model_folder(nnunet), folds=[f]).teacher() for f in (0, 1)]
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = torch.stack([torch.softmax(s(x), 1) for s in singles]).mean(0)
        assert torch.allclose(torch.softmax(ensemble(x), 1), probs, atol=1e-5)
    assert ensemble.tap_names() == [f"members.0.encoder.stages.{i}" for i in range(4)]


def test_plans_become_recokd_plans_and_the_students_template(nnunet):
    model = open_nnunet_model(_model_folder(nnunet))
    conf = json.loads((model.folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    plans = plans_from_nnunet(model)
    assert plans.target_spacing == tuple(conf["spacing"]) and plans.patch_size == tuple(conf["patch_size"])
    assert [n.scheme for n in plans.normalisation] == ["zscore"] and plans.resampling["image_order"] == 3
    assert dict(plans.labels) == json.loads((model.folder / "dataset.json").read_text())["labels"]
    spec = model.unet_spec()
    kwargs = conf["architecture"]["arch_kwargs"]
    assert list(spec.filters) == kwargs["features_per_stage"]
    assert [list(s) for s in spec.strides] == kwargs["strides"]
    assert spec.student(4).filters == tuple(max(f // 4, 8) for f in kwargs["features_per_stage"])


def test_ct_normalisation_takes_the_foreground_intensity_properties(nnunet, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(_model_folder(nnunet), folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]
    (folder / "plans.json").write_text(json.dumps(plans))
    norm = plans_from_nnunet(open_nnunet_model(folder)).normalisation[0]
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (norm.scheme, norm.mean, norm.std, norm.lower, norm.upper) == (
        "ct", props["mean"], props["std"], props["percentile_00_5"], props["percentile_99_5"])


def test_a_whole_case_agrees_with_nnunets_predictor(nnunet):
    image_file = nnunet / "raw" / DATASET / "imagesTr" / "phantom_000_0000.nii.gz"
    image = sitk.ReadImage(str(image_file))
    ours = sitk.GetArrayFromImage(Predictor(_model_folder(nnunet), device="cpu").predict_image(image))
    array = sitk.GetArrayFromImage(image)[None].astype(np.float32)
    theirs = _nnunet_predictor(_model_folder(nnunet), (0, 1)).predict_single_npy_array(
        array, {"spacing": list(image.GetSpacing())[::-1]})
    assert ours.shape == theirs.shape == array.shape[1:]
    assert len(np.unique(theirs)) >= 3  # a network that segments, not a constant map
    assert (ours == theirs).mean() >= 0.99


def _residual_encoder(folder: Path) -> None:
    """The same plans with nnU-Net's residual-encoder U-Net (the ResEnc presets' architecture), its network
    built by nnU-Net's own get_network_from_plans and saved as a fold-0 checkpoint."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    shutil.rmtree(folder / "fold_1")
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = arch["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = [1, 2, 2, 2, 2][: kwargs["n_stages"]]
    kwargs["n_conv_per_stage_decoder"] = [1] * (kwargs["n_stages"] - 1)
    del kwargs["n_conv_per_stage"]
    (folder / "plans.json").write_text(json.dumps(plans))
    torch.manual_seed(5)
    net = get_network_from_plans(arch["network_class_name"], kwargs, arch["_kw_requires_import"], 1, 5,
                                 deep_supervision=True)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)  # made by this test suite: trusted
    checkpoint["network_weights"] = net.state_dict()
    checkpoint["init_args"]["plans"] = plans
    torch.save(checkpoint, path)


def test_a_residual_encoder_unet_loads_as_nnunet_loads_it(nnunet, tmp_path):
    folder = _edited_copy(nnunet, tmp_path, _residual_encoder)
    teacher = open_nnunet_model(folder).teacher()
    reference = _nnunet_predictor(folder, (0,))
    theirs = reference.network
    theirs.load_state_dict(reference.list_of_parameters[0])
    theirs.eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (teacher(x) - theirs(x)).abs().max().item() <= 1e-5
    from ReCoKDLib.models.taps import FeatureTaps

    infos = FeatureTaps(teacher, teacher.tap_names()).probe((1, 1, 32, 32, 32))
    assert [i.stride for i in infos] == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert tuple(i.channels for i in infos) == open_nnunet_model(folder).unet_spec().filters[:-1]


def _transposed(folder: Path) -> None:
    """The same model, as nnU-Net would hold it had it transposed the axes (x, z, y): plans with
    transpose_forward [2, 0, 1], a non-cubic patch in network axes, and every convolution kernel's spatial
    axes permuted alike — so on transposed input it computes exactly what the original computes."""
    forward = [2, 0, 1]
    plans = json.loads((folder / "plans.json").read_text())
    plans["transpose_forward"], plans["transpose_backward"] = forward, [1, 2, 0]
    plans["configurations"]["3d_fullres"]["patch_size"] = [32, 16, 48]  # image (z, y, x) patch 16 x 48 x 32
    (folder / "plans.json").write_text(json.dumps(plans))
    shutil.rmtree(folder / "fold_1")  # one fold, permuted below
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)  # made by this test suite: trusted
    checkpoint["network_weights"] = {k: (v.permute(0, 1, *(2 + a for a in forward)).contiguous() if v.ndim == 5 else v)
                                     for k, v in checkpoint["network_weights"].items()}
    torch.save(checkpoint, path)


def test_a_transposed_model_runs_in_the_image_axes_and_agrees_with_nnunet(nnunet, tmp_path):
    folder = _edited_copy(nnunet, tmp_path, _transposed)
    model = open_nnunet_model(folder, folds=[0])
    assert plans_from_nnunet(model).patch_size == (16, 48, 32)  # (z, y, x) of the image array
    spec = model.unet_spec()
    # the student is a narrower copy of nnU-Net's PlainConvUNet, its decoder kernels included (so it exports)
    assert spec.decoder_kernels == spec.student(4).decoder_kernels == "own"
    teacher = model.teacher()
    x = torch.randn(1, 1, 16, 48, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = teacher(x)
        reference = _nnunet_predictor(folder, (0,))
        net = reference.network
        net.load_state_dict(reference.list_of_parameters[0])
        net.eval()
        theirs = net(x.permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2)
    assert out.shape == (1, 5, 16, 48, 32) and (out - theirs).abs().max().item() <= 1e-5
    from ReCoKDLib.models.taps import FeatureTaps

    infos = FeatureTaps(teacher, teacher.tap_names()).probe((1, 1, 16, 48, 32))
    assert [i.stride for i in infos] == [tuple(int(v) for v in s) for s in spec.level_strides[:-1]]
    with torch.no_grad():  # the permuted kernels on transposed input compute what the original model computes
        original = open_nnunet_model(_model_folder(nnunet), folds=[0]).teacher()
        assert (out - original(x)).abs().max().item() <= 1e-4
    image_file = nnunet / "raw" / DATASET / "imagesTr" / "phantom_002_0000.nii.gz"
    image = sitk.ReadImage(str(image_file))
    ours = sitk.GetArrayFromImage(Predictor(folder, device="cpu").predict_image(image))
    array = sitk.GetArrayFromImage(image)[None].astype(np.float32)
    theirs = reference.predict_single_npy_array(array, {"spacing": list(image.GetSpacing())[::-1]})
    assert len(np.unique(theirs)) >= 3 and (ours == theirs).mean() >= 0.99
    # and it distils: teacher features come back in the image's axes, level by level like the student's
    code = main(["distill", str(nnunet / "raw" / DATASET), "--teacher", str(folder), "-o", str(tmp_path / "student"),
                 "--cache", str(tmp_path / "cache"), "--epochs", "1", "--iters-per-epoch", "2", "--val-max-cases", "1",
                 "--threads", "1", "--no-progress"])
    assert code == 0
    assert json.loads((tmp_path / "student" / "plans.json").read_text())["patch_size"] == [16, 48, 32]
    # and the student goes back to nnU-Net in the image's axes: nnU-Net's own loader builds the stock network
    # from the exported plans, and it computes the student's logits on an image-axes window
    from ReCoKDLib.deployment.bundle import open_model

    assert main(["export", str(tmp_path / "student"), "--format", "nnunet", "-o", str(tmp_path / "exported"),
                 "--dataset-id", "77"]) == 0  # the run folder, through the command line
    (exported,) = (tmp_path / "exported").glob("Dataset077_*/nnUNetTrainer__nnUNetPlans__3d_fullres")
    plans = json.loads((exported / "plans.json").read_text())
    assert plans["transpose_forward"] == [0, 1, 2] and plans["configurations"]["3d_fullres"]["patch_size"] == [16, 48, 32]
    back = _nnunet_predictor(exported, (0,))
    student = open_model(tmp_path / "student").build_network()
    with torch.no_grad():
        assert (back.network.eval()(x) - student(x)).abs().max().item() <= 1e-4
    theirs = back.predict_single_npy_array(array, {"spacing": list(image.GetSpacing())[::-1]})
    ours = sitk.GetArrayFromImage(Predictor(tmp_path / "student", device="cpu", blend="nnunet",
                                            postprocess="none").predict_image(image))
    assert (ours == theirs).mean() >= 0.995


def test_checkpoints_load_without_unpickling_objects(nnunet, tmp_path):
    checkpoint = load_nnunet_checkpoint(_model_folder(nnunet) / "fold_0" / "checkpoint_final.pth")
    assert isinstance(checkpoint["_best_ema"], np.floating) and checkpoint["trainer_name"] == "nnUNetTrainer"

    witness = tmp_path / "pwned"
    bad = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "hook": _Exploit(str(witness))}, bad)
    with pytest.raises(ReCoKDError, match=r"safe loader .* refuses: .*pathlib") as err:
        load_nnunet_checkpoint(bad)
    assert "\n" not in str(err.value) and not witness.exists()


class _Exploit:
    """Unpickling this would run code (it creates a file); the safe loader must refuse it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_distilling_an_nnunet_teacher_gives_a_working_bundle(nnunet, tmp_path, capsys):
    run, bundle = tmp_path / "student", tmp_path / "student.recokd"
    code = main(["distill", str(nnunet / "raw" / DATASET), "--teacher", str(nnunet / "results" / DATASET),
                 "--teacher-folds", "0,1", "-o", str(run), "--cache", str(tmp_path / "cache"), "--epochs", "1",
                 "--iters-per-epoch", "4", "--val-max-cases", "1", "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((run / "run.json").read_text())
    assert (info["teacher_kind"], info["teacher_folds"], info["method"]) == ("nnunet", "0,1", "recokd")
    # without --teacher-folds: one fold, and it says why and how to ask for the ensemble
    one = tmp_path / "student_one_fold"
    code = main(["distill", str(nnunet / "raw" / DATASET), "--teacher", str(nnunet / "results" / DATASET),
                 "-o", str(one), "--cache", str(tmp_path / "cache"), "--epochs", "1", "--iters-per-epoch", "2",
                 "--val-max-cases", "1", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert json.loads((one / "run.json").read_text())["teacher_folds"] == "0"
    assert "fold 0 of folds 0, 1 (one fold by default" in err and "--teacher-folds every" in err
    assert json.loads((run / "plans.json").read_text())["planner"]["source"] == "nnU-Net v2"
    assert main(["export", str(run), "-o", str(bundle)]) == 0
    image_file = nnunet / "raw" / DATASET / "imagesTr" / "phantom_001_0000.nii.gz"
    out = tmp_path / "pred.nii.gz"
    assert main(["predict", "-m", str(bundle), "-i", str(image_file), "-o", str(out), "--no-progress"]) == 0
    labels, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(image_file))
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2, 3, 4}
    # the teacher folder itself runs through `recokd predict`, and `recokd benchmark` compares it with the student
    out_t = tmp_path / "teacher.nii.gz"
    assert main(["predict", "-m", str(_model_folder(nnunet)), "-i", str(image_file), "-o", str(out_t), "--no-progress"]) == 0
    raw = nnunet / "raw" / DATASET
    assert main(["benchmark", "--models", f"nnunet={_model_folder(nnunet)}", f"student={bundle}", "--images",
                 str(raw / "imagesTr"), "--labels", str(raw / "labelsTr"), "--max-cases", "1", "--repeats", "1",
                 "--threads", "1", "-o", str(tmp_path / "bench")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench" / "benchmark.json").read_text())}
    assert rows["nnunet"]["role"] == "teacher" and rows["student"]["method"] == "recokd"
    assert rows["nnunet"]["parameters"] > rows["student"]["parameters"] > 0
    assert rows["nnunet"]["summary"]["dice"]["mean"] > 0.1  # the briefly trained teacher does segment


def _edited_copy(nnunet: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "results" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(_model_folder(nnunet), folder)
    edit(folder)
    return folder


def _set_plans(key_path, value):
    def edit(folder: Path) -> None:
        plans = json.loads((folder / "plans.json").read_text())
        node = plans
        for k in key_path[:-1]:
            node = node[k]
        node[key_path[-1]] = value
        (folder / "plans.json").write_text(json.dumps(plans))
    return edit


def _relabel(folder: Path) -> None:
    d = json.loads((folder / "dataset.json").read_text())
    d["labels"] = {"background": 0, "organ": 1, "kidney": 2, "vessel": 3, "tumour": 4}
    (folder / "dataset.json").write_text(json.dumps(d))


ARCH = ["configurations", "3d_fullres", "architecture"]
BAD_TEACHERS = [
    ("not an nnU-Net folder", lambda root, tmp: tmp, [], "is neither a `recokd train` run (no run.json) nor an nnU-Net v2 results folder"),
    ("a missing fold", lambda root, tmp: _model_folder(root), ["--teacher-folds", "3"], "has no fold_3/checkpoint_final.pth"),
    ("a best checkpoint that was not saved", lambda root, tmp: _model_folder(root), ["--teacher-checkpoint", "best"],
     "has no fold_*/checkpoint_best.pth"),
    ("an unsupported architecture", lambda root, tmp: _edited_copy(
        root, tmp, _set_plans(ARCH + ["network_class_name"], "my_lab.networks.FancyUNet")), [],
     "architecture my_lab.networks.FancyUNet is not supported (supported: PlainConvUNet, ResidualEncoderUNet)"),
    ("a plans file naming an arbitrary import", lambda root, tmp: _edited_copy(
        root, tmp, _set_plans(ARCH + ["arch_kwargs", "nonlin"], "os.system")), [],
     "arch_kwargs['nonlin'] = 'os.system' is not one of the torch.nn classes"),
    ("a damaged transpose", lambda root, tmp: _edited_copy(
        root, tmp, _set_plans(["transpose_forward"], [0, 0, 1])), [], "are not a permutation and its inverse"),
    ("labels that differ from the teacher's", lambda root, tmp: _edited_copy(root, tmp, _relabel), [],
     "differ from the nnU-Net teacher's dataset.json"),
    ("a truncated checkpoint", lambda root, tmp: _edited_copy(root, tmp, lambda f: (f / "fold_0" / "checkpoint_final.pth")
                                                             .write_bytes(b"PK\x03\x04 not really")), ["--teacher-folds", "0"],
     "cannot read nnU-Net checkpoint"),
]


@pytest.mark.parametrize("what,teacher,extra,message", BAD_TEACHERS, ids=[b[0] for b in BAD_TEACHERS])
def test_bad_teacher_folders_are_one_line_errors_and_nothing_is_written(nnunet, tmp_path, capsys, what, teacher,
                                                                         extra, message):
    out = tmp_path / "student"
    code = main(["distill", str(nnunet / "raw" / DATASET), "--teacher", str(teacher(nnunet, tmp_path)), *extra,
                 "-o", str(out), "--cache", str(tmp_path / "cache"), "--epochs", "1", "--iters-per-epoch", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_nnunet_teacher_module_needs_members():
    with pytest.raises(ReCoKDError, match="at least one fold"):
        NNUNetTeacher([], (32, 32, 32), 1)
