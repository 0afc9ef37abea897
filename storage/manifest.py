"""Manifests of finished outputs: every file's size, mtime and sha256, written last, checked before reuse.

A cached stage is reused only if its output still matches its manifest, so a deleted, truncated or
edited file makes the stage recompute instead of serving a damaged result. The manifest holds
sizes and sha256 digests only (it is deterministic); checking is cheap: a file whose size and
mtime (kept in a separate hidden stat cache) are unchanged is trusted; one whose mtime changed (a
copy, a touch) is re-hashed and accepted only if its bytes are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from storage.layout import write_atomic

MANIFEST_FILE = "_manifest.json"
STAT_CACHE = ".stat-cache.json"  # mtimes for the fast check; not content, so kept apart from the manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            p = name if rel == "." else f"{rel}/{name}"
            if p not in (MANIFEST_FILE, STAT_CACHE):
                out.append(p)
    return out


def write_manifest(root: Path, known: Mapping[str, tuple[int, str]] | None = None) -> Path:
    """Record every file under ``root`` (call when the output is otherwise final).

    ``known``: ``{relative path: (size, sha256)}`` of files whose digest the writer already computed
    from the bytes it wrote; used when the size still matches, the other files are read and hashed.
    """
    root = Path(root)
    known = known or {}
    entries, mtimes = {}, {}
    for rel in _files(root):
        st = (root / rel).stat()
        size, digest = known.get(rel, (-1, ""))
        entries[rel] = [st.st_size, digest if size == st.st_size else _sha256(root / rel)]
        mtimes[rel] = st.st_mtime_ns
    _write_json(root / STAT_CACHE, mtimes)
    path = root / MANIFEST_FILE
    _write_json(path, {"files": entries})  # deterministic: sizes and digests only
    return path


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, sort_keys=True, separators=(",", ":")))


def manifest_mismatch(root: Path, rehash: bool = False, ignore: Iterable[str] = ()) -> tuple[str, str, str] | None:
    """``None`` if ``root`` matches its manifest, else ``(kind, relative path, detail)``.

    ``kind`` is ``unreadable`` (no or a damaged manifest), ``deleted``, ``added``, ``resized`` or ``modified``.
    ``rehash``: hash every file (ignore the mtime fast path), for files whose bytes are about to be trusted.
    ``ignore``: relative paths that may be added after the manifest was written.
    """
    root = Path(root)
    try:
        entries = {
            str(rel): (int(size), str(digest))
            for rel, (size, digest) in json.loads((root / MANIFEST_FILE).read_text())["files"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ("unreadable", MANIFEST_FILE, "missing or unreadable")
    try:
        mtimes = {} if rehash else json.loads((root / STAT_CACHE).read_text())
    except (OSError, ValueError):
        mtimes = {}
    present = set(_files(root))
    missing = sorted(set(entries) - present)
    if missing:
        return ("deleted", missing[0], f"{len(missing)} file(s) missing")
    extra = sorted(present - set(entries) - set(ignore) - {p for p in present if os.path.basename(p).startswith(".")})
    if extra:
        return ("added", extra[0], f"{len(extra)} file(s) added")
    for rel, (size, digest) in entries.items():
        st = (root / rel).stat()
        if st.st_size != size:
            return ("resized", rel, f"{size} -> {st.st_size} bytes")
        if (not isinstance(mtimes, dict) or st.st_mtime_ns != mtimes.get(rel)) and _sha256(root / rel) != digest:
            return ("modified", rel, "same size, other bytes")
    return None


def manifest_problem(root: Path) -> str | None:
    """``None`` if ``root`` matches its manifest, else what is wrong (missing, extra or changed file)."""
    root = Path(root)
    found = manifest_mismatch(root)
    if found is None:
        return None
    kind, rel, detail = found
    return {
        "unreadable": f"{root / MANIFEST_FILE} is missing or unreadable",
        "deleted": f"{root / rel} was deleted ({detail})",
        "added": f"{root / rel} was added after the output was finished",
        "resized": f"{root / rel} changed size ({detail})",
        "modified": f"{root / rel} was modified",
    }[kind]


def matches_manifest(root: Path) -> bool:
    """``root`` exists and matches its manifest."""
    return manifest_problem(root) is None


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to write into; on success it gets a manifest and replaces ``out``."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        write_manifest(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_file_digest(path: Path) -> None:
    """Record the sha256 of a finished single-file output next to it."""
    write_atomic(_digest_file(Path(path)), _sha256(Path(path)) + "\n")


def file_matches(path: Path) -> bool:
    """``path`` exists and still has the recorded sha256."""
    path = Path(path)
    try:
        return path.is_file() and _digest_file(path).read_text().strip() == _sha256(path)
    except OSError:
        return False
