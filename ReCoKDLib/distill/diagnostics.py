"""How strongly each distillation term pulls on the student, against the segmentation loss.

A KD term that does not help may be too weak (its gradient is a rounding error next to the
segmentation loss's), too strong (it drowns the labels), or aimed at the wrong level. The gradient
norm on the student's weights says which, before any tuning: ``λ · ‖∇_θ L_term,k‖ / ‖∇_θ L_seg‖`` is
the term's pull relative to the labels' at level k (``scripts/kd_gradients.py`` prints it for a run).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .distiller import Distiller

__all__ = ["TermGradient", "term_gradients"]


@dataclass(frozen=True)
class TermGradient:
    """One loss term's value and the norm of its gradient on the student's weights.

    ``level`` is the tapped level (0 = highest resolution) with that level's weight ``w_k`` applied, or
    ``None`` for the term summed over its levels (the segmentation loss, logit KD and SKD have no levels).
    Neither value includes λ.
    """

    term: str
    level: int | None
    loss: float
    grad_norm: float


@contextlib.contextmanager
def _only_level(term: torch.nn.Module, level: int) -> Iterator[None]:
    """Zero every level weight of ``term`` but ``level``'s (terms are linear in their level weights)."""
    saved = list(term.level_weights)
    term.level_weights = [w if k == level else 0.0 for k, w in enumerate(saved)]
    try:
        yield
    finally:
        term.level_weights = saved


def _norm(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> float:
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads if g is not None)))


def term_gradients(distiller: Distiller, images: torch.Tensor, labels: torch.Tensor) -> list[TermGradient]:
    """Every term's value and student-weight gradient norm on one batch, per level and summed.

    Args:
        distiller: a :class:`Distiller` (its student in the mode it should be measured in).
        images: (B, C_in, D, H, W); labels: (B, 1, D, H, W) integer.

    Returns:
        The segmentation loss first (``term="seg"``), then for each KD term key (e.g. ``msard_fg``) one
        row per level and one summed row. Gradients are taken on the student only (not the adapters).
    """
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    student_out = distiller.student(images)
    try:
        with torch.no_grad():
            teacher_logits = distiller.teacher(images)
        teacher_feats = [f.detach() for f in distiller.teacher_taps.features()]
        student_feats = distiller.student_taps.features()
        adapted = [a(f) for a, f in zip(distiller.adapters, student_feats)] if len(distiller.adapters) else student_feats
        student_logits = student_out[0] if isinstance(student_out, (list, tuple)) else student_out

        def evaluate(term) -> dict[str, torch.Tensor]:
            if getattr(term, "needs_logits", False):
                return term(student_logits, teacher_logits)
            return term(adapted if getattr(term, "needs_adapter", False) else student_feats, teacher_feats, labels)

        seg = distiller.seg_loss(student_out, labels)
        rows = [TermGradient("seg", None, float(seg.detach()), _norm(seg, params))]
        for term in distiller.kd_terms.values():
            levels = range(len(term.level_weights)) if hasattr(term, "level_weights") else []
            for level in levels:
                with _only_level(term, level):
                    for key, value in evaluate(term).items():
                        rows.append(TermGradient(key, level, float(value.detach()), _norm(value, params)))
            for key, value in evaluate(term).items():
                rows.append(TermGradient(key, None, float(value.detach()), _norm(value, params)))
    finally:
        distiller.teacher_taps.clear()
        distiller.student_taps.clear()
    return rows
