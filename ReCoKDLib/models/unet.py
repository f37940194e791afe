"""nnU-Net-style 3D U-Nets (MONAI ``DynUNet``) and matched teacher/student pairs.

An architecture is described by a small, JSON-serialisable :class:`UNetSpec` (kernel sizes, strides,
filters). The student of a teacher is the same topology (depth, strides, skips) with every level's
channel count divided by a width factor ``R``: ``max(floor(c / R), 8)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetUpBlock
from monai.networks.nets import DynUNet

from ..errors import ReCoKDError

Triple = tuple[int, int, int]

#: nnU-Net's filter progression: 32 at full resolution, doubling per level, capped at 320 for 3D.
NNUNET_BASE_FILTERS = 32
NNUNET_MAX_FILTERS = 320
#: Minimum channel count of any student level.
MIN_STUDENT_CHANNELS = 8


#: decoder kernel conventions (see :class:`UNetSpec`)
DECODER_KERNELS = ("deeper", "own")


def _triple(value: int | Sequence[int], what: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ReCoKDError(f"{what} must be an int or 3 ints per level, got {list(value)}")
    return value  # type: ignore[return-value]


def nnunet_filters(num_levels: int, base: int = NNUNET_BASE_FILTERS, cap: int = NNUNET_MAX_FILTERS) -> list[int]:
    """Channel count per level as nnU-Net chooses it: ``min(base * 2**k, cap)``."""
    return [min(base * 2**k, cap) for k in range(num_levels)]


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a 3D U-Net, one entry per resolution level (level 0 = full resolution).

    Attributes:
        in_channels: input image channels.
        out_channels: number of classes, background included.
        kernel_sizes: convolution kernel per level, each 3 ints.
        strides: down-sampling stride per level, each 3 ints; ``strides[0]`` is the input block's
            (normally 1) and the last entry is the bottleneck's.
        filters: channels per level.
        deep_supervision: return auxiliary lower-resolution outputs in training mode.
        decoder_kernels: which kernel each decoder stage convolves with, where neighbouring levels' kernels
            differ (anisotropic data): ``"deeper"``, the level below's (MONAI ``DynUNet``, ReCoKD's planner),
            or ``"own"``, its own level's (nnU-Net's ``PlainConvUNet``: the students of nnU-Net teachers, so
            they are narrower copies of them and export to nnU-Net).
    """

    in_channels: int
    out_channels: int
    kernel_sizes: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    filters: tuple[int, ...]
    deep_supervision: bool = True
    name: str = field(default="unet", compare=False)
    decoder_kernels: str = "deeper"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(_triple(k, "kernel_sizes") for k in self.kernel_sizes))
        object.__setattr__(self, "strides", tuple(_triple(s, "strides") for s in self.strides))
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        n = len(self.strides)
        if n < 3:
            raise ReCoKDError(f"a U-Net needs at least 3 levels (input, one down-sampling, bottleneck), got {n}")
        if len(self.kernel_sizes) != n or len(self.filters) != n:
            raise ReCoKDError(
                f"kernel_sizes ({len(self.kernel_sizes)}), strides ({n}) and filters ({len(self.filters)}) "
                "must have one entry per level"
            )
        if self.in_channels < 1 or self.out_channels < 2:
            raise ReCoKDError("in_channels must be >= 1 and out_channels (classes incl. background) >= 2")
        if self.decoder_kernels not in DECODER_KERNELS:
            raise ReCoKDError(f"decoder_kernels must be one of {', '.join(DECODER_KERNELS)}, got {self.decoder_kernels!r}")

    # -- derived properties -------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def level_strides(self) -> list[Triple]:
        """Cumulative stride of each level's feature map relative to the input."""
        out, acc = [], (1, 1, 1)
        for s in self.strides:
            acc = tuple(a * b for a, b in zip(acc, s))  # type: ignore[assignment]
            out.append(acc)
        return out

    @property
    def divisor(self) -> Triple:
        """Every patch dimension must be a multiple of this."""
        return self.level_strides[-1]

    @property
    def num_deep_supervision_heads(self) -> int:
        """Auxiliary outputs, one per decoder level except the lowest.

        nnU-Net weights its deep-supervision outputs 1/2^i and gives the lowest-resolution one weight 0;
        we simply do not build that head, so every head we build trains.
        """
        return max(self.num_levels - 3, 0) if self.deep_supervision else 0

    def student(self, width_factor: float = 4) -> "UNetSpec":
        """The student of this teacher: same topology, channels ``max(floor(c / R), 8)``."""
        if width_factor < 1:
            raise ReCoKDError(f"student width factor R must be >= 1, got {width_factor}")
        filters = tuple(max(int(math.floor(c / width_factor)), MIN_STUDENT_CHANNELS) for c in self.filters)
        return replace(self, filters=filters, name=f"{self.name}-student-R{width_factor:g}")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_sizes"] = [list(k) for k in self.kernel_sizes]
        d["strides"] = [list(s) for s in self.strides]
        d["filters"] = list(self.filters)
        if self.decoder_kernels == "deeper":  # the default: descriptions written before the option stay the same
            del d["decoder_kernels"]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetSpec":
        try:
            return cls(
                in_channels=int(d["in_channels"]),
                out_channels=int(d["out_channels"]),
                kernel_sizes=tuple(d["kernel_sizes"]),
                strides=tuple(d["strides"]),
                filters=tuple(d["filters"]),
                deep_supervision=bool(d.get("deep_supervision", True)),
                name=str(d.get("name", "unet")),
                decoder_kernels=str(d.get("decoder_kernels", "deeper")),
            )
        except KeyError as e:
            raise ReCoKDError(f"network description lacks the key {e.args[0]!r}; re-export the model") from None
        except (TypeError, ValueError) as e:
            raise ReCoKDError(f"malformed network description: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "UNetSpec":
        return cls.from_dict(json.loads(text))


def isotropic_spec(
    in_channels: int,
    out_channels: int,
    num_levels: int = 5,
    filters: Sequence[int] | None = None,
    name: str = "unet",
) -> UNetSpec:
    """A spec with 3x3x3 kernels and stride 2 between levels (for isotropic data)."""
    return UNetSpec(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_sizes=tuple((3, 3, 3) for _ in range(num_levels)),
        strides=((1, 1, 1),) + tuple((2, 2, 2) for _ in range(num_levels - 1)),
        filters=tuple(filters) if filters is not None else tuple(nnunet_filters(num_levels)),
        name=name,
    )


class SegUNet(DynUNet):
    """MONAI ``DynUNet`` with nnU-Net conventions (instance norm, leaky ReLU) that, in training mode
    with deep supervision, returns a list of logits at their native resolutions
    ``[full, 1/2, 1/4, ...]`` instead of MONAI's stack of upsampled maps (cheaper, and the labels are
    down-sampled instead, as nnU-Net does). In eval mode it returns the full-resolution logits.

    Shapes: input (B, in_channels, D, H, W) with each dim divisible by ``spec.divisor``;
    output (B, out_channels, D, H, W).
    """

    def __init__(self, spec: UNetSpec):
        heads = spec.num_deep_supervision_heads
        object.__setattr__(self, "_own_level_kernels", spec.decoder_kernels == "own")  # (before nn.Module's init)
        super().__init__(
            spatial_dims=3,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            kernel_size=[list(k) for k in spec.kernel_sizes],
            strides=[list(s) for s in spec.strides],
            upsample_kernel_size=[list(s) for s in spec.strides[1:]],
            filters=list(spec.filters),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=heads > 0,
            deep_supr_num=max(heads, 1),
            res_block=False,
        )
        self.spec = spec

    def get_upsamples(self):
        """DynUNet's decoder; with ``decoder_kernels="own"`` each stage convolves with its own level's kernel
        (nnU-Net's), not the level below's. (Called by ``DynUNet.__init__``, hence ``_own_level_kernels``.)"""
        if not getattr(self, "_own_level_kernels", False):
            return super().get_upsamples()
        return self.get_module_list(self.filters[1:][::-1], self.filters[:-1][::-1], self.kernel_size[:-1][::-1],
                                    self.strides[1:][::-1], UnetUpBlock, self.upsample_kernel_size[::-1],
                                    trans_bias=self.trans_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        if x.ndim != 5:
            raise ReCoKDError(f"{self.spec.name} expects a 5D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
        out = self.output_block(self.skip_layers(x))
        if not (self.training and self.deep_supervision):
            return out
        outputs = [out, *self.heads]
        # Drop our references so no activations outlive the step.
        for i in range(len(self.heads)):
            self.heads[i] = None
        return outputs


def build_unet(spec: UNetSpec) -> SegUNet:
    """Build the network a spec describes."""
    return SegUNet(spec)


def build_pair(teacher_spec: UNetSpec, width_factor: float = 4) -> tuple[SegUNet, SegUNet]:
    """Build a teacher and its narrower student (same topology, channels / ``width_factor``)."""
    return build_unet(teacher_spec), build_unet(teacher_spec.student(width_factor))


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def dynunet_tap_names(spec: UNetSpec, where: str = "encoder") -> list[str]:
    """Default feature taps of a ``SegUNet``, ordered from the highest resolution (level 0) down.

    ``encoder``: the output of every encoder stage except the bottleneck (as the ReCo-KD authors).
    ``decoder``: the output of every decoder stage, at the same resolutions as the encoder taps.
    """
    n = spec.num_levels
    encoder = ["input_block"] + [f"downsamples.{i}" for i in range(n - 2)]
    decoder = [f"upsamples.{i}" for i in reversed(range(n - 1))]
    if where == "encoder":
        return encoder
    if where == "decoder":
        return decoder
    raise ReCoKDError(f"unknown tap set {where!r}; choose 'encoder' or 'decoder'")
