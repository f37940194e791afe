"""Trainers: one class whose steps subclasses override by name (nnU-Net style).

:class:`Trainer` trains a segmentation network on labels; :class:`DistillationTrainer` overrides
:meth:`Trainer.trainable_parameters` and :meth:`Trainer.compute_loss` to train a student through a
:class:`~ReCoKDLib.distill.Distiller`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.sampling import PatchSampler
from ..distill.distiller import Distiller
from ..errors import ReCoKDError
from ..inference.sliding_window import predict_labels
from ..losses.segmentation import DeepSupervisedDiceCELoss
from ..utils.runtime import configure_cpu, resolve_device, seed_everything
from .metrics import dice_per_class


@dataclass
class TrainConfig:
    """Schedule and optimisation settings.

    The defaults follow nnU-Net / the ReCo-KD authors (SGD Nesterov, momentum 0.99, lr 0.01 with poly
    decay, weight decay 3e-5, gradient-norm clip 12); ``optimizer="adamw"`` converges faster on the short
    schedules of a CPU.
    """

    steps: int = 250
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (48, 48, 48)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    foreground_fraction: float = 1 / 3
    val_every: int = 0  # steps between validations; 0 = only at the end
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


@dataclass
class Case:
    """An in-memory training or validation case: image (C, D, H, W) float32, label (D, H, W) int."""

    name: str
    image: torch.Tensor
    label: torch.Tensor


@dataclass
class History:
    """What a run logged: one dict per step (loss terms, lr) and one per validation."""

    steps: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """Train a segmentation network on patches, validate with sliding-window Dice.

    Override points, in order of use: :meth:`trainable_parameters`, :meth:`build_optimizer`,
    :meth:`learning_rate`, :meth:`compute_loss`, :meth:`train_step`, :meth:`validate`.

    Args:
        network: maps (B, C, D, H, W) → logits (or a deep-supervision list in training mode).
        num_classes: K, background included.
        train_cases, val_cases: in-memory :class:`Case` lists.
        config: :class:`TrainConfig`.
        label_names: names of the foreground classes, for logs.
        name: shown on the progress bar.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        train_cases: Sequence[Case],
        val_cases: Sequence[Case] = (),
        config: TrainConfig | None = None,
        label_names: Sequence[str] | None = None,
        name: str = "train",
    ):
        self.config = config or TrainConfig()
        self.num_classes = num_classes
        self.train_cases = list(train_cases)
        self.val_cases = list(val_cases)
        self.label_names = list(label_names or [f"class{i}" for i in range(1, num_classes)])
        self.name = name
        if not self.train_cases:
            raise ReCoKDError("no training cases; give at least one")
        configure_cpu(self.config.num_threads)
        seed_everything(self.config.seed)
        self.device = resolve_device(self.config.device)
        self.network = network
        self.to_device()
        self.sampler = PatchSampler(
            [c.image for c in self.train_cases],
            [c.label for c in self.train_cases],
            self.config.patch_size,
            batch_size=self.config.batch_size,
            foreground_fraction=self.config.foreground_fraction,
            seed=self.config.seed,
        )
        self.seg_loss = DeepSupervisedDiceCELoss()
        self.optimizer = self.build_optimizer(self.trainable_parameters())
        self.history = History()

    # -- named steps --------------------------------------------------------------------------
    def to_device(self) -> None:
        self.network.to(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=True, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        raise ReCoKDError(f"unknown optimizer {c.optimizer!r}; choose sgd or adamw")

    def learning_rate(self, step: int) -> float:
        """Poly decay: ``lr · (1 − step / steps)^0.9``."""
        return self.config.lr * (1 - step / self.config.steps) ** 0.9

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> tuple[torch.Tensor, dict]:
        outputs = self.network(images)
        loss = self.seg_loss(outputs, labels)
        return loss, {"seg": float(loss.detach())}

    def train_step(self, step: int) -> dict:
        images, labels = self.sampler.next()
        images, labels = images.to(self.device), labels.to(self.device)
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self.compute_loss(images, labels, progress=step / self.config.steps)
        if not torch.isfinite(loss):
            raise ReCoKDError(f"{self.name}: the loss became {float(loss)} at step {step}; lower the learning rate")
        loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.grad_clip)
        self.optimizer.step()
        return {"step": step, "lr": lr, "loss": float(loss.detach()), **terms}

    def inference_network(self) -> nn.Module:
        return self.network

    def validate(self, cases: Sequence[Case] | None = None) -> dict:
        """Mean and per-class Dice over ``cases`` (default: the validation cases)."""
        cases = self.val_cases if cases is None else cases
        net = self.inference_network()
        scores = np.stack(
            [
                dice_per_class(predict_labels(net, c.image, self.config.patch_size, device=self.device), c.label,
                               self.num_classes)
                for c in cases
            ]
        )
        per_class = np.nanmean(scores, axis=0)
        out = {f"dice_{n}": float(d) for n, d in zip(self.label_names, per_class)}
        out["dice_mean"] = float(np.nanmean(per_class))
        return out

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, progress: bool = True, callback: Callable[[dict], None] | None = None) -> History:
        """Train for ``config.steps`` steps; validate every ``val_every`` steps and at the end."""
        c = self.config
        self.network.train()
        start = time.perf_counter()
        bar = tqdm(range(c.steps), desc=self.name, disable=not progress, dynamic_ncols=True, leave=True)
        for step in bar:
            record = self.train_step(step)
            self.history.steps.append(record)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "lr")}, refresh=False)
            if callback:
                callback(record)
            last = step + 1 == c.steps
            if self.val_cases and (last or (c.val_every and (step + 1) % c.val_every == 0)):
                val = {"step": step + 1, **self.validate()}
                self.history.validations.append(val)
                bar.write(f"{self.name} step {step + 1}: mean Dice {val['dice_mean']:.3f}")
                self.network.train()
        self.history.seconds = time.perf_counter() - start
        return self.history


class DistillationTrainer(Trainer):
    """Train the student of a :class:`~ReCoKDLib.distill.Distiller` (teacher frozen, KD terms on)."""

    def __init__(self, distiller: Distiller, train_cases, val_cases=(), config=None, label_names=None,
                 name: str = "distill"):
        self.distiller = distiller
        super().__init__(distiller.student, distiller.num_classes, train_cases, val_cases, config, label_names, name)
        self.network = distiller.student

    def to_device(self) -> None:
        self.distiller.to(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.distiller.trainable_parameters()

    def compute_loss(self, images, labels, progress):
        out = self.distiller(images, labels, progress)
        return out.loss, out.breakdown()

    def fit(self, progress: bool = True, callback=None) -> History:
        self.distiller.train()
        return super().fit(progress, callback)
