"""Content fingerprints and cache keys: keyed by file contents and parameters, never by paths or mtimes alone."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Bump when a stage's output format or logic changes in a way that must invalidate old caches.
CODE_VERSION = "patchflow-0.1.0"

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Stable JSON text of parameters (sorted keys; paths and tuples normalised)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if callable(obj):  # e.g. mask_preprocessing: keyed by its qualified name and source
        return _callable_identity(obj)
    raise TypeError(f"cannot fingerprint {type(obj).__name__}")


def _callable_identity(fn: Any) -> str:
    import inspect

    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = ""
    return name + ":" + hashlib.sha256(src.encode()).hexdigest()


def params_digest(params: Any) -> str:
    """sha256 of the canonical JSON of ``params``."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()


def combine(*parts: str) -> str:
    """One key from several digests/strings (order matters)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike[str] | None]) -> str:
    """Digest of the contents of files in the given order (None entries count as 'absent')."""
    h = hashlib.sha256()
    for p in paths:
        h.update((file_digest(p) if p is not None else "-").encode())
        h.update(b"\x00")
    return h.hexdigest()


def tree_digest(root: str | os.PathLike[str]) -> str:
    """Digest of every file under ``root``: sorted relative paths plus contents (mtime caches aside)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != ".stat-cache.json"):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\x00")
        h.update(file_digest(p).encode())
    return h.hexdigest()
