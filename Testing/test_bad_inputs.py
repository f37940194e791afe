"""The bad-input suite: one row per case a careful user might try (issue 13).

Every row runs the real command line in-process and checks four things: the exit code, a one-line
``error:`` message holding the expected fragment, that no output or partial file was left behind, and
that no input file changed (sha256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from bundle_helpers import phantom_volume, threshold_bundle, write_image
from ReCoKDLib.cli import main


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # tmp folder (holds model.recokd, scan.nii.gz, scans/) -> arguments
    exit_code: int
    fragment: str  # in the one error line ("" for a success row)
    needs: str = "model"  # what the tmp folder starts with: "model" (model.recokd) or "runs" (ds/, runs/ of a training)


def _scan(tmp: Path, name: str = "scan.nii.gz") -> str:
    return str(write_image(phantom_volume((16, 16, 16)), tmp / name))


def _two_d(tmp: Path) -> str:
    return str(write_image(np.ones((16, 16), np.float32), tmp / "slice.nii.gz"))


def _corrupt(tmp: Path) -> str:
    path = tmp / "corrupt.nii.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(200))
    return str(path)


def _truncated(tmp: Path) -> str:
    whole = Path(_scan(tmp, "whole.nii"))
    path = tmp / "truncated.nii.gz"
    import gzip

    path.write_bytes(gzip.compress(whole.read_bytes()[: 352 + 16 * 16 * 8 * 4]))  # header + half the voxels
    whole.unlink()
    return str(path)


def _truncate(path: str) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def _with_nan(tmp: Path, value: float) -> str:
    volume = phantom_volume((16, 16, 16))
    volume[3:5, 3:5, 3:5] = value
    return str(write_image(volume, tmp / "holes.nii.gz"))


def _scans_folder(tmp: Path) -> str:
    folder = tmp / "scans"
    write_image(phantom_volume((16, 16, 16)), folder / "a.nii.gz")  # one channel, no _0000: output name collides
    write_image(phantom_volume((16, 16, 16), seed=1), folder / "b_0000.nii.gz")
    return str(folder)


def _predict(inputs: Callable[[Path], str | list[str]], output: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        given = inputs(tmp)
        return ["predict", "-m", str(tmp / "model.recokd"), "-i", *([given] if isinstance(given, str) else given),
                "-o", output(tmp), "--device", "cpu", "--no-progress"]
    return argv


def _file_under_a_file(tmp: Path) -> str:
    (tmp / "blocker").write_text("a file where a folder should be")
    return str(tmp / "blocker" / "out.nii.gz")


def _dataset_listing_a_case_twice(tmp: Path) -> list[str]:
    root = tmp / "ds"
    for case in ("c1", "c2"):
        write_image(phantom_volume((16, 16, 16)), root / "imagesTr" / f"{case}_0000.nii.gz")
        write_image((phantom_volume((16, 16, 16)) > 1).astype(np.uint8), root / "labelsTr" / f"{case}.nii.gz")
    entry = '{"images": ["imagesTr/%s_0000.nii.gz"], "label": "labelsTr/%s.nii.gz"}'
    (root / "dataset.json").write_text(
        '{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "fg": 1}, "numTraining": 2, '
        '"file_ending": ".nii.gz", "dataset": {"c1": %s, "c1": %s}}' % (entry % ("c1", "c1"), entry % ("c2", "c2")))
    return ["plan", str(root), "--cache", str(tmp / "cache"), "--no-progress"]


def _resume(role: str, *options: str) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        return ["train" if role == "teacher" else "distill", str(tmp / "ds"), "-o", str(tmp / "runs" / role),
                "--cache", str(tmp / "cache"), "--resume", "--no-progress", *options]
    return argv


def _dataset_with_an_undeclared_label(tmp: Path) -> list[str]:
    root = tmp / "ds"
    for case, value in (("c1", 1), ("c2", 7)):  # 7 is not in dataset.json
        write_image(phantom_volume((16, 16, 16)), root / "imagesTr" / f"{case}_0000.nii.gz")
        write_image((phantom_volume((16, 16, 16)) > 1).astype(np.uint8) * value, root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text('{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "fg": 1}, '
                                       '"numTraining": 2, "file_ending": ".nii.gz"}')
    return ["plan", str(root), "--cache", str(tmp / "cache" / "ds"), "--no-progress"]


def _damaged_bundle(tmp: Path) -> None:
    """Flip one byte inside the weights' data of model.recokd (its CRC no longer matches)."""
    import zipfile

    path = tmp / "model.recokd"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("weights.safetensors")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _lying_bundle(tmp: Path) -> None:
    """model.recokd whose weights member's central-directory sizes claim one byte less than it holds."""
    import struct
    import zipfile

    path = tmp / "model.recokd"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("weights.safetensors")
    data = bytearray(path.read_bytes())
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46:pos + 46 + name_len] == b"weights.safetensors":
            break
        pos += 4
    struct.pack_into("<I", data, pos + 24, info.file_size - 1)  # uncompressed size
    path.write_bytes(bytes(data))


def _zip_bomb(tmp: Path) -> None:
    """A 100 MiB member of zeros that deflates to about 100 kB, as model.recokd."""
    import zipfile

    path = tmp / "model.recokd"
    path.unlink()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bundle.json", "{}")
        with zf.open("weights.safetensors", "w", force_zip64=True) as f:
            for _ in range(100):
                f.write(bytes(1024**2))


def _with_model(damage: Callable[[Path], None]) -> Callable[[Path], str]:
    def inputs(tmp: Path) -> str:
        damage(tmp)
        return _scan(tmp)
    return inputs


def _unwritable_cache(tmp: Path) -> list[str]:
    (tmp / "home").write_text("a file where the model cache folder should be")
    os.environ["RECOKD_HOME"] = str(tmp / "home")  # restored by the test
    return ["predict", "-m", "phantom-abdomen", "-i", _scan(tmp), "-o", str(tmp / "out.nii.gz"), "--no-progress"]


_HELD: list = []  # locks a row holds while its command runs


def _while_another_run_holds(role: str) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        from ReCoKDLib.utils.locks import LOCK_NAME, try_lock

        handle = try_lock(tmp / "runs" / role / LOCK_NAME)
        assert handle is not None
        _HELD.append(handle)
        return _resume(role)(tmp)
    return argv


CASES = [
    # data loss: the output is an input
    Case("predict -o equal to -i", _predict(_scan, lambda t: str(t / "scan.nii.gz")), 2, "would replace the scan"),
    Case("predict -o through a relative path to -i", _predict(_scan, lambda t: str(t / "scans" / ".." / "scan.nii.gz")),
         2, "would replace the scan"),
    Case("predict -i DIR -o DIR, a name collides", _predict(_scans_folder, lambda t: str(t / "scans")), 2,
         "would replace the scan"),
    # outputs that cannot hold a 3D label map
    Case("predict -o seg.png", _predict(_scan, lambda t: str(t / "seg.png")), 2, "cannot hold a 3D label map"),
    Case("predict -o seg.jpg", _predict(_scan, lambda t: str(t / "seg.jpg")), 2, "cannot hold a 3D label map"),
    Case("predict -o two-file .mhd", _predict(_scan, lambda t: str(t / "seg.mhd")), 2, "two-file format"),
    Case("predict -o below a file", _predict(_scan, _file_under_a_file), 2, "is a file, not a folder"),
    # unreadable or unsuitable inputs
    Case("predict a missing file", _predict(lambda t: str(t / "absent.nii.gz"), lambda t: str(t / "out.nii.gz")), 2,
         "absent.nii.gz"),
    Case("predict a corrupt file", _predict(_corrupt, lambda t: str(t / "out.nii.gz")), 2, "corrupt.nii.gz"),
    Case("predict a truncated .nii.gz", _predict(_truncated, lambda t: str(t / "out.nii.gz")), 2, "truncated"),
    Case("predict a NIfTI with NaN voxels", _predict(lambda t: _with_nan(t, np.nan), lambda t: str(t / "out.nii.gz")),
         2, "8 NaN"),
    Case("predict a NIfTI with Inf voxels", _predict(lambda t: _with_nan(t, np.inf), lambda t: str(t / "out.nii.gz")),
         2, "8 infinite"),
    Case("predict an all-NaN NIfTI", _predict(lambda t: str(write_image(np.full((16, 16, 16), np.nan, np.float32),
                                                                          t / "nan.nii.gz")),
                                              lambda t: str(t / "out.nii.gz")), 2, "4096 NaN"),
    Case("predict a 1000 mm spacing (a header in micrometres)", _predict(
        lambda t: str(write_image(phantom_volume((16, 16, 16)), t / "huge.nii.gz", spacing=(1000.0, 1000.0, 1000.0))),
        lambda t: str(t / "out.nii.gz")), 2, "GiB"),
    Case("predict a 0.01 mm spacing (a header in metres)", _predict(
        lambda t: str(write_image(phantom_volume((16, 16, 16)), t / "tiny.nii.gz", spacing=(0.01, 0.01, 0.01))),
        lambda t: str(t / "out.nii.gz")), 2, "far smaller than one training patch"),
    Case("predict a truncated .mha", _predict(lambda t: _truncate(_scan(t, "scan.mha")), lambda t: str(t / "out.nii.gz")),
         2, "damaged or truncated"),
    Case("predict a 2D image", _predict(_two_d, lambda t: str(t / "out.nii.gz")), 2, "3D"),
    Case("predict an empty folder", _predict(lambda t: str((t / "empty").mkdir() or t / "empty"),
                                             lambda t: str(t / "out")), 2, "holds no image files"),
    # damaged or hostile model bundles, an unusable model cache
    Case("predict with a bundle whose weights fail their CRC", _predict(_with_model(_damaged_bundle),
                                                                        lambda t: str(t / "out.nii.gz")), 2, "is damaged"),
    Case("predict with a bundle whose declared size is false", _predict(_with_model(_lying_bundle),
                                                                        lambda t: str(t / "out.nii.gz")), 2, "model.recokd"),
    Case("predict with a zip bomb as bundle", _predict(_with_model(_zip_bomb), lambda t: str(t / "out.nii.gz")), 2,
         "zip bomb"),
    Case("predict a built-in model with an unwritable cache (used in place)", _unwritable_cache, 0, ""),
    # datasets
    Case("plan a dataset whose label holds an undeclared value (no cache folder left)", _dataset_with_an_undeclared_label,
         2, "has 1 problem"),  # validation lists each problem on its own line below
    Case("plan a dataset.json listing a case id twice", _dataset_listing_a_case_twice, 2, "'c1' twice"),
    # --resume with options that would make the weights no longer one run's
    Case("train --resume --lr", _resume("teacher", "--lr", "0.5"), 2, "--lr 0.5 (run: 0.01)", "runs"),
    Case("train --resume --epochs", _resume("teacher", "--epochs", "9"), 2, "--epochs 9 (run: 1)", "runs"),
    Case("train --resume --augment nnunet", _resume("teacher", "--augment", "nnunet"), 2, "--augment nnunet (run: none)",
         "runs"),
    Case("train --resume --augment light", _resume("teacher", "--augment", "light"), 2, "--augment light (run: none)",
         "runs"),
    Case("train --resume --fold", _resume("teacher", "--fold", "1"), 2, "--fold 1 (run: 0)", "runs"),
    Case("train --resume --patch-size", _resume("teacher", "--patch-size", "32", "32", "32"), 2, "--patch-size", "runs"),
    Case("train --resume --base-filters", _resume("teacher", "--base-filters", "16"), 2, "--base-filters 16 (run: 8)", "runs"),
    Case("distill --resume --method", _resume("student", "--method", "logit"), 2, "--method logit (run: recokd)", "runs"),
    Case("distill --resume --width-factor", _resume("student", "--width-factor", "2"), 2, "--width-factor 2.0 (run: 4.0)",
         "runs"),
    # two processes on one run folder
    Case("train --resume while another process trains in the folder", _while_another_run_holds("teacher"), 2,
         f"is in use by another run (pid {os.getpid()}", "runs"),
    Case("distill --resume while another process distils in the folder", _while_another_run_holds("student"), 2,
         "is in use by another run", "runs"),
    # the same commands done right succeed (the suite's control rows)
    Case("predict -o elsewhere", _predict(_scan, lambda t: str(t / "out" / "seg.nii.gz")), 0, ""),
    Case("predict -i DIR -o DIR without collisions", _predict(
        lambda t: (write_image(phantom_volume((16, 16, 16)), t / "own" / "c_0000.nii.gz"), str(t / "own"))[1],
        lambda t: str(t / "own")), 0, ""),
]


# -- the overwrite rule (issue 27): never an input, never an existing file unasked, --overwrite only of its kind


def _scored(tmp: Path) -> tuple[str, str]:
    """pred/ and gt/ folders with one case each (and a dataset.json beside gt/)."""
    labels = (phantom_volume((16, 16, 16)) > 1).astype(np.uint8)
    write_image(labels, tmp / "pred" / "a.nii.gz")
    write_image(labels, tmp / "gt" / "a.nii.gz")
    return str(tmp / "pred"), str(tmp / "gt")


def _evaluate(*options: Callable[[Path], str] | str) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        pred, gt = _scored(tmp)
        return ["evaluate", pred, gt, *[o(tmp) if callable(o) else o for o in options]]
    return argv


def _existing(name: str, text: str = "someone's notes") -> Callable[[Path], str]:
    def path(tmp: Path) -> str:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
        return str(tmp / name)
    return path


def _export(output: Callable[[Path], str], *options: str) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        return ["export", str(tmp / "runs" / "student"), "-o", output(tmp), *options]
    return argv


def _copy_of_model(name: str) -> Callable[[Path], str]:
    def path(tmp: Path) -> str:
        shutil.copy(tmp / "model.recokd", tmp / name)
        return str(tmp / name)
    return path


def _images_and_labels(tmp: Path) -> str:
    """imagesTr/ with case_0000.nii.gz, labelsTr/ with its reference case.nii.gz (nnU-Net naming)."""
    write_image(phantom_volume((16, 16, 16)), tmp / "imagesTr" / "case_0000.nii.gz")
    write_image((phantom_volume((16, 16, 16)) > 1).astype(np.uint8), tmp / "labelsTr" / "case.nii.gz")
    return str(tmp / "imagesTr")


OVERWRITE_CASES = [
    Case("predict -i imagesTr -o labelsTr replaces no reference label", _predict(_images_and_labels,
                                                                              lambda t: str(t / "labelsTr")),
         2, "exists; pass --overwrite"),
    Case("predict -o an existing file", _predict(_scan, _existing("seg.nii.gz")), 2, "exists; pass --overwrite"),
    Case("predict -o another scan, --overwrite", lambda t: _predict(_scan, lambda t: _scan(t, "other_ct.nii.gz"))(t)
         + ["--overwrite"], 2, "is not a label map; --overwrite replaces only label maps"),
    Case("predict -o a folder named like a file", _predict(_scan, lambda t: str((t / "seg.nii.gz").mkdir() or
                                                                                 t / "seg.nii.gz" / "x.nii.gz")),
         0, ""),  # a folder path: the label goes inside it, as for any folder
    Case("evaluate --csv equal to a reference label", _evaluate("--csv", lambda t: str(t / "gt" / "a.nii.gz")), 2,
         "named like an image"),
    Case("evaluate --json equal to --labels", _evaluate("--labels", _existing("labels.json", '{"background": 0, "a": 1}'),
                                                        "--json", lambda t: str(t / "labels.json")), 2, "is the input"),
    Case("evaluate --json over the dataset.json beside the references",
         _evaluate("--json", _existing("gt/dataset.json", '{"labels": {"background": 0, "a": 1}}')), 2, "is the input"),
    Case("evaluate --csv over an existing file", _evaluate("--csv", _existing("notes.csv")), 2, "exists; pass --overwrite"),
    Case("evaluate --csv --overwrite over a file that is not an evaluation CSV",
         _evaluate("--csv", _existing("notes.csv"), "--overwrite"), 2, "is not an evaluation CSV"),
    Case("evaluate --json --overwrite over a JSON that is not an evaluation",
         _evaluate("--json", _existing("config.json", '{"a": 1}'), "--overwrite"), 2, "is not an evaluation JSON"),
    Case("evaluate --csv names a folder", _evaluate("--csv", lambda t: str((t / "out").mkdir() or t / "out")), 2,
         "is a folder"),
    Case("export -o an existing run folder", _export(lambda t: str(t / "runs" / "teacher")), 2,
         "holding other files", "runs"),
    Case("export -o the dataset folder, --overwrite", _export(lambda t: str(t / "ds"), "--overwrite"), 2,
         "holding other files", "runs"),
    Case("export -o inside the run exported", _export(lambda t: str(t / "runs" / "student" / "m.recokd")), 2,
         "lies in the run folder", "runs"),
    Case("export -o an existing file that is not a bundle, --overwrite",
         _export(_existing("notes.recokd"), "--overwrite"), 2, "is not a model bundle", "runs"),
    Case("export -o an earlier bundle without --overwrite", _export(lambda t: str(t / "earlier.recokd")), 2,
         "exists; pass --overwrite", "runs+model"),
    Case("export-model -o over the bundle itself", lambda t: ["export-model", str(t / "model.recokd"), "--format",
                                                             "onnx", "-o", str(t / "model.recokd")], 2, "named *.onnx"),
    Case("export-model -o an existing graph without --overwrite", lambda t: [
        "export-model", str(t / "model.recokd"), "--format", "onnx", "-o", _existing("model.onnx")(t)], 2,
         "exists; pass --overwrite"),
]


def _export_with_terminology(text: str) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        return ["export", str(tmp / "runs" / "student"), "-o", str(tmp / "m.recokd"), "--terminology",
                _existing("terms.json", text)(tmp)]
    return argv


TERMINOLOGY_CASES = [
    Case("export --terminology not JSON", _export_with_terminology('{"organ": '), 2, "cannot read --terminology", "runs"),
    Case("export --terminology a list", _export_with_terminology("[1, 2]"), 2, "must be a JSON object", "runs"),
    Case("export --terminology a string per label", _export_with_terminology('{"organ": "liver"}'), 2,
         "terminology of 'organ' must be an object", "runs"),
    Case("export --terminology without type", _export_with_terminology('{"organ": {"category": ["SCT", "1", "T"]}}'),
         2, "lacks type", "runs"),
    Case("export --terminology with a two-part code", _export_with_terminology(
        '{"organ": {"category": ["SCT", "1"], "type": ["SCT", "2", "Liver"]}}'), 2, "three non-empty strings", "runs"),
]

def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``; a run folder's lock file is bookkeeping (it records its last
    holder) and left out."""
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else ""):
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*")) if p.name != ".recokd.lock"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return threshold_bundle().save(tmp_path_factory.mktemp("model") / "model.recokd")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A phantom dataset with a finished (tiny) teacher run and a student distilled from it."""
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    base = tmp_path_factory.mktemp("runs")
    save_dataset_nnunet(generate_dataset(4, seed=3, shape=(32, 32, 32)), base / "ds")
    common = ["--cache", str(base / "cache"), "--epochs", "1", "--iters-per-epoch", "1", "--patch-size", "16", "32", "32",
              "--workers", "0", "--threads", "1", "--no-progress", "--val-max-cases", "1"]
    assert main(["train", str(base / "ds"), "-o", str(base / "runs" / "teacher"), *common,
                 "--patch-budget", "32768", "--base-filters", "8", "--max-filters", "32"]) == 0
    assert main(["distill", str(base / "ds"), "-o", str(base / "runs" / "student"), *common,
                 "--teacher", str(base / "runs" / "teacher")]) == 0
    return base


def _train_into(output: Callable[[Path], str], cache: Callable[[Path], str] | None = None) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        return ["train", str(tmp / "ds"), "-o", output(tmp), "--cache", cache(tmp) if cache else str(tmp / "cache"),
                "--epochs", "1", "--iters-per-epoch", "1", "--no-progress"]
    return argv


def _run_without_checkpoints(tmp: Path) -> str:
    """The teacher run with its checkpoints deleted to save space: its weights are still there."""
    for p in (tmp / "runs" / "teacher").glob("checkpoint_*.pt"):
        p.unlink()
    return str(tmp / "runs" / "teacher")


RUN_FOLDER_CASES = [
    Case("plan --cache a run folder", lambda t: ["plan", str(t / "ds"), "--cache", str(t / "runs" / "teacher"),
                                                 "--no-progress"], 2, "is a run folder", "runs"),
    Case("plan --cache the dataset itself", lambda t: ["plan", str(t / "ds"), "--cache", str(t / "ds"), "--no-progress"],
         2, "holds a dataset", "runs"),
    Case("train -o a folder of other files", _train_into(lambda t: str(Path(_existing("docs/notes.md")(t)).parent)), 2,
         "holds other files (notes.md), not a run", "runs"),
    Case("train -o the --cache folder", _train_into(lambda t: str((t / "c").mkdir() or t / "c"),
                                                    lambda t: _existing("c/plans.json", "{}")(t).rsplit("/", 1)[0]), 2,
         "is also the --cache folder", "runs"),
    Case("train -o a run whose checkpoints were deleted, without --resume", _train_into(_run_without_checkpoints), 2,
         "already holds a run", "runs"),
    Case("train -o an existing file", _train_into(_existing("notes.txt")), 2, "is a file", "runs"),
    Case("export -o below a file", _export(lambda t: str(Path(_existing("notes.txt")(t)) / "m.recokd")), 2,
         "is a file, not a folder", "runs"),
]

ALL_CASES = CASES + OVERWRITE_CASES + TERMINOLOGY_CASES + RUN_FOLDER_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys, request, monkeypatch) -> None:
    monkeypatch.setenv("RECOKD_HOME", str(tmp_path / "recokd_home"))  # rows may point it elsewhere
    if case.needs == "runs+model":  # an earlier bundle at earlier.recokd beside the runs
        (tmp_path / "earlier.recokd").write_bytes(request.getfixturevalue("model").read_bytes())
    if case.needs == "model":
        (tmp_path / "model.recokd").write_bytes(request.getfixturevalue("model").read_bytes())
    else:
        base = request.getfixturevalue("runs")
        for part in ("ds", "runs"):
            shutil.copytree(base / part, tmp_path / part)
    capsys.readouterr()
    argv = case.argv(tmp_path)  # writes the inputs
    before = _digests(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    after = _digests(tmp_path)
    while _HELD:
        _HELD.pop().close()
    assert code == case.exit_code, err
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert changed == [], f"input file(s) changed or removed: {changed}"
    added = sorted(set(after) - set(before))
    if case.exit_code:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and case.fragment in lines[0], err
        assert "Traceback" not in err
        assert added == [], f"left behind: {added}"
    else:
        # the per-user cache (RECOKD_HOME: e.g. the ONNX graph of --backend auto) is not an output
        files = [a for a in added if not a.endswith("/") and not a.startswith("recokd_home/")]
        assert files and all(a.endswith(".nii.gz") and not Path(a).name.startswith(".") for a in files), added


def test_resume_accepts_the_runs_own_values_and_the_resumable_options(runs: Path, tmp_path: Path, capsys) -> None:
    for part in ("ds", "runs"):
        shutil.copytree(runs / part, tmp_path / part)
    same = ["--lr", "0.01", "--epochs", "1", "--patch-size", "16", "32", "32", "--fold", "0"]
    resumable = ["--threads", "2", "--workers", "1", "--device", "cpu"]
    assert main(_resume("teacher", *same, *resumable)(tmp_path)) == 0
    assert "finished already" in capsys.readouterr().out
    assert main(_resume("student", "--method", "recokd", "--width-factor", "4", *resumable)(tmp_path)) == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(runs: Path, tmp_path: Path, capsys) -> None:
    from ReCoKDLib.utils.locks import LOCK_NAME

    for part in ("ds", "runs"):
        shutil.copytree(runs / part, tmp_path / part)
    lock = tmp_path / "runs" / "teacher" / LOCK_NAME
    lock.write_text('{"pid": 999999, "host": "crashed-node", "since": "2026-01-01T00:00:00"}')  # kill -9 leaves this
    assert main(_resume("teacher")(tmp_path)) == 0
    assert "finished already" in capsys.readouterr().out
    assert str(os.getpid()) in lock.read_text()


def test_a_refused_start_leaves_no_folder(tmp_path: Path, capsys) -> None:
    """A run that fails before writing anything removes the folder (and lock) it created."""
    code = main(["distill", str(tmp_path / "ds"), "-o", str(tmp_path / "new" / "run"), "--teacher", str(tmp_path / "none")])
    assert code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "new" / "run").exists()


def test_resume_removes_what_a_killed_checkpoint_write_left(runs: Path, tmp_path: Path, capsys) -> None:
    for part in ("ds", "runs"):
        shutil.copytree(runs / part, tmp_path / part)
    partial = tmp_path / "runs" / "teacher" / ".0badc0de.partial.checkpoint_latest.pt"
    partial.write_bytes(b"half a checkpoint")
    assert main(_resume("teacher")(tmp_path)) == 0
    assert not partial.exists()


def test_force_segments_an_odd_spacing_anyway(model: Path, tmp_path: Path) -> None:
    scan = write_image(phantom_volume((16, 16, 16)), tmp_path / "tiny.nii.gz", spacing=(0.01, 0.01, 0.01))
    args = ["predict", "-m", str(model), "-i", str(scan), "-o", str(tmp_path / "seg.nii.gz"), "--no-progress"]
    assert main(args) == 2 and main(args + ["--force"]) == 0 and (tmp_path / "seg.nii.gz").is_file()


def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(runs: Path, tmp_path: Path, capsys) -> None:
    """kill -9 between the last checkpoint and the final weights: --resume writes them (it used to say
    "finished already" and leave the run without model_final)."""
    import torch
    from safetensors.torch import load_file

    for part in ("ds", "runs"):
        shutil.copytree(runs / part, tmp_path / part)
    final = tmp_path / "runs" / "teacher" / "model_final.safetensors"
    final.unlink()
    assert main(_resume("teacher")(tmp_path)) == 0
    original, written = load_file(runs / "runs" / "teacher" / "model_final.safetensors"), load_file(final)
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)


def test_an_interrupt_between_the_two_checkpoint_writes_keeps_checkpoint_best(runs: Path, tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """The epoch end writes checkpoint_latest (before validation), then checkpoint_best, then checkpoint_latest
    again: stopped between the last two, the resumed run has checkpoint_best and finishes (in the other order
    checkpoint_best could be lost for good)."""
    from ReCoKDLib.training.loop import EpochTrainer

    real = EpochTrainer.save_checkpoint
    calls: list[str] = []

    def interrupted_once(self, which="latest"):
        calls.append(which)
        if len(calls) == 3:  # the third write of the first validated epoch end (latest, best, latest)
            raise KeyboardInterrupt
        real(self, which)

    argv = ["train", str(runs / "ds"), "-o", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--epochs", "2",
            "--iters-per-epoch", "1", "--patch-size", "16", "32", "32", "--workers", "0", "--threads", "1",
            "--no-progress", "--val-max-cases", "1", "--patch-budget", "32768", "--base-filters", "8", "--max-filters", "32"]
    monkeypatch.setattr(EpochTrainer, "save_checkpoint", interrupted_once)
    assert main(argv) == 130
    monkeypatch.setattr(EpochTrainer, "save_checkpoint", real)
    assert calls == ["latest", "best", "latest"]
    assert (tmp_path / "run" / "checkpoint_best.pt").is_file()  # written before the interrupted one
    assert main(argv + ["--resume"]) == 0
    assert (tmp_path / "run" / "checkpoint_best.pt").is_file() and (tmp_path / "run" / "model_final.safetensors").is_file()


def test_a_moved_run_resumes_with_its_validation_list_elsewhere(runs: Path, tmp_path: Path, capsys) -> None:
    """--resume compares --val-cases by the cases it lists, not by its path: a run copied to another
    machine with its split file resumes; a list naming other cases is still refused."""
    first = tmp_path / "first" / "fold0.txt"
    first.parent.mkdir()
    first.write_text("phantom_000\n")
    argv = ["train", str(runs / "ds"), "-o", str(tmp_path / "first" / "run"), "--cache", str(tmp_path / "cache"),
            "--epochs", "1", "--iters-per-epoch", "1", "--patch-size", "16", "32", "32", "--workers", "0",
            "--threads", "1", "--no-progress", "--patch-budget", "32768", "--base-filters", "8", "--max-filters", "32"]
    assert main([*argv, "--val-cases", str(first)]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "first", moved)
    shutil.rmtree(tmp_path / "first")
    resume = [*argv[:3], str(moved / "run"), *argv[4:], "--resume"]
    capsys.readouterr()
    assert main(resume) == 2  # the recorded list is gone: say how to name it again
    assert "resume with --val-cases" in capsys.readouterr().err
    assert main([*resume, "--val-cases", str(moved / "fold0.txt")]) == 0, capsys.readouterr().err
    assert "finished already" in capsys.readouterr().out
    (moved / "other.txt").write_text("phantom_001\n")
    assert main([*resume, "--val-cases", str(moved / "other.txt")]) == 2
    assert "--val-cases" in capsys.readouterr().err


def test_a_student_moved_with_its_teacher_resumes_and_checks_the_teachers_weights(runs: Path, tmp_path: Path,
                                                                                     capsys) -> None:
    """--resume compares --teacher by its weights' sha256, not by its path: a student copied elsewhere
    with its teacher resumes; a teacher whose weights differ from the ones the run started with is refused,
    and a recorded teacher that no longer exists gets a line saying to name it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(runs / "runs" / "teacher", tmp_path / "first" / "teacher")
    common = ["--cache", str(tmp_path / "cache"), "--epochs", "1", "--iters-per-epoch", "1", "--patch-size", "16", "32",
              "32", "--workers", "0", "--threads", "1", "--no-progress", "--val-max-cases", "1"]
    ds = str(runs / "ds")
    assert main(["distill", ds, "-o", str(tmp_path / "first" / "student"), *common,
                 "--teacher", str(tmp_path / "first" / "teacher")]) == 0
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    shutil.rmtree(tmp_path / "first")
    resume = ["distill", ds, "-o", str(tmp_path / "moved" / "student"), *common, "--resume"]
    capsys.readouterr()
    assert main(resume) == 2  # the recorded teacher is gone
    assert "resume with --teacher" in capsys.readouterr().err
    assert main([*resume, "--teacher", str(tmp_path / "moved" / "teacher")]) == 0, capsys.readouterr().err
    assert "finished already" in capsys.readouterr().out
    weights = tmp_path / "moved" / "teacher" / "model_best.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    state[first] = state[first] + 1.0  # same network, other weights: another teacher
    save_file(state, weights)
    assert main([*resume, "--teacher", str(tmp_path / "moved" / "teacher")]) == 2
    assert "other teacher weights" in capsys.readouterr().err
