"""A model registry: a JSON file listing bundles by name with their URL and sha256.

Format (validated against ``resources/registry.schema.json``)::

    {"version": 1,
     "models": [{"name": "phantom-student", "url": "https://…/phantom-student.recokd",
                 "sha256": "<64 hex>", "description": "…", "size": 123456}]}

``url`` may be ``http(s)://``, ``file://`` or a plain path (relative paths are relative to the
registry file), so everything works offline. Downloads stream to a temporary file in the cache, are
checked against the sha256 and only then renamed into place; a cached file is re-verified before use.
A download waits at most ``$RECOKD_DOWNLOAD_TIMEOUT`` seconds (default 30) for the server to connect or
to send more data; a stalled or cut-off download is one error line and leaves nothing in the cache.
A model whose file is local already (a built-in model, a ``file://`` URL) is used in place, after its
sha256 check, when the cache cannot be written (a read-only ``$RECOKD_HOME``).

The cache lives outside any 3D Slicer version folder, so models survive Slicer upgrades:
``$RECOKD_HOME/models`` when set, else ``%LOCALAPPDATA%\\ReCoKD\\models`` (Windows),
``~/Library/Caches/ReCoKD/models`` (macOS) or ``$XDG_CACHE_HOME/recokd/models`` (default
``~/.cache/recokd/models``, Linux).
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ReCoKDError
from ..utils.io import atomic_write, read_json

__all__ = ["RegistryEntry", "Registry", "default_cache_dir", "load_registry", "validate_registry",
           "fetch_model", "resolve_model", "sha256_file", "make_entry", "download_timeout", "DownloadProgress"]

_CHUNK = 1 << 20
#: seconds a download waits for the server to connect or to send more data, unless configured
DEFAULT_DOWNLOAD_TIMEOUT = 30.0
TIMEOUT_ENV = "RECOKD_DOWNLOAD_TIMEOUT"


def default_cache_dir() -> Path:
    """The per-user model cache (see the module docstring)."""
    home = os.environ.get("RECOKD_HOME")
    if home:
        return Path(home).expanduser() / "models"
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "ReCoKD" / "models"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "ReCoKD" / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "recokd" / "models"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    url: str
    sha256: str
    description: str = ""
    size: int | None = None
    fast: str = ""  # the name of its fast variant in the same registry ("" none)


@dataclass(frozen=True)
class Registry:
    entries: dict[str, RegistryEntry]
    base: Path | None = None  # folder that relative URLs are relative to

    def __getitem__(self, name: str) -> RegistryEntry:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ReCoKDError(f"model {name!r} is not in the registry (known: {known}); check the name")
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)


def validate_registry(data: Any, source: str = "registry") -> None:
    """Validate a registry document against the schema; raise a one-line :class:`ReCoKDError`."""
    import jsonschema

    from ..resources import load_schema

    validator = jsonschema.Draft202012Validator(load_schema("registry"))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        message = " ".join(err.message.split())[:160]
        raise ReCoKDError(f"{source} is invalid at {where}: {message}; fix the registry file")
    names = [m["name"] for m in data["models"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ReCoKDError(f"{source} lists model {dupes[0]!r} more than once; keep one entry per name")
    for m in data["models"]:
        fast = m.get("fast")
        if fast is not None and (fast == m["name"] or fast not in names):
            what = "itself" if fast == m["name"] else f"{fast!r}, which it does not list"
            raise ReCoKDError(f"{source}: the fast variant of {m['name']!r} is {what}; name another model of this "
                              "registry as 'fast', or remove the field")


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file."""
    path = Path(path)
    data = read_json(path, "model registry", hint="check the path and the file", kind=None)
    validate_registry(data, f"model registry {path}")
    entries = {
        m["name"]: RegistryEntry(m["name"], m["url"], m["sha256"], m.get("description", ""), m.get("size"),
                                 m.get("fast", ""))
        for m in data["models"]
    }
    return Registry(entries, base=path.parent)


def download_timeout(timeout: float | None = None) -> float:
    """Seconds a download may wait for the server to connect or to send more data: ``timeout`` when
    given, else ``$RECOKD_DOWNLOAD_TIMEOUT``, else :data:`DEFAULT_DOWNLOAD_TIMEOUT`. Bounded so that a
    stalled server ends in an error line instead of a hang."""
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_DOWNLOAD_TIMEOUT
        source = TIMEOUT_ENV
        try:
            timeout = float(raw)
        except ValueError:
            raise ReCoKDError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to e.g. 30, or unset it") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise ReCoKDError(f"{source} {timeout!r} is not a positive number of seconds; give e.g. 30")
    return float(timeout)


def _local_source(url: str, base: Path | None) -> Path | None:
    """The file an ``file://`` URL or a plain path names (relative to ``base``); None for http(s)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise ReCoKDError(f"unsupported URL scheme in {url!r}; use https://, file:// or a path")
    local = Path(url)
    return base / local if not local.is_absolute() and base is not None else local


def _open_source(url: str, base: Path | None, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT):
    """A readable binary stream for an http(s)/file URL or a local path; an http(s) connection waits at
    most ``timeout`` seconds to connect and for each read."""
    local = _local_source(url, base)
    if local is None:
        try:
            return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - scheme checked above
        except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: a malformed URL
            reason = _failure_reason(exc, timeout)
            raise ReCoKDError(f"cannot download {url}: {reason}; check the connection or use a local copy") from None
    if not local.is_file():
        raise ReCoKDError(f"model file {local} (from {url}) does not exist; check the registry entry")
    try:
        return open(local, "rb")
    except OSError as exc:
        raise ReCoKDError(f"cannot read model file {local} ({exc.strerror or exc}); check its permissions") from None


def _failure_reason(exc: BaseException, timeout: float) -> str:
    """What went wrong with a connection, in a few words."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return f"the server sent nothing for {timeout:g} s ({TIMEOUT_ENV})"
    if isinstance(exc, ConnectionResetError):
        return "the connection was reset"
    if isinstance(exc, http.client.IncompleteRead):
        return "the server closed the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _content_length(src: Any) -> int | None:
    """The Content-Length an http(s) response announces, when it is a valid number."""
    headers = getattr(src, "headers", None)
    raw = headers.get("Content-Length") if headers is not None else None
    try:
        return int(raw) if raw is not None and int(raw) >= 0 else None
    except ValueError:
        return None


def _verified_in_place(entry: RegistryEntry, local: Path) -> Path:
    """``local`` itself, after its sha256 check: a model on this disk needs no cache copy."""
    if not local.is_file():
        raise ReCoKDError(f"model file {local} (from {entry.url}) does not exist; check the registry entry")
    digest = sha256_file(local)
    if digest != entry.sha256:
        raise ReCoKDError(f"checksum mismatch for model {entry.name!r} at {local}: expected sha256 {entry.sha256[:16]}…, "
                          f"got {digest[:16]}…; the file is corrupt or the registry is outdated")
    return local


def _remove_empty_folders(created: list[Path]) -> None:
    """Remove the folders in ``created`` (deepest first) that are still empty: a failed fetch leaves no
    empty cache folder it made."""
    for folder in created:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # never made (mkdir failed above it)
        except OSError:
            break  # not empty, or not ours to remove: stop climbing


def fetch_model(
    entry: RegistryEntry,
    cache_dir: str | Path | None = None,
    base: Path | None = None,
    progress: Callable[[int], None] | None = None,
    max_bytes: int | None = None,
    timeout: float | None = None,
) -> Path:
    """The cached, checksum-verified bundle file of ``entry``, downloading it when needed.

    The file is streamed to a temporary file in the cache folder while hashing, verified, and
    renamed into place; a mismatch deletes it and raises. A cached file is re-hashed before use.
    ``progress(bytes so far)`` is called as the data arrives (not for a cached file). An http(s)
    download waits at most ``timeout`` seconds (default :func:`download_timeout`) to connect and for
    each read; a stall, a reset or a body shorter than the Content-Length or the registry's ``size``
    is an "incomplete download" error. A failure leaves no partial file and no empty folder that this
    call created. When the cache cannot be written, a model whose file is local already is used in
    place after its sha256 check; one that must be downloaded is an error.

    Returns:
        ``cache_dir/<name>-<sha256[:12]>.recokd``, or the local model file itself (unwritable cache).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{entry.name}-{entry.sha256[:12]}.recokd"
    if target.is_file() and sha256_file(target) == entry.sha256:
        return target  # a read-only cache that already holds the model is fine
    local = _local_source(entry.url, base)
    created = [p for p in (cache, *cache.parents) if not p.exists()]  # deepest first
    try:
        cache.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a damaged cache entry is simply fetched again
        if not os.access(cache, os.W_OK | os.X_OK):
            raise PermissionError(f"{cache} is not writable")
    except OSError as exc:
        _remove_empty_folders(created)
        if local is not None:
            return _verified_in_place(entry, local)
        raise ReCoKDError(f"cannot store model {entry.name!r} in the model cache {cache} ({exc.strerror or exc}); "
                          "set RECOKD_HOME to a writable folder") from None
    limit = max_bytes or (entry.size + 1 if entry.size else None)
    try:
        seconds = download_timeout(timeout)
    except ReCoKDError:
        _remove_empty_folders(created)
        raise

    def incomplete(reason: str, done: int, expected: int | None) -> ReCoKDError:
        of = f"{done} of {expected}" if expected is not None else f"{done}"
        return ReCoKDError(f"incomplete download of model {entry.name!r} from {entry.url}: {reason} after {of} bytes; "
                           "check the connection and try again")

    def download(tmp: Path) -> None:  # a raise leaves nothing behind (atomic_write removes tmp)
        h = hashlib.sha256()
        total = 0
        with _open_source(entry.url, base, seconds) as src:
            announced = _content_length(src)
            if announced is not None and limit is not None and announced > limit:
                raise ReCoKDError(f"{entry.url} is larger than the registry says ({announced} bytes, not {entry.size}); "
                                  "refusing it")
            expected = max(announced or 0, entry.size or 0) or None  # for "N of M bytes"
            read = getattr(src, "read1", src.read)  # what has arrived: a stall mid-chunk still counts its bytes
            try:
                out = open(tmp, "wb")
            except OSError as exc:
                raise _store_error(entry, cache, exc) from None
            with out:
                while True:
                    try:
                        chunk = read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise incomplete(_failure_reason(exc, seconds), total, expected) from None
                    if not chunk:
                        break
                    total += len(chunk)
                    if limit is not None and total > limit:
                        raise ReCoKDError(f"{entry.url} is larger than the registry says ({entry.size} bytes); refusing it")
                    h.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise _store_error(entry, cache, exc) from None
                    if progress is not None:
                        progress(total)
        if announced is not None and total < announced:
            raise incomplete("the server closed the connection", total, announced)
        if entry.size and total < entry.size:  # complete as sent, yet short of what the registry lists
            raise incomplete("the data ended" if local is None else "the file ended", total, entry.size)
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise ReCoKDError(
                f"checksum mismatch for model {entry.name!r} from {entry.url}: expected sha256 {entry.sha256[:16]}…, "
                f"got {digest[:16]}…; the file is corrupt or the registry is outdated, nothing was cached"
            )

    try:
        return atomic_write(target, download)
    except BaseException:
        _remove_empty_folders(created)
        raise


def _store_error(entry: RegistryEntry, cache: Path, exc: OSError) -> ReCoKDError:
    return ReCoKDError(f"cannot store model {entry.name!r} in the model cache {cache} ({exc.strerror or exc}); "
                       "free some space there or set RECOKD_HOME to another folder")


class DownloadProgress:
    """A tqdm bar on stderr for :func:`fetch_model`'s ``progress`` callback, in bytes of the registry's
    ``size``. The bar appears with the first data, so a model found in the cache shows none."""

    def __init__(self, entry: RegistryEntry):
        self.entry = entry
        self.bar = None

    def __call__(self, done: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.entry.size, desc=f"download {self.entry.name}", unit="B", unit_scale=True,
                            unit_divisor=1024, leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "DownloadProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def builtin_registry_path() -> Path | None:
    """The registry shipped inside ReCoKDLib (``resources/models/registry.json``): models that work offline."""
    path = Path(__file__).resolve().parents[1] / "resources" / "models" / "registry.json"
    return path if path.is_file() else None


def resolve_model(model: str | Path, registry: str | Path | None = None, cache_dir: str | Path | None = None,
                  progress: bool | Callable[[int], None] | None = None, fast: bool = False) -> Path:
    """A local bundle path for ``model``: an existing path as is, else a registry name fetched into the
    cache, looked up in ``registry`` (or ``$RECOKD_REGISTRY``) and then in the built-in registry.

    ``fast``: the model's fast variant instead (its registry entry's ``fast``, as TotalSegmentator's
    ``--fast`` picks its coarser models); a file, or an entry without one, is refused in one line.

    ``progress``: ``True`` shows a download bar on stderr (:class:`DownloadProgress`), a callable gets
    :func:`fetch_model`'s byte counts; ``None`` / ``False`` shows nothing.
    """
    path = Path(model)
    if path.exists():
        if fast:
            raise ReCoKDError(f"--fast picks a registry model's fast variant, and {model} is a file; give the fast "
                              "model's bundle itself, or a registry name")
        return path
    registries = [r for r in (registry or os.environ.get("RECOKD_REGISTRY"), builtin_registry_path()) if r]
    if not registries:
        raise ReCoKDError(f"model {model} is neither a file nor a folder; give a bundle path, or a name with --registry FILE")
    known: list[str] = []
    for source in registries:
        reg = load_registry(source)
        if str(model) in reg.names():
            entry = reg[str(model)]
            if fast:
                if not entry.fast:
                    raise ReCoKDError(f"model {model!r} has no fast variant in {source}; run it without --fast")
                entry = reg[entry.fast]
            if progress is True:
                with DownloadProgress(entry) as bar:
                    return fetch_model(entry, cache_dir=cache_dir, base=reg.base, progress=bar)
            return fetch_model(entry, cache_dir=cache_dir, base=reg.base, progress=progress or None)
        known += reg.names()
    raise ReCoKDError(f"model {model!r} is neither a file nor a registry model (known: {', '.join(known) or 'none'}); "
                      "check the name or give a bundle path")


def make_entry(bundle_path: str | Path, name: str | None = None, url: str | None = None, description: str = "") -> dict[str, Any]:
    """A registry entry for a bundle file: its name, URL (default its ``file://`` URI), sha256 and size."""
    path = Path(bundle_path)
    if not path.is_file():
        raise ReCoKDError(f"{path} is not a bundle file; registries list .recokd files")
    entry: dict[str, Any] = {
        "name": name or path.name.split(".")[0],
        "url": url or path.resolve().as_uri(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }
    if description:
        entry["description"] = description
    return entry
