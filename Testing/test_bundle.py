"""Model bundles: export from a run, load, round trip, and refusal of unsafe or malformed bundles."""

from __future__ import annotations

import json
import stat
import zipfile

import jsonschema
import numpy as np
import pytest

from bundle_helpers import make_run, phantom_volume, rewrite_zip, tiny_network, tiny_plans
from ReCoKDLib.deployment.bundle import bundle_from_run, export_run, load_bundle
from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import PHANTOM_COLORS
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.inference.predictor import Predictor
from ReCoKDLib.resources import load_schema


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    run = make_run(root / "run")
    return run, export_run(run, root / "model.recokd")


def test_export_contents_and_schema(exported):
    run, path = exported
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["bundle.json", "network.json", "plans.json", "weights.safetensors"]
        manifest = json.loads(zf.read("bundle.json"))
    jsonschema.validate(manifest, load_schema("bundle"))
    b = load_bundle(path)
    assert b.name == "run" and b.role == "student" and b.num_classes == 3
    assert b.labels == {"background": 0, "organ": 1, "kidney": 2}
    assert b.labels.colors["organ"] == pytest.approx(PHANTOM_COLORS["organ"])  # phantom labels get the phantom palette
    assert b.provenance["method"] == "recokd" and b.provenance["teacher"] == "teacher"
    assert b.provenance["metrics"]["best_dice_mean"] == 0.5
    assert b.plans.patch_size == (16, 16, 16) and b.channel_names == {0: "MRI0"}


def test_round_trip_predictions_identical(exported, tmp_path):
    run, path = exported
    image = phantom_volume((24, 24, 24))
    spacing = (1.0, 1.0, 1.0)
    from_run = Predictor(bundle_from_run(run), device="cpu").predict_array(image, spacing)
    from_zip = Predictor(load_bundle(path), device="cpu").predict_array(image, spacing)
    folder = load_bundle(path).save(tmp_path / "as_folder")
    from_folder = Predictor(folder, device="cpu").predict_array(image, spacing)
    assert from_run.shape == image.shape
    np.testing.assert_array_equal(from_run, from_zip)
    np.testing.assert_array_equal(from_run, from_folder)


def test_export_is_reproducible(exported, tmp_path):
    run, path = exported
    a = load_bundle(path).save(tmp_path / "a.recokd").read_bytes()
    b = load_bundle(path).save(tmp_path / "b.recokd").read_bytes()
    assert a == b


def _manifest_edit(fn):
    def edit(members):
        m = json.loads(members["bundle.json"])
        fn(m)
        members["bundle.json"] = json.dumps(m).encode()
        return members
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: {**m, "../evil.json": b"{}"}, "escapes the bundle"),
        (lambda m: {**m, "/etc/evil.json": b"{}"}, "absolute"),
        (lambda m: {**m, "weights.pkl": b"\x80\x04K\x01."}, "pickled code"),
        (lambda m: {**m, "model.pt": b"PK"}, "pickled code"),
        (lambda m: {**m, "sub/x.json": b"{}"}, "nested"),
        (_manifest_edit(lambda m: m.update(version=2)), "bundle version 2"),
        (_manifest_edit(lambda m: m.pop("labels")), "'labels' is a required property"),
        (_manifest_edit(lambda m: m.update(format="other")), "not a ReCoKD bundle"),
        (lambda m: {**m, "plans.json": m["plans.json"].replace(b'"Tiny"', b'"Evil"')}, "sha256"),
        (lambda m: {k: v for k, v in m.items() if k != "weights.safetensors"}, "lacks weights.safetensors"),
    ],
)
def test_tampered_bundles_are_refused(exported, tmp_path, edit, message):
    _, path = exported
    bad = rewrite_zip(path, tmp_path / "bad.recokd", edit)
    with pytest.raises(ReCoKDError, match=message) as info:
        load_bundle(bad)
    assert "\n" not in str(info.value)


def test_symlink_member_and_zip_bomb_refused(exported, tmp_path):
    _, path = exported
    bad = tmp_path / "link.recokd"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
        info = zipfile.ZipInfo("network2.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        dst.writestr(info, "/etc/passwd")
    with pytest.raises(ReCoKDError, match="symbolic link"):
        load_bundle(bad)
    with pytest.raises(ReCoKDError, match="zip bomb"):
        load_bundle(path, max_bytes=10_000)
    with pytest.raises(ReCoKDError, match="no bundle.json"):
        load_bundle(rewrite_zip(path, tmp_path / "x.zip", lambda m: {"a.json": b"{}"}))


def test_folder_bundle_refuses_symlink_and_pickle(exported, tmp_path):
    _, path = exported
    folder = load_bundle(path).save(tmp_path / "folder_bundle")
    (folder / "extra.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ReCoKDError, match="pickled code"):
        load_bundle(folder)
    (folder / "extra.pkl").unlink()
    (folder / "link.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ReCoKDError, match="symbolic link"):
        load_bundle(folder)


def test_missing_bundle_and_bad_run(tmp_path, capsys):
    with pytest.raises(ReCoKDError, match="does not exist"):
        load_bundle(tmp_path / "nope.recokd")
    run = make_run(tmp_path / "run")
    (run / "model_best.safetensors").unlink()
    assert main(["export", str(run), "-o", str(tmp_path / "m.recokd")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model_best.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "m.recokd").exists()


def test_export_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run", role="teacher", method="none")
    assert main(["export", str(run), "-o", str(tmp_path / "t.recokd"), "--name", "teacher-x"]) == 0
    b = load_bundle(tmp_path / "t.recokd")
    assert b.name == "teacher-x" and b.role == "teacher"


def test_the_same_weights_give_the_same_bytes_and_the_same_bundle(tmp_path):
    """Reproducible exports: weights files and bundles depend on their content alone (no per-process
    metadata order, no export time), so their sha256 is stable; and every file gets one mode."""
    import hashlib
    import os

    from ReCoKDLib.deployment.bundle import export_run
    from ReCoKDLib.models import save_weights

    net = tiny_network(tiny_plans())
    digests = {hashlib.sha256(save_weights(net, tmp_path / f"w{i}.safetensors").read_bytes()).hexdigest() for i in range(3)}
    assert len(digests) == 1
    run = make_run(tmp_path / "run")
    first = export_run(run, tmp_path / "a.recokd").read_bytes()
    second = export_run(run, tmp_path / "b.recokd").read_bytes()
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "w0.safetensors", tmp_path / "a.recokd", run / "model_best.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_the_model_card_round_trips_through_export_and_is_shown(tmp_path, capsys):
    """`recokd export --card` records the author's statements; `recokd models NAME` and `predict --info`
    show them with what the bundle's plan and provenance say (issue 28)."""
    import json as _json

    from bundle_helpers import make_run
    from ReCoKDLib.cli import main as cli
    from ReCoKDLib.deployment.bundle import load_bundle
    from ReCoKDLib.deployment.card import model_card

    run = make_run(tmp_path / "run")
    card = {"intended_use": "research only, not for clinical use", "accuracy": "0.79 +- 0.02 (3-fold CV, n = 48)",
            "limitations": "cine short-axis only", "field_of_view": "cropped around the heart"}
    (tmp_path / "card.json").write_text(_json.dumps(card))
    assert cli(["export", str(run), "-o", str(tmp_path / "m.recokd"), "--card", str(tmp_path / "card.json"),
                "--license", "CC-BY-NC"]) == 0
    bundle = load_bundle(tmp_path / "m.recokd")
    assert bundle.manifest["card"] == card
    rows = dict(model_card(bundle))
    assert rows["accuracy"].startswith("0.79 +- 0.02 (3-fold CV, n = 48)") and rows["licence"] == "CC-BY-NC"
    assert rows["limitations"] == "cine short-axis only" and rows["field of view"].startswith("cropped around the heart")
    capsys.readouterr()
    for argv in (["models", str(tmp_path / "m.recokd")], ["predict", "-m", str(tmp_path / "m.recokd"), "--info"]):
        assert cli(argv) == 0
        out = capsys.readouterr().out
        assert "cine short-axis only" in out and "research only, not for clinical use" in out and "CC-BY-NC" in out
    (tmp_path / "bad.json").write_text(_json.dumps({"accuracy": "0.9", "sales_pitch": "best"}))
    assert cli(["export", str(run), "-o", str(tmp_path / "b.recokd"), "--card", str(tmp_path / "bad.json")]) == 2
    assert "unknown model card field(s) sales_pitch" in capsys.readouterr().err and not (tmp_path / "b.recokd").exists()


def test_a_card_without_statements_says_what_is_not_known():
    from pathlib import Path as _Path

    from ReCoKDLib.deployment.bundle import load_bundle
    from ReCoKDLib.deployment.card import model_card

    acdc = load_bundle(_Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models" / "acdc-heart.recokd")
    acdc.manifest.pop("card")  # the shipped card states these; without it, the card says what is not known
    rows = dict(model_card(acdc))
    assert rows["intended use"] == "research only, not for clinical use"
    assert "no physical spacing" in rows["spacing"] and "voxels" in rows["field of view"]
    assert "no cross-validated figure recorded" in rows["accuracy"] and "not an estimate" in rows["accuracy"]
    assert rows["test-time augmentation"].startswith("not available")
