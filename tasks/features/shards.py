"""Sharded, resumable filling of a feature store on the one resumable-shard protocol of ``storage/shards.py``.

A store being built lives at ``<store>.partial``. *Prepare* (one coordinator) pre-sizes the zarr arrays,
writes every row's label/id/box and ``_shards/rows.npz`` (what patch each row is), then the protocol's plan
``_shards/plan.json`` last (the store key and the shard layout: a readable plan means *prepared*). *Shards*
(whole-chunk row ranges) are filled by any process; each records ``_shards/shard-<i>.json`` with the sha256
of its rows, trusted only while the rows still hash to it. *Finalize* checks every shard, marks the store
complete, writes its manifest (which covers the state folder, kept) and renames it into place. A run killed
at any point resumes: prepared stores and verified shards are kept, unfinished shards are redone with the
same batches, so the result is identical to an uninterrupted run. :func:`prefetch` overlaps decoding with
the forward pass.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from storage import features as fstore
from storage.layout import write_atomic
from storage.manifest import write_manifest
from storage.shards import ShardState, ShardStateError, shard_ranges

logger = logging.getLogger("patchflow.features")

CHUNK_ROWS = 1024
STATE_DIR = "_shards"
MARKER_PREFIX = "shard-"
ROWS_FILE = "rows.npz"

#: (row indices relative to the shard, BGR patches) batches of rows [start, end) of a plan
Batches = Iterator[tuple[np.ndarray, list[np.ndarray]]]
BatchFn = Callable[[dict[str, np.ndarray], dict[str, Any], int, int, int], Batches]
#: () -> (row plan arrays, labels, sample ids, boxes)
PlanFn = Callable[[], tuple[dict[str, np.ndarray], np.ndarray, list[str], np.ndarray]]


def partial_path(out: Path) -> Path:
    """Where the store ``out`` is built before it is renamed into place."""
    return Path(out).with_name(Path(out).name + ".partial")


def shard_rows(requested: int, chunk_rows: int = CHUNK_ROWS) -> int:
    """Rows per shard: ``requested`` rounded up to whole chunks."""
    return max(1, -(-int(requested) // chunk_rows)) * chunk_rows


def shard_state(part: Path) -> ShardState:
    """The protocol state (plan and shard markers) of the partial store ``part``."""
    return ShardState(part, STATE_DIR, MARKER_PREFIX)


def _plan(state: ShardState, key: str | None = None) -> dict[str, Any]:
    """The checked plan of a prepared partial store (for ``key`` when given); :class:`ShardStateError` if none."""
    plan = state.read_plan()
    n, per = plan.get("n_rows"), plan.get("shard_rows")
    if not (isinstance(n, int) and isinstance(per, int) and n >= 0 and per >= 1):
        raise ShardStateError(f"{state.plan_path} is not a feature store plan; rerun the stage to start over")
    if key is not None and plan.get("store_key") != key:
        raise ShardStateError(f"{state.plan_path} plans another store; rerun the stage to start over")
    if not (state.dir / ROWS_FILE).is_file() or not (state.part / "zarr.json").is_file():
        raise ShardStateError(f"{state.part} is half prepared; rerun the stage to start over")
    return plan


def _ranges(plan: dict[str, Any]) -> list[tuple[int, int]]:
    """Chunk-aligned ``[start, end)`` row ranges of the shards of a plan."""
    return shard_ranges(plan["n_rows"], plan["shard_rows"])


def prepare(
    out: Path,
    key: str,
    make_plan: PlanFn,
    dim: int,
    attrs: dict[str, Any],
    rows_per_shard: int,
    force: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Prepare (or reuse a prepared) partial store of ``out``; returns its number of shards.

    ``make_plan()`` returns ``(row plan arrays, labels, sample ids, boxes)``; it is only called when the
    store is not prepared yet.
    """
    part = partial_path(out)
    state = shard_state(part)
    if not force:
        try:
            have = _plan(state, key)
        except ShardStateError:
            pass
        else:  # shards are verified when filled (reused ones are counted in the build's log line)
            logger.info("resuming %s", part.name)
            return len(_ranges(have))
    if rows_per_shard % chunk_rows:
        raise ValueError(f"rows_per_shard={rows_per_shard} must be a multiple of chunk_rows={chunk_rows}")
    rows, labels, ids, boxes = make_plan()
    n = len(labels)
    shutil.rmtree(part, ignore_errors=True)
    fstore.create_store(
        part, n, dim, {**attrs, "store_key": key, "shard_rows": int(rows_per_shard)}, chunk_rows=chunk_rows
    )
    fstore.write_row_meta(part, labels, ids, boxes)
    buf = io.BytesIO()
    np.savez(buf, **rows)  # type: ignore[arg-type]
    state.dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state.dir / ROWS_FILE, buf.getvalue())
    state.write_plan({"store_key": key, "n_rows": n, "shard_rows": int(rows_per_shard)})  # last: now prepared
    return len(shard_ranges(n, rows_per_shard))


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f4").tobytes()).hexdigest()


def rows_match(part: Path) -> Callable[[dict[str, Any]], bool]:
    """The marker check of ``part``'s shards: the recorded rows still hash to the recorded sha256."""
    return lambda rec: _rows_digest(fstore.read_feature_rows(part, rec["start"], rec["end"])) == rec["sha256"]


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
        except BaseException as exc:
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
    out: Path, index: int, extract: Callable[[list[np.ndarray]], np.ndarray], batches: BatchFn, batch_size: int
) -> dict[str, Any]:
    """Compute the features of shard ``index`` of the prepared partial store of ``out`` (skipped if done)."""
    part = partial_path(out)
    state = shard_state(part)
    if state.finished(index, rows_match(part)) is not None:
        return {"index": index, "skipped": True, "rows": 0, "extract_s": 0.0}
    start, end = _ranges(_plan(state))[index]
    attrs = fstore.store_attrs(part)
    with np.load(state.dir / ROWS_FILE) as z:
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
    state.mark(index, {"start": start, "end": end, "sha256": _rows_digest(feats)})
    return {"index": index, "skipped": False, "rows": end - start, "extract_s": t_fwd}


def finalize(out: Path) -> None:
    """Check every shard, mark the store complete, write its manifest and move it into place."""
    part = partial_path(out)
    state = shard_state(part)
    state.require_all(len(_ranges(_plan(state))), rows_match(part))
    fstore.mark_complete(part, fstore.store_digest(part))
    write_manifest(part)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(part, out)
