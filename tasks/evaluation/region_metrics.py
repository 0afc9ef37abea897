"""Image-level measures of a reconstructed class map against its ground-truth mask, and its polygons.

- per-defect coverage: every ground-truth defect (connected component, one class) with its area,
  the share of it covered by predicted defect pixels, the share covered by the right class, and
  whether it counts as detected at ``coverage_threshold``;
- the reference's region counts (``true_region_bad``, ``false_region_good``, ``false_region_bad``),
  with int32 region labels (no uint8 wrap above 255 regions, bug B9);
- pixel IoU/Dice per class;
- polygons of the predicted map with holes kept (no row cutting, bug B8);
- :class:`SplitMeasures`: those measures summed over the images of a split (``reconstruction_results.json``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tasks.dataset.labelling import label_components
from tasks.dataset.triangulation import region_to_geometry

SIZE_BUCKETS = ((0, 100, "<100 px"), (100, 1000, "100-1k px"), (1000, 10000, "1k-10k px"), (10000, None, ">=10k px"))


def defect_coverage(
    gt: np.ndarray, pred: np.ndarray, idx_to_class: dict[int, str], coverage_threshold: float = 0.3
) -> list[dict[str, Any]]:
    """One record per ground-truth defect: class, area, coverage, right-class coverage, detected."""
    comps = label_components(gt)
    if len(comps.classes) <= 1:
        return []
    n = len(comps.classes)
    lab = comps.labels.ravel()
    covered = np.bincount(lab, weights=(pred.ravel() > 0), minlength=n)
    right = np.bincount(lab, weights=(pred.ravel() == gt.ravel()) & (gt.ravel() > 0), minlength=n)
    out = []
    for j in range(1, n):
        area = int(comps.areas[j])
        cov = float(covered[j] / area)
        out.append(
            {
                "defect_id": j,
                "class": idx_to_class.get(int(comps.classes[j]), str(int(comps.classes[j]))),
                "area": area,
                "coverage": round(cov, 6),
                "right_class_coverage": round(float(right[j] / area), 6),
                "detected": bool(cov >= coverage_threshold and cov > 0),
            }
        )
    return out


def region_counts(gt: np.ndarray | None, pred: np.ndarray) -> dict[str, int]:
    """The reference's counts (predicted regions touching no defect, missed and found defects) and the number of
    predicted regions."""
    pred_regions = label_components(pred.astype(np.int32).clip(0, 255).astype(np.uint8))
    gt_bad = (gt > 0) if gt is not None else np.zeros(pred.shape, bool)
    n_pred = len(pred_regions.classes)
    hit = np.bincount(pred_regions.labels.ravel(), weights=gt_bad.ravel(), minlength=n_pred)
    false_bad = int(np.sum(hit[1:] == 0))
    base = {"false_region_bad": false_bad, "predicted_regions": n_pred - 1}
    if gt is None:
        return {**base, "false_region_good": 0, "true_region_bad": 0}
    gt_comps = label_components(gt)
    n_gt = len(gt_comps.classes)
    found = np.bincount(gt_comps.labels.ravel(), weights=(pred.ravel() > 0), minlength=n_gt)
    return {
        **base,
        "false_region_good": int(np.sum(found[1:] == 0)),
        "true_region_bad": int(np.sum(found[1:] > 0)),
    }


def pixel_scores(gt: np.ndarray, pred: np.ndarray, class_ids: list[int]) -> dict[int, dict[str, float | int | None]]:
    """Per class: intersection, union, IoU and Dice (None when the class is absent from both maps)."""
    out: dict[int, dict[str, float | int | None]] = {}
    for c in class_ids:
        g, p = gt == c, pred == c
        inter, gs, ps = int(np.sum(g & p)), int(g.sum()), int(p.sum())
        union = gs + ps - inter
        out[c] = {
            "intersection": inter,
            "gt_pixels": gs,
            "pred_pixels": ps,
            "iou": inter / union if union else None,
            "dice": 2 * inter / (gs + ps) if gs + ps else None,
        }
    return out


def _ring(coords: np.ndarray) -> list[dict[str, int]]:
    return [{"x": round(float(x)), "y": round(float(y))} for x, y in coords[:-1]]


def prediction_polygons(
    pred: np.ndarray,
    idx_to_class: dict[int, str],
    mean_prob: np.ndarray | None = None,
    patch_boxes: np.ndarray | None = None,
    patch_labels: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Polygons of each predicted defect region: reference keys (label, points) plus holes and statistics.

    ``mean_prob``: (C, H, W) per-pixel class probabilities; ``patch_boxes``/``patch_labels``: the
    image's patches (y0, x0, y1, x1) and predicted classes, to count the patches supporting a region.
    Coordinates are pixel edges (a 1-pixel region is the unit square around it).
    """
    out = []
    for c in np.flatnonzero(np.bincount(pred.ravel().clip(0)))[1:].tolist() if pred.size else []:
        n, lab = cv2.connectedComponents((pred == c).astype(np.uint8), connectivity=8)
        for r in range(1, n):
            region = lab == r
            geom = region_to_geometry(region)
            for poly in getattr(geom, "geoms", [geom]):
                if poly.is_empty:
                    continue
                rec: dict[str, Any] = {
                    "label": idx_to_class.get(c, str(c)),
                    "points": _ring(np.asarray(poly.exterior.coords)),
                    "holes": [_ring(np.asarray(h.coords)) for h in poly.interiors],
                    "area": round(float(poly.area)),
                }
                if mean_prob is not None:
                    p = mean_prob[c][region]
                    rec["mean_probability"] = round(float(p.mean()), 6)
                    rec["max_probability"] = round(float(p.max()), 6)
                if patch_boxes is not None and patch_labels is not None:
                    rec["supporting_patches"] = sum(
                        1
                        for (y0, x0, y1, x1), lab in zip(patch_boxes.tolist(), np.asarray(patch_labels).tolist())
                        if lab == c and region[y0:y1, x0:x1].any()
                    )
                out.append(rec)
    return out


class SplitMeasures:
    """The measures of every image of a split, added one image at a time, and their summary."""

    def __init__(self, class_to_idx: dict[str, int], coverage_threshold: float) -> None:
        self.idx_to_class = {v: k for k, v in class_to_idx.items()}
        self.defect_ids = sorted(v for v in class_to_idx.values() if v > 0)
        self.threshold = coverage_threshold
        self.totals = {"false_region_bad": 0, "false_region_good": 0, "true_region_bad": 0}
        self.predicted_regions = 0
        self.pix: dict[int, dict[str, int]] = defaultdict(lambda: {"intersection": 0, "gt_pixels": 0, "pred_pixels": 0})
        self.defects: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def add(
        self,
        image_path: Path,
        mask_path: Path | None,
        pred: np.ndarray,
        gt: np.ndarray | None,
        polygons: list[dict[str, Any]],
        n_patches: int,
    ) -> None:
        """Measure one image's class map ``pred`` against its mask ``gt`` (None: no mask) and keep its record."""
        counts = region_counts(gt, pred)
        for k in self.totals:
            self.totals[k] += counts[k]
        self.predicted_regions += counts["predicted_regions"]
        name = Path(image_path).name
        rec: dict[str, Any] = {
            "image_path": str(image_path),
            "mask_path": str(mask_path) if mask_path else None,
            "file_name": name,
            "prediction": polygons,
            "n_patches": int(n_patches),
            **counts,
        }
        if gt is not None:
            cov = defect_coverage(gt, pred, self.idx_to_class, self.threshold)
            for d in cov:
                d["image"] = name
            self.defects.extend(cov)
            rec["defects"] = cov
            scores = pixel_scores(gt, pred, self.defect_ids)
            rec["pixel_scores"] = {self.idx_to_class[c]: s for c, s in scores.items()}
            for c, s in scores.items():
                for k in ("intersection", "gt_pixels", "pred_pixels"):
                    self.pix[c][k] += int(s[k] or 0)
        self.records.append(rec)

    def results(self, method: str) -> dict[str, Any]:
        """The reference's keys (region counts, ``reconstructions``, its type and method) plus ``summary``."""
        return {
            **self.totals,
            "reconstructions": self.records,
            "reconstructions_type": "polygon",
            "patch_reconstruction_method": method,
            "summary": self.summary(),
        }

    def summary(self) -> dict[str, Any]:
        """Detection by class and by defect size, pixel IoU/Dice per class, region precision."""
        by_class: dict[str, list] = defaultdict(list)
        by_size: dict[str, list] = defaultdict(list)
        for d in self.defects:
            by_class[d["class"]].append(d)
            by_size[_size_bucket(d["area"])].append(d)
        pixel = {}
        for c, s in sorted(self.pix.items()):
            union = s["gt_pixels"] + s["pred_pixels"] - s["intersection"]
            denom = s["gt_pixels"] + s["pred_pixels"]
            pixel[self.idx_to_class.get(c, str(c))] = {
                "iou": s["intersection"] / union if union else None,
                "dice": 2 * s["intersection"] / denom if denom else None,
            }
        predicted, false = self.predicted_regions, self.totals["false_region_bad"]
        return {
            "coverage_threshold": self.threshold,
            "all_defects": _detection(self.defects),
            "by_class": {k: _detection(v) for k, v in sorted(by_class.items())},
            "by_size": {name: _detection(by_size[name]) for _, _, name in SIZE_BUCKETS if name in by_size},
            "pixel": pixel,
            "predicted_regions": predicted,
            "false_regions": false,
            "region_precision": (predicted - false) / predicted if predicted else None,
        }


def _size_bucket(area: int) -> str:
    return next(name for lo, hi, name in SIZE_BUCKETS if area >= lo and (hi is None or area < hi))


def _detection(items: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(items)
    return {
        "defects": n,
        "detected": sum(d["detected"] for d in items),
        "detection_rate": sum(d["detected"] for d in items) / n if n else None,
        "mean_coverage": float(np.mean([d["coverage"] for d in items])) if n else None,
        "mean_right_class_coverage": float(np.mean([d["right_class_coverage"] for d in items])) if n else None,
    }
