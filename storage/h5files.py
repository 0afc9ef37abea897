"""Train-split h5 sampling files, in Quadra's format.

| dataset | dtype / shape | content |
|---|---|---|
| img_path | vlen str | image path, relative to the dataset root (or absolute) |
| patch_size | int64 (2,) | [h, w] of the training crop for this image (never transposed, unlike Quadra's B1) |
| triangles | int32 (T, 3, 2) (y, x) vertices, or uint8 (0,) when the whole image is sampled | sampling region |
| triangles_weights | float64 (T,) summing to 1, or uint8 (0,) | triangle probabilities (area shares) |
| mask_path | vlen str (optional) | mask path |
| labelled_index | int32 scalar (component files only) | component id |

Vertices use the pixel-edge convention: pixel (r, c) is the unit square [c, c+1) x [r, r+1), so the
floor of a uniform point in a triangle is a pixel of the region.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from h5py import h5d, h5f, h5p, h5s, h5t

from storage.layout import DatasetFormatError


@dataclass
class SamplingRegion:
    """Content of one h5 file."""

    img_path: str
    patch_size: tuple[int, int]  # (0, 0) when absent (read side only)
    triangles: np.ndarray  # (T, 3, 2) (y, x): int32 when written, float64 when read; or empty
    weights: np.ndarray  # (T,) float64, or empty
    mask_path: str | None = None
    labelled_index: int | None = None


_STR = h5py.string_dtype()  # variable-length UTF-8, as h5py stores a Python str


def encode_region(region: SamplingRegion) -> bytes:
    """The bytes of one sampling h5 file (deterministic: no timestamps).

    Built in memory with h5py's low-level API (a third faster than the high-level one, which matters at one
    file per defect), then written in one go by the caller; read back by any h5py, as Quadra does.
    """
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_fapl_core(backing_store=False)
    fcpl = h5p.create(h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)  # no timestamps in the root group's header either
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    # the in-memory file's name is never written; unique so concurrent threads never share one
    fid = h5f.create(f"patchflow-region-{id(region):x}.h5".encode(), h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl)
    try:

        def put(name: str, value: np.ndarray) -> None:
            space = h5s.create_simple(value.shape) if value.ndim else h5s.create(h5s.SCALAR)
            tid = h5t.py_create(_STR, logical=True) if value.dtype == object else h5t.py_create(value.dtype)
            h5d.create(fid, name.encode(), tid, space, dcpl=dcpl).write(h5s.ALL, h5s.ALL, value)

        put("img_path", np.array(region.img_path, dtype=_STR))
        put("patch_size", np.asarray(region.patch_size, dtype=np.int64))
        if len(region.triangles):
            put("triangles", np.ascontiguousarray(region.triangles, dtype=np.int32))
            put("triangles_weights", np.ascontiguousarray(region.weights, dtype=np.float64))
        else:
            put("triangles", np.zeros((0,), dtype=np.uint8))
            put("triangles_weights", np.zeros((0,), dtype=np.uint8))
        if region.mask_path is not None:
            put("mask_path", np.array(region.mask_path, dtype=_STR))
        if region.labelled_index is not None:
            put("labelled_index", np.array(region.labelled_index, dtype=np.int32))
        h5f.flush(fid)
        return bytes(fid.get_file_image())
    finally:
        fid.close()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _text(value.ravel()[0])
    return str(value)


def read_region(path: Path) -> SamplingRegion:
    """Read and check an h5 sampling file written by patchflow or by Quadra.

    Triangles come back as float64 ``(T, 3, 2)`` with weights normalised to sum 1, or empty arrays when
    the whole image is sampled; ``patch_size`` is ``(0, 0)`` when the file has none.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(
            f"{path} not found (listed in the train list); regenerate the dataset or remove its lines"
        )
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img_path", "triangles", "triangles_weights") if k not in f]
            if missing:
                raise DatasetFormatError(
                    f"{path} lacks dataset(s) {missing}; it is not a patch-dataset train file: "
                    "regenerate the dataset or remove its lines from the train list"
                )
            img_path = _text(f["img_path"][()])
            ps = np.asarray(f["patch_size"][()]).ravel() if "patch_size" in f else None
            tri = np.asarray(f["triangles"][()])
            w = np.asarray(f["triangles_weights"][()])
            mask_path = _text(f["mask_path"][()]) if "mask_path" in f else None
            labelled_index = int(f["labelled_index"][()]) if "labelled_index" in f else None
    except DatasetFormatError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetFormatError(f"cannot read h5 file {path} ({exc}); regenerate the dataset") from exc
    patch_size = (0, 0)
    if ps is not None:
        if ps.size != 2 or np.any(ps < 1):
            raise DatasetFormatError(
                f"{path}: patch_size must be 2 positive ints, got {ps.tolist()}; regenerate the dataset"
            )
        patch_size = (int(ps[0]), int(ps[1]))
    if tri.size == 0:
        return SamplingRegion(img_path, patch_size, np.zeros((0, 3, 2)), np.zeros(0), mask_path, labelled_index)
    if tri.ndim != 3 or tri.shape[1:] != (3, 2):
        raise DatasetFormatError(
            f"{path}: triangles must have shape (T, 3, 2), got {tri.shape}; regenerate the dataset"
        )
    w = w.astype(np.float64).ravel()
    if w.shape[0] != tri.shape[0] or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DatasetFormatError(
            f"{path}: triangles_weights must be {tri.shape[0]} finite non-negative values with a "
            f"positive sum, got shape {w.shape}; regenerate the dataset"
        )
    return SamplingRegion(img_path, patch_size, tri.astype(np.float64), w / w.sum(), mask_path, labelled_index)
