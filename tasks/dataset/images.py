"""Per-image work of patch dataset generation, the same in-process, in a process pool or on a Dask worker.

Phase 1 (:func:`scan_image`): size from the header, mask values, all validated. Phase 2
(:func:`process_image`): originals, h5 sampling files (train) or grid patches (val/test), each file's size
and digest recorded in a :class:`Result`. A worker process receives the build's
:class:`~tasks.dataset.params.DatasetParams` once (:func:`init_worker`; the pool: ``tasks/dataset/shards.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from storage import layout
from storage.geometry import GridSpec, PatchGrid
from storage.h5files import SamplingRegion, encode_region
from tasks.dataset.labelling import Components, label_components, label_patches
from tasks.dataset.params import DatasetParams
from tasks.dataset.regions import compute_regions, dataset_lines
from tasks.imageio import (
    Decoding,
    InputDataError,
    decode_image,
    decode_mask,
    encode_png,
    image_header,
    max_image_pixels,
    parse_sixteen_bit,
    read_bytes,
)


@dataclass
class Job:
    """One image of the build: its names and files, then what the scan found and its split."""

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
    """What phase 2 made of one image: ``dataset.txt`` lines, counts per class, info.json entries, files."""

    lines: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    image_entry: str = ""
    mask_entry: str | None = None
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # written, relative to the root: (size, sha256)

    def put(self, root: Path, rel: str, data: bytes) -> None:
        """Write ``root/rel`` and record its size and digest (so the manifest needs no second read)."""
        write_bytes(root / rel, data)
        self.files[rel] = (len(data), hashlib.sha256(data).hexdigest())


_PARAMS: DatasetParams | None = None  # the build's parameters and folder, set once per worker
_ROOT: Path | None = None


def init_worker(params: DatasetParams, root: Path) -> None:
    """Set this process's build parameters and build folder (once per worker)."""
    global _PARAMS, _ROOT
    _PARAMS, _ROOT = params, Path(root)
    cv2.setNumThreads(1)


def _worker() -> tuple[DatasetParams, Path]:
    """This process's build parameters and build folder (:func:`init_worker`)."""
    if _PARAMS is None or _ROOT is None:
        raise RuntimeError("init_worker was not called in this process")
    return _PARAMS, _ROOT


LIMIT_SETTING = "dataset.max_image_pixels"


def _decoding(p: DatasetParams) -> Decoding:
    """How this build decodes images: its pixel limit and 16-bit rule."""
    return Decoding(
        max_image_pixels(p.max_image_pixels), LIMIT_SETTING, parse_sixteen_bit(p.sixteen_bit, "dataset.sixteen_bit")
    )


def init_pool_worker(params: DatasetParams, root: Path) -> None:
    """:func:`init_worker` in a pool process, which leaves Ctrl-C to the run: a terminal sends it to every
    process of the group, and the run stops the pool (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(params, root)


def _load_mask(job: Job, p: DatasetParams) -> tuple[np.ndarray | None, bytes | None]:
    """Decoded mask and, when the file can be copied as is, its bytes."""
    if job.mask is None:
        return None, None
    data = read_bytes(job.mask)
    mask, plain = decode_mask(data, job.mask, p.mask_preprocessing, _decoding(p))
    return mask, data if plain else None


def _size_mismatch(job: Job, mask_hw: tuple[int, int], h: int, w: int, orientation: int) -> InputDataError:
    mh, mw = mask_hw
    if orientation in (5, 6, 7, 8) and (mh, mw) == (w, h):  # the mask was drawn on the rotated (displayed) image
        return InputDataError(
            f"{job.path} carries an EXIF rotation (orientation {orientation}): patchflow uses the stored pixel frame "
            f"{w}x{h}, but its mask {job.mask} is {mw}x{mh} (the displayed, rotated frame); rotate the mask to the "
            "stored frame or re-save the image without the EXIF rotation"
        )
    return InputDataError(
        f"{job.mask}: mask is {mw}x{mh} but image {job.path} is {w}x{h}; masks must match their image"
    )


def scan_image(job: Job) -> tuple[tuple[int, int], list[int] | None, bool]:
    """Phase 1: image size from its header (pixel limit checked), mask values (for the split), all validated."""
    p, _ = _worker()
    hdr = image_header(job.path, _decoding(p))  # header only: the pixels are decoded once, in phase 2
    h, w = hdr.height, hdr.width
    mask, mask_data = _load_mask(job, p)
    if mask is None:
        return (h, w), None if p.missing_mask == "test" else [0], False
    if mask.shape != (h, w):
        raise _size_mismatch(job, mask.shape, h, w, hdr.orientation)
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()
    known = set(p.class_to_idx.values())
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputDataError(
            f"{job.mask}: mask values {unknown} are not in class_to_idx {p.class_to_idx}; "
            "add those classes or fix the mask (mask_preprocessing can remap values)"
        )
    return (h, w), values, mask_data is not None


def _grid(job: Job, p: DatasetParams) -> PatchGrid:
    return GridSpec.from_params(p.patch_number, p.patch_size, p.overlap).grid(*job.size)


def process_image(job: Job) -> Result:
    """Phase 2: copy originals, write h5 regions (train) or patches (val/test) for one image."""
    p, root = _worker()
    data = read_bytes(job.path)
    # train images are only validated (a reduced decode); val/test patches need the pixels (grayscale
    # files stay 1-channel: the patches read back as the same BGR pixels, written ~3x faster)
    img = decode_image(data, job.path, reduced=job.split == "train", keep_gray=True, decoding=_decoding(p))
    if job.split != "train" and img.shape[:2] != job.size:
        raise InputDataError(
            f"{job.path}: decoded size {img.shape[:2]} differs from its header {job.size}; re-save the image"
        )
    mask, mask_data = _processed_mask(job, p)
    res = Result()
    _save_originals(res, root, job, p, data, mask, mask_data)
    grid = _grid(job, p)
    components = label_components(mask) if mask is not None and job.values != (0,) else None
    if job.split == "train":
        _write_regions(res, root, job, p, mask, components, grid)
    else:
        _write_patches(res, root, job, p, grid.pad(img), mask, components, grid)
    return res


def _processed_mask(job: Job, p: DatasetParams) -> tuple[np.ndarray | None, bytes | None]:
    """The mask of phase 2 (all zeros for a good image without one under ``missing_mask="good"``) and, when the
    original is saved as it is, its bytes."""
    if job.mask is not None and job.values == (0,) and (job.plain_mask or not p.save_original_images_and_masks):
        # known empty: no second decode (bytes are copied as they are when the originals are saved)
        return np.zeros(job.size, np.uint8), read_bytes(job.mask) if p.save_original_images_and_masks else None
    mask, mask_data = _load_mask(job, p)
    if mask is None and p.missing_mask == "good":
        mask = np.zeros(job.size, np.uint8)
    return mask, mask_data


def _save_originals(
    res: Result, root: Path, job: Job, p: DatasetParams, data: bytes, mask: np.ndarray | None, mask_data: bytes | None
) -> None:
    """Copy the image and its mask into ``original/`` (or refer to them where they are) and set the info.json
    entries."""
    if p.save_original_images_and_masks:
        res.image_entry = f"original/images/{job.base_name}"
        res.put(root, res.image_entry, data)
    else:
        res.image_entry = str(Path(job.path).resolve())
    if job.mask is not None:
        if p.save_original_images_and_masks or p.mask_preprocessing is not None:  # processed masks: always saved (B19)
            res.mask_entry = f"original/masks/{job.stem}.png"
            assert mask is not None
            res.put(root, res.mask_entry, mask_data if mask_data is not None else encode_png(mask, res.mask_entry))
        else:
            res.mask_entry = str(Path(job.mask).resolve())


def _write_regions(
    res: Result,
    root: Path,
    job: Job,
    p: DatasetParams,
    mask: np.ndarray | None,
    components: Components | None,
    grid: PatchGrid,
) -> None:
    """A train image: one h5 sampling file per region, its ``dataset.txt`` lines and labelled mask."""
    annotated_good = set(p.annotated_good or ())
    good_idx = {p.class_to_idx[n] for n in annotated_good}
    class_names = {v: k for k, v in p.class_to_idx.items()}
    good, comps = compute_regions(mask, components, (grid.patch_h, grid.patch_w), class_names, good_idx)
    for region in ([good] if good is not None else []) + comps:
        res.put(
            root,
            f"train/{job.stem}_{region.suffix}.h5",
            encode_region(
                SamplingRegion(
                    img_path=res.image_entry,
                    patch_size=(grid.patch_h, grid.patch_w),
                    triangles=region.triangles,
                    weights=region.weights,
                    mask_path=res.mask_entry if (mask is not None and mask.any()) else None,
                    labelled_index=region.labelled_index,
                ),
            ),
        )
    res.lines = dataset_lines(job.stem, good, comps, annotated_good, p.repeat_good_images, p.balance_defects)
    if components is not None and len(components.classes) > 1:
        rel = f"original/labelled_masks/{job.stem}.png"
        res.put(root, rel, encode_png(components.labels.astype(np.uint16), rel))
    for line in res.lines:
        cls = line.rsplit(",", 1)[1]
        res.counts[cls] = res.counts.get(cls, 0) + 1


def _write_patches(
    res: Result,
    root: Path,
    job: Job,
    p: DatasetParams,
    padded: np.ndarray,
    mask: np.ndarray | None,
    components: Components | None,
    grid: PatchGrid,
) -> None:
    """A val/test image: its grid patches (and patch masks with ``save_mask``) in one folder per label."""
    background = next(k for k, v in p.class_to_idx.items() if v == 0)
    if mask is None:
        labels = [(layout.NONE_CLASS, True)] * grid.num_patches
    elif components is None:  # empty mask
        labels = [(background, False)] * grid.num_patches
    else:
        labels = label_patches(components, grid, p.class_to_idx, p.area_threshold, p.area_defect_threshold)
    pmask = grid.pad(mask, is_mask=True) if mask is not None else None
    for idx, ((y0, x0, y1, x1), (label, discard)) in enumerate(zip(grid.boxes().tolist(), labels)):
        rel = f"{job.split}/{label}/{layout.patch_name(job.stem, idx, discard)}"
        res.put(root, rel, encode_png(padded[y0:y1, x0:x1], rel))
        if p.save_mask and pmask is not None:
            mdir = os.path.join(f"{job.split}_masks", p.mask_output_folder or "", label)
            (root / mdir).mkdir(parents=True, exist_ok=True)
            rel = f"{mdir}/{layout.patch_name(job.stem, idx, discard, suffix=p.mask_extension)}"
            res.put(root, rel, encode_png(pmask[y0:y1, x0:x1], rel))
        res.counts[label] = res.counts.get(label, 0) + 1


WRITE_FIX = "free disk space, or choose another output_folder if this one is read-only"


@contextlib.contextmanager
def naming_write_errors(path: Path) -> Iterator[None]:
    """An OS error while writing ``path`` names the file and the fix."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"could not write {path} ({reason}); {WRITE_FIX}") from None


def write_bytes(path: Path, data: bytes | str) -> None:
    """Write a file; an OS error names the file and the fix."""
    with naming_write_errors(path):
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
