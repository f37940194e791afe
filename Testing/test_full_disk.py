"""Every command on a full disk, for real: a small tmpfs is mounted for each test and filled.

What each row checks: exit code 2, exactly one ``error:`` line saying the write failed and how to fix it,
no traceback, the earlier file (where there was one) byte for byte as it was, and nothing half-written
left (no empty output, no temporary file). ITK's NIfTI writer ignores a short write, so without the
verification in :func:`ReCoKDLib.utils.io.atomic_write` these commands used to exit 0 with truncated
or empty label maps renamed over the good ones.

Mounting needs root (or CAP_SYS_ADMIN); elsewhere the tests are skipped with that reason.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import phantom_volume, threshold_bundle, write_image
from ReCoKDLib.cli import main


class Disk:
    """A mounted tmpfs at ``path``; :meth:`fill` takes up all its free space."""

    def __init__(self, path: Path):
        self.path = path

    def fill(self, leave: int = 0) -> None:
        """Write until the file system refuses (big blocks first, then single bytes for the last page),
        then give back ``leave`` bytes: a write larger than that is cut short part-way."""
        for name, block in (("filler", bytes(1 << 16)), ("filler2", b"x")):
            fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
        if leave:
            (self.path / "filler2").unlink()
            filler = self.path / "filler"
            os.truncate(filler, filler.stat().st_size - leave)

    def free(self) -> None:
        for name in ("filler", "filler2"):
            (self.path / name).unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """Files below the disk other than the filler: temporary files, empty outputs."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                      if p.is_file() and not p.name.startswith("filler"))


@pytest.fixture
def disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the full-disk tests are skipped")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the full-disk tests are skipped")
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return threshold_bundle().save(tmp_path_factory.mktemp("model") / "model.recokd")


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert len(lines) >= 1, err
    return lines[-1]


def _predict(model: Path, inputs: list[str], output: Path, *extra: str) -> list[str]:
    return ["predict", "-m", str(model), "-i", *inputs, "-o", str(output), "--device", "cpu", "--no-progress",
            "--backend", "torch", *extra]


@pytest.mark.parametrize("leave", [0, 4096], ids=["no room", "room for part of the file"])
def test_predict_on_a_full_disk_keeps_the_earlier_label_map(disk: Disk, model: Path, tmp_path: Path, capsys,
                                                            leave: int) -> None:
    noise = np.random.default_rng(0).standard_normal((48, 48, 48)).astype(np.float32)  # labels that compress badly
    scan = write_image(noise, tmp_path / "scan.nii.gz")
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha"):
        out = disk.path / f"seg{ending}"
        assert main(_predict(model, [str(scan)], out)) == 0
        before = out.read_bytes()
        assert len(before) > 2 * leave
        disk.fill(leave)
        assert main(_predict(model, [str(scan)], out, "--overwrite")) == 2
        line = _one_error(capsys)
        assert f"cannot write {out}" in line and "free space on that disk" in line and "earlier file there is kept" in line
        assert out.read_bytes() == before
        assert disk.leftovers() == sorted(p.name for p in disk.path.glob("seg*")), disk.leftovers()
        disk.free()


def test_predict_a_folder_onto_a_full_disk_writes_no_empty_files(disk: Disk, model: Path, tmp_path: Path,
                                                                 capsys) -> None:
    for i in range(4):
        write_image(phantom_volume((48, 48, 48), seed=i), tmp_path / "scans" / f"c{i}_0000.nii.gz")
    disk.fill()
    assert main(_predict(model, [str(tmp_path / "scans")], disk.path / "out")) == 2
    line = _one_error(capsys)
    assert "4 of 4 case(s) failed" in line and "0 label map(s) are in" in line
    assert disk.leftovers() == []


def test_export_evaluate_and_fetch_on_a_full_disk(disk: Disk, model: Path, tmp_path: Path, capsys) -> None:
    from bundle_helpers import make_run

    run = make_run(tmp_path / "run")
    ref = (phantom_volume((24, 24, 24)) > 0.6).astype(np.uint8)
    for folder in ("pred", "gt"):
        write_image(ref, tmp_path / folder / "a.nii.gz")
    registry = tmp_path / "registry.json"
    import json

    from ReCoKDLib.deployment.registry import make_entry

    registry.write_text(json.dumps({"version": 1, "models": [make_entry(model, name="m")]}))
    earlier = disk.path / "earlier_folder"
    assert main(["export", str(run), "-o", str(earlier)]) == 0  # a folder bundle, replaced below
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    disk.fill()
    rows = [
        ["export", str(run), "-o", str(disk.path / "student.recokd")],
        ["export", str(run), "-o", str(disk.path / "student_folder")],
        ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(disk.path / "scores.csv")],
        ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(tmp_path / "scores.csv"),
         "--json", str(disk.path / "scores.json")],
        ["fetch-model", "m", "--registry", str(registry), "--cache", str(disk.path / "models")],
        ["export-model", str(model), "--format", "onnx", "-o", str(disk.path / "model.onnx")],
    ]
    for argv in rows:
        assert main(argv) == 2, argv
        line = _one_error(capsys)
        assert ("cannot write" in line or "cannot store" in line) and "free" in line and "space" in line, (argv, line)
        assert [p for p in disk.leftovers() if not p.startswith("earlier_folder/")] == [], (argv, disk.leftovers())
        # the earlier folder bundle is whole, member for member (not a mix of old and new)
        assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_plan_and_train_on_a_full_disk_end_in_one_line(disk: Disk, tmp_path: Path, capsys) -> None:
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    save_dataset_nnunet(generate_dataset(3, seed=3, shape=(32, 32, 32)), tmp_path / "ds")
    common = ["--no-progress", "--base-filters", "8", "--max-filters", "16", "--patch-budget", "8192"]
    disk.fill()
    assert main(["plan", str(tmp_path / "ds"), "--cache", str(disk.path / "cache"), *common]) == 2
    assert "free space on that disk" in _one_error(capsys)
    assert [p for p in disk.leftovers() if p.endswith((".json", ".npz", ".npy")) and (disk.path / p).stat().st_size == 0] == []
    assert not [p for p in disk.leftovers() if ".partial." in p]
    assert main(["train", str(tmp_path / "ds"), "-o", str(disk.path / "run"), "--cache", str(tmp_path / "cache"),
                 "--epochs", "1", "--iters-per-epoch", "1", "--workers", "0", "--threads", "1",
                 "--val-max-cases", "1", *common]) == 2
    assert "free space on that disk" in _one_error(capsys)
    assert not [p for p in disk.leftovers() if ".partial." in p]


def test_the_onnx_cache_on_a_full_disk_falls_back_to_pytorch(disk: Disk, model: Path, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RECOKD_HOME", str(disk.path / "home"))
    scan = write_image(phantom_volume((24, 24, 24)), tmp_path / "scan.nii.gz")
    disk.fill()
    argv = ["predict", "-m", str(model), "-i", str(scan), "-o", str(tmp_path / "seg.nii.gz"), "--device", "cpu",
            "--no-progress", "--backend", "auto", "--sw-batch", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "seg.nii.gz").is_file()
    assert "running it with PyTorch" in capsys.readouterr().err
    assert not [p for p in disk.leftovers() if p.endswith(".onnx") or ".partial." in p]


def test_export_overwrite_of_a_folder_bundle_on_a_full_disk_keeps_it_whole(disk: Disk, tmp_path: Path, capsys) -> None:
    """Room for the small members but not the weights: the earlier folder bundle must not end up with a new
    network.json beside its old manifest (it would no longer load)."""
    from bundle_helpers import make_run, tiny_plans
    from ReCoKDLib.deployment.bundle import load_bundle

    run = make_run(tmp_path / "run")
    other = make_run(tmp_path / "other", plans=tiny_plans(num_classes=4))  # another network.json and plans.json
    earlier = disk.path / "bundle"
    assert main(["export", str(run), "-o", str(earlier)]) == 0
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    disk.fill(leave=16384)
    assert main(["export", str(other), "-o", str(earlier), "--overwrite"]) == 2
    assert "free space on that disk" in _one_error(capsys)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert load_bundle(earlier).name == "run"
    assert [p for p in disk.leftovers() if not p.startswith("bundle/")] == []
