"""Training-batch loader throughput: ReCoKD's patch loader against nnU-Net v2's own, on the same data.

Issue 33's benchmark (not a test). Both sides read the same dataset preprocessed their own way (ReCoKD's
``.npy`` memory-mapped cache; nnU-Net's ``nnUNetv2_plan_and_preprocess`` folder, 3d_fullres), draw
batches of the same patch and batch size with their nnU-Net-style augmentation (ReCoKD: ``--augment
nnunet``; nnU-Net: ``nnUNetTrainer.get_training_transforms`` through its ``nnUNetDataLoader``, deep
supervision targets included), one process and one thread each: the cost per data-loading worker. The two
are timed in turn, batch by batch, so load that changes during the run falls on both alike; the table gives
each side's median seconds per batch and the per-round ratio's median and range.

    python scripts/bench_loader.py [DATASET] [--patch 128] [--batch 2] [--rounds 40] [--work DIR]

DATASET defaults to ../shared/data/BraTS2015-subset (2 channels, 240 x 240 x 155). Needs nnunetv2 (the
``nnunet`` extra). Everything it writes goes under --work (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 987  # an nnU-Net dataset id for the benchmark's own nnUNet_raw folder


def nnunet_loader(dataset: Path, work: Path, patch: int, batch: int):
    """nnU-Net v2's training loader for ``dataset`` (preprocessed once under ``work``), its patch and batch
    size set to ``patch``³ and ``batch`` (the rest of its plan and every transform as nnU-Net chooses)."""
    raw, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    name = f"Dataset{DATASET_ID}_{dataset.name.replace('-', '')}"
    for folder in (raw, pre, res):
        folder.mkdir(parents=True, exist_ok=True)
    if not (raw / name).exists():
        (raw / name).symlink_to(dataset.resolve(), target_is_directory=True)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res), nnUNet_n_proc_DA="0")
    if not (pre / name / "nnUNetPlans_3d_fullres").is_dir():
        print(f"nnU-Net: planning and preprocessing {dataset.name} (once) ...", flush=True)
        subprocess.run([sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints "
                        "import plan_and_preprocess_entry; plan_and_preprocess_entry()",
                        "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    import torch
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = json.loads((pre / name / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=[patch] * 3, batch_size=batch)
    plans["continue_training"] = False  # (nnU-Net's run_training puts it there)
    dataset_json = json.loads((pre / name / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    # the pieces of nnUNetTrainer.get_dataloaders, without its background augmenter processes
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    rotation, dummy_2d, initial_patch, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transforms = trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=trainer.label_manager.foreground_labels, regions=None,
        ignore_label=trainer.label_manager.ignore_label)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    loader = nnUNetDataLoader(dataset_tr, trainer.configuration_manager.batch_size, initial_patch, trainer.configuration_manager.patch_size,
                              trainer.label_manager, oversample_foreground_percent=trainer.oversample_foreground_percent,
                              sampling_probabilities=None, pad_sides=None, transforms=transforms,
                              probabilistic_oversampling=trainer.probabilistic_oversampling)
    ids = list(dataset_tr.identifiers)
    what = f"nnU-Net v2 {_version('nnunetv2')} nnUNetDataLoader + nnUNetTrainer transforms"
    return (lambda: next(loader)), what, ids


def recokd_loader(dataset: Path, work: Path, patch: int, batch: int, ids: list[str]):
    """ReCoKD's patch loader on its memory-mapped cache of the cases ``ids``, with the ``nnunet`` augmentation
    preset."""
    from ReCoKDLib.data.augmentation import AugmentConfig
    from ReCoKDLib.data.datasets import open_dataset
    from ReCoKDLib.data.loader import PatchBatches
    from ReCoKDLib.data.preprocessing import load_preprocessed
    from ReCoKDLib.workflows.runs import prepare_plans

    info = open_dataset(dataset)
    plans, _, root, _ = prepare_plans(info, work / "recokd_cache", progress=False)
    cases = [load_preprocessed(root, plans, i) for i in ids]
    size = (patch,) * 3
    data = PatchBatches([c.image for c in cases], [c.label for c in cases], size, batch_size=batch,
                        augment=AugmentConfig.preset("nnunet", size), length=10**9)
    counter = iter(range(10**9))
    return (lambda: data[next(counter)]), "ReCoKD PatchBatches, --augment nnunet (memory-mapped .npy)", ids


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:  # noqa: BLE001
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", nargs="?", default=str(ROOT.parent / "shared" / "data" / "BraTS2015-subset"))
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40, help="timed batches per side (after 2 untimed)")
    parser.add_argument("--work", help="folder for both sides' preprocessed data (default: a new temporary one)")
    args = parser.parse_args()
    dataset = Path(args.dataset)
    if not (dataset / "dataset.json").is_file():
        print(f"error: {dataset} holds no dataset.json; give a dataset in the nnU-Net raw layout", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="recokd_bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    import numpy as np
    import torch

    from ReCoKDLib.utils.runtime import cpu_description

    torch.set_num_threads(1)  # one data-loading worker's share of the machine, for both
    sides = {"nnU-Net v2": nnunet_loader(dataset, work, args.patch, args.batch)}
    ids = sides["nnU-Net v2"][2]  # the training cases of nnU-Net's fold 0, for both
    sides["ReCoKD"] = recokd_loader(dataset, work, args.patch, args.batch, ids)
    times: dict[str, list[float]] = {name: [] for name in sides}
    np.random.seed(0)
    for r in range(args.rounds + 2):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            start = time.perf_counter()
            sides[name][0]()
            if r >= 2:  # two warm-up batches each (first page-ins, lazy set-up)
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["ReCoKD"], times["nnU-Net v2"])]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{dataset.name} ({len(ids)} training cases of nnU-Net's fold 0): patch {args.patch}^3, batch {args.batch}, "
          f"{args.rounds} timed batches each, alternated; "
          f"1 thread; {cpu_description()}, load average {load:.1f}\n")
    # augmentations fire with a probability each, so batch times are skewed: throughput is the mean's inverse
    print("| loader | s/batch: mean | median [range] | batches/s per worker (1 / mean) |")
    print("|---|---|---|---|")
    for name, (_, what, _ids) in sides.items():
        t = times[name]
        print(f"| {what} | {statistics.mean(t):.2f} | {statistics.median(t):.2f} [{min(t):.2f}, {max(t):.2f}] | "
              f"{1 / statistics.mean(t):.2f} |")
    total = sum(times["ReCoKD"]) / sum(times["nnU-Net v2"])
    print(f"\nReCoKD / nnU-Net time for the same number of batches: {total:.2f}x (per round: median "
          f"{statistics.median(ratios):.2f}x, range [{min(ratios):.2f}, {max(ratios):.2f}])")
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
