"""Inference: sliding-window prediction."""

from .sliding_window import predict_labels, predict_logits

__all__ = ["predict_labels", "predict_logits"]
