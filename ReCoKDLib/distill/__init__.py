"""Distillation: the :class:`Distiller` binding teacher, student, taps, adapters and terms."""

from .distiller import DistillOutput, Distiller, linear_warmup

__all__ = ["DistillOutput", "Distiller", "linear_warmup"]
