"""Project-wide runtime defaults: the storage root and Prefect's environment.

Imported (for its side effect) by ``tasks`` and ``flows`` before anything imports prefect, so the
project, not the user, sets telemetry off and a tolerant ephemeral-server start-up. Every value is
a default: a variable already set in the environment wins. It also installs the override that starts
Prefect's temporary API server out of reach of a terminal's Ctrl-C (``storage/prefect_server.py``).
"""

from __future__ import annotations

import os
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


def results_dir(root: Path) -> Path:
    """Where Prefect persists task results and cache records."""
    return root / "prefect-results"


def locks_dir(root: Path) -> Path:
    """Where the file lock manager keeps its locks (must be shared by all workers)."""
    return root / "locks"


apply_prefect_defaults()
prefect_server.install()  # Prefect's temporary server in its own session, guarded (see storage/prefect_server.py)
