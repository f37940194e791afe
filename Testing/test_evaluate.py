"""Evaluation metrics (Dice, HD95, NSD in mm), the evaluate command, the registry and the benchmark."""

from __future__ import annotations

import csv
import hashlib
import json

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk

from bundle_helpers import make_run, phantom_volume, tiny_plans, write_image
from ReCoKDLib.deployment.bundle import export_run, load_bundle
from ReCoKDLib.cli import main
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.evaluation import score_case
from ReCoKDLib.deployment.registry import default_cache_dir, fetch_model, load_registry, make_entry, resolve_model, validate_registry
from ReCoKDLib.resources import load_schema

NAMES = ["background", "organ", "kidney"]


def _ball(shape, centre, r):
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < r * r).astype(np.uint8)


def test_metrics_in_physical_units():
    ref = _ball((24, 24, 24), (12, 12, 12), 6)
    perfect = score_case(ref, ref, (1.0, 1.0, 1.0), NAMES[:2])
    assert perfect.scores["dice"]["organ"] == 1 and perfect.scores["hd95"]["organ"] == 0 and perfect.scores["nsd"]["organ"] == 1
    shifted = np.roll(ref, 1, axis=2)
    near = score_case(shifted, ref, (1.0, 1.0, 1.0), NAMES[:2])
    assert near.scores["hd95"]["organ"] == pytest.approx(1.0) and near.scores["nsd"]["organ"] == 1.0
    far = score_case(shifted, ref, (1.0, 1.0, 3.0), NAMES[:2])  # the same shift is 3 mm along W
    assert far.scores["hd95"]["organ"] == pytest.approx(3.0) and far.scores["nsd"]["organ"] < 0.9
    empty = score_case(np.zeros_like(ref), ref, (1.0, 1.0, 1.0), NAMES)
    assert empty.scores["dice"]["organ"] == 0 and np.isnan(empty.scores["hd95"]["organ"])
    assert np.isnan(empty.scores["dice"]["kidney"])  # absent from both: not scored


def test_evaluate_command(tmp_path, capsys):
    ref = _ball((20, 20, 20), (10, 10, 10), 5) + 2 * _ball((20, 20, 20), (3, 3, 3), 2)
    for case in ("a", "b"):
        write_image(ref, tmp_path / "gt" / f"{case}.nii.gz", (1.0, 1.0, 2.0))
        write_image(np.roll(ref, 1 if case == "b" else 0, 0), tmp_path / "pred" / f"{case}.nii.gz", (1.0, 1.0, 2.0))
    write_image(ref, tmp_path / "gt" / "c.nii.gz", (1.0, 1.0, 2.0))  # no prediction for c
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "organ": 1, "kidney": 2}))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", str(tmp_path / "labels.json")]) == 0
    out = capsys.readouterr().out
    assert "| organ |" in out and "| mean |" in out and "NSD@2mm" in out
    assert "1 reference case(s) have no prediction and were not scored: c" in out
    rows = list(csv.DictReader(open(tmp_path / "pred" / "evaluation.csv")))
    assert {r["case"] for r in rows} == {"a", "b", "mean"}
    a_organ = next(r for r in rows if r["case"] == "a" and r["class"] == "organ")
    assert float(a_organ["dice"]) == 1.0
    write_image(ref[:10], tmp_path / "pred" / "a.nii.gz")
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 2
    assert "evaluation.csv exists; pass --overwrite" in capsys.readouterr().err  # the first run's CSV is kept
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--overwrite"]) == 2
    assert "voxel grid" in capsys.readouterr().err


# -- registry ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return export_run(make_run(root / "run"), root / "student.recokd")


def _registry(tmp_path, url, sha):
    doc = {"version": 1, "models": [{"name": "student", "url": url, "sha256": sha, "description": "tiny"}]}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(doc))
    return path, doc


def test_registry_fetch_verifies_checksum(tmp_path, bundle_file, monkeypatch):
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "models"
    sha = hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    path, doc = _registry(tmp_path, bundle_file.as_uri(), sha)
    jsonschema.validate(doc, load_schema("registry"))
    reg = load_registry(path)
    cached = fetch_model(reg["student"])
    assert cached.parent == tmp_path / "home" / "models" and cached.read_bytes() == bundle_file.read_bytes()
    assert load_bundle(cached).name == "run"
    assert resolve_model("student", registry=path) == cached  # by name, offline, from the cache
    # a wrong checksum is refused and nothing is left in the cache
    path, _ = _registry(tmp_path, str(bundle_file), "0" * 64)
    with pytest.raises(ReCoKDError, match="checksum mismatch"):
        fetch_model(load_registry(path)["student"], cache_dir=tmp_path / "c2")
    assert not (tmp_path / "c2").exists()  # a failed fetch leaves no cache folder it created


def test_make_entry_and_fetch_command(tmp_path, bundle_file, capsys):
    entry = make_entry(bundle_file, description="tiny student")
    doc = {"version": 1, "models": [entry]}
    validate_registry(doc)
    (tmp_path / "reg.json").write_text(json.dumps(doc))
    assert main(["fetch-model", "student", "--registry", str(tmp_path / "reg.json"), "--cache", str(tmp_path / "c")]) == 0
    fetched = capsys.readouterr().out.strip()
    assert fetched.startswith(str(tmp_path / "c")) and load_bundle(fetched).name == "run"
    assert main(["fetch-model", "other", "--registry", str(tmp_path / "reg.json"), "--cache", str(tmp_path / "c")]) == 2
    assert "not in the registry" in capsys.readouterr().err


def test_fast_picks_the_registry_models_fast_variant(tmp_path, bundle_file, capsys):
    """``--fast`` (Slicer's Fast mode too) runs the model named by the entry's ``fast``, and says in one line
    where there is none."""
    fast_file = export_run(make_run(tmp_path / "fast-run", seed=7), tmp_path / "student-fast.recokd")
    entries = [make_entry(bundle_file, name="student"), make_entry(fast_file, name="student-fast")]
    entries[0]["fast"] = "student-fast"
    registry = tmp_path / "reg.json"
    registry.write_text(json.dumps({"version": 1, "models": entries}))
    cache = tmp_path / "cache"
    assert resolve_model("student", registry=registry, cache_dir=cache).read_bytes() == bundle_file.read_bytes()
    assert resolve_model("student", registry=registry, cache_dir=cache, fast=True).read_bytes() == fast_file.read_bytes()
    with pytest.raises(ReCoKDError, match="'student-fast' has no fast variant .*run it without --fast"):
        resolve_model("student-fast", registry=registry, cache_dir=cache, fast=True)
    with pytest.raises(ReCoKDError, match="--fast picks a registry model's fast variant, and .* is a file"):
        resolve_model(bundle_file, fast=True)
    # predict --fast segments with the fast model
    image = phantom_volume((20, 20, 20))
    write_image(image, tmp_path / "case.nii.gz")
    env = {"RECOKD_HOME": str(tmp_path / "home")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for name, flags in (("plain", []), ("fast", ["--fast"]), ("direct", None)):
            model = ["-m", str(fast_file)] if flags is None else ["-m", "student", "--registry", str(registry), *flags]
            assert main(["predict", *model, "-i", str(tmp_path / "case.nii.gz"), "-o", str(tmp_path / f"{name}.nii.gz"),
                         "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    read = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}.nii.gz"))) for n in ("plain", "fast", "direct")}
    assert np.array_equal(read["fast"], read["direct"]) and not np.array_equal(read["plain"], read["direct"])
    # a 'fast' that names no model of the registry, or the model itself, is refused when the registry is read
    for bad in ("nowhere", "student"):
        entries[0]["fast"] = bad
        with pytest.raises(ReCoKDError, match=f"the fast variant of 'student' is .*; name another model"):
            validate_registry({"version": 1, "models": entries})


def test_a_fresh_process_reports_its_own_peak_ram_not_its_parents(tmp_path):
    """Linux keeps ``ru_maxrss`` across fork and exec: a benchmark process holding 1.5 GB must not see its
    measuring child report 1.5 GB (the shipped-model speed table once read 1036 MB for every model)."""
    import sys

    from ReCoKDLib.benchmarks.inference import peak_ram_mb

    if not sys.platform.startswith("linux"):
        pytest.skip("the inherited high-water mark is Linux's")
    bundle = export_run(make_run(tmp_path / "run"), tmp_path / "m.recokd")
    write_image(phantom_volume((20, 20, 20)), tmp_path / "c_0000.nii.gz")
    ballast = np.ones(1536 * 2**20, np.uint8)  # touched: resident in this process
    try:
        peak = peak_ram_mb(bundle, [tmp_path / "c_0000.nii.gz"], threads=1)["peak_mb"]
    finally:
        del ballast
    assert 50 < peak < 1200, peak


@pytest.mark.parametrize(
    "entry, where",
    [
        ({"name": "x", "url": "file:///m.recokd", "sha256": "abc"}, "models/0/sha256"),
        ({"name": "x", "sha256": "0" * 64}, "models/0"),
        ({"name": "bad name!", "url": "file:///m.recokd", "sha256": "0" * 64}, "models/0/name"),
        ({"name": "x", "url": "file:///m.recokd", "sha256": "0" * 64, "pickle": True}, "models/0"),
    ],
)
def test_registry_schema_catches_malformed_entries(entry, where):
    doc = {"version": 1, "models": [entry]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, load_schema("registry"))
    with pytest.raises(ReCoKDError, match=where):
        validate_registry(doc)


# -- benchmark --------------------------------------------------------------------------------------


def test_benchmark_smoke(tmp_path, capsys):
    plans = tiny_plans()
    teacher = make_run(tmp_path / "teacher", role="teacher", method="none", seed=1, plans=plans)
    student = make_run(tmp_path / "student", role="student", method="none", seed=2, plans=plans)
    kd = export_run(make_run(tmp_path / "kd", role="student", method="recokd", seed=3, plans=plans), tmp_path / "kd.recokd")
    image = phantom_volume((20, 20, 20))
    write_image(image, tmp_path / "images" / "c1_0000.nii.gz")
    write_image((image > 0.7).astype(np.uint8), tmp_path / "labels" / "c1.nii.gz")
    code = main(["benchmark", "--models", f"teacher={teacher}", f"plain={student}", f"recokd={kd}",
                 "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                 "--repeats", "1", "--threads", "1", "-o", str(tmp_path / "bench")])
    assert code == 0
    table = (tmp_path / "bench" / "benchmark.md").read_text()
    for name in ("teacher", "plain", "recokd", "GFLOPs/patch", "overhead", "faster than the teacher"):
        assert name in table
    assert (tmp_path / "bench" / "benchmark.png").stat().st_size > 1000
    results = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert results[0]["flops"] > 0 and results[0]["parameters"] > 0
    assert 0 < results[0]["peak_memory_mb"] < 500
    # timed in turns: one entry per round for every model; a fresh process's peak RAM, every engine included
    assert all(len(r["round_seconds"]) == 1 and r["seconds_per_volume"] > 0 and r["peak_ram_mb"] > 50 for r in results)
    assert results[1]["gap_recovered"] == pytest.approx(0.0) or results[1]["gap_recovered"] is None
    again = ["benchmark", "--models", f"teacher={teacher}", "--images", str(tmp_path / "images"), "--labels",
             str(tmp_path / "labels"), "--repeats", "1", "--threads", "1", "-o", str(tmp_path / "bench")]
    assert main(again) == 2  # the overwrite rule: an earlier benchmark is kept unless --overwrite
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text()) == results
    # one row per model and backend; speed-ups within a backend and of the best backend each
    code = main(["benchmark", "--models", f"teacher={teacher}", f"recokd={kd}", "--backends", "torch", "onnxruntime",
                 "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                 "--repeats", "1", "--threads", "1", "-o", str(tmp_path / "bench2")])
    assert code == 0
    rows = json.loads((tmp_path / "bench2" / "benchmark.json").read_text())
    assert [(r["name"], r["backend"]) for r in rows] == [
        ("teacher (torch)", "torch"), ("teacher (onnxruntime)", "onnxruntime"),
        ("recokd (torch)", "torch"), ("recokd (onnxruntime)", "onnxruntime")]
    assert rows[0]["summary"]["dice"]["mean"] == pytest.approx(rows[1]["summary"]["dice"]["mean"], abs=1e-3)
    table = (tmp_path / "bench2" / "benchmark.md").read_text()
    assert "faster than the teacher on onnxruntime" in table and "best backend each" in table


def test_benchmark_arguments_are_checked(capsys):
    from ReCoKDLib.benchmarks.inference import parse_models

    assert parse_models(["a=x.recokd", "b=runs/b"]) == {"a": "x.recokd", "b": "runs/b"}
    with pytest.raises(ReCoKDError, match="NAME=PATH"):
        parse_models(["x.recokd"])
    with pytest.raises(ReCoKDError, match="repeated"):
        parse_models(["a=x", "a=y"])
    assert main(["benchmark", "--images", "imgs"]) == 2
    assert "--models" in capsys.readouterr().err


def test_evaluate_json_goes_into_an_exported_bundle(tmp_path, capsys):
    """`recokd evaluate --json` -> `recokd export --test-metrics --terminology --license`: the held-out
    scores, the codes and the terms travel in the bundle (and a code for an unknown label is refused)."""
    ref = _ball((20, 20, 20), (10, 10, 10), 5) + 2 * _ball((20, 20, 20), (3, 3, 3), 2)
    for case in ("a", "b"):
        write_image(ref, tmp_path / "gt" / f"{case}.nii.gz")
        write_image(np.where(ref == 2, 0, ref) if case == "b" else ref, tmp_path / "pred" / f"{case}.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "organ": 1, "kidney": 2}))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", str(tmp_path / "labels.json"),
                 "--json", str(tmp_path / "test.json")]) == 0
    record = json.loads((tmp_path / "test.json").read_text())
    assert record["num_cases"] == 2 and record["per_case_dice_mean"] == {"a": 1.0, "b": 0.5}
    assert record["dice_mean"] == pytest.approx(0.75) and record["mean"]["dice"]["kidney"] == pytest.approx(0.5)
    assert str(tmp_path) not in record["command"]  # no local paths travel into a shipped bundle
    run = make_run(tmp_path / "run")
    terms = {"organ": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "113343008", "Organ"]}}
    (tmp_path / "terms.json").write_text(json.dumps(terms))
    assert main(["export", str(run), "-o", str(tmp_path / "m.recokd"), "--test-metrics", str(tmp_path / "test.json"),
                 "--terminology", str(tmp_path / "terms.json"), "--license", "research use only"]) == 0
    bundle = load_bundle(tmp_path / "m.recokd")
    assert bundle.labels.terminology == terms and bundle.provenance["license"] == "research use only"
    assert bundle.provenance["test_metrics"]["dice_mean"] == pytest.approx(0.75)
    (tmp_path / "bad.json").write_text(json.dumps({"liver": terms["organ"]}))
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(tmp_path / "bad.recokd"), "--terminology", str(tmp_path / "bad.json")]) == 2
    assert "terminology names label(s) ['liver']" in capsys.readouterr().err
    assert not (tmp_path / "bad.recokd").exists()


def test_evaluate_can_score_postprocessed_predictions(tmp_path, capsys):
    ref = _ball((24, 24, 24), (12, 12, 12), 6)
    pred = ref.copy()
    pred[0:3, 0:3, 0:3] = 1  # a stray island far from the organ
    for folder, array in (("pred", pred), ("gt", ref)):
        (tmp_path / folder).mkdir()
        write_image(array, tmp_path / folder / "case1.nii.gz")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"background": 0, "organ": 1}))
    for mode, perfect in (("none", False), ("largest-foreground", True)):
        out = tmp_path / f"{mode}.json"
        assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", str(labels),
                     "--postprocess", mode, "--json", str(out), "--overwrite"]) == 0
        record = json.loads(out.read_text())
        assert (record["dice_mean"] == 1.0) == perfect and record["postprocess"] == mode
        assert ("--postprocess" in record["command"]) == (mode != "none")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "case1.nii.gz")))
    assert np.array_equal(written, pred)  # the files are not changed
