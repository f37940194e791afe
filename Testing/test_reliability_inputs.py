"""Reliability, round two: what a user's inputs do when they are not what they seem.

- registry downloads from a server that stalls, closes or resets mid-body (a real HTTP server in a
  thread): one error line within the timeout, nothing left in the cache, a progress bar when it works;
- built-in models under an unwritable model cache: used in place after their sha256 check;
- a tiny file whose header declares a huge image: refused from the header, without reading the voxels;
- file endings that differ only in case (``.NII.GZ``, ``.Nii``, ``.MHA``, ``.NRRD``);
- a folder of DICOM files read as one 3D series.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ReCoKDLib.cli import main
from ReCoKDLib.data import datasets
from ReCoKDLib.data.datasets import (dicom_series_files, group_cases, load_case, open_dataset, read_dicom_series,
                                     read_header, read_image, split_file_ending)
from ReCoKDLib.deployment.registry import (RegistryEntry, builtin_registry_path, fetch_model, load_registry,
                                           resolve_model, sha256_file)
from ReCoKDLib.errors import ReCoKDError

MODELS = Path(__file__).resolve().parents[1] / "ReCoKDLib" / "resources" / "models"
PAYLOAD = (MODELS / "phantom-abdomen.recokd").read_bytes()  # a real bundle (the cache checks what it stores)


# -- a local HTTP server that misbehaves on request ------------------------------------------------


class _Server:
    """``http://127.0.0.1:PORT/<mode>/model.recokd`` serves :data:`PAYLOAD` with a Content-Length, and
    by ``mode``: ``full``; ``stall`` (half the body, then nothing until the test ends); ``close`` (half,
    then the connection closes); ``reset`` (half, then a TCP reset); ``nolength`` (half, no
    Content-Length, then closes); ``short`` (half, announced as the whole: a complete reply, shorter than
    the registry's size)."""

    def __init__(self) -> None:
        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                mode = self.path.strip("/").split("/")[0]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode != "nolength":
                    self.send_header("Content-Length", str(len(PAYLOAD) // 2 if mode == "short" else len(PAYLOAD)))
                self.end_headers()
                if mode == "full":
                    self.wfile.write(PAYLOAD)
                    return
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                self.wfile.flush()
                if mode == "stall":
                    release.wait(30)
                elif mode == "reset":  # SO_LINGER 0: close() sends a reset, not a FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/model.recokd"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _entry(url: str, size: int | None = len(PAYLOAD)) -> RegistryEntry:
    return RegistryEntry("student", url, hashlib.sha256(PAYLOAD).hexdigest(), "", size)


def _registry_file(tmp_path: Path, url: str, size: int | None = len(PAYLOAD)) -> Path:
    model = {"name": "student", "url": url, "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
    if size is not None:
        model["size"] = size
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"version": 1, "models": [model]}))
    return path


def _left_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("mode, reason", [
    ("stall", "the server sent nothing for 1 s (RECOKD_DOWNLOAD_TIMEOUT)"),
    ("close", "the server closed the connection"),
    ("reset", "the connection was reset"),
])
def test_a_download_cut_short_is_one_line_and_leaves_no_cache_folder(server, tmp_path, mode, reason):
    cache = tmp_path / "home" / "models"  # neither folder exists yet: the failed call must not leave them
    start = time.monotonic()
    with pytest.raises(ReCoKDError) as info:
        fetch_model(_entry(server.url(mode)), cache_dir=cache, timeout=1)
    assert time.monotonic() - start < 10
    half = len(PAYLOAD) // 2
    message = str(info.value)
    # a reset may drop data that had arrived but was not read yet: up to half the body is counted then
    done = half if mode != "reset" else int(message.split(" after ")[1].split(" of ")[0])
    assert 0 < done <= half
    # whether the client sees the reset or the end of the stream first depends on timing (a loaded machine)
    reasons = [reason] + (["the server closed the connection"] if mode == "reset" else [])
    assert message in [f"incomplete download of model 'student' from {server.url(mode)}: {r} after {done} of "
                       f"{len(PAYLOAD)} bytes; check the connection and try again" for r in reasons], message
    assert _left_in(tmp_path) == []


@pytest.mark.parametrize("mode", ["nolength", "short"])
def test_a_body_shorter_than_the_registry_size_is_an_incomplete_download(server, tmp_path, mode):
    """No Content-Length, or one as short as the body: the registry's size tells that data is missing
    (not "the registry is outdated")."""
    with pytest.raises(ReCoKDError, match=f"incomplete download .*: the data ended after {len(PAYLOAD) // 2} of "
                                          f"{len(PAYLOAD)} bytes; check the connection and try again$"):
        fetch_model(_entry(server.url(mode)), cache_dir=tmp_path / "cache", timeout=5)
    assert _left_in(tmp_path) == []


def test_the_download_timeout_comes_from_the_environment_and_the_command_says_one_line(server, tmp_path, monkeypatch,
                                                                                      capsys):
    monkeypatch.setenv("RECOKD_DOWNLOAD_TIMEOUT", "1")
    registry = _registry_file(tmp_path, server.url("stall"))
    start = time.monotonic()
    assert main(["fetch-model", "student", "--registry", str(registry), "--cache", str(tmp_path / "cache")]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "incomplete download of model 'student'" in lines[0] and "1 s" in lines[0], err
    assert "Traceback" not in err
    assert _left_in(tmp_path) == ["registry.json"]
    monkeypatch.setenv("RECOKD_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ReCoKDError, match="RECOKD_DOWNLOAD_TIMEOUT='soon' is not a number of seconds"):
        fetch_model(_entry(server.url("full")), cache_dir=tmp_path / "cache")


def test_fetch_model_command_shows_a_download_bar_on_stderr(server, tmp_path, capsys):
    registry = _registry_file(tmp_path, server.url("full"))
    assert main(["fetch-model", "student", "--registry", str(registry), "--cache", str(tmp_path / "cache")]) == 0
    captured = capsys.readouterr()
    path = Path(captured.out.strip())
    assert path.parent == tmp_path / "cache" and path.read_bytes() == PAYLOAD
    assert "download student" in captured.err and "Traceback" not in captured.err
    # a model already in the cache downloads nothing and shows no bar
    assert main(["fetch-model", "student", "--registry", str(registry), "--cache", str(tmp_path / "cache")]) == 0
    assert "download" not in capsys.readouterr().err


def test_resolve_model_shows_a_bar_only_when_asked(server, tmp_path, capsys):
    registry = _registry_file(tmp_path, server.url("full"))
    assert resolve_model("student", registry=registry, cache_dir=tmp_path / "quiet").read_bytes() == PAYLOAD
    assert "download" not in capsys.readouterr().err
    assert resolve_model("student", registry=registry, cache_dir=tmp_path / "bar", progress=True).read_bytes() == PAYLOAD
    assert "download student" in capsys.readouterr().err
    seen: list[int] = []
    resolve_model("student", registry=registry, cache_dir=tmp_path / "callback", progress=seen.append)
    assert seen and seen[-1] == len(PAYLOAD)


# -- built-in models under an unwritable model cache ------------------------------------------------


def _builtin(name: str) -> tuple[RegistryEntry, Path]:
    reg = load_registry(builtin_registry_path())
    return reg[name], reg.base


@pytest.fixture
def read_only_home(tmp_path, monkeypatch) -> Path:
    """RECOKD_HOME whose models folder cannot be written (mode 0555; for root, who may write anyway,
    os.access says no as it would for a user)."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    os.chmod(home / "models", 0o555)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(home.resolve()):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setenv("RECOKD_HOME", str(home))
    yield home
    os.chmod(home / "models", 0o755)


def test_a_builtin_model_is_used_in_place_under_a_read_only_home(read_only_home):
    path = resolve_model("phantom-abdomen")
    assert path == MODELS / "phantom-abdomen.recokd"
    assert list((read_only_home / "models").iterdir()) == []


def test_a_builtin_model_is_used_in_place_when_the_home_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("a file where the model cache folder should be")
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    entry, base = _builtin("la2018-left-atrium")
    assert fetch_model(entry, base=base) == MODELS / "la2018-left-atrium.recokd"


def test_a_local_model_in_place_is_still_checked(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    damaged = tmp_path / "damaged.recokd"
    damaged.write_bytes(PAYLOAD[:100] + bytes([PAYLOAD[100] ^ 0xFF]) + PAYLOAD[101:])
    with pytest.raises(ReCoKDError, match="checksum mismatch for model 'student' at .*damaged.recokd"):
        fetch_model(_entry(damaged.as_uri()))


def test_a_model_to_download_into_an_unwritable_cache_is_still_an_error(server, read_only_home):
    with pytest.raises(ReCoKDError, match="cannot store model 'student' in the model cache .*set RECOKD_HOME to a writable"):
        fetch_model(_entry(server.url("full")), timeout=5)


def test_a_writable_cache_still_gets_the_builtin_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "home"))
    path = resolve_model("phantom-abdomen")
    assert path.parent == tmp_path / "home" / "models" and sha256_file(path) == _builtin("phantom-abdomen")[0].sha256


# -- a tiny file whose header declares a huge image ---------------------------------------------------


HUGE = (1000, 1000, 600)  # (x, y, z) float32: 2.4 GB of voxels declared


def _small_image(path: Path, shape=(4, 5, 6), compress: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.float32)), str(path), useCompression=compress)
    return path


def _huge_nifti(path: Path) -> Path:
    """A 4 KB NIfTI whose header declares :data:`HUGE` voxels (.nii.gz: the same, gzip-compressed)."""
    import gzip

    data = bytearray(_small_image(path.with_name("small.nii")).read_bytes())
    path.with_name("small.nii").unlink()
    struct.pack_into("<8h", data, 40, 3, *HUGE, 1, 1, 1, 1)
    data += bytes(3500)
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


def _huge_text_header(path: Path, compress: bool = False) -> Path:
    """An .mha or .nrrd of a few voxels whose header text is edited to declare :data:`HUGE` voxels."""
    data = _small_image(path, compress=compress).read_bytes()
    if path.suffix == ".mha":
        data = data.replace(b"DimSize = 6 5 4", b"DimSize = %d %d %d" % HUGE)
    else:
        data = data.replace(b"sizes: 6 5 4", b"sizes: %d %d %d" % HUGE)
    assert b"1000" in data
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name, make, expected", [
    ("huge.nii", _huge_nifti, "bytes, but its header declares 1000 x 1000 x 600 voxels of 32-bit float (2.24 GiB of "
                              "voxel data)"),
    ("huge.nii.gz", _huge_nifti, "than its"),
    ("huge.mha", _huge_text_header, "1000 x 1000 x 600 voxels of 32-bit float"),
    ("huge.nrrd", _huge_text_header, "1000 x 1000 x 600 voxels of 32-bit float"),
    ("zipped.mha", lambda p: _huge_text_header(p, compress=True), "compressed data can hold"),
])
def test_a_tiny_file_declaring_a_huge_image_is_refused_from_its_header(tmp_path, name, make, expected):
    path = make(tmp_path / name)
    assert path.stat().st_size < 10_000
    start = time.monotonic()
    with pytest.raises(ReCoKDError, match="the file is damaged or truncated") as info:
        read_image(path)
    assert time.monotonic() - start < 1.0  # nothing of the 2.4 GB was allocated or read
    assert expected in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_refusing_a_huge_header_allocates_nothing(tmp_path):
    """In a process of its own, the peak memory stays far below the 2.4 GB the header declares."""
    import subprocess
    import sys

    path = _huge_nifti(tmp_path / "huge.nii.gz")
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak memory from /proc/self/status (Linux)")
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, i.e. the forking test process's own peak
    code = ("import sys\nfrom ReCoKDLib.data.datasets import read_image\n"
            "try:\n    read_image(sys.argv[1])\nexcept ValueError as exc:\n    print('refused:', exc)\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused:"), result.stdout
    assert int(lines[-1]) * 1024 < 1.0e9, lines[-1]  # KiB on Linux


def test_the_size_limit_defaults_to_the_available_memory_and_can_be_set(tmp_path, monkeypatch):
    path = _small_image(tmp_path / "scan.nii.gz", shape=(64, 64, 64), compress=True)  # 1 MiB of voxels, valid
    assert read_image(path).GetSize() == (64, 64, 64)
    monkeypatch.setattr(datasets, "available_memory_bytes", lambda: 2**19)
    with pytest.raises(ReCoKDError) as info:
        read_image(path)
    assert str(info.value) == (f"cannot read {path}: its header declares 64 x 64 x 64 voxels of 32-bit float "
                               "(0.000977 GiB), more than the 0.000488 GiB of memory available (set "
                               "RECOKD_MAX_IMAGE_GIB to allow larger images); check the file is a valid NIfTI/NRRD/MHA image")
    monkeypatch.setenv("RECOKD_MAX_IMAGE_GIB", "0.01")  # the override wins over the memory
    assert read_image(path).GetSize() == (64, 64, 64)
    monkeypatch.setenv("RECOKD_MAX_IMAGE_GIB", "0.0005")
    with pytest.raises(ReCoKDError, match=r"\(0.000977 GiB\), more than the RECOKD_MAX_IMAGE_GIB limit of 0.0005 GiB"):
        read_header(path) and read_image(path)
    monkeypatch.setenv("RECOKD_MAX_IMAGE_GIB", "lots")
    with pytest.raises(ReCoKDError, match="RECOKD_MAX_IMAGE_GIB='lots' is not a positive number of GiB"):
        read_image(path)


def test_predict_refuses_the_tiny_huge_file_in_one_line(tmp_path, capsys):
    from bundle_helpers import threshold_bundle

    model = threshold_bundle().save(tmp_path / "model.recokd")
    path = _huge_nifti(tmp_path / "huge.nii")
    code = main(["predict", "-m", str(model), "-i", str(path), "-o", str(tmp_path / "out.nii.gz"), "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "damaged or truncated" in lines[0] and "huge.nii" in lines[0], err
    assert not (tmp_path / "out.nii.gz").exists()


# -- file endings that differ only in case -------------------------------------------------------------


VOLUME = (np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) % 17)


def _write_as(path: Path, array: np.ndarray = VOLUME) -> Path:
    """``array`` written under the lower-case ending, then renamed to ``path`` (ITK cannot write every case)."""
    stem, ending = split_file_ending(path.name)
    lower = path.with_name(stem + ending.lower())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(lower))
    if ending.lower() == ".mhd":
        assert (path.parent / f"{stem}.raw").is_file()
    lower.rename(path)
    return path


@pytest.mark.parametrize("ending", [".NII.GZ", ".Nii.Gz", ".nii.GZ", ".NII", ".Nii", ".MHA", ".Mha", ".NRRD", ".Nrrd",
                                    ".MHD"])
def test_images_read_whatever_the_case_of_their_ending(tmp_path, ending, capfd):
    path = _write_as(tmp_path / f"scan{ending}")
    assert split_file_ending(path.name) == ("scan", ending)
    assert read_header(path).size == (6, 5, 4)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(path, verify=True)), VOLUME)
    assert "mixed case" not in capfd.readouterr().err  # niftilib never sees a mixed-case name


def _dataset(root: Path, endings: list[str], file_ending: str | None = ".nii.gz") -> Path:
    for i, ending in enumerate(endings):
        _write_as(root / "imagesTr" / f"c{i}_0000{ending}")
        _write_as(root / "labelsTr" / f"c{i}{ending}", (VOLUME > 8).astype(np.uint8))
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "fg": 1}, "numTraining": len(endings)}
    if file_ending is not None:
        meta["file_ending"] = file_ending
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_a_dataset_takes_files_whose_ending_differs_in_case_from_file_ending(tmp_path):
    from ReCoKDLib.data.validation import validate_dataset

    ds = open_dataset(_dataset(tmp_path / "ds", [".NII.GZ", ".nii.gz", ".Nii.Gz"]))
    assert [r.case_id for r in ds.training] == ["c0", "c1", "c2"] and ds.unexpected_files == ()
    assert [r.image_files[0].name for r in ds.training] == ["c0_0000.NII.GZ", "c1_0000.nii.gz", "c2_0000.Nii.Gz"]
    assert [r.label_file.name for r in ds.training] == ["c0.NII.GZ", "c1.nii.gz", "c2.Nii.Gz"]
    for record in ds.training:
        case = load_case(record, ds)
        assert np.array_equal(case.image[0], VOLUME) and np.array_equal(case.label, VOLUME > 8)
    assert validate_dataset(ds, progress=False) == []


def test_file_ending_is_inferred_across_spellings_and_a_double_is_reported(tmp_path):
    ds = open_dataset(_dataset(tmp_path / "ds", [".NII.GZ", ".NII.GZ", ".nii.gz"], file_ending=None))
    assert ds.file_ending == ".NII.GZ" and len(ds.training) == 3 and ds.unexpected_files == ()
    # the same case twice, its endings differing in case only: the one spelt as file_ending is taken
    _write_as(tmp_path / "ds" / "imagesTr" / "c1_0000.nii.gz")
    ds = open_dataset(tmp_path / "ds")
    assert [r.image_files[0].name for r in ds.training] == ["c0_0000.NII.GZ", "c1_0000.NII.GZ", "c2_0000.nii.gz"]
    assert [p.name for p in ds.unexpected_files] == ["c1_0000.nii.gz"]


def test_group_cases_takes_endings_in_any_case(tmp_path):
    for name in ("a_0000.NII.GZ", "a_0001.Nii", "b.MHA", "c.NRRD", "notes.TXT"):
        (tmp_path / name).write_bytes(b"")
    grouped = group_cases(tmp_path)
    assert {k: [p.name for p in v] for k, v in grouped.items()} == {"a": ["a_0000.NII.GZ", "a_0001.Nii"],
                                                                    "b": ["b.MHA"], "c": ["c.NRRD"]}


# -- DICOM folders -------------------------------------------------------------------------------------


SERIES = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 100).astype(np.int16)


def _write_series(folder: Path, array: np.ndarray, uid: str, description: str = "T1 axial", skip: int | None = None,
                  angle: float = 0.5, prefix: str = "") -> sitk.Image:
    """``array`` (D, H, W) as a DICOM series, one file per slice, the file names in a shuffled order (the
    reader must sort by position); rotated by ``angle`` about z. Returns the volume as written."""
    import locale
    import math
    import random

    volume = sitk.GetImageFromArray(array)
    c, s = math.cos(angle), math.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    volume.SetSpacing((0.8, 0.7, 2.5))
    volume.SetOrigin((-10.0, 20.0, 30.0))
    volume.SetDirection(direction)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    order = list(range(array.shape[0]))
    random.Random(0).shuffle(order)
    orientation = "\\".join(map(str, (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])))
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer resets the C locale to "C" (ASCII file reads after it)
    try:
        for n, i in enumerate(order):
            if i == skip:
                continue
            image = volume[:, :, i]
            tags = {"0008|0060": "MR", "0020|000d": f"{uid}.0", "0020|000e": uid, "0008|103e": description,
                    "0020|0037": orientation, "0020|0013": str(i + 1), "0008|0018": f"{uid}.{i + 1}",
                    "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, i))))}
            for key, value in tags.items():
                image.SetMetaData(key, value)
            writer.SetFileName(str(folder / f"{prefix}{n:03d}.dcm"))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return volume


UID = "1.2.826.0.1.3680043.2.1125.1"


def test_a_dicom_folder_reads_as_one_volume_with_its_geometry(tmp_path, capfd):
    written = _write_series(tmp_path / "dicom", SERIES, UID)
    files = dicom_series_files(tmp_path / "dicom")
    assert files is not None and len(files) == 6
    image = read_dicom_series(tmp_path / "dicom")
    assert image.GetSize() == (8, 7, 6) and np.array_equal(sitk.GetArrayFromImage(image), SERIES)
    assert image.GetSpacing() == pytest.approx(written.GetSpacing())
    assert image.GetOrigin() == pytest.approx(written.GetOrigin())
    assert image.GetDirection() == pytest.approx(written.GetDirection(), abs=1e-6)
    assert capfd.readouterr().err == ""


def test_a_folder_without_dicom_files_is_none(tmp_path, capfd):
    _write_as(tmp_path / "scans" / "a.nii.gz")
    assert dicom_series_files(tmp_path / "scans") is None
    assert dicom_series_files(tmp_path / "absent") is None
    with pytest.raises(ReCoKDError, match="holds no DICOM series"):
        read_dicom_series(tmp_path / "scans")
    assert "WARNING" not in capfd.readouterr().err


def test_a_folder_of_two_series_is_refused_naming_both(tmp_path):
    _write_series(tmp_path / "dicom", SERIES, UID, prefix="a")
    _write_series(tmp_path / "dicom", SERIES + 1, UID[:-1] + "2", description="T2 axial", prefix="b")
    with pytest.raises(ReCoKDError) as info:
        read_dicom_series(tmp_path / "dicom")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'dicom'} holds 2 DICOM series: {UID} 'T1 axial' (6 files), "
                              f"{UID[:-1]}2 'T2 axial' (6 files); "), message
    assert "dcm2niix" in message and "folder of their own" in message
    picked = read_dicom_series(tmp_path / "dicom", series_id=UID[:-1] + "2")
    assert np.array_equal(sitk.GetArrayFromImage(picked), SERIES + 1)


def test_a_series_with_a_missing_slice_is_refused(tmp_path, capfd):
    _write_series(tmp_path / "dicom", SERIES, UID, skip=3)
    with pytest.raises(ReCoKDError, match="the 5 slices of the DICOM series in .* are not evenly spaced"):
        read_dicom_series(tmp_path / "dicom")
    assert "WARNING" not in capfd.readouterr().err


def test_predict_segments_a_dicom_folder_like_the_same_volume_as_nifti(tmp_path, capsys):
    """`recokd predict -i DICOM_DIR`: the series is one scan; its labels equal those of the same volume
    given as NIfTI, on the series' own grid (issue 27: DICOM folders as input)."""
    from bundle_helpers import threshold_bundle
    from ReCoKDLib.cli import main

    model = threshold_bundle(target_spacing=(1.0, 1.0, 1.0)).save(tmp_path / "m.recokd")
    volume = (SERIES.astype(np.float32) * 3 + np.arange(SERIES.size, dtype=np.float32).reshape(SERIES.shape) % 7)
    written = _write_series(tmp_path / "dicom", volume.astype(SERIES.dtype), UID)
    nifti = tmp_path / "same.nii.gz"
    sitk.WriteImage(read_dicom_series(tmp_path / "dicom"), str(nifti))
    common = ["--device", "cpu", "--no-progress", "--backend", "torch"]
    assert main(["predict", "-m", str(model), "-i", str(tmp_path / "dicom"), "-o", str(tmp_path / "out"), *common]) == 0
    assert main(["predict", "-m", str(model), "-i", str(nifti), "-o", str(tmp_path / "ref.nii.gz"), *common]) == 0
    from_dicom = sitk.ReadImage(str(tmp_path / "out" / "dicom.nii.gz"))
    reference = sitk.ReadImage(str(tmp_path / "ref.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(reference))
    assert from_dicom.GetOrigin() == pytest.approx(written.GetOrigin())
    assert from_dicom.GetDirection() == pytest.approx(written.GetDirection(), abs=1e-6)
    _write_series(tmp_path / "dicom", SERIES + 1, UID[:-1] + "2", description="T2 axial", prefix="b")
    assert main(["predict", "-m", str(model), "-i", str(tmp_path / "dicom"), "-o", str(tmp_path / "two"), *common]) == 2
    assert "holds 2 DICOM series" in capsys.readouterr().err and not (tmp_path / "two").exists()


@pytest.mark.parametrize("ending", [".NII.GZ", ".Nii", ".MHA", ".NRRD"])
def test_predict_an_input_whose_ending_is_upper_case(tmp_path, ending, capsys):
    """The label map gets the lower-case ending, is written whole, and nothing else is left in the folder
    (an upper-case .MHA used to leave a .mhd and a .zraw temporary file behind)."""
    from bundle_helpers import phantom_volume, threshold_bundle
    from ReCoKDLib.cli import main

    model = threshold_bundle().save(tmp_path / "m.recokd")
    scan = _write_as(tmp_path / "in" / f"scan{ending}", phantom_volume((16, 16, 16)))
    assert main(["predict", "-m", str(model), "-i", str(scan), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"scan{ending.lower()}"]
    assert sitk.ReadImage(str(tmp_path / "out" / f"scan{ending.lower()}")).GetSize() == (16, 16, 16)
