"""Reconstruction stage: patch predictions of a split -> class maps per image -> ``reconstruction_results.json``.

Keeps the reference's keys (``false_region_bad``, ``false_region_good``, ``true_region_bad``,
``reconstructions`` with ``prediction`` polygons, ``reconstructions_type``,
``patch_reconstruction_method``) and adds per-image and summary measures: per-defect coverage,
pixel IoU/Dice per class, polygons with holes and their statistics. Geometry comes from the dataset
per image; missing patches (filters) only mean fewer votes, never a reshape error.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from storage import layout
from storage.geometry import compute_grid
from tasks.imageio import decode_mask, file_image_size, read_bytes
from tasks.evaluation.reconstruction import make_merger, mean_probabilities
from tasks.evaluation.region_metrics import defect_coverage, pixel_scores, prediction_polygons, region_counts

#: version of what the scoring writes (metrics, reconstruction results, report): part of the validate and
#: evaluate cache keys, so results cached by older code are recomputed (2: #DISCARD# patches not scored, B28)
METRICS_VERSION = "2"

SIZE_BUCKETS = ((0, 100, "<100 px"), (100, 1000, "100-1k px"), (1000, 10000, "1k-10k px"), (10000, None, ">=10k px"))


def full_probabilities(proba: np.ndarray, classes: Sequence[int], num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities from a classifier's ``predict_proba`` over its ``classes_``."""
    out = np.zeros((proba.shape[0], num_classes), dtype=np.float32)
    out[:, np.asarray(classes, dtype=np.int64)] = proba
    return out


def class_thresholds(by_name: dict[str, float] | None, class_to_idx: dict[str, int]) -> list[float] | None:
    """Per-class-index thresholds of the soft merger from a {class name: threshold} mapping (others 0)."""
    if not by_name:
        return None
    unknown = sorted(set(by_name) - set(class_to_idx))
    if unknown:
        raise ValueError(f"soft_thresholds name unknown classes {unknown}; classes are {sorted(class_to_idx)}")
    out = [0.0] * (max(class_to_idx.values()) + 1)
    for name, thr in by_name.items():
        out[class_to_idx[name]] = float(thr)
    return out


def _grid(info: dict[str, Any], h: int, w: int):
    if info.get("patch_size"):  # patch_size wins when both are present (the reference extracted with it)
        return compute_grid(h, w, patch_size=info["patch_size"], overlap=info.get("overlap") or 0.0)
    return compute_grid(h, w, patch_number=info["patch_number"], overlap=info.get("overlap") or 0.0)


def _size_bucket(area: int) -> str:
    return next(name for lo, hi, name in SIZE_BUCKETS if area >= lo and (hi is None or area < hi))


def evaluate_split(
    data_path: Path,
    split: str,
    sample_ids: Sequence[str],
    pred_labels: np.ndarray,
    probabilities: np.ndarray,
    class_to_idx: dict[str, int],
    method: str = "major_voting",
    coverage_threshold: float = 0.3,
    maps_dir: Path | None = None,
    soft_thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Reconstruct every image of ``split`` and measure it; optionally save class maps as PNG.

    ``soft_thresholds`` (class name -> minimum mean probability) only applies to the ``soft`` method.
    """
    data_path = Path(data_path)
    info = layout.read_info(data_path)
    idx_to_class = {v: k for k, v in class_to_idx.items()}
    num_classes = max(class_to_idx.values()) + 1
    good = {class_to_idx[n] for n in (info.get("annotated_good") or []) if n in class_to_idx}
    thresholds = class_thresholds(soft_thresholds, class_to_idx) if method == "soft" else None
    by_stem: dict[str, list[int]] = defaultdict(list)
    for row, sid in enumerate(sample_ids):
        stem, _, _ = layout.parse_patch_name(os.path.basename(sid))
        by_stem[stem].append(row)
    if maps_dir is not None:
        Path(maps_dir).mkdir(parents=True, exist_ok=True)
    totals = {"false_region_bad": 0, "false_region_good": 0, "true_region_bad": 0}
    predicted_regions = 0
    pix: dict[int, dict[str, int]] = defaultdict(lambda: {"intersection": 0, "gt_pixels": 0, "pred_pixels": 0})
    defects: list[dict[str, Any]] = []
    recons = []
    for entry in info.get(f"{split}_files") or []:
        image_path = layout.resolve_path(entry["image_path"], data_path)
        mask_path = layout.resolve_path(entry.get("mask_path"), data_path)
        stem = Path(image_path).stem
        h, w = file_image_size(image_path)
        grid = _grid(info, h, w)
        rows = np.asarray(by_stem.get(stem, []), dtype=np.int64)
        idx = np.array([layout.parse_patch_name(os.path.basename(sample_ids[r]))[1] for r in rows], dtype=np.int64)
        labels = np.asarray(pred_labels)[rows] if len(rows) else np.zeros(0, np.int64)
        probs = probabilities[rows] if len(rows) else np.zeros((0, num_classes), np.float32)
        merger = make_merger(method, grid, num_classes, thresholds)
        merger.add(idx, labels, probs)
        pred = merger.finalize()
        if good:
            pred[np.isin(pred, list(good))] = 0  # annotated-good classes are good in maps (B3 fixed)
        # per-pixel probabilities only feed the polygons of predicted defects
        mean_prob = mean_probabilities(merger, idx, labels, probs) if pred.any() else None
        gt = None
        if mask_path is not None:
            gt = decode_mask(read_bytes(mask_path), mask_path)[0].astype(np.int32)
            if good:
                gt[np.isin(gt, list(good))] = 0
        if maps_dir is not None:
            cv2.imwrite(str(Path(maps_dir) / f"{stem}.png"), pred.astype(np.uint8))
        counts = region_counts(gt, pred)
        for k in totals:
            totals[k] += counts[k]
        predicted_regions += counts["predicted_regions"]
        rec: dict[str, Any] = {
            "image_path": str(image_path),
            "mask_path": str(mask_path) if mask_path is not None else None,
            "file_name": Path(image_path).name,
            "prediction": prediction_polygons(pred, idx_to_class, mean_prob, grid.boxes()[idx] if len(idx) else None, labels),
            "n_patches": int(len(rows)),
            **counts,
        }
        if gt is not None:
            cov = defect_coverage(gt, pred, idx_to_class, coverage_threshold)
            for d in cov:
                d["image"] = Path(image_path).name
            defects.extend(cov)
            rec["defects"] = cov
            scores = pixel_scores(gt, pred, sorted(v for v in class_to_idx.values() if v > 0))
            rec["pixel_scores"] = {idx_to_class[c]: s for c, s in scores.items()}
            for c, s in scores.items():
                for k in ("intersection", "gt_pixels", "pred_pixels"):
                    pix[c][k] += int(s[k])
        recons.append(rec)
    return {
        **totals,
        "reconstructions": recons,
        "reconstructions_type": "polygon",
        "patch_reconstruction_method": method,
        "summary": _summary(defects, pix, idx_to_class, coverage_threshold, totals["false_region_bad"], predicted_regions),
    }


def _summary(defects, pix, idx_to_class, threshold, false_regions: int, predicted_regions: int) -> dict[str, Any]:
    def agg(items: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(items)
        return {
            "defects": n,
            "detected": sum(d["detected"] for d in items),
            "detection_rate": sum(d["detected"] for d in items) / n if n else None,
            "mean_coverage": float(np.mean([d["coverage"] for d in items])) if n else None,
            "mean_right_class_coverage": float(np.mean([d["right_class_coverage"] for d in items])) if n else None,
        }

    by_class: dict[str, list] = defaultdict(list)
    by_size: dict[str, list] = defaultdict(list)
    for d in defects:
        by_class[d["class"]].append(d)
        by_size[_size_bucket(d["area"])].append(d)
    pixel = {}
    for c, s in sorted(pix.items()):
        union = s["gt_pixels"] + s["pred_pixels"] - s["intersection"]
        denom = s["gt_pixels"] + s["pred_pixels"]
        pixel[idx_to_class.get(c, str(c))] = {
            "iou": s["intersection"] / union if union else None,
            "dice": 2 * s["intersection"] / denom if denom else None,
        }
    return {
        "coverage_threshold": threshold,
        "all_defects": agg(defects),
        "by_class": {k: agg(v) for k, v in sorted(by_class.items())},
        "by_size": {name: agg(by_size[name]) for _, _, name in SIZE_BUCKETS if name in by_size},
        "pixel": pixel,
        "predicted_regions": predicted_regions,
        "false_regions": false_regions,
        "region_precision": (predicted_regions - false_regions) / predicted_regions if predicted_regions else None,
    }


def patch_metrics(y_true: np.ndarray, pred: np.ndarray, idx_to_class: dict[int, str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and confusion matrix over labelled patches (y >= 0)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    known = y_true >= 0
    metrics: dict[str, Any] = {"n_patches": int(len(y_true)), "n_evaluated": int(known.sum())}
    if not known.any():
        return metrics
    yt, yp = y_true[known], pred[known]
    labels = sorted(set(yt.tolist()) | set(yp.tolist()))
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    metrics.update(
        accuracy=float(accuracy_score(yt, yp)),
        balanced_accuracy=float(balanced_accuracy_score(yt, yp)),
        per_class={
            idx_to_class.get(c, str(c)): {"precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
            for c, pi, ri, fi, si in zip(labels, p, r, f, s)
        },
        confusion_matrix={
            "labels": [idx_to_class.get(c, str(c)) for c in labels],
            "matrix": confusion_matrix(yt, yp, labels=labels).tolist(),
        },
    )
    return metrics


def score_split(
    est: Any,
    store: Path,
    data_path: Path,
    split: str,
    class_to_idx: dict[str, int],
    class_to_skip: Sequence[str] | None,
    method: str,
    coverage_threshold: float,
    out_dir: Path,
    soft_thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Classify a stored split, then write test_results.csv, reconstruction_results.json, maps/ and metrics.json.

    Patches of skipped classes and of unlabelled images count as -1: left out of patch metrics, kept in
    the reconstruction (as in the reference, but the skipped classes really come from the bundle: B4).
    ``#DISCARD#`` patches (ambiguous labels) are left out of the patch metrics too, unlike the reference
    (B28); they still vote in the reconstruction, which needs the whole grid. ``est``: the fitted classifier,
    loaded by ``storage.bundle.load_classifier`` or ``tasks.model.stage.load_fitted`` (never unpickled here).
    """
    from storage import features as fstore
    from storage.classifier import width_problem

    X, y, ids, _ = fstore.load_features(store)
    problem = width_problem(est, X.shape[1])
    if problem:
        raise fstore.FeatureStoreError(f"classifier {problem} (feature store {store}); the classifier and the "
                                       "features come from different backbones: re-export or retrain the model")
    idx_to_class = {v: k for k, v in class_to_idx.items()}
    skip = {class_to_idx[n] for n in (class_to_skip or []) if n in class_to_idx}
    names = [layout.parse_patch_name(os.path.basename(sid)) for sid in ids.tolist()]
    discard = np.array([d for _, _, d in names], dtype=bool)
    y_eval = np.where(np.isin(y, list(skip)) | discard, -1, y)
    proba = est.predict_proba(X)
    pred = est.classes_[np.argmax(proba, axis=1)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "test_results.csv").open("w", newline="") as fh:  # the reference's columns (pandas-style index)
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["", "sample", "real_label", "pred_label", "probability", "filename"])
        for i, (sid, t, p, pr, (stem, _, _)) in enumerate(zip(ids.tolist(), y_eval.tolist(), pred.tolist(),
                                                                proba.max(axis=1).tolist(), names)):
            w.writerow([i, sid, t, p, f"{pr:.6f}", stem])
    metrics = patch_metrics(y_eval, pred, idx_to_class)
    metrics["n_discarded"] = int(discard.sum())  # #DISCARD# patches: reconstructed, not scored (B28)
    results = evaluate_split(
        data_path, split, ids.tolist(), pred, full_probabilities(proba, est.classes_, max(class_to_idx.values()) + 1),
        class_to_idx, method, coverage_threshold, maps_dir=out_dir / "maps", soft_thresholds=soft_thresholds,
    )
    layout.write_json(out_dir / "reconstruction_results.json", results)
    metrics["reconstruction"] = results["summary"] | {
        k: results[k] for k in ("false_region_bad", "false_region_good", "true_region_bad", "patch_reconstruction_method")
    }
    layout.write_json(out_dir / "metrics.json", metrics)
    return metrics


def headline(metrics: dict[str, Any], split: str) -> list[str]:
    """One-line summaries of patch accuracy and defect detection, for the command-line entry points."""
    lines = []
    if "accuracy" in metrics:
        lines.append(f"{split} accuracy {metrics['accuracy']:.3f}, balanced accuracy {metrics['balanced_accuracy']:.3f} "
                     f"on {metrics['n_evaluated']} patches")
    rec = (metrics.get("reconstruction") or {}).get("all_defects") or {}
    if rec.get("defects"):
        lines.append(f"{split} defects detected {rec['detected']}/{rec['defects']}")
    return lines

