"""The one exception type users see: a single line naming the problem and the fix."""


class ReCoKDError(ValueError):
    """A user-facing error. Its message is one line: what is wrong, where, and how to fix it.

    The command line prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputCheckError(ReCoKDError):
    """An input unlike the model's training data (spacing, field of view, size, intensities; see
    :data:`ReCoKDLib.inference.predictor.INPUT_CHECKS`): the checks a user may skip (``--force``, the
    3D Slicer module's *Segment anyway*), unlike other errors. ``lines`` holds one line per finding."""

    def __init__(self, lines):
        self.lines = [" ".join(str(line).split()) for line in ([lines] if isinstance(lines, str) else lines)]
        more = f" (and {len(self.lines) - 1} more finding(s))" if len(self.lines) > 1 else ""
        super().__init__(self.lines[0] + more)
