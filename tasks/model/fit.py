"""Fit stage logic: the configured scikit-learn classifier, fitted on stored features and saved with skops.

The fit stage's own file is loaded with the types it was allowed to hold (:func:`trusted_types`), never
unpickled; a classifier whose types skops does not trust by default must be listed in
``model.trusted_types`` first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from storage import features as fstore
from storage.classifier import load_classifier_file, reviewed_types, skops_bytes, untrusted_types, write_skops
from tasks.config import ConfigError
from tasks.model.config import TrainFlowConfig
from tasks.model.spec import build_estimator, estimator_problem, type_names

logger = logging.getLogger("patchflow.model")


def make_classifier(cfg: TrainFlowConfig, setting: dict[str, Any] | None = None) -> Any:
    """A new estimator from ``cfg.model`` (with the search ``setting`` applied; every unset ``random_state`` is
    ``core.seed``)."""
    est = build_estimator(cfg.model.target_spec(), cfg.core.seed, setting)
    problem = estimator_problem(est)
    if problem:
        raise ConfigError(f"model {cfg.model.label()}: {problem}")
    return est


TRAIN_FIX = (
    "If you trust them, list them in model.trusted_types (loading a type runs its code), or choose another model"
)


def trusted_types(cfg: TrainFlowConfig) -> set[str]:
    """Types the train flow accepts in its own classifier file beyond skops's defaults: the classes the model spec
    and the search grid name (the config imports them anyway), ``model.trusted_types`` and scikit-learn's tree
    storage (holds no code)."""
    names = type_names(make_classifier(cfg))
    if cfg.search.enabled:
        for key, values in cfg.search.grid.items():
            for value in values:
                names |= type_names(make_classifier(cfg, {key: value}))
    return names | set(cfg.model.trusted_types) | reviewed_types()


def load_fitted(cfg: TrainFlowConfig, path: Path) -> Any:
    """The fit stage's classifier file, loaded with :func:`trusted_types` only (never unpickled)."""
    return load_classifier_file(Path(path), trusted_types(cfg), TRAIN_FIX)


def training_rows(stores: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, sample ids)`` of the labelled rows (label >= 0) of the training ``stores`` (the random passes and,
    with ``trainer.grid_patches``, the train grid), in store order: the one matrix the fit and the search use."""
    paths = [Path(s) for s in stores]
    X, y = fstore.concat_stores(paths)
    keep = y >= 0
    return X[keep], y[keep], fstore.concat_sample_ids(paths)[keep]


def fit_classifier(
    cfg: TrainFlowConfig, stores: list[str], out: Path, setting: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fit on the features of all training passes (with the search's ``setting``, if any) and save the classifier
    with skops (loading it cannot run code)."""
    X, y, _ = training_rows(stores)
    if len(np.unique(y)) < 2:
        raise ValueError("training features hold fewer than 2 classes; check class_to_skip_training and the dataset")
    est = make_classifier(cfg, setting)
    est.fit(X, y)
    try:
        data = skops_bytes(est)
    except Exception as exc:
        raise ConfigError(
            f"model {cfg.model.label()}: skops cannot store the fitted classifier "
            f"({type(exc).__name__}: {str(exc)[:200]}); choose a scikit-learn compatible classifier"
        ) from None
    refused = sorted(set(untrusted_types(data=data)) - trusted_types(cfg))
    if refused:
        raise ConfigError(
            f"model {cfg.model.label()}: the fitted classifier holds types that skops "
            f"does not trust by default: {refused}. {TRAIN_FIX}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_skops(est, out, data)
    logger.info("fitted %s on %d feature rows", type(est).__name__, len(y))
    return {"rows": int(len(y)), "classes": sorted(int(c) for c in np.unique(y))}
