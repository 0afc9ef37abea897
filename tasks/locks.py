"""File locks of the storage root that outlive no process: Prefect's file lock manager, plus leases.

Concurrent runs of the same stage compute it once (Prefect SERIALIZABLE isolation with these locks).
A lock left behind by a process that died (SIGKILL, OOM kill, power loss of a worker) is reclaimed
instead of blocking every later run forever: on the holder's host as soon as its process is gone,
from another host once its lease (renewed every ``LEASE_REFRESH_S``) lapsed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager
from prefect.types._datetime import now, parse_datetime

from storage.fingerprint import combine
from storage.settings import locks_dir

logger = logging.getLogger("patchflow.locks")

#: a lock file still empty after this long was left by a process killed while creating it
EMPTY_LOCK_GRACE_S = 30.0
#: holders touch their lock files this often (a lease), so another host can tell a live holder from a dead one
LEASE_REFRESH_S = float(os.environ.get("PATCHFLOW_LOCK_REFRESH_S", "30"))
#: a lock held from another host and not refreshed for this long is reclaimed: its host died or lost the
#: shared storage (clocks of the hosts must agree to well within this; NTP does)
LEASE_TTL_S = float(os.environ.get("PATCHFLOW_LOCK_TTL_S", "600"))


class _LeaseRefresher:
    """One daemon thread per process that touches the lock files this process holds."""

    def __init__(self) -> None:
        self.paths: set[Path] = set()
        self.guard = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, path: Path) -> None:
        with self.guard:
            self.paths.add(Path(path))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="patchflow-lock-lease", daemon=True)
                self.thread.start()

    def discard(self, path: Path) -> None:
        with self.guard:
            self.paths.discard(Path(path))

    def _run(self) -> None:
        while True:
            time.sleep(LEASE_REFRESH_S)
            with self.guard:
                held = list(self.paths)
            for path in held:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    self.discard(path)
                except OSError:  # shared storage briefly unavailable: try again next round
                    pass


_LEASES = _LeaseRefresher()


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, from /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class ReclaimingLockManager(FileSystemLockManager):
    """Prefect's file lock manager, plus: a lock whose holder is dead is reclaimed.

    Lock files record the holder's host, pid and process start time, and the holder touches them every
    ``LEASE_REFRESH_S``. On the holder's host a lock is stale as soon as its process is gone; from
    another host, once it has not been touched for ``LEASE_TTL_S`` (the holder's host died).
    """

    def _get_lock_info(self, key: str, use_cache: bool = True) -> dict | None:  # type: ignore[override]
        if use_cache and (info := self._locks.get(key)) is not None:
            return info  # type: ignore[return-value]
        path = self._lock_path_for_key(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
        except ValueError:  # being written right now, or its writer died in between
            return {"holder": "", "expiration": None, "path": path, "empty": True}
        info["path"] = path
        exp = info.get("expiration")
        info["expiration"] = parse_datetime(exp) if exp else None
        self._locks[key] = info
        return info

    async def _aget_lock_info(self, key: str, use_cache: bool = True) -> dict | None:  # type: ignore[override]
        return self._get_lock_info(key, use_cache)

    def _stale(self, info: dict) -> bool:
        if info.get("empty"):
            try:
                return time.time() - Path(info["path"]).stat().st_mtime > EMPTY_LOCK_GRACE_S
            except FileNotFoundError:
                return False
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname():
            return isinstance(pid, int) and not _alive(pid, info.get("start"))
        try:  # another host: its lease lapsed
            return time.time() - Path(info["path"]).stat().st_mtime > LEASE_TTL_S
        except FileNotFoundError:
            return False

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is None:
            return False
        if self._stale(info):
            logger.warning(
                "reclaiming lock %s: its holder (pid %s on %s) is gone or stopped renewing it",
                info["path"],
                info.get("pid"),
                info.get("host"),
            )
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        if info.get("empty"):
            return True
        return super().is_locked(key, use_cache=True)

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        while True:
            held_by_another = self.is_locked(key) and not self.is_lock_holder(key, holder)
            if held_by_another and not self.wait_for_lock(key, acquire_timeout):
                return False
            expiration = now("UTC") + timedelta(seconds=hold_timeout) if hold_timeout is not None else None
            pid = os.getpid()
            info = {
                "holder": holder,
                "expiration": str(expiration) if expiration is not None else None,
                "pid": pid,
                "host": socket.gethostname(),
                "start": _process_start(pid),
            }
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.is_lock_holder(key, holder):
                    return True
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(info).encode())
            self._locks[key] = {**info, "expiration": expiration, "path": path}  # type: ignore[typeddict-item]
            _LEASES.add(path)
            return True

    def release_lock(self, key: str, holder: str) -> None:
        _LEASES.discard(self._lock_path_for_key(key))
        super().release_lock(key, holder)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)


def lock_manager(root: Path) -> ReclaimingLockManager:
    """The lock manager of a storage root (its lock folder must be shared by every worker)."""
    return ReclaimingLockManager(lock_files_directory=locks_dir(root))


@contextlib.contextmanager
def stage_lock(root: Path, name: str) -> Iterator[None]:
    """Hold the lock ``name`` under ``root`` (waits for other holders; reclaims dead ones)."""
    manager, holder = lock_manager(root), uuid.uuid4().hex
    key = combine("stage-lock", name)
    manager.acquire_lock(key, holder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            manager.release_lock(key, holder)
