"""Zarr feature store: pre-sized creation, chunk-aligned writes, completion marker, digests."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.features import (
    FeatureStoreError,
    chunks_done,
    concat_stores,
    create_store,
    is_complete,
    load_features,
    mark_chunks_done,
    mark_complete,
    store_digest,
    write_rows,
)

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
    for s in range(0, n_rows, CHUNK):
        write_rows(path, s, *block(s, min(CHUNK, n_rows - s)))


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    p = tmp_path / "pass_0.zarr"
    create_store(p, n_rows=20, dim=DIM, attrs={"backbone": "resnet18", "pass": 0, "classes": ("a", "b")}, chunk_rows=CHUNK)
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
    assert attrs["complete"] is False and attrs["chunks_done"] == []
    assert not is_complete(store)
    assert chunks_done(store) == set()


def test_create_rejects_reserved_attrs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        create_store(tmp_path / "x.zarr", 4, 2, {"complete": True})


def test_aligned_writes_and_rejections(store: Path) -> None:
    write_rows(store, 0, *block(0, 16))  # two whole chunks
    write_rows(store, 16, *block(16, 4))  # partial last chunk, ends at n_rows
    for start, n in [(4, 8), (0, 5), (8, 4), (16, 3)]:  # unaligned start / length not ending at n_rows
        with pytest.raises(ValueError, match="unaligned"):
            write_rows(store, start, *block(start, n))
    with pytest.raises(ValueError, match="outside"):
        write_rows(store, 16, *block(16, 8))
    X, y, ids, boxes = block(0, 8)
    with pytest.raises(ValueError, match="inconsistent"):
        write_rows(store, 0, X, y[:7], ids, boxes)
    with pytest.raises(ValueError, match="shape"):
        write_rows(store, 0, X[:, :3], y, ids, boxes)
    mark_complete(store, store_digest(store))
    X, y, ids, boxes = load_features(store)
    eX, ey, eids, eboxes = block(0, 20)
    np.testing.assert_array_equal(X, eX)
    np.testing.assert_array_equal(y, ey)
    assert ids.tolist() == eids
    np.testing.assert_array_equal(boxes, eboxes)
    assert X.dtype == np.float32 and np.issubdtype(y.dtype, np.integer) and boxes.dtype == np.int32


def test_chunks_done_progress(store: Path) -> None:
    mark_chunks_done(store, [0])
    mark_chunks_done(store, {2, 0})
    assert chunks_done(store) == {0, 2}
    assert not is_complete(store)


def test_complete_marker_is_last(store: Path) -> None:
    fill(store, 20)
    mark_chunks_done(store, range(3))
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


def _write_chunks(path: str, starts: list[int], n_rows: int) -> None:
    """Child-process body (module level so spawn can import it)."""
    for s in starts:
        write_rows(Path(path), s, *block(s, min(CHUNK, n_rows - s)))


def test_two_processes_disjoint_aligned_chunks(tmp_path: Path) -> None:
    n_rows = 10 * CHUNK + 3
    p = tmp_path / "mp.zarr"
    create_store(p, n_rows, DIM, {}, chunk_rows=CHUNK)
    starts = list(range(0, n_rows, CHUNK))
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_write_chunks, args=(str(p), starts[k::2], n_rows)) for k in range(2)
    ]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
        assert pr.exitcode == 0
    mark_chunks_done(p, range(len(starts)))
    mark_complete(p, store_digest(p))
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
            got.append(v)
    assert got == [1, 2]
    # a consumer that stops early does not leave the producer thread blocked
    before = threading.active_count()
    for v in prefetch(iter(range(1000)), depth=1):
        if v == 3:
            break
    import time

    time.sleep(0.3)
    assert threading.active_count() <= before
