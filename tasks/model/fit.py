"""Fit stage logic: the configured scikit-learn classifier, fitted on stored features and saved with skops.

The fit stage's own file is loaded with the types it was allowed to hold (:func:`trusted_types`), never
unpickled; a classifier whose types skops does not trust by default must be listed in
``model.trusted_types`` first.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np

from storage import features as fstore
from storage.classifier import load_classifier_file, reviewed_types, skops_bytes, untrusted_types, write_skops
from tasks.config import ConfigError, import_object
from tasks.model.config import TrainFlowConfig

logger = logging.getLogger("patchflow.model")


def make_classifier(cfg: TrainFlowConfig) -> Any:
    """Instantiate the configured scikit-learn classifier (seeded with core.seed when it takes a random_state)."""
    cls = import_object(cfg.model.classifier)
    params = dict(cfg.model.params)
    try:
        accepts = "random_state" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        params.setdefault("random_state", cfg.core.seed)
    est = cls(**params)
    if not (hasattr(est, "fit") and hasattr(est, "predict_proba")):
        raise ValueError(f"model.classifier {cfg.model.classifier} must provide fit and predict_proba")
    return est


TRAIN_FIX = (
    "If you trust them, list them in model.trusted_types (loading a type runs its code), "
    "or choose another model.classifier"
)


def trusted_types(cfg: TrainFlowConfig) -> set[str]:
    """Types the train flow accepts in its own classifier file beyond skops's defaults: the configured class
    (the config imports it anyway), ``model.trusted_types`` and scikit-learn's tree storage (holds no code)."""
    cls = import_object(cfg.model.classifier)
    return {f"{cls.__module__}.{cls.__qualname__}", *cfg.model.trusted_types} | reviewed_types()


def load_fitted(cfg: TrainFlowConfig, path: Path) -> Any:
    """The fit stage's classifier file, loaded with :func:`trusted_types` only (never unpickled)."""
    return load_classifier_file(Path(path), trusted_types(cfg), TRAIN_FIX)


def fit_classifier(cfg: TrainFlowConfig, stores: list[str], out: Path) -> dict[str, Any]:
    """Fit on the features of all training passes and save the classifier with skops (loading it cannot run code)."""
    X, y = fstore.concat_stores([Path(s) for s in stores])
    keep = y >= 0
    X, y = X[keep], y[keep]
    if len(np.unique(y)) < 2:
        raise ValueError("training features hold fewer than 2 classes; check class_to_skip_training and the dataset")
    est = make_classifier(cfg)
    est.fit(X, y)
    try:
        data = skops_bytes(est)
    except Exception as exc:
        raise ConfigError(
            f"model.classifier {cfg.model.classifier}: skops cannot store the fitted classifier "
            f"({type(exc).__name__}: {str(exc)[:200]}); choose a scikit-learn compatible classifier"
        ) from None
    refused = sorted(set(untrusted_types(data=data)) - trusted_types(cfg))
    if refused:
        raise ConfigError(
            f"model.classifier {cfg.model.classifier}: the fitted classifier holds types that skops "
            f"does not trust by default: {refused}. {TRAIN_FIX}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_skops(est, out, data)
    logger.info("fitted %s on %d feature rows", type(est).__name__, len(y))
    return {"rows": int(len(y)), "classes": sorted(int(c) for c in np.unique(y))}
