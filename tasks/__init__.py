"""patchflow stages: plain functions (the logic) and their Prefect task entry points."""

import storage.settings  # noqa: F401  (project Prefect defaults, before prefect is imported)
from tasks.dataset.association import get_image_mask_association
from tasks.dataset.generate import generate_patch_dataset

__all__ = ["generate_patch_dataset", "get_image_mask_association"]
