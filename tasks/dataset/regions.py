"""Training sampling regions of one image (the reference's ``create_h5``): good area and one region per defect.

- good region: pixels whose patch-sized box holds no annotation, minus border strips so a patch
  centred there stays inside the image (strips kept when removing them would leave nothing);
- defect component: its pixels, dilated along an axis where the defect is smaller than the patch
  (so small defects are not always centred); annotated-good component: its pixels away from any
  real defect by half a patch. Work is done in a window around each component, not the full image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from tasks.dataset.labelling import Components
from tasks.dataset.triangulation import triangulate_region

logger = logging.getLogger("patchflow.regions")


@dataclass
class Region:
    """A sampling region ready to be written as ``<stem>_<suffix>.h5``."""

    suffix: str  # "good" or the component id
    class_name: str
    triangles: np.ndarray
    weights: np.ndarray
    labelled_index: int | None


def _dilate(region: np.ndarray, kh: int, kw: int) -> np.ndarray:
    if kh <= 1 and kw <= 1:
        return region
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (max(kw, 1), max(kh, 1)))
    return cv2.dilate(region.astype(np.uint8), kernel).astype(bool)


def _strip_borders(region: np.ndarray, y0: int, x0: int, shape: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """Remove rows/cols where a centred patch would leave the image; keep the region if nothing is left."""
    H, W = shape
    ph, pw = patch
    rows = np.arange(y0, y0 + region.shape[0])
    cols = np.arange(x0, x0 + region.shape[1])
    keep_r = (rows >= ph // 2) & (rows < H - (ph - ph // 2) + 1) if ph < H else np.ones_like(rows, bool)
    keep_c = (cols >= pw // 2) & (cols < W - (pw - pw // 2) + 1) if pw < W else np.ones_like(cols, bool)
    stripped = region & keep_r[:, None] & keep_c[None, :]
    return stripped if stripped.any() else region


def compute_regions(
    mask: np.ndarray | None,
    components: Components | None,
    patch: tuple[int, int],
    class_names: dict[int, str],
    annotated_good: set[int],
) -> tuple[Region | None, list[Region]]:
    """``(good region or None, component regions)`` for one train image; good has no triangles when unannotated."""
    background = class_names[0]
    if mask is None or components is None or len(components.classes) <= 1:
        empty = np.zeros((0, 3, 2), np.int32)
        return Region("good", background, empty, np.zeros(0), None), []
    H, W = mask.shape
    ph, pw = patch
    annotated = mask > 0
    good_region = ~_dilate(annotated, ph, pw)
    good = None
    if good_region.any():
        good_region = _strip_borders(good_region, 0, 0, (H, W), patch)
        tri, w = triangulate_region(good_region)
        if len(tri):
            good = Region("good", background, tri, w, None)
    real_defect = annotated & ~np.isin(mask, list(annotated_good)) if annotated_good else annotated
    comps: list[Region] = []
    labels = components.labels
    ids = np.arange(1, len(components.classes))
    # bounding boxes of all components in one pass
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    y_min = np.full(len(components.classes), H)
    y_max = np.full(len(components.classes), -1)
    x_min = np.full(len(components.classes), W)
    x_max = np.full(len(components.classes), -1)
    np.minimum.at(y_min, lab, ys)
    np.maximum.at(y_max, lab, ys)
    np.minimum.at(x_min, lab, xs)
    np.maximum.at(x_max, lab, xs)
    for j in ids.tolist():
        value = int(components.classes[j])
        wy0, wy1 = max(0, y_min[j] - ph), min(H, y_max[j] + 1 + ph)
        wx0, wx1 = max(0, x_min[j] - pw), min(W, x_max[j] + 1 + pw)
        comp = labels[wy0:wy1, wx0:wx1] == j
        if value in annotated_good:
            region = comp & ~_dilate(real_defect[wy0:wy1, wx0:wx1], ph, pw)
        else:
            bh, bw = y_max[j] - y_min[j] + 1, x_max[j] - x_min[j] + 1
            kh = (ph - bh) // 2 if bh < ph else 1
            kw = (pw - bw) // 2 if bw < pw else 1
            region = _dilate(comp, kh, kw)
        if not region.any():
            logger.warning("component %d (%s) has no sampling area left; skipped", j, class_names[value])
            continue
        region = _strip_borders(region, wy0, wx0, (H, W), patch)
        tri, w = triangulate_region(region, offset=(wy0, wx0))
        if not len(tri):
            logger.warning("component %d (%s) gave no triangles; skipped", j, class_names[value])
            continue
        comps.append(Region(str(j), class_names[value], tri, w, j))
    return good, comps


def dataset_lines(
    stem: str,
    good: Region | None,
    comps: list[Region],
    annotated_good_names: set[str],
    repeat_good_images: int,
    balance_defects: bool,
) -> list[str]:
    """Lines ``<h5 name>,<class>`` of ``dataset.txt`` for one image, with the reference's weighting rules."""
    lines: list[str] = []
    if good is not None and len(good.triangles) == 0:  # unannotated image: whole image is good
        return [f"{stem}_good.h5,{good.class_name}"] * repeat_good_images
    good_line = f"{stem}_good.h5,{good.class_name}" if good is not None else None
    for c in comps:
        n = repeat_good_images if c.class_name in annotated_good_names else 1
        lines.extend([f"{stem}_{c.suffix}.h5,{c.class_name}"] * n)
        if balance_defects and good_line:
            lines.append(good_line)
    if not balance_defects and good_line:
        lines.append(good_line)
    return lines
