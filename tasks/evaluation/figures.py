"""Figures of the evaluation report and of predict: class colours, confusion matrix, example grids, overlays.

Drawing uses numpy + OpenCV only and is deterministic (same inputs, same pixels); writing files and the HTML
page is :mod:`tasks.evaluation.report`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from storage import layout
from tasks.imageio import Decoding, InputDataError, dataset_decoding, decode_mask, read_bytes, read_image

# BGR class colours shared by the report and the predict overlays; index 0 (background) is transparent and
# class k uses PALETTE[(k - 1) % len(PALETTE)].
PALETTE = [
    (40, 40, 230),
    (40, 200, 40),
    (230, 120, 30),
    (200, 40, 200),
    (40, 200, 220),
    (220, 220, 40),
    (120, 60, 200),
    (60, 140, 255),
    (180, 180, 180),
]
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110)


def class_colour(idx: int) -> tuple[int, int, int]:
    """Fixed BGR colour of a class index (index 0 has none: callers leave background transparent)."""
    return PALETTE[(int(idx) - 1) % len(PALETTE)]


def _ascii(text: Any) -> str:
    return str(text).encode("ascii", "replace").decode()


def _text(
    img: np.ndarray,
    text: Any,
    org: tuple[int, int],
    scale: float = 0.45,
    colour: tuple[int, int, int] = BLACK,
    thick: int = 1,
) -> None:
    cv2.putText(img, _ascii(text), (int(org[0]), int(org[1])), FONT, scale, colour, thick, cv2.LINE_AA)


def _text_w(text: Any, scale: float = 0.45, thick: int = 1) -> int:
    return cv2.getTextSize(_ascii(text), FONT, scale, thick)[0][0]


def confusion_matrix_image(labels: list[str], matrix: list[list[int]], title: str) -> np.ndarray:
    """BGR image of a confusion matrix: counts in cells, row-normalised blue shading, names on both axes."""
    m = np.asarray(matrix, dtype=np.int64).reshape(len(labels), len(labels))
    rows = m.sum(axis=1, keepdims=True)
    norm = np.where(rows > 0, m / np.maximum(rows, 1), 0.0)
    cell = 78
    left = 40 + max(_text_w(n, 0.5) for n in labels)
    top = 70 + max(_text_w(n, 0.5) for n in labels)
    n = len(labels)
    img = np.full((top + n * cell + 40, max(left + n * cell + 30, _text_w(title, 0.6, 2) + 30), 3), 255, np.uint8)
    _text(img, title, (15, 28), 0.6, BLACK, 2)
    for i in range(n):
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            shade = np.array([255, 255, 255]) - norm[i, j] * np.array([70, 150, 215])  # white -> dark blue (BGR)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), tuple(int(v) for v in shade), -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), GREY, 1)
            col = WHITE if norm[i, j] > 0.55 else BLACK
            s = str(int(m[i, j]))
            _text(img, s, (x0 + (cell - _text_w(s, 0.6, 2)) // 2, y0 + cell // 2 + 2), 0.6, col, 2)
            pct = f"{100 * norm[i, j]:.0f}%"
            _text(img, pct, (x0 + (cell - _text_w(pct, 0.4)) // 2, y0 + cell // 2 + 22), 0.4, col)
        _text(img, labels[i], (left - 10 - _text_w(labels[i], 0.5), top + i * cell + cell // 2 + 5), 0.5)
    strip = np.full((top - 50, n * cell, 3), 255, np.uint8)  # column names, drawn then rotated to read bottom-up
    strip = np.ascontiguousarray(np.rot90(strip, -1))
    for j, name in enumerate(labels):
        _text(strip, name, (10, j * cell + cell // 2 + 5), 0.5)
    img[40 : top - 10, left : left + n * cell] = np.rot90(strip, 1)
    _text(img, "true (rows) / predicted (columns)", (left, img.shape[0] - 14), 0.45, GREY)
    return img


def _tile(
    data_path: Path, sample: str, caption: list[str], size: int = 128, decoding: Decoding | None = None
) -> np.ndarray:
    tile = np.full((size + 40, size + 8, 3), 255, np.uint8)
    try:
        patch = read_image(data_path / sample, decoding)
        h, w = patch.shape[:2]
        s = size / max(h, w)
        patch = cv2.resize(
            patch,
            (max(1, round(w * s)), max(1, round(h * s))),
            interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST,
        )
        tile[4 : 4 + patch.shape[0], 4 : 4 + patch.shape[1]] = patch
    except InputDataError:
        _text(tile, "missing", (30, size // 2), 0.5, GREY)
    for k, line in enumerate(caption):
        _text(tile, line, (4, size + 18 + 16 * k), 0.4)
    return tile


def colourise(base: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each defect class painted in its fixed colour (background untouched)."""
    out = base.astype(np.float32)
    for c in sorted(int(v) for v in np.unique(labels) if v > 0):
        sel = labels == c
        out[sel] = (1 - alpha) * out[sel] + alpha * np.array(class_colour(c), np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _poly(points: list[dict[str, int]], s: float) -> np.ndarray:
    return np.round(np.array([[p["x"], p["y"]] for p in points], np.float64) * s).astype(np.int32).reshape(-1, 1, 2)


def _resolve(stored: str | None, data_path: Path, sub: str) -> Path | None:
    if not stored:
        return None
    p = layout.resolve_path(stored, data_path)
    if p is not None and p.is_file():
        return p
    return data_path / "original" / sub / Path(stored).name  # moved dataset folder


def _predicted_map(
    rec: dict[str, Any], maps_dir: Path, class_to_idx: dict[str, int], shape: tuple[int, int]
) -> np.ndarray:
    """The image's class map from ``maps_dir``; without one (or of another size), its polygons rasterised."""
    pmap = maps_dir / f"{Path(rec['file_name']).stem}.png"
    pred = cv2.imread(str(pmap), cv2.IMREAD_UNCHANGED) if pmap.is_file() else None
    if pred is None or pred.shape[:2] != shape:
        pred = np.zeros(shape, np.uint8)
        for p in rec.get("prediction", []):
            cv2.fillPoly(pred, [_poly(p["points"], 1)], class_to_idx.get(p["label"], 1))
            for hole in p.get("holes", []):
                cv2.fillPoly(pred, [_poly(hole, 1)], 0)
    return pred


def _truth_panel(base: np.ndarray, gt: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """The ground truth over the (resized) image with class outlines, or a greyed image saying there is none."""
    if gt is None:
        g = (base // 3 + 170).astype(np.uint8)
        _text(g, "no ground-truth mask", (10, size[1] // 2), 0.55, BLACK, 2)
        return g
    gts = cv2.resize(gt.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    g = colourise(base, gts)
    for c in sorted(int(v) for v in np.unique(gts) if v > 0):
        cs, _ = cv2.findContours((gts == c).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(g, cs, -1, class_colour(c), 1, cv2.LINE_AA)
    return g


def overlay_image(
    rec: dict[str, Any],
    data_path: Path,
    maps_dir: Path,
    class_to_idx: dict[str, int],
    good: set[int] | None = None,
    decoding: Decoding | None = None,
) -> np.ndarray:
    """One row of panels: image | ground truth over image | prediction over image with polygon outlines, and a
    legend.

    ``decoding``: how the dataset's images decode (None: read from its sidecar)."""
    image_path = _resolve(rec["image_path"], data_path, "images")
    if image_path is None:
        raise ValueError(f"record {rec.get('name', '?')} has no image path")
    img = read_image(image_path, decoding or dataset_decoding(data_path))
    h, w = img.shape[:2]
    gt = None
    mpath = _resolve(rec.get("mask_path"), data_path, "masks")
    if mpath is not None and mpath.is_file():
        gt = decode_mask(read_bytes(mpath), mpath, decoding=decoding)[0].astype(np.int32)
        if good:
            gt[np.isin(gt, list(good))] = 0
    pred = _predicted_map(rec, maps_dir, class_to_idx, (h, w))
    s = min(2.0 if max(h, w) < 300 else 1.0, 420 / w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    base = cv2.resize(img, size, interpolation=interp)
    panels = [base.copy(), _truth_panel(base, gt, size)]
    p = colourise(base, cv2.resize(pred, size, interpolation=cv2.INTER_NEAREST))
    for reg in rec.get("prediction", []):
        col = class_colour(class_to_idx.get(reg["label"], 1))
        cv2.polylines(p, [_poly(reg["points"], s)], True, col, 2, cv2.LINE_AA)
        for hole in reg.get("holes", []):
            cv2.polylines(p, [_poly(hole, s)], True, WHITE, 1, cv2.LINE_AA)
    panels.append(p)
    names = ["image", "ground truth", f"prediction ({len(rec.get('prediction', []))} regions)"]
    gap, head = 10, 30
    row = np.full((head + size[1] + 44, 3 * size[0] + 4 * gap, 3), 255, np.uint8)
    for k, (panel, name) in enumerate(zip(panels, names)):
        x = gap + k * (size[0] + gap)
        row[head : head + size[1], x : x + size[0]] = panel
        _text(row, name, (x, head - 10), 0.5, BLACK, 1)
    x, y = gap, head + size[1] + 28
    defects = rec.get("defects") or []
    found = f"defects found {sum(d['detected'] for d in defects)}/{len(defects)}" if gt is not None else "no mask"
    _text(row, f"{rec['file_name']}  {found}", (x, y), 0.45)
    x += _text_w(f"{rec['file_name']}  defects found 00/00", 0.45) + 20
    for name, c in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        if c > 0 and x + 30 + _text_w(name) < row.shape[1]:
            cv2.rectangle(row, (x, y - 12), (x + 14, y + 2), class_colour(c), -1)
            _text(row, name, (x + 20, y), 0.45)
            x += 40 + _text_w(name)
    return row


def example_grid(
    data_path: Path,
    samples: list[tuple[str, int, int, float]],
    total: int,
    kind: str,
    idx_to_class: dict[int, str],
    cols: int,
    decoding: Decoding | None = None,
) -> np.ndarray:
    """A titled grid of patch tiles, ``cols`` per row, each captioned ``true->predicted`` and its probability;
    ``samples``: ``(sample, real_label, pred_label, probability)`` rows of one predicted class, ``total`` of them
    in the split."""
    c = samples[0][2]
    tiles = [
        _tile(data_path, s, [f"{idx_to_class.get(t, t)}->{idx_to_class[p]}", f"p={pr:.2f}"], decoding=decoding)
        for s, t, p, pr in samples
    ]
    th, tw = tiles[0].shape[:2]
    n_rows = -(-len(tiles) // cols)
    img = np.full((36 + n_rows * th, max(cols * tw, 420), 3), 255, np.uint8)
    _text(img, f"{kind}: predicted {idx_to_class[c]} ({len(tiles)} of {total})", (6, 24), 0.55, BLACK, 2)
    for t, tile in enumerate(tiles):
        y, x = 36 + (t // cols) * th, (t % cols) * tw
        img[y : y + th, x : x + tw] = tile
    return img
