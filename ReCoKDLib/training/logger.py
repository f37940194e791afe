"""The files a training run writes besides checkpoints: ``log.csv``, TensorBoard scalars,
``run.json`` (with the best validation metrics) and ``curves.png`` (where matplotlib exists)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..utils.io import atomic_write, atomic_write_text

__all__ = ["RunLogger"]


class RunLogger:
    """Writes a run folder's logs; every write is atomic. TensorBoard and matplotlib are optional."""

    def __init__(self, run_dir: str | Path, name: str = "train"):
        self.run_dir = Path(run_dir)
        self.name = name
        self._tb = None

    def log_epochs(self, history: list[dict]) -> None:
        """``log.csv`` with every epoch row so far; the last row's scalars to TensorBoard."""
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, restval="")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.run_dir / "log.csv", buf.getvalue())
        row = history[-1]
        tb = self._tensorboard(int(row["epoch"]))
        if tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(k.replace("loss_", "loss/").replace("dice_", "dice/"), v, row["epoch"])
            tb.flush()

    def _tensorboard(self, epoch: int):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed (3D Slicer): CSV only
                self._tb = False
                return None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=epoch)
        return self._tb or None

    def write_run_json(self, run_info: dict, best: dict) -> None:
        """``run.json``: ``run_info`` with ``metrics`` = the best validation (non-finite values as null)."""
        info = dict(run_info)
        info["metrics"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in best.items() if not k.startswith("_")}
        if "dice_per_class" in info["metrics"]:
            info["metrics"]["dice_per_class"] = {
                k: (v if math.isfinite(v) else None) for k, v in info["metrics"]["dice_per_class"].items()}
        atomic_write_text(self.run_dir / "run.json", json.dumps(info, indent=2) + "\n")

    def plot_curves(self, history: list[dict]) -> Path | None:
        """``curves.png`` (losses and validation Dice per epoch) where matplotlib exists, else None:
        3D Slicer has no matplotlib and plots ``log.csv`` with its own plot nodes."""
        if not history:
            return None
        try:
            import matplotlib
        except ImportError:
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in history]
        fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
        for k in history[0]:
            if k.startswith("loss_"):
                ax_l.plot(epochs, [r.get(k, float("nan")) for r in history], label=k[5:])
            if k.startswith("dice_"):
                ax_d.plot(epochs, [r.get(k, float("nan")) for r in history], label=k[5:],
                          linewidth=2.5 if k == "dice_mean" else 1.2)
        ax_l.set(xlabel="epoch", ylabel="training loss (epoch mean)", title=f"{self.name}: losses")
        ax_d.set(xlabel="epoch", ylabel="validation Dice (EMA)", title=f"{self.name}: validation", ylim=(0, 1))
        for ax in (ax_l, ax_d):
            if ax.lines:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        finally:
            plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb:
            self._tb.close()
