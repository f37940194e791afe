"""The epoch-based training loop behind ``recokd train`` and ``recokd distill``.

One loop serves teachers and students: it trains a :class:`TrainModule` (a network and its loss, or a
Distiller's trainable parts) on a stream of patch batches, keeps an EMA of the network's weights,
validates the EMA network each epoch (sliding-window Dice per class), and writes the run folder:
checkpoints (``latest`` every epoch and optionally every K iterations, ``best`` by validation mean
Dice), ``model_best``/``model_final`` safetensors of the EMA weights, ``log.csv``, TensorBoard events
and ``curves.png``.

A run whose loss or weights turn NaN/Inf (a diverged training) stops with one line before anything of
the spoilt step is validated or written: the latest checkpoint stays the last good one.

Under ``torchrun`` the module is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`; every
rank draws its own batches; rank 0 alone validates and writes, the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..data.loader import AUGMENT_PRESETS, PatchBatches, batch_loader
from ..distill.distiller import Distiller
from ..errors import ReCoKDError
from ..inference.sliding_window import predict_labels
from ..losses.segmentation import DeepSupervisedDiceCELoss
from ..utils.labels import IGNORE_LABEL
from ..models.weights import save_weights
from .checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from .logger import RunLogger
from ..evaluation.metrics import dice_per_class

CHECKPOINT_FORMAT = 1


def augment_name(value: bool | str) -> str:
    """An augmentation preset's name; ``True`` / ``False`` (``run.json`` before presets) are ``nnunet`` / ``none``."""
    if isinstance(value, bool):
        return "nnunet" if value else "none"
    if value not in AUGMENT_PRESETS:
        raise ReCoKDError(f"augmentation {value!r} is not one of {', '.join(AUGMENT_PRESETS)}")
    return value


#: the command-line flag of each RunConfig field (``momentum`` has none: the Python API's name is shown)
CONFIG_FLAGS = {"epochs": "--epochs", "iters_per_epoch": "--iters-per-epoch", "batch_size": "--batch-size",
                "patch_size": "--patch-size", "optimizer": "--optimizer", "lr": "--lr", "momentum": "momentum",
                "weight_decay": "--weight-decay", "grad_clip": "--grad-clip", "ema_decay": "--ema-decay",
                "foreground_fraction": "--foreground-fraction", "adapter_lr_scale": "--adapter-lr-scale",
                "augment": "--augment", "elastic": "--elastic", "num_workers": "--workers", "val_every": "--val-every",
                "val_max_cases": "--val-max-cases", "checkpoint_every": "--checkpoint-every", "seed": "--seed",
                "device": "--device", "deterministic": "--deterministic", "amp": "--no-amp", "num_threads": "--threads",
                "unlabeled_fraction": "--unlabeled-fraction", "teacher_targets": "--teacher-targets",
                "teacher_confidence": "--teacher-confidence", "val_patches": "--val-patches",
                "batch_per_process": "--batch-per-process", "amp_dtype": "--amp-dtype", "compile": "--compile"}
# whole-number options and their least value: a run needs at least one epoch of one iteration of one patch
_LEAST_WHOLE = {"epochs": 1, "iters_per_epoch": 1, "batch_size": 1, "num_workers": 0, "val_every": 0,
                "val_max_cases": 0, "checkpoint_every": 0, "seed": 0, "num_threads": 1, "val_patches": 0}
# real options: (least, whether the least itself is allowed, most); a non-finite value is never allowed
_REAL_RANGES = {"lr": (0.0, False, math.inf), "adapter_lr_scale": (0.0, False, math.inf),
                "momentum": (0.0, True, 1.0), "weight_decay": (0.0, True, math.inf), "grad_clip": (0.0, True, math.inf),
                "ema_decay": (0.0, True, 1.0), "foreground_fraction": (0.0, True, 1.0),
                "unlabeled_fraction": (0.0, True, 1.0), "teacher_confidence": (0.0, True, 1.0)}
#: where an unlabelled scan's targets come from (``--teacher-targets``): ``hard``, the teacher's arg-max of the
#: whole scan (computed once, cached); ``patch``, its arg-max of each training patch (the step's own teacher
#: forward); ``soft``, none (the scan trains the KD terms only, e.g. ``--method logit``'s soft targets)
TEACHER_TARGETS = ("hard", "patch", "soft")


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real_option(flag: str, value: object, least: float, inclusive: bool = True, most: float = math.inf) -> None:
    """Refuse a real-valued option that is not a finite number in ``[least, most]`` (``(least, most]`` when
    ``inclusive`` is false): one line naming ``flag``, the range and the value."""
    finite = _is_real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    number = float(value) if finite else math.nan  # type: ignore[arg-type]
    if finite and number <= most and (number >= least if inclusive else number > least):
        return
    low = f">= {least:g}" if inclusive else f"> {least:g}"
    wanted = low if most == math.inf else f"between {least:g} and {most:g}" if inclusive else f"{low} and <= {most:g}"
    raise ReCoKDError(f"{flag} must be {'' if finite else 'a finite number '}{wanted}, got {value}")


def check_training_options(values: dict) -> None:
    """Refuse, before anything is read or written, a training option that would give an untrained,
    non-finite or impossible run (``--epochs 0``, ``--lr nan``, ``--workers -1``, ...).

    ``values`` maps :class:`RunConfig` field names to values; absent fields are not checked, ``None``
    is accepted for ``num_threads`` (torch's default) and ``patch_size`` (the plan's).
    This is the one place these rules live: RunConfig checks itself with it, and so does a
    :class:`~ReCoKDLib.workflows.runs.RunSpec` with the options it was given.

    Raises:
        ReCoKDError: one line naming the flag, what it must be and the value given.
    """
    for name, least in _LEAST_WHOLE.items():
        if name not in values or (name == "num_threads" and values[name] is None):  # None: torch's thread count
            continue
        value = values[name]
        if not _is_whole(value) or value < least:  # type: ignore[operator]
            kind = "" if _is_whole(value) else "a whole number "
            raise ReCoKDError(f"{CONFIG_FLAGS[name]} must be {kind}>= {least}, got {value}")
    for name, (least, inclusive, most) in _REAL_RANGES.items():
        if name in values and not (name == "unlabeled_fraction" and values[name] is None):  # None: by case count
            check_real_option(CONFIG_FLAGS[name], values[name], least, inclusive, most)
    patch = values.get("patch_size")
    if patch is not None and (not isinstance(patch, (list, tuple)) or len(patch) != 3
                              or not all(_is_whole(p) and p >= 1 for p in patch)):
        raise ReCoKDError(f"--patch-size must be 3 whole numbers >= 1 (D H W), got {patch}")
    optimizer = values.get("optimizer")
    if optimizer is not None and optimizer not in ("sgd", "adamw"):
        raise ReCoKDError(f"--optimizer must be sgd or adamw, got {optimizer!r}")
    targets = values.get("teacher_targets")
    if targets is not None and targets not in TEACHER_TARGETS:
        raise ReCoKDError(f"--teacher-targets must be one of {', '.join(TEACHER_TARGETS)}, got {targets!r}")


def rank_batch_size(batch_size: int, world: int, rank: int, per_process: bool = False) -> int:
    """The patches ``rank`` draws per step: the global ``batch_size`` split as evenly as it goes over ``world``
    processes (the first ``batch_size % world`` ranks one more), or all of it with ``per_process``.

    Raises:
        ReCoKDError: a global batch smaller than the number of processes (some would draw nothing).
    """
    if per_process or world <= 1:
        return int(batch_size)
    if batch_size < world:
        raise ReCoKDError(f"--batch-size {batch_size} is the global batch, split over {world} processes; give at least "
                          f"{world} (one per process), or --batch-per-process to have each draw {batch_size}")
    return batch_size // world + (1 if rank < batch_size % world else 0)


def check_distill_options(width_factor: float | None = None, lambda_max: float | None = None,
                          temperature: float | None = None, warmup_fraction: float | None = None) -> None:
    """Refuse a distillation option that would give a non-finite or meaningless student (``None``: not
    given, the default applies): ``--width-factor`` >= 1, ``--lambda-max`` >= 0, ``--temperature`` > 0,
    ``--warmup-fraction`` in [0, 1]. Used by ``recokd distill`` (through its RunSpec) and ``recokd demo``.

    Raises:
        ReCoKDError: one line naming the flag, what it must be and the value given.
    """
    for flag, value, least, inclusive, most in (("--width-factor", width_factor, 1.0, True, math.inf),
                                                ("--lambda-max", lambda_max, 0.0, True, math.inf),
                                                ("--temperature", temperature, 0.0, False, math.inf),
                                                ("--warmup-fraction", warmup_fraction, 0.0, True, 1.0)):
        if value is not None:
            check_real_option(flag, value, least, inclusive, most)


@dataclass
class RunConfig:
    """Schedule, optimisation and bookkeeping of a training run (stored in ``run.json``).

    nnU-Net's schedule is ``epochs × iters_per_epoch`` iterations (1000 × 250); the defaults here are
    CPU-sized. Optimiser defaults follow method.md: SGD Nesterov, momentum 0.99, lr 0.01 with poly
    decay, weight decay 3e-5, gradient-norm clip 12, EMA 0.999.
    """

    epochs: int = 50
    iters_per_epoch: int = 50
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (96, 96, 96)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    ema_decay: float = 0.999
    foreground_fraction: float = 1 / 3
    # learning rate of the distillation's own parameters (adapters, KD terms) relative to the student's;
    # 10 did not beat 1 on the phantom (docs/results.md, "how hard each term pulls")
    adapter_lr_scale: float = 1.0
    # none | light | nnunet (data.loader.AugmentConfig.preset); True/False read as nnunet/none. none: at CPU
    # schedules (1000 iterations) nnunet cost 0.10 Dice on LA2018 and 0.31 on ACDC, light tied with none
    # (docs/results.md, "Augmentation at CPU schedules")
    augment: str = "none"
    elastic: bool = False
    num_workers: int = 2
    val_every: int = 1
    val_max_cases: int = 0
    # > 0: each epoch's validation is the pseudo-Dice of this many fixed patches of the validation cases (as
    # nnU-Net's online evaluation: seconds instead of minutes on large datasets), and whole cases are scored
    # once, at the end; 0: whole cases every validated epoch
    val_patches: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    amp: bool = True
    # the mixed precision on CUDA: auto = bf16 where the GPU computes it (no loss scaling needed), else fp16
    # with a gradient scaler that skips the steps whose loss or gradients overflow
    amp_dtype: str = "auto"
    # torch.compile the training step's module (opt-in: the first steps compile, minutes; then faster on GPUs)
    compile: bool = False
    # --batch-size is the global batch, split over the processes of a torchrun (nnU-Net's semantics: N GPUs
    # see the same samples per step as one, N times faster); True: each process draws --batch-size itself
    batch_per_process: bool = False
    num_threads: int | None = None
    # share of patches drawn from unlabelled (teacher-labelled) cases; None: every case alike
    unlabeled_fraction: float | None = None
    teacher_targets: str = "hard"  # TEACHER_TARGETS
    # hard targets: voxels where the teacher's top softmax probability is below this are left out of the
    # segmentation loss (0: none)
    teacher_confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.amp_dtype not in AMP_DTYPES:
            raise ReCoKDError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")
        self.augment = augment_name(self.augment)
        check_training_options(asdict(self))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(int(p) for p in kw["patch_size"])
        return cls(**kw)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch


# --------------------------------------------------------------------------------------------------
# what is trained


class SegTrainModule(nn.Module):
    """A segmentation network and its Dice + CE loss (deep supervision)."""

    def __init__(self, network: nn.Module, seg_loss: nn.Module | None = None):
        super().__init__()
        self.network = network
        self.seg_loss = seg_loss if seg_loss is not None else DeepSupervisedDiceCELoss()

    def check_batch(self, labels: torch.Tensor) -> bool:
        """Whether any voxel of the (host) batch is left out (IGNORE_LABEL); its classes were checked when read."""
        return bool((labels == IGNORE_LABEL).any())

    def forward(self, images, labels, progress: float, checked=None):
        outputs = self.network(images)
        # told by check_batch whether any voxel is left out: no need to ask the device (None: the loss looks)
        loss = self.seg_loss(outputs, labels, ignore=checked) if isinstance(self.seg_loss, DeepSupervisedDiceCELoss) \
            else self.seg_loss(outputs, labels)
        return loss, {"seg": loss}

    def place(self, device: torch.device) -> None:
        self.to(device)

    def trainable_state(self) -> dict:
        return {"network": self.network.state_dict()}

    def load_trainable_state(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])


class DistillTrainModule(nn.Module):
    """The trainable parts of a :class:`Distiller` (student, adapters, KD terms) as one module, so that
    DistributedDataParallel wraps them and not the frozen teacher, which is held outside the module
    tree."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.student = distiller.student
        self.adapters = distiller.adapters
        self.kd_terms = distiller.kd_terms
        object.__setattr__(self, "_distiller", distiller)  # not a submodule: DDP must not see the teacher

    @property
    def distiller(self) -> Distiller:
        return self._distiller

    def check_batch(self, labels: torch.Tensor) -> tuple[bool, bool]:
        """:meth:`Distiller.check_labels` of a batch, on the host before it moves to the device."""
        return self._distiller.check_labels(labels)

    def forward(self, images, labels, progress: float, checked=None):
        out = self._distiller(images, labels, progress, checked=checked)
        return out.loss, dict(out.terms)

    def train(self, mode: bool = True):
        super().train(mode)
        self._distiller.teacher.eval()
        return self

    def place(self, device: torch.device) -> None:
        self._distiller.to(device)

    def trainable_state(self) -> dict:
        return self._distiller.trainable_state_dict()

    def load_trainable_state(self, state: dict) -> None:
        self._distiller.load_trainable_state_dict(state)


@dataclass
class ValCase:
    """A validation case in plan space: image (C, D, H, W) float32 tensor, label (D, H, W) int tensor."""

    name: str
    image: torch.Tensor
    label: torch.Tensor


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


# --------------------------------------------------------------------------------------------------
# the loop


AMP_DTYPES = ("auto", "bf16", "fp16")


def resolve_amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA GPU that computes it natively (Ampere and later: compute capability 8),
    else float16 (``torch.cuda.is_bf16_supported()`` also says yes where bfloat16 is only emulated, slowly)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8):
        return torch.bfloat16
    return torch.float16


def validation_patches(cases: Sequence[ValCase], patch: Sequence[int], count: int, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fixed patches of the validation ``cases``: images (N, C, *patch) and labels (N, *patch),
    the cases taken in turn, every other patch centred on a random labelled voxel (others placed uniformly),
    zero-padded where a case is smaller than the patch. The same for a given seed, so that every epoch is
    scored on the same patches."""
    rng = np.random.default_rng(seed + 7919)
    images, labels = [], []
    for i in range(count):
        case = cases[i % len(cases)]
        shape = case.label.shape
        foreground = torch.nonzero(case.label > 0) if i % 2 else torch.empty(0, 3)
        if len(foreground):
            centre = foreground[int(rng.integers(len(foreground)))].tolist()
            corner = [int(c) - p // 2 for c, p in zip(centre, patch)]
        else:
            corner = [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(shape, patch)]
        corner = [min(max(c, 0), max(n - p, 0)) for c, n, p in zip(corner, shape, patch)]
        region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        image, label = case.image[(slice(None), *region)], case.label[region]
        pad = [x for n, p in zip(reversed(label.shape), reversed(patch)) for x in (0, p - n)]
        images.append(torch.nn.functional.pad(image.float(), pad))
        labels.append(torch.nn.functional.pad(label.to(torch.uint8), pad))  # (labels <= 255: 8x smaller than int64)
    return torch.stack(images), torch.stack(labels)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: CUDA's ``OutOfMemoryError``, Python's ``MemoryError``, or
    the CPU allocator's (and MPS's) ``RuntimeError``."""
    if isinstance(exc, MemoryError) or isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "defaultcpuallocator" in text)


class EpochTrainer:
    """Train ``module`` on ``data`` for ``config.epochs × config.iters_per_epoch`` iterations.

    The steps a subclass may override, in the order they run: :meth:`configure_optimizers`,
    :meth:`learning_rate` / :meth:`ema_decay` (schedules), :meth:`train_step` (one iteration),
    :meth:`validate` (EMA Dice on the validation cases), :meth:`on_epoch_end` (epoch means, best
    weights, logs, checkpoints). The loss is the ``module``'s (``SegTrainModule``: Dice+CE with deep
    supervision; ``DistillTrainModule``: plus the KD terms); the files are the :class:`RunLogger`'s.

    Args:
        module: a :class:`SegTrainModule` or :class:`DistillTrainModule`.
        network: the network that is validated and exported (the teacher or the student).
        make_network: builds a fresh network of the same architecture (holds the EMA weights).
        data: the batch stream (its ``rank`` must be this process's rank).
        val_cases: validation cases: every one on rank 0; under torchrun the other processes hold their share
            of the whole cases scored (``[:val_max_cases][rank::world]``), which they score with it.
        num_classes, label_names: K (background included) and the foreground classes' names.
        config: :class:`RunConfig`.
        run_dir: the run folder (written by rank 0).
        run_info: the ``run.json`` content; ``metrics`` is filled in here.
        name: shown on the progress bar.
        progress: show the progress bar.
    """

    #: fp16 steps skipped in a row (overflow) before the run counts as diverged
    MAX_CONSECUTIVE_SKIPS = 50

    def __init__(
        self,
        module: nn.Module,
        network: nn.Module,
        make_network: Callable[[], nn.Module],
        data: PatchBatches,
        val_cases: Sequence[ValCase],
        num_classes: int,
        label_names: Sequence[str],
        config: RunConfig,
        run_dir: str | Path,
        run_info: dict,
        name: str = "train",
        progress: bool = True,
        device: torch.device | None = None,
    ):
        self.config = config
        self.module = module
        self.network = network
        self.data = data
        self.val_cases = list(val_cases)
        self.num_classes = int(num_classes)
        self.label_names = list(label_names)
        self.run_dir = Path(run_dir)
        self.run_info = run_info
        self.name = name
        self.rank, self.world, local_rank = _dist_info()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.device = device or torch.device("cpu")
        module.place(self.device)
        self.ema_net = make_network().to(self.device)
        self.ema_net.load_state_dict(network.state_dict())
        self.ema_net.eval()
        for p in self.ema_net.parameters():
            p.requires_grad_(False)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = self.configure_optimizers()
        self.use_amp = bool(config.amp and self.device.type == "cuda")
        self.amp_dtype = resolve_amp_dtype(config.amp_dtype, self.device)
        # fp16 alone needs loss scaling; its overflowing steps are skipped (skip_nonfinite), not fatal
        self.skip_nonfinite = self.use_amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.skip_nonfinite)
        self._consecutive_skips = 0
        if self.world > 1:
            ids = [self.device.index if self.device.index is not None else local_rank] if self.device.type == "cuda" else None
            self.forward_module: nn.Module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        else:
            self.forward_module = module
        if config.compile:  # the step's forward only: checkpoints keep the plain module's names
            self.forward_module = torch.compile(self.forward_module)
        self.step = 0
        self._saved_step: int | None = None  # the step of the latest checkpoint this process wrote or resumed
        self.history: list[dict] = []
        self.best: dict = {}
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.epoch_seconds = 0.0
        self.logger = RunLogger(self.run_dir, name)

    # -- pieces -------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimiser over the trainable parameters (SGD Nesterov or AdamW, from the config). With
        ``adapter_lr_scale`` ≠ 1 the adapters and KD terms form a second group whose learning rate is
        the student's times that factor (``lr_scale`` in the group, applied at every step)."""
        c = self.config
        groups: list[dict] = [{"params": self.params, "lr_scale": 1.0}]
        if c.adapter_lr_scale != 1.0:
            aux = {id(p) for name in ("adapters", "kd_terms") if isinstance(m := getattr(self.module, name, None), nn.Module)
                   for p in m.parameters()}
            if aux:
                groups = [{"params": [p for p in self.params if id(p) not in aux], "lr_scale": 1.0},
                          {"params": [p for p in self.params if id(p) in aux], "lr_scale": c.adapter_lr_scale}]
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=True, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        raise ReCoKDError(f"unknown optimizer {c.optimizer!r}; choose sgd or adamw")

    def learning_rate(self, step: int) -> float:
        """Poly decay ``lr · (1 − step / total)^0.9``."""
        return self.config.lr * (1 - step / self.config.total_steps) ** 0.9

    def ema_decay(self, step: int) -> float:
        """The configured decay, warmed up as ``(1 + n) / (10 + n)`` so short runs are not dominated by
        the initial weights."""
        return min(self.config.ema_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        d = self.ema_decay(step)
        ema_p = list(self.ema_net.parameters())
        net_p = list(self.network.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in net_p], 1.0 - d)
        for b_ema, b in zip(self.ema_net.buffers(), self.network.buffers()):
            b_ema.copy_(b)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, checked=None) -> dict[str, float]:
        """One iteration; ``checked``: the module's ``check_batch`` of these labels (None: checked in the step)."""
        step = self.step
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            # (checked passed only when known: a module of one's own may take (images, labels, progress) alone)
            extra = {"checked": checked} if checked is not None else {}
            loss, terms = self.forward_module(images, labels, step / self.config.total_steps, **extra)
        # one host-device synchronisation per step: every term and the total in one copy
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())]).tolist()
        overflow = not math.isfinite(values[0])
        if self.skip_nonfinite and self.world > 1:  # every rank skips together, or DDP's all-reduce would hang
            flag = torch.tensor([float(overflow)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            overflow = bool(flag.item())
        if overflow and self.skip_nonfinite and self._consecutive_skips < self.MAX_CONSECUTIVE_SKIPS:
            # fp16 overflowed: this step is skipped (as the gradient scaler skips an overflowing update), the
            # scale halved; log.csv's loss_skipped is the epoch's share of skipped steps
            self._consecutive_skips += 1
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() / 2)
            return {"skipped": 1.0}
        if overflow or not math.isfinite(values[0]):  # (the flag every rank agreed on: none goes on alone)
            raise ReCoKDError(f"{self.name}: the loss became {values[0]} at iteration {step + 1} (epoch "
                              f"{step // self.config.iters_per_epoch + 1}); the training diverged and was stopped, "
                              f"{self._kept()}; lower --lr")
        self.scaler.scale(loss).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_ema(step)
        self._consecutive_skips = 0
        out = dict(zip(terms, values[1:]))
        out["total"] = values[0]
        if self.skip_nonfinite:
            out["skipped"] = 0.0
        return out

    def has_validation(self) -> bool:
        """Whether the run has validation cases (rank 0 holds them all; the same answer on every process)."""
        if getattr(self, "_has_validation", None) is None:
            flag = torch.tensor([float(bool(self.val_cases))], device=self.device)
            if self.world > 1:
                dist.broadcast(flag, 0)
            self._has_validation = bool(flag.item())
        return self._has_validation

    @torch.no_grad()
    def validate(self) -> dict:
        """The epoch's validation: pseudo-Dice on fixed patches with ``val_patches``, else whole cases."""
        if self.config.val_patches:
            return self.validate_patches()
        return self.validate_cases()

    @torch.no_grad()
    def validate_patches(self) -> dict:
        """Pseudo-Dice per class of the EMA network on ``val_patches`` fixed patches of the validation cases
        (drawn once per run: :func:`validation_patches`): true and false positives and negatives summed over
        every patch, ``2 TP / (2 TP + FP + FN)``, NaN for a class in no patch and never predicted."""
        if getattr(self, "_val_patches", None) is None:
            self._val_patches = validation_patches(self.val_cases, self.config.patch_size, self.config.val_patches,
                                                   self.config.seed)
        images, labels = self._val_patches
        counts = torch.zeros(3, self.num_classes - 1, dtype=torch.float64)
        self.ema_net.eval()
        batch = max(self.data.batch_size, 1)  # this process's share, which fits its memory
        for start in range(0, len(images), batch):
            x = images[start:start + batch].to(self.device)
            out = self.ema_net(x)
            pred = (out[0] if isinstance(out, (list, tuple)) else out).argmax(1).cpu()
            ref = labels[start:start + batch]
            for k in range(1, self.num_classes):
                p, r = pred == k, ref == k
                counts[:, k - 1] += torch.stack([(p & r).sum(), (p & ~r).sum(), (~p & r).sum()]).double()
        tp, fp, fn = counts
        dice = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), torch.full_like(tp, math.nan))
        per_class = dice.numpy()
        mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
        return {"dice_per_class": {n: float(d) for n, d in zip(self.label_names, per_class)}, "dice_mean": mean}

    @torch.no_grad()
    def validate_cases(self, spread: bool = False) -> dict:
        """Dice per class of the EMA network on the validation cases (mean over cases, NaN-aware).

        ``spread`` (every process calls it): under torchrun process ``r`` scores cases ``r, r + world, ...``
        and the per-class sums and counts are added up, so each process gets what one would compute alone,
        in about 1/world of the time. Otherwise rank 0 scores every case by itself."""
        cases = self.val_cases
        if self.is_main and self.config.val_max_cases:
            cases = cases[: self.config.val_max_cases]
        spread = spread and self.world > 1
        if spread and self.is_main:
            cases = cases[:: self.world]  # (the other processes hold only their share)
        sums, counts = np.zeros(self.num_classes - 1), np.zeros(self.num_classes - 1)
        for c in cases:
            dice = dice_per_class(predict_labels(self.ema_net, c.image, self.config.patch_size, device=self.device),
                                  c.label, self.num_classes)
            scored = np.isfinite(dice)
            sums[scored] += dice[scored]
            counts += scored
        if spread:
            totals = torch.tensor(np.concatenate([sums, counts]), dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            sums, counts = np.split(totals.cpu().numpy(), 2)
        per_class = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
        mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
        return {"dice_per_class": {n: float(d) for n, d in zip(self.label_names, per_class)}, "dice_mean": mean}

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.step // self.config.iters_per_epoch,
            "total_steps": self.config.total_steps,
            "model": self.network.state_dict(),
            "trainable": self.module.trainable_state(),
            "ema": self.ema_net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "poly", "exponent": 0.9, "base_lr": self.config.lr, "step": self.step,
                          "total_steps": self.config.total_steps},
            "rng": rng_state(),
            "sampler": {"seed": self.data.seed, "next_batch": self.step, "world_size": self.world},
            "epoch_sums": dict(self.epoch_sums),
            "epoch_count": self.epoch_count,
            "epoch_seconds": self.epoch_seconds,
            "history": self.history,
            "epoch_end_pending": getattr(self, "_epoch_end_pending", None),
            "best": self.best,
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self, which: str = "latest") -> None:
        if self.is_main:
            atomic_torch_save(self.state(), self.run_dir / f"checkpoint_{which}.pt")
            if which == "latest":
                self._saved_step = self.step

    def _kept(self) -> str:
        """What a diverged run leaves to go back to, in words."""
        saved = self._saved_step
        if saved is None and (self.run_dir / "checkpoint_latest.pt").is_file():
            return f"its last good checkpoint stays in {self.run_dir / 'checkpoint_latest.pt'}"
        if saved is None:
            return "before its first checkpoint (nothing to resume from)"
        return f"its last good checkpoint (iteration {saved}) stays in {self.run_dir / 'checkpoint_latest.pt'}"

    def require_finite_weights(self) -> None:
        """Refuse to go on (validate, checkpoint, export) with weights that became NaN or infinite.

        A loss that turns non-finite stops the run in :meth:`train_step`; this catches the step before,
        whose update already spoilt the weights, so that no checkpoint or safetensors file ever holds them
        and the last good checkpoint stays the latest one.

        Raises:
            ReCoKDError: one line naming the tensor and the iteration, and what was kept.
        """
        for which, net in (("network", self.network), ("EMA network", self.ema_net)):
            for name, tensor in net.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ReCoKDError(
                        f"{self.name}: the {which}'s weights became NaN/Inf (tensor {name}) by iteration {self.step} "
                        f"(epoch {max(self.step - 1, 0) // self.config.iters_per_epoch + 1}); the training diverged "
                        f"and was stopped, {self._kept()}; lower --lr")

    @contextlib.contextmanager
    def memory_guard(self, during: str):
        """Turn running out of memory inside the block into :meth:`out_of_memory`'s one line."""
        try:
            yield
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self.out_of_memory(during) from None
            raise

    def out_of_memory(self, during: str) -> ReCoKDError:
        """The one-line error for running out of memory ``during`` training or validation: the patch and
        batch, a smaller setting more likely to fit, and the checkpoint that holds the work so far."""
        c = self.config
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        where = "the GPU" if self.device.type == "cuda" else "this machine"
        if c.batch_size > 1:
            smaller = f"--batch-size {c.batch_size // 2} (half the activations)"
        else:  # halve the largest axis: about half the activations, still a multiple of the old patch's stride
            axis = int(np.argmax(c.patch_size))
            patch = list(c.patch_size)
            step = math.gcd(*patch)
            patch[axis] = max(step, (patch[axis] // 2) // step * step)
            smaller = f"--patch-size {' '.join(map(str, patch))} (about half the activations)"
        checkpoint = self.run_dir / "checkpoint_latest.pt"
        kept = (f"the work up to iteration {self._saved_step} is in {checkpoint} (--resume continues it where more "
                "memory is free)") if checkpoint.is_file() else "no checkpoint was written yet"
        return ReCoKDError(f"{self.name}: {where} ran out of memory while {during} at iteration {self.step + 1} "
                           f"(patch {list(c.patch_size)}, batch {c.batch_size}); {kept}; or start a new run with "
                           f"{smaller}")

    def resume(self, path: str | Path | None = None) -> None:
        ckpt = load_checkpoint(path or self.run_dir / "checkpoint_latest.pt")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ReCoKDError(f"checkpoint format {ckpt.get('format')!r} is not {CHECKPOINT_FORMAT}; start a new run")
        if ckpt["total_steps"] != self.config.total_steps:
            raise ReCoKDError(
                f"the checkpoint is for {ckpt['total_steps']} iterations but this run has {self.config.total_steps}; "
                "resume with the same --epochs and --iters-per-epoch"
            )
        if ckpt["sampler"]["world_size"] != self.world:
            raise ReCoKDError(
                f"the checkpoint was written by {ckpt['sampler']['world_size']} process(es) but {self.world} are running; "
                "resume with the same number of processes"
            )
        self.module.load_trainable_state(ckpt["trainable"])
        self.ema_net.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["grad_scaler"]:
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self._saved_step = self.step
        self.history = list(ckpt["history"])
        self.best = dict(ckpt["best"])
        self.epoch_sums = dict(ckpt["epoch_sums"])
        self.epoch_count = int(ckpt["epoch_count"])
        self.epoch_seconds = float(ckpt["epoch_seconds"])
        self._epoch_end_pending = ckpt.get("epoch_end_pending")  # saved before a validation that did not finish

    # -- logs (the RunLogger owns the files) ---------------------------------------------------
    def write_run_json(self) -> None:
        if self.is_main:
            # epochs_completed: an export refuses a run that never finished an epoch (untrained weights)
            self.logger.write_run_json({**self.run_info, "epochs_completed": len(self.history)}, self.best)

    def plot_curves(self) -> Path | None:
        return self.logger.plot_curves(self.history)

    # -- the loop -----------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, lr: float) -> None:
        """Epoch means of the loss terms, validation (and the best weights), logs and checkpoints."""
        c = self.config
        self.require_finite_weights()  # before anything of this epoch is validated or written
        if self.world > 1 and self.epoch_sums:  # the epoch's loss means over every rank's batches
            keys = sorted(self.epoch_sums)
            sums = torch.tensor([self.epoch_sums[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            self.epoch_sums = {k: float(v) / self.world for k, v in zip(keys, sums.tolist())}
        row: dict = {"epoch": epoch + 1, "lr": lr}
        # skipped (fp16 overflow) steps have no terms: the others' means are over the steps that ran
        ran = max(self.epoch_count - self.epoch_sums.get("skipped", 0.0), 1)
        row.update({f"loss_{k}": v / (self.epoch_count if k == "skipped" else ran) for k, v in self.epoch_sums.items()})
        validate = self.has_validation() and c.val_every > 0 and ((epoch + 1) % c.val_every == 0 or epoch + 1 == c.epochs)
        spread = validate and self.world > 1 and not c.val_patches  # whole cases: every process scores its share
        if validate and self.is_main and not c.val_patches:
            # the epoch's training is kept before validation, which can run out of memory on whole cases (not
            # on a batch of patches); a run resumed from this checkpoint does this epoch's end (validation, logs) first
            self._epoch_end_pending = [epoch, lr]
            self.save_checkpoint("latest")
            self._epoch_end_pending = None
        if validate and (self.is_main or spread):
            with self.memory_guard("validating (whole cases, sliding window)"):
                val = self.validate_cases(spread=True) if spread else self.validate()
        if self.is_main:
            if validate:
                row.update({f"dice_{n}": d for n, d in val["dice_per_class"].items()})
                row["dice_mean"] = val["dice_mean"]
                score = val["dice_mean"] if math.isfinite(val["dice_mean"]) else -1.0
                if not self.best or score > self.best.get("_score", -math.inf):
                    self.best = {"best_epoch": epoch + 1, "best_dice_mean": val["dice_mean"],
                                 "dice_per_class": val["dice_per_class"], "_score": score}
                    save_weights(self.ema_net, self.run_dir / "model_best.safetensors")
                    self._pending_best = True
            row["seconds"] = self.epoch_seconds
        self.history.append(row)
        self.epoch_sums, self.epoch_count, self.epoch_seconds = {}, 0, 0.0
        if self.is_main:
            self.logger.log_epochs(self.history)
            # best before latest: a kill between the two resumes from the previous latest, whose epoch is
            # re-run (bit-exact) and writes both again; the other order could lose checkpoint_best for good
            if getattr(self, "_pending_best", False):
                self.save_checkpoint("best")
                self._pending_best = False
            self.save_checkpoint("latest")
            self.write_run_json()
            if "dice_mean" in row:
                tqdm.write(f"{self.name} epoch {epoch + 1}/{c.epochs}: loss {row.get('loss_total', float('nan')):.4f}, "
                           f"EMA val mean Dice {row['dice_mean']:.3f} (best {self.best.get('best_dice_mean', float('nan')):.3f} "
                           f"at epoch {self.best.get('best_epoch')})")
        if self.world > 1:
            dist.barrier()

    def fit(self, stop_after_epochs: int | None = None) -> list[dict]:
        """Train to the end (or for ``stop_after_epochs`` more epochs, checkpointed); returns the
        per-epoch log rows."""
        c = self.config
        total, ipe = c.total_steps, c.iters_per_epoch
        stop = total
        if stop_after_epochs:
            stop = min(total, (self.step // ipe + stop_after_epochs) * ipe)
        pending = getattr(self, "_epoch_end_pending", None)
        if pending:  # resumed from the checkpoint written before an epoch's validation: finish that epoch first
            self._epoch_end_pending = None
            self.on_epoch_end(int(pending[0]), float(pending[1]))
        self.module.train()
        # pinned host memory makes the non_blocking copies below asynchronous on CUDA
        loader = batch_loader(self.data, self.step, stop, c.num_workers, pin_memory=self.device.type == "cuda")
        bar = tqdm(total=total, initial=self.step, desc=self.name, disable=not self.progress, dynamic_ncols=True,
                   unit="it")
        tick = time.perf_counter()
        for images, labels in loader:
            epoch = self.step // ipe
            lr = self.learning_rate(self.step)
            with self.memory_guard("training"):
                # labels are checked on the host (a GPU step then reads the device once, for its losses), travel
                # as uint8 (int16 beyond 255) and become indices on the device: 8x less to copy
                checked = self.module.check_batch(labels) if hasattr(self.module, "check_batch") else None
                terms = self.train_step(images.to(self.device, non_blocking=True),
                                        labels.to(self.device, non_blocking=True).long(), checked)
            for k, v in terms.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
            self.epoch_count += 1
            self.step += 1
            now = time.perf_counter()
            self.epoch_seconds += now - tick
            bar.update(1)
            bar.set_postfix_str(f"ep {epoch + 1}/{c.epochs} " + " ".join(f"{k} {v:.3g}" for k, v in terms.items()),
                                refresh=False)
            if self.step % ipe == 0:
                self.on_epoch_end(epoch, lr)
            elif c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.require_finite_weights()
                self.save_checkpoint("latest")
            tick = time.perf_counter()
        bar.close()
        if self.step >= total:
            self.finish()
        return self.history

    def finish(self) -> None:
        pending = getattr(self, "_epoch_end_pending", None)
        if pending:  # the last epoch's validation did not finish before the run was resumed
            self._epoch_end_pending = None
            self.on_epoch_end(int(pending[0]), float(pending[1]))
        self.require_finite_weights()
        if self.is_main:
            save_weights(self.ema_net, self.run_dir / "model_final.safetensors")
            if not (self.run_dir / "model_best.safetensors").is_file():  # nothing validated: best = final
                save_weights(self.ema_net, self.run_dir / "model_best.safetensors")
                self.save_checkpoint("best")
            self.write_run_json()
            self.plot_curves()
        if self.is_main and self.config.val_patches and self.val_cases and "final_case_dice_mean" not in self.best:
            # the epochs were scored on patches: the final weights (written above) on whole cases once, best effort
            try:
                final = self.validate_cases()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                tqdm.write(f"{self.name}: out of memory scoring whole validation cases; the final weights are in "
                           f"{self.run_dir / 'model_final.safetensors'} (score them with recokd evaluate)")
            else:
                self.best.update(final_case_dice_mean=final["dice_mean"], final_case_dice_per_class=final["dice_per_class"])
                tqdm.write(f"{self.name}: final EMA weights, whole validation cases: mean Dice {final['dice_mean']:.3f}")
                self.write_run_json()
        self.logger.close()
        if self.world > 1:
            dist.barrier()
