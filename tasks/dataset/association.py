"""Pair images with their index masks (Quadra's ``get_image_mask_association``, without its bugs).

Differences from the reference (bug B18): only image files are listed (no folders, no ``notes.txt``),
mask file names are matched literally (glob characters in names are harmless), and without a mask
folder a file is a mask when its *stem* ends with ``mask_extension`` (not when the text appears
anywhere in its path). ``~`` in the folders is expanded; the listed paths keep the folders as given
otherwise (relative ones stay relative, as in Quadra).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from storage.layout import IMAGE_EXTENSIONS

logger = logging.getLogger("patchflow.association")


class AssociationError(ValueError):
    """Bad input folders for the image/mask association."""


def _list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (or directly in it), sorted; no folders, hidden files or other types."""
    it = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in it if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def get_image_mask_association(
    data_folder: str,
    mask_folder: str | None = None,
    mask_extension: str = "",
    warning_on_missing_mask: bool = True,
) -> list[dict[str, str | None]]:
    """List ``{"base_name", "path", "mask"}`` for every image under ``data_folder`` (mask None if absent; ``~``
    expanded in both folders)."""
    data = Path(data_folder).expanduser()
    if not data.is_dir():
        raise AssociationError(f"data_folder {data} does not exist or is not a folder; point it at your images")
    if mask_folder is None and not mask_extension:
        raise AssociationError(
            "without mask_folder, mask_extension (e.g. '_mask') is needed to tell masks from images in data_folder"
        )
    images, masks = _images_and_masks(data, mask_folder, mask_extension)
    _check_unique_stems(images)
    mask_by_key: dict[str, list[Path]] = defaultdict(list)
    for m in masks:
        mask_by_key[m.stem].append(m)
    out: list[dict[str, str | None]] = []
    missing = 0
    for img in images:
        cands = mask_by_key.get(img.stem + mask_extension, [])
        if len(cands) > 1:
            raise AssociationError(
                f"image {img} has several candidate masks {[str(c) for c in cands]}; keep exactly one"
            )
        mask = str(cands[0]) if cands else None
        if mask is None:
            missing += 1
            if warning_on_missing_mask and mask_folder is not None:
                logger.warning("no mask for %s (looked for %s%s.* in %s)", img, img.stem, mask_extension, mask_folder)
        out.append({"base_name": img.name, "path": str(img), "mask": mask})
    logger.info("%d images with a mask, %d without", len(out) - missing, missing)
    return out


def _images_and_masks(data: Path, mask_folder: str | None, mask_extension: str) -> tuple[list[Path], list[Path]]:
    """The images under ``data`` and the candidate masks: among the images (stem ending in ``mask_extension``)
    without a mask folder, else the image files directly in ``mask_folder``."""
    files = _list_images(data)
    if mask_folder is None:
        masks = [p for p in files if p.stem.endswith(mask_extension)]
        images = [p for p in files if not p.stem.endswith(mask_extension)]
    else:
        mdir = Path(mask_folder).expanduser()
        if not mdir.is_dir():
            raise AssociationError(
                f"mask_folder {mdir} does not exist or is not a folder; point it at your masks, or leave it "
                "unset (with a mask_extension) when the masks sit among the images"
            )
        masks = _list_images(mdir, recursive=False)
        images = files
    if not images:
        raise AssociationError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {data}; check data_folder")
    return images, masks


def _check_unique_stems(images: list[Path]) -> None:
    """Patch names are ``<stem>_<index>``: two images with one stem are refused."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        by_stem[p.stem].append(p)
    dupes = {s: v for s, v in by_stem.items() if len(v) > 1}
    if dupes:
        s, v = next(iter(dupes.items()))
        raise AssociationError(
            f"{len(dupes)} image stems are used by several files, e.g. {s!r}: {[str(x) for x in v]}; "
            "patch names are <stem>_<index>, so rename or remove the duplicates"
        )
