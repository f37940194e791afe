"""ReCoKDLib: Region- and Context-aware Knowledge Distillation for 3D medical segmentation.

Importable with or without 3D Slicer; importing the package loads no torch. The rooms, in the order
they may import each other (ARCHITECTURE.md):

- ``utils``, ``resources``, ``errors``, ``kd_methods``: the shared vocabulary (torch-free except ``utils.runtime``)
- ``models``      networks (nnU-Net-style DynUNet pairs, one ``UNetSpec``) and feature taps
- ``data``        datasets, validation, fingerprint, plans, preprocessing, the patch batch stream, the phantom
- ``losses``      segmentation loss, the ReCo-KD terms (MS-SARD, MS-CA) and KD baselines
- ``distill``     the ``Distiller`` that binds teacher, student, taps, adapters and losses
- ``deployment``  model bundles and the model registry
- ``inference``   sliding-window prediction, the bundle predictor, export, the Slicer bridge
- ``evaluation``  the one Dice, HD95, surface Dice
- ``training``    the epoch loop, checkpoints, splits
- ``benchmarks``  training and inference benchmarks
- ``workflows``   train/distill runs, the demo, the study and its report
- ``commands``    the ``recokd`` command line (``cli``)
"""

__version__ = "0.1.0"

from .errors import ReCoKDError  # noqa: E402

__all__ = ["ReCoKDError", "__version__"]
