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
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
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


def _run_uvicorn_command(self: Any) -> subprocess.Popen[Any]:
    """Prefect 3.9's ``SubprocessASGIServer._run_uvicorn_command``, in its own session and guarded."""
    import prefect
    from prefect.settings import get_current_settings

    server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    args = [
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(self.port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]
    return subprocess.Popen(
        args=guarded_command(args),
        env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
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
