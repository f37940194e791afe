"""A real nnU-Net v2 results folder, made for the tests (and usable by hand: ``python Testing/nnunet_folder.py DIR``).

1. The demo phantom is written in nnU-Net's raw layout and nnU-Net's own fingerprinting and experiment
   planner (``nnunetv2.experiment_planning``) make ``nnUNetPlans.json`` (a subprocess: nnU-Net reads
   its folders from the environment when it is imported).
2. The 3d_fullres network is built by nnU-Net's own ``get_network_from_plans`` from those plans, narrowed
   (features / 4) and with a smaller patch so that CPU tests stay short — an edit users make to plans
   too — and trained for a few dozen iterations so its predictions mean something.
3. ``fold_0/checkpoint_final.pth`` is saved in nnU-Net v2's exact checkpoint format: network weights,
   optimizer state, the training log with numpy scalars, ``init_args``, ``trainer_name`` and the mirroring
   axes, exactly the keys ``nnUNetTrainer.save_checkpoint`` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

DATASET_ID = 997
DATASET = f"Dataset{DATASET_ID}_ReCoKDPhantom"
MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def nnunet_env(root: Path) -> dict[str, str]:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1"}


def _plan(root: Path, cases: int, size: int) -> tuple[dict, dict]:
    from ReCoKDLib.data.phantom import generate_dataset, save_dataset_nnunet

    raw = root / "raw" / DATASET
    save_dataset_nnunet(generate_dataset(cases, seed=3, shape=(size, size, size)), raw, DATASET)
    code = ("from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments\n"
            f"extract_fingerprints([{DATASET_ID}], num_processes=1, check_dataset_integrity=True, verbose=False, "
            "show_progress_bar=False)\n"
            f"plan_experiments([{DATASET_ID}])\n")
    done = subprocess.run([sys.executable, "-c", code], env=nnunet_env(root), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nnU-Net planning failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    plans = json.loads((root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    return plans, dataset_json


def _narrow(plans: dict, patch: tuple[int, int, int] | None) -> dict:
    conf = plans["configurations"]["3d_fullres"]
    kwargs = conf["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(f // 4, 4) for f in kwargs["features_per_stage"]]
    if patch is not None:
        conf["patch_size"] = list(patch)
    return plans


def _train(network: torch.nn.Module, root: Path, dataset_json: dict, patch: list[int], iterations: int, seed: int) -> list[float]:
    """A few iterations of plain Dice+CE training on random patches of the raw phantom cases (z-scored,
    as the plans say), enough for a network whose argmax is not noise."""
    import SimpleITK as sitk

    raw = root / "raw" / DATASET
    images, labels = [], []
    for lab in sorted((raw / "labelsTr").glob("*.nii.gz")):
        case = lab.name[: -len(".nii.gz")]
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))).astype(np.float32)
        images.append((img - img.mean()) / max(img.std(), 1e-8))
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(lab))).astype(np.int64))
    k = len(dataset_json["labels"])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(network.parameters(), lr=3e-3)
    network.train()
    losses = []
    for _ in range(iterations):
        xs, ys = [], []
        for _b in range(2):
            i = int(rng.integers(len(images)))
            lo = [int(rng.integers(0, s - p + 1)) for s, p in zip(images[i].shape, patch)]
            sl = tuple(slice(a, a + p) for a, p in zip(lo, patch))
            xs.append(images[i][sl][None])
            ys.append(labels[i][sl])
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        out = network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        prob = torch.softmax(out, 1)
        onehot = torch.nn.functional.one_hot(y, k).permute(0, 4, 1, 2, 3).float()
        dice = 1 - ((2 * (prob * onehot).sum((0, 2, 3, 4)) + 1) / (prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1)).mean()
        loss = torch.nn.functional.cross_entropy(out, y) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    network.eval()
    return losses


def make_nnunet_results(root: str | Path, cases: int = 6, size: int = 64, patch: tuple[int, int, int] | None = (32, 32, 32),
                        iterations: int = 60, folds: tuple[int, ...] = (0,), seed: int = 0) -> Path:
    """Plan with nnU-Net, build, train briefly and save; returns the model folder
    ``results/<dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root = Path(root)
    plans, dataset_json = _plan(root, cases, size)
    plans = _narrow(plans, patch)
    conf = plans["configurations"]["3d_fullres"]
    arch = conf["architecture"]
    model = root / "results" / DATASET / MODEL
    model.mkdir(parents=True, exist_ok=True)
    (model / "plans.json").write_text(json.dumps(plans, indent=1))
    (model / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    torch.set_num_threads(1)
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                         len(dataset_json["channel_names"]), len(dataset_json["labels"]),
                                         deep_supervision=True)
        losses = _train(network, root, dataset_json, conf["patch_size"], iterations, seed + fold)
        checkpoint = {  # the keys nnUNetTrainer.save_checkpoint writes
            "network_weights": network.state_dict(),
            "optimizer_state": torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True).state_dict(),
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                        "train_losses": [np.float32(losses[-1])], "val_losses": [np.float32(losses[-1])],
                        "lrs": [0.01], "epoch_start_timestamps": [0.0], "epoch_end_timestamps": [1.0]},
            "_best_ema": np.float64(0.5),
            "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        (model / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, model / f"fold_{fold}" / "checkpoint_final.pth")
    return model


if __name__ == "__main__":
    print(make_nnunet_results(sys.argv[1] if len(sys.argv) > 1 else "nnunet_phantom"))
