"""ReCoKDLib: Region- and Context-aware Knowledge Distillation for 3D medical segmentation.

Importable with or without 3D Slicer. The sub-packages mirror the architecture:

- ``models``    networks (nnU-Net-style DynUNet pairs) and feature taps
- ``losses``    segmentation loss, the ReCo-KD terms (MS-SARD, MS-CA) and KD baselines
- ``distill``   the ``Distiller`` that binds teacher, student, taps, adapters and losses
- ``data``      the built-in phantom and dataset readers
- ``training``  trainers, evaluation and metrics
"""

__version__ = "0.1.0"

from .errors import ReCoKDError  # noqa: E402

__all__ = ["ReCoKDError", "__version__"]
