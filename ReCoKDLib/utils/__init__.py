"""Small helpers: ``io`` (atomic writes, JSON; no torch) and ``runtime`` (devices, seeds, CPU threads).

Nothing is imported here, so ``ReCoKDLib.utils.io`` stays importable where torch is not installed yet
(3D Slicer writes its sample data before the first segmentation installs PyTorch).
"""
