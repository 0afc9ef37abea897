"""Patch dataset generation (Quadra's ``generate_patch_dataset``): same parameters, same layout, fixed bugs.

Validation, the plan, shards of per-image work (``tasks/dataset/images.py``, on ``num_workers``
processes or Dask workers, identical output either way) and the final assembly. The dataset is built
in a temporary sibling folder, resumable shard by shard, and renamed into place at the end, so a
failed run never leaves a complete-looking dataset.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from storage import layout
from storage.fingerprint import CODE_VERSION
from storage.geometry import GRID_POLICY, validate_geometry_params
from storage.manifest import write_manifest
from tasks.dataset.images import Job, Params, Workers, process_image, scan_image, write_bytes
from tasks.dataset.output import check_name, check_output_names, output_folder_path, refuse_inputs_in, resolve_inputs
from tasks.dataset.state import (
    SHARD_DIR, DatasetPlan, callable_path, load_marker, load_plan, planned_part, plan_data, read_plan_data, write_marker,
    write_plan,
)
from tasks.imageio import InputDataError
from tasks.imageio import max_image_pixels as pixel_limit
from tasks.imageio import parse_sixteen_bit, sixteen_bit_json
from tasks.dataset.split import split_images

logger = logging.getLogger("patchflow.dataset")

SPLITS = ("train", "val", "test")


def _is_int(value: Any) -> bool:
    """A whole number given as one: an int (numpy's too), not a bool and not a float like 1.0."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _validate(
    data_dictionary: Sequence[dict[str, Any]],
    class_to_idx: dict[str, int],
    val_size: float,
    test_size: float,
    patch_number: Sequence[int] | None,
    patch_size: Sequence[int] | None,
    overlap: float,
    annotated_good: Sequence[str] | None,
    save_mask: bool,
    mask_extension: str,
    mask_output_folder: str | None,
    num_workers: int,
    repeat_good_images: int,
    missing_mask: str,
) -> list[Job]:
    validate_geometry_params(patch_number, patch_size, overlap)
    if not data_dictionary:
        raise ValueError("data_dictionary is empty: no images to turn into a dataset (check get_image_mask_association's folder)")
    if not class_to_idx or 0 not in class_to_idx.values():
        raise ValueError(f"class_to_idx must map a background class to 0, got {class_to_idx}")
    for name, v in class_to_idx.items():
        if not _is_int(v) or not 0 <= v <= 255:
            raise ValueError(f"class_to_idx[{str(name)[:100]!r}] = {v!r} ({type(v).__name__}): class_to_idx values "
                             "must be distinct integers in 0..255 (not true/false or 1.0)")
    values = list(class_to_idx.values())
    if len(set(values)) != len(values):
        raise ValueError(f"class_to_idx values must be distinct integers in 0..255, got {str(class_to_idx)[:300]}")
    bad_names = [
        k for k in class_to_idx
        if not isinstance(k, str) or not k or k.startswith(".") or any(c in k for c in ",/\\\n\r") or k == layout.NONE_CLASS
    ]
    if bad_names:
        raise InputDataError(
            f"class names {bad_names} cannot be used: they name folders and dataset.txt fields "
            "(no commas or slashes, no line breaks, no leading dot, not 'None', not empty)"
        )
    if val_size < 0 or test_size < 0 or val_size + test_size > 1:
        raise ValueError(f"val_size and test_size must be >= 0 with a sum <= 1 (got {val_size}, {test_size})")
    for name in annotated_good or []:
        if name not in class_to_idx or class_to_idx[name] == 0:
            raise ValueError(f"annotated_good entry {name!r} must be a non-background class name of class_to_idx")
    if save_mask and not mask_extension and mask_output_folder is None:
        raise ValueError("save_mask needs a mask_extension or a mask_output_folder, or patch masks would overwrite patches")
    for name, value in (("num_workers", num_workers), ("repeat_good_images", repeat_good_images)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if missing_mask not in ("test", "good"):
        raise ValueError(f"missing_mask must be 'test' or 'good', got {missing_mask!r}")
    jobs, seen = [], {}
    for i, item in enumerate(data_dictionary):
        try:
            path, mask = str(item["path"]), item.get("mask")
        except (KeyError, TypeError):
            raise ValueError(f"data_dictionary[{i}] must be a dict with 'path' (and 'mask'), got {item!r}") from None
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


def _tag(fingerprint: str) -> str:
    """Build folder suffix of a fingerprint: its first 16 hex digits (a digest of it when it is not hex)."""
    head = fingerprint[:16]
    return head if re.fullmatch(r"[0-9a-f]{16}", head) else hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _partial_dir(out: Path, fingerprint: str | None, inputs: Sequence[tuple[str, str]]) -> Path:
    """Build folder: keyed by the inputs' fingerprint (so a killed run resumes), else fresh. Called holding the
    build lock, so the other build folders of ``out`` are no live run's: they are removed (matched literally)."""
    keep = out.parent / f".{out.name}.partial-{_tag(fingerprint)}" if fingerprint is not None else None
    for other in layout.stale_build_folders(out, keep):
        refuse_inputs_in(other, inputs, key="build folder",
                         action="it is a killed build's leftover, and removing it would delete the input")
        shutil.rmtree(other, ignore_errors=True)  # left by a killed run
    if keep is None:
        return layout.temp_sibling(out)
    keep.mkdir(parents=True, exist_ok=True)
    return keep


def plan_patch_dataset(data_dictionary: list[dict[str, Any]], class_to_idx: dict[str, int], **params: Any) -> Path:
    """Validate the inputs and prepare the build folder for :func:`generate_patch_dataset` with the same parameters.

    Returns the build folder; a killed build of the same inputs (same ``fingerprint``) is resumed. Its shards
    read the plan from disk, so ``mask_preprocessing`` must be importable (``module:name``).
    """
    bound = inspect.signature(generate_patch_dataset).bind(data_dictionary, class_to_idx, **params)
    bound.apply_defaults()
    g, jobs, out, inputs = _checked(bound.arguments, from_disk=True)
    with layout.build_lock(out):
        return _prepare(g, jobs, out, inputs)


def _check_preprocessing(fn: Callable[..., Any] | None, num_workers: int, from_disk: bool) -> None:
    """A lambda or local function works in-process only (it is handed over in memory, never stored)."""
    if fn is None:
        return
    if from_disk and callable_path(fn) is None:
        raise ValueError(
            "mask_preprocessing must be a module-level function (importable as module:name) when shards run from the "
            "saved plan (plan_patch_dataset, a flow); lambdas and local functions only work in generate_patch_dataset"
        )
    if num_workers > 1:
        try:
            pickle.dumps(fn)  # sent in memory to the worker processes (never stored in a file)
        except Exception:  # noqa: BLE001
            raise ValueError(
                "mask_preprocessing must be a module-level function (picklable) when num_workers > 1 or in a flow; "
                "lambdas and local functions only work with num_workers=1"
            ) from None


def _checked(a: dict[str, Any], from_disk: bool) -> tuple[SimpleNamespace, list[Job], Path, list[tuple[str, str]]]:
    """Every check of a build, before anything is written or deleted: parameters, names, the output folder and the
    inputs (none may lie inside the output folder). ``a`` holds every parameter of :func:`generate_patch_dataset`."""
    g = SimpleNamespace(**a)
    jobs = _validate(
        g.data_dictionary, g.class_to_idx, g.val_size, g.test_size, g.patch_number, g.patch_size, g.overlap, g.annotated_good,
        g.save_mask, g.mask_extension, g.mask_output_folder, g.num_workers, g.repeat_good_images, g.missing_mask,
    )
    if not _is_int(g.shard_images) or g.shard_images < 1:
        raise ValueError(f"shard_images must be an integer >= 1, got {g.shard_images!r}")
    if not _is_int(g.seed):
        raise ValueError(f"seed must be an integer, got {g.seed!r} ({type(g.seed).__name__})")
    g.max_image_pixels = pixel_limit(g.max_image_pixels)
    g.sixteen_bit = parse_sixteen_bit(g.sixteen_bit, "sixteen_bit")
    check_output_names(g.train_filename, g.mask_extension, g.mask_output_folder)
    out = output_folder_path(g.output_folder)
    layout.check_output_folder(out)
    inputs = resolve_inputs([j.path for j in jobs] + [j.mask for j in jobs if j.mask is not None])
    refuse_inputs_in(out, inputs)
    _check_preprocessing(g.mask_preprocessing, g.num_workers, from_disk)
    return g, jobs, out, inputs


def _new_plan(g: SimpleNamespace, jobs: list[Job], out: Path, tmp: Path) -> DatasetPlan:
    params = Params(
        root=str(tmp), class_to_idx={k: int(v) for k, v in g.class_to_idx.items()},
        patch_number=tuple(g.patch_number) if g.patch_number is not None else None,
        patch_size=tuple(g.patch_size) if g.patch_size is not None else None, overlap=float(g.overlap),
        save_original=g.save_original_images_and_masks, area_threshold=g.area_threshold,
        area_defect_threshold=g.area_defect_threshold, mask_extension=g.mask_extension,
        mask_output_folder=g.mask_output_folder, save_mask=g.save_mask, mask_preprocessing=g.mask_preprocessing,
        repeat_good_images=g.repeat_good_images, balance_defects=g.balance_defects,
        annotated_good=tuple(g.annotated_good or ()), missing_mask=g.missing_mask,
        max_image_pixels=g.max_image_pixels, sixteen_bit=g.sixteen_bit,
    )
    geometry = {
        "patch_size": list(g.patch_size) if g.patch_size is not None else None,
        "patch_number": list(g.patch_number) if g.patch_number is not None else None,
        "overlap": float(g.overlap),
        "annotated_good": list(g.annotated_good) if g.annotated_good else None,
    }
    return DatasetPlan(params, jobs, str(out), str(tmp), g.fingerprint, g.seed, g.val_size, g.test_size, geometry,
                       g.train_filename, int(g.shard_images))


def _prepare(g: SimpleNamespace, jobs: list[Job], out: Path, inputs: Sequence[tuple[str, str]]) -> Path:
    """The build folder (call holding the build lock): resumed when its saved plan is exactly this one, else new."""
    layout.check_output_folder(out)  # again: another build may have published while this one waited for the lock
    if out.exists() and any(out.iterdir()) and not g.clear_output_folder:
        logger.warning("%s holds a patch dataset: it is replaced as a whole (stale files are never merged)", out)
    tmp = _partial_dir(out, g.fingerprint, inputs)
    plan = _new_plan(g, jobs, out, tmp)
    if g.fingerprint is not None:
        try:  # same inputs and parameters: resume (a plan that differs in anything is never trusted)
            if planned_part(read_plan_data(tmp)) == planned_part(plan_data(plan)):
                old = load_plan(tmp, g.mask_preprocessing)  # every field checked
                logger.info("resuming the build of %s in %s", out, tmp)
                if old.params.max_image_pixels != g.max_image_pixels:  # not in the fingerprint: a raised limit applies
                    old.params = replace(old.params, max_image_pixels=g.max_image_pixels)
                    write_plan(tmp, old)
                return tmp
        except layout.DatasetFormatError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        for sub in ("original/images", "original/masks", "original/labelled_masks", "train", SHARD_DIR):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        for split in ("val", "test"):
            for name in list(g.class_to_idx) + ([layout.NONE_CLASS] if split == "test" else []):
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
        write_plan(tmp, plan)
    except BaseException:
        if g.fingerprint is None:
            shutil.rmtree(tmp, ignore_errors=True)  # a one-off build folder: nothing to resume
        raise
    return tmp


def shard_counts(tmp: str | Path) -> tuple[int, int | None]:
    """``(scan shards, process shards or None while splits are not assigned)`` of a build folder."""
    plan = load_plan(tmp)
    return len(plan.shards(ordered=False)), (len(plan.shards(ordered=True)) if plan.order is not None else None)


def scan_shard(tmp: str | Path, shard: int, workers: "Workers | None" = None, plan: DatasetPlan | None = None) -> list[tuple]:
    """Phase 1 of shard ``shard``: sizes and mask values of its images (validated). ``plan``: already loaded."""
    plan = plan or load_plan(tmp)
    jobs = [plan.jobs[i] for i in plan.shards(ordered=False)[shard]]
    own = workers is None
    workers = workers or Workers(plan.params, 1, len(jobs))
    try:
        return workers.map(scan_image, jobs)
    finally:
        if own:
            workers.close()


def assign_splits(tmp: str | Path, scans: Sequence[tuple], plan: DatasetPlan | None = None) -> int:
    """Record every image's size, mask values and split (seeded split) in the saved plan (and in ``plan``, when
    given already loaded); returns the number of process shards."""
    plan = plan or load_plan(tmp)
    if len(scans) != len(plan.jobs):
        raise ValueError(f"{len(scans)} scan results for {len(plan.jobs)} images")
    for job, (size, values, plain) in zip(plan.jobs, scans):
        job.size, job.plain_mask = tuple(size), plain
        job.values = tuple(values) if values is not None else None
    label_sets = [set(v) if v is not None else None for _, v, _ in scans]
    n_classes = max(plan.params.class_to_idx.values()) + 1
    assignment, order = split_images(label_sets, plan.val_size, plan.test_size, plan.seed, n_classes)
    for job, split in zip(plan.jobs, assignment):
        job.split = split
        if job.values is None and split != "train":  # mask-less images land in <split>/None
            (Path(tmp) / split / layout.NONE_CLASS).mkdir(exist_ok=True)
    plan.order = [int(i) for i in order]
    write_plan(Path(tmp), plan)
    return len(plan.shards(ordered=True))


def process_shard(tmp: str | Path, shard: int, workers: "Workers | None" = None, plan: DatasetPlan | None = None) -> int:
    """Phase 2 of shard ``shard``: write its images' files (skipped when already done); returns its image count."""
    return process_shards(tmp, [shard], workers, plan)


def process_shards(tmp: str | Path, shards: Sequence[int], workers: "Workers | None" = None,
                   plan: DatasetPlan | None = None) -> int:
    """Phase 2 of several shards in one pass over ``workers`` (no barrier between shards); each finished
    shard is recorded on its own, so a killed run resumes shard by shard. Returns the image count."""
    tmp = Path(tmp)
    plan = plan or load_plan(tmp)
    if plan.order is None:
        raise ValueError(f"{tmp}: splits are not assigned yet; run assign_splits first")
    all_idx = plan.shards(ordered=True)
    todo = [s for s in shards if load_marker(tmp, s, len(all_idx[s])) is None]
    jobs = [plan.jobs[i] for s in todo for i in all_idx[s]]
    own = workers is None
    workers = workers or Workers(plan.params, 1, len(jobs))
    try:
        results = workers.imap(process_image, jobs)  # each shard is recorded as soon as its images are done
        for s in todo:
            write_marker(tmp, s, [next(results) for _ in all_idx[s]])
    finally:
        if own:
            workers.close()
    return sum(len(all_idx[s]) for s in shards)


def finish_patch_dataset(tmp: str | Path, plan: DatasetPlan | None = None) -> dict[str, Any]:
    """Assemble dataset.txt, info.json and the sidecar from finished shards, then publish the dataset (under the
    output folder's build lock). ``plan``: already loaded."""
    tmp = Path(tmp)
    plan = plan or load_plan(tmp)
    shards = plan.shards(ordered=True)
    per_shard = [load_marker(tmp, i, len(idx)) for i, idx in enumerate(shards)]
    missing = [i for i, r in enumerate(per_shard) if r is None]
    if missing:
        raise RuntimeError(f"{tmp}: shards {missing} are not finished; rerun the dataset stage to resume")
    info: dict[str, Any] = {**plan.info_geometry, "train_files": [], "val_files": [], "test_files": []}
    lines: list[str] = []
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for idx, results in zip(shards, per_shard):
        for i, res in zip(idx, results):
            job = plan.jobs[i]
            info[f"{job.split}_files"].append({"image_path": res.image_entry, "mask_path": res.mask_entry})
            lines.extend(res.lines)
            for k, v in res.counts.items():
                counts[job.split][k] = counts[job.split].get(k, 0) + v
    p = plan.params
    write_bytes(tmp / "train" / plan.train_filename, "".join(f"{line}\n" for line in lines))
    layout.write_info(tmp, info)
    layout.write_json(
        tmp / layout.SIDECAR_FILE,
        {
            "format": "patchflow-patch-dataset",
            "version": CODE_VERSION,
            "fingerprint": plan.fingerprint,
            "grid_policy": GRID_POLICY,
            "class_to_idx": dict(p.class_to_idx),
            "train_filename": plan.train_filename,
            "missing_mask": p.missing_mask,
            "sixteen_bit": sixteen_bit_json(p.sixteen_bit),  # how 16-bit images became 8-bit: later stages decode alike
            "seed": plan.seed,
            "images": {s: len(info[f"{s}_files"]) for s in SPLITS},
            "counts": counts,
            "complete": True,
        },
    )
    shutil.rmtree(tmp / SHARD_DIR)
    write_manifest(tmp, known={rel: v for results in per_shard for r in results for rel, v in r.files.items()})
    out = Path(plan.out)
    with layout.build_lock(out):
        layout.publish(tmp, out)
    logger.info(
        "patch dataset in %s: %d train / %d val / %d test images, %d train lines",
        out, len(info["train_files"]), len(info["val_files"]), len(info["test_files"]), len(lines),
    )
    return info


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
    a = dict(locals())  # first statement: locals() holds exactly the parameters
    g, jobs, out, inputs = _checked(a, from_disk=False)
    with layout.build_lock(out):  # one build of a folder at a time (a second one waits, then builds)
        tmp = _prepare(g, jobs, out, inputs)
        plan = load_plan(tmp, mask_preprocessing)
        workers = Workers(plan.params, num_workers, len(plan.jobs))
        try:
            if plan.order is None:  # in-process: one pass over all images, shards only matter on Dask
                assign_splits(tmp, workers.map(scan_image, plan.jobs), plan)
            process_shards(tmp, range(len(plan.shards(ordered=True))), workers, plan)
            workers.close()
            return finish_patch_dataset(tmp, plan)
        except BaseException as exc:
            workers.close()  # wait for running workers before touching the folder they write into
            if fingerprint is None or _bad_input(exc):
                shutil.rmtree(tmp, ignore_errors=True)  # nothing worth resuming: fixed inputs get another fingerprint
            raise  # anything else (Ctrl-C, SIGTERM, disk full, a crash) keeps the finished shards for the rerun


def _bad_input(exc: BaseException) -> bool:
    """A known bad-input error: our ValueError subclasses (InputDataError, DatasetFormatError, AssociationError,
    ...) and the plain ValueErrors of validation. Interruptions (KeyboardInterrupt, Prefect's TerminationSignal
    on SIGTERM), OSError, MemoryError and unexpected errors are not."""
    return isinstance(exc, ValueError)
