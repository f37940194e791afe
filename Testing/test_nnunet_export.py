"""``recokd export --format nnunet``: a ReCoKD student as an nnU-Net v2 results folder, run by nnU-Net itself.

The exported folder is loaded by nnU-Net's own ``nnUNetPredictor`` (and, on a real LA2018 case, run by its
``nnUNetv2_predict_from_modelfolder`` command in a subprocess); the logits of nnU-Net's stock
``PlainConvUNet`` must match ReCoKD's network, and the labels ``recokd predict`` gives (with nnU-Net's
window blending) on whole cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (pip install .[test])")

from bundle_helpers import tiny_plans  # noqa: E402
from ReCoKDLib.cli import main  # noqa: E402
from ReCoKDLib.data.phantom import generate_dataset  # noqa: E402
from ReCoKDLib.deployment.bundle import bundle_from_network, load_bundle  # noqa: E402
from ReCoKDLib.deployment.nnunet_export import NNUNET_MODEL_FOLDER, export_nnunet  # noqa: E402
from ReCoKDLib.errors import ReCoKDError  # noqa: E402
from ReCoKDLib.inference.predictor import Predictor  # noqa: E402
from ReCoKDLib.models import UNetSpec, build_unet  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"
PHANTOM_MODEL = MODELS / "phantom-abdomen.recokd"


def _nnunet_predictor(folder: Path, mirroring: bool = False):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("nnunet_export")
    return export_nnunet(PHANTOM_MODEL, out, dataset_id=42)


def test_nnunet_loads_the_export_without_warnings_and_computes_recokds_logits(exported):
    assert exported.name == NNUNET_MODEL_FOLDER and exported.parent.name == "Dataset042_ReCoKDPhantom"
    assert {p.name for p in exported.iterdir()} == {"dataset.json", "plans.json", "dataset_fingerprint.json", "fold_0"}
    checkpoint = torch.load(exported / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["init_args"]["configuration"] == "3d_fullres"
    # PlainConvUNet lists each weight under several names: stored once, not once per name
    weights = sum(v.numel() * v.element_size() for v in load_bundle(PHANTOM_MODEL).build_network().parameters())
    assert (exported / "fold_0" / "checkpoint_final.pth").stat().st_size < 1.5 * weights + 100_000
    configuration = json.loads((exported / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert configuration["resampling_fn_data_kwargs"]["force_separate_z"] is False  # all axes together, as ReCoKD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = _nnunet_predictor(exported)
    assert [str(w.message) for w in caught] == []
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    assert type(predictor.network) is PlainConvUNet  # the stock class, built by nnU-Net from the plans
    ours = load_bundle(PHANTOM_MODEL).build_network()
    case = generate_dataset(1, seed=5, shape=(64, 64, 64))[0]
    image = case.image.astype(np.float32)
    patch = torch.from_numpy((image - image.mean()) / image.std())[None, :, 8:48, 12:52, 4:44]  # one 40³ window
    with torch.no_grad():
        difference = (predictor.network.eval()(patch) - ours(patch)).abs().max().item()
    assert difference <= 1e-4


def test_whole_case_labels_agree_with_recokd_predict(exported):
    """nnU-Net's predictor on a phantom at the model's spacing against ReCoKD's predictor (nnU-Net's window
    weights): the same labels on >= 99.5 % of the voxels."""
    predictor = _nnunet_predictor(exported)
    recokd = Predictor(PHANTOM_MODEL, device="cpu", blend="nnunet", postprocess="none")
    case = generate_dataset(1, seed=11, shape=(64, 64, 64))[0]
    image = case.image.astype(np.float32)
    theirs = predictor.predict_single_npy_array(image, {"spacing": [1.0, 1.0, 1.0]}, None, None, False)
    ours = recokd.predict_array(image[0], (1.0, 1.0, 1.0))
    assert theirs.shape == ours.shape
    assert (theirs == ours).mean() >= 0.995
    assert len(np.unique(ours)) == 5  # every structure is there: agreement on background alone would not count
    # nnU-Net's default (mirroring on) on a model trained without mirroring: skipped, not a crash
    mirrored = _nnunet_predictor(exported, mirroring=True)
    assert mirrored.allowed_mirroring_axes is None
    assert (mirrored.predict_single_npy_array(image, {"spacing": [1.0, 1.0, 1.0]}, None, None, False) == theirs).all()


def test_nnunetv2_predict_on_a_real_la2018_case_matches_recokd_predict(shared_data, tmp_path):
    """The shipped LA2018 student, exported, run by nnU-Net's own command in a subprocess on a test case."""
    case = shared_data / "LA2018-lowres" / "imagesTs" / "ULHWPWKKLTE921LQLH1P_0000.nii.gz"
    if not case.is_file():
        pytest.skip(f"{case} not found")
    import SimpleITK as sitk

    folder = export_nnunet(MODELS / "la2018-left-atrium.recokd", tmp_path / "results", dataset_id=501)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / case.name).symlink_to(case)
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results"), "PATH": str(Path(sys.executable).parent)}
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(tmp_path / "in"),
               "-o", str(tmp_path / "out"), "-m", str(folder), "-f", "0", "-device", "cpu", "--disable_tta",
               "-npp", "1", "-nps", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ULHWPWKKLTE921LQLH1P.nii.gz")))
    ours = Predictor(MODELS / "la2018-left-atrium.recokd", device="cpu", blend="nnunet",
                     postprocess="none").predict_files([case], tmp_path / "ours.nii.gz")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(ours)))
    assert ours.sum() > 1000 and (theirs == ours).mean() >= 0.995


def test_labels_become_what_nnunet_needs_and_it_loads_them(tmp_path):
    """nnU-Net wants value 0 named "background" and one label per output: a model whose background has
    another name and whose label values have a gap still loads (the gap as ReCoKD names it)."""
    from ReCoKDLib.data.planning import ChannelNormalisation, Plans
    from ReCoKDLib.models import isotropic_spec

    plans = Plans(dataset_name="Gappy", channel_names={0: "CT"}, labels={"bg": 0, "liver": 1, "tumour": 3},
                  target_spacing=(1.0, 1.0, 1.0), normalisation=(ChannelNormalisation("zscore"),), patch_size=(16, 16, 16))
    torch.manual_seed(0)
    network = build_unet(isotropic_spec(1, plans.num_classes, num_levels=3, filters=[8, 16, 32])).eval()
    folder = export_nnunet(bundle_from_network(network, plans, "gappy").save(tmp_path / "gappy.recokd"), tmp_path / "out")
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "liver": 1, "label_2": 2, "tumour": 3}
    assert _nnunet_predictor(folder).label_manager.num_segmentation_heads == 4


def test_a_network_no_stock_nnunet_class_computes_is_refused_and_nothing_is_written(tmp_path):
    plans = tiny_plans()
    spec = UNetSpec(1, 3, kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                    filters=(8, 16, 32))
    bundle = bundle_from_network(build_unet(spec).eval(), plans, "aniso").save(tmp_path / "aniso.recokd")
    with pytest.raises(ReCoKDError, match=r"decoder convolves level 0 with level 1's kernel \[3, 3, 3\].*PlainConvUNet "
                                          r"uses level 0's \[1, 3, 3\]") as caught:
        export_nnunet(bundle, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_an_anisotropic_network_with_nnunets_decoder_kernels_exports_and_nnunet_computes_its_logits(tmp_path):
    """Thick-slice data: level 0's kernel is 1x3x3. With nnU-Net's decoder convention (each decoder stage
    convolves with its own level's kernel: the students of nnU-Net teachers) the stock PlainConvUNet computes
    the same logits; a ReCoKD description without it keeps that decoder on a rebuild."""
    from ReCoKDLib.data.planning import ChannelNormalisation, Plans

    plans = Plans(dataset_name="Thick", channel_names={0: "MRI"}, labels={"background": 0, "a": 1, "b": 2},
                  target_spacing=(5.0, 1.0, 1.0), normalisation=(ChannelNormalisation("zscore"),),
                  patch_size=(8, 32, 32))
    spec = UNetSpec(1, 3, kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                    filters=(8, 16, 32), decoder_kernels="own")
    torch.manual_seed(0)
    network = build_unet(spec).eval()
    bundle = bundle_from_network(network, plans, "thick").save(tmp_path / "thick.recokd")
    assert load_bundle(bundle).spec.decoder_kernels == "own"
    folder = export_nnunet(bundle, tmp_path / "out", dataset_id=43)
    arch = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["arch_kwargs"]["kernel_sizes"] == [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predictor = _nnunet_predictor(folder)
    assert [str(w.message) for w in caught] == []
    x = torch.randn(1, 1, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (predictor.network.eval()(x) - network(x)).abs().max().item() <= 1e-4


def test_a_folder_with_only_fold_all_runs_in_recokd_and_in_slicers_model_list(exported, tmp_path):
    """nnU-Net's fold_all (trained on every case) alone: chosen by default, as nnU-Net's predictor does, by
    `recokd predict` and by the Slicer module's model list (its Folds box says so)."""
    import shutil

    import SimpleITK as sitk

    from ReCoKDLib.models.nnunet import open_nnunet_model

    folder = tmp_path / exported.parent.name / exported.name
    shutil.copytree(exported, folder)
    (folder / "fold_0").rename(folder / "fold_all")
    assert list(open_nnunet_model(folder).checkpoints) == ["all"]
    image = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(generate_dataset(1, seed=3, shape=(48, 48, 48))[0].image[0]), str(image))
    for model, out in ((folder, "all.nii.gz"), (exported, "fold0.nii.gz")):
        assert main(["predict", "-m", str(model), "-i", str(image), "-o", str(tmp_path / out), "--no-progress",
                     "--backend", "torch"]) == 0
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n))) for n in ("all.nii.gz", "fold0.nii.gz")]
    assert (labels[0] == labels[1]).all() and len(np.unique(labels[0])) > 1  # the same weights, now as fold_all
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ReCoKD"))
    from ReCoKDSlicer import models

    info = models.nnunetInfo(folder.parent)
    assert info.nnunetFolds == ["all"] and info.labels


def test_a_model_whose_preprocessing_nnunet_cannot_express_is_refused_and_nothing_is_written(tmp_path):
    """Every plan ReCoKD's planner makes maps onto nnU-Net's preprocessing; one that does not (here: a
    normalisation scheme nnU-Net has no class for, set on a bundle in memory as a Python user could) is one
    line, nothing written. A model whose training cases were all 1 x 1 x 1 (1 mm, or voxel units) exports
    with a note saying what nnU-Net will not check."""
    from dataclasses import replace

    from ReCoKDLib.data.planning import ChannelNormalisation
    from ReCoKDLib.deployment.nnunet_export import export_notes

    bundle = load_bundle(PHANTOM_MODEL)
    odd = ChannelNormalisation("zscore")
    object.__setattr__(odd, "scheme", "minmax")  # (the planner never makes one: ct and zscore only)
    bundle.plans = replace(bundle.plans, normalisation=(odd,))
    with pytest.raises(ReCoKDError, match="normalisation 'minmax' of channel 0 has no nnU-Net equivalent") as caught:
        export_nnunet(bundle, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))
    notes = export_notes(load_bundle(PHANTOM_MODEL))  # the phantoms are 1 mm: exported, with the note
    assert any("spacing 1 x 1 x 1" in n for n in notes)


def test_an_earlier_export_is_replaced_only_when_asked_and_the_command_line_says_how_to_use_it(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["export", str(PHANTOM_MODEL), "--format", "nnunet", "-o", str(out), "--dataset-id", "7"]) == 0
    printed = capsys.readouterr().out
    folder = out / "Dataset007_ReCoKDPhantom" / NNUNET_MODEL_FOLDER
    assert f"nnU-Net v2 model folder: {folder}" in printed and "nnUNetv2_predict" in printed
    stamp = (folder / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns
    assert main(["export", str(PHANTOM_MODEL), "--format", "nnunet", "-o", str(out), "--dataset-id", "7"]) == 2
    assert "exists; choose another -o or --dataset-id, or pass --overwrite" in capsys.readouterr().err
    assert (folder / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns == stamp
    assert main(["export-model", str(PHANTOM_MODEL), "--format", "nnunet", "-o", str(out), "--dataset-id", "7",
                 "--overwrite"]) == 0
    assert (folder / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns != stamp
    other = out / "Dataset008_ReCoKDPhantom" / NNUNET_MODEL_FOLDER
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(PHANTOM_MODEL), "--format", "nnunet", "-o", str(out), "--dataset-id", "8",
                 "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "mine"
