"""Qt-free helpers of the 3D Slicer ReCoKD module (importable under plain Python with ``slicer-core``).

- :mod:`.jobs`          background processes with line-based progress, cancel kills the process tree
- :mod:`.geometry`      volume nodes (RAS) <-> SimpleITK images (LPS), labels back onto a volume's grid
- :mod:`.models`        the model list: registry (bad entries skipped), models folder, files
- :mod:`.dependencies`  checking and installing the Python packages ReCoKDLib needs inside Slicer
"""
