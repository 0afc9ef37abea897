"""One resumable-shard protocol for every output built in pieces (patch datasets, feature stores).

An output is built in a *partial folder* beside it. Its state lives in one state folder inside it:

- the **plan** (``plan.json``, written once and atomically, last of the preparation): what every shard
  holds. A partial folder without a readable plan is not prepared and is started over;
- one **marker** per finished shard (``<prefix><index>.json``, atomic): what the shard wrote, with sizes or
  digests. A marker is trusted only when the caller's check of it passes (its files still have the
  recorded bytes), so a shard killed half-way, or edited since, is redone;
- the caller **finalizes** once every shard's marker checks out, then removes the state folder (or keeps
  it, for feature stores whose manifest covers it) and moves the partial folder into place.

A killed build resumes: the plan and verified shards are kept, the rest is redone with the same plan, so
the result is identical to an uninterrupted build. State files are plain JSON, never pickle: anyone who
can write beside the output could plant them, so readers check what they load.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.layout import DatasetFormatError, write_atomic

logger = logging.getLogger("patchflow.shards")

PLAN_FILE = "plan.json"


class ShardStateError(DatasetFormatError):
    """A build's state files are missing or not what this protocol writes; the message names the file."""


class ShardState:
    """The state folder of one partial build: its plan and its shard markers."""

    def __init__(
        self, part: str | Path, state_dir: str = ".shards", marker_prefix: str = "", stage: str = "the stage"
    ) -> None:
        self.part = Path(part)
        self.dir = self.part / state_dir
        self.prefix = marker_prefix
        self.stage = stage  # named in the messages: "rerun <stage> to resume"

    @property
    def plan_path(self) -> Path:
        """Where the plan is saved."""
        return self.dir / PLAN_FILE

    def marker_path(self, index: int) -> Path:
        """Where shard ``index``'s marker is saved."""
        return self.dir / f"{self.prefix}{int(index):06d}.json"

    def write_plan(self, plan: dict[str, Any]) -> None:
        """Save the plan (atomically; call last when preparing: a readable plan means *prepared*)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.plan_path, json.dumps(plan, separators=(",", ":")))

    def read_plan(self) -> dict[str, Any]:
        """The saved plan; :class:`ShardStateError` naming the file when it is missing or not a JSON object."""
        try:
            plan = json.loads(self.plan_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ShardStateError(
                f"{self.plan_path}: no readable build plan ({exc}); rerun {self.stage} to start over"
            ) from None
        if not isinstance(plan, dict):
            raise ShardStateError(f"{self.plan_path} is not a build plan; rerun {self.stage} to start over")
        return plan

    def mark(self, index: int, record: dict[str, Any]) -> None:
        """Record shard ``index`` as finished with what it wrote (atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.marker_path(index), json.dumps(record, separators=(",", ":")))

    def record(self, index: int) -> dict[str, Any] | None:
        """Shard ``index``'s marker as saved, or None when absent or unreadable."""
        try:
            rec = json.loads(self.marker_path(index).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def finished(self, index: int, check: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """Shard ``index``'s marker when it exists and ``check`` accepts it (its outputs still hold the recorded
        bytes), else None: the shard is to be (re)done."""
        rec = self.record(index)
        if rec is None:
            return None
        try:
            return rec if check is None or check(rec) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def missing(self, count: int, check: Callable[[dict[str, Any]], bool] | None = None) -> list[int]:
        """Indices of the first ``count`` shards that are not finished (or fail ``check``)."""
        return [i for i in range(count) if self.finished(i, check) is None]

    def require_all(self, count: int, check: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """The markers of all ``count`` shards, in order; :class:`ShardStateError` naming the unfinished ones."""
        records = [self.finished(i, check) for i in range(count)]
        todo = [i for i, rec in enumerate(records) if rec is None]
        if todo:
            raise ShardStateError(f"{self.part}: shards {todo} are not finished; rerun {self.stage} to resume")
        return [rec for rec in records if rec is not None]

    def clear(self) -> None:
        """Remove the state folder (when the output itself must not keep it)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def shard_ranges(n_items: int, per_shard: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``per_shard`` items covering ``n_items``."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    return [(s, min(s + per_shard, n_items)) for s in range(0, n_items, per_shard)]


def prune_stale_partials(
    folder: Path, max_age_days: float = 7.0, patterns: tuple[str, ...] = ("*.partial",)
) -> list[Path]:
    """Remove partial folders under ``folder`` untouched for ``max_age_days`` (killed builds of inputs never run
    again). ``folder`` is a storage-root folder and ``patterns`` are constants (never a user path)."""
    removed = []
    cutoff = time.time() - max_age_days * 86400
    for part in sorted({p for pattern in patterns for p in Path(folder).glob(pattern) if p.is_dir()}):
        try:
            newest = max((p.stat().st_mtime for p in part.rglob("*")), default=part.stat().st_mtime)
        except FileNotFoundError:
            continue
        if newest < cutoff:
            shutil.rmtree(part, ignore_errors=True)
            removed.append(part)
            logger.info("removed %s: a partial output untouched for %.0f days", part, max_age_days)
    return removed
