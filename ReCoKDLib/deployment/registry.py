"""A model registry: a JSON file listing bundles by name with their URL and sha256.

Format (validated against ``resources/registry.schema.json``)::

    {"version": 1,
     "models": [{"name": "phantom-student", "url": "https://…/phantom-student.recokd",
                 "sha256": "<64 hex>", "description": "…", "size": 123456}]}

``url`` may be ``http(s)://``, ``file://`` or a plain path (relative paths are relative to the
registry file), so everything works offline. Downloads stream to a temporary file in the cache, are
checked against the sha256 and only then renamed into place; a cached file is re-verified before use.

The cache lives outside any 3D Slicer version folder, so models survive Slicer upgrades:
``$RECOKD_HOME/models`` when set, else ``%LOCALAPPDATA%\\ReCoKD\\models`` (Windows),
``~/Library/Caches/ReCoKD/models`` (macOS) or ``$XDG_CACHE_HOME/recokd/models`` (default
``~/.cache/recokd/models``, Linux).
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ReCoKDError
from ..utils.io import atomic_write, read_json

__all__ = ["RegistryEntry", "Registry", "default_cache_dir", "load_registry", "validate_registry",
           "fetch_model", "resolve_model", "sha256_file", "make_entry"]

_CHUNK = 1 << 20


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


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file."""
    path = Path(path)
    data = read_json(path, "model registry", hint="check the path and the file", kind=None)
    validate_registry(data, f"model registry {path}")
    entries = {
        m["name"]: RegistryEntry(m["name"], m["url"], m["sha256"], m.get("description", ""), m.get("size"))
        for m in data["models"]
    }
    return Registry(entries, base=path.parent)


def _open_source(url: str, base: Path | None):
    """A readable binary stream for an http(s)/file URL or a local path."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        try:
            return urllib.request.urlopen(url, timeout=60)  # noqa: S310 - scheme checked above
        except OSError as exc:
            raise ReCoKDError(f"cannot download {url}: {exc}; check the connection or use a local copy") from None
    if parsed.scheme == "file":
        local = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise ReCoKDError(f"unsupported URL scheme in {url!r}; use https://, file:// or a path")
    else:
        local = Path(url)
        if not local.is_absolute() and base is not None:
            local = base / local
    if not local.is_file():
        raise ReCoKDError(f"model file {local} (from {url}) does not exist; check the registry entry")
    return open(local, "rb")


def fetch_model(
    entry: RegistryEntry,
    cache_dir: str | Path | None = None,
    base: Path | None = None,
    progress: Callable[[int], None] | None = None,
    max_bytes: int | None = None,
) -> Path:
    """The cached, checksum-verified bundle file of ``entry``, downloading it when needed.

    The file is streamed to a temporary file in the cache folder while hashing, verified, and
    renamed into place; a mismatch deletes it and raises. A cached file is re-hashed before use.

    Returns:
        ``cache_dir/<name>-<sha256[:12]>.recokd``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{entry.name}-{entry.sha256[:12]}.recokd"
    if target.is_file() and sha256_file(target) == entry.sha256:
        return target  # a read-only cache that already holds the model is fine
    try:
        cache.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a damaged cache entry is simply fetched again
        if not os.access(cache, os.W_OK | os.X_OK):
            raise PermissionError(f"{cache} is not writable")
    except OSError as exc:
        raise ReCoKDError(f"cannot store model {entry.name!r} in the model cache {cache} ({exc.strerror or exc}); "
                          "set RECOKD_HOME to a writable folder") from None
    limit = max_bytes or (entry.size + 1 if entry.size else None)

    def download(tmp: Path) -> None:  # a raise leaves nothing behind (atomic_write removes tmp)
        h = hashlib.sha256()
        total = 0
        with open(tmp, "wb") as out, _open_source(entry.url, base) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                total += len(chunk)
                if limit is not None and total > limit:
                    raise ReCoKDError(f"{entry.url} is larger than the registry says ({entry.size} bytes); refusing it")
                h.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(total)
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise ReCoKDError(
                f"checksum mismatch for model {entry.name!r} from {entry.url}: expected sha256 {entry.sha256[:16]}…, "
                f"got {digest[:16]}…; the file is corrupt or the registry is outdated, nothing was cached"
            )

    return atomic_write(target, download)


def builtin_registry_path() -> Path | None:
    """The registry shipped inside ReCoKDLib (``resources/models/registry.json``): models that work offline."""
    path = Path(__file__).resolve().parents[1] / "resources" / "models" / "registry.json"
    return path if path.is_file() else None


def resolve_model(model: str | Path, registry: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local bundle path for ``model``: an existing path as is, else a registry name fetched into the
    cache, looked up in ``registry`` (or ``$RECOKD_REGISTRY``) and then in the built-in registry."""
    path = Path(model)
    if path.exists():
        return path
    registries = [r for r in (registry or os.environ.get("RECOKD_REGISTRY"), builtin_registry_path()) if r]
    if not registries:
        raise ReCoKDError(f"model {model} is neither a file nor a folder; give a bundle path, or a name with --registry FILE")
    known: list[str] = []
    for source in registries:
        reg = load_registry(source)
        if str(model) in reg.names():
            return fetch_model(reg[str(model)], cache_dir=cache_dir, base=reg.base)
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
