"""Patch dataset generation (Quadra's ``generate_patch_dataset``): same parameters, same layout, fixed bugs.

The public calls bind their arguments once into a :class:`~tasks.dataset.params.DatasetParams`, then
check -> plan -> shards -> publish: every check first (``tasks/dataset/checks.py``), then the build folder
and its plan (here), the per-image work shard by shard (``tasks/dataset/shards.py``, on ``num_workers``
processes or Dask workers, identical output either way) and the final assembly (``tasks/dataset/publish.py``).
The dataset is built in a hidden sibling folder, resumable shard by shard, and renamed into place at the
end, so a failed run never leaves a complete-looking dataset.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from storage import layout
from storage.shards import ShardStateError
from tasks.dataset.checks import CheckedBuild, check_build
from tasks.dataset.images import scan_image
from tasks.dataset.output import refuse_inputs_in
from tasks.dataset.params import DatasetParams
from tasks.dataset.publish import finish_patch_dataset
from tasks.dataset.shards import Workers, assign_splits, process_shards
from tasks.dataset.state import DatasetPlan, load_plan, plan_data, planned_part, read_plan_data, write_plan

logger = logging.getLogger("patchflow.dataset")


def generate_patch_dataset(
    data_dictionary: list[dict[str, Any]],
    class_to_idx: dict[str, int],
    val_size: float = 0.3,
    test_size: float = 0.0,
    seed: int = 42,
    patch_number: tuple[int, ...] | list[int] | None = None,
    patch_size: tuple[int, ...] | list[int] | None = None,
    overlap: float = 0.0,
    output_folder: str = "extraction_data",
    save_original_images_and_masks: bool = True,
    area_threshold: float = 0.45,
    area_defect_threshold: float = 0.2,
    mask_extension: str = "_mask",
    mask_output_folder: str | None = None,
    save_mask: bool = False,
    clear_output_folder: bool = False,
    mask_preprocessing: Callable[[np.ndarray], np.ndarray] | None = None,
    train_filename: str = "dataset.txt",
    repeat_good_images: int = 1,
    balance_defects: bool = True,
    annotated_good: list[str] | None = None,
    num_workers: int = 1,
    *,
    missing_mask: str = "test",
    fingerprint: str | None = None,
    shard_images: int = 256,
    max_image_pixels: int | None = None,
    sixteen_bit: str | int | Sequence[int] = "auto",
) -> dict[str, Any]:
    """Build a Quadra-layout patch dataset in ``output_folder``; returns the ``info.json`` content.

    ``missing_mask``: ``"test"`` (reference behaviour: mask-less images go to test/None) or ``"good"``
    (a missing mask means a defect-free image). ``fingerprint`` (the inputs' content key) is stored in
    the sidecar and names the build folder, so a build killed midway resumes its finished shards.
    ``max_image_pixels``: larger images are refused from their header (None: ``$PATCHFLOW_MAX_IMAGE_PIXELS``,
    else 200 MP). ``sixteen_bit``: how 16-bit images become 8-bit (``"auto"``, the camera's bits 8..16 or a
    ``[low, high]`` window; ``tasks/imageio.py: to_uint8``), recorded in ``patchflow.json``.
    """
    args = dict(locals())  # first statement: exactly the parameters (DatasetParams has the same names)
    return build_patch_dataset(args.pop("data_dictionary"), DatasetParams(**args))


def plan_patch_dataset(data_dictionary: list[dict[str, Any]], class_to_idx: dict[str, int], **params: Any) -> Path:
    """Validate the inputs and prepare the build folder for :func:`generate_patch_dataset` with the same parameters.

    Returns the build folder; a killed build of the same inputs (same ``fingerprint``) is resumed. Its shards
    read the plan from disk, so ``mask_preprocessing`` must be importable (``module:name``).
    """
    bound = inspect.signature(generate_patch_dataset).bind(data_dictionary, class_to_idx, **params)
    bound.apply_defaults()
    args = bound.arguments
    return plan_build(args.pop("data_dictionary"), DatasetParams(**args))


def plan_build(data_dictionary: Sequence[dict[str, Any]], params: DatasetParams) -> Path:
    """:func:`plan_patch_dataset` with its parameters bound: the build folder, ready for its shards."""
    build = check_build(data_dictionary, params, from_disk=True)
    with layout.build_lock(build.out):
        return Path(_prepare(build).tmp)


def build_patch_dataset(data_dictionary: Sequence[dict[str, Any]], params: DatasetParams) -> dict[str, Any]:
    """:func:`generate_patch_dataset` with its parameters bound: check, plan (or resume), run every shard on
    ``num_workers`` processes, publish; returns the ``info.json`` content."""
    build = check_build(data_dictionary, params, from_disk=False)
    with layout.build_lock(build.out):  # one build of a folder at a time (a second one waits, then builds)
        plan = _prepare(build)
        workers = Workers(plan.params, Path(plan.tmp), plan.params.num_workers, len(plan.jobs))
        try:
            if plan.order is None:  # in-process: one pass over all images, shards only matter on Dask
                assign_splits(plan.tmp, workers.map(scan_image, plan.jobs), plan)
            process_shards(plan, range(len(plan.shards(ordered=True))), workers)
            workers.close()
            return finish_patch_dataset(plan.tmp, plan)
        except BaseException as exc:
            workers.close()  # wait for running workers before touching the folder they write into
            if plan.params.fingerprint is None or _bad_input(exc):
                shutil.rmtree(plan.tmp, ignore_errors=True)  # nothing worth resuming: fixed inputs get another key
            raise  # anything else (Ctrl-C, SIGTERM, disk full, a crash) keeps the finished shards for the rerun


def _bad_input(exc: BaseException) -> bool:
    """A known bad-input error: our ValueError subclasses (InputDataError, ConfigError, DatasetFormatError, ...)
    and plain ValueErrors. Not the build state's own complaint about unfinished shards (the rerun resumes them),
    nor interruptions (KeyboardInterrupt, Prefect's TerminationSignal on SIGTERM), OSError, MemoryError or
    unexpected errors."""
    return isinstance(exc, ValueError) and not isinstance(exc, ShardStateError)


def _tag(fingerprint: str) -> str:
    """Build folder suffix of a fingerprint: its first 16 hex digits (a digest of it when it is not hex)."""
    head = fingerprint[:16]
    return head if re.fullmatch(r"[0-9a-f]{16}", head) else hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _partial_dir(out: Path, fingerprint: str | None, inputs: Sequence[tuple[str, str]]) -> Path:
    """Build folder: keyed by the inputs' fingerprint (so a killed run resumes), else fresh. Called holding the
    build lock, so the other build folders of ``out`` are no live run's: they are removed (matched literally)."""
    keep = out.parent / f".{out.name}.partial-{_tag(fingerprint)}" if fingerprint is not None else None
    for other in layout.stale_build_folders(out, keep):
        refuse_inputs_in(
            other,
            inputs,
            key="build folder",
            action="it is a killed build's leftover, and removing it would delete the input",
        )
        shutil.rmtree(other, ignore_errors=True)  # left by a killed run
    if keep is None:
        return layout.temp_sibling(out)
    keep.mkdir(parents=True, exist_ok=True)
    return keep


def _resumed(tmp: Path, plan: DatasetPlan) -> DatasetPlan | None:
    """The saved plan of ``tmp`` when it is this build's (same inputs and output-changing parameters), with this
    call's runtime parameters (workers, pixel limit, ...); None when there is none or it differs in anything."""
    try:
        if planned_part(read_plan_data(tmp)) != planned_part(plan_data(plan)):
            return None
        old = load_plan(tmp, plan.params.mask_preprocessing)  # every field checked
    except layout.DatasetFormatError:
        return None
    logger.info("resuming the build of %s in %s", plan.out, tmp)
    resumed = replace(old, params=plan.params)
    if plan_data(resumed) != plan_data(old):
        write_plan(tmp, resumed)
    return resumed


def _prepare(build: CheckedBuild) -> DatasetPlan:
    """The build's plan in its build folder (call holding the build lock): resumed when its saved plan is exactly
    this one, else new."""
    p, out = build.params, build.out
    layout.check_output_folder(out)  # again: another build may have published while this one waited for the lock
    if out.exists() and any(out.iterdir()) and not p.clear_output_folder:
        logger.warning("%s holds a patch dataset: it is replaced as a whole (stale files are never merged)", out)
    tmp = _partial_dir(out, p.fingerprint, build.inputs)
    plan = DatasetPlan(p, build.jobs, str(out), str(tmp))
    if p.fingerprint is not None:
        resumed = _resumed(tmp, plan)
        if resumed is not None:
            return resumed
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        for sub in ("original/images", "original/masks", "original/labelled_masks", "train"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        for split in ("val", "test"):
            for name in list(p.class_to_idx) + ([layout.NONE_CLASS] if split == "test" else []):
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
        write_plan(tmp, plan)
    except BaseException:
        if p.fingerprint is None:
            shutil.rmtree(tmp, ignore_errors=True)  # a one-off build folder: nothing to resume
        raise
    return plan
