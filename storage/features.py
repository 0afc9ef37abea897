"""Zarr (v3) feature store: one pre-sized group per training pass / split, filled chunk by chunk.

Layout of a store (a directory ``<name>.zarr``)::

    features    float32 (n_rows, dim)   chunks (chunk_rows, dim)   Blosc lz4 + shuffle
    labels      int16   (n_rows,)       chunks (chunk_rows,)       fill -1
    sample_ids  str     (n_rows,)       chunks (chunk_rows,)       e.g. "<h5 or png name>#<row>"
    boxes       int32   (n_rows, 4)     chunks (chunk_rows, 4)     y0, x0, y1, x1 (padded image coords)

Attributes: the caller's ``attrs`` plus ``n_rows``, ``dim``, ``chunk_rows``, ``complete`` (False until
:func:`mark_complete`) and, once complete, ``content_digest`` (:func:`store_digest` of the values). Stores
built by the feature stage also hold ``_shards/`` (their build state: the plan, ``rows.npz`` saying what
patch each row is, and one marker per shard with the sha256 of its rows; see ``tasks/features/shards.py``)
and ``_manifest.json`` (see ``storage/manifest.py``); :func:`is_verified` checks the latter.

Concurrency rule (zarr 3 has no synchronizer; rows written by two processes into the same chunk are
lost): arrays are pre-sized at creation, one coordinating process writes every row's label, id and box
(:func:`write_row_meta`) and the attributes, and every :func:`write_feature_rows` covers whole chunks, so
shards filled by several processes never share a chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from storage.manifest import matches_manifest

ARRAY_NAMES = ("features", "labels", "sample_ids", "boxes")
_RESERVED = ("complete", "content_digest", "n_rows", "dim", "chunk_rows")


class FeatureStoreError(ValueError):
    """A feature store is missing, incomplete or inconsistent."""


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from zarr.json (tuples -> lists, paths -> str, ...)."""
    return json.loads(json.dumps(value, default=str))


def _open(path: Path, mode: Literal["r", "r+", "w"]) -> zarr.Group:
    return zarr.open_group(str(path), mode=mode)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a store's group (a store holds arrays only)."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise FeatureStoreError(f"{group.store}: {name} is not an array; delete the store and rebuild it")
    return arr


def create_store(path: Path, n_rows: int, dim: int, attrs: dict, chunk_rows: int = 4096) -> None:
    """Create (overwriting) an empty, pre-sized feature store at ``path``."""
    if n_rows < 0 or dim < 1 or chunk_rows < 1:
        raise ValueError(f"bad store shape n_rows={n_rows}, dim={dim}, chunk_rows={chunk_rows}")
    user_attrs = _jsonable(dict(attrs))  # fail early on non-JSON attrs
    clash = sorted(set(user_attrs) & set(_RESERVED))
    if clash:
        raise ValueError(f"attrs keys {clash} are reserved by the feature store")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    g = _open(path, "w")
    g.create_array(
        "features",
        shape=(n_rows, dim),
        dtype="float32",
        chunks=(chunk_rows, dim),
        compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        fill_value=np.nan,
        dimension_names=["row", "feature"],
    )
    g.create_array("labels", shape=(n_rows,), dtype="int16", chunks=(chunk_rows,), fill_value=-1)
    g.create_array("sample_ids", shape=(n_rows,), dtype=str, chunks=(chunk_rows,), fill_value="")
    g.create_array("boxes", shape=(n_rows, 4), dtype="int32", chunks=(chunk_rows, 4), fill_value=-1)
    g.update_attributes(  # one metadata write (attrs.update writes zarr.json once per key)
        {
            **user_attrs,
            "n_rows": int(n_rows),
            "dim": int(dim),
            "chunk_rows": int(chunk_rows),
            "complete": False,
        }
    )


def write_feature_rows(path: Path, start: int, features: np.ndarray) -> None:
    """Write the feature rows of a chunk-aligned block starting at ``start`` (safe from several processes;
    labels, ids and boxes are written once by the coordinator, :func:`write_row_meta`)."""
    f = _array(_open(path, "r+"), "features")
    n_rows, dim = f.shape
    chunk_rows = f.chunks[0]
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != dim:
        raise ValueError(f"{path}: features must have shape (n, {dim}), got {features.shape}")
    n = features.shape[0]
    end = start + n
    if start < 0 or end > n_rows:
        raise ValueError(f"{path}: rows [{start}, {end}) outside the store's {n_rows} rows")
    if start % chunk_rows != 0 or (n % chunk_rows != 0 and end != n_rows):
        raise ValueError(
            f"{path}: unaligned write of rows [{start}, {end}); blocks must start on a multiple of "
            f"chunk_rows={chunk_rows} and span whole chunks (or end at n_rows={n_rows}), otherwise "
            "concurrent writers lose rows"
        )
    if n:
        f[start:end] = features


def read_feature_rows(path: Path, start: int, end: int) -> np.ndarray:
    """Feature rows ``[start, end)`` as stored."""
    return np.asarray(_array(_open(path, "r"), "features")[start:end], dtype=np.float32)


def write_row_meta(path: Path, labels: np.ndarray, sample_ids: Sequence[str], boxes: np.ndarray) -> None:
    """Write every row's label, sample id and box at once (single coordinating process)."""
    g = _open(path, "r+")
    n = _array(g, "features").shape[0]
    labels, ids, boxes = np.asarray(labels), np.asarray(list(sample_ids), dtype=str), np.asarray(boxes)
    if labels.shape != (n,) or ids.shape != (n,) or boxes.shape != (n, 4):
        raise ValueError(
            f"{path}: row metadata must cover all {n} rows: labels {labels.shape}, "
            f"sample_ids {ids.shape}, boxes {boxes.shape}"
        )
    if n:
        _array(g, "labels")[:] = labels.astype(np.int16)
        _array(g, "sample_ids")[:] = ids
        _array(g, "boxes")[:] = boxes.astype(np.int32)


def mark_complete(path: Path, digest: str) -> None:
    """Flag the store complete with its content digest (call after every row is written)."""
    g = _open(path, "r+")
    # one atomic zarr.json rewrite: complete and content_digest appear together
    g.update_attributes({"content_digest": str(digest), "complete": True})


def is_verified(path: Path) -> bool:
    """Complete and unchanged since completion (matches its manifest): safe to reuse as a cache."""
    return is_complete(path) and matches_manifest(Path(path))


def store_attrs(path: Path) -> dict:
    """The store's attributes as stored."""
    return dict(_open(path, "r").attrs)


def is_complete(path: Path, expect: dict | None = None) -> bool:
    """True if the store exists, is complete and every ``expect`` key equals the stored attribute."""
    try:
        if not (Path(path) / "zarr.json").is_file():
            return False
        g = _open(path, "r")
        attrs = dict(g.attrs)
        if attrs.get("complete") is not True:
            return False
        if not all(name in g for name in ARRAY_NAMES):
            return False
        return all(not (key not in attrs or attrs[key] != _jsonable(value)) for key, value in (expect or {}).items())
    except Exception:
        return False


def store_digest(path: Path) -> str:
    """sha256 hex digest of the stored array values (shape, dtype and content of all four arrays)."""
    g = _open(path, "r")
    h = hashlib.sha256()
    for name in ARRAY_NAMES:
        a = _array(g, name)
        n = a.shape[0]
        row_bytes = 4 * int(np.prod(a.shape[1:], dtype=np.int64))
        step = a.chunks[0] * max(1, (16 << 20) // (a.chunks[0] * row_bytes))  # ~16 MiB blocks
        h.update(f"{name}|{a.shape}|".encode())
        for s in range(0, n, step):
            block = np.asarray(a[s : s + step])
            if name == "sample_ids":
                for sid in block.tolist():
                    b = str(sid).encode("utf-8")
                    h.update(len(b).to_bytes(8, "little"))
                    h.update(b)
            else:
                dt = {"features": "<f4", "labels": "<i2", "boxes": "<i4"}[name]
                h.update(np.ascontiguousarray(block, dtype=dt).tobytes())
    return h.hexdigest()


def load_features(path: Path, verify: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X float32 (n, dim), y int64 (n,), sample_ids str (n,), boxes int32 (n, 4))`` of a complete store.

    ``verify=True`` also recomputes :func:`store_digest` and checks it against ``content_digest``.
    """
    if not is_complete(path):
        raise FeatureStoreError(
            f"feature store {path} is missing or incomplete (no complete=True marker); "
            "re-run the feature extraction stage that fills it"
        )
    g = _open(path, "r")
    if verify:
        want = g.attrs.get("content_digest")
        got = store_digest(path)
        if want != got:
            raise FeatureStoreError(
                f"feature store {path} content digest mismatch (stored {want}, computed {got}): "
                "it was modified after completion; delete it and re-run extraction"
            )
    X = np.asarray(_array(g, "features")[:], dtype=np.float32)
    y = np.asarray(_array(g, "labels")[:], dtype=np.int64)
    ids = np.asarray(np.asarray(_array(g, "sample_ids")[:]).tolist(), dtype=str)
    boxes = np.asarray(_array(g, "boxes")[:], dtype=np.int32)
    return X, y, ids, boxes


def concat_stores(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of several complete stores stacked in order (same feature dim required)."""
    if not paths:
        raise ValueError("concat_stores needs at least one store")
    groups = []
    for p in paths:
        if not is_complete(p):
            raise FeatureStoreError(f"feature store {p} is missing or incomplete; cannot concatenate")
        groups.append(_open(p, "r"))
    dims = {_array(g, "features").shape[1] for g in groups}
    if len(dims) != 1:
        raise FeatureStoreError(f"feature stores have different feature dims {sorted(dims)}: {list(paths)}")
    total = sum(_array(g, "features").shape[0] for g in groups)
    X = np.empty((total, dims.pop()), dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    s = 0
    for g in groups:
        n = _array(g, "features").shape[0]
        if n:
            X[s : s + n] = _array(g, "features")[:]
            y[s : s + n] = _array(g, "labels")[:]
        s += n
    return X, y


def concat_sample_ids(paths: Sequence[Path]) -> np.ndarray:
    """The ``sample_ids`` of several complete stores, in :func:`concat_stores` order."""
    for p in paths:
        if not is_complete(p):
            raise FeatureStoreError(f"feature store {p} is missing or incomplete; cannot read its sample ids")
    parts = [np.asarray(np.asarray(_array(_open(p, "r"), "sample_ids")[:]).tolist(), dtype=str) for p in paths]
    return np.concatenate(parts) if parts else np.array([], dtype=str)
