"""Grid patches of the train split's images as training rows (``trainer.grid_patches``).

Inference and the val/test splits see fixed grid patches labelled by ``area_threshold`` /
``area_defect_threshold``; the random passes see crops centred in a region. These rows close that gap:
every image the training list refers to is cut on the dataset's grid (``info.json``'s :class:`GridSpec`)
and each patch is labelled by the rule the dataset stage uses for val/test
(``tasks/dataset/labelling.label_patches``); ``#DISCARD#`` patches (annotated pixels, no class) and
patches of skipped classes are left out.

Where things come from: the images from the training list's h5 files (``img_path``, resolved as the random
passes resolve them); each image's mask from ``info.json: train_files`` (``mask_path``), else its h5 files'
``mask_path``, else ``original/masks/<stem>.png``. An image listed without a mask is defect-free (as its
training lines say). The thresholds are ``trainer.area_threshold``/``area_defect_threshold`` when set, else
the dataset's (``patchflow.json``), else Quadra's defaults 0.45 / 0.2.

Plain functions (no Prefect, no torch); ``tasks/features/plans.py`` turns the rows into a store plan.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage import layout
from storage.geometry import GridSpec, PatchGrid
from storage.h5files import read_region
from storage.layout import DatasetFormatError
from tasks.dataset.labelling import label_components, label_patches
from tasks.features.listing import TrainEntry, read_train_list
from tasks.features.params import class_map
from tasks.features.sampler import PassSamples
from tasks.imageio import Decoding, InputDataError, dataset_decoding, decode_mask, file_image_size, read_bytes

if TYPE_CHECKING:
    from tasks.model.config import TrainFlowConfig

#: Quadra's ``area_threshold`` / ``area_defect_threshold`` defaults (datasets that do not record theirs)
DEFAULT_THRESHOLDS = (0.45, 0.2)
OFF = "or set trainer.grid_patches: false to train on the random passes only"


@dataclass(frozen=True)
class GridImage:
    """One train image: absolute image path, its stem (patch names) and its index mask (None: defect-free)."""

    image: str
    stem: str
    mask: str | None


def grid_thresholds(cfg: TrainFlowConfig) -> tuple[float, float]:
    """``(area_threshold, area_defect_threshold)``: the config's, else the dataset's sidecar's, else Quadra's."""
    side = layout.read_sidecar(Path(cfg.datamodule.data_path)) or {}
    t = cfg.trainer
    at = t.area_threshold if t.area_threshold is not None else side.get("area_threshold", DEFAULT_THRESHOLDS[0])
    adt = t.area_defect_threshold
    adt = adt if adt is not None else side.get("area_defect_threshold", DEFAULT_THRESHOLDS[1])
    return float(at), float(adt)


def mask_classes(cfg: TrainFlowConfig) -> dict[str, int]:
    """Class name -> mask value as the dataset was labelled: its sidecar's map, else the config's class map."""
    side = layout.read_sidecar(Path(cfg.datamodule.data_path)) or {}
    return dict(side["class_to_idx"]) if side.get("class_to_idx") else class_map(cfg)


def _info_masks(data_path: Path, info: dict[str, Any]) -> dict[str, str | None]:
    """``info.json: train_files`` as image -> stored mask path, keyed by the stored path, the resolved path and the
    file name (Quadra stores the caller's paths, which may not resolve from here)."""
    out: dict[str, str | None] = {}
    for entry in info.get("train_files") or []:
        if not isinstance(entry, dict) or not entry.get("image_path"):
            continue
        stored, mask = str(entry["image_path"]), entry.get("mask_path")
        for key in (stored, str(_resolved(stored, data_path)), Path(stored).name):
            out.setdefault(key, mask)
    return out


def _find_mask(data_path: Path, image: str, named: list[str]) -> str:
    """The first existing file among the masks ``named`` for ``image`` and ``original/masks/<stem>.png``."""
    candidates = [*(str(_resolved(m, data_path)) for m in named), str(_saved_mask(data_path, image))]
    looked = list(dict.fromkeys(candidates))
    for path in looked:
        if os.path.isfile(path):
            return str(Path(path).resolve())
    raise DatasetFormatError(
        f"grid patches: the mask of train image {image} is not found (looked at {', '.join(looked)}); restore it, {OFF}"
    )


def _resolved(stored: str, data_path: Path) -> Path:
    """A path stored in info.json or an h5 file, absolute (relative ones join the dataset)."""
    return (Path(stored) if Path(stored).is_absolute() else data_path / stored).resolve()


def _saved_mask(data_path: Path, image: str) -> Path:
    return data_path / "original" / "masks" / f"{Path(image).stem}.png"


def grid_images(data_path: Path, entries: Sequence[TrainEntry], info: dict[str, Any]) -> list[GridImage]:
    """The images the training list refers to (first-appearance order), each with its mask; a named mask that
    cannot be found is one clear error."""
    data_path = Path(data_path)
    stored: dict[str, tuple[str, list[str]]] = {}  # image -> (img_path as stored, h5 mask paths)
    for name in dict.fromkeys(e.h5_name for e in entries):
        h5 = data_path / "train" / name
        region = read_region(h5)
        image = str(_resolved(region.img_path, data_path))
        if image not in stored:
            if not os.path.isfile(image):
                raise DatasetFormatError(
                    f"image {image} referenced by {h5} not found; restore the image or regenerate the dataset"
                )
            stored[image] = (region.img_path, [])
        if region.mask_path:
            stored[image][1].append(region.mask_path)
    listed = _info_masks(data_path, info)
    out = []
    for image, (as_stored, h5_masks) in stored.items():
        key = next((k for k in (as_stored, image, Path(as_stored).name) if k in listed), None)
        info_mask = listed[key] if key is not None else None
        named = ([info_mask] if info_mask else []) + h5_masks
        annotated = bool(named) or (key is None and _saved_mask(data_path, image).is_file())
        out.append(GridImage(image, Path(image).stem, _find_mask(data_path, image, named) if annotated else None))
    return out


def label_image(
    img: GridImage,
    spec: GridSpec,
    classes: dict[str, int],
    thresholds: tuple[float, float],
    decoding: Decoding | None = None,
) -> tuple[PatchGrid, list[tuple[str, bool]]]:
    """The grid of one image and ``(class name, discard)`` for each of its patches, by the dataset stage's val/test
    rule (``classes``: class name -> mask value)."""
    h, w = file_image_size(img.image, decoding)
    grid = spec.grid(h, w)
    background = next(k for k, v in classes.items() if v == 0)
    if img.mask is None:
        return grid, [(background, False)] * grid.num_patches
    mask, _ = decode_mask(read_bytes(img.mask), img.mask, None, decoding)
    if mask.shape != (h, w):
        raise InputDataError(
            f"{img.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but train image {img.image} is {w}x{h}; "
            f"masks must match their image ({OFF})"
        )
    if not mask.any():
        return grid, [(background, False)] * grid.num_patches
    return grid, label_patches(label_components(mask), grid, classes, *thresholds)


def grid_samples(cfg: TrainFlowConfig) -> tuple[PassSamples, list[str]]:
    """The grid rows of the images the training list refers to (:func:`grid_rows`)."""
    dm = cfg.datamodule
    data_path = Path(dm.data_path)
    info = layout.read_info(data_path)
    skip = dm.class_to_skip_training
    entries = read_train_list(data_path, dm.train_filename, dm.include_filter, dm.exclude_filter, skip)
    images = grid_images(data_path, entries, info)
    rule = GridRule(GridSpec.from_info(info), class_map(cfg), mask_classes(cfg), grid_thresholds(cfg), skip or ())
    return grid_rows(images, rule, dataset_decoding(data_path))


@dataclass(frozen=True)
class GridRule:
    """How grid rows are cut and labelled: the grid, the training class map, the mask values of the classes, the
    thresholds and the classes left out of training."""

    spec: GridSpec
    classes: dict[str, int]
    mask_classes: dict[str, int]
    thresholds: tuple[float, float]
    skip: Sequence[str] = ()


def grid_rows(
    images: Sequence[GridImage], rule: GridRule, decoding: Decoding | None = None
) -> tuple[PassSamples, list[str]]:
    """The grid rows of ``images`` (each image's patches in patch-index order, ``#DISCARD#`` and skipped ones left
    out) and their sample ids (``<stem>_<index>.png``, the names the val/test patches have)."""
    paths, labels, boxes, sizes, ids = [], [], [], [], []
    for img in images:
        grid, patch_labels = label_image(img, rule.spec, rule.mask_classes, rule.thresholds, decoding)
        for idx, (box, (name, discard)) in enumerate(zip(grid.boxes().tolist(), patch_labels)):
            if discard or name in rule.skip:
                continue
            if name not in rule.classes:
                raise DatasetFormatError(
                    f"grid patches of {img.image}: class {name!r} is not in class_to_idx {sorted(rule.classes)}; "
                    f"add it or list it in datamodule.class_to_skip_training ({OFF})"
                )
            paths.append(img.image)
            labels.append(rule.classes[name])
            boxes.append(box)
            sizes.append((grid.height, grid.width))
            ids.append(layout.patch_name(img.stem, idx, False))
    box = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    samples = PassSamples(
        entry_index=np.arange(len(ids), dtype=np.int64),
        image_path=np.asarray(paths, dtype=str),
        label=np.asarray(labels, dtype=np.int16),
        box=box,
        center=(box[:, :2] + box[:, 2:]) // 2,
        image_size=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
    )
    return samples, ids
