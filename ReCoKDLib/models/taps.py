"""Backbone-agnostic feature taps: record the outputs of submodules named by their module path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ReCoKDError


@dataclass(frozen=True)
class TapInfo:
    """What a tap yields: its module name, channel count and stride relative to the input."""

    name: str
    channels: int
    stride: tuple[int, ...]


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ReCoKDError(f"a tapped module returned {type(output).__name__}, not a tensor; tap another module")


class FeatureTaps:
    """Forward hooks on the named submodules of any ``nn.Module``.

    After a forward pass, :meth:`features` returns the tapped outputs in the declared order. Call
    :meth:`clear` once they are used (the :class:`~ReCoKDLib.distill.Distiller` does, every step) so no
    tensor outlives its step, and :meth:`close` (or use ``with``) to remove the hooks.

    ``transform`` maps each recorded output (default: the model's ``feature_transform`` attribute, if any),
    e.g. a network that works on transposed axes hands its features back in the input's axes.

    Example::

        with FeatureTaps(net, ["input_block", "downsamples.0"]) as taps:
            net(x)
            f0, f1 = taps.features()
    """

    def __init__(self, model: nn.Module, names: Sequence[str],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not names:
            raise ReCoKDError("no feature taps given; name at least one module")
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            known = ", ".join(n for n in modules if n)[:300]
            raise ReCoKDError(
                f"tap {missing[0]!r} is not a module of {type(model).__name__}; known modules: {known} ..."
            )
        self.model = model
        self.names = list(names)
        self.transform = transform if transform is not None else getattr(model, "feature_transform", None)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            feature = _first_tensor(output)
            self._store[name] = self.transform(feature) if self.transform is not None else feature

        return record

    def features(self) -> list[torch.Tensor]:
        """Tapped outputs of the last forward pass, in the declared order."""
        absent = [n for n in self.names if n not in self._store]
        if absent:
            raise ReCoKDError(f"tap {absent[0]!r} did not run in the last forward pass; is it on the forward path?")
        return [self._store[n] for n in self.names]

    def clear(self) -> None:
        self._store.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def probe(self, input_shape: Sequence[int]) -> list[TapInfo]:
        """Run one dummy forward of shape ``(B, C, D, H, W)`` to learn each tap's channels and stride."""
        param = next(self.model.parameters(), None)
        x = torch.zeros(tuple(input_shape), device=param.device if param is not None else "cpu")
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(x)
            feats = self.features()
        finally:
            self.model.train(was_training)
        infos = []
        for name, f in zip(self.names, feats):
            if f.ndim != x.ndim:
                raise ReCoKDError(f"tap {name!r} yields a {f.ndim}D tensor, expected {x.ndim}D like the input")
            stride = tuple(max(1, round(i / s)) for i, s in zip(x.shape[2:], f.shape[2:]))
            infos.append(TapInfo(name=name, channels=int(f.shape[1]), stride=stride))
        self.clear()
        return infos
