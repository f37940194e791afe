"""The one exception type users see: a single line naming the problem and the fix."""


class ReCoKDError(ValueError):
    """A user-facing error. Its message is one line: what is wrong, where, and how to fix it.

    The command line prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
