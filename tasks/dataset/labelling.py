"""Val/test patch labels from an index mask, with the reference's thresholds and its bugs fixed.

Rule for one patch of area ``P`` (``p_h * p_w``):
- a class ``k`` is a *candidate* with area ``A_k`` (its pixels in the patch) when ``A_k > area_threshold * P``;
- otherwise it is a candidate with area ``a`` when one of its connected defects has ``a`` pixels in the
  patch and ``a > area_defect_threshold *`` (that defect's whole area);
- the label is the candidate with the **largest** area (ties: first in ``class_to_idx`` order), else
  the background class; the reference let the last class in dict order win (B7);
- ``#DISCARD#`` marks a patch that holds annotated pixels but no candidate. A class absent from the
  patch no longer clears it (B6), so the rule is the same with one or many defect classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from storage.geometry import PatchGrid


@dataclass
class Components:
    """Connected components (8-connectivity, one class each) of an index mask."""

    labels: np.ndarray  # int32 (H, W): 0 background, 1..K component ids
    classes: np.ndarray  # int64 (K+1,): mask value of each component (0 for id 0)
    areas: np.ndarray  # int64 (K+1,): pixels of each component in the whole mask


def label_components(mask: np.ndarray) -> Components:
    """Components of each non-zero mask value; touching pixels of different values are separate."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    classes = [0]
    areas = [0]
    for value in np.flatnonzero(np.bincount(mask.ravel(), minlength=256)):
        if value == 0:
            continue
        n, lab, stats, _ = cv2.connectedComponentsWithStats((mask == value).astype(np.uint8), connectivity=8)
        if n <= 1:
            continue
        offset = len(classes) - 1
        sel = lab > 0
        labels[sel] = lab[sel] + offset
        classes.extend([int(value)] * (n - 1))
        areas.extend(stats[1:, cv2.CC_STAT_AREA].tolist())
    return Components(labels, np.asarray(classes, dtype=np.int64), np.asarray(areas, dtype=np.int64))


def label_patches(
    components: Components,
    grid: PatchGrid,
    class_to_idx: dict[str, int],
    area_threshold: float = 0.45,
    area_defect_threshold: float = 0.2,
) -> list[tuple[str, bool]]:
    """``(class name, discard)`` for every patch of ``grid`` (patch-index order)."""
    background = next(k for k, v in class_to_idx.items() if v == 0)
    ordered = [(k, v) for k, v in class_to_idx.items() if v != 0]
    n_comp = len(components.classes)
    patch_area = grid.patch_h * grid.patch_w
    labels = grid.pad(components.labels, is_mask=True)
    out: list[tuple[str, bool]] = []
    for y0, x0, y1, x1 in grid.boxes().tolist():
        counts = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n_comp)
        present = np.flatnonzero(counts[1:]) + 1
        if present.size == 0:
            out.append((background, False))
            continue
        best_name, best_area = background, 0
        for name, value in ordered:
            ids = present[components.classes[present] == value]
            if ids.size == 0:
                continue
            in_patch = counts[ids]
            total = int(in_patch.sum())
            if total > area_threshold * patch_area:
                cand = total
            else:
                ok = in_patch > area_defect_threshold * components.areas[ids]
                cand = int(in_patch[ok].max()) if ok.any() else 0
            if cand > best_area:
                best_name, best_area = name, cand
        out.append((best_name, best_area == 0))
    return out
