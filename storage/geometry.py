"""Patch geometry: the one place that says where patches sit on an image.

:class:`GridSpec` holds the grid parameters (``patch_number`` or ``patch_size``, ``overlap``, grid
policy), read from the dataset generation parameters, a dataset's ``info.json`` or a bundle's
``model.json``; :meth:`GridSpec.grid` gives the :class:`PatchGrid` of one image. Used by dataset
generation (val/test grid, train h5 patch sizes), by training-time sampling (crop size, padding of
small images), by scoring and by predict; serialised into the exported model so deployment tiles
images exactly as training did.

Conventions
- sizes are ``(height, width)``; patch index is ``r * n_w + c`` (row-major), as in Quadra;
- patch (r, c) starts at ``(min(r*step_h, H'-p_h), min(c*step_w, W'-p_w))`` where ``H', W'`` are
  the padded image size: the last row/column sits flush with the bottom/right border;
- **small-image policy** (Quadra crashes, bug B17): an image smaller than the patch along an axis
  is padded at the bottom/right by edge replication up to the patch size; reconstruction crops the
  map back to the original size (:meth:`PatchGrid.crop`). Padded pixels are never labelled defect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

GRID_POLICY = "flush-last-patch+pad-bottom-right-replicate"


def _axis_from_number(length: int, n: int, overlap: float) -> tuple[int, int]:
    """Patch size and step covering ``length`` with ``n`` patches, identical to Quadra's compute_patch_info.

    Starts from the even split, then grows the step (while the grid still falls short) or the patch
    until the grid covers the image with at most one extra patch flush with the border; after 100
    tries it restarts from one pixel less of step. Floating-point expression kept as the reference's
    so that datasets made by either tool get the same grid.
    """
    if n < 1:
        raise ValueError(f"patch_number entries must be >= 1, got {n}")
    p = int(np.ceil(length / (1 + (n - 1) - (n - 1) * overlap)))
    step = p - int(np.ceil(overlap * p))
    start_p, start_step = p, step
    tries = restarts = 0
    while (n - 1) * step + p < length or (n - 2) * step + p > length:
        tries += 1
        if (n - 1) * (step + 1) + p < length:
            step += 1
        else:
            p += 1
        if tries == 100:
            restarts += 1
            if restarts > 100:
                raise ValueError(f"cannot fit {n} patches on {length} px with overlap {overlap}")
            step, p, tries = start_step - 1, start_p, 0
    if n > 1 and step < 1:
        raise ValueError(
            f"{n} patches with overlap {overlap} on {length} px leave no step between patches; "
            "lower the overlap or patch_number"
        )
    return p, step


def _axis_from_size(length: int, p: int, overlap: float) -> tuple[int, int]:
    """Number of patches and step for a fixed patch size (Quadra's compute_patch_info_from_patch_dim)."""
    if p < 1:
        raise ValueError(f"patch_size entries must be >= 1, got {p}")
    step = p - math.floor(overlap * p)
    if step < 1:
        raise ValueError(f"overlap {overlap} leaves no step for patch size {p}")
    length = max(length, p)  # small-image policy: padded up to the patch
    n = math.ceil((length - p) / step + 1)
    return n, step


def validate_geometry_params(
    patch_number: Sequence[int] | None, patch_size: Sequence[int] | None, overlap: float
) -> None:
    """Raise a clear ValueError for impossible geometry parameters."""
    if (patch_number is None) == (patch_size is None):
        raise ValueError(
            "give exactly one of patch_number=[n_vertical, n_horizontal] or patch_size=[height, width] "
            f"(got patch_number={patch_number}, patch_size={patch_size})"
        )
    pair = patch_number if patch_number is not None else patch_size
    assert pair is not None
    name = "patch_number" if patch_number is not None else "patch_size"
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be two positive integers [vertical, horizontal], got {list(pair)}")
    if not (0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of the patch grid of one image."""

    height: int  # original image height
    width: int  # original image width
    n_h: int
    n_w: int
    patch_h: int
    patch_w: int
    step_h: int
    step_w: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Image size after the small-image padding."""
        return max(self.height, self.patch_h), max(self.width, self.patch_w)

    @property
    def num_patches(self) -> int:
        """Patches in the grid (``n_h * n_w``)."""
        return self.n_h * self.n_w

    def origins(self) -> np.ndarray:
        """Top-left corners ``(N, 2)`` int64 as (y, x), in patch-index order."""
        hp, wp = self.padded_shape
        ys = np.minimum(np.arange(self.n_h) * self.step_h, hp - self.patch_h)
        xs = np.minimum(np.arange(self.n_w) * self.step_w, wp - self.patch_w)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)

    def boxes(self) -> np.ndarray:
        """Boxes ``(N, 4)`` as (y0, x0, y1, x1) in padded-image coordinates, patch-index order."""
        o = self.origins()
        return np.concatenate([o, o + np.array([self.patch_h, self.patch_w])], axis=1)

    def pad(self, array: np.ndarray, is_mask: bool = False) -> np.ndarray:
        """Pad an image (edge replication) or a mask (zeros) up to the padded shape."""
        return pad_to(array, self.padded_shape, is_mask=is_mask)

    def crop(self, array: np.ndarray) -> np.ndarray:
        """Undo :meth:`pad` on a reconstructed map."""
        return array[: self.height, : self.width]


def pad_to(array: np.ndarray, shape: tuple[int, int], is_mask: bool = False) -> np.ndarray:
    """Pad bottom/right up to ``shape``: images by edge replication, masks with 0 (background)."""
    h, w = array.shape[:2]
    dh, dw = max(0, shape[0] - h), max(0, shape[1] - w)
    if dh == 0 and dw == 0:
        return array
    widths = [(0, dh), (0, dw)] + [(0, 0)] * (array.ndim - 2)
    if is_mask:
        return np.pad(array, widths, mode="constant", constant_values=0)
    return np.pad(array, widths, mode="edge")


def compute_grid(
    height: int,
    width: int,
    patch_number: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.0,
) -> PatchGrid:
    """Grid for one image from either ``patch_number`` [n_v, n_h] or ``patch_size`` [h, w]."""
    validate_geometry_params(patch_number, patch_size, overlap)
    if patch_size is not None:
        ph, pw = int(patch_size[0]), int(patch_size[1])  # [h, w], never transposed (B1)
        n_h, step_h = _axis_from_size(height, ph, overlap)
        n_w, step_w = _axis_from_size(width, pw, overlap)
    else:
        assert patch_number is not None
        n_h, n_w = int(patch_number[0]), int(patch_number[1])
        if n_h > height or n_w > width:
            raise ValueError(
                f"patch_number {list(patch_number)} asks for more patches than pixels on a {height}x{width} image"
            )
        ph, step_h = _axis_from_number(height, n_h, overlap)
        pw, step_w = _axis_from_number(width, n_w, overlap)
    return PatchGrid(height, width, n_h, n_w, ph, pw, step_h, step_w)


@dataclass(frozen=True)
class GridSpec:
    """The patch-grid parameters of a dataset or a model: exactly one of ``patch_number`` [n_v, n_h] or
    ``patch_size`` [h, w], the ``overlap`` and the grid ``policy`` (:data:`GRID_POLICY`, the only one
    implemented; recorded in ``patchflow.json`` and ``model.json``)."""

    patch_number: tuple[int, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    overlap: float = 0.0
    policy: str = GRID_POLICY

    @classmethod
    def from_params(
        cls, patch_number: Sequence[int] | None, patch_size: Sequence[int] | None, overlap: float = 0.0
    ) -> GridSpec:
        """From the dataset generation parameters (checked: a clear ValueError for impossible ones)."""
        validate_geometry_params(patch_number, patch_size, overlap)
        return cls(_pair(patch_number), _pair(patch_size), float(overlap))

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> GridSpec:
        """From a patch dataset's ``info.json`` (ours or Quadra's); ``patch_size`` wins when both are present
        (the reference extracted with it)."""
        overlap = float(info.get("overlap") or 0.0)
        if info.get("patch_size"):
            return cls(None, _pair(info["patch_size"]), overlap)
        return cls(_pair(info.get("patch_number")), None, overlap)

    @classmethod
    def from_model_json(cls, meta: dict[str, Any]) -> GridSpec:
        """From a bundle's ``model.json`` (the reference's ``patch_height/patch_width`` or
        ``vertical_patches/horizontal_patches``, ``overlap``, plus ``grid_policy``)."""
        overlap = float(meta.get("overlap") or 0.0)
        policy = str(meta.get("grid_policy") or GRID_POLICY)
        if meta.get("patch_height") and meta.get("patch_width"):
            return cls(None, _pair((meta["patch_height"], meta["patch_width"])), overlap, policy)
        if meta.get("vertical_patches") and meta.get("horizontal_patches"):
            return cls(_pair((meta["vertical_patches"], meta["horizontal_patches"])), None, overlap, policy)
        raise ValueError("model.json holds no patch geometry (patch_height/width or vertical/horizontal_patches)")

    def grid(self, height: int, width: int) -> PatchGrid:
        """The :class:`PatchGrid` of an image of ``height`` x ``width`` pixels."""
        return compute_grid(height, width, self.patch_number, self.patch_size, self.overlap)


def _pair(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


def compute_patch_info(
    img_h: int, img_w: int, patch_num_h: int, patch_num_w: int, overlap: float = 0.0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Quadra-compatible: ``((patch_h, step_h), (patch_w, step_w))`` from patch counts."""
    g = compute_grid(img_h, img_w, patch_number=(patch_num_h, patch_num_w), overlap=overlap)
    return (g.patch_h, g.step_h), (g.patch_w, g.step_w)


def compute_patch_info_from_patch_dim(
    img_h: int, img_w: int, patch_h: int, patch_w: int, overlap: float = 0.0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Quadra-compatible: ``((n_h, step_h), (n_w, step_w))`` from a patch size."""
    g = compute_grid(img_h, img_w, patch_size=(patch_h, patch_w), overlap=overlap)
    return (g.n_h, g.step_h), (g.n_w, g.step_w)


def safe_crop_origin(center: np.ndarray, patch: int, length: int) -> np.ndarray:
    """Top-left of a ``patch``-long window centred at ``center`` and shifted back inside ``[0, length)``.

    Training crops are always exactly ``patch`` pixels (Quadra's are 1 px short for odd sizes, B10);
    ``length`` must already be >= ``patch`` (pad small images first with :func:`pad_to`).
    """
    start = np.asarray(center, dtype=np.int64) - patch // 2
    return np.clip(start, 0, max(0, length - patch))
