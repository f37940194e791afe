"""Exclusive locks on run folders and study jobs, so two processes never write one folder.

An OS advisory lock (``flock``) on a small file: the operating system releases it when its process
ends, however it ends (kill -9 included), so a lock left by a crash is simply taken over by the next
run. The file records the holder (pid, host, start time) for the message a refused process prints.
Where ``fcntl`` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["LOCK_NAME", "try_lock", "lock_owner", "locked_folder"]

#: the lock file of a run folder
LOCK_NAME = ".recokd.lock"


def try_lock(path: str | Path) -> IO[str] | None:
    """Lock ``path`` (created if needed) for this process and record the holder in it; ``None`` when
    another process holds it. Keep the returned handle open for as long as the lock should last."""
    path = Path(path)
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    # forked children (data-loading workers) share the lock; they close their copy so that a killed run's
    # orphaned workers cannot keep its folder locked
    os.register_at_fork(after_in_child=handle.close)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": _dt.datetime.now().replace(microsecond=0).isoformat()}) + "\n")
    handle.flush()
    return handle


def lock_owner(path: str | Path) -> str:
    """Who holds the lock in ``path``, in words (``pid 123 on host since 2026-…``)."""
    try:
        owner = json.loads(Path(path).read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def locked_folder(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``folder``'s lock (:data:`LOCK_NAME`) for the ``with`` block.

    The folder is created if needed. When the block raises, what this call created is removed again
    (the lock file, and the folder when it is left empty), so a refused or failed start leaves nothing.

    Raises:
        ReCoKDError: another process holds the folder; the message names it and the way out.
    """
    from ..errors import ReCoKDError

    from .io import new_folder

    with new_folder(folder) as folder:
        path = folder / LOCK_NAME
        created_lock = not path.exists()
        handle = try_lock(path)
        if handle is None:
            raise ReCoKDError(f"{folder} is in use by another {what} ({lock_owner(path)}); wait for it to end or "
                              "stop it, or choose another -o folder")
        finished = False
        try:
            yield folder
            finished = True
        finally:
            if not finished and created_lock:
                path.unlink(missing_ok=True)
            handle.close()
