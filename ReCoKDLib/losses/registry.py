"""A registry of distillation terms, and named methods composed from them.

A *term* is an ``nn.Module`` built from a :class:`KDContext` and keyword options. A *method* is a list
of terms with a default weight λ_max, e.g. ``recokd = msard + msca``. New terms register with
:func:`register_kd_term`; the :class:`~ReCoKDLib.distill.Distiller` builds whatever a configuration names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from torch import nn

from ..errors import ReCoKDError
from ..kd_methods import KD_METHODS, KDMethod  # noqa: F401 - re-exported: the names live torch-free
from .baselines import ChannelWiseDistillationLoss, FitNetLoss, LogitKDLoss, PairwiseAffinityLoss
from .msard import MSSARDLoss
from .msca import AffinityContextLoss, GlobalContextLoss


@dataclass(frozen=True)
class KDContext:
    """What a term may need to know about the teacher/student pair."""

    num_classes: int
    teacher_channels: tuple[int, ...]
    student_channels: tuple[int, ...]
    level_weights: tuple[float, ...]


KD_TERMS: dict[str, Callable[..., nn.Module]] = {}


def register_kd_term(name: str):
    """Decorator: register a factory ``f(context: KDContext, **options) -> nn.Module`` under ``name``."""

    def decorator(factory):
        if name in KD_TERMS:
            raise ValueError(f"KD term {name!r} is registered already")
        KD_TERMS[name] = factory
        return factory

    return decorator


@register_kd_term("msard")
def _msard(ctx: KDContext, **options) -> nn.Module:
    return MSSARDLoss(ctx.num_classes, ctx.level_weights, **options)


@register_kd_term("msca")
def _msca(ctx: KDContext, **options) -> nn.Module:
    return AffinityContextLoss(ctx.level_weights, **options)


@register_kd_term("msca_gc")
def _msca_gc(ctx: KDContext, **options) -> nn.Module:
    return GlobalContextLoss(ctx.teacher_channels, ctx.level_weights, **options)


@register_kd_term("logit_kd")
def _logit_kd(ctx: KDContext, **options) -> nn.Module:
    return LogitKDLoss(**options)


@register_kd_term("fitnet")
def _fitnet(ctx: KDContext, **options) -> nn.Module:
    return FitNetLoss(ctx.level_weights, **options)


@register_kd_term("cwd")
def _cwd(ctx: KDContext, **options) -> nn.Module:
    return ChannelWiseDistillationLoss(ctx.level_weights, **options)


@register_kd_term("skd")
def _skd(ctx: KDContext, **options) -> nn.Module:
    return PairwiseAffinityLoss(**options)


def resolve_method(method: str | Sequence[str]) -> tuple[tuple[str, ...], float]:
    """Term names and default λ_max for a method name, or for an explicit list of term names."""
    if isinstance(method, str):
        if method not in KD_METHODS:
            raise ReCoKDError(f"unknown KD method {method!r}; choose one of {', '.join(KD_METHODS)}")
        m = KD_METHODS[method]
        return m.terms, m.lambda_max
    unknown = [t for t in method if t not in KD_TERMS]
    if unknown:
        raise ReCoKDError(f"unknown KD term {unknown[0]!r}; choose from {', '.join(KD_TERMS)}")
    return tuple(method), 1.0


def build_kd_terms(
    terms: Sequence[str], context: KDContext, options: Mapping[str, Mapping] | None = None
) -> nn.ModuleDict:
    """Instantiate the named terms; ``options[term]`` holds keyword arguments for that term."""
    options = dict(options or {})
    stray = [k for k in options if k not in terms]
    if stray:
        raise ReCoKDError(f"options given for {stray[0]!r}, which is not among the terms {list(terms)}")
    built = nn.ModuleDict()
    for name in terms:
        factory = KD_TERMS[name]
        opts = dict(options.get(name, {}))
        try:
            built[name] = factory(context, **opts)
        except TypeError as e:
            allowed = _allowed_options(name, context)
            raise ReCoKDError(f"bad option for KD term {name!r} ({e}); allowed: {', '.join(allowed)}") from None
    return built


def _allowed_options(name: str, context: KDContext) -> list[str]:
    probe = KD_TERMS[name](context)
    skip = {"self", "num_classes", "level_weights", "channels"}
    return [p for p in inspect.signature(type(probe).__init__).parameters if p not in skip]
