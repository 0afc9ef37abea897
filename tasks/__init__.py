"""patchflow stages: plain functions (the logic) and their Prefect task entry points.

``Predictor`` (in-process prediction with a bundle, :mod:`tasks.predict.predictor`) is imported on first use,
so ``import tasks`` stays cheap (no torch, no Prefect).
"""

from typing import Any

import storage.settings  # noqa: F401  (project Prefect defaults, before prefect is imported)
from tasks.dataset.association import get_image_mask_association
from tasks.dataset.generate import generate_patch_dataset

__all__ = ["Predictor", "generate_patch_dataset", "get_image_mask_association"]


def __getattr__(name: str) -> Any:
    """``tasks.Predictor`` loaded lazily."""
    if name == "Predictor":
        from tasks.predict.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
