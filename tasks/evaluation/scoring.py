"""Scoring of a split: patch predictions -> patch metrics, class maps, ``reconstruction_results.json``.

Keeps the reference's keys (``false_region_bad``, ``false_region_good``, ``true_region_bad``,
``reconstructions`` with ``prediction`` polygons, ``reconstructions_type``,
``patch_reconstruction_method``) and adds per-image and summary measures: per-defect coverage,
pixel IoU/Dice per class, polygons with holes and their statistics. Geometry comes from the dataset
per image (:class:`storage.geometry.GridSpec`); missing patches (filters) only mean fewer votes, never
a reshape error. Each image goes through the one inferer (:class:`tasks.evaluation.inferer.PatchInferer`).
The results stay in memory (:class:`SplitScores`) for the report once they are written.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from storage import layout
from storage.geometry import GridSpec
from tasks.evaluation.inferer import PatchInferer, full_probabilities
from tasks.evaluation.region_metrics import SplitMeasures
from tasks.imageio import decode_mask, file_image_size, read_bytes

#: version of what the scoring writes (metrics, reconstruction results, report): part of the validate and
#: evaluate cache keys, so results cached by older code are recomputed (2: #DISCARD# patches not scored, B28)
METRICS_VERSION = "2"
_NONE = np.zeros(0, np.int64)


@dataclass
class SplitScores:
    """What scoring a split gives, kept in memory for the report: ``metrics.json``, the rows of
    ``test_results.csv`` as ``(sample, real_label, pred_label, probability)`` and ``reconstruction_results.json``
    (the class maps are in ``maps/``)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, int, int, float]] = field(default_factory=list)
    reconstruction: dict[str, Any] = field(default_factory=dict)


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


def annotated_good(info: dict[str, Any], class_to_idx: dict[str, int]) -> set[int]:
    """Indices of the dataset's annotated-good classes (background in maps and masks)."""
    return {class_to_idx[n] for n in (info.get("annotated_good") or []) if n in class_to_idx}


def ground_truth(mask_path: Path | None, good: set[int]) -> np.ndarray | None:
    """An image's mask as int32 class indices, annotated-good classes as background (None: no mask)."""
    if mask_path is None:
        return None
    gt = decode_mask(read_bytes(mask_path), mask_path)[0].astype(np.int32)
    if good:
        gt[np.isin(gt, list(good))] = 0
    return gt


def _patches_by_image(sample_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image stem -> (rows of its patches, their grid indices), from the patch names."""
    found: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row, sid in enumerate(sample_ids):
        stem, index, _ = layout.parse_patch_name(os.path.basename(sid))
        found[stem].append((row, index))
    return {
        stem: (np.array([r for r, _ in pairs], np.int64), np.array([i for _, i in pairs], np.int64))
        for stem, pairs in found.items()
    }


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
    spec = GridSpec.from_info(info)
    good = annotated_good(info, class_to_idx)
    thresholds = class_thresholds(soft_thresholds, class_to_idx) if method == "soft" else None
    inferer = PatchInferer(method, class_to_idx, thresholds, good)
    patches = _patches_by_image(sample_ids)
    pred_labels = np.asarray(pred_labels)
    if maps_dir is not None:
        Path(maps_dir).mkdir(parents=True, exist_ok=True)
    measures = SplitMeasures(class_to_idx, coverage_threshold)
    for entry in info.get(f"{split}_files") or []:
        image_path = layout.resolve_path(entry.get("image_path"), data_path)
        if image_path is None:
            raise layout.DatasetFormatError(
                f"{data_path / layout.INFO_FILE}: a {split}_files entry has no image_path; regenerate the dataset"
            )
        mask_path = layout.resolve_path(entry.get("mask_path"), data_path)
        stem = Path(image_path).stem
        grid = spec.grid(*file_image_size(image_path))
        rows, idx = patches.get(stem, (_NONE, _NONE))
        labels = pred_labels[rows] if len(rows) else _NONE
        probs = probabilities[rows] if len(rows) else np.zeros((0, inferer.num_classes), np.float32)
        result = inferer.merge(grid, probs, idx, labels)
        gt = ground_truth(mask_path, good)
        if maps_dir is not None:
            cv2.imwrite(str(Path(maps_dir) / f"{stem}.png"), result.class_map.astype(np.uint8))
        measures.add(image_path, mask_path, result.class_map, gt, result.polygons, len(rows))
    return measures.results(method)


def patch_metrics(y_true: np.ndarray, pred: np.ndarray, idx_to_class: dict[int, str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and confusion matrix over labelled patches
    (y >= 0)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    known = y_true >= 0
    metrics: dict[str, Any] = {"n_patches": len(y_true), "n_evaluated": int(known.sum())}
    if not known.any():
        return metrics
    yt, yp = y_true[known], pred[known]
    labels = sorted(set(yt.tolist()) | set(yp.tolist()))
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    metrics.update(
        accuracy=float(accuracy_score(yt, yp)),
        balanced_accuracy=float(balanced_accuracy_score(yt, yp)),
        per_class={
            idx_to_class.get(c, str(c)): {
                "precision": float(pi),
                "recall": float(ri),
                "f1": float(fi),
                "support": int(si),
            }
            for c, pi, ri, fi, si in zip(labels, p, r, f, s)
        },
        confusion_matrix={
            "labels": [idx_to_class.get(c, str(c)) for c in labels],
            "matrix": confusion_matrix(yt, yp, labels=labels).tolist(),
        },
    )
    return metrics


def split_scores(
    data_path: Path,
    split: str,
    ids: Sequence[str],
    y_eval: np.ndarray,
    pred: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[int],
    class_to_idx: dict[str, int],
    method: str,
    coverage_threshold: float,
    out_dir: Path,
    soft_thresholds: dict[str, float] | None = None,
    n_discarded: int | None = None,
) -> SplitScores:
    """Patch metrics and reconstruction of a split's patch predictions (``pred``; ``proba``: ``predict_proba``
    over the classifier's ``classes``; ``y_eval``: -1 where not scored); writes ``test_results.csv``, ``maps/``,
    ``reconstruction_results.json`` and ``metrics.json`` into ``out_dir`` and returns them in memory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        (sid, int(t), int(p), float(f"{pr:.6f}"))  # the probability as the CSV holds it
        for sid, t, p, pr in zip(ids, y_eval.tolist(), pred.tolist(), proba.max(axis=1).tolist())
    ]
    with (out_dir / "test_results.csv").open("w", newline="") as fh:  # the reference's columns (pandas-style index)
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["", "sample", "real_label", "pred_label", "probability", "filename"])
        for i, (sid, t, p, pr) in enumerate(rows):
            w.writerow([i, sid, t, p, f"{pr:.6f}", layout.parse_patch_name(os.path.basename(sid))[0]])
    metrics = patch_metrics(y_eval, pred, {v: k for k, v in class_to_idx.items()})
    if n_discarded is not None:
        metrics["n_discarded"] = n_discarded  # #DISCARD# patches: reconstructed, not scored (B28)
    full = full_probabilities(proba, classes, max(class_to_idx.values()) + 1)
    results = evaluate_split(
        data_path,
        split,
        ids,
        pred,
        full,
        class_to_idx,
        method,
        coverage_threshold,
        maps_dir=out_dir / "maps",
        soft_thresholds=soft_thresholds,
    )
    layout.write_json(out_dir / "reconstruction_results.json", results)
    counts = ("false_region_bad", "false_region_good", "true_region_bad", "patch_reconstruction_method")
    metrics["reconstruction"] = results["summary"] | {k: results[k] for k in counts}
    layout.write_json(out_dir / "metrics.json", metrics)
    return SplitScores(metrics, rows, results)


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
) -> SplitScores:
    """Classify a stored split, then write and return its scores (:func:`split_scores`).

    Patches of skipped classes and of unlabelled images count as -1: left out of patch metrics, kept in
    the reconstruction (as in the reference, but the skipped classes really come from the bundle: B4).
    ``#DISCARD#`` patches (ambiguous labels) are left out of the patch metrics too, unlike the reference
    (B28); they still vote in the reconstruction, which needs the whole grid. ``est``: the fitted classifier,
    loaded by ``storage.bundle.load_classifier`` or ``storage.classifier.load_classifier_file`` (never unpickled
    here).
    """
    from storage import features as fstore
    from storage.classifier import width_problem

    X, y, ids, _ = fstore.load_features(store)
    problem = width_problem(est, X.shape[1])
    if problem:
        raise fstore.FeatureStoreError(
            f"classifier {problem} (feature store {store}); the classifier and the "
            "features come from different backbones: re-export or retrain the model"
        )
    skip = {class_to_idx[n] for n in (class_to_skip or []) if n in class_to_idx}
    discard = np.array([layout.parse_patch_name(os.path.basename(sid))[2] for sid in ids.tolist()], dtype=bool)
    y_eval = np.where(np.isin(y, list(skip)) | discard, -1, y)
    proba = est.predict_proba(X)
    pred = est.classes_[np.argmax(proba, axis=1)]
    return split_scores(
        data_path,
        split,
        ids.tolist(),
        y_eval,
        pred,
        proba,
        est.classes_,
        class_to_idx,
        method,
        coverage_threshold,
        out_dir,
        soft_thresholds,
        n_discarded=int(discard.sum()),
    )


def headline(metrics: dict[str, Any], split: str) -> list[str]:
    """One-line summaries of patch accuracy and defect detection, for the command-line entry points."""
    lines = []
    if "accuracy" in metrics:
        lines.append(
            f"{split} accuracy {metrics['accuracy']:.3f}, balanced accuracy "
            f"{metrics['balanced_accuracy']:.3f} on {metrics['n_evaluated']} patches"
        )
    rec = (metrics.get("reconstruction") or {}).get("all_defects") or {}
    if rec.get("defects"):
        lines.append(f"{split} defects detected {rec['detected']}/{rec['defects']}")
    return lines
