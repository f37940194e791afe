"""``torchrun --nproc_per_node 2`` (gloo, CPU) runs a short distillation, its rank-0 checkpoint loads, and a
DDP run stopped after an epoch resumes to the same weights as an uninterrupted DDP run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo is unavailable")

PLANNER = ["--patch-budget", "32768", "--max-levels", "4", "--base-filters", "8", "--max-filters", "32"]
SMALL = ["--epochs", "2", "--iters-per-epoch", "2", "--patch-size", "16", "32", "32", "--threads", "1",
         "--no-progress", "--workers", "0"]


def _torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "ReCoKDLib.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_torchrun_distillation_and_resume(tmp_path):
    data = save_dataset_nnunet(generate_dataset(4, shape=(32, 32, 32)), tmp_path / "ds")
    cache = tmp_path / "cache"
    teacher = tmp_path / "teacher"
    assert main(["train", str(data), "-o", str(teacher), "--cache", str(cache), *PLANNER, *SMALL]) == 0
    distill = ["distill", str(data), "--teacher", str(teacher), "--cache", str(cache), "--method", "recokd",
               "--deterministic", *SMALL]

    full = tmp_path / "ddp_full"
    _torchrun(distill + ["-o", str(full)])
    ckpt = torch.load(full / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["sampler"]["world_size"] == 2
    # --batch-size is the global batch: the plan's 2 patches per step, one per process
    import json

    assert json.loads((full / "run.json").read_text())["batch_per_rank"] == [1, 1]
    assert (full / "model_final.safetensors").is_file() and (full / "run.json").is_file()
    assert len((full / "log.csv").read_text().strip().splitlines()) == 3  # one writer: header + 2 epochs

    parts = tmp_path / "ddp_resumed"
    _torchrun(distill + ["-o", str(parts), "--stop-after-epochs", "1"])
    assert torch.load(parts / "checkpoint_latest.pt", weights_only=True)["step"] == 2
    _torchrun(distill + ["-o", str(parts), "--resume"])
    resumed = torch.load(parts / "checkpoint_latest.pt", weights_only=True)
    assert resumed["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(ckpt[key][k], resumed[key][k]) for k in ckpt[key]), key


def test_whole_case_validation_is_spread_over_the_processes_and_scores_what_one_would(tmp_path):
    """Under torchrun each process scores its share of the validation cases and the sums are gathered: the
    logged Dice is the one a single process computes on every case with the same weights."""
    import csv

    import numpy as np

    from ReCoKDLib.data.preprocessing import load_preprocessed
    from ReCoKDLib.deployment.bundle import open_model
    from ReCoKDLib.evaluation.metrics import dice_per_class
    from ReCoKDLib.inference.sliding_window import predict_labels
    from ReCoKDLib.models.weights import load_weights

    data = save_dataset_nnunet(generate_dataset(5, shape=(32, 32, 32), seed=4), tmp_path / "ds")
    ids = sorted(p.name.split("_0000")[0] for p in (tmp_path / "ds" / "imagesTr").glob("*_0000.nii.gz"))
    (tmp_path / "val.txt").write_text("\n".join(ids[:3]) + "\n")  # 3 cases: 2 on rank 0, 1 on rank 1
    cache, run = tmp_path / "cache", tmp_path / "run"
    _torchrun(["train", str(data), "-o", str(run), "--cache", str(cache), "--val-cases", str(tmp_path / "val.txt"),
               *PLANNER, *SMALL])
    rows = list(csv.DictReader((run / "log.csv").open()))
    logged = float(rows[-1]["dice_mean"])
    model = open_model(run)
    network = load_weights(model.build_network(), run / "model_final.safetensors").eval()  # the last epoch's EMA
    scores = [dice_per_class(predict_labels(network, torch.from_numpy(np.array(c.image)), model.plans.patch_size),
                             c.label, model.plans.num_classes)
              for c in (load_preprocessed(cache, model.plans, i) for i in ids[:3])]
    expected = float(np.nanmean(np.nanmean(np.stack(scores), axis=0)))
    assert abs(logged - expected) < 1e-6, (logged, expected, scores)


def test_the_global_batch_is_split_over_the_processes():
    from ReCoKDLib.errors import ReCoKDError
    from ReCoKDLib.training.loop import rank_batch_size

    assert [rank_batch_size(5, 2, r) for r in range(2)] == [3, 2]  # as evenly as it goes, the first ranks one more
    assert [rank_batch_size(4, 4, r) for r in range(4)] == [1, 1, 1, 1]
    assert rank_batch_size(2, 2, 1, per_process=True) == 2 and rank_batch_size(3, 1, 0) == 3
    with pytest.raises(ReCoKDError, match="--batch-size 1 is the global batch, split over 2 processes"):
        rank_batch_size(1, 2, 0)
