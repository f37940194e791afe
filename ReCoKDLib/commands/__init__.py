"""Sub-commands of ``recokd``: each module here exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` to a handler ``(args) -> exit status``. :mod:`ReCoKDLib.cli` registers the
modules listed in :data:`COMMAND_MODULES`, in order."""

import argparse
from typing import Callable

COMMAND_MODULES = ("demo", "plan", "train", "distill", "benchmark_train", "predict", "export", "evaluate", "benchmark", "benchmark_speed", "benchmark_study", "models")


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
                help: str, description: str) -> argparse.ArgumentParser:
    """Add sub-command ``name`` run by ``func``; the caller adds its options to the parser returned."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p
