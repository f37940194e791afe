"""Background processes for the ReCoKD module: start, read progress without blocking, cancel.

A :class:`BackgroundJob` runs a command in its own process group (POSIX: a new session; Windows: a
new process group), so that cancelling kills the whole tree (``os.killpg`` / ``taskkill /T /F``),
including data-loading workers a training run may have started. Two reader threads move the
process's stdout and stderr lines into a queue; :meth:`BackgroundJob.poll` drains it from the
caller's thread (Slicer's GUI calls it from a ``QTimer``), so nothing ever blocks the GUI and no MRML
node is touched off the main thread.

stdout lines follow the protocol of :mod:`ReCoKDLib.inference.slicer_bridge` (``PROGRESS``, ``DEVICE``,
``MODEL``, ``LOG``, ``FETCH``, ``FRAME``, ``CHECK``, ``DONE``, ``ERROR``); any other line is kept as log text.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from .i18n import _

__all__ = ["BackgroundJob", "killProcessTree", "processGroupAlive"]

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


def killProcessTree(pid: int, grace: float = 2.0, process: subprocess.Popen | None = None) -> None:
    """Terminate process ``pid`` and everything in its process group / tree (SIGTERM, then SIGKILL
    after ``grace`` seconds). ``process``, the leader's Popen, is reaped on the way."""
    if sys.platform.startswith("win"):
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process is not None:
            process.poll()  # reap the leader, else its zombie keeps the group "alive"
        if not processGroupAlive(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _answersSignalZero(send, ident: int) -> bool:
    """Whether ``send(ident, 0)`` (``os.kill`` / ``os.killpg``) finds a process: one owned by someone else counts."""
    try:
        send(ident, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processGroupAlive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists (POSIX; zombies of a reaped leader excluded)."""
    if sys.platform.startswith("win"):
        return False
    return _answersSignalZero(os.killpg, pgid)


def processAlive(pid: int) -> bool | None:
    """Whether process ``pid`` exists; None where this cannot be told (Windows: no handle API here)."""
    if sys.platform.startswith("win"):
        return None
    return _answersSignalZero(os.kill, pid)


class BackgroundJob:
    """A command running in the background with line-based progress.

    Args:
        command: the argv to run.
        env: environment (default: this process's).
        cwd: working folder.
        name: how messages refer to the job.
        onLine: called with every raw output line from :meth:`poll` (for a log pane).

    Attributes (updated by :meth:`poll`): ``state`` (running / succeeded / failed / cancelled),
    ``progress`` (0..1), ``device``, ``model`` (the bundle file used), ``result`` (the ``DONE`` payload), ``error`` (one line),
    ``checks`` (the input checks' findings, ``CHECK`` lines: the job stopped before running the network),
    ``lines`` (all output lines), ``elapsed`` (seconds).
    """

    def __init__(self, command: Sequence[str], env: dict | None = None, cwd: str | None = None,
                 name: str = "job", onLine: Callable[[str], None] | None = None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.name = name
        self.onLine = onLine
        self.state = RUNNING
        self.progress = 0.0
        self.device = ""
        self.model = ""
        self.result = ""
        self.error = ""
        self.checks: list[str] = []
        self.frame = (0, 0)  # the frame being segmented (1-based) and the number of frames, from FRAME lines
        self.download = (0, 0)  # a registry model's bytes received and expected (0: unknown), from FETCH lines
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._start = 0.0
        self._end: float | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "BackgroundJob":
        kwargs: dict = {}
        if sys.platform.startswith("win"):
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self._start = time.monotonic()
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        for stream, tag in ((self.process.stdout, "out"), (self.process.stderr, "err")):
            t = threading.Thread(target=self._read, args=(stream, tag), daemon=True, name=f"{self.name}-{tag}")
            t.start()
            self._readers.append(t)
        return self

    def _read(self, stream, tag: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((tag, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((tag, None))

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def elapsed(self) -> float:
        end = self._end if self._end is not None else time.monotonic()
        return max(end - self._start, 0.0) if self._start else 0.0

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    # -- progress ---------------------------------------------------------------------------------
    def _handle(self, tag: str, line: str) -> None:
        self.lines.append(line)
        if self.onLine is not None:
            self.onLine(line)
        if tag != "out":
            return
        kind, _sep, text = line.partition(" ")
        if kind == "PROGRESS":
            try:
                self.progress = min(max(float(text), 0.0), 1.0)
            except ValueError:
                pass
        elif kind == "DEVICE":
            self.device = text.strip()
        elif kind == "MODEL":
            self.model = text.strip()
        elif kind == "DONE":
            self.result = text.strip()
        elif kind == "CHECK":
            self.checks.append(text.strip())
        elif kind in ("FETCH", "FRAME"):
            try:
                done, total = (int(x) for x in text.split()[:2])
            except ValueError:
                return
            if kind == "FETCH":
                self.download = (done, total)
            else:
                self.frame = (done, total)
        elif kind == "ERROR":
            self.error = text.strip()

    def poll(self) -> str:
        """Handle the output that arrived and return the state (never blocks)."""
        while True:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self._handle(tag, line)
        if self.state == RUNNING and self.process is not None and self.process.poll() is not None:
            # the process ended: let the readers deliver what is left, then decide
            for t in self._readers:
                t.join(timeout=5)
            while not self._queue.empty():
                tag, line = self._queue.get_nowait()
                if line is not None:
                    self._handle(tag, line)
            self._end = time.monotonic()
            code = self.process.returncode
            if code == 0 and not self.error:
                self.state = SUCCEEDED
                self.progress = 1.0
            else:
                self.state = FAILED
                if not self.error:
                    tail = [ln for ln in self.lines if ln.strip()][-1:] or [_("exit status {code}").format(code=code)]
                    self.error = _("{name} failed: {line}").format(name=self.name, line=tail[0].strip())
        return self.state

    def wait(self, timeout: float | None = None, callback: Callable[["BackgroundJob"], None] | None = None,
             interval: float = 0.1) -> str:
        """Poll until the job ends (calling ``callback(job)`` after each poll); on ``timeout`` cancel it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == RUNNING:
            if callback is not None:
                callback(self)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self.error = _("{name} took longer than {seconds:.0f} s and was cancelled").format(
                    name=self.name, seconds=timeout)
                break
            time.sleep(interval)
        if callback is not None:
            callback(self)
        return self.state

    def cancel(self) -> None:
        """Kill the whole process tree; the state becomes ``cancelled``."""
        if self.process is None or self.state != RUNNING:
            return
        killProcessTree(self.process.pid, process=self.process)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for t in self._readers:
            t.join(timeout=2)
        while not self._queue.empty():
            tag, line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        self._end = time.monotonic()
        self.state = CANCELLED
        self.error = _("{name} was cancelled").format(name=self.name)
