"""Training-patch drawing for a Quadra-layout patch dataset: one patch per train entry and pass, then the
drawn patches cropped from their images (each image decoded once).

Plain functions (no Prefect). Everything random is driven by ``np.random.default_rng`` seeded from
explicit arguments, never by the global numpy or Python RNG.

Differences from the reference (``quadra/datasets/patch.py``), on purpose:
- patch size: ``info.json``'s ``[h, w]`` wins over the (transposed, B1) h5 value in patch_size mode;
- crops are exactly the patch size (B10), images smaller than the patch are padded bottom/right by
  edge replication (``storage.geometry.pad_to``) instead of giving short crops;
- the uniform centre of an image without annotation is drawn in ``[0, H) x [0, W)`` (the reference
  draws in ``[0, H] x [0, W]``);
- images are decoded as BGR uint8 ignoring EXIF orientation (same frame as dataset generation).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from storage.geometry import pad_to, safe_crop_origin
from storage.h5files import read_region
from storage.layout import DatasetFormatError, read_info, resolve_path
from tasks.dataset.triangulation import sample_points
from tasks.features.listing import TrainEntry
from tasks.imageio import Decoding, InputDataError, file_image_size, read_image


@dataclass
class PassSamples:
    """The patches of one training pass; row ``i`` is drawn for ``entries[entry_index[i]]``."""

    entry_index: np.ndarray  # int64 (N,)
    image_path: np.ndarray  # str (N,), absolute
    label: np.ndarray  # int16 (N,)
    box: np.ndarray  # int64 (N, 4) y0, x0, y1, x1 in padded image coordinates
    center: np.ndarray  # int64 (N, 2) y, x in original image coordinates
    image_size: np.ndarray | None = None  # int64 (N, 2) original (H, W) assumed when drawing

    def __len__(self) -> int:
        return int(self.entry_index.shape[0])


# ------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _H5Record:
    image: str  # absolute image path
    patch_size: tuple[int, int] | None  # as stored in the h5
    triangles: np.ndarray | None  # float64 (T, 3, 2) (y, x)
    weights: np.ndarray | None  # float64 (T,), normalised


def _read_h5(h5_path: Path, data_path: Path) -> _H5Record:
    """Read the sampling record of one train h5 file (image path resolved against the dataset)."""
    region = read_region(h5_path)
    resolved = resolve_path(region.img_path, data_path)
    if resolved is None:
        raise DatasetFormatError(f"{h5_path} has no image path")
    image = str(resolved.resolve())
    patch_size = region.patch_size if region.patch_size != (0, 0) else None
    if not len(region.triangles):
        return _H5Record(image, patch_size, None, None)
    return _H5Record(image, patch_size, region.triangles, region.weights)


_MEMO: dict[tuple, Any] = {}  # per process: h5 records and image sizes keyed by file identity (every pass reuses them)
_MEMO_BUDGET = 256 << 20  # bytes of triangles kept; past it the memo starts over (huge datasets just re-read)
_memo_bytes = 0


def _memo(kind: str, path: Path | str, compute: Callable[[], Any]) -> Any:
    """``compute()`` memoised on (kind, path, size, mtime) of ``path``; a missing file is computed (and fails) as
    usual."""
    global _memo_bytes
    try:
        st = os.stat(path)
    except OSError:
        return compute()
    key = (kind, str(path), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        value = compute()
        arrays = (getattr(value, "triangles", None), getattr(value, "weights", None))
        size = 200 + sum(a.nbytes for a in arrays if a is not None)
        if _memo_bytes + size > _MEMO_BUDGET:
            _MEMO.clear()
            _memo_bytes = 0
        _MEMO[key] = value
        _memo_bytes += size
    return _MEMO[key]


# EXIF orientation is ignored everywhere (as in tasks.imageio): masks, triangles and boxes all live
# in the stored pixel frame.


def _image_size(path: str) -> tuple[int, int]:
    """(H, W) of an image in the stored pixel frame (header only when possible; pixel limit checked)."""
    try:
        return file_image_size(path)
    except InputDataError as exc:
        raise DatasetFormatError(str(exc)) from None


def _decode(path: str, decoding: Decoding | None) -> np.ndarray:
    """The image as the dataset stage decoded it (pixel limit, 16-bit rule); grayscale files stay 1 channel
    (cheaper: only their patches become BGR, the same pixels as a BGR decode)."""
    try:
        return read_image(path, decoding, keep_gray=True)
    except InputDataError as exc:
        raise DatasetFormatError(str(exc)) from None


def _resolve_patch_size(rec: _H5Record, info: dict, h5_path: Path) -> tuple[int, int]:
    ps = info.get("patch_size")
    if ps is not None:  # h5 patch_size is transposed by Quadra in this mode (B1): ignore it
        return int(ps[0]), int(ps[1])
    if rec.patch_size is None:
        raise DatasetFormatError(f"{h5_path} has no patch_size and info.json has none either; regenerate the dataset")
    return rec.patch_size


def _rows_by_h5(entries: Sequence[TrainEntry], class_to_idx: dict[str, int]) -> tuple[np.ndarray, dict[str, list[int]]]:
    """(label of every entry, h5 name -> its rows in first-appearance order)."""
    label = np.empty(len(entries), dtype=np.int16)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        try:
            label[i] = class_to_idx[e.class_name]
        except KeyError:
            raise DatasetFormatError(
                f"class {e.class_name!r} of {e.h5_name} (train/dataset.txt or your train_filename) is not in "
                f"class_to_idx {sorted(class_to_idx)}; add it to class_to_idx or list it in class_to_skip"
            ) from None
        groups.setdefault(e.h5_name, []).append(i)
    return label, groups


def _checked_size(rec: _H5Record, h5_path: Path, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(H, W) of the image of ``rec`` (read once per pass; a missing image names the h5 that refers to it)."""
    if rec.image not in sizes:
        if not os.path.isfile(rec.image):
            raise DatasetFormatError(
                f"image {rec.image} referenced by {h5_path} not found; restore the image or regenerate the dataset"
            )
        sizes[rec.image] = _memo("size", rec.image, lambda: _image_size(rec.image))
    return sizes[rec.image]


def _draw_centres(rng: np.random.Generator, rec: _H5Record, k: int, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` (y, x) patch centres: in the annotated triangles (area-weighted), else uniform over the image."""
    if rec.triangles is None:  # no annotation: uniform over the whole image
        return rng.integers(0, H, size=k), rng.integers(0, W, size=k)
    assert rec.weights is not None
    c = np.floor(sample_points(rec.triangles, rec.weights, k, rng)).astype(np.int64)
    return np.clip(c[:, 0], 0, H - 1), np.clip(c[:, 1], 0, W - 1)


def draw_pass(
    data_path: Path,
    entries: Sequence[TrainEntry],
    class_to_idx: dict[str, int],
    seed: int,
    pass_index: int,
    info: dict | None = None,
) -> PassSamples:
    """Draw one patch per entry for training pass ``pass_index`` (deterministic from seed and pass)."""
    data_path = Path(data_path)
    if info is None:
        info = read_info(data_path)
    n = len(entries)
    label, groups = _rows_by_h5(entries, class_to_idx)
    rng = np.random.default_rng([int(seed), int(pass_index)])
    image_path = np.empty(n, dtype=object)
    center = np.zeros((n, 2), dtype=np.int64)
    box = np.zeros((n, 4), dtype=np.int64)
    image_size = np.zeros((n, 2), dtype=np.int64)
    sizes: dict[str, tuple[int, int]] = {}
    for name, rows_list in groups.items():
        rows = np.asarray(rows_list, dtype=np.int64)
        h5_path = data_path / "train" / name
        rec = _memo(f"h5:{data_path}", h5_path, partial(_read_h5, h5_path, data_path))
        H, W = _checked_size(rec, h5_path, sizes)
        ph, pw = _resolve_patch_size(rec, info, h5_path)
        cy, cx = _draw_centres(rng, rec, rows.size, H, W)
        y0 = safe_crop_origin(cy, ph, max(H, ph))
        x0 = safe_crop_origin(cx, pw, max(W, pw))
        center[rows, 0], center[rows, 1] = cy, cx
        box[rows] = np.stack([y0, x0, y0 + ph, x0 + pw], axis=1)
        image_path[rows] = rec.image
        image_size[rows] = (H, W)
    return PassSamples(
        entry_index=np.arange(n, dtype=np.int64),
        image_path=image_path.astype(str) if n else np.array([], dtype=str),
        label=label,
        box=box,
        center=center,
        image_size=image_size,
    )


def _image_order(image_path: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct paths, row -> distinct index, row order grouping images by first appearance)."""
    uniq, first, inv = np.unique(np.asarray(image_path), return_index=True, return_inverse=True)
    inv = inv.ravel()
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
    order = np.argsort(rank[inv], kind="stable")
    return uniq, inv, order


def order_by_image(samples: PassSamples) -> PassSamples:
    """The same samples with rows reordered so :func:`iter_pass_patches` yields rows 0, 1, 2, ...

    Lets a caller stream features into a chunk-aligned store without buffering the whole pass;
    ``entry_index`` still links each row to its train entry.
    """
    if len(samples) == 0:
        return samples
    _, _, order = _image_order(samples.image_path)
    return PassSamples(
        entry_index=samples.entry_index[order],
        image_path=samples.image_path[order],
        label=samples.label[order],
        box=samples.box[order],
        center=samples.center[order],
        image_size=None if samples.image_size is None else samples.image_size[order],
    )


def iter_pass_patches(
    samples: PassSamples,
    batch_size: int,
    decoding: Decoding | None = None,
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield ``(row indices, BGR uint8 patches)`` in batches, decoding each distinct image once.

    Rows are grouped by image (images in first-appearance order, rows ascending within an image),
    so the yielded order is generally not ``0..N-1``: store each feature at its yielded row index.
    ``decoding``: the dataset's (``tasks.imageio.dataset_decoding``), so 16-bit images become the same
    8-bit pixels as in the dataset stage; None: the environment's pixel limit and the ``"auto"`` rule.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(samples.entry_index)
    if n == 0:
        return
    uniq, inv, order = _image_order(samples.image_path)
    box = np.asarray(samples.box, dtype=np.int64)
    need = np.zeros((uniq.size, 2), dtype=np.int64)  # padded size each image must reach
    np.maximum.at(need, inv, box[:, 2:4])

    cur_u, cur_img = -1, None
    rows_out: list[int] = []
    patches: list[np.ndarray] = []
    for row in order.tolist():
        u = int(inv[row])
        if u != cur_u:
            cur_img = None  # release the previous image before decoding the next
            img = _decode(str(uniq[u]), decoding)
            if samples.image_size is not None and tuple(img.shape[:2]) != tuple(samples.image_size[row]):
                raise DatasetFormatError(
                    f"image {uniq[u]} decodes to {img.shape[:2]} but the pass was drawn for "
                    f"{tuple(int(v) for v in samples.image_size[row])}; it changed on disk, redraw the pass"
                )
            cur_img = pad_to(img, (int(need[u, 0]), int(need[u, 1])))
            cur_u = u
        y0, x0, y1, x1 = box[row].tolist()
        assert cur_img is not None
        crop = cur_img[y0:y1, x0:x1]
        patches.append(cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR) if crop.ndim == 2 else np.ascontiguousarray(crop))
        rows_out.append(row)
        if len(rows_out) == batch_size:
            yield np.asarray(rows_out, dtype=np.int64), patches
            rows_out, patches = [], []
    if rows_out:
        yield np.asarray(rows_out, dtype=np.int64), patches
