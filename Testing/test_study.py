"""``recokd benchmark-study``: config checks, patient-grouped folds, a whole tiny study on phantoms
(cross-validation and a test split), its report, and resuming (finished jobs are not run again)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet
from ReCoKDLib.errors import ReCoKDError
from ReCoKDLib.workflows.study import cv_folds, load_config, plan_jobs, run_study


def _dataset(folder: Path) -> Path:
    """6 phantoms: 4 training cases named like ACDC (two 'patients', two frames each), 2 test cases."""
    cases = generate_dataset(6, shape=(32, 32, 32))
    names = ["patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02", "test01", "test02"]
    cases = [dataclasses.replace(c, name=n) for c, n in zip(cases, names)]
    d = save_dataset_nnunet(cases, folder)
    (d / "imagesTs").mkdir()
    (d / "labelsTs").mkdir()
    for n in names[4:]:
        shutil.move(str(d / "imagesTr" / f"{n}_0000.nii.gz"), d / "imagesTs")
        shutil.move(str(d / "labelsTr" / f"{n}.nii.gz"), d / "labelsTs")
    info = json.loads((d / "dataset.json").read_text())
    info["numTraining"] = 4
    (d / "dataset.json").write_text(json.dumps(info))
    return d


def _config(tmp: Path, data: Path) -> Path:
    cfg = {
        "name": "tiny study",
        "datasets": {
            "ph": {"path": str(data), "evaluate_on": "test", "teacher_epochs": 1, "student_epochs": 1},
            "phcv": {"path": str(data), "evaluate_on": "cv", "folds": 2, "group_pattern": "^(patient\\d+)",
                     "teacher_epochs": 1, "student_epochs": 1},
            # the demo's phantom, written by the study itself; only the no-KD student runs on it
            "builtin": {"phantom": {"train_cases": 3, "test_cases": 1, "size": 32}, "evaluate_on": "test",
                        "teacher_epochs": 1, "student_epochs": 1, "students": ["none"]},
        },
        "planner": {"patch_budget": 16384, "base_filters": 8, "max_filters": 32},
        "training": {"iters_per_epoch": 2, "workers": 0, "val_max_cases": 1},
        "seeds": [0, 1],
        "students": {"none": {"method": "none"}, "recokd": {"method": "recokd"}},
        "ablations": {"dataset": "ph", "variants": {"msard-only": {"method": "msard"}}},
        "latency": {"repeats": 1, "max_cases": 1, "threads": 1, "backends": ["torch", "onnxruntime"]},
        "jobs": 2,
    }
    path = tmp / "study.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    config = load_config(_config(tmp, _dataset(tmp / "ds")))
    out = tmp / "out"
    messages: list[str] = []
    jobs, failed = run_study(config, out, log=messages.append, poll_seconds=0.2)
    return config, out, jobs, failed, messages


def test_cv_folds_keep_a_patients_frames_together():
    ids = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 8) for f in (1, 2)]
    folds = cv_folds(ids, 3, r"^(patient\d+)")
    assert sorted(sum(folds, [])) == sorted(ids) and len(folds) == 3
    for fold in folds:
        patients = {i.split("_")[0] for i in fold}
        assert all(f"{p}_frame01" in fold and f"{p}_frame02" in fold for p in patients)
    assert cv_folds(ids, 3, r"^(patient\d+)") == folds  # deterministic
    with pytest.raises(ReCoKDError, match="cannot make 9 folds"):
        cv_folds(ids, 9, r"^(patient\d+)")


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"datasets": {"a": {"path": str(tmp_path)}}, "students": {"s": {"method": "nonsense"}}}))
    with pytest.raises(ReCoKDError, match="unknown method 'nonsense'"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"path": str(tmp_path)}}, "students": {"s": {"method": "none", "lr": 1}}}))
    with pytest.raises(ReCoKDError, match="unknown key"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {}}}, "students": {"teacher": {"method": "none"}}}))
    with pytest.raises(ReCoKDError, match="'teacher' names the teacher model"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"path": "nowhere"}}, "students": {"s": {"method": "none"}}}))
    with pytest.raises(ReCoKDError, match="'a': nowhere is not a folder"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {}, "students": ["magic"]}}, "students": {"s": {"method": "none"}}}))
    with pytest.raises(ReCoKDError, match="'students' must list names from 'students'"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {"cases": 3}}}, "students": {"s": {"method": "none"}}}))
    with pytest.raises(ReCoKDError, match=r"'phantom' \(instead of a 'path'\) takes integers"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {"size": 0}}}, "students": {"s": {"method": "none"}}}))
    with pytest.raises(ReCoKDError, match="a seed >= 0, the others >= 1"):
        load_config(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"datasets": {"a": {"phantom": {"seed": 0, "size": 32}}}, "students": {"s": {"method": "none"}}}))
    assert load_config(ok).datasets["a"].phantom["seed"] == 0
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {}, "seeds": [1, 1]}}, "students": {"s": {"method": "none"}}}))
    with pytest.raises(ReCoKDError, match="dataset 'a': 'seeds' must be a non-empty list of distinct"):
        load_config(bad)
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {}}}, "students": {"s": {"method": "none"}},
                               "latency": {"backends": ["torch", "tensorrt"]}}))
    with pytest.raises(ReCoKDError, match=r"latency.backends must list distinct engines from \['torch', 'onnxruntime', 'openvino'\]"):
        load_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ReCoKDError, match="not readable JSON"):
        load_config(bad)
    with pytest.raises(ReCoKDError, match="does not exist"):
        load_config(tmp_path / "missing.json")


def test_a_dataset_can_run_fewer_seeds_than_the_study(tmp_path):
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps({"datasets": {"a": {"phantom": {"train_cases": 2, "test_cases": 1, "size": 32}},
                                            "b": {"phantom": {"train_cases": 2, "test_cases": 1, "size": 32},
                                                  "seeds": [3]}},
                               "seeds": [3, 4], "students": {"none": {"method": "none"}}}))
    jobs = plan_jobs(load_config(cfg), tmp_path / "out")
    names = [j.name for j in jobs]
    assert {"a/none_s3", "a/none_s4", "b/none_s3"} <= set(names) and "b/none_s4" not in names
    # latency defaults to PyTorch alone, and then its job spec (and digest) is what it was before backends
    assert all("backends" not in j.spec for j in jobs if j.kind == "latency")


def test_study_runs_every_job_and_scores_held_out_cases(study):
    config, out, jobs, failed, messages = study
    assert failed == [], messages
    assert all(j.done() for j in jobs)
    names = {j.name for j in jobs}
    assert {"phcv/teacher_f0", "phcv/teacher_f1", "ph/teacher", "ph/recokd_s1", "phcv/none_s1",
            "ph/msard-only_s0", "ph/latency"} <= names
    # under CV, run i trains on the other folds and is scored on fold i only, frames of a patient together
    for j in jobs:
        if j.kind != "train" or not j.name.startswith("phcv/"):
            continue
        run = json.loads((j.folder / "run.json").read_text())
        ev = json.loads((j.folder / "eval.json").read_text())
        scored = {c["case"] for c in ev["cases"]}
        assert scored == set(run["val_cases"]) and not scored & set(run["train_cases"])
        assert len({c.split("_")[0] for c in scored}) == 1
    # with a test split, every run is scored on imagesTs
    ev = json.loads((out / "runs" / "ph" / "recokd_s0" / "eval.json").read_text())
    assert {c["case"] for c in ev["cases"]} == {"test01", "test02"}
    # a dataset runs only the students it lists; a phantom dataset is written into the study folder
    assert {n for n in names if n.startswith("builtin/")} == {
        "builtin/plan", "builtin/teacher", "builtin/none_s0", "builtin/none_s1", "builtin/latency"}
    phantom = out / "data" / "builtin"
    assert len(list((phantom / "imagesTr").iterdir())) == 3 and len(list((phantom / "labelsTs").iterdir())) == 1
    ev = json.loads((out / "runs" / "builtin" / "none_s0" / "eval.json").read_text())
    assert [c["case"] for c in ev["cases"]] == ["phantom_003"]
    # other phantom settings would silently reuse these cases: refused, in one line
    changed = json.loads(config.source.read_text())
    changed["datasets"]["builtin"]["phantom"]["size"] = 48
    other = config.source.parent / "changed.json"
    other.write_text(json.dumps(changed))
    with pytest.raises(ReCoKDError, match="holds a phantom made with .* but the config asks for"):
        plan_jobs(load_config(other), out)


def test_report_aggregates_the_runs(study):
    config, out, jobs, failed, _ = study
    results = json.loads((out / "results.json").read_text())
    per_seed = [json.loads((out / "runs" / "phcv" / f"recokd_s{s}" / "eval.json").read_text())["summary"]["dice"]["mean"]
                for s in (0, 1)]
    got = results["datasets"]["phcv"]["recokd"]["dice"]["mean"]
    assert got[0] == pytest.approx(np.mean(per_seed)) and got[1] == pytest.approx(np.std(per_seed, ddof=1))
    teacher = [json.loads((out / "runs" / "phcv" / f"teacher_f{k}" / "eval.json").read_text())["summary"]["dice"]["mean"]
               for k in (0, 1)]
    none = results["datasets"]["phcv"]["none"]["dice"]["mean"][0]
    gap = results["datasets"]["phcv"]["recokd"]["gap"]["mean"]
    if gap is not None:
        assert gap == pytest.approx((np.mean(per_seed) - none) / (np.mean(teacher) - none))
    assert results["datasets"]["ph"]["recokd"]["parameters"] < results["datasets"]["ph"]["teacher"]["parameters"]
    report = (out / "report.md").read_text()
    for text in ("## ph", "## phcv", "## Ablations", "msard-only", "| teacher |", "Wall time"):
        assert text in report
    # the paired difference to no-KD: same seed (and fold), mean of the per-pair differences
    none_seeds = [json.loads((out / "runs" / "phcv" / f"none_s{s}" / "eval.json").read_text())["summary"]["dice"]["mean"]
                  for s in (0, 1)]
    paired = results["paired"]["phcv"]["recokd"]
    assert paired["reference"] == "none" and paired["dice"]["mean"]["n"] == 2
    assert paired["dice"]["mean"]["mean"] == pytest.approx(np.mean(np.subtract(per_seed, none_seeds)))
    assert "Paired differences" in report and "msard-only" in json.dumps(results["ablations_paired"])
    # latency: every model timed with each configured backend, one table row per model and backend
    rows = json.loads((out / "latency" / "ph" / "benchmark.json").read_text())
    assert {(r["model"], r["backend"]) for r in rows} == {
        (m, b) for m in ("teacher", "none", "recokd") for b in ("torch", "onnxruntime")}
    table = report.split("Latency per model and backend")[1].split("Paired differences")[0]
    for r in rows:
        assert f"| {r['model']} | {r['backend']} | {r['parameters']:,} |" in table
        assert f"{r['seconds_per_volume']:.3f}" in table
    fastest = min((r for r in rows if r["model"] == "recokd"), key=lambda r: r["seconds_per_volume"])
    assert results["datasets"]["ph"]["recokd"]["seconds_per_volume"] == fastest["seconds_per_volume"]
    for png in ("dice_ph.png", "dice_phcv.png", "contours.png", "paired_ph.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_jobs_and_redoes_changed_ones(study, capsys):
    config, out, jobs, _, _ = study
    messages: list[str] = []
    _, failed = run_study(config, out, log=messages.append, poll_seconds=0.2)
    assert failed == [] and not any(m.startswith("start") for m in messages)
    assert "0 to run" in messages[0]
    # a changed schedule is a different job: not taken as done
    config.datasets["ph"].student_epochs = 2
    changed = {j.name: j.done() for j in plan_jobs(config, out)}
    assert changed["ph/recokd_s0"] is False and changed["ph/teacher"] is True and changed["phcv/recokd_s0"] is True
    config.datasets["ph"].student_epochs = 1
    assert main(["benchmark-study", str(config.source), "-o", str(out), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "done   ph/recokd_s0" in listed and "todo" not in listed


def test_a_job_already_running_elsewhere_is_refused(study):
    import fcntl

    from ReCoKDLib.workflows.study import execute_job

    config, out, jobs, _, _ = study
    job = next(j for j in jobs if j.name == "ph/recokd_s0")
    job_file = out / "logs" / "ph__recokd_s0.job.json"
    with open(job.folder / ".job.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ReCoKDError, match="already running"):
            execute_job(job_file)


def test_the_runner_waits_for_a_job_running_in_another_process(study):
    import fcntl
    import threading

    config, out, jobs, _, _ = study
    job = next(j for j in jobs if j.name == "ph/none_s1")
    marker = job.marker.read_bytes()
    job.marker.unlink()  # not finished yet, as far as this runner can tell
    held = open(job.folder / ".job.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def the_other_process_finishes():
        job.marker.write_bytes(marker)
        held.close()

    timer = threading.Timer(1.5, the_other_process_finishes)
    timer.start()
    messages: list[str] = []
    try:
        _, failed = run_study(config, out, only=["ph/none_s1"], log=messages.append, poll_seconds=0.2)
    finally:
        timer.join()
    assert failed == [], messages
    assert any(m.startswith("wait   ph/none_s1") for m in messages)
    assert "done   ph/none_s1 (in another process)" in messages
    assert not any(m.startswith("start  ph/none_s1") for m in messages)


def test_a_job_another_runner_starts_at_the_same_moment_is_waited_for(study, monkeypatch):
    """Two runners may both see a job free and start it; the loser's subprocess finds the lock taken.
    That is not a failure: the runner waits for the job where it runs."""
    import fcntl

    import ReCoKDLib.workflows.study as study_module

    config, out, jobs, _, _ = study
    job = next(j for j in jobs if j.name == "ph/none_s0")
    marker = job.marker.read_bytes()
    job.marker.unlink()
    held = open(job.folder / ".job.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    real, calls = study_module._held_elsewhere, []

    def first_check_misses(j):  # the other runner had not locked it yet when this one looked
        calls.append(j.name)
        return False if len(calls) == 1 else real(j)

    monkeypatch.setattr(study_module, "_held_elsewhere", first_check_misses)
    messages: list[str] = []

    def log(message: str) -> None:
        messages.append(message)
        if message.startswith("wait   ph/none_s0"):  # now the other process finishes the job
            job.marker.write_bytes(marker)
            held.close()

    _, failed = run_study(config, out, only=["ph/none_s0"], log=log, poll_seconds=0.2)
    assert failed == [], messages
    assert any(m.startswith("start  ph/none_s0") for m in messages)  # it did try, and lost the lock
    assert "done   ph/none_s0 (in another process)" in messages
    assert not any(m.startswith("FAILED") for m in messages)


def test_a_failed_teacher_skips_its_students_and_keeps_going(tmp_path):
    data = _dataset(tmp_path / "ds")
    cfg = json.loads(_config(tmp_path, data).read_text())
    cfg["datasets"] = {"ph": cfg["datasets"]["ph"]}
    cfg["training"]["optimizer"] = "bogus"  # the teacher's command line is rejected: exit status 2
    cfg.pop("ablations")
    cfg["latency"] = {"enabled": False}
    (tmp_path / "study.json").write_text(json.dumps(cfg))
    messages: list[str] = []
    jobs, failed = run_study(load_config(tmp_path / "study.json"), tmp_path / "out", log=messages.append,
                             poll_seconds=0.2)
    assert "ph/teacher" in failed and {"ph/none_s0", "ph/recokd_s1"} <= set(failed)
    assert any(m.startswith("FAILED ph/teacher") and "invalid choice: 'bogus'" in m for m in messages)
    assert [j.name for j in jobs if j.done()] == ["ph/plan"]
    assert "invalid choice: 'bogus'" in (tmp_path / "out" / "logs" / "ph__teacher.log").read_text()
    assert "Not finished yet" in (tmp_path / "out" / "report.md").read_text()


def test_paired_difference_pairs_by_seed_and_fold_with_a_t_interval():
    from scipy import stats

    from ReCoKDLib.workflows.study_report import paired_difference, reference_of

    def run(seed, dice, fold=None):
        return {"seed": seed, "fold": fold, "summary": {"dice": {"mean": dice}}}

    variant = [run(0, 0.80), run(1, 0.74), run(2, 0.90), run(7, 0.10)]  # seed 7 has no no-KD partner
    none = [run(0, 0.78), run(1, 0.75), run(2, 0.85), run(3, 0.99)]
    d = paired_difference(variant, none)
    diffs = [0.02, -0.01, 0.05]
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert d["n"] == 3 and d["wins"] == 2
    assert d["mean"] == pytest.approx(np.mean(diffs))
    assert (d["low"], d["high"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert paired_difference([run(0, 0.8, fold=1)], [run(0, 0.7, fold=0)])["n"] == 0  # other fold: no pair
    variants = {"none": {"method": "none"}, "kd": {"method": "recokd"}, "none-R8": {"method": "none", "width_factor": 8},
                "kd-R8": {"method": "recokd", "width_factor": 8}}
    assert reference_of("kd", variants) == "none" and reference_of("kd-R8", variants) == "none-R8"


def test_a_label_scarce_dataset_gives_every_variant_of_a_seed_the_same_labelled_cases(tmp_path):
    """``labeled``: each student keeps that many labelled case groups, drawn per seed (and fold) and the
    same for every variant of that seed; labels-only students leave the others out, ``unlabeled`` ones
    have the teacher label them; the report compares with labels-only, not with teacher-labelled no-KD."""
    from ReCoKDLib.training.splits import read_case_list
    from ReCoKDLib.workflows.study_report import reference_of

    cfg = tmp_path / "study.json"
    students = {"labels-only": {"method": "none"}, "teacher-labels": {"method": "none", "unlabeled": True},
                "teacher+recokd": {"method": "recokd", "unlabeled": True}}
    cfg.write_text(json.dumps({"datasets": {"a": {"phantom": {"train_cases": 6, "test_cases": 1, "size": 32},
                                                  "labeled": 2}},
                               "seeds": [0, 1], "students": students, "latency": {"enabled": False}}))
    jobs = {j.name: j for j in plan_jobs(load_config(cfg), tmp_path / "out")}

    def option(job, flag):
        argv = job.spec["argv"]
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    files = {}
    for seed in (0, 1):
        lists = {option(jobs[f"a/{v}_s{seed}"], "--labeled-cases")[0] for v in students}
        assert len(lists) == 1  # paired: one list per seed
        files[seed] = read_case_list(lists.pop())
        assert len(files[seed]) == 2
        assert option(jobs[f"a/labels-only_s{seed}"], "--unlabeled-fraction") == ["0"]
        assert option(jobs[f"a/teacher-labels_s{seed}"], "--unlabeled-fraction") == []
    assert files[0] != files[1]  # another seed, another draw
    assert option(jobs["a/teacher"], "--labeled-cases") == []  # the teacher learns from every labelled case
    assert reference_of("teacher-labels", students) == "labels-only" and reference_of("teacher+recokd", students) == "labels-only"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"datasets": {"a": {"phantom": {}, "labeled": 0}}, "students": students}))
    with pytest.raises(ReCoKDError, match="'labeled'"):
        load_config(bad)


def test_label_scarce_report_compares_kd_with_teacher_labels_alone_and_plots_dice_against_labelled_cases(tmp_path):
    """Each KD variant on teacher-labelled scans is paired with the variant that differs only by having no KD
    terms; the label-count figure's points are the runs' means with a t interval."""
    from ReCoKDLib.workflows.study_report import (kd_counterpart_of, kd_over_teacher_labels, labeled_figure,
                                                  labeled_numbers, paired_table)

    students = {"labels-only": {"method": "none"}, "teacher-labels": {"method": "none", "unlabeled": True},
                "teacher+recokd": {"method": "recokd", "unlabeled": True, "lambda_max": 0.5},
                "conf0.9": {"method": "none", "unlabeled": True, "teacher_confidence": 0.9},
                "conf0.9+logit": {"method": "logit", "unlabeled": True, "teacher_confidence": 0.9},
                "recokd": {"method": "recokd"}}
    assert kd_counterpart_of("teacher+recokd", students) == "teacher-labels"
    assert kd_counterpart_of("conf0.9+logit", students) == "conf0.9"
    assert kd_counterpart_of("recokd", students) == "labels-only"
    assert kd_over_teacher_labels("recokd", students) is None  # against labels only: the main table's pair
    assert kd_counterpart_of("teacher-labels", students) is None

    def run(seed, mean, organ):
        return {"seed": seed, "fold": 0, "summary": {"dice": {"mean": mean, "organ": organ}}}

    scores = {"labels-only": [0.60, 0.70, 0.65], "teacher-labels": [0.80, 0.84, 0.82],
              "teacher+recokd": [0.81, 0.83, 0.85], "conf0.9": [0.8, 0.8, 0.8], "conf0.9+logit": [0.7, 0.9, 0.8]}
    found = {f"L{n}": {"teacher": {"teacher": [run(0, 0.9, 0.9)]},
                       "main": {v: [run(s, x - 0.1 * (n == 2), x) for s, x in enumerate(xs)] for v, xs in scores.items()}}
             for n in (2, 4)}
    table, numbers = paired_table(found["L4"], students, reference=kd_over_teacher_labels)
    assert set(numbers) == {"teacher+recokd", "conf0.9+logit"}
    assert numbers["teacher+recokd"]["reference"] == "teacher-labels"
    assert numbers["teacher+recokd"]["dice"]["mean"]["mean"] == pytest.approx(np.mean([0.01, -0.01, 0.03]))
    assert numbers["teacher+recokd"]["dice"]["mean"]["wins"] == 2 and "| teacher+recokd | teacher-labels |" in table

    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps({"datasets": {f"L{n}": {"phantom": {}, "labeled": n} for n in (2, 4)},
                               "students": students, "latency": {"enabled": False}}))
    got = labeled_numbers(load_config(cfg), found)["phantom"]
    assert got["datasets"] == ["L2", "L4"] and got["teacher"] == {2: 0.9, 4: 0.9}
    point = got["variants"]["teacher-labels"][2]
    assert point["mean"] == pytest.approx(0.72) and point["runs"] == 3
    half = 4.302653 * np.std([0.70, 0.74, 0.72], ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert point["high"] - point["mean"] == pytest.approx(half, rel=1e-4)
    assert labeled_figure(labeled_numbers(load_config(cfg), found), tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_a_fast_student_variant_passes_its_spacing_factor_and_pairs_with_its_own_baseline(tmp_path):
    from ReCoKDLib.workflows.study import plan_jobs
    from ReCoKDLib.workflows.study_report import kd_counterpart_of

    students = {"none": {"method": "none"}, "recokd": {"method": "recokd"},
                "none-x2": {"method": "none", "student_spacing_factor": 2},
                "recokd-x2": {"method": "recokd", "student_spacing_factor": 2}}
    assert kd_counterpart_of("recokd-x2", students) == "none-x2" and kd_counterpart_of("recokd", students) == "none"
    cfg = tmp_path / "study.json"
    cfg.write_text(json.dumps({"datasets": {"P": {"phantom": {}}}, "students": students, "seeds": [0],
                               "latency": {"enabled": False}}))
    jobs = {j.name: j for j in plan_jobs(load_config(cfg), tmp_path / "out")}
    text = json.dumps(jobs["P/recokd-x2_s0"].spec)
    assert '"--student-spacing-factor", "2"' in text and "--student-spacing-factor" not in json.dumps(jobs["P/recokd_s0"].spec)
