"""On-disk layout of a patch dataset (Quadra's, exactly) plus patchflow's sidecar file.

```
<root>/info.json                      Quadra's keys only (Quadra loads it with PatchDatasetInfo(**json))
<root>/patchflow.json                 our sidecar: version, fingerprint, parameters, counts
<root>/original/{images,masks,labelled_masks}/
<root>/train/*.h5, train/<train_filename>
<root>/val/<class>/[#DISCARD#]<stem>_<idx>.png
<root>/test/<class|None>/[#DISCARD#]<stem>_<idx>.png
```
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.paths import siblings_with_prefix

logger = logging.getLogger("patchflow.dataset")

INFO_FILE = "info.json"
SIDECAR_FILE = "patchflow.json"
INFO_KEYS = ("patch_size", "patch_number", "overlap", "annotated_good", "train_files", "val_files", "test_files")
DISCARD_PREFIX = "#DISCARD#"
NONE_CLASS = "None"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PATCH_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def patch_name(stem: str, index: int, discard: bool, suffix: str = "", ext: str = ".png") -> str:
    """File name of a val/test patch: ``[#DISCARD#]<stem>_<idx><suffix>.png``."""
    return f"{DISCARD_PREFIX if discard else ''}{stem}_{index}{suffix}{ext}"


def parse_patch_name(name: str) -> tuple[str, int, bool]:
    """``(image stem, patch index, discard)`` from a patch file name."""
    discard = name.startswith(DISCARD_PREFIX)
    base = name[len(DISCARD_PREFIX) :] if discard else name
    base = os.path.splitext(base)[0]
    stem, _, idx = base.rpartition("_")
    if not stem or not idx.isdigit():
        raise ValueError(f"{name!r} is not a patch file name <stem>_<index>.<ext>")
    return stem, int(idx), discard


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file atomically: a hidden temp file beside it, then rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), stable formatting."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_info(root: Path, info: dict[str, Any]) -> None:
    """Write ``info.json`` with exactly Quadra's keys."""
    extra = set(info) - set(INFO_KEYS)
    if extra:
        raise ValueError(f"info.json keys must be Quadra's; move {sorted(extra)} to {SIDECAR_FILE}")
    write_json(root / INFO_FILE, {k: info.get(k) for k in INFO_KEYS})


class DatasetFormatError(ValueError):
    """The patch dataset on disk is malformed; the message names the file and the fix."""


def read_info(root: Path) -> dict[str, Any]:
    """Read and check ``info.json``; a clear error if the folder is not a patch dataset."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise DatasetFormatError(
            f"{Path(root)} is not a patch dataset: {path} not found. Point data_path at the folder "
            "that holds info.json, train/, val/ and test/ (as written by the dataset generation stage)."
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path} is not valid JSON ({exc}); regenerate the patch dataset") from exc
    if not isinstance(info, dict):
        raise DatasetFormatError(f"{path} must hold a JSON object, got {type(info).__name__}")
    missing = [k for k in INFO_KEYS if k not in info]
    if missing:
        raise DatasetFormatError(f"{path} lacks keys {missing}; regenerate the patch dataset")
    ps = info.get("patch_size")
    if ps is not None and (
        not isinstance(ps, (list, tuple)) or len(ps) != 2 or any(not isinstance(v, int) or v < 1 for v in ps)
    ):
        raise DatasetFormatError(f"{path}: patch_size must be null or [height, width] positive ints, got {ps!r}")
    return info


def read_sidecar(root: Path) -> dict[str, Any] | None:
    """Our sidecar, or None for datasets written by Quadra (or damaged ones)."""
    try:
        return json.loads((Path(root) / SIDECAR_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_patch_dataset(root: Path) -> bool:
    """True if ``root`` looks like a patch dataset (ours or Quadra's)."""
    root = Path(root)
    if not (root / INFO_FILE).is_file():
        return False
    try:
        info = json.loads((root / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(info, dict) and set(INFO_KEYS) <= set(info)


def is_complete(root: Path, fingerprint: str | None = None) -> bool:
    """Complete dataset (sidecar written last) whose fingerprint matches, if one is given."""
    side = read_sidecar(root)
    if not side or not side.get("complete") or not (Path(root) / INFO_FILE).is_file():
        return False
    return fingerprint is None or side.get("fingerprint") == fingerprint


def check_output_folder(root: Path) -> None:
    """Refuse to write over a folder holding anything but a patch dataset (never delete user data)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output_folder {root} is a file; choose a folder path")
    resolved = root.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise FileExistsError(f"output_folder {root} is a filesystem root or your home folder; choose a sub-folder")
    cwd = Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents:
        raise FileExistsError(
            f"output_folder {root} is the current folder {cwd} or holds it; a build replaces that folder as a whole. "
            "Choose a sub-folder such as extraction_data"
        )
    if root.is_dir() and any(root.iterdir()) and not is_patch_dataset(root):
        raise FileExistsError(
            f"output_folder {root} exists, is not empty and is not a patch dataset (no valid {INFO_FILE}); "
            "refusing to replace it. Choose a new or empty folder."
        )


def temp_sibling(root: Path) -> Path:
    """A fresh temporary folder next to ``root`` (same filesystem, so rename is atomic)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def build_folder_pattern(root: Path) -> re.Pattern[str]:
    """Names of the hidden siblings a build of ``root`` makes: ``.<name>.partial-<16 hex>`` (resumable build),
    ``.<name>.tmp-<pid>-<8 hex>`` (one-off build) and ``.<name>.old-<8 hex>`` (a replaced dataset being removed).
    Matched literally: the folder name is escaped, never used as a glob pattern."""
    kinds = r"partial-[0-9a-f]{16}|tmp-\d+-[0-9a-f]{8}|old-[0-9a-f]{8}"
    return re.compile(rf"\.{re.escape(Path(root).name)}\.({kinds})")


def stale_build_folders(root: Path, keep: Path | None = None) -> list[Path]:
    """Build folders of ``root`` other than ``keep``: left by killed runs (call it holding :func:`build_lock`)."""
    pattern = build_folder_pattern(root)
    return [
        p
        for p in siblings_with_prefix(root, f".{Path(root).name}.")
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and p != keep
    ]


_HELD_LOCKS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "patchflow_build_locks", default=frozenset()
)


def lock_path(root: Path) -> Path:
    """The lock file that serialises builds of the dataset folder ``root``: ``.<name>.lock`` beside it."""
    root = Path(root)
    return root.parent / f".{root.name}.lock"


def _open_locked(path: Path, root: Path) -> int:
    """Open and exclusively ``flock`` the lock file ``path`` (waiting for its holder); a descriptor of the file
    that is still at ``path`` (a holder removes it on release, so a waiter may have locked a removed one)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot create the lock file {path} ({os.strerror(exc.errno or 0)}); "
                f"the folder that holds output_folder {root} must be writable",
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another build of %s to finish (it holds %s)", root, path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Hold the exclusive lock of the dataset folder ``root`` for a whole build: a second build of the same
    folder (another process, another seed) waits until this one has published or failed. Released by the OS
    when the holder dies, so a killed run never blocks later ones. Re-entrant within one call chain (the flow
    holds it around its tasks, which take it again)."""
    key = str(lock_path(root))
    if key in _HELD_LOCKS.get():
        yield
        return
    Path(root).parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(Path(key), Path(root))
    token = _HELD_LOCKS.set(_HELD_LOCKS.get() | {key})
    try:
        yield
    finally:
        _HELD_LOCKS.reset(token)
        with contextlib.suppress(OSError):
            os.unlink(key)  # still holding it: a waiter that opened this file retries on the new one
        os.close(fd)


def publish(tmp: Path, root: Path) -> None:
    """Replace ``root`` with the finished ``tmp`` folder (old dataset moved aside, then removed)."""
    root = Path(root)
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(root, old)
    os.replace(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_path(stored: str | None, root: Path) -> Path | None:
    """Turn a path stored in info.json/h5 back into a usable path (relative ones join the dataset root)."""
    if stored is None:
        return None
    p = Path(stored)
    return p if p.is_absolute() else Path(root) / p
