"""Evaluation report: confusion matrix, example grids, reconstruction overlays and one self-contained HTML page.

Reads what :func:`tasks.evaluation.scoring.score_split` writes into an output folder (``metrics.json``,
``test_results.csv``, ``reconstruction_results.json``, ``maps/``) and adds ``confusion_matrix.{csv,png}``,
``example/{concordant,discordant}_<class>.png``, ``reconstruction/<stem>.png`` and ``report.html``.
Drawing uses numpy + OpenCV only; the output is deterministic (same inputs, same bytes).
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from storage import layout
from tasks.imageio import Decoding, InputDataError, dataset_decoding, decode_mask, encode_png, read_bytes, read_image

# BGR class colours shared by the report and the predict overlays; index 0 (background) is transparent and
# class k uses PALETTE[(k - 1) % len(PALETTE)].
PALETTE = [(40, 40, 230), (40, 200, 40), (230, 120, 30), (200, 40, 200), (40, 200, 220), (220, 220, 40),
           (120, 60, 200), (60, 140, 255), (180, 180, 180)]
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110)
CSS = """body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;color:#222;background:#fff}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:8px;padding:10px 16px;
min-width:150px;background:#f6f8fa}.card b{display:block;font-size:24px;margin-top:4px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:6px 0}
.sw{display:inline-block;width:14px;height:14px;margin:0 4px 0 12px;vertical-align:middle;border:1px solid #555}
.muted{color:#777}"""


def class_colour(idx: int) -> tuple[int, int, int]:
    """Fixed BGR colour of a class index (index 0 has none: callers leave background transparent)."""
    return PALETTE[(int(idx) - 1) % len(PALETTE)]


def _ascii(text: Any) -> str:
    return str(text).encode("ascii", "replace").decode()


def _text(img: np.ndarray, text: Any, org: tuple[int, int], scale: float = 0.45, colour: tuple[int, int, int] = BLACK,
          thick: int = 1) -> None:
    cv2.putText(img, _ascii(text), (int(org[0]), int(org[1])), FONT, scale, colour, thick, cv2.LINE_AA)


def _text_w(text: Any, scale: float = 0.45, thick: int = 1) -> int:
    return cv2.getTextSize(_ascii(text), FONT, scale, thick)[0][0]


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_results(path: Path) -> list[tuple[str, int, int, float]]:
    """Rows ``(sample, real_label, pred_label, probability)`` of ``test_results.csv`` ([] when absent)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(r["sample"], int(r["real_label"]), int(r["pred_label"]), float(r["probability"])) for r in csv.DictReader(f)]


def _png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(img, path))
    return path


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
    img[40:top - 10, left:left + n * cell] = np.rot90(strip, 1)
    _text(img, "true (rows) / predicted (columns)", (left, img.shape[0] - 14), 0.45, GREY)
    return img


def _tile(data_path: Path, sample: str, caption: list[str], size: int = 128,
          decoding: Decoding | None = None) -> np.ndarray:
    tile = np.full((size + 40, size + 8, 3), 255, np.uint8)
    try:
        patch = read_image(data_path / sample, decoding)
        h, w = patch.shape[:2]
        s = size / max(h, w)
        patch = cv2.resize(patch, (max(1, round(w * s)), max(1, round(h * s))),
                           interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST)
        tile[4:4 + patch.shape[0], 4:4 + patch.shape[1]] = patch
    except InputDataError:
        _text(tile, "missing", (30, size // 2), 0.5, GREY)
    for k, line in enumerate(caption):
        _text(tile, line, (4, size + 18 + 16 * k), 0.4)
    return tile


def example_grids(out_dir: Path, data_path: Path, results: list[tuple[str, int, int, float]],
                  idx_to_class: dict[int, str], grid: tuple[int, int] = (3, 4), seed: int = 0,
                  decoding: Decoding | None = None) -> list[Path]:
    """``example/{concordant,discordant}_<class>.png`` per predicted class (labelled patches only); their paths.

    ``decoding``: how the dataset's images decode (None: read from its sidecar)."""
    rows_n, cols_n = grid
    decoding = decoding or dataset_decoding(data_path)
    written = []
    for c in sorted(idx_to_class):
        for k, kind in enumerate(("concordant", "discordant")):
            pick = [r for r in results if r[1] >= 0 and r[2] == c and (r[1] == c) == (kind == "concordant")]
            if not pick:
                continue
            rng = np.random.default_rng([seed, k, c])
            chosen = sorted(rng.choice(len(pick), size=min(len(pick), rows_n * cols_n), replace=False).tolist())
            tiles = [_tile(data_path, pick[i][0], [f"{idx_to_class.get(pick[i][1], pick[i][1])}->{idx_to_class[c]}",
                                                  f"p={pick[i][3]:.2f}"], decoding=decoding) for i in chosen]
            th, tw = tiles[0].shape[:2]
            n_rows = -(-len(tiles) // cols_n)
            img = np.full((36 + n_rows * th, max(cols_n * tw, 420), 3), 255, np.uint8)
            _text(img, f"{kind}: predicted {idx_to_class[c]} ({len(tiles)} of {len(pick)})", (6, 24), 0.55, BLACK, 2)
            for t, tile in enumerate(tiles):
                y, x = 36 + (t // cols_n) * th, (t % cols_n) * tw
                img[y:y + th, x:x + tw] = tile
            written.append(_png(out_dir / "example" / f"{kind}_{idx_to_class[c]}.png", img))
    return written


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
    return p if p.is_file() else data_path / "original" / sub / Path(stored).name  # moved dataset folder


def overlay_image(rec: dict[str, Any], data_path: Path, maps_dir: Path, class_to_idx: dict[str, int],
                  good: set[int] | None = None, decoding: Decoding | None = None) -> np.ndarray:
    """One row of panels: image | ground truth over image | prediction over image with polygon outlines, plus a legend.

    ``decoding``: how the dataset's images decode (None: read from its sidecar)."""
    img = read_image(_resolve(rec["image_path"], data_path, "images"), decoding or dataset_decoding(data_path))
    h, w = img.shape[:2]
    gt = None
    mpath = _resolve(rec.get("mask_path"), data_path, "masks")
    if mpath is not None and mpath.is_file():
        gt = decode_mask(read_bytes(mpath), mpath, decoding=decoding)[0].astype(np.int32)
        if good:
            gt[np.isin(gt, list(good))] = 0
    pmap = maps_dir / f"{Path(rec['file_name']).stem}.png"
    pred = cv2.imread(str(pmap), cv2.IMREAD_UNCHANGED) if pmap.is_file() else None
    if pred is None or pred.shape[:2] != (h, w):  # no map: rasterise the polygons
        pred = np.zeros((h, w), np.uint8)
        for p in rec.get("prediction", []):
            cv2.fillPoly(pred, [_poly(p["points"], 1)], class_to_idx.get(p["label"], 1))
            for hole in p.get("holes", []):
                cv2.fillPoly(pred, [_poly(hole, 1)], 0)
    s = min(2.0 if max(h, w) < 300 else 1.0, 420 / w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    base = cv2.resize(img, size, interpolation=interp)
    panels = [base.copy()]
    if gt is not None:
        gts = cv2.resize(gt.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        g = colourise(base, gts)
        for c in sorted(int(v) for v in np.unique(gts) if v > 0):
            cs, _ = cv2.findContours((gts == c).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(g, cs, -1, class_colour(c), 1, cv2.LINE_AA)
        panels.append(g)
    else:
        g = (base // 3 + 170).astype(np.uint8)
        _text(g, "no ground-truth mask", (10, size[1] // 2), 0.55, BLACK, 2)
        panels.append(g)
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
        row[head:head + size[1], x:x + size[0]] = panel
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


def pick_overlays(recons: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` records: images with ground-truth defects or predicted regions first, file order kept."""
    busy = [r for r in recons if r.get("defects") or r.get("prediction")]
    return (busy + [r for r in recons if not (r.get("defects") or r.get("prediction"))])[: max(0, n)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _agg_rows(groups: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[k, g["defects"], g["detected"], g["detection_rate"], g["mean_coverage"], g["mean_right_class_coverage"]]
            for k, g in groups.items()]


def write_report(out_dir: Path, data_path: Path, class_to_idx: dict[str, int], title: str = "patchflow evaluation",
                 n_overlays: int = 6, examples: bool = True, grid: tuple[int, int] = (3, 4), seed: int = 0) -> Path:
    """Write the confusion matrix, example grids, overlays and ``report.html`` into ``out_dir``; returns the HTML path."""
    out_dir, data_path = Path(out_dir), Path(data_path)
    decoding = dataset_decoding(data_path)  # 16-bit images shown as the dataset stage decoded them
    idx_to_class = {v: k for k, v in class_to_idx.items()}
    metrics = _load_json(out_dir / "metrics.json")
    recon = _load_json(out_dir / "reconstruction_results.json")
    results = read_results(out_dir / "test_results.csv")
    for sub, pattern in (("example", "*.png"), ("reconstruction", "*.png")):  # no stale figures from an earlier report
        for old in sorted((out_dir / sub).glob(pattern)):
            old.unlink()
    for old in ("confusion_matrix.csv", "confusion_matrix.png"):
        (out_dir / old).unlink(missing_ok=True)
    summary = recon.get("summary") or metrics.get("reconstruction") or {}
    acc, bal = metrics.get("accuracy"), metrics.get("balanced_accuracy")
    alld = summary.get("all_defects") or {}
    method = recon.get("patch_reconstruction_method") or summary.get("patch_reconstruction_method")
    cards = [("accuracy", _fmt(acc)), ("balanced accuracy", _fmt(bal)),
             ("defects detected", f"{alld['detected']}/{alld['defects']}" if alld else "-"),
             ("region precision", _fmt(summary.get("region_precision"))), ("method", method or "-"),
             ("patches evaluated", f"{metrics.get('n_evaluated', 0)}/{metrics.get('n_patches', len(results))}"
              + (f" ({metrics['n_discarded']} #DISCARD# left out)" if metrics.get("n_discarded") else ""))]
    parts = [f"<h1>{html.escape(title)}</h1>", '<div class="cards">']
    parts += [f'<div class="card">{html.escape(k)}<b>{html.escape(str(v))}</b></div>' for k, v in cards]
    parts.append("</div><h2>Patch classification</h2>")
    cm = metrics.get("confusion_matrix")
    if cm and cm.get("labels"):
        per = metrics.get("per_class") or {}
        parts.append(_table(["class", "precision", "recall", "F1", "support"],
                            [[k, v["precision"], v["recall"], v["f1"], v["support"]] for k, v in per.items()]))
        with (out_dir / "confusion_matrix.csv").open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["true\\pred", *cm["labels"]])
            w.writerows([name, *row] for name, row in zip(cm["labels"], cm["matrix"]))
        ttl = f"Confusion matrix - accuracy {_fmt(acc)}, balanced {_fmt(bal)}, n={metrics.get('n_evaluated')}"
        png = _png(out_dir / "confusion_matrix.png", confusion_matrix_image(cm["labels"], cm["matrix"], ttl))
        parts.append(_img_tag(png, "confusion matrix"))
    else:
        parts.append('<p class="muted">No labelled patch: no accuracy, per-class table or confusion matrix.</p>')
    parts.append("<h2>Reconstruction</h2>")
    if summary:
        parts.append(f"<p>Coverage threshold {_fmt(summary.get('coverage_threshold'), 2)}; predicted regions "
                     f"{summary.get('predicted_regions', '-')}, false regions {summary.get('false_regions', '-')}.</p>")
        head = ["", "defects", "detected", "detection rate", "mean coverage", "mean right-class coverage"]
        for name, key in (("By class", "by_class"), ("By size", "by_size")):
            if summary.get(key):
                parts.append(f"<h3>{name}</h3>" + _table(["class" if key == "by_class" else "size", *head[1:]],
                                                         _agg_rows(summary[key])))
        if alld.get("defects"):
            parts.append(_table(["all defects", *head[1:]], _agg_rows({"all": alld})))
        if summary.get("pixel"):
            parts.append("<h3>Pixel scores</h3>" + _table(["class", "IoU", "Dice"], [
                [k, v.get("iou"), v.get("dice")] for k, v in summary["pixel"].items()]))
    else:
        parts.append('<p class="muted">No reconstruction results.</p>')
    recons = recon.get("reconstructions") or []
    chosen = pick_overlays(recons, n_overlays)
    if chosen:
        info = _load_json(data_path / layout.INFO_FILE)
        good = {class_to_idx[n] for n in (info.get("annotated_good") or []) if n in class_to_idx}
        legend = "".join(f'<span class="sw" style="background:#{r:02x}{g:02x}{b:02x}"></span>{html.escape(n)}'
                         for n, c in sorted(class_to_idx.items(), key=lambda kv: kv[1]) if c > 0
                         for r, g, b in [class_colour(c)[::-1]])
        parts.append(f"<h3>Overlays ({len(chosen)} of {len(recons)} images)</h3><p>{legend}</p>")
        for rec in chosen:
            try:
                png = _png(out_dir / "reconstruction" / f"{Path(rec['file_name']).stem}.png",
                           overlay_image(rec, data_path, out_dir / "maps", class_to_idx, good, decoding))
                parts.append(_img_tag(png, rec["file_name"]))
            except InputDataError as exc:
                parts.append(f'<p class="muted">{html.escape(rec["file_name"])}: {html.escape(str(exc))}</p>')
    if examples:
        parts.append("<h2>Examples</h2>")
        grids = example_grids(out_dir, data_path, results, idx_to_class, grid, seed, decoding)
        parts += [_img_tag(p, p.stem) for p in grids] or ['<p class="muted">No labelled patch to show.</p>']
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    out = out_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
