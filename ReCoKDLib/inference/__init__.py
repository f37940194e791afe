"""Inference: sliding-window prediction, the bundle predictor, and ONNX / TorchScript export."""

from .sliding_window import predict_labels, predict_logits
from .predictor import Predictor

__all__ = ["predict_labels", "predict_logits", "Predictor"]
