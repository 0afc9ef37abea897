"""Tiny synthetic image/mask datasets written as real PNG files (helpers for the dataset tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

CLASS_TO_IDX = {"bg": 0, "a": 1, "b": 2}


def write_image(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return path


def make_dataset(
    root: Path,
    n: int = 12,
    h: int = 64,
    w: int = 80,
    seed: int = 0,
    n_empty: int = 3,
    n_none: int = 0,
    small: int = 0,
) -> list[dict]:
    """Write ``n`` images (+``small`` 20x20 ones) with 1-2 blobs of classes 1/2 and 1-channel index masks.

    ``n_empty`` images get an all-zero mask; the last ``n_none`` images get no mask at all.
    Returns a data dictionary as produced by ``get_image_mask_association``.
    """
    rng = np.random.default_rng(seed)
    images, masks = Path(root) / "images", Path(root) / "masks"
    out: list[dict] = []
    for i in range(n + small):
        hh, ww = (h, w) if i < n else (20, 20)
        img = rng.integers(40, 90, size=(hh, ww, 3), dtype=np.uint8)
        mask = np.zeros((hh, ww), np.uint8)
        if n_empty <= i < n - n_none or i >= n:
            for k in range(1 + (i % 2)):
                value = 1 + (i + k) % 2
                bh, bw = (int(v) for v in rng.integers(4, min(14, hh // 2), size=2))
                y0, x0 = int(rng.integers(0, hh - bh)), int(rng.integers(0, ww - bw))
                if k == 1 and i % 4 == 1:  # a round blob too
                    cv2.circle(mask, (x0 + bw // 2, y0 + bh // 2), max(2, bh // 2), value, -1)
                else:
                    mask[y0 : y0 + bh, x0 : x0 + bw] = value
            img[mask > 0] = 200
        stem = f"im_{i}"
        ipath = write_image(images / f"{stem}.png", img)
        mpath = None
        if i < n - n_none or i >= n:
            mpath = str(write_image(masks / f"{stem}.png", mask))
        out.append({"base_name": ipath.name, "path": str(ipath), "mask": mpath})
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``; folders as ``<dir>/`` (mtime caches aside)."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name == ".stat-cache.json":  # timestamps of the manifest's fast check, not content
            continue
        if p.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
