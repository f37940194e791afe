"""Sub-commands of ``recokd``: each module here exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` to a handler ``(args) -> exit status``. :mod:`ReCoKDLib.cli` registers the
modules listed in :data:`COMMAND_MODULES`, in order."""

COMMAND_MODULES = ("demo", "plan", "train", "distill", "benchmark_train", "predict", "export", "evaluate", "benchmark", "benchmark_study")
