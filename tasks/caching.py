"""Prefect cache policies keyed by content: a stage's key is computed from file contents and parameters.

Prefect's ``INPUTS`` hashes a path as its string and is not namespaced by task (two tasks with the
same inputs collide); ``TASK_SOURCE`` ignores helpers. So each stage computes its own content key
(a plain function, testable without Prefect) and passes it as a parameter; the policy below keys the
cache record on ``task name + that key``. Concurrent runs of the same key compute it once
(SERIALIZABLE isolation with file locks under the shared storage root).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel

from storage.fingerprint import combine
from storage.settings import locks_dir, results_dir


@dataclass
class ContentKey(CachePolicy):
    """Cache key = task name + the value of the ``key_param`` argument (a content fingerprint)."""

    key_param: str = "key"

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = inputs.get(self.key_param)
        if not key:
            return None
        return combine(task_ctx.task.name, str(key))


def content_policy(root: Path, key_param: str = "key") -> CachePolicy:
    """:class:`ContentKey` with serialisable isolation and a file lock manager under ``root``."""
    return ContentKey(key_param=key_param).configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=FileSystemLockManager(lock_files_directory=locks_dir(root)),
    )


def cached_stage(task_fn: Any, root: Path, force: bool, done: bool) -> Any:
    """``task_fn`` with the content-keyed cache under ``root``; refreshed when forced or when its output is missing.

    A cache hit does not check that a stage's outputs still exist, so the flow passes ``done``
    (the output is present and complete) and a missing output is rebuilt, never served.
    """
    return task_fn.with_options(cache_policy=content_policy(root), result_storage=results_dir(root), refresh_cache=force or not done)

