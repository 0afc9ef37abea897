"""Configuration of the dataset stage: where the images and masks are (:class:`DataSection`), how the patch
dataset is built (:class:`GenerationSection`, Quadra's parameters, turned into the build's
:class:`~tasks.dataset.params.DatasetParams`) and the dataset flow's whole file (:class:`DatasetFlowConfig`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, StrictInt, field_validator, model_validator

from storage.paths import user_path
from tasks.config import ConfigError, StrictModel, import_object
from tasks.dataset.params import DatasetParams
from tasks.imageio import parse_sixteen_bit, sixteen_bit_json
from tasks.runner import RunnerSection
from tasks.safe_yaml import clip


class DataSection(StrictModel):
    """Where the raw images and masks are, and their classes."""

    images: str = Field(description="Folder of images (searched recursively)")
    masks: str | None = Field(None, description="Folder of index masks; None: masks live among the images")
    mask_extension: str = Field("", description="Mask file = <image stem><mask_extension>.<any image ext>")
    warning_on_missing_mask: bool = True
    class_to_idx: dict[str, StrictInt] | None = Field(None, description="Class name -> mask value; 0 = background")
    class_to_idx_file: str | None = Field(
        None, description="JSON file with class_to_idx (used when class_to_idx is not set)"
    )

    @model_validator(mode="after")
    def _one_class_map(self) -> DataSection:
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
            raise ConfigError(
                f"data.class_to_idx_file {path} must map class names to integer mask values, "
                f"not hold a {type(data).__name__}"
            )
        for name, value in data.items():
            if type(value) is not int:  # true/false and 1.0 are not mask values
                raise ConfigError(
                    f"data.class_to_idx_file {path} must map class names to integer mask values: "
                    f"class {clip(repr(name))} maps to {clip(json.dumps(value))} "
                    f"({type(value).__name__}); write a whole number such as 1"
                )
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
        description="Patch dataset folder (replaced as a whole on rerun; ~ expanded, a symlink is followed to its "
        "target)",
    )
    val_size: float = Field(0.3, ge=0, le=1, description="Share of images in val")
    test_size: float = Field(0.0, ge=0, le=1, description="Share of images in test")
    seed: StrictInt = 42
    patch_number: tuple[StrictInt, StrictInt] | None = Field(
        None, description="[n_vertical, n_horizontal] patches per image"
    )
    patch_size: tuple[StrictInt, StrictInt] | None = Field(None, description="[height, width] of patches in pixels")
    overlap: float = Field(0.0, ge=0, lt=1)
    save_original_images_and_masks: bool = True
    area_threshold: float = Field(0.45, ge=0, le=1)
    area_defect_threshold: float = Field(0.2, ge=0, le=1)
    mask_extension: str = Field("_mask", description="Suffix of saved patch masks (save_mask)")
    mask_output_folder: str | None = None
    save_mask: bool = False
    clear_output_folder: bool = False
    mask_preprocessing: str | None = Field(
        None, description="Import path 'module:function' of a mask preprocessing function"
    )
    train_filename: str = "dataset.txt"
    repeat_good_images: StrictInt = Field(1, ge=1)
    balance_defects: bool = True
    annotated_good: list[str] | None = None
    num_workers: StrictInt = Field(1, ge=1)
    missing_mask: Literal["test", "good"] = Field(
        "test", description="Images without a mask: to test/None, or treated as defect-free"
    )
    shard_images: StrictInt = Field(
        256, ge=1, description="Images per shard: the unit of parallel work (runner.kind=dask) and of resume"
    )
    max_image_pixels: StrictInt | None = Field(
        None,
        ge=1,
        description="Images larger than this (pixels, read from the header) are refused before decoding; "
        "None: $PATCHFLOW_MAX_IMAGE_PIXELS, else 200000000 (docs/bad-inputs.md, section M)",
    )
    sixteen_bit: str | StrictInt | tuple[int, int] = Field(
        "auto",
        description="16-bit images to 8 bits: 'auto' (per image, the smallest of 10/12/14/16 bits holding its "
        "largest value), the bits the camera uses (8..16) or a [low, high] window mapped to 0..255",
    )

    @field_validator("sixteen_bit", mode="before")
    @classmethod
    def _sixteen_bit(cls, value: Any) -> Any:
        return sixteen_bit_json(parse_sixteen_bit(value, "dataset.sixteen_bit"))

    @model_validator(mode="after")
    def _one_geometry(self) -> GenerationSection:
        if (self.patch_number is None) == (self.patch_size is None):
            raise ValueError("set exactly one of dataset.patch_number or dataset.patch_size")
        if self.val_size + self.test_size > 1:
            raise ValueError("dataset.val_size + dataset.test_size must be <= 1")
        return self

    def build_params(self, class_to_idx: dict[str, int], fingerprint: str | None) -> DatasetParams:
        """The build's parameters: this section's, the class map and the inputs' content key (``mask_preprocessing``
        imported)."""
        pre = import_object(self.mask_preprocessing) if self.mask_preprocessing else None
        return DatasetParams(
            class_to_idx=class_to_idx,
            fingerprint=fingerprint,
            mask_preprocessing=pre,
            **self.model_dump(exclude={"mask_preprocessing"}),
        )


class DatasetFlowConfig(StrictModel):
    """Configuration of the dataset flow."""

    data: DataSection
    dataset: GenerationSection
    storage_root: str | None = Field(
        None, description="Results/cache/locks root (default $PATCHFLOW_STORAGE_ROOT or ./.patchflow)"
    )
    force: bool = Field(False, description="Rebuild the dataset even if an identical one exists")
    runner: RunnerSection = Field(
        default_factory=RunnerSection, description="Where image shards run (thread or a Dask cluster)"
    )
