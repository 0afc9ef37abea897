"""Zarr feature store: pre-sized creation, chunk-aligned writes, shard progress, completion marker, digests."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.features import (
    FeatureStoreError,
    concat_stores,
    create_store,
    is_complete,
    load_features,
    mark_complete,
    store_digest,
    write_feature_rows,
    write_row_meta,
)
from storage.shards import ShardStateError
from tasks.features import shards

DIM = 6
CHUNK = 8


def block(start: int, n: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Deterministic rows ``start .. start + n``: features, labels, sample ids, boxes."""
    rows = np.arange(start, start + n)
    X = (rows[:, None] * 10 + np.arange(dim)[None, :]).astype(np.float32) / 7
    y = (rows % 3).astype(np.int64)
    ids = [f"im_{r // 5}_good.h5#{r}" for r in rows]
    boxes = np.stack([rows, rows + 1, rows + 32, rows + 33], axis=1)
    return X, y, ids, boxes


def fill(path: Path, n_rows: int) -> None:
    write_row_meta(path, *block(0, n_rows)[1:])
    for s in range(0, n_rows, CHUNK):
        write_feature_rows(path, s, block(s, min(CHUNK, n_rows - s))[0])


def _row_plan(n_rows: int):
    """``make_plan`` of a store whose row ``r`` is "patch" ``r`` (its features are ``block``'s row ``r``)."""
    return lambda: ({"row": np.arange(n_rows)}, *block(0, n_rows)[1:])


def _row_batches(plan, attrs, start: int, end: int, batch_size: int):
    """Batches of rows ``[start, end)``: (row indices relative to ``start``, the row numbers as "patches")."""
    for s in range(start, end, batch_size):
        rows = plan["row"][s : min(s + batch_size, end)]
        yield np.arange(s - start, s - start + rows.size), list(rows)


def _row_features(patches: list) -> np.ndarray:
    return block(int(patches[0]), len(patches))[0]


def _fill_shards(out: Path, indices) -> list[bool]:
    """Fill shards ``indices`` of the prepared store of ``out`` through the feature stage's shard protocol."""
    return [shards.fill_shard(out, i, _row_features, _row_batches, 3)["skipped"] for i in indices]


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    p = tmp_path / "pass_0.zarr"
    create_store(
        p, n_rows=20, dim=DIM, attrs={"backbone": "resnet18", "pass": 0, "classes": ("a", "b")}, chunk_rows=CHUNK
    )
    return p


def test_create_presized(store: Path) -> None:
    g = zarr.open_group(str(store), mode="r")
    f = g["features"]
    assert f.shape == (20, DIM) and f.dtype == np.float32 and f.chunks == (CHUNK, DIM)
    blosc = [c for c in f.metadata.codecs if type(c).__name__ == "BloscCodec"]
    assert blosc and blosc[0].cname.value == "lz4" and blosc[0].shuffle.value == "shuffle"
    assert g["labels"].shape == (20,) and g["labels"].dtype == np.int16
    assert g["sample_ids"].shape == (20,)
    assert g["boxes"].shape == (20, 4) and g["boxes"].dtype == np.int32
    assert all(g[n].chunks[0] == CHUNK for n in ("labels", "sample_ids", "boxes"))
    attrs = dict(g.attrs)
    assert attrs["backbone"] == "resnet18" and attrs["classes"] == ["a", "b"]
    assert attrs["complete"] is False
    assert not is_complete(store)


def test_create_rejects_reserved_attrs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        create_store(tmp_path / "x.zarr", 4, 2, {"complete": True})


def test_aligned_writes_and_rejections(store: Path) -> None:
    X, y, ids, boxes = block(0, 20)
    write_row_meta(store, y, ids, boxes)  # the coordinator writes every row's label, id and box at once
    write_feature_rows(store, 0, X[:16])  # two whole chunks
    write_feature_rows(store, 16, X[16:])  # partial last chunk, ends at n_rows
    for start, n in [(4, 8), (0, 5), (8, 4), (16, 3)]:  # unaligned start / length not ending at n_rows
        with pytest.raises(ValueError, match="unaligned"):
            write_feature_rows(store, start, block(start, n)[0])
    with pytest.raises(ValueError, match="outside"):
        write_feature_rows(store, 16, block(16, 8)[0])
    with pytest.raises(ValueError, match="must cover all 20 rows"):
        write_row_meta(store, y[:7], ids, boxes)
    with pytest.raises(ValueError, match="shape"):
        write_feature_rows(store, 0, X[:8, :3])
    mark_complete(store, store_digest(store))
    X, y, ids, boxes = load_features(store)
    eX, ey, eids, eboxes = block(0, 20)
    np.testing.assert_array_equal(X, eX)
    np.testing.assert_array_equal(y, ey)
    assert ids.tolist() == eids
    np.testing.assert_array_equal(boxes, eboxes)
    assert X.dtype == np.float32 and np.issubdtype(y.dtype, np.integer) and boxes.dtype == np.int32


def test_shard_progress(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    assert shards.prepare(out, "k", _row_plan(20), DIM, {"kind": "test"}, rows_per_shard=CHUNK, chunk_rows=CHUNK) == 3
    part = shards.partial_path(out)
    state = shards.shard_state(part)
    assert _fill_shards(out, [0, 2, 0]) == [False, False, True]  # a finished shard is not redone
    assert state.missing(3, shards.rows_match(part)) == [1]
    assert not is_complete(part)
    with pytest.raises(ShardStateError, match=r"shards \[1\] are not finished"):
        shards.finalize(out)
    assert _fill_shards(out, [1]) == [False]
    shards.finalize(out)
    X, y, ids, boxes = load_features(out, verify=True)
    eX, ey, eids, eboxes = block(0, 20)
    np.testing.assert_array_equal(X, eX)
    np.testing.assert_array_equal(y, ey)
    assert ids.tolist() == eids
    np.testing.assert_array_equal(boxes, eboxes)


def test_complete_marker_is_last(store: Path) -> None:
    fill(store, 20)
    assert not is_complete(store)  # every row written, but not marked yet
    with pytest.raises(FeatureStoreError, match=str(store).replace("\\", "\\\\")):
        load_features(store)
    d = store_digest(store)
    mark_complete(store, d)
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    assert attrs["complete"] is True and attrs["content_digest"] == d
    assert is_complete(store)
    # a fresh create over the same path starts incomplete again
    create_store(store, 20, DIM, {"pass": 0}, chunk_rows=CHUNK)
    assert not is_complete(store)


def test_is_complete_expect(store: Path, tmp_path: Path) -> None:
    fill(store, 20)
    mark_complete(store, store_digest(store))
    assert is_complete(store, {"backbone": "resnet18", "pass": 0})
    assert is_complete(store, {"classes": ("a", "b")})  # tuple vs stored list
    assert not is_complete(store, {"backbone": "resnet50"})
    assert not is_complete(store, {"missing_key": 1})
    assert not is_complete(tmp_path / "nope.zarr")
    (store / "zarr.json").write_text("{not json")
    assert not is_complete(store)


def test_store_digest_detects_tampering(store: Path) -> None:
    fill(store, 20)
    d0 = store_digest(store)
    assert d0 == store_digest(store)
    mark_complete(store, d0)
    assert store_digest(store) == d0  # attrs are not part of the digest
    load_features(store, verify=True)
    g = zarr.open_group(str(store), mode="r+")
    for name, idx, new in [
        ("features", (3, 2), 123.5),
        ("labels", 5, 1),  # was 5 % 3 == 2
        ("sample_ids", 7, "other#7"),
        ("boxes", (19, 0), 99),
    ]:
        old = g[name][idx]
        g[name][idx] = new
        assert store_digest(store) != d0, name
        with pytest.raises(FeatureStoreError, match="digest"):
            load_features(store, verify=True)
        g[name][idx] = old
        assert store_digest(store) == d0


def test_concat_stores(tmp_path: Path) -> None:
    paths = []
    for k, n in enumerate([20, 5]):
        p = tmp_path / f"p{k}.zarr"
        create_store(p, n, DIM, {"pass": k}, chunk_rows=CHUNK)
        fill(p, n)
        mark_complete(p, store_digest(p))
        paths.append(p)
    X, y = concat_stores(paths)
    assert X.shape == (25, DIM) and y.shape == (25,)
    np.testing.assert_array_equal(X[:20], block(0, 20)[0])
    np.testing.assert_array_equal(X[20:], block(0, 5)[0])
    np.testing.assert_array_equal(y[20:], block(0, 5)[1])
    incomplete = tmp_path / "inc.zarr"
    create_store(incomplete, 4, DIM, {}, chunk_rows=CHUNK)
    with pytest.raises(FeatureStoreError, match="inc.zarr"):
        concat_stores([paths[0], incomplete])


def _fill_shards_child(out: str, indices: list[int]) -> None:
    """Child-process body (module level so spawn can import it)."""
    _fill_shards(Path(out), indices)


@pytest.mark.slow
def test_two_processes_disjoint_aligned_chunks(tmp_path: Path) -> None:
    n_rows = 10 * CHUNK + 3
    p = tmp_path / "mp.zarr"
    count = shards.prepare(p, "mp", _row_plan(n_rows), DIM, {}, rows_per_shard=CHUNK, chunk_rows=CHUNK)
    assert count == 11  # one chunk per shard: the two processes write alternate, neighbouring chunks
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fill_shards_child, args=(str(p), list(range(count))[k::2])) for k in range(2)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
        assert pr.exitcode == 0
    shards.finalize(p)  # every shard's marker checks out against its rows
    X, y, ids, boxes = load_features(p)
    eX, ey, eids, eboxes = block(0, n_rows)
    np.testing.assert_array_equal(X, eX)  # no lost rows (unwritten rows would read NaN / -1 / "")
    np.testing.assert_array_equal(y, ey)
    assert ids.tolist() == eids
    np.testing.assert_array_equal(boxes, eboxes)


def test_prefetch_keeps_order_and_raises_where_the_producer_failed() -> None:
    import threading

    from tasks.features.shards import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad image x.png")

    got = []
    with pytest.raises(ValueError, match="bad image x.png"):
        for v in prefetch(failing()):
            got.append(v)  # noqa: PERF402 - the items before the failure are collected one by one
    assert got == [1, 2]
    # a consumer that stops early does not leave the producer thread blocked
    before = threading.active_count()
    for v in prefetch(iter(range(1000)), depth=1):
        if v == 3:
            break
    import time

    time.sleep(0.3)
    assert threading.active_count() <= before
