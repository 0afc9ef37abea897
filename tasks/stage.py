"""Cached stages: Prefect tasks keyed by content, served from the cache only while their output is intact.

Prefect's ``INPUTS`` hashes a path as its string and is not namespaced by task (two tasks with the
same inputs collide); ``TASK_SOURCE`` ignores helpers. So each stage computes its own content key
(a plain function in its package's ``stage.py``, testable without Prefect) and passes it as the
``key`` parameter; :class:`ContentKey` keys the cache record on ``task name + key``. Concurrent runs of
the same key compute it once (SERIALIZABLE isolation with the reclaiming file locks of
``tasks/locks.py``). :func:`run_stage` is the one way a flow runs a stage: from the cache only when not
forced and the output still verifies, else (re)built; :func:`build_once` is the matching task body.

Cache records hold JSON only (:data:`RESULT_SERIALIZER`: our stages return paths and JSON metrics).
Prefect decodes a record with the serializer *named inside the record*, so a planted record saying
``"serializer": {"type": "pickle"}`` would be unpickled on a cache hit whatever the task configures,
and Prefect's own JSON decoder imports any module named in a ``__class__`` key. So before a stage
runs, :func:`record_is_plain_json` reads its record as plain JSON; any other record is ignored (the
stage recomputes and overwrites it) and never reaches Prefect's decoder.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.serializers import JSONSerializer
from prefect.transactions import IsolationLevel

from storage.fingerprint import combine
from storage.settings import results_dir
from tasks.locks import lock_manager

logger = logging.getLogger("patchflow.stage")


@dataclass
class ContentKey(CachePolicy):
    """Cache key = task name + the value of the ``key_param`` argument (a content fingerprint)."""

    key_param: str = "key"

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        key = inputs.get(self.key_param)
        if not key:
            return None
        return combine(task_ctx.task.name, str(key))


def content_policy(root: Path, key_param: str = "key") -> CachePolicy:
    """:class:`ContentKey` with serialisable isolation and a reclaiming file lock manager under ``root``."""
    return ContentKey(key_param=key_param).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=lock_manager(root)
    )


#: results are plain JSON, decoded without Prefect's object hook (which imports the module named in ``__class__``)
RESULT_SERIALIZER = JSONSerializer(object_decoder=None)


def record_is_plain_json(root: Path, task_name: str, key: str) -> bool:
    """True when the cache record of ``task_name``/``key`` under ``root`` is absent or a plain JSON record as
    :data:`RESULT_SERIALIZER` writes it; anything else (a pickle record, another decoder) is not to be read."""
    path = results_dir(root) / combine(task_name, str(key))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        record = json.loads(raw)
        ser = record["metadata"]["serializer"]
        ok = (
            ser.get("type") == "json"
            and ser.get("jsonlib") == "json"
            and ser.get("object_decoder") is None
            and not ser.get("loads_kwargs")
            and isinstance(record.get("result"), str)
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        logger.warning(
            "cache record %s is not a plain JSON record (written by an older patchflow, or planted): "
            "it is ignored and the stage recomputed",
            path,
        )
    return ok


def cached_stage(task_fn: Any, root: Path, force: bool, done: bool) -> Any:
    """``task_fn`` with the content-keyed cache under ``root``; refreshed when forced or when its output is missing.

    A cache hit does not check that a stage's outputs still exist, so the flow passes ``done``
    (the output is present, complete and unchanged) and a missing or altered output is rebuilt,
    never served. A cache record that is not plain JSON is never read (the stage is recomputed).
    """
    signature = inspect.signature(task_fn.fn)

    def run(*args: Any, **kwargs: Any) -> Any:
        key = signature.bind(*args, **kwargs).arguments.get("key")
        plain = not key or record_is_plain_json(root, task_fn.name, key)
        stage = task_fn.with_options(
            cache_policy=content_policy(root),
            result_storage=results_dir(root),
            result_serializer=RESULT_SERIALIZER,
            refresh_cache=force or not done or not plain,
        )
        return stage(*args, **kwargs)

    return run


def build_once(out: str | Path, force: bool, verify: Callable[[Path], bool], build: Callable[[], Any]) -> str:
    """The body of a cached stage: ``build()`` unless ``out`` already verifies (a concurrent run may have built
    it while this one waited for the lock) and it is not forced; returns ``out`` as a string."""
    if force or not verify(Path(out)):
        build()
    return str(out)


def run_stage(
    task_fn: Any, root: Path, out: str | Path, verify: Callable[[Path], bool], force: bool, *args: Any, **kwargs: Any
) -> Any:
    """Run ``task_fn(*args, **kwargs)`` as a cached stage under ``root``: served from the cache only when it is not
    ``force``d and its output ``out`` still ``verify``s (present, complete, unchanged), else (re)built."""
    return cached_stage(task_fn, root, force, verify(Path(out)))(*args, **kwargs)
