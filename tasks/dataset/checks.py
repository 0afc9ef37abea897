"""Every check of a patch dataset build, before anything is written or deleted.

:func:`check_build` checks the parameters (:func:`check_params`: a bad one is a ``tasks.config.ConfigError``,
a ValueError that the CLI prints as one line with exit code 2), the images (names and stems:
:class:`InputDataError`) and the output folder (it may replace it, and it holds none of the inputs:
``tasks/dataset/output.py``).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from storage import layout
from storage.geometry import validate_geometry_params
from tasks.dataset.images import Job
from tasks.dataset.output import check_name, check_output_names, output_folder_path, refuse_inputs_in, resolve_inputs
from tasks.dataset.params import DatasetParams, callable_path, param_error
from tasks.imageio import InputDataError, parse_sixteen_bit
from tasks.imageio import max_image_pixels as pixel_limit

T = TypeVar("T")


class CheckedBuild(NamedTuple):
    """A build that passed every check: normalised parameters, images, output folder and resolved inputs."""

    params: DatasetParams
    jobs: list[Job]
    out: Path
    inputs: list[tuple[str, str]]


def check_build(data_dictionary: Sequence[dict[str, Any]], params: DatasetParams, from_disk: bool) -> CheckedBuild:
    """Check parameters, images and the output folder (none of the inputs may lie inside it). ``from_disk``: the
    shards read the plan from disk, so ``mask_preprocessing`` must be importable."""
    if not data_dictionary:
        raise param_error(
            "data_dictionary is empty: no images to turn into a dataset (check get_image_mask_association's folder)"
        )
    p = check_params(params, from_disk)
    jobs = image_jobs(data_dictionary)
    check_output_names(p.train_filename, p.mask_extension, p.mask_output_folder)
    out = output_folder_path(p.output_folder)
    layout.check_output_folder(out)
    inputs = resolve_inputs([j.path for j in jobs] + [j.mask for j in jobs if j.mask is not None])
    refuse_inputs_in(out, inputs)
    return CheckedBuild(p, jobs, out, inputs)


def _is_int(value: Any) -> bool:
    """A whole number given as one: an int (numpy's too), not a bool and not a float like 1.0."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_config_error(check: Callable[[], T]) -> T:
    """``check()``, its plain ValueError (a validator shared with other stages) raised as a ConfigError."""
    try:
        return check()
    except ValueError as exc:
        if type(exc) is not ValueError:
            raise
        raise param_error(str(exc)) from None


def check_params(p: DatasetParams, from_disk: bool) -> DatasetParams:
    """``p`` checked (a ConfigError naming the parameter) and normalised: tuples, plain ints and floats, the
    pixel limit and the 16-bit rule resolved."""
    _as_config_error(lambda: validate_geometry_params(p.patch_number, p.patch_size, p.overlap))
    _check_classes(p.class_to_idx, p.annotated_good)
    if p.val_size < 0 or p.test_size < 0 or p.val_size + p.test_size > 1:
        raise param_error(f"val_size and test_size must be >= 0 with a sum <= 1 (got {p.val_size}, {p.test_size})")
    if p.save_mask and not p.mask_extension and p.mask_output_folder is None:
        raise param_error(
            "save_mask needs a mask_extension or a mask_output_folder, or patch masks would overwrite patches"
        )
    for name in ("num_workers", "repeat_good_images", "shard_images"):
        value = getattr(p, name)
        if not _is_int(value) or value < 1:
            raise param_error(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if p.missing_mask not in ("test", "good"):
        raise param_error(f"missing_mask must be 'test' or 'good', got {p.missing_mask!r}")
    if not _is_int(p.seed):
        raise param_error(f"seed must be an integer, got {p.seed!r} ({type(p.seed).__name__})")
    _check_preprocessing(p.mask_preprocessing, p.num_workers, from_disk)
    return replace(
        p,
        class_to_idx={k: int(v) for k, v in p.class_to_idx.items()},
        val_size=float(p.val_size),
        test_size=float(p.test_size),
        seed=int(p.seed),
        patch_number=_pair(p.patch_number),
        patch_size=_pair(p.patch_size),
        overlap=float(p.overlap),
        area_threshold=float(p.area_threshold),
        area_defect_threshold=float(p.area_defect_threshold),
        repeat_good_images=int(p.repeat_good_images),
        annotated_good=tuple(p.annotated_good or ()),
        num_workers=int(p.num_workers),
        shard_images=int(p.shard_images),
        max_image_pixels=_as_config_error(lambda: pixel_limit(p.max_image_pixels)),
        sixteen_bit=_as_config_error(lambda: parse_sixteen_bit(p.sixteen_bit, "sixteen_bit")),
    )


def _pair(value: Sequence[int] | None) -> tuple[int, int] | None:
    """A checked ``[vertical, horizontal]`` pair as a tuple of plain ints."""
    return (int(value[0]), int(value[1])) if value is not None else None


def _check_classes(class_to_idx: dict[str, int], annotated_good: Sequence[str] | None) -> None:
    """Class names name folders and ``dataset.txt`` fields; values are distinct mask values, 0 the background."""
    if not class_to_idx or 0 not in class_to_idx.values():
        raise param_error(f"class_to_idx must map a background class to 0, got {class_to_idx}")
    for name, v in class_to_idx.items():
        if not _is_int(v) or not 0 <= v <= 255:
            raise param_error(
                f"class_to_idx[{str(name)[:100]!r}] = {v!r} ({type(v).__name__}): class_to_idx values "
                "must be distinct integers in 0..255 (not true/false or 1.0)"
            )
    values = list(class_to_idx.values())
    if len(set(values)) != len(values):
        raise param_error(f"class_to_idx values must be distinct integers in 0..255, got {str(class_to_idx)[:300]}")
    bad_names = [
        k
        for k in class_to_idx
        if not isinstance(k, str)
        or not k
        or k.startswith(".")
        or any(c in k for c in ",/\\\n\r")
        or k == layout.NONE_CLASS
    ]
    if bad_names:
        raise InputDataError(
            f"class names {bad_names} cannot be used: they name folders and dataset.txt fields "
            "(no commas or slashes, no line breaks, no leading dot, not 'None', not empty)"
        )
    for name in annotated_good or []:
        if name not in class_to_idx or class_to_idx[name] == 0:
            raise param_error(f"annotated_good entry {name!r} must be a non-background class name of class_to_idx")


def _check_preprocessing(fn: Callable[..., Any] | None, num_workers: int, from_disk: bool) -> None:
    """A lambda or local function works in-process only (it is handed over in memory, never stored)."""
    if fn is None:
        return
    if from_disk and callable_path(fn) is None:
        raise param_error(
            "mask_preprocessing must be a module-level function (importable as module:name) when shards run from the "
            "saved plan (plan_patch_dataset, a flow); lambdas and local functions only work in generate_patch_dataset"
        )
    if num_workers > 1:
        try:
            pickle.dumps(fn)  # sent in memory to the worker processes (never stored in a file)
        except Exception:
            raise param_error(
                "mask_preprocessing must be a module-level function (picklable) when num_workers > 1 or in a flow; "
                "lambdas and local functions only work with num_workers=1"
            ) from None


def image_jobs(data_dictionary: Sequence[dict[str, Any]]) -> list[Job]:
    """One job per image of ``data_dictionary``; names become file names, and stems must be unique."""
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(data_dictionary):
        try:
            path, mask = str(item["path"]), item.get("mask")
        except (KeyError, TypeError, AttributeError):
            raise param_error(f"data_dictionary[{i}] must be a dict with 'path' (and 'mask'), got {item!r}") from None
        base = item.get("base_name") or os.path.basename(path)
        check_name(str(base), "image name", path)
        stem = os.path.splitext(base)[0]
        check_name(stem, "image name", path)
        if stem in seen:
            raise InputDataError(
                f"duplicate image stem {stem!r}: {seen[stem]} and {path}; rename one (patch names are <stem>_<index>)"
            )
        seen[stem] = path
        jobs.append(Job(i, stem, base, path, str(mask) if mask is not None else None))
    return jobs
