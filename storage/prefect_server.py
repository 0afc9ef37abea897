"""Prefect's temporary API server, started so that a terminal's signals and a dead parent cannot break a run.

Why this overrides a private method of Prefect (``SubprocessASGIServer._run_uvicorn_command`` of Prefect
3.9, pinned ``<3.10`` in pyproject.toml):

- Without ``PREFECT_API_URL``, every run starts a temporary uvicorn server with a plain ``subprocess.Popen``,
  in the run's own process group. A terminal sends Ctrl-C (SIGINT) to the whole foreground group, so the
  server died with the run; the flow engine then retried its crash reports against the dead API for about
  75 s and ended in an ``httpx.ConnectError`` traceback.
- Here the server gets a session of its own (``start_new_session=True``): terminal signals (SIGINT, SIGHUP,
  SIGTSTP) reach only the run, which records its crash on a live API and stops the server at exit
  (Prefect's ``atexit`` hook; ``tasks.cli.run_cli`` makes SIGTERM exit through it too).
- A server outside the group no longer dies with it, so it guards itself: a watchdog thread in the server
  process polls ``os.getppid()`` and shuts the server down as soon as it is reparented (its run was
  SIGKILLed or OOM-killed). ``PR_SET_PDEATHSIG`` is not used: it fires when the *thread* that forked the
  server exits, and Prefect starts the server from whichever thread first needs the API.

The override is installed when ``prefect.server.api.server`` is imported (a ``sys.meta_path`` hook: that
import costs seconds, so it is not done eagerly); ``storage.settings`` calls :func:`install` before
anything imports prefect. ``tests/test_signals.py`` fails if a Prefect upgrade bypasses the override
(method renamed, server started another way): it checks that a real run's server sits in its own session
and dies with its parent.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

TARGET = "prefect.server.api.server"
logger = logging.getLogger("patchflow.prefect_server")

# Runs in the server process: the watchdog, then uvicorn exactly as `python -m uvicorn ARGS` would.
GUARD_CODE = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv.pop(1))
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown (closes the database)
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, name="patchflow-parent-watch", daemon=True).start()
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def guarded_command(uvicorn_args: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """``python -m uvicorn ARGS`` with the parent-death watchdog (``parent_pid``: this process by default)."""
    return [sys.executable, "-c", GUARD_CODE, str(parent_pid or os.getpid()), *uvicorn_args]


#: the environment Prefect gives its temporary server (no UI)
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def uvicorn_args(port: int) -> list[str]:
    """The arguments of ``python -m uvicorn`` that Prefect 3.9 starts its temporary server with (on ``port``)."""
    # prefect.__module_path__.parent, found without importing prefect
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # type: ignore[arg-type,union-attr]
    return [
        *("--app-dir", str(app_dir), "--factory", f"{TARGET}:create_app"),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"),
    ]


def _run_uvicorn_command(self: Any) -> subprocess.Popen[Any]:
    """Prefect 3.9's ``SubprocessASGIServer._run_uvicorn_command``, in its own session and guarded."""
    from prefect.settings import get_current_settings

    return subprocess.Popen(
        args=guarded_command(uvicorn_args(self.port)),
        env={**os.environ, **SERVER_ENV, **get_current_settings().to_environment_variables(exclude_unset=True)},
        start_new_session=True,  # a terminal's Ctrl-C reaches the run only; the run stops the server
    )


_run_uvicorn_command.patchflow_guard = True  # type: ignore[attr-defined]  # tests look for it


def _patch(module: ModuleType) -> None:
    cls = getattr(module, "SubprocessASGIServer", None)
    if cls is None or not callable(getattr(cls, "_run_uvicorn_command", None)):
        logger.warning(
            "Prefect's SubprocessASGIServer._run_uvicorn_command is gone (a Prefect upgrade?): Ctrl-C "
            "will stop its temporary server too; see storage/prefect_server.py"
        )
        return
    cls._run_uvicorn_command = _run_uvicorn_command


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``prefect.server.api.server`` like the other finders do, and patches it once it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        original = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this module's own loader object
        return spec


def install() -> None:
    """Install the override now (prefect's server module already imported) or when it is imported."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def is_installed() -> bool:
    """Whether Prefect's temporary server is started by :func:`_run_uvicorn_command` (imports prefect's server)."""
    from prefect.server.api.server import SubprocessASGIServer

    return getattr(SubprocessASGIServer._run_uvicorn_command, "patchflow_guard", False) is True


# --------------------------------------------------------------------------- started early by the command line

EPHEMERAL_SWITCHES = ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE")
_early: dict[str, Any] = {}


def _configured_elsewhere() -> bool:
    """Whether anything besides this process's defaults may choose the API: ``PREFECT_API_URL`` or the ephemeral
    switch in the environment, a ``.env``/``prefect.toml`` (or ``pyproject.toml`` with ``[tool.prefect]``) in the
    working folder, or a Prefect profile that mentions them. Read without importing Prefect; when in doubt, yes."""
    if any(os.environ.get(k) for k in EPHEMERAL_SWITCHES) or os.environ.get("PREFECT_PROFILE"):
        return True
    if Path(".env").exists() or Path("prefect.toml").exists():
        return True
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    for path, marks in ((Path("pyproject.toml"), ("[tool.prefect",)), (profiles, EPHEMERAL_SWITCHES)):
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        except OSError:
            return True
        if any(m in text for m in marks):
            return True
    return False


def start_early(preload: Sequence[str] = ()) -> str | None:
    """Start Prefect's temporary API server now, as Prefect would on the first API call (same command, same
    environment, own session, parent-death watchdog), and point ``PREFECT_API_URL`` at it; the command line calls
    this before Prefect is imported, so the server boots while the flow's modules import, and the process's other
    workers (Dask, pools) use this server instead of each starting one. Nothing is done (None) when the API is
    configured anywhere (:func:`_configured_elsewhere`): Prefect then decides as usual. Stopped at exit.
    ``preload``: modules the flow will import (torch, skops...), imported by :func:`wait_early` while the server
    boots."""
    if _early or _configured_elsewhere() or "prefect" in sys.modules:
        return None
    import atexit
    import socket

    with socket.socket() as sock:  # a free port from the kernel (Prefect draws one from 8000-8999)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        guarded_command(uvicorn_args(port)), env={**os.environ, **SERVER_ENV}, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_UI_URL", "")  # no UI is served: no "View at" link (as Prefect's own start)
    _early.update(process=proc, url=url, preload=list(preload))
    atexit.register(stop_early)
    return url


def _healthy(url: str) -> bool:
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never through a proxy
    try:
        with direct.open(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_early(timeout: float | None = None) -> None:
    """Wait until the server of :func:`start_early` answers ``/health`` (no-op when none was started), importing its
    ``preload`` modules one by one meanwhile (stopping once the server is up: a cached run may not need them); a
    server that exits or does not answer within ``timeout`` seconds ($PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)
    is one ``ConnectionError`` line."""
    import importlib
    import time

    proc = _early.get("process")
    if proc is None or _early.get("ready"):
        return
    limit = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 60)
    # Prefect's own line when it starts the server (its logger: shown like Prefect's other lines)
    logging.getLogger("prefect").info("Starting temporary server on %s", _early["url"].removesuffix("/api"))
    t0 = time.monotonic()
    preload = list(_early.get("preload", ()))
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise ConnectionError(f"Prefect's temporary API server exited with code {proc.returncode}; run again")
        if _healthy(_early["url"]):
            _early["ready"] = True
            return
        if preload:
            importlib.import_module(preload.pop(0))
        else:
            time.sleep(0.05)
    raise ConnectionError(
        f"Prefect's temporary API server did not answer within {limit:.0f} s; set "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher or PREFECT_API_URL to a running server"
    )


def stop_early() -> None:
    """Stop the server of :func:`start_early` (SIGTERM: uvicorn's graceful shutdown; not waited for: it runs in a
    session of its own and its watchdog ends it if it lingers)."""
    proc = _early.pop("process", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
