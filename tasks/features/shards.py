"""Sharded, resumable filling of a feature store: prepare once, fill shards anywhere, finalize once.

A store being built lives at ``<store>.partial``: the coordinator *prepares* it (pre-sized zarr
arrays, every row's label/id/box, and ``_plan.npz``: what patch each row is), *shards* (whole-chunk
row ranges) are filled by any process, each recording ``_shards/<i>.json`` with the sha256 of its
rows, and *finalize* checks every shard, marks the store complete, writes its manifest and renames
it into place. A run killed at any point resumes: prepared stores and verified shards are kept,
unfinished shards are redone with the same batches, so the result is identical to an uninterrupted
run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from storage import features as fstore
from storage.layout import write_atomic
from storage.manifest import write_manifest

logger = logging.getLogger("patchflow.features")

CHUNK_ROWS = 1024
PLAN_FILE = "_plan.npz"
SHARD_DIR = "_shards"

#: (row indices relative to the shard, BGR patches) batches of rows [start, end) of a plan
BatchFn = Callable[[dict[str, np.ndarray], dict[str, Any], int, int, int], Iterator[tuple[np.ndarray, list[np.ndarray]]]]


def partial_path(out: Path) -> Path:
    """Where the store ``out`` is built before it is renamed into place."""
    return Path(out).with_name(Path(out).name + ".partial")


def shard_rows(requested: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Rows per shard: ``requested`` rounded up to whole chunks."""
    return max(1, -(-int(requested) // chunk_rows)) * chunk_rows


def shard_ranges(n_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Chunk-aligned ``[start, end)`` row ranges covering ``n_rows``."""
    return [(s, min(s + rows_per_shard, n_rows)) for s in range(0, n_rows, rows_per_shard)]


def _ranges(attrs: dict[str, Any]) -> list[tuple[int, int]]:
    """Shard row ranges of a prepared store, from its attributes."""
    return shard_ranges(int(attrs["n_rows"]), int(attrs["shard_rows"]))


def _prepared_attrs(part: Path, key: str) -> dict[str, Any] | None:
    try:
        attrs = fstore.store_attrs(part)
    except Exception:  # noqa: BLE001 - absent or unreadable: not prepared
        return None
    if attrs.get("prepared") is True and attrs.get("store_key") == key and (part / PLAN_FILE).is_file():
        return attrs
    return None


def prepare(
    out: Path, key: str, make_plan: Callable[[], tuple[dict[str, np.ndarray], np.ndarray, list[str], np.ndarray]],
    dim: int, attrs: dict[str, Any], rows_per_shard: int, force: bool = False, chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Prepare (or reuse a prepared) partial store of ``out``; returns its number of shards.

    ``make_plan()`` returns ``(plan arrays, labels, sample ids, boxes)``; it is only called when the
    store is not prepared yet.
    """
    part = partial_path(out)
    have = None if force else _prepared_attrs(part, key)
    if have is not None:  # shards are verified when filled (reused ones are counted in the build's log line)
        logger.info("resuming %s", part.name)
        return len(_ranges(have))
    if rows_per_shard % chunk_rows:
        raise ValueError(f"rows_per_shard={rows_per_shard} must be a multiple of chunk_rows={chunk_rows}")
    plan, labels, ids, boxes = make_plan()
    n = len(labels)
    shutil.rmtree(part, ignore_errors=True)
    fstore.create_store(part, n, dim, {**attrs, "store_key": key, "shard_rows": int(rows_per_shard)}, chunk_rows=chunk_rows)
    fstore.write_row_meta(part, labels, ids, boxes)
    buf = io.BytesIO()
    np.savez(buf, **plan)
    write_atomic(part / PLAN_FILE, buf.getvalue())
    (part / SHARD_DIR).mkdir(exist_ok=True)
    _set_attr(part, "prepared", True)  # last: a half-prepared store is never reused
    return len(shard_ranges(n, rows_per_shard))


def _set_attr(part: Path, name: str, value: Any) -> None:
    import zarr

    zarr.open_group(str(part), mode="r+").attrs[name] = value


def _marker(part: Path, index: int) -> Path:
    return part / SHARD_DIR / f"{index:06d}.json"


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f4").tobytes()).hexdigest()


def shard_done(part: Path, index: int) -> bool:
    """Shard ``index`` is recorded and its rows still hash to the recorded digest."""
    try:
        rec = json.loads(_marker(part, index).read_text())
        return _rows_digest(fstore.read_feature_rows(part, rec["start"], rec["end"])) == rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` computed ahead on a background thread (decoding overlaps the forward pass, which releases
    the GIL); same items in the same order, an exception is raised where it occurred."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():  # the consumer may have stopped early: never block forever
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((False, exc))

    thread = threading.Thread(target=run, name="patchflow-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def fill_shard(
    out: Path, index: int, extract: Callable[[list[np.ndarray]], np.ndarray], batches: BatchFn, batch_size: int,
) -> dict[str, Any]:
    """Compute the features of shard ``index`` of the prepared partial store of ``out`` (skipped if done)."""
    part = partial_path(out)
    if shard_done(part, index):
        return {"index": index, "skipped": True, "rows": 0, "extract_s": 0.0}
    attrs = fstore.store_attrs(part)
    if attrs.get("prepared") is not True:
        raise fstore.FeatureStoreError(f"{part} is not prepared; run the feature stage's prepare step first")
    start, end = _ranges(attrs)[index]
    with np.load(part / PLAN_FILE) as z:
        plan = {k: z[k] for k in z.files}
    feats = np.full((end - start, int(attrs["dim"])), np.nan, dtype=np.float32)
    t_fwd = 0.0
    for rows, patches in prefetch(batches(plan, attrs, start, end, batch_size)):
        t = time.perf_counter()
        feats[rows] = extract(patches)
        t_fwd += time.perf_counter() - t
    if np.isnan(feats).any():
        raise fstore.FeatureStoreError(
            f"{part}: shard {index} has NaN features: the backbone produced NaN (check backbone.weights and "
            "task.precision) or rows were not computed"
        )
    fstore.write_feature_rows(part, start, feats)
    write_atomic(_marker(part, index), json.dumps({"start": start, "end": end, "sha256": _rows_digest(feats)}))
    return {"index": index, "skipped": False, "rows": end - start, "extract_s": t_fwd}


def n_shards(out: Path) -> int:
    """Number of shards of the prepared partial store of ``out``."""
    return len(_ranges(fstore.store_attrs(partial_path(out))))


def finalize(out: Path) -> None:
    """Check every shard, mark the store complete, write its manifest and move it into place."""
    part = partial_path(out)
    missing = [i for i in range(n_shards(out)) if not shard_done(part, i)]
    if missing:
        raise fstore.FeatureStoreError(f"{part}: shards {missing} are not done; rerun the feature stage to fill them")
    fstore.mark_complete(part, fstore.store_digest(part))
    write_manifest(part)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)


def prune_stale_partials(folder: Path, max_age_days: float = 7.0, patterns: tuple[str, ...] = ("*.partial",)) -> list[Path]:
    """Remove partial outputs (folders) untouched for ``max_age_days``: left by killed runs of inputs never run again."""
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
