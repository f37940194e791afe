"""The predictor's engines: PyTorch, ONNX Runtime and OpenVINO give the same labels on real cases; the ONNX
graph is exported once per bundle and cached by content (OpenVINO's compiled model beside it); ``auto`` picks
what can run; bad choices are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundle_helpers import phantom_volume
from ReCoKDLib.cli import main
from ReCoKDLib.deployment.bundle import bundle_from_network, load_bundle
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.inference import backends
from ReCoKDLib.inference.backends import cached_onnx, onnx_cache_key, select_backend
from ReCoKDLib.inference.predictor import Predictor

MODELS = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "onnx"


@pytest.mark.own_process
def test_every_engine_agrees_with_torch_fp32_on_real_cases(shared_data, cache):
    """The shipped LA2018 student on three LA2018 test volumes: the labels of ONNX Runtime, OpenVINO (fp32 and
    bf16) and PyTorch bf16 agree with PyTorch fp32's on >= 99.9 % of voxels."""
    bundle = load_bundle(MODELS / "la2018-left-atrium.recokd")
    by_torch = Predictor(bundle, device="cpu", backend="torch")
    others = {"onnxruntime": Predictor(bundle, device="cpu", backend="onnxruntime"),
              "openvino": Predictor(bundle, device="cpu", backend="openvino"),
              "openvino bf16": Predictor(bundle, device="cpu", backend="openvino", precision="bf16"),
              "torch bf16": Predictor(bundle, device="cpu", backend="torch", precision="bf16")}
    assert [p.backend for p in others.values()] == ["onnxruntime", "openvino", "openvino", "torch"]
    assert others["openvino bf16"].network.precision == "bf16" and others["openvino"].network.precision == "fp32"
    # one graph for both runtimes; OpenVINO's compiled models cached beside it
    assert sorted(p.name for p in cache.iterdir()) == [f"{onnx_cache_key(bundle)}.onnx", "openvino"]
    assert any((cache / "openvino").iterdir())
    images = sorted((shared_data / "LA2018-lowres" / "imagesTs").glob("*_0000.nii.gz"))[:3]
    for image_file in images:
        image = sitk.ReadImage(str(image_file))
        a = sitk.GetArrayFromImage(by_torch.predict_image(image))
        assert a.sum() > 1000  # the atrium is there
        for name, predictor in others.items():
            b = sitk.GetArrayFromImage(predictor.predict_image(image))
            assert (a == b).mean() >= 0.999, (image_file.name, name)


def _tiny_bundle(seed: int):
    from ReCoKDLib.data.planning import ChannelNormalisation, Plans
    from ReCoKDLib.models.unet import build_unet, isotropic_spec

    torch.manual_seed(seed)
    net = build_unet(isotropic_spec(1, 3, num_levels=3, filters=(8, 16, 32))).eval()
    plans = Plans(dataset_name="tiny", channel_names={0: "MRI"}, labels={"background": 0, "organ": 1, "kidney": 2},
                  target_spacing=(1.0, 1.0, 1.0), normalisation=(ChannelNormalisation("zscore"),),
                  patch_size=(16, 16, 16), median_shape=(24, 24, 24))
    return bundle_from_network(net, plans, name=f"tiny{seed}")


def test_the_graph_is_cached_by_content_and_a_damaged_one_is_exported_again(cache, monkeypatch):
    from ReCoKDLib.inference import export

    first, second = _tiny_bundle(0), _tiny_bundle(1)
    assert onnx_cache_key(first) != onnx_cache_key(second)  # other weights, other graph
    path = cached_onnx(first)
    original, exports = export.export_onnx, []

    def counting(bundle, target, **kwargs):
        exports.append(Path(target))
        return original(bundle, target, **kwargs)

    monkeypatch.setattr(export, "export_onnx", counting)
    assert Predictor(first, device="cpu", backend="onnxruntime").backend == "onnxruntime"
    assert exports == []  # reused
    path.write_bytes(b"not an onnx graph")
    predictor = Predictor(first, device="cpu", backend="onnxruntime")
    assert predictor.backend == "onnxruntime" and exports == [path]
    volume = phantom_volume((24, 24, 24))
    labels = predictor.predict_array(volume, (1.0, 1.0, 1.0))
    reference = Predictor(first, device="cpu", backend="torch").predict_array(volume, (1.0, 1.0, 1.0))
    assert (labels == reference).mean() >= 0.999


def _without(monkeypatch, *engines: str) -> None:
    """Pretend ``engines`` are not installed."""
    available = backends._engine_available
    monkeypatch.setattr(backends, "_engine_available", lambda name: name not in engines and available(name))


def test_auto_picks_onnxruntime_on_the_cpu_and_torch_where_it_cannot_run(cache, monkeypatch):
    bundle = _tiny_bundle(2)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    _without(monkeypatch, "openvino")
    # measured: ONNX Runtime wins at one window per call (docs/results.md); from two on, auto times both
    assert select_backend(bundle, "auto", cpu, sw_batch_size=1)[1] == "onnxruntime"
    assert Predictor(bundle, device="cpu", backend="auto", sw_batch_size=1).backend == "onnxruntime"
    assert select_backend(bundle, "auto", cuda)[1] == "torch"
    network, name = select_backend(bundle, "auto", cpu, sw_batch_size=1, precision="bf16")
    assert name == "torch" and isinstance(network, backends.Autocast)
    with pytest.raises(ReCoKDError, match="bf16 does not run with ONNX Runtime; use --backend torch or openvino or auto"):
        select_backend(bundle, "onnxruntime", cpu, precision="bf16")
    with pytest.raises(ReCoKDError, match="precision must be one of auto, fp32, bf16"):
        Predictor(bundle, device="cpu", precision="fp16")
    with pytest.raises(ReCoKDError, match="runs on the CPU; use --device cpu, or --backend torch on cuda"):
        select_backend(bundle, "onnxruntime", cuda)
    with pytest.raises(ReCoKDError, match="runs on the CPU; use --device cpu, or --backend torch on cuda"):
        select_backend(bundle, "openvino", cuda)
    with pytest.raises(ReCoKDError, match="backend must be one of auto, torch, onnxruntime, openvino"):
        select_backend(bundle, "tensorrt", cpu)
    _without(monkeypatch, "onnxruntime", "openvino")
    assert select_backend(bundle, "auto", cpu)[1] == "torch"
    with pytest.raises(ReCoKDError, match=r"pip install 'recokd\[export\]'"):
        select_backend(bundle, "onnxruntime", cpu)
    with pytest.raises(ReCoKDError, match=r"pip install 'recokd\[openvino\]'"):
        select_backend(bundle, "openvino", cpu)


class _QuietMachine:
    """OtherLoad as on an idle machine: a choice timed meanwhile is kept (the busy case has its own test)."""

    other_cores = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.own_process
def test_auto_times_every_engine_once_per_bundle_and_keeps_the_fastest(cache, monkeypatch):
    from ReCoKDLib.inference.export import OnnxNetwork, OpenVinoNetwork

    monkeypatch.setattr(backends, "OtherLoad", _QuietMachine)

    bundle, cpu = _tiny_bundle(4), torch.device("cpu")
    speeds, timed = {"torch": 0.5, "onnxruntime": 0.2, "openvino": 0.3}, []

    def fake_seconds(network, batch, repeats=3):
        name = {OnnxNetwork: "onnxruntime", OpenVinoNetwork: "openvino"}.get(type(network), "torch")
        timed.append((name, tuple(batch.shape)))
        return speeds[name]

    monkeypatch.setattr(backends, "seconds_per_call", fake_seconds)
    said: list[str] = []
    network, name = select_backend(bundle, "auto", cpu, sw_batch_size=2, log=said.append)
    assert name == "onnxruntime" and isinstance(network, OnnxNetwork)
    assert sorted(timed) == [(n, (2, 1, 16, 16, 16)) for n in ("onnxruntime", "openvino", "torch")]
    assert "running onnxruntime" in said[0] and "0.500 s" in said[0]
    # bf16 is timed on its own, among the engines that have it
    timed[:] = []
    network, name = select_backend(bundle, "auto", cpu, sw_batch_size=2, precision="bf16")
    assert name == "openvino" and network.precision == "bf16" and sorted(n for n, _ in timed) == ["openvino", "torch"]
    timed[:] = []
    # remembered: not measured again, even if the machine would now say otherwise
    speeds["torch"], timed[:] = 0.1, []
    assert select_backend(bundle, "auto", cpu, sw_batch_size=2)[1] == "onnxruntime" and timed == []
    assert Predictor(bundle, device="cpu", backend="auto").backend == "onnxruntime"  # default: 2 windows
    # other settings (windows per call, threads) are measured on their own
    assert select_backend(bundle, "auto", cpu, sw_batch_size=4)[1] == "torch" and len(timed) == 3
    assert select_backend(bundle, "auto", cpu, sw_batch_size=2, threads=torch.get_num_threads() + 1)[1] == "torch" \
        and len(timed) == 6
    # a damaged record is measured again, not an error
    (cache / "choices.json").write_text("{broken")
    assert select_backend(bundle, "auto", cpu, sw_batch_size=2)[1] == "torch" and len(timed) == 9
    assert len(json.loads((cache / "choices.json").read_text())) == 1


@pytest.mark.own_process
def test_auto_measures_for_real_and_records_what_it_measured(cache):
    bundle = _tiny_bundle(5)
    name = select_backend(bundle, "auto", torch.device("cpu"), sw_batch_size=2)[1]
    (record,) = json.loads((cache / "choices.json").read_text()).values()
    engines = ("torch", "onnxruntime", "openvino")
    assert all(record[f"{n}_seconds"] > 0 for n in engines)
    assert name == record["backend"] == min(engines, key=lambda n: record[f"{n}_seconds"])


def test_auto_falls_back_to_torch_and_says_why_when_the_export_fails(cache, monkeypatch):
    from ReCoKDLib.inference import export

    def broken(bundle, path, **kwargs):
        raise ReCoKDError("this network does not export")

    monkeypatch.setattr(export, "export_onnx", broken)
    said = []
    network, name = select_backend(_tiny_bundle(3), "auto", torch.device("cpu"), log=said.append, sw_batch_size=1)
    assert name == "torch" and isinstance(network, torch.nn.Module)
    assert said and "does not export" in said[0] and "PyTorch" in said[0]


def test_blend_modes_and_a_bad_one(cache):
    bundle = _tiny_bundle(4)
    volume = phantom_volume((40, 40, 40))
    labels = {b: Predictor(bundle, device="cpu", blend=b, overlap=0.5).predict_array(volume, (1.0, 1.0, 1.0))
              for b in ("gaussian", "constant", "nnunet")}
    assert all(v.shape == volume.shape for v in labels.values())
    with pytest.raises(ReCoKDError, match="blend must be one of gaussian, constant, nnunet"):
        Predictor(bundle, device="cpu", blend="median")


@pytest.mark.own_process
def test_predict_command_takes_a_backend(cache, tmp_path, capsys):
    bundle_path = _tiny_bundle(5).save(tmp_path / "tiny.recokd")
    image = tmp_path / "img.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(phantom_volume((24, 24, 24))), str(image))
    outs = {}
    for backend in ("torch", "onnxruntime", "openvino"):
        out = tmp_path / f"{backend}.nii.gz"
        assert main(["predict", "-m", str(bundle_path), "-i", str(image), "-o", str(out), "--backend", backend,
                     "--device", "cpu", "--no-progress"]) == 0
        outs[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.mean(outs["torch"] == outs["onnxruntime"]) >= 0.999 and np.mean(outs["torch"] == outs["openvino"]) >= 0.999


@pytest.mark.own_process
def test_benchmark_speed_times_a_width_ladder_per_engine_round_by_round(cache, tmp_path, capsys):
    from bundle_helpers import tiny_network, tiny_plans, write_image

    plans = tiny_plans()
    (tmp_path / "plan").mkdir()
    plans.save(tmp_path / "plan" / "plans.json")
    (tmp_path / "plan" / "network.json").write_text(tiny_network(plans).spec.to_json())
    write_image(phantom_volume((24, 24, 24)), tmp_path / "images" / "c1_0000.nii.gz")
    write_image(phantom_volume((32, 24, 24)), tmp_path / "images" / "c2_0000.nii.gz")
    code = main(["benchmark-speed", "--plans", str(tmp_path / "plan" / "plans.json"), "--images", str(tmp_path / "images"),
                 "--base-filters", "8", "--max-filters", "32", "--width-factors", "2", "--threads", "1",
                 "--backends", "torch", "onnxruntime", "openvino", "--precisions", "fp32", "bf16",
                 "--max-cases", "2", "--repeats", "2", "-o", str(tmp_path / "speed")])
    assert code == 0, capsys.readouterr().err
    rows = {(r["name"], r["backend"], r["precision"]): r
            for r in json.loads((tmp_path / "speed" / "speed.json").read_text())}
    engines = {("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("torch", "bf16"), ("openvino", "bf16")}
    assert set(rows) == {(m, *e) for m in ("teacher", "student R=2") for e in engines}  # no ONNX Runtime bf16
    assert rows[("teacher", "torch", "fp32")]["filters"] == [8, 16, 32]
    assert rows[("student R=2", "torch", "fp32")]["filters"] == [8, 8, 16]  # channels / R, at least 8
    assert rows[("teacher", "torch", "fp32")]["flops"] > rows[("student R=2", "torch", "fp32")]["flops"] > 0
    for (name, backend, precision), r in rows.items():
        assert len(r["round_seconds"]) == 2 and r["seconds_per_volume"] > 0 and r["plain_monai_seconds"] > 0
        assert r["peak_ram_mb"] > 50  # a fresh process with torch loaded
        assert (r["agreement"] == 1.0) if (backend, precision) == ("torch", "fp32") else r["agreement"] > 0.9
        if name != "teacher":  # per round, against the teacher on the same engine and precision
            teacher = rows[("teacher", backend, precision)]
            assert r["speedups"] == pytest.approx([t / s for t, s in zip(teacher["round_seconds"], r["round_seconds"])])
    table = (tmp_path / "speed" / "speed.md").read_text()
    assert "median [range] over rounds" in table and "openvino bf16" in table and "peak RAM MB" in table
    assert "AVX" in table or "machine:" in table


def test_timed_rounds_take_turns_and_rotate_the_order():
    from ReCoKDLib.benchmarks.inference import ratio_text, round_ratios, timed_rounds

    calls: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def predict_image(self, images, name=""):
            calls.append(f"{self.name}:{name}")

    rounds = timed_rounds([Fake("a"), Fake("b"), Fake("c")], [["v1"], ["v2"]], repeats=3)
    assert calls[:3] == ["a:warm-up", "b:warm-up", "c:warm-up"]
    timed = [c.split(":")[0] for c in calls[3:]]
    assert timed == list("aabbcc" "bbccaa" "ccaabb")  # each model both volumes in turn; the order rotates
    assert [len(r) for r in rounds] == [3, 3, 3]
    assert round_ratios([2.0, 4.0], [1.0, 1.0]) == [2.0, 4.0] and ratio_text([2.0, 4.0, 3.0]) == "3.0× [2.0–4.0]"


@pytest.fixture()
def torch_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_prediction_leaves_a_core_free_by_default(torch_threads, monkeypatch):
    from ReCoKDLib.utils import runtime

    bundle = _tiny_bundle(6)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    torch.set_num_threads(4)
    Predictor(bundle, device="cpu", backend="torch")
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(runtime, "usable_cores", lambda: 1)
    Predictor(bundle, device="cpu", backend="torch")
    assert torch.get_num_threads() == 1  # never none
    Predictor(bundle, device="cpu", backend="torch", threads=2)  # asked for: as asked
    assert torch.get_num_threads() == 2


def test_auto_says_when_other_processes_loaded_the_machine_while_timing(cache, monkeypatch):
    """A real busy process beside auto's timing: the choice is made, the note says the machine was busy,
    and the record is timed again next time instead of being kept for good."""
    import subprocess
    import sys
    import time

    bundle, cpu = _tiny_bundle(7), torch.device("cpu")
    timed: list[str] = []

    def slow_seconds(network, batch, repeats=3):
        time.sleep(0.6)  # the spinner runs meanwhile
        timed.append(type(network).__name__)
        return 0.1 if type(network).__name__ == "OnnxNetwork" else 0.2

    monkeypatch.setattr(backends, "seconds_per_call", slow_seconds)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        said: list[str] = []
        assert select_backend(bundle, "auto", cpu, sw_batch_size=2, log=said.append)[1] == "onnxruntime"
    finally:
        spinner.kill()
        spinner.wait()
    assert any("other processes kept" in m and "timed again next time" in m for m in said), said
    (record,) = json.loads((cache / "choices.json").read_text()).values()
    assert record["busy"] is True and record["other_cores"] >= 0.5
    runs = len(timed)
    assert select_backend(bundle, "auto", cpu, sw_batch_size=2)[1] == "onnxruntime" and len(timed) == 2 * runs


# -- precision auto and the bundle's check case ---------------------------------------------------------


def _la_bundle_with_check(shared_data):
    from ReCoKDLib.deployment.bundle import with_check_case

    bundle = load_bundle(MODELS / "la2018-left-atrium.recokd")
    image = sorted((shared_data / "LA2018-lowres" / "imagesTs").glob("*_0000.nii.gz"))[0]
    label = shared_data / "LA2018-lowres" / "labelsTs" / image.name.replace("_0000.nii.gz", ".nii.gz")
    return with_check_case(bundle, [image], label)


def test_a_check_case_travels_with_the_bundle_and_is_checked_on_load(shared_data, tmp_path):
    from ReCoKDLib.deployment.check_case import read_check_case

    bundle = _la_bundle_with_check(shared_data)
    image, labels = read_check_case(bundle.check)
    assert image.shape == (1, 1, *bundle.plans.patch_size) and labels.shape == tuple(bundle.plans.patch_size)
    assert 0.01 < float(labels.float().mean()) < 0.99  # centred on the atrium: both classes in the window
    for target in (tmp_path / "b.recokd", tmp_path / "folder"):
        again = load_bundle(bundle.save(target))
        assert again.check == bundle.check and "check.safetensors" in again.manifest["files"]
    # a damaged check member is refused like any other member
    import zipfile

    with zipfile.ZipFile(tmp_path / "b.recokd") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    damaged = bytearray(members["check.safetensors"])
    damaged[-100] ^= 0xFF
    members["check.safetensors"] = bytes(damaged)
    with zipfile.ZipFile(tmp_path / "bad.recokd", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ReCoKDError, match="check.safetensors does not match its sha256"):
        load_bundle(tmp_path / "bad.recokd")
    (tmp_path / "folder" / "check.safetensors").unlink()
    with pytest.raises(ReCoKDError, match="lacks check.safetensors, which its bundle.json lists"):
        load_bundle(tmp_path / "folder")


@pytest.mark.own_process
def test_precision_auto_runs_bf16_only_where_the_check_case_agrees(shared_data, cache, monkeypatch):
    from safetensors.numpy import load, save

    from ReCoKDLib.deployment import check_case
    from ReCoKDLib.inference.backends import resolve_precision
    from ReCoKDLib.utils import runtime

    cpu, said = torch.device("cpu"), []
    bundle = _la_bundle_with_check(shared_data)
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)  # the decision below is the check's, on any CPU
    assert resolve_precision(bundle, "auto", cpu, log=said.append) == "bf16"
    assert "running bf16" in said[-1] and "(torch)" in said[-1] and "(openvino)" in said[-1]
    (record,) = [v for k, v in json.loads((cache / "choices.json").read_text()).items() if k.startswith("precision|")]
    assert record["precision"] == "bf16" and record["torch_agreement"] >= 0.999
    # remembered: not checked again on this machine
    calls = []
    monkeypatch.setattr(check_case, "label_agreement", lambda *a, **k: calls.append(a) or 0.0)
    assert Predictor(bundle, device="cpu", backend="auto", precision="auto").precision == "bf16" and calls == []
    monkeypatch.undo()
    # a model whose bf16 labels differ (here: check labels that disagree with its fp32 ones) stays fp32
    tensors = load(bundle.check)
    tensors["labels"] = (1 - tensors["labels"]).astype(np.uint8)
    bundle.check = save(tensors)
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    assert resolve_precision(bundle, "auto", cpu, log=said.append) == "fp32" and "running fp32" in said[-1]
    # no check case, no native bf16, another device: fp32, and it says why
    bundle.check = None
    assert resolve_precision(bundle, "auto", cpu, log=said.append) == "fp32" and "no check case" in said[-1]
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    assert resolve_precision(_la_bundle_with_check(shared_data), "auto", cpu, log=said.append) == "fp32"
    assert "no native bfloat16" in said[-1]
    assert resolve_precision(bundle, "bf16", cpu) == "bf16"  # asked for: as asked
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    checked = _la_bundle_with_check(shared_data)
    # an explicit engine without bf16 keeps fp32 (auto must never pick what that engine cannot run)
    assert resolve_precision(checked, "auto", cpu, log=said.append, backend="onnxruntime") == "fp32"
    assert "onnxruntime has no bf16" in said[-1]
    assert Predictor(checked, device="cpu", backend="onnxruntime", precision="auto").precision == "fp32"


def test_export_adds_a_check_case_from_the_runs_dataset(tmp_path):
    from bundle_helpers import make_run

    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet
    from ReCoKDLib.deployment.bundle import bundle_from_run
    from ReCoKDLib.deployment.check_case import read_check_case

    dataset = save_dataset_nnunet(generate_dataset(2, seed=3, shape=(32, 32, 32)), tmp_path / "Dataset902_Check")
    run = make_run(tmp_path / "run")
    description = json.loads((run / "run.json").read_text())
    assert bundle_from_run(run).check is None  # no dataset recorded: no check case, nothing fails
    description.update(dataset=str(dataset), val_cases=["case_001"])
    (run / "run.json").write_text(json.dumps(description))
    bundle = bundle_from_run(run)
    image, labels = read_check_case(bundle.check)
    assert image.shape[2:] == tuple(bundle.plans.patch_size) and labels.shape == tuple(bundle.plans.patch_size)


def test_a_remembered_choice_is_timed_again_when_another_engine_is_installed(monkeypatch):
    """The key of a remembered ``auto`` choice names the installed engines and the CPU: an engine installed
    later is timed, and a home folder shared by different machines keeps one choice per kind of machine."""
    from ReCoKDLib.utils import runtime

    bundle = _tiny_bundle(6)
    monkeypatch.setattr(backends, "_engine_available", lambda name: name != "openvino")
    before = backends._choice_key(bundle, 2, 1, "fp32")
    monkeypatch.setattr(backends, "_engine_available", lambda name: True)
    after = backends._choice_key(bundle, 2, 1, "fp32")
    assert before != after and "engines=torch,onnxruntime,openvino" in after
    monkeypatch.setattr(runtime, "cpu_flags", lambda: ("Other CPU", set()))
    assert backends._choice_key(bundle, 2, 1, "fp32") != after
