"""The overwrite rule where it allows a write (``--overwrite``, the Python API), what is verified on
write, and the temporary files that killed writers leave (issue 27). The refusals are rows of
``test_bad_inputs.py``; the full disk is ``test_full_disk.py``."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bundle_helpers import make_run, phantom_volume, threshold_bundle, write_image
from ReCoKDLib.cli import main
from ReCoKDLib.errors import ReCoKDError


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return threshold_bundle().save(tmp_path_factory.mktemp("model") / "model.recokd")


def test_predict_overwrite_replaces_an_earlier_label_map_and_the_api_refuses_without_it(model, tmp_path, capsys):
    from ReCoKDLib.inference.predictor import Predictor

    scan = write_image(phantom_volume((16, 16, 16)), tmp_path / "scan.nii.gz")
    out = write_image(np.zeros((16, 16, 16), np.uint8), tmp_path / "seg.nii.gz")  # an earlier label map
    stale = out.read_bytes()
    argv = ["predict", "-m", str(model), "-i", str(scan), "-o", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2 and out.read_bytes() == stale
    assert main([*argv, "--overwrite"]) == 0 and out.read_bytes() != stale
    assert sitk.ReadImage(str(out)).GetSize() == (16, 16, 16)
    predictor = Predictor(model, device="cpu", progress=False)
    with pytest.raises(ReCoKDError, match="exists; pass --overwrite"):
        predictor.predict_files([scan], out)
    assert predictor.predict_files([scan], out, overwrite=True) == out
    with pytest.raises(ReCoKDError, match="is the input image"):
        predictor.predict_files([scan], scan, overwrite=True)
    (tmp_path / "notes.nii.gz").write_bytes(b"not an image")  # unreadable: not known to be a label map
    with pytest.raises(ReCoKDError, match="is not a label map"):
        predictor.predict_files([scan], tmp_path / "notes.nii.gz", overwrite=True)


def test_export_overwrite_replaces_an_earlier_bundle_only(tmp_path, capsys):
    from ReCoKDLib.deployment.bundle import load_bundle

    run = make_run(tmp_path / "run")
    target = tmp_path / "student.recokd"
    assert main(["export", str(run), "-o", str(target)]) == 0
    first = target.read_bytes()
    assert main(["export", str(run), "-o", str(target), "--name", "second"]) == 2
    assert target.read_bytes() == first
    assert main(["export", str(run), "-o", str(target), "--name", "second", "--overwrite"]) == 0
    assert load_bundle(target).name == "second"
    folder = tmp_path / "folder_bundle"
    assert main(["export", str(run), "-o", str(folder)]) == 0
    assert main(["export", str(run), "-o", str(folder), "--overwrite"]) == 0  # an earlier folder bundle
    bundle = load_bundle(target)
    with pytest.raises(ReCoKDError, match="exists; pass --overwrite"):
        bundle.save(target)
    (tmp_path / "empty").mkdir()
    assert bundle.save(tmp_path / "empty") == tmp_path / "empty"  # an empty folder counts as new


def test_evaluate_overwrite_replaces_its_own_outputs(tmp_path, capsys):
    labels = (phantom_volume((16, 16, 16)) > 1).astype(np.uint8)
    for folder in ("pred", "gt"):
        write_image(labels, tmp_path / folder / "a.nii.gz")
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(tmp_path / "s.csv"),
            "--json", str(tmp_path / "s.json")]
    assert main(argv) == 0
    assert main(argv) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_evaluate_refuses_a_truncated_prediction(tmp_path, capsys):
    """ITK zero-fills a truncated NIfTI; evaluate used to score what it made up."""
    labels = (phantom_volume((16, 16, 16)) > 1).astype(np.uint8)
    write_image(labels, tmp_path / "gt" / "a.nii.gz")
    whole = write_image(labels, tmp_path / "a.nii")
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "a.nii.gz").write_bytes(gzip.compress(whole.read_bytes()[:352 + 16 * 16 * 8]))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "a.nii.gz" in err and not (tmp_path / "s.csv").exists()


def test_multichannel_predict_refuses_a_channel_on_another_grid(tmp_path, capsys):
    from bundle_helpers import tiny_network, tiny_plans
    from ReCoKDLib.deployment.bundle import bundle_from_network

    plans = tiny_plans(num_classes=2, channels=2)
    bundle = bundle_from_network(tiny_network(plans), plans, "two").save(tmp_path / "two.recokd")
    volume = phantom_volume((16, 16, 16))
    a = write_image(volume, tmp_path / "c_0000.nii.gz")
    for field, kwargs in (("spacing", {"spacing": (1.0, 1.0, 2.0)}), ("origin", {"origin": (0.0, 5.0, 0.0)}),
                          ("direction", {"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)})):
        b = write_image(volume, tmp_path / field / "c_0001.nii.gz", **kwargs)
        assert main(["predict", "-m", str(bundle), "-i", str(a), str(b), "-o", str(tmp_path / f"{field}.nii.gz"),
                     "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"channel 1 has {field}" in err and "one voxel grid" in err, err
        assert not (tmp_path / f"{field}.nii.gz").exists()
    b = write_image(volume, tmp_path / "c_0001.nii.gz")
    assert main(["predict", "-m", str(bundle), "-i", str(a), str(b), "-o", str(tmp_path / "ok.nii.gz"),
                 "--device", "cpu", "--no-progress"]) == 0


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    """atomic_write names its temporary file with its pid: the next write of the same name removes one whose
    writer is gone; a live writer's file, and other names' files, stay."""
    from ReCoKDLib.utils.io import atomic_write_text

    dead = tmp_path / ".0badc0de-p999999.partial.seg.nii.gz"  # pid 999999: no such process
    live = tmp_path / f".0badc0de-p{os.getpid()}.partial.seg.nii.gz"
    old_style = tmp_path / ".deadbeef.partial.seg.nii.gz"  # written before pids were in the name
    other = tmp_path / ".0badc0de-p999999.partial.other.json"
    for p in (dead, live, old_style, other):
        p.write_bytes(b"half")
    an_hour_ago = time.time() - 3600
    for p in (dead, old_style, other):
        os.utime(p, (an_hour_ago, an_hour_ago))
    atomic_write_text(tmp_path / "seg.nii.gz", "x")  # any write of that name cleans up
    assert not dead.exists() and not old_style.exists()
    assert live.exists() and other.exists()


def test_a_killed_predict_leaves_nothing_the_next_predict_keeps(model, tmp_path, capsys):
    scan = write_image(phantom_volume((16, 16, 16)), tmp_path / "scan.nii.gz")
    partial = tmp_path / "out" / ".0badc0de-p999999.partial.seg.nii.gz"
    partial.parent.mkdir()
    partial.write_bytes(b"half a label map")
    os.utime(partial, (time.time() - 3600, time.time() - 3600))
    assert main(["predict", "-m", str(model), "-i", str(scan), "-o", str(tmp_path / "out" / "seg.nii.gz"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.nii.gz"]


@pytest.mark.parametrize("name, damage", [
    ("w.safetensors", lambda data: data[:-3]),
    ("c.pt", lambda data: data[: len(data) // 2]),
    ("r.json", lambda data: data[:-2]),
    ("p.png", lambda data: data[:-20]),
    ("x.nii.gz", lambda data: data[: len(data) // 2]),
])
def test_a_writer_that_cuts_its_file_short_is_caught_before_the_rename(tmp_path, name, damage):
    """A writer that reports success but leaves a short file (ITK's NIfTI writer on a full disk) is caught
    by the check of the file's kind; the earlier file stays."""
    import json

    import torch
    from safetensors.torch import save_file

    from ReCoKDLib.utils.io import atomic_write, atomic_write_image

    def whole(tmp: Path) -> None:
        if name.endswith(".safetensors"):
            save_file({"a": torch.zeros(10)}, str(tmp))
        elif name.endswith(".pt"):
            torch.save({"a": torch.zeros(100)}, tmp)
        elif name.endswith(".json"):
            tmp.write_text(json.dumps({"a": 1}))
        elif name.endswith(".png"):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(1, 1))
            fig.savefig(tmp, format="png")
            plt.close(fig)
        else:
            sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 8, 8), np.uint8)), str(tmp))

    def cut(tmp: Path) -> None:
        whole(tmp)
        tmp.write_bytes(damage(tmp.read_bytes()))

    target = tmp_path / name
    target.write_bytes(b"earlier")
    with pytest.raises(ReCoKDError, match=f"cannot write {target}"):
        if name.endswith(".nii.gz"):
            image = sitk.GetImageFromArray(np.ones((8, 8, 8), np.uint8))
            from unittest import mock

            real = sitk.WriteImage

            def short_writer(img, path, *a, **k):
                real(img, path, *a, **k)
                Path(path).write_bytes(damage(Path(path).read_bytes()))

            with mock.patch.object(sitk, "WriteImage", short_writer):
                atomic_write_image(image, target)
        else:
            atomic_write(target, cut)
    assert target.read_bytes() == b"earlier"
    assert [p.name for p in tmp_path.iterdir()] == [name]
    atomic_write(target, whole)  # the same writer, whole: accepted


def test_an_output_folder_removed_during_a_folder_predict(model, tmp_path, capsys, monkeypatch):
    """The folder is removed after the first case: the remaining cases still run (the folder is made
    again), and the summary says which label maps are no longer there."""
    import shutil

    from ReCoKDLib.inference.predictor import Predictor

    for i in range(3):
        write_image(phantom_volume((16, 16, 16), seed=i), tmp_path / "scans" / f"c{i}_0000.nii.gz")
    out = tmp_path / "out"
    real = Predictor.predict_files
    done: list[Path] = []

    def then_remove(self, inputs, output, *args, **kwargs):
        written = real(self, inputs, output, *args, **kwargs)
        done.append(written)
        if len(done) == 1:
            shutil.rmtree(out)
        return written

    monkeypatch.setattr(Predictor, "predict_files", then_remove)
    assert main(["predict", "-m", str(model), "-i", str(tmp_path / "scans"), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 written label map(s) are no longer in" in err and "c0" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["c1.nii.gz", "c2.nii.gz"]


def test_a_study_never_writes_into_a_folder_of_other_files(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "study.json"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("mine")
    assert main(["benchmark-study", str(config), "-o", str(tmp_path / "docs")]) == 2
    assert "holds other files (notes.md), not a study" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["notes.md"]
