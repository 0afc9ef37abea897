"""Deterministic synthetic demo dataset: machined-metal-like images with blob / scratch / stain defects.

``python -m tasks.demo_data OUT_DIR`` writes ``OUT_DIR/images/part_000.png`` (3-channel),
``OUT_DIR/masks/part_000_mask.png`` (1-channel uint8 index masks, 0 = background),
``OUT_DIR/class_to_idx.json`` and a hidden manifest (``.patchflow_demo.json``) listing what it wrote,
so that a rerun may rewrite its own files but never touches anything else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DEMO_CLASSES: dict[str, int] = {"background": 0, "blob": 1, "scratch": 2, "stain": 3}
MANIFEST = ".patchflow_demo.json"
_CHANNELS = {1: (1.0, 1.0, 1.0), 2: (1.0, 1.0, 1.0), 3: (1.25, 1.0, 0.75)}  # BGR weights; stains brownish


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise (~unit amplitude) with features about ``cell`` pixels wide."""
    small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _surface(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey machined surface: brightness + low-frequency shading + directional streaks + grain + gradient."""
    streaks = cv2.GaussianBlur(
        rng.standard_normal((h, w)).astype(np.float32), (15, 1) if rng.random() < 0.5 else (1, 15), 0
    )
    xx, yy = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :], np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    gx, gy = rng.uniform(-20, 20, 2)
    return (
        rng.uniform(90, 160)
        + _smooth(rng, h, w, 32) * rng.uniform(4, 8)
        + streaks * rng.uniform(8, 14)
        + rng.standard_normal((h, w)).astype(np.float32) * rng.uniform(2, 3.5)
        + gx * xx
        + gy * yy
    )


def _soft(shape: np.ndarray) -> np.ndarray:
    """Contrast profile inside ``shape``: a little weaker on its 1-2 px rim, zero outside (mask stays exact)."""
    d = cv2.distanceTransform(shape, cv2.DIST_L2, 3)
    return np.where(shape > 0, np.clip(0.55 + 0.2 * d, 0.0, 1.0), 0.0).astype(np.float32)


def _blob(rng: np.random.Generator, h: int, w: int, hole: bool) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(10, 22) if hole else rng.uniform(5, 20)
    b = rng.uniform(max(8.0, 0.55 * a) if hole else max(4.0, 0.5 * a), a)
    ax, bx = int(round(a)), int(round(b))
    c = (int(rng.integers(ax + 2, w - ax - 2)), int(rng.integers(ax + 2, h - ax - 2)))
    ang = float(rng.uniform(0, 180))
    shape = np.zeros((h, w), np.uint8)
    cv2.ellipse(shape, c, (ax, bx), ang, 0, 360, 1, -1)
    if hole:  # ring-shaped blob
        cv2.ellipse(shape, c, (ax // 2, bx // 2), ang, 0, 360, 0, -1)
    return shape, _soft(shape) * (rng.choice([-1.0, 1.0]) * rng.uniform(35, 60))


def _scratch(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    length = rng.uniform(70, max(71.0, min(160.0, 0.8 * max(h, w))))
    for _ in range(50):
        n_seg = int(rng.integers(1, 4))
        ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, n_seg))
        seg = rng.dirichlet(np.ones(n_seg)) * length
        pts = np.vstack([[0.0, 0.0], np.cumsum(np.c_[np.cos(ang) * seg, np.sin(ang) * seg], axis=0)])
        pts -= pts.min(axis=0)
        room = np.array([w - 5, h - 5]) - pts.max(axis=0)
        if (room >= 0).all():
            pts += 2 + rng.uniform(0, 1, 2) * room
            break
    else:  # fallback: straight line along the longer side
        pts = np.array([[4, h // 2], [w - 5, h // 2]] if w >= h else [[w // 2, 4], [w // 2, h - 5]], float)
    shape = np.zeros((h, w), np.uint8)
    cv2.polylines(shape, [np.round(pts).astype(np.int32)], False, 1, int(rng.choice([1, 1, 2])), cv2.LINE_8)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return shape, shape.astype(np.float32) * (sign * rng.uniform(45, 70))


def _stain(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    for _ in range(20):
        rx = rng.uniform(14, 38)
        ry = rng.uniform(10, rx)
        cx, cy = rng.uniform(rx, w - rx), rng.uniform(rx, h - rx)
        t = rng.uniform(0, np.pi)
        xx, yy = np.arange(w, dtype=np.float32)[None, :] - cx, np.arange(h, dtype=np.float32)[:, None] - cy
        u, v = (xx * np.cos(t) + yy * np.sin(t)) / rx, (yy * np.cos(t) - xx * np.sin(t)) / ry
        field = 1.0 - np.sqrt(u * u + v * v) + 0.45 * _smooth(rng, h, w, 8)
        raw = cv2.morphologyEx((field > 0.25).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        n, lab, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8)
        if n > 1 and stats[1:, cv2.CC_STAT_AREA].max() >= 60:
            shape = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
            break
    else:  # fallback: plain ellipse
        shape = np.zeros((h, w), np.uint8)
        cv2.ellipse(shape, (w // 2, h // 2), (20, 14), 0, 0, 360, 1, -1)
    tex = 0.75 + 0.3 * np.clip(_smooth(rng, h, w, 4), -1, 1)  # mottled inside
    sign = -1.0 if rng.random() < 0.75 else 1.0
    return shape, _soft(shape) * tex * (sign * rng.uniform(22, 32))


def _plan(rng: np.random.Generator, n: int, n_classes: int, good_fraction: float) -> list[list[int]]:
    """Defect classes per image ([] = good); each class in >= min(3, #defective images) images."""
    good = set(rng.permutation(n)[: int(round(good_fraction * n))].tolist())
    plan = [[] if i in good else rng.integers(1, n_classes + 1, int(rng.integers(1, 4))).tolist() for i in range(n)]
    bad = [i for i in range(n) if i not in good]
    for c in range(1, n_classes + 1):
        while sum(c in plan[i] for i in bad) < min(3, len(bad)):
            i = (cands := [i for i in bad if c not in plan[i]])[int(rng.integers(len(cands)))]
            if len(plan[i]) < 3:
                plan[i].append(c)
            else:  # three defects, no c: one class is duplicated, replace one copy
                plan[i][next(k for k, v in enumerate(plan[i]) if plan[i].count(v) > 1)] = c
    return plan


def _prepare(out: Path) -> None:
    """Remove a previous demo dataset in ``out``; refuse (ValueError) if ``out`` holds anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    entries = {p.relative_to(out).as_posix() for p in out.rglob("*")} if out.exists() else set()
    if not entries:
        return
    try:
        listed = set(json.loads((out / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{out} is not empty and holds no demo dataset: refusing to write there (pick a new folder)"
        ) from None
    foreign = sorted(entries - listed - {MANIFEST, "images", "masks"})
    if foreign:
        raise ValueError(
            f"{out} holds files the demo generator did not write ({', '.join(foreign[:5])}): refusing to overwrite"
        )
    for rel in sorted(listed & entries):
        if (out / rel).is_file():
            (out / rel).unlink()


def _draw_image(
    rng: np.random.Generator, h: int, w: int, defects: list[int], n_blobs: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """One demo image (float BGR), its index mask and the blob count so far, with the ``defects`` classes drawn
    apart from each other so each stays whole and distinct."""
    gray = _surface(rng, h, w)
    img = gray[..., None] * np.array([1.0 + rng.uniform(0, 0.04), 1.0, 1.0 - rng.uniform(0, 0.04)], np.float32)
    mask = np.zeros((h, w), np.uint8)
    kernel = np.ones((9, 9), np.uint8)
    for c in defects:
        busy = cv2.dilate((mask > 0).astype(np.uint8), kernel)
        for _ in range(30):
            if c == 1:
                shape, delta = _blob(rng, h, w, n_blobs == 0 or rng.random() < 0.35)
            else:
                shape, delta = _scratch(rng, h, w) if c == 2 else _stain(rng, h, w)
            if not (shape & busy).any():
                break
        shape, delta = shape & (1 - busy), delta * (1 - busy)
        n_blobs += c == 1
        mask[shape > 0] = c
        img += delta[..., None] * np.array(_CHANNELS[c], np.float32)
    return img, mask, n_blobs


def make_demo_dataset(
    out_dir: str | Path,
    n_images: int = 24,
    size: tuple[int, int] = (192, 256),
    n_classes: int = 3,
    seed: int = 0,
    good_fraction: float = 0.35,
    missing_mask_fraction: float = 0.0,
) -> dict[str, Any]:
    """Write a deterministic demo dataset (images, index masks, class_to_idx.json) under ``out_dir``.

    ``size`` is (height, width), each >= 80. Returns the folders, class_to_idx, n_images, per-class image
    counts, and the names of the good images and of the images written without a mask.
    """
    h, w = int(size[0]), int(size[1])
    if n_classes not in (2, 3):
        raise ValueError(f"n_classes must be 2 or 3, got {n_classes}")
    if n_images < 1 or min(h, w) < 80:
        raise ValueError(f"need n_images >= 1 and size >= (80, 80), got {n_images} and {size}")
    if not (0.0 <= good_fraction <= 1.0 and 0.0 <= missing_mask_fraction <= 1.0):
        raise ValueError("good_fraction and missing_mask_fraction must be within [0, 1]")
    out = Path(out_dir).resolve()
    _prepare(out)
    rng = np.random.default_rng(seed)
    plan = _plan(rng, n_images, n_classes, good_fraction)
    missing = set(rng.permutation(n_images)[: int(round(missing_mask_fraction * n_images))].tolist())
    names = [f"part_{i:03d}" for i in range(n_images)]
    class_to_idx = {k: v for k, v in DEMO_CLASSES.items() if v <= n_classes}
    files = [f"images/{s}.png" for s in names] + [
        f"masks/{s}_mask.png" for i, s in enumerate(names) if i not in missing
    ]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    (out / MANIFEST).write_text(
        json.dumps({"generator": "tasks.demo_data", "files": sorted(files + ["class_to_idx.json"])}, indent=1)
    )
    (out / "class_to_idx.json").write_text(json.dumps(class_to_idx, indent=2))
    counts = dict.fromkeys(list(class_to_idx)[1:], 0)
    n_blobs = 0
    for i, name in enumerate(names):
        img, mask, n_blobs = _draw_image(rng, h, w, plan[i], n_blobs)
        for c in set(np.unique(mask).tolist()) - {0}:
            counts[list(class_to_idx)[c]] += 1
        cv2.imwrite(str(out / "images" / f"{name}.png"), np.clip(np.round(img), 0, 255).astype(np.uint8))
        if i not in missing:
            cv2.imwrite(str(out / "masks" / f"{name}_mask.png"), mask)
    return {
        "images": str(out / "images"),
        "masks": str(out / "masks"),
        "class_to_idx": class_to_idx,
        "n_images": n_images,
        "counts": counts,
        "good_images": [names[i] for i in range(n_images) if not plan[i]],
        "missing_masks": [names[i] for i in sorted(missing)],
    }


def main() -> None:
    """CLI: ``python -m tasks.demo_data OUT_DIR [--n-images N] [--seed S] [--classes 2|3]``; prints JSON."""
    p = argparse.ArgumentParser(prog="python -m tasks.demo_data", description="Write the synthetic demo dataset.")
    p.add_argument("out_dir")
    p.add_argument("--n-images", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, choices=(2, 3), default=3)
    p.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    p.add_argument("--good-fraction", type=float, default=0.35)
    p.add_argument("--missing-mask-fraction", type=float, default=0.0)
    a = p.parse_args()
    try:
        res = make_demo_dataset(
            a.out_dir, a.n_images, tuple(a.size), a.classes, a.seed, a.good_fraction, a.missing_mask_fraction
        )
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
