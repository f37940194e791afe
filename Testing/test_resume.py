"""A training run killed with SIGKILL mid-epoch resumes and ends bit-for-bit where an uninterrupted run
with the same seed ends (CPU, deterministic mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ReCoKDLib.cli import main
from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

PLANNER = ["--patch-budget", "32768", "--max-levels", "4", "--base-filters", "8", "--max-filters", "32"]
ITERS_PER_EPOCH = 4


def _args(data, cache, out, workers):
    return ["train", str(data), "-o", str(out), "--cache", str(cache), "--epochs", "3",
            "--iters-per-epoch", str(ITERS_PER_EPOCH), "--patch-size", "16", "32", "32", "--checkpoint-every", "2",
            "--deterministic", "--threads", "1", "--workers", str(workers), "--no-progress", "--seed", "5",
            *PLANNER]


# The child kills itself with SIGKILL right after writing the checkpoint of a given step, so where it dies
# does not depend on how fast the machine is (polling from outside raced with the epoch-end checkpoint).
_KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from ReCoKDLib.cli import main
from ReCoKDLib.training.loop import EpochTrainer
kill_at = int(sys.argv[1])
save = EpochTrainer.save_checkpoint
def save_then_die(self, which="latest"):
    save(self, which)
    if self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
EpochTrainer.save_checkpoint = save_then_die
sys.exit(main(sys.argv[2:]))
"""


def _step(path):
    try:
        return torch.load(path, weights_only=True)["step"]
    except Exception:  # noqa: BLE001 - not written yet
        return -1


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [1])
def test_killed_run_resumes_bit_for_bit(tmp_path, workers):
    data = save_dataset_nnunet(generate_dataset(4, shape=(32, 32, 32)), tmp_path / "ds")
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    assert main(_args(data, cache, reference, workers)) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, str(ITERS_PER_EPOCH + 2),
                           *_args(data, cache, killed, workers)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = killed / "checkpoint_latest.pt"
    stopped_at = _step(ckpt)
    assert ITERS_PER_EPOCH < stopped_at < 3 * ITERS_PER_EPOCH and stopped_at % ITERS_PER_EPOCH
    assert not (killed / "model_final.safetensors").exists()

    assert main(_args(data, cache, killed, workers) + ["--resume"]) == 0
    a = torch.load(reference / "checkpoint_latest.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == 3 * ITERS_PER_EPOCH
    for key in ("model", "ema"):
        assert _equal_states(a[key], b[key]), key
    assert _equal_states(a["trainable"]["network"], b["trainable"]["network"])
    assert [r["loss_total"] for r in a["history"]] == [r["loss_total"] for r in b["history"]]
    assert _equal_states(load_file(reference / "model_final.safetensors"), load_file(killed / "model_final.safetensors"))
    assert len((killed / "log.csv").read_text().strip().splitlines()) == 4
