"""Figures: prediction contours on a slice and training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..utils.io import atomic_write


def _informative_slice(label: np.ndarray) -> int:
    """The axial slice showing the most foreground classes, then the most foreground voxels."""
    classes = [(len(np.unique(label[z])), int((label[z] > 0).sum()), z) for z in range(label.shape[0])]
    return max(classes)[2]


def demo_figure(path: Path, cases, predictions: dict, results, label_names: list[str], colors) -> None:
    """A slice of the first test case with ground truth and each model's contours, plus training curves.

    Args:
        cases: test cases (``.image`` (C, D, H, W), ``.label`` (D, H, W)).
        predictions: model name → list of predicted label maps (D, H, W), one per case.
        results: :class:`~ReCoKDLib.workflows.demo.ModelResult` list with ``history`` and ``dice``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    case = cases[0]
    label = case.label.numpy()
    z = _informative_slice(label)
    image = case.image[0, z].numpy()
    panels = [("ground truth", label)] + [(name, preds[0].numpy()) for name, preds in predictions.items()]

    fig = plt.figure(figsize=(4 * len(panels), 8.5), constrained_layout=True)
    grid = fig.add_gridspec(2, len(panels))
    for i, (title, lab) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image, cmap="gray", interpolation="nearest")
        for value, color in enumerate(colors, start=1):
            mask = (lab[z] == value).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=[color], linewidths=1.4)
        mean = next((r.dice_mean for r in results if r.name == title), None)
        ax.set_title(title if mean is None else f"{title}\nmean Dice {mean:.3f}", fontsize=10)
        ax.axis("off")
        if i == 0:
            handles = [Line2D([0], [0], color=c, lw=2) for c in colors]
            ax.legend(handles, label_names, loc="lower left", fontsize=7, framealpha=0.6)

    ax = fig.add_subplot(grid[1, : max(1, len(panels) // 2)])
    for r in results:  # the loop's log rows: one per epoch, losses averaged over its iterations
        epochs = [h["epoch"] for h in r.history]
        ax.plot(epochs, [h["loss_seg"] for h in r.history], marker=".", label=r.name)
    kd = results[-1].history
    kd_keys = [k for k in (kd[0] if kd else {}) if k.startswith(("loss_msard", "loss_msca", "loss_logit", "loss_fitnet",
                                                                  "loss_cwd", "loss_skd"))]
    if kd_keys:
        ax.plot([h["epoch"] for h in kd], [sum(h[k] for k in kd_keys) for h in kd], "--", marker=".",
                label=f"{results[-1].name}: KD terms (before λ)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (epoch mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("training curves", fontsize=10)

    ax = fig.add_subplot(grid[1, max(1, len(panels) // 2) :])
    width = 0.8 / len(results)
    x = np.arange(len(label_names) + 1)
    for i, r in enumerate(results):
        values = [r.dice[n] for n in label_names] + [r.dice_mean]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=r.name)
    ax.set_xticks(x, [*label_names, "mean"])
    ax.set_ylim(0, 1.15)  # head-room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("Dice (test cases)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(results), frameon=False)
    ax.set_title("per-class Dice", fontsize=10)
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
