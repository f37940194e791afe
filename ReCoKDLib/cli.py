"""The ``recokd`` command line. Sub-commands live in :mod:`ReCoKDLib.commands`."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from . import __version__
from .commands import COMMAND_MODULES
from .errors import ReCoKDError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recokd",
        description="ReCo-KD: distil a large 3D segmentation network into a compact student.",
    )
    parser.add_argument("--version", action="version", version=f"recokd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ReCoKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # a write that did not go through atomic_write (a library's own log or cache): still one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror}; free space on that disk or choose another output",
              file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; use a smaller --patch-size, --sw-batch or --batch-size, fewer --workers, "
              "or a machine with more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, unfinished ones were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
