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


@dataclass
class SamplingRegion:
    """Content of one h5 file."""

    img_path: str
    patch_size: tuple[int, int]
    triangles: np.ndarray  # (T, 3, 2) int32 (y, x), or empty
    weights: np.ndarray  # (T,) float64, or empty
    mask_path: str | None = None
    labelled_index: int | None = None


def write_region(path: Path, region: SamplingRegion) -> None:
    """Write one sampling h5 file (deterministic bytes: no timestamps)."""
    with h5py.File(path, "w", libver="latest", track_order=False) as f:
        f.create_dataset("img_path", data=region.img_path)
        f.create_dataset("patch_size", data=np.asarray(region.patch_size, dtype=np.int64), track_times=False)
        if len(region.triangles):
            f.create_dataset("triangles", data=np.asarray(region.triangles, dtype=np.int32), track_times=False)
            f.create_dataset("triangles_weights", data=np.asarray(region.weights, dtype=np.float64), track_times=False)
        else:
            f.create_dataset("triangles", data=np.zeros((0,), dtype=np.uint8), track_times=False)
            f.create_dataset("triangles_weights", data=np.zeros((0,), dtype=np.uint8), track_times=False)
        if region.mask_path is not None:
            f.create_dataset("mask_path", data=region.mask_path)
        if region.labelled_index is not None:
            f.create_dataset("labelled_index", data=np.int32(region.labelled_index), track_times=False)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return _text(value.item())
    return str(value)


def read_region(path: Path) -> SamplingRegion:
    """Read an h5 sampling file written by patchflow or by Quadra."""
    missing = []
    with h5py.File(path, "r") as f:
        for key in ("img_path", "patch_size", "triangles", "triangles_weights"):
            if key not in f:
                missing.append(key)
        if missing:
            raise ValueError(f"{path} lacks datasets {missing}: not a patch-dataset h5 file; regenerate the dataset")
        tri = np.asarray(f["triangles"][()])
        w = np.asarray(f["triangles_weights"][()], dtype=np.float64)
        return SamplingRegion(
            img_path=_text(f["img_path"][()]),
            patch_size=tuple(int(v) for v in np.asarray(f["patch_size"][()]).ravel()[:2]),
            triangles=tri.astype(np.int64) if tri.size else np.zeros((0, 3, 2), np.int64),
            weights=w if tri.size else np.zeros((0,), np.float64),
            mask_path=_text(f["mask_path"][()]) if "mask_path" in f else None,
            labelled_index=int(f["labelled_index"][()]) if "labelled_index" in f else None,
        )
