"""Exclusive locks on run folders and study jobs, so two processes never write one folder, and waiting
locks on shared cache work (planning, preprocessing), so a second process reuses the first one's result.

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
from typing import IO, Callable, Iterator

__all__ = ["LOCK_NAME", "try_lock", "lock_owner", "locked_folder", "waiting_lock"]

#: the lock file of a run folder
LOCK_NAME = ".recokd.lock"


def try_lock(path: str | Path) -> IO[str] | None:
    """Lock ``path`` (created if needed) for this process and record the holder in it; ``None`` when
    another process holds it. Keep the returned handle open for as long as the lock should last."""
    path = Path(path)
    while True:
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
        try:  # a failed start removes its lock file before releasing it: lock the file that is there now
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
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


@contextmanager
def waiting_lock(path: str | Path, what: str, on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the lock file ``path`` for the ``with`` block, waiting while another process holds it.

    For shared work that a second process should reuse rather than redo or refuse (planning and
    preprocessing into one cache): the waiter gets the lock once the holder is done and then finds its
    result. ``on_wait`` receives one line (``waiting for <what> (pid … on host since …)``) before the
    wait. When the block raises, a lock file this call created is removed again, so a failed first
    start leaves nothing; a waiter that had opened the removed file notices it and locks the new one.
    """
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # removed by a holder that failed: try again
                continue
            created = False
        handle = open(fd, "r+", encoding="utf-8")
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks
            break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait is not None:
                on_wait(f"waiting for {what} ({lock_owner(path)})")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except BaseException:  # interrupted while waiting
                handle.close()
                raise
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed the file after a failure: lock the file that is there now
    os.register_at_fork(after_in_child=handle.close)  # forked children do not keep the lock
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": _dt.datetime.now().replace(microsecond=0).isoformat()}) + "\n")
    handle.flush()
    finished = False
    try:
        yield path
        finished = True
    finally:
        if not finished and created:
            path.unlink(missing_ok=True)  # before the release, so that a waiter sees the file is gone
        handle.close()
