"""Reliability of training runs ("Reliability, round two"): plans keyed by their planner options in a
shared cache, untrained or non-finite runs refused, datasets without foreground refused, and patches
too large for the machine's memory refused before anything is allocated."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet
from ReCoKDLib.errors import ReCoKDError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--iters-per-epoch", "1", "--patch-size", "16", "32", "32", "--workers", "0",
        "--threads", "1", "--no-progress", "--val-max-cases", "1"]
SMALL_PLAN = ["--patch-budget", "32768", "--max-filters", "32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three 32³ phantom cases in the nnU-Net layout."""
    return save_dataset_nnunet(generate_dataset(3, seed=5, shape=(32, 32, 32)), tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory) -> Path:
    """A finished one-iteration teacher run on ``dataset`` (8-32 filters)."""
    base = tmp_path_factory.mktemp("teacher")
    assert main(["train", str(dataset), "-o", str(base / "teacher"), "--cache", str(base / "cache"), *TINY, *SMALL_PLAN,
                 "--base-filters", "8"]) == 0
    return base / "teacher"


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (and the folders, by name)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# 1. a shared --cache with different planner options


def test_planner_options_key_the_plan_so_a_second_planning_cannot_swap_the_network(dataset, tmp_path, monkeypatch):
    """Run B (--base-filters 16) plans into the cache while run A (--base-filters 8) is between writing its
    plan and reading it back (as when both start together): each still gets its own network."""
    import ReCoKDLib.workflows.runs as runs
    from ReCoKDLib.data.datasets import open_dataset

    dataset = open_dataset(dataset)
    cache = tmp_path / "cache"
    a = runs.PlannerOptions(patch_budget=32768, base_filters=8, max_filters=32)
    b = runs.PlannerOptions(patch_budget=32768, base_filters=16, max_filters=32)
    real = runs.preprocess_dataset
    other = {}

    def b_plans_meanwhile(*args, **kwargs):
        if not other:  # A's first preprocessing: the other process plans now (once)
            other["started"] = True
            other["b"] = runs.prepare_plans(dataset, cache, b, progress=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "preprocess_dataset", b_plans_meanwhile)
    _, network_a, root, cases = runs.prepare_plans(dataset, cache, a, progress=False)
    network_b = other["b"][1]
    assert network_a.filters[0] == 8 and network_b.filters[0] == 16
    # each plan stays on disk for the next run with the same options, which reuses it
    monkeypatch.setattr(runs, "preprocess_dataset", real)
    assert runs.prepare_plans(dataset, cache, a, progress=False)[1] == network_a
    assert runs.prepare_plans(dataset, cache, b, progress=False)[1] == network_b
    monkeypatch.setattr(runs, "_is_main", lambda: False)  # a torchrun rank > 0 reads what rank 0 planned
    assert runs.prepare_plans(dataset, cache, a, progress=False)[1] == network_a
    assert runs.prepare_plans(dataset, cache, b, progress=False)[1] == network_b
    # both options preprocess alike: one folder of cases
    assert other["b"][3] == cases and sorted(p.name for p in cases.iterdir() if p.suffix == ".npy") == \
        sorted(f"{r.case_id}_{a}.npy" for r in dataset.training for a in ("image", "label"))


def test_the_caches_own_plan_stays_where_recokd_plan_and_old_caches_put_it(dataset, tmp_path):
    """``recokd plan`` writes <cache>/plans.json (with any options); a train without planner options uses
    it, one with those very options too; one with other options plans beside it."""
    import ReCoKDLib.workflows.runs as runs
    from ReCoKDLib.data.datasets import open_dataset

    cache = tmp_path / "cache"
    assert main(["plan", str(dataset), "--cache", str(cache), *SMALL_PLAN, "--base-filters", "8", "--no-progress"]) == 0
    assert json.loads((cache / "network.json").read_text())["filters"][0] == 8
    same = runs.PlannerOptions(patch_budget=32768, base_filters=8, max_filters=32)
    assert runs.plans_folder(cache, runs.PlannerOptions()) == cache == runs.plans_folder(cache, same)
    info = open_dataset(dataset)
    assert runs.prepare_plans(info, cache, runs.PlannerOptions(), progress=False)[1].filters[0] == 8
    wider = runs.PlannerOptions(patch_budget=32768, base_filters=16, max_filters=32)
    assert runs.prepare_plans(info, cache, wider, progress=False)[1].filters[0] == 16
    assert runs.plans_folder(cache, wider) == cache / f"plans_{wider.key()}"
    assert json.loads((cache / "network.json").read_text())["filters"][0] == 8  # the cache's own plan is kept


def test_a_training_with_options_never_replans_the_caches_own_plan(dataset, tmp_path, monkeypatch):
    """The cache's plan matched the options when looked at, but was re-planned (recokd plan, other options)
    before the lock was taken: the training plans beside it instead of over it."""
    import ReCoKDLib.workflows.runs as runs
    from ReCoKDLib.data.datasets import open_dataset

    cache = tmp_path / "cache"
    assert main(["plan", str(dataset), "--cache", str(cache), *SMALL_PLAN, "--base-filters", "16", "--no-progress"]) == 0
    options = runs.PlannerOptions(patch_budget=32768, base_filters=8, max_filters=32)
    monkeypatch.setattr(runs, "plans_folder", lambda root, planner, replan=False: root)  # as when it looked
    assert runs.prepare_plans(open_dataset(dataset), cache, options, progress=False)[1].filters[0] == 8
    assert json.loads((cache / "network.json").read_text())["filters"][0] == 16
    assert (cache / f"plans_{options.key()}" / "plans.json").is_file()


def test_run_json_records_every_planner_option_and_resume_compares_them(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    common = [str(dataset), "-o", str(run), "--cache", str(tmp_path / "cache"), *TINY]
    assert main(["train", *common, *SMALL_PLAN, "--base-filters", "8", "--max-levels", "4"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert {k: info["planner"][k] for k in ("patch_budget_voxels", "max_levels", "base_filters", "max_filters")} == \
        {"patch_budget_voxels": 32768, "max_levels": 4, "base_filters": 8, "max_filters": 32}
    capsys.readouterr()
    assert main(["train", *common, "--resume", "--max-levels", "5"]) == 2
    assert "--max-levels 5 (run: 4)" in _error_line(capsys)


_PLAN_IN_A_PROCESS = """
import json, sys
from ReCoKDLib.data.datasets import open_dataset
from ReCoKDLib.workflows.runs import PlannerOptions, prepare_plans
import time
import ReCoKDLib.workflows.runs as runs
real_plan, real_preprocess = runs.plan_experiment, runs.preprocess_dataset
def slow_plan(*args, **kwargs):  # widen the windows in which the processes overlap
    time.sleep(1.0)
    return real_plan(*args, **kwargs)
def slow_preprocess(*args, **kwargs):  # between writing the plan and reading it back, in the old code
    time.sleep(3.0)
    return real_preprocess(*args, **kwargs)
runs.plan_experiment, runs.preprocess_dataset = slow_plan, slow_preprocess
plans, network, root, cases = prepare_plans(open_dataset(sys.argv[1]), sys.argv[2],
                                            PlannerOptions(32768, None, int(sys.argv[3]), 32), progress=False)
print(json.dumps({"filters": list(network.filters), "cases": str(cases)}))
"""


def test_processes_planning_one_cache_at_once_each_get_their_own_network(dataset, tmp_path):
    """Three processes at once on one cache: two with --base-filters 8 (one plans, the other waits and
    reuses), one with 16; all preprocess into the same case folder (one at a time)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _PLAN_IN_A_PROCESS, str(dataset), str(cache), str(base)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for base in (8, 16, 8)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["filters"][0] for r in results] == [8, 16, 8]
    assert len({r["cases"] for r in results}) == 1
    from ReCoKDLib.data.datasets import open_dataset
    from ReCoKDLib.data.preprocessing import load_preprocessed
    from ReCoKDLib.data.planning import Plans

    plans = Plans.load(Path(results[0]["cases"]) / "plans.json")
    for record in open_dataset(dataset).training:
        assert load_preprocessed(cache, plans, record.case_id).label is not None


def test_a_second_preprocessing_of_one_plan_waits_and_reuses_the_cases(dataset, tmp_path, monkeypatch, capsys):
    import ReCoKDLib.data.preprocessing as prep
    from ReCoKDLib.data.datasets import open_dataset
    from ReCoKDLib.data.fingerprint import compute_fingerprint
    from ReCoKDLib.data.planning import plan_experiment

    info = open_dataset(dataset)
    plans, _ = plan_experiment(compute_fingerprint(info, progress=False), patch_budget_voxels=32768, base_filters=8,
                               max_filters=32)
    real, done = prep.preprocess_case, []

    def slow_case(case, p):
        time.sleep(0.3)
        done.append(case.case_id)
        return real(case, p)

    monkeypatch.setattr(prep, "preprocess_case", slow_case)
    first = threading.Thread(target=prep.preprocess_dataset, args=(info, plans, tmp_path / "cache"),
                             kwargs={"progress": False})
    first.start()
    while not done:  # the first one holds the lock and is at work
        time.sleep(0.05)
    folder = prep.preprocess_dataset(info, plans, tmp_path / "cache", progress=False)
    first.join()
    assert "waiting for the preprocessing into" in capsys.readouterr().err
    assert sorted(done) == sorted(r.case_id for r in info.training)  # each case once: the second one reused them
    assert all(prep.load_preprocessed(tmp_path / "cache", plans, r.case_id).label is not None for r in info.training)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{r.case_id}_{a}.npy" for r in info.training for a in ("image", "label")]
        + [f"{r.case_id}.json" for r in info.training] + ["plans.json"])


def test_a_waiting_lock_waits_for_its_holder_and_survives_a_failed_one(tmp_path):
    from ReCoKDLib.utils.locks import waiting_lock

    lock = tmp_path / "cache" / ".plans.lock"
    lock.parent.mkdir()
    order, told = [], []
    held = threading.Event()

    def first():
        try:
            with waiting_lock(lock, "the planning"):
                held.set()
                time.sleep(0.5)
                order.append("first done")
                raise RuntimeError("planning failed")
        except RuntimeError:
            pass

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    with waiting_lock(lock, "the planning", on_wait=told.append):
        order.append("second")
        assert lock.is_file()  # the failed holder's file is gone; this one locked a new one
    thread.join()
    assert order == ["first done", "second"]
    assert len(told) == 1 and told[0].startswith("waiting for the planning (pid ")


# --------------------------------------------------------------------------------------------------
# 2. untrained or non-finite runs


BAD_TRAINING = [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--iters-per-epoch", "0"], "--iters-per-epoch must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "-0.01"], "--lr must be > 0, got -0.01"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--patch-size", "0", "32", "32"], "--patch-size must be 3 whole numbers >= 1"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--val-every", "-1"], "--val-every must be >= 0, got -1"),
    (["--val-max-cases", "-2"], "--val-max-cases must be >= 0, got -2"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    (["--ema-decay", "1.5"], "--ema-decay must be between 0 and 1, got 1.5"),
    (["--stop-after-epochs", "0"], "--stop-after-epochs must be >= 1, got 0"),
]
BAD_TEACHER = [
    (["--base-filters", "0"], "--base-filters must be >= 1, got 0"),
    (["--max-levels", "2"], "--max-levels must be >= 3, got 2"),
    (["--patch-budget", "0"], "--patch-budget must be >= 1, got 0"),
    (["--base-filters", "64", "--max-filters", "32"], "--base-filters 64 exceeds --max-filters 32"),
]
BAD_STUDENT = [
    (["--lambda-max", "nan"], "--lambda-max must be a finite number >= 0, got nan"),
    (["--lambda-max", "-1"], "--lambda-max must be >= 0, got -1.0"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--warmup-fraction", "2"], "--warmup-fraction must be between 0 and 1, got 2.0"),
    (["--width-factor", "nan"], "--width-factor must be a finite number >= 1, got nan"),
    (["--adapter-lr-scale", "inf"], "--adapter-lr-scale must be a finite number > 0, got inf"),
]
BAD_ROWS = ([("train", *row) for row in BAD_TRAINING + BAD_TEACHER] + [("distill", *row) for row in BAD_TRAINING[:3]]
            + [("distill", *row) for row in BAD_STUDENT])


@pytest.mark.parametrize("command, options, fragment", BAD_ROWS, ids=[f"{c} {' '.join(o)}" for c, o, _ in BAD_ROWS])
def test_bad_numeric_options_are_refused_before_anything_is_written(command, options, fragment, dataset, tmp_path,
                                                                    capsys, request):
    # a tiny run otherwise, so that a run the old code let through ends quickly (the bad option comes last, and wins)
    if command == "distill":
        own = ["--teacher", str(request.getfixturevalue("teacher"))]
    else:
        own = [*SMALL_PLAN, "--base-filters", "8"]
    before = _files(tmp_path)
    code = main([command, str(dataset), "-o", str(tmp_path / "out" / "run"), "--cache", str(tmp_path / "cache"),
                 *TINY, *own, *options])
    assert code == 2
    assert fragment in _error_line(capsys)
    assert _files(tmp_path) == before  # no run folder, no cache


@pytest.mark.parametrize("options, fragment", [
    (["--lambda-max", "nan"], "--lambda-max must be a finite number >= 0, got nan"),
    (["--width-factor", "nan"], "--width-factor must be a finite number >= 1, got nan"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_bad_demo_options_are_refused_before_anything_is_written(options, fragment, tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "-o", str(tmp_path / "demo"), *options]) == 2
    assert fragment in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_plan_refuses_bad_options_before_anything_is_written(dataset, tmp_path, capsys):
    for options, fragment in ((["--workers", "-1"], "--workers must be >= 0, got -1"),
                              (["--base-filters", "-8"], "--base-filters must be >= 1, got -8")):
        assert main(["plan", str(dataset), "--cache", str(tmp_path / "cache"), "--no-progress", *options]) == 2
        assert fragment in _error_line(capsys)
        assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_the_same_options():
    from ReCoKDLib.training.loop import RunConfig
    from ReCoKDLib.workflows.runs import RunSpec

    with pytest.raises(ReCoKDError, match="--epochs must be >= 1, got 0"):
        RunConfig(epochs=0)
    with pytest.raises(ReCoKDError, match="--lr must be a finite number > 0, got nan"):
        RunConfig(lr=math.nan)
    with pytest.raises(ReCoKDError, match="--iters-per-epoch must be >= 1, got 0"):
        RunSpec(role="teacher", dataset="ds", output="never-made", training={"iters_per_epoch": 0})
    with pytest.raises(ReCoKDError, match="--temperature must be > 0"):
        RunSpec(role="student", dataset="ds", output="never-made", teacher="t", temperature=-1.0)
    assert not Path("never-made").exists()
    assert RunConfig().epochs >= 1  # the defaults pass their own checks


def _nan_network():
    from ReCoKDLib.models import build_unet, isotropic_spec

    net = build_unet(isotropic_spec(1, 2, num_levels=3, filters=[8, 16, 32]))
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = math.nan
    return net


def test_weights_with_nan_are_neither_written_nor_read(tmp_path):
    from ReCoKDLib.models import build_unet, isotropic_spec, load_weights, save_weights
    from ReCoKDLib.models.weights import unique_tensors

    net = _nan_network()
    bad = next(name for name, t in unique_tensors(net).items() if t.is_floating_point() and not torch.isfinite(t).all())
    with pytest.raises(ReCoKDError, match=f"refusing to write .*model.safetensors: tensor {bad} holds NaN/Inf"):
        save_weights(net, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []
    save_file(unique_tensors(net), str(tmp_path / "diverged.safetensors"))  # as an older ReCoKD could write it
    fresh = build_unet(isotropic_spec(1, 2, num_levels=3, filters=[8, 16, 32]))
    with pytest.raises(ReCoKDError) as info:
        load_weights(fresh, tmp_path / "diverged.safetensors")
    message = str(info.value)
    assert "diverged.safetensors" in message and bad in message and "\n" not in message
    assert message.endswith("the training diverged; resume from an earlier checkpoint or lower --lr")


def test_a_bundle_with_nan_weights_is_refused_on_load(tmp_path):
    from bundle_helpers import tiny_network, tiny_plans
    from ReCoKDLib.deployment.bundle import bundle_from_network, load_bundle
    from ReCoKDLib.models.weights import unique_tensors

    plans = tiny_plans()
    net = tiny_network(plans)
    bundle = bundle_from_network(net, plans, "diverged")
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = math.inf
    save_file(unique_tensors(net), str(tmp_path / "w.safetensors"))
    bundle.weights = (tmp_path / "w.safetensors").read_bytes()
    path = bundle.save(tmp_path / "diverged.recokd")
    with pytest.raises(ReCoKDError, match="diverged.recokd weights.safetensors: tensor .* holds NaN/Inf values; "
                                          "the training diverged"):
        load_bundle(path)


def test_a_run_that_never_finished_an_epoch_is_not_exported(tmp_path, capsys):
    from bundle_helpers import make_run

    run = make_run(tmp_path / "run", role="teacher")
    info = json.loads((run / "run.json").read_text())
    for config, completed in (({"epochs": 0, "iters_per_epoch": 250}, None), ({"epochs": 5, "iters_per_epoch": 2}, 0)):
        (run / "run.json").write_text(json.dumps({**info, "config": config, "epochs_completed": completed}))
        assert main(["export", str(run), "-o", str(tmp_path / "model.recokd")]) == 2
        assert "never finished a training epoch" in _error_line(capsys)
        assert not (tmp_path / "model.recokd").exists()


def test_an_untrained_cli_run_cannot_be_made_or_exported(dataset, tmp_path, capsys):
    """The issue's path end to end: `recokd train --epochs 0` used to exit 0 and export; now nothing is made."""
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "--cache", str(tmp_path / "cache"), *TINY, *SMALL_PLAN,
                 "--base-filters", "8", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in _error_line(capsys)
    assert not run.exists()


def _train_until_it_diverges(dataset, tmp_path, monkeypatch, spoil):
    """A 2 × 2-iteration teacher; ``spoil(trainer)`` runs after its fourth (last) iteration's step."""
    from ReCoKDLib.training.loop import EpochTrainer

    real = EpochTrainer.train_step

    def step(self, images, labels, checked=None):
        out = real(self, images, labels, checked)
        if self.step == 3:  # the fourth iteration (step counts from 0), the last of epoch 2
            spoil(self)
        return out

    monkeypatch.setattr(EpochTrainer, "train_step", step)
    run = tmp_path / "run"
    code = main(["train", str(dataset), "-o", str(run), "--cache", str(tmp_path / "cache"), *TINY, *SMALL_PLAN,
                 "--base-filters", "8", "--epochs", "2", "--iters-per-epoch", "2"])
    return code, run


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_a_run_that_diverges_stops_in_one_line_and_keeps_its_last_good_checkpoint(what, dataset, tmp_path, monkeypatch,
                                                                                   capsys):
    from ReCoKDLib.training.loop import SegTrainModule

    if what == "loss":  # the loss of the fourth iteration is NaN
        real_forward = SegTrainModule.forward
        calls = []

        def forward(self, images, labels, progress, checked=None):
            loss, terms = real_forward(self, images, labels, progress, checked)
            calls.append(1)
            return (loss * math.nan, terms) if len(calls) == 4 else (loss, terms)

        monkeypatch.setattr(SegTrainModule, "forward", forward)
        spoil = lambda trainer: None  # noqa: E731
    else:  # the last iteration's update leaves NaN in the weights (its loss was finite)
        def spoil(trainer):
            with torch.no_grad():
                next(trainer.network.parameters()).fill_(math.nan)
    code, run = _train_until_it_diverges(dataset, tmp_path, monkeypatch, spoil)
    assert code == 2
    line = _error_line(capsys)
    assert "the training diverged and was stopped, its last good checkpoint (iteration 2) stays in" in line, line
    assert ("loss became nan at iteration 4 (epoch 2)" if what == "loss" else "weights became NaN/Inf") in line
    checkpoint = torch.load(run / "checkpoint_latest.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert not (run / "model_final.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["epochs_completed"] == 1


@pytest.mark.parametrize("where", ["training", "validation"])
def test_running_out_of_memory_is_one_line_naming_a_smaller_setting_and_the_checkpoint(where, dataset, tmp_path,
                                                                                      monkeypatch, capsys):
    """An injected out-of-memory error (CUDA's in a training step; the CPU allocator's in validation): one
    line with the patch, the batch, a smaller batch, and the checkpoint that holds the epoch trained so far
    (written before validation); the run then resumes to the end."""
    from ReCoKDLib.training.loop import EpochTrainer

    real_step, real_validate = EpochTrainer.train_step, EpochTrainer.validate

    def step(self, images, labels, checked=None):
        if where == "training" and self.step == 2:  # the first iteration of epoch 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, images, labels, checked)

    def validate(self):
        if where == "validation" and self.step == 4:  # the end of epoch 2
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")
        return real_validate(self)

    monkeypatch.setattr(EpochTrainer, "train_step", step)
    monkeypatch.setattr(EpochTrainer, "validate", validate)
    run = tmp_path / "run"
    command = ["train", str(dataset), "-o", str(run), "--cache", str(tmp_path / "cache"), *TINY, *SMALL_PLAN,
               "--base-filters", "8", "--epochs", "3", "--iters-per-epoch", "2", "--batch-size", "2"]
    assert main(command) == 2
    line = _error_line(capsys)
    during, saved = ("training at iteration 3", 2) if where == "training" else ("validating", 4)
    assert f"ran out of memory while {during}" in line and "(patch [16, 32, 32], batch 2)" in line, line
    assert f"the work up to iteration {saved} is in {run / 'checkpoint_latest.pt'}" in line, line
    assert "--batch-size 1 (half the activations)" in line, line
    assert torch.load(run / "checkpoint_latest.pt", weights_only=True)["step"] == saved
    monkeypatch.undo()
    assert main([*command, "--resume"]) == 0
    assert (run / "model_final.safetensors").is_file()
    # every epoch validated and logged once, the interrupted one included
    history = torch.load(run / "checkpoint_latest.pt", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3] and all("dice_mean" in row for row in history)


# --------------------------------------------------------------------------------------------------
# 3. datasets whose labels hold only background


def _dataset_with_empty_labels(folder: Path, empty: int) -> Path:
    cases = generate_dataset(3, seed=9, shape=(32, 32, 32))
    for case in cases[:empty]:
        case.label[...] = 0
    return save_dataset_nnunet(cases, folder)


def test_plan_refuses_a_dataset_whose_every_label_is_background(tmp_path, capsys):
    data = _dataset_with_empty_labels(tmp_path / "empty", 3)
    before = _files(tmp_path)
    assert main(["plan", str(data), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "dataset 'Dataset999_Phantom'" in line and "every training label map holds only background" in line
    assert _files(tmp_path) == before  # no cache folder


def test_plan_accepts_a_dataset_where_only_some_labels_are_background_and_says_so(tmp_path, capsys):
    data = _dataset_with_empty_labels(tmp_path / "some", 1)
    assert main(["plan", str(data), "--cache", str(tmp_path / "cache"), *SMALL_PLAN, "--base-filters", "8",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset 'Dataset999_Phantom': 1 of 3 training label maps hold only background" in err


# --------------------------------------------------------------------------------------------------
# 4. patches larger than memory allows


def test_the_training_memory_estimate_counts_levels_batch_teacher_and_precision():
    from ReCoKDLib.models import isotropic_spec
    from ReCoKDLib.training.memory import FORWARD_FACTOR, TRAIN_FACTOR, estimate_training_bytes

    spec = isotropic_spec(1, 2, num_levels=3, filters=[8, 16, 32])
    units = 8 * 16**3 + 16 * 8**3 + 32 * 4**3  # channels × voxels at full, half and quarter resolution
    assert estimate_training_bytes(spec, (16, 16, 16), 2) == 2 * 4 * units * TRAIN_FACTOR
    assert estimate_training_bytes(spec, (16, 16, 16), 2, half_precision=True) == 2 * 2 * units * TRAIN_FACTOR
    teacher = isotropic_spec(1, 2, num_levels=3, filters=[16, 32, 64])
    assert estimate_training_bytes(spec, (16, 16, 16), 1, teacher=teacher) == \
        4 * (units * TRAIN_FACTOR + 2 * units * FORWARD_FACTOR)
    assert estimate_training_bytes(spec, (32, 32, 32), 2) == 8 * estimate_training_bytes(spec, (16, 16, 16), 2)
    # nnU-Net's 3D full-resolution default (128³, 32-320 filters, batch 2) needs several GiB, as it does on a GPU
    big = isotropic_spec(1, 2, num_levels=6, filters=[32, 64, 128, 256, 320, 320])
    assert 4 * 1024**3 < estimate_training_bytes(big, (128, 128, 128), 2) < 16 * 1024**3


def test_the_memory_check_refuses_only_what_does_not_fit_and_can_be_skipped(monkeypatch):
    import ReCoKDLib.training.memory as memory
    from ReCoKDLib.models import isotropic_spec

    spec = isotropic_spec(1, 2, num_levels=3, filters=[8, 16, 32])
    need = memory.estimate_training_bytes(spec, (16, 16, 16), 2)
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    memory.check_training_memory(spec, (16, 16, 16), 2, cpu)  # exactly enough: accepted
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(ReCoKDError, match=r"patch \[16, 16, 16\] with batch 2 needs about .* GiB .* GiB free; use a "
                                          r"smaller --patch-size or --batch-size .*RECOKD_SKIP_MEMORY_CHECK=1"):
        memory.check_training_memory(spec, (16, 16, 16), 2, cpu)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_training_memory(spec, (16, 16, 16), 2, cpu)
    monkeypatch.delenv(memory.SKIP_ENV)
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # unknown: not checked
    memory.check_training_memory(spec, (16, 16, 16), 2, cpu)
    assert memory.available_bytes(cpu) is None or memory.available_bytes(cpu) > 0


def test_train_refuses_a_patch_too_large_for_the_memory_before_the_run_folder(dataset, tmp_path, monkeypatch, capsys):
    import ReCoKDLib.training.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024**2)  # a machine with 1 MiB free
    run = tmp_path / "run"
    assert main(["train", str(dataset), "-o", str(run), "--cache", str(tmp_path / "cache"), *TINY, *SMALL_PLAN,
                 "--base-filters", "8"]) == 2
    line = _error_line(capsys)
    assert "training the teacher on patch [16, 32, 32] with batch 2 needs about" in line and "0.0 GiB free" in line
    assert not run.exists()


def test_fp16_overflow_skips_the_step_and_the_run_goes_on(dataset, tmp_path, monkeypatch, capsys):
    """With fp16 loss scaling (CUDA), a step whose loss overflows is skipped, not fatal; log.csv says how many;
    only a long run of them counts as divergence. Simulated on the CPU: the trainer set to skip, one NaN loss."""
    import csv

    from ReCoKDLib.training.loop import EpochTrainer, SegTrainModule, resolve_amp_dtype

    assert resolve_amp_dtype("fp16", torch.device("cpu")) == torch.float16
    assert resolve_amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_amp_dtype("auto", torch.device("cpu")) == torch.float16  # bf16 only on a GPU that has it
    for capability, expected in (((7, 0), torch.float16), ((8, 0), torch.bfloat16)):  # a V100 emulates bf16
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert resolve_amp_dtype("auto", torch.device("cuda")) == expected
    monkeypatch.undo()
    real_init, real_forward, calls = EpochTrainer.__init__, SegTrainModule.forward, []

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.skip_nonfinite = True  # as with --amp-dtype fp16 on CUDA

    def forward(self, images, labels, progress, checked=None):
        loss, terms = real_forward(self, images, labels, progress, checked)
        calls.append(1)
        return (loss * math.nan, terms) if len(calls) in bad else (loss, terms)

    monkeypatch.setattr(EpochTrainer, "__init__", init)
    monkeypatch.setattr(SegTrainModule, "forward", forward)
    bad = {2}
    run = tmp_path / "run"
    command = ["train", str(dataset), "-o", str(run), "--cache", str(tmp_path / "cache"), *TINY, *SMALL_PLAN,
               "--base-filters", "8", "--epochs", "2", "--iters-per-epoch", "2"]
    assert main(command) == 0, capsys.readouterr().err
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [float(r["loss_skipped"]) for r in rows] == [0.5, 0.0]  # one of epoch 1's two steps
    monkeypatch.setattr(EpochTrainer, "MAX_CONSECUTIVE_SKIPS", 1)
    bad, calls[:] = {1, 2}, []
    assert main([*command[:3], str(tmp_path / "run2"), *command[4:]]) == 2
    assert "the loss became nan at iteration 2" in _error_line(capsys)
