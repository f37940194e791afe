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


#: the fix for an OSError that reached the command line, by errno
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that disk or choose another output",
    errno.EDQUOT: "free space within your quota or choose another output",
    errno.EFBIG: "the file is too large for that file system; choose another output",
    errno.EROFS: "that file system is read-only; choose another path",
    errno.EACCES: "check the permissions of that path, or choose another",
    errno.EPERM: "check the permissions of that path, or choose another",
    errno.EEXIST: "a file is where a folder is needed; choose another path",
    errno.ENOTDIR: "a file is where a folder is needed; choose another path",
    errno.EISDIR: "a folder is where a file is needed; choose another path",
    errno.ENOENT: "check the path (was it moved or removed meanwhile?)",
}


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
        # what no check caught (a library's own file, a path that changed meanwhile): still one line
        fix = _OS_ERROR_FIXES.get(e.errno)
        if fix is None:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{(e.strerror or str(e)).lower()}; {fix}", file=sys.stderr)
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
