"""Classifier search logic: every setting of ``search.grid`` scored by cross-validation on the cached training
features, with folds grouped by source image (the random crops and grid patches of one image are never in both
the fitting and the scoring part of a fold), so a setting cannot win by recognising images it was fitted on.

The training stores name their rows ``<h5 name>#<row>`` (``<image stem>_<good|component>.h5``) and grid patch
rows name their patch file (``<image stem>_<index>.png``); :func:`image_of` derives the image stem, checked
against the train split's images in ``info.json``. The refit of the best setting on all rows is the fit stage's
(:func:`tasks.model.fit.fit_classifier` with the chosen setting).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from storage import layout
from tasks.config import ConfigError
from tasks.model.config import TrainFlowConfig
from tasks.model.fit import make_classifier, training_rows
from tasks.model.spec import instantiate_value, seed_unset

logger = logging.getLogger("patchflow.search")

#: search.metric -> scikit-learn scorer
SCORERS = {"macro_f1": "f1_macro", "balanced_accuracy": "balanced_accuracy"}


def grid_settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``grid`` (keys in the given order, the last one varying fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def setting_label(setting: dict[str, Any]) -> str:
    """A setting in one line: ``scaler=StandardScaler, clf__C=0.1, clf__class_weight=None``."""

    def short(v: Any) -> str:
        return str(v["_target_"]).rpartition(".")[2] if isinstance(v, dict) and "_target_" in v else str(v)

    return ", ".join(f"{k}={short(v)}" for k, v in setting.items())


def image_of(sample_id: str, stems: set[str] | frozenset[str] = frozenset()) -> str:
    """The image stem a training row comes from: ``a_1.h5#7`` -> ``a``, ``#DISCARD#a_3.png`` -> ``a`` (a name
    that is itself a train image's stem is kept whole)."""
    base, sep, row = sample_id.rpartition("#")
    name = os.path.basename(base if sep and row.isdigit() else sample_id)
    name = name.removeprefix(layout.DISCARD_PREFIX)
    stem = os.path.splitext(name)[0]
    if stem in stems:
        return stem
    head = stem.rpartition("_")[0]
    return head or stem


def image_groups(sample_ids: Sequence[str], stems: set[str] | frozenset[str] = frozenset()) -> np.ndarray:
    """One integer per row: the index of its source image (:func:`image_of`)."""
    names = [image_of(str(s), stems) for s in sample_ids]
    _, codes = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    return codes.astype(np.int64)


def train_stems(data_path: Path) -> set[str]:
    """Stems of the train split's images (``info.json``)."""
    info = layout.read_info(Path(data_path))
    return {Path(e["image_path"]).stem for e in info.get("train_files") or [] if e.get("image_path")}


def grouped_folds(groups: np.ndarray, folds: int) -> Any:
    """scikit-learn's ``GroupKFold`` for ``groups`` (no image on both sides of a fold); a ConfigError when there
    are fewer images than folds."""
    from sklearn.model_selection import GroupKFold

    n = len(np.unique(groups))
    if n < folds:
        raise ConfigError(
            f"search.folds {folds} needs at least {folds} training images; the training features come from {n}: "
            "lower search.folds"
        )
    return GroupKFold(n_splits=folds)


def run_search(cfg: TrainFlowConfig, stores: list[str]) -> dict[str, Any]:
    """Score every setting of ``cfg.search.grid`` by grouped cross-validation on all rows of the training
    ``stores``; the record: metric, folds, rows, images, the table (setting, mean and std over folds, mean fit
    seconds, the score of each fold) and the index of the best setting (the first of the highest mean).

    Every row is used: the rows are many crops of fewer images, and a fit on a subset regularises more (the loss
    sums over rows), so a subset would favour a larger ``C`` than the refit on all rows needs."""
    from sklearn.model_selection import GridSearchCV

    X, y, ids = training_rows(stores)
    s = cfg.search
    groups = image_groups(ids.tolist(), train_stems(Path(cfg.datamodule.data_path)))
    cv = grouped_folds(groups, s.folds)
    settings = grid_settings(s.grid)
    param_grid = [{k: [seed_unset(instantiate_value(v), cfg.core.seed)] for k, v in c.items()} for c in settings]
    gs = GridSearchCV(
        make_classifier(cfg), param_grid, scoring=SCORERS[s.metric], cv=cv, refit=False, n_jobs=s.n_jobs,
        error_score="raise",
    )  # fmt: skip
    t = time.perf_counter()
    gs.fit(X, y, groups=groups)
    wall = time.perf_counter() - t
    res = gs.cv_results_
    table = [
        {
            "setting": c,
            "label": setting_label(c),
            "mean": round(float(res["mean_test_score"][i]), 6),
            "std": round(float(res["std_test_score"][i]), 6),
            "fit_s": round(float(res["mean_fit_time"][i]), 3),
            "folds": [round(float(res[f"split{f}_test_score"][i]), 6) for f in range(s.folds)],
        }
        for i, c in enumerate(settings)
    ]
    best = int(np.argmax([round(float(m), 6) for m in res["mean_test_score"]]))
    logger.info("search: %d settings x %d folds in %.1f s; best %s", len(settings), s.folds, wall, table[best]["label"])
    return {
        "metric": s.metric,
        "folds": s.folds,
        "rows": int(len(y)),
        "images": int(len(np.unique(groups))),
        "wall_s": round(wall, 2),
        "table": table,
        "best": best,
    }


def search_choice(record: dict[str, Any]) -> dict[str, Any]:
    """What ``model.json`` records of a search (``search``): the chosen setting and its CV score."""
    best = record["table"][record["best"]]
    return {
        "setting": best["setting"],
        "label": best["label"],
        "metric": record["metric"],
        "cv_score": best["mean"],
        "cv_std": best["std"],
        "folds": record["folds"],
        "settings": len(record["table"]),
    }
