"""Evaluation report under Quadra's names: ``test_confusion_matrix.png``,
``example/{concordant,discordant}_<class>_original.png``, ``example/reconstruction_<stem>.png``; plus patchflow's
``confusion_matrix.csv`` and one self-contained ``report.html``.

Takes the scores of a split in memory (:class:`tasks.evaluation.scoring.SplitScores`: metrics, patch rows,
reconstruction results) and reads only the few images it draws (patches of the example grids; image, mask
and class map from ``maps/`` of each overlay). Figures come from :mod:`tasks.evaluation.figures`; the
output is deterministic (same inputs, same bytes).
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any

import numpy as np

from storage import layout
from tasks.evaluation.figures import class_colour, confusion_matrix_image, example_grid, overlay_image
from tasks.evaluation.scoring import SplitScores, annotated_good
from tasks.imageio import Decoding, InputDataError, dataset_decoding, encode_png

CSS = """body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;color:#222;background:#fff}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:8px;padding:10px 16px;
min-width:150px;background:#f6f8fa}.card b{display:block;font-size:24px;margin-top:4px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:6px 0}
.sw{display:inline-block;width:14px;height:14px;margin:0 4px 0 12px;vertical-align:middle;border:1px solid #555}
.muted{color:#777}"""
#: Quadra's name of the confusion matrix figure
CONFUSION_PNG = "test_confusion_matrix.png"
#: what a report writes besides report.html: removed first, so no stale figure of an earlier report remains
FIGURES = ("confusion_matrix.csv", CONFUSION_PNG, "example/*.png")


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(img, path))
    return path


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _agg_rows(groups: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [
        [k, g["defects"], g["detected"], g["detection_rate"], g["mean_coverage"], g["mean_right_class_coverage"]]
        for k, g in groups.items()
    ]


def example_grids(
    out_dir: Path,
    data_path: Path,
    results: list[tuple[str, int, int, float]],
    idx_to_class: dict[int, str],
    grid: tuple[int, int] = (3, 4),
    seed: int = 0,
    decoding: Decoding | None = None,
) -> list[Path]:
    """``example/{concordant,discordant}_<class>_original.png`` per predicted class (labelled patches only);
    their paths.

    ``results``: ``(sample, real_label, pred_label, probability)`` rows; ``decoding``: how the dataset's images
    decode (None: read from its sidecar)."""
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
            img = example_grid(data_path, [pick[i] for i in chosen], len(pick), kind, idx_to_class, cols_n, decoding)
            written.append(_png(out_dir / "example" / f"{kind}_{idx_to_class[c]}_original.png", img))
    return written


def pick_overlays(recons: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` records: images with ground-truth defects or predicted regions first, file order kept."""
    busy = [r for r in recons if r.get("defects") or r.get("prediction")]
    return (busy + [r for r in recons if not (r.get("defects") or r.get("prediction"))])[: max(0, n)]


def _cards(scores: SplitScores, summary: dict[str, Any]) -> list[str]:
    """The headline cards (their row is closed by :func:`_patch_section`)."""
    metrics, recon = scores.metrics, scores.reconstruction
    acc, bal = metrics.get("accuracy"), metrics.get("balanced_accuracy")
    alld = summary.get("all_defects") or {}
    method = recon.get("patch_reconstruction_method") or summary.get("patch_reconstruction_method")
    cards = [
        ("accuracy", _fmt(acc)),
        ("balanced accuracy", _fmt(bal)),
        ("defects detected", f"{alld['detected']}/{alld['defects']}" if alld else "-"),
        ("region precision", _fmt(summary.get("region_precision"))),
        ("method", method or "-"),
        (
            "patches evaluated",
            f"{metrics.get('n_evaluated', 0)}/{metrics.get('n_patches', len(scores.rows))}"
            + (f" ({metrics['n_discarded']} #DISCARD# left out)" if metrics.get("n_discarded") else ""),
        ),
    ]
    return [
        '<div class="cards">',
        *(f'<div class="card">{html.escape(k)}<b>{html.escape(str(v))}</b></div>' for k, v in cards),
    ]


def _patch_section(out_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """Per-class table and confusion matrix (CSV + PNG) of the labelled patches."""
    parts = ["</div><h2>Patch classification</h2>"]  # closes the row of cards
    cm = metrics.get("confusion_matrix")
    if not (cm and cm.get("labels")):
        return parts + ['<p class="muted">No labelled patch: no accuracy, per-class table or confusion matrix.</p>']
    per = metrics.get("per_class") or {}
    parts.append(
        _table(
            ["class", "precision", "recall", "F1", "support"],
            [[k, v["precision"], v["recall"], v["f1"], v["support"]] for k, v in per.items()],
        )
    )
    with (out_dir / "confusion_matrix.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["true\\pred", *cm["labels"]])
        w.writerows([name, *row] for name, row in zip(cm["labels"], cm["matrix"]))
    ttl = (
        f"Confusion matrix - accuracy {_fmt(metrics.get('accuracy'))}, balanced "
        f"{_fmt(metrics.get('balanced_accuracy'))}, n={metrics.get('n_evaluated')}"
    )
    png = _png(out_dir / CONFUSION_PNG, confusion_matrix_image(cm["labels"], cm["matrix"], ttl))
    return [*parts, _img_tag(png, "confusion matrix")]


def _reconstruction_section(summary: dict[str, Any]) -> list[str]:
    """Detection by class and size, all defects, pixel scores."""
    if not summary:
        return ["<h2>Reconstruction</h2>", '<p class="muted">No reconstruction results.</p>']
    parts = [
        "<h2>Reconstruction</h2>",
        (
            f"<p>Coverage threshold {_fmt(summary.get('coverage_threshold'), 2)}; predicted regions "
            f"{summary.get('predicted_regions', '-')}, false regions {summary.get('false_regions', '-')}.</p>"
        ),
    ]
    head = ["", "defects", "detected", "detection rate", "mean coverage", "mean right-class coverage"]
    for name, key in (("By class", "by_class"), ("By size", "by_size")):
        if summary.get(key):
            parts.append(
                f"<h3>{name}</h3>"
                + _table(["class" if key == "by_class" else "size", *head[1:]], _agg_rows(summary[key]))
            )
    if (summary.get("all_defects") or {}).get("defects"):
        parts.append(_table(["all defects", *head[1:]], _agg_rows({"all": summary["all_defects"]})))
    if summary.get("pixel"):
        parts.append(
            "<h3>Pixel scores</h3>"
            + _table(["class", "IoU", "Dice"], [[k, v.get("iou"), v.get("dice")] for k, v in summary["pixel"].items()])
        )
    return parts


def _overlay_section(
    out_dir: Path,
    data_path: Path,
    class_to_idx: dict[str, int],
    recons: list[dict[str, Any]],
    n_overlays: int,
    decoding: Decoding,
) -> list[str]:
    """The overlays of up to ``n_overlays`` images (``example/reconstruction_<stem>.png``) with a colour legend."""
    chosen = pick_overlays(recons, n_overlays)
    if not chosen:
        return []
    good = annotated_good(layout.read_info(data_path), class_to_idx)
    legend = "".join(
        f'<span class="sw" style="background:#{r:02x}{g:02x}{b:02x}"></span>{html.escape(n)}'
        for n, c in sorted(class_to_idx.items(), key=lambda kv: kv[1])
        if c > 0
        for r, g, b in [class_colour(c)[::-1]]
    )
    parts = [f"<h3>Overlays ({len(chosen)} of {len(recons)} images)</h3><p>{legend}</p>"]
    for rec in chosen:
        try:
            png = _png(
                out_dir / "example" / f"reconstruction_{Path(rec['file_name']).stem}.png",
                overlay_image(rec, data_path, out_dir / "maps", class_to_idx, good, decoding),
            )
            parts.append(_img_tag(png, rec["file_name"]))
        except InputDataError as exc:
            parts.append(f'<p class="muted">{html.escape(rec["file_name"])}: {html.escape(str(exc))}</p>')
    return parts


def write_report(
    out_dir: Path,
    data_path: Path,
    class_to_idx: dict[str, int],
    scores: SplitScores,
    title: str = "patchflow evaluation",
    n_overlays: int = 6,
    examples: bool = True,
    grid: tuple[int, int] = (3, 4),
    seed: int = 0,
) -> Path:
    """Write the confusion matrix, example grids, overlays and ``report.html`` of ``scores`` into ``out_dir`` (which
    holds the class maps, ``maps/<stem>.png``); returns the HTML path."""
    out_dir, data_path = Path(out_dir), Path(data_path)
    decoding = dataset_decoding(data_path)  # 16-bit images shown as the dataset stage decoded them
    for pattern in FIGURES:
        for old in sorted(out_dir.glob(pattern)):
            old.unlink()
    summary = scores.reconstruction.get("summary") or scores.metrics.get("reconstruction") or {}
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *_cards(scores, summary),
        *_patch_section(out_dir, scores.metrics),
        *_reconstruction_section(summary),
        *_overlay_section(
            out_dir, data_path, class_to_idx, scores.reconstruction.get("reconstructions") or [], n_overlays, decoding
        ),
    ]
    if examples:
        idx_to_class = {v: k for k, v in class_to_idx.items()}
        grids = example_grids(out_dir, data_path, scores.rows, idx_to_class, grid, seed, decoding)
        parts += [
            "<h2>Examples</h2>",
            *([_img_tag(p, p.stem) for p in grids] or ['<p class="muted">No labelled patch to show.</p>']),
        ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    out = out_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
