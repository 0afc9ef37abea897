"""Dataset stage: its configuration, its content fingerprint and its Prefect task entry points."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, StrictInt, field_validator, model_validator

from storage import layout
from storage.fingerprint import CODE_VERSION, combine, files_digest, params_digest
from storage.manifest import matches_manifest
from storage.paths import user_path
from tasks.dataset.association import get_image_mask_association
from tasks.locks import stage_lock
from tasks.config import ConfigError, StrictModel, import_object
from tasks.dataset.generate import assign_splits, generate_patch_dataset, plan_patch_dataset, process_shard, scan_shard
from tasks.imageio import parse_sixteen_bit, sixteen_bit_json
from tasks.safe_yaml import clip
from tasks.dataset.output import output_folder_path

logger = logging.getLogger("patchflow.dataset")


class DataSection(StrictModel):
    """Where the raw images and masks are, and their classes."""

    images: str = Field(description="Folder of images (searched recursively)")
    masks: str | None = Field(None, description="Folder of index masks; None: masks live among the images")
    mask_extension: str = Field("", description="Mask file = <image stem><mask_extension>.<any image ext>")
    warning_on_missing_mask: bool = True
    class_to_idx: dict[str, StrictInt] | None = Field(None, description="Class name -> mask value; 0 = background")
    class_to_idx_file: str | None = Field(None, description="JSON file with class_to_idx (used when class_to_idx is not set)")

    @model_validator(mode="after")
    def _one_class_map(self) -> "DataSection":
        if self.class_to_idx is None and self.class_to_idx_file is None:
            raise ValueError("set data.class_to_idx or data.class_to_idx_file")
        return self

    def resolved_class_to_idx(self) -> dict[str, int]:
        """class_to_idx, read from the JSON file if needed."""
        if self.class_to_idx is not None:
            return dict(self.class_to_idx)
        path = user_path(str(self.class_to_idx_file))
        try:
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, a key given twice
            raise ConfigError(f"data.class_to_idx_file {path}: cannot read a JSON mapping ({clip(exc, 200)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"data.class_to_idx_file {path} must map class names to integer mask values, "
                              f"not hold a {type(data).__name__}")
        for name, value in data.items():
            if type(value) is not int:  # noqa: E721 - true/false and 1.0 are not mask values
                raise ConfigError(f"data.class_to_idx_file {path} must map class names to integer mask values: "
                                  f"class {clip(repr(name))} maps to {clip(json.dumps(value))} "
                                  f"({type(value).__name__}); write a whole number such as 1")
        return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is an error (json would silently keep the second)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {clip(repr(key))} is given twice")
        out[key] = value
    return out


class GenerationSection(StrictModel):
    """Parameters of ``generate_patch_dataset`` (Quadra's names and defaults)."""

    output_folder: str = Field(
        "extraction_data",
        description="Patch dataset folder (replaced as a whole on rerun; ~ expanded, a symlink is followed to its target)",
    )
    val_size: float = Field(0.3, ge=0, le=1, description="Share of images in val")
    test_size: float = Field(0.0, ge=0, le=1, description="Share of images in test")
    seed: StrictInt = 42
    patch_number: tuple[StrictInt, StrictInt] | None = Field(None, description="[n_vertical, n_horizontal] patches per image")
    patch_size: tuple[StrictInt, StrictInt] | None = Field(None, description="[height, width] of patches in pixels")
    overlap: float = Field(0.0, ge=0, lt=1)
    save_original_images_and_masks: bool = True
    area_threshold: float = Field(0.45, ge=0, le=1)
    area_defect_threshold: float = Field(0.2, ge=0, le=1)
    mask_extension: str = Field("_mask", description="Suffix of saved patch masks (save_mask)")
    mask_output_folder: str | None = None
    save_mask: bool = False
    clear_output_folder: bool = False
    mask_preprocessing: str | None = Field(None, description="Import path 'module:function' of a mask preprocessing function")
    train_filename: str = "dataset.txt"
    repeat_good_images: StrictInt = Field(1, ge=1)
    balance_defects: bool = True
    annotated_good: list[str] | None = None
    num_workers: StrictInt = Field(1, ge=1)
    missing_mask: Literal["test", "good"] = Field("test", description="Images without a mask: to test/None, or treated as defect-free")
    shard_images: StrictInt = Field(256, ge=1, description="Images per shard: the unit of parallel work (runner.kind=dask) and of resume")
    max_image_pixels: StrictInt | None = Field(
        None, ge=1, description="Images larger than this (pixels, read from the header) are refused before decoding; "
        "None: $PATCHFLOW_MAX_IMAGE_PIXELS, else 200000000 (docs/bad-inputs.md, section M)")
    sixteen_bit: str | StrictInt | tuple[int, int] = Field(
        "auto", description="16-bit images to 8 bits: 'auto' (per image, the smallest of 10/12/14/16 bits holding its "
        "largest value), the bits the camera uses (8..16) or a [low, high] window mapped to 0..255")

    @field_validator("sixteen_bit", mode="before")
    @classmethod
    def _sixteen_bit(cls, value: Any) -> Any:
        return sixteen_bit_json(parse_sixteen_bit(value, "dataset.sixteen_bit"))

    @model_validator(mode="after")
    def _one_geometry(self) -> "GenerationSection":
        if (self.patch_number is None) == (self.patch_size is None):
            raise ValueError("set exactly one of dataset.patch_number or dataset.patch_size")
        if self.val_size + self.test_size > 1:
            raise ValueError("dataset.val_size + dataset.test_size must be <= 1")
        return self


def dataset_fingerprint(association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection) -> str:
    """Content key of a dataset: image and mask bytes, their names, class map and every parameter that changes output."""
    params = gen.model_dump(
        mode="json", exclude={"num_workers", "clear_output_folder", "output_folder", "shard_images", "max_image_pixels"}
    )
    names = [(a["base_name"], a["path"] is not None, a["mask"] is not None) for a in association]
    contents = files_digest([a["path"] for a in association] + [a["mask"] for a in association])
    return combine(CODE_VERSION, params_digest({"params": params, "classes": class_to_idx, "names": names}), contents)


@task(name="associate-images-masks", cache_policy=NO_CACHE)
def associate_task(data: DataSection) -> list[dict[str, Any]]:
    """List images with their masks (always re-listed: new images must be seen)."""
    return get_image_mask_association(data.images, data.masks, data.mask_extension, data.warning_on_missing_mask)


@task(name="fingerprint-dataset-inputs", cache_policy=NO_CACHE)
def fingerprint_task(association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection) -> str:
    """Content key of the dataset inputs."""
    return dataset_fingerprint(association, class_to_idx, gen)


@task(name="generate-patch-dataset", persist_result=True)
def generate_task(
    association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection, key: str, force: bool = False
) -> str:
    """Build the patch dataset; returns its folder (cached on ``key``; reused if a concurrent run built it)."""
    if force or not dataset_is_current(gen.output_folder, key):
        generate_patch_dataset([dict(a) for a in association], class_to_idx, **_generation_args(gen, key))
    return str(output_folder_path(gen.output_folder))


def _generation_args(gen: GenerationSection, key: str) -> dict[str, Any]:
    """Keyword arguments of ``generate_patch_dataset`` for this section (mask_preprocessing imported)."""
    pre = import_object(gen.mask_preprocessing) if gen.mask_preprocessing else None
    return {**gen.model_dump(exclude={"mask_preprocessing"}), "mask_preprocessing": pre, "fingerprint": key}


def dataset_is_current(output_folder: str, key: str) -> bool:
    """The folder holds a complete dataset built from exactly these inputs, unchanged since (manifest)."""
    out = output_folder_path(output_folder)
    return layout.is_complete(out, key) and matches_manifest(out)


@task(name="plan-patch-dataset", cache_policy=NO_CACHE)
def plan_dataset_task(association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection, key: str) -> str:
    """Validate inputs and prepare (or resume) the build folder for sharded generation; returns it."""
    return str(plan_patch_dataset([dict(a) for a in association], class_to_idx, **_generation_args(gen, key)))


@task(name="scan-images", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def scan_shard_task(tmp: str, shard: int) -> list[tuple]:
    """Sizes and mask values of one shard of images (validated)."""
    return scan_shard(tmp, shard)


@task(name="assign-splits", cache_policy=NO_CACHE)
def assign_splits_task(tmp: str, scans: list[tuple]) -> int:
    """Seeded split of every image; returns the number of process shards."""
    return assign_splits(tmp, scans)


@task(name="write-patches", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def process_shard_task(tmp: str, shard: int, output_folder: str, key: str, root: str) -> int:
    """Write one shard's originals, h5 files and patches (skipped when done, or when a concurrent run of the same
    inputs already published the dataset); retried alone on failure."""
    with stage_lock(Path(root), f"{key}:dataset-shard:{shard}"):
        if dataset_is_current(output_folder, key):
            return 0
        return process_shard(tmp, shard)
