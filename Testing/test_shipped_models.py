"""The models shipped in ReCoKDLib/resources/models: registry valid, bundles intact, Dice as recorded.

The recorded figures come from ``scripts/ship_models.sh`` (``recokd evaluate --json`` on cases the
models never trained on); here they are measured again with the shipped bundles themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ReCoKDLib.deployment.bundle import load_bundle
from ReCoKDLib.deployment.registry import builtin_registry_path, fetch_model, load_registry, sha256_file, validate_registry

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "ReCoKDLib" / "resources" / "models"


@pytest.fixture(scope="module")
def registry():
    path = builtin_registry_path()
    assert path == MODELS / "registry.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    validate_registry(data, str(path))
    return data


def test_registry_and_bundles_verify(registry, tmp_path):
    names = [m["name"] for m in registry["models"]]
    assert {"la2018-left-atrium", "phantom-abdomen"} <= set(names)
    reg = load_registry(MODELS / "registry.json")
    for entry in registry["models"]:
        path = MODELS / entry["url"]
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["size"]
        assert entry["size"] < 2_000_000, "a shipped student should stay small enough for the repository"
        bundle = load_bundle(path)  # schema, version and every member's sha256
        p = bundle.provenance
        assert bundle.role == "student" and p["method"] == entry["method"]
        assert p["license"] == entry["license"] and "clinical" in p["license"]
        assert round(p["test_metrics"]["dice_mean"], 4) == entry["test_dice"]
        assert entry["channels"] == [bundle.channel_names[k] for k in sorted(bundle.channel_names)]
        foreground = {n for n, v in bundle.labels.items() if v > 0}
        assert set(bundle.labels.terminology) == foreground  # every structure carries standard codes
        assert all(t["type"][0] == "SCT" and t["category"][0] == "SCT" for t in bundle.labels.terminology.values())
        # fetched by name into a cache, verified on the way
        fetched = fetch_model(reg[entry["name"]], cache_dir=tmp_path / "cache", base=reg.base)
        assert sha256_file(fetched) == entry["sha256"]


def _dice(pred: np.ndarray, ref: np.ndarray, labels) -> float:
    scores = []
    for value in labels:
        a, b = pred == value, ref == value
        scores.append(1.0 if a.sum() + b.sum() == 0 else 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores))


def test_predict_by_name_without_a_registry_flag_reproduces_the_sample_dice(tmp_path, monkeypatch):
    """``recokd predict -m phantom-abdomen`` on the Slicer sample gives the Dice its bundle records."""
    from ReCoKDLib.data.phantom import write_sample_volume

    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECOKD_REGISTRY", raising=False)
    image = write_sample_volume(tmp_path / "ReCoKDPhantom.nrrd", tmp_path / "ReCoKDPhantom_label.nrrd")
    out = tmp_path / "seg.nrrd"
    result = subprocess.run([sys.executable, "-m", "ReCoKDLib.cli", "predict", "-m", "phantom-abdomen", "-i", str(image),
                             "-o", str(out), "--device", "cpu", "--no-progress", "--threads", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "home" / "models").is_dir()  # fetched into the per-user cache
    bundle = load_bundle(MODELS / "phantom-abdomen.recokd")
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ReCoKDPhantom_label.nrrd")))
    recorded = bundle.provenance["test_metrics"]["per_case_dice_mean"]["ReCoKDPhantom"]
    measured = _dice(pred, ref, [v for v in bundle.labels.values() if v > 0])
    assert abs(measured - recorded) <= 0.01, (measured, recorded)


def test_la2018_model_scores_its_recorded_test_dice(shared_data, tmp_path):
    from ReCoKDLib.inference.predictor import Predictor

    data = shared_data / "LA2018-lowres"
    bundle = load_bundle(MODELS / "la2018-left-atrium.recokd")
    recorded = bundle.provenance["test_metrics"]
    predictor = Predictor(bundle, device="cpu", threads=1)
    images = sorted((data / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == recorded["num_cases"] == 10
    scores = []
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        out = predictor.predict_files([image], tmp_path / f"{case}.nii.gz")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTs" / f"{case}.nii.gz")))
        scores.append(_dice(pred, ref, [1]))
    assert abs(np.mean(scores) - recorded["dice_mean"]) <= 0.01, (np.mean(scores), recorded["dice_mean"])
    assert recorded["dice_mean"] >= 0.88


def test_acdc_model_scores_its_recorded_held_out_dice(shared_data, tmp_path):
    """The ACDC heart model on fold 0 of the study's patient-grouped 3-fold split (never trained on)."""
    from ReCoKDLib.data.datasets import open_dataset
    from ReCoKDLib.inference.predictor import Predictor
    from ReCoKDLib.workflows.study import cv_folds

    dataset = open_dataset(shared_data / "ACDC-subset")
    held_out = cv_folds([r.case_id for r in dataset.training], 3, r"^(patient\d+)")[0]
    bundle = load_bundle(MODELS / "acdc-heart.recokd")
    recorded = bundle.provenance["test_metrics"]
    assert len(held_out) == recorded["num_cases"] == 16 and bundle.postprocessing == "largest-foreground"
    assert set(recorded["per_case_dice_mean"]) == set(held_out)
    predictor = Predictor(bundle, device="cpu", threads=1)
    scores = []
    for record in (r for r in dataset.training if r.case_id in held_out):
        out = predictor.predict_files(record.image_files, tmp_path / f"{record.case_id}.nii.gz")
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(record.label_file)))
        scores.append(np.mean([_dice(pred, ref, [c]) for c in (1, 2, 3)]))
    assert abs(np.mean(scores) - recorded["dice_mean"]) <= 0.01, (np.mean(scores), recorded["dice_mean"])
