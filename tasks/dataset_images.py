"""Per-image work of patch dataset generation: scan (size, mask values) and process (originals, h5
sampling files, val/test patches), run in-process or on a process pool with identical output."""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from storage import layout
from storage.geometry import PatchGrid, compute_grid
from storage.h5files import SamplingRegion, write_region
from tasks.imageio import InputDataError, decode_image, decode_mask, file_image_size, read_bytes, write_png
from tasks.labelling import label_components, label_patches
from tasks.regions import compute_regions, dataset_lines


@dataclass(frozen=True)
class Params:
    """Everything a worker needs, sent once per worker."""

    root: str  # temporary output root
    class_to_idx: dict[str, int]
    patch_number: tuple[int, int] | None
    patch_size: tuple[int, int] | None
    overlap: float
    save_original: bool
    area_threshold: float
    area_defect_threshold: float
    mask_extension: str
    mask_output_folder: str | None
    save_mask: bool
    mask_preprocessing: Callable[[np.ndarray], np.ndarray] | None
    repeat_good_images: int
    balance_defects: bool
    annotated_good: tuple[str, ...]
    missing_mask: str


@dataclass
class Job:
    index: int
    stem: str
    base_name: str
    path: str
    mask: str | None
    split: str = ""
    size: tuple[int, int] = (0, 0)
    values: tuple[int, ...] | None = None  # mask values found by the scan
    plain_mask: bool = False  # mask file is a 1-channel 8-bit PNG (copyable as is)


@dataclass
class Result:
    lines: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    image_entry: str = ""
    mask_entry: str | None = None
    files: list[str] = field(default_factory=list)  # written, relative to the dataset root


_PARAMS: Params | None = None


def init_worker(params: Params) -> None:
    global _PARAMS
    _PARAMS = params
    cv2.setNumThreads(1)


def _load_mask(job: Job, p: Params) -> tuple[np.ndarray | None, bytes | None]:
    """Decoded mask and, when the file can be copied as is, its bytes."""
    if job.mask is None:
        return None, None
    data = read_bytes(job.mask)
    mask, plain = decode_mask(data, job.mask, p.mask_preprocessing)
    return mask, data if plain else None


def scan_image(job: Job) -> tuple[tuple[int, int], list[int] | None, bool]:
    """Phase 1: image size from its header, mask values (for the split), all validated."""
    p = _PARAMS
    h, w = file_image_size(job.path)  # header only: the pixels are decoded once, in phase 2
    mask, mask_data = _load_mask(job, p)
    if mask is None:
        return (h, w), None if p.missing_mask == "test" else [0], False
    if mask.shape != (h, w):
        raise InputDataError(
            f"{job.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but image {job.path} is {w}x{h}; masks must match their image"
        )
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()
    known = set(p.class_to_idx.values())
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputDataError(
            f"{job.mask}: mask values {unknown} are not in class_to_idx {p.class_to_idx}; "
            "add those classes or fix the mask (mask_preprocessing can remap values)"
        )
    return (h, w), values, mask_data is not None


def _grid(job: Job, p: Params) -> PatchGrid:
    return compute_grid(job.size[0], job.size[1], p.patch_number, p.patch_size, p.overlap)


def process_image(job: Job) -> Result:
    """Phase 2: copy originals, write h5 regions (train) or patches (val/test) for one image."""
    p = _PARAMS
    root = Path(p.root)
    data = read_bytes(job.path)
    # train images are only validated (a reduced decode); val/test patches need the pixels
    img = decode_image(data, job.path, reduced=job.split == "train")
    if job.split != "train" and img.shape[:2] != job.size:
        raise InputDataError(f"{job.path}: decoded size {img.shape[:2]} differs from its header {job.size}; re-save the image")
    if job.mask is not None and job.values == (0,) and (job.plain_mask or not p.save_original):
        # known empty: no second decode (bytes are copied as they are when the originals are saved)
        mask = np.zeros(job.size, np.uint8)
        mask_data = read_bytes(job.mask) if p.save_original else None
    else:
        mask, mask_data = _load_mask(job, p)
    if mask is None and p.missing_mask == "good":
        mask = np.zeros(job.size, np.uint8)
    res = Result()
    # originals
    if p.save_original:
        write_bytes(root / "original" / "images" / job.base_name, data)
        res.files.append(f"original/images/{job.base_name}")
        res.image_entry = f"original/images/{job.base_name}"
    else:
        res.image_entry = str(Path(job.path).resolve())
    if job.mask is not None:
        if p.save_original or p.mask_preprocessing is not None:  # processed masks are always saved (B19)
            dst = root / "original" / "masks" / f"{job.stem}.png"
            if mask_data is not None:
                write_bytes(dst, mask_data)
            else:
                imwrite(dst, mask)
            res.mask_entry = f"original/masks/{job.stem}.png"
            res.files.append(res.mask_entry)
        else:
            res.mask_entry = str(Path(job.mask).resolve())
    grid = _grid(job, p)
    components = label_components(mask) if mask is not None and job.values != (0,) else None
    class_names = {v: k for k, v in p.class_to_idx.items()}
    if job.split == "train":
        good_idx = {p.class_to_idx[n] for n in p.annotated_good}
        good, comps = compute_regions(mask, components, (grid.patch_h, grid.patch_w), class_names, good_idx)
        for region in ([good] if good is not None else []) + comps:
            res.files.append(f"train/{job.stem}_{region.suffix}.h5")
            write_region(
                root / "train" / f"{job.stem}_{region.suffix}.h5",
                SamplingRegion(
                    img_path=res.image_entry,
                    patch_size=(grid.patch_h, grid.patch_w),
                    triangles=region.triangles,
                    weights=region.weights,
                    mask_path=res.mask_entry if (mask is not None and mask.any()) else None,
                    labelled_index=region.labelled_index,
                ),
            )
        res.lines = dataset_lines(job.stem, good, comps, set(p.annotated_good), p.repeat_good_images, p.balance_defects)
        if components is not None and len(components.classes) > 1:
            imwrite(root / "original" / "labelled_masks" / f"{job.stem}.png", components.labels.astype(np.uint16))
            res.files.append(f"original/labelled_masks/{job.stem}.png")
        for line in res.lines:
            cls = line.rsplit(",", 1)[1]
            res.counts[cls] = res.counts.get(cls, 0) + 1
        return res
    # val / test grid patches
    padded = grid.pad(img)
    background = next(k for k, v in p.class_to_idx.items() if v == 0)
    if mask is None:
        labels = [(layout.NONE_CLASS, True)] * grid.num_patches
    elif components is None:  # empty mask
        labels = [(background, False)] * grid.num_patches
    else:
        labels = label_patches(components, grid, p.class_to_idx, p.area_threshold, p.area_defect_threshold)
    pmask = grid.pad(mask, is_mask=True) if mask is not None else None
    split_dir = root / job.split
    for idx, ((y0, x0, y1, x1), (label, discard)) in enumerate(zip(grid.boxes().tolist(), labels)):
        name = layout.patch_name(job.stem, idx, discard)
        imwrite(split_dir / label / name, padded[y0:y1, x0:x1])
        res.files.append(f"{job.split}/{label}/{name}")
        if p.save_mask and pmask is not None:
            mdir = root / f"{job.split}_masks" / (p.mask_output_folder or "") / label
            mdir.mkdir(parents=True, exist_ok=True)
            mname = layout.patch_name(job.stem, idx, discard, suffix=p.mask_extension)
            imwrite(mdir / mname, pmask[y0:y1, x0:x1])
            res.files.append(str((mdir / mname).relative_to(root)))
        res.counts[label] = res.counts.get(label, 0) + 1
    return res


WRITE_FIX = "free disk space, or choose another output_folder if this one is read-only"


def imwrite(path: Path, array: np.ndarray) -> None:
    """Write a PNG of the dataset, or fail naming the file and the fix."""
    write_png(path, array, WRITE_FIX)


def write_bytes(path: Path, data: bytes | str) -> None:
    """Write a file; an OS error names the file and the fix."""
    try:
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"could not write {path} ({reason}); {WRITE_FIX}") from None


class Workers:
    """Runs per-image functions in order, in-process or on one process pool reused by both phases."""

    def __init__(self, params: Params, num_workers: int, n_jobs: int) -> None:
        self.params = params
        self.pool: ProcessPoolExecutor | None = None
        self.chunk = max(1, math.ceil(n_jobs / (num_workers * 4)))
        if num_workers > 1 and n_jobs > 1:
            # fork is cheapest but unsafe in a multi-threaded process (Prefect's engine runs threads)
            method = "fork" if threading.active_count() == 1 and os.name == "posix" else "forkserver"
            ctx = multiprocessing.get_context(method)
            self.pool = ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=init_worker, initargs=(params,))
        else:
            init_worker(params)

    def map(self, fn: Callable[[Job], Any], jobs: Sequence[Job]) -> list[Any]:
        if self.pool is None:
            return [fn(j) for j in jobs]
        return list(self.pool.map(fn, jobs, chunksize=self.chunk))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
