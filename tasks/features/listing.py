"""What a feature store reads from a Quadra-layout patch dataset: the training list (``train/dataset.txt``
entries after filters, optionally class-balanced) and the val/test patch listing (``<split>/<class>/*.png``).

Plain functions (no Prefect). Filters are substring matches on the file name only (B25), not the directory
path; class balancing is driven by ``np.random.default_rng`` seeded from an explicit argument.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.layout import NONE_CLASS, DatasetFormatError
from storage.layout import PATCH_EXTENSIONS as IMAGE_EXTENSIONS


@dataclass(frozen=True)
class TrainEntry:
    """One line of ``train/dataset.txt``."""

    h5_name: str
    class_name: str


# ------------------------------------------------------------------------------------ train list


def _matches(name: str, substrings: Sequence[str] | None) -> bool:
    return any(s in name for s in substrings or ())


def read_train_list(
    data_path: Path,
    train_filename: str = "dataset.txt",
    include_filter: Sequence[str] | None = None,
    exclude_filter: Sequence[str] | None = None,
    class_to_skip: Sequence[str] | None = None,
) -> list[TrainEntry]:
    """Entries of ``train/<train_filename>`` after filters; ``[]`` if the file does not exist."""
    p = Path(data_path) / "train" / train_filename
    if not p.is_file():
        return []
    skip = set(class_to_skip or ())
    out: list[TrainEntry] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) carry nothing
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise DatasetFormatError(
                    f"{p}, line {lineno}: expected '<h5 file name>,<class name>', got {line!r}. "
                    "Fix or remove the line (class names must not contain commas)."
                )
            h5_name, class_name = fields
            if class_name in skip:
                continue
            if include_filter and not _matches(h5_name, include_filter):
                continue
            if exclude_filter and _matches(h5_name, exclude_filter):
                continue
            out.append(TrainEntry(h5_name, class_name))
    return out


def balance_entries(entries: list[TrainEntry], seed: int) -> list[TrainEntry]:
    """Oversample every class with replacement up to the largest class count (deterministic)."""
    by_class: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_class.setdefault(e.class_name, []).append(i)
    if not by_class:
        return list(entries)
    target = max(len(v) for v in by_class.values())
    rng = np.random.default_rng(seed)
    out = list(entries)
    for cls in sorted(by_class):
        idx = np.asarray(by_class[cls], dtype=np.int64)
        extra = target - idx.size
        if extra > 0:
            out.extend(entries[int(i)] for i in rng.choice(idx, size=extra, replace=True))
    return out


# ----------------------------------------------------------------------------------- val / test


def _skipped(name: str) -> bool:
    return name.startswith(".") or "checkpoint" in name


def list_split(
    data_path: Path,
    split: str,
    class_to_idx: dict[str, int],
    include_filter: Sequence[str] | None = None,
    exclude_filter: Sequence[str] | None = None,
    include_none: bool = True,
) -> list[tuple[str, int]]:
    """``(path relative to data_path, label)`` of every patch image under ``<split>/``, sorted.

    The label is the immediate parent folder's class index; ``None/`` gives -1 (or is dropped when
    ``include_none`` is False). Filters are substring matches on the file name.
    """
    data_path = Path(data_path)
    root = data_path / split
    if not root.is_dir():
        return []
    out: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        here = Path(dirpath)
        for fn in sorted(filenames):
            if _skipped(fn) or os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if include_filter and not _matches(fn, include_filter):
                continue
            if exclude_filter and _matches(fn, exclude_filter):
                continue
            folder = here.name
            if here == root:
                raise DatasetFormatError(
                    f"{here / fn} sits directly in {root}; patches must be in {root}/<class name>/"
                )
            if folder == NONE_CLASS:
                if not include_none:
                    continue
                label = -1
            elif folder in class_to_idx:
                label = int(class_to_idx[folder])
            else:
                raise DatasetFormatError(
                    f"folder {here} (holding {fn}) is not a known class: {folder!r} is not in class_to_idx "
                    f"{sorted(class_to_idx)} and is not 'None'. Add it to class_to_idx, or exclude these "
                    "files with exclude_filter (e.g. saved masks)."
                )
            out.append(((here / fn).relative_to(data_path).as_posix(), label))
    out.sort()
    return out


def split_items(
    data_path: Path,
    split: str,
    class_to_idx: dict[str, int],
    include_filter: Sequence[str] | None,
    exclude_filter: Sequence[str] | None,
) -> list[tuple[str, int]]:
    """Patches of a val/test split as (path relative to the dataset, label); test keeps unlabelled (None, -1) ones."""
    items = list_split(data_path, split, class_to_idx, include_filter, exclude_filter, include_none=split != "val")
    if not items:
        raise ValueError(
            f"no {split} patches in {data_path / split}; generate the dataset with a non-zero {split}_size"
        )
    return items
