"""Project-wide runtime defaults: the storage root and Prefect's environment.

Imported (for its side effect) by ``tasks`` and ``flows`` before anything imports prefect, so the
project, not the user, sets telemetry off and a tolerant ephemeral-server start-up. Every value is
a default: a variable already set in the environment wins. It also installs the override that starts
Prefect's temporary API server out of reach of a terminal's Ctrl-C (``storage/prefect_server.py``).
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from storage import prefect_server

PREFECT_DEFAULTS: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "patchflow",  # stage logs reach the flow run's log in the UI
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # the same functions used as a library, outside any flow
}

STORAGE_ROOT_ENV = "PATCHFLOW_STORAGE_ROOT"
DEFAULT_STORAGE_ROOT = ".patchflow"


def apply_prefect_defaults() -> None:
    """Set the project's Prefect defaults where the environment does not set them."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def storage_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """Root for task results, cache records and locks: config value, else $PATCHFLOW_STORAGE_ROOT, else ./.patchflow."""
    root = configured or os.environ.get(STORAGE_ROOT_ENV) or DEFAULT_STORAGE_ROOT
    return Path(root).expanduser().resolve()


def storage_root_origin(configured: str | os.PathLike[str] | None = None) -> str:
    """Where :func:`storage_root` takes its value from: the config key, the environment variable or the default."""
    if configured:
        return "storage_root"
    if os.environ.get(STORAGE_ROOT_ENV):
        return f"${STORAGE_ROOT_ENV}"
    return f"the default storage root ./{DEFAULT_STORAGE_ROOT}"


def _file_ancestor(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` (or itself) that exists and is not a folder."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def _reason(exc: OSError, path: Path) -> str:
    if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = _file_ancestor(path)
        return "is a file" if blocker in (None, path) else f"lies under {blocker}, which is a file"
    if exc.errno == errno.EROFS:
        return "is on a read-only file system"
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be written: permission denied"
    if exc.errno == errno.ENOSPC:
        return "cannot be written: the disk is full"
    return f"cannot be written ({exc.strerror or exc})"


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as a writable folder (it is created when missing), or None when it can."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            return "is a file"
        probe = path / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return _reason(exc, path)
    return None


def results_dir(root: Path) -> Path:
    """Where Prefect persists task results and cache records."""
    return root / "prefect-results"


def locks_dir(root: Path) -> Path:
    """Where the file lock manager keeps its locks (must be shared by all workers)."""
    return root / "locks"


apply_prefect_defaults()
prefect_server.install()  # Prefect's temporary server in its own session, guarded (see storage/prefect_server.py)
