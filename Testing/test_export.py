"""ONNX / TorchScript export: the exported student gives the same labels as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle_helpers import make_run, phantom_volume
from ReCoKDLib.deployment.bundle import load_bundle
from ReCoKDLib.cli import main
from ReCoKDLib.inference.predictor import Predictor

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'recokd[export]')")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "run", seed=3)
    assert main(["export", str(run), "-o", str(root / "student.recokd"), "--onnx", "--torchscript"]) == 0
    return root


def test_sidecars_written_and_bundle_stays_clean(exported):
    assert (exported / "student.onnx").is_file() and (exported / "student.torchscript.pt").is_file()
    load_bundle(exported / "student.recokd")  # no .onnx / .pt member inside: it still loads


def test_onnx_and_torchscript_label_parity(exported):
    from ReCoKDLib.inference.export import OnnxNetwork

    bundle = load_bundle(exported / "student.recokd")
    image = phantom_volume((32, 32, 32), seed=5)
    spacing = (1.0, 1.0, 1.0)
    reference = Predictor(bundle, device="cpu").predict_array(image, spacing)
    via_onnx = Predictor(bundle, device="cpu", network=OnnxNetwork(exported / "student.onnx", threads=1)).predict_array(image, spacing)
    via_ts = Predictor(bundle, device="cpu", network=torch.jit.load(str(exported / "student.torchscript.pt"))).predict_array(image, spacing)
    assert len(np.unique(reference)) > 1  # a meaningful comparison, not all background
    assert np.mean(via_onnx == reference) >= 0.999
    assert np.mean(via_ts == reference) >= 0.999


def test_export_model_command(exported, tmp_path):
    out = tmp_path / "again.onnx"
    assert main(["export-model", str(exported / "student.recokd"), "--format", "onnx", "-o", str(out)]) == 0
    import onnx

    onnx.checker.check_model(str(out))
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["image"]
