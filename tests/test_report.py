"""Evaluation report on a real evaluation folder: figures, self-contained HTML, determinism, Chromium render."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.evaluation.report import write_report
from tasks.evaluation.scoring import SplitScores, split_scores

CHROMIUM = Path("/usr/bin/chromium")
GENERATED = ("report.html", "confusion_matrix.csv", "test_confusion_matrix.png", "example")


def _write_eval(
    out: Path,
    data: Path,
    split: str,
    ids: list[str],
    y_eval: np.ndarray,
    pred: np.ndarray,
    proba: np.ndarray,
    classes: dict[str, int],
) -> SplitScores:
    """What tasks.evaluation.scoring.score_split writes and returns, from given predictions instead of a classifier."""
    nc = max(classes.values()) + 1
    return split_scores(data, split, ids, y_eval, pred, proba, list(range(nc)), classes, "major_voting", 0.3, out)


def _dataset(root: Path, **kw) -> tuple[Path, dict[str, int], list[Path]]:
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset

    d = make_demo_dataset(root / "raw", size=(128, 160), **kw)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask", warning_on_missing_mask=False)
    data = root / "ds"
    generate_patch_dataset(
        assoc,
        d["class_to_idx"],
        val_size=1.0,
        patch_size=[32, 32],
        overlap=0.5,
        output_folder=str(data),
        area_threshold=0.05,
    )
    return data, d["class_to_idx"], sorted(p for p in data.rglob("*.png") if p.parent.parent.name in ("val", "test"))


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> tuple[Path, Path, dict[str, int], SplitScores]:
    """A val evaluation folder: folder labels as predictions with deliberate mistakes and a few skipped (-1) patches."""
    root = tmp_path_factory.mktemp("report")
    data, classes, files = _dataset(root, n_images=6, seed=1)
    ids = [p.relative_to(data).as_posix() for p in files]
    labels = np.array([classes[p.parent.name] for p in files])
    pred = labels.copy()
    defect = np.flatnonzero(labels > 0)
    pred[defect[::4]] = 0  # missed defects
    pred[np.flatnonzero(labels == 0)[::20]] = 2  # false alarms
    y_eval = labels.copy()
    y_eval[::37] = -1  # skipped class / unknown label
    nc = max(classes.values()) + 1
    conf = 0.5 + 0.45 * ((np.arange(len(ids)) * 37) % 100) / 100
    proba = np.tile(((1 - conf) / (nc - 1))[:, None], (1, nc))
    proba[np.arange(len(ids)), pred] = conf
    out = root / "validation"
    scores = _write_eval(out, data, "val", ids, y_eval, pred, proba.astype(np.float32), classes)
    return out, data, classes, scores


def _fresh(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _generated(out: Path) -> dict[str, bytes]:
    files = [out / n for n in GENERATED[:3]] + sorted((out / "example").glob("*"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files if p.is_file()}


def test_report_figures_and_self_contained_html(evaluation, tmp_path: Path) -> None:
    src, data, classes, scores = evaluation
    out = _fresh(src, tmp_path / "v")
    page = write_report(out, data, classes, scores, title="demo <val>", n_overlays=4)
    assert page == out / "report.html"
    metrics = json.loads((out / "metrics.json").read_text())
    recon = json.loads((out / "reconstruction_results.json").read_text())
    cm_csv = (out / "confusion_matrix.csv").read_text().splitlines()
    assert cm_csv[0] == "true\\pred," + ",".join(metrics["confusion_matrix"]["labels"])
    assert [list(map(int, r.split(",")[1:])) for r in cm_csv[1:]] == metrics["confusion_matrix"]["matrix"]
    cm = cv2.imread(str(out / "test_confusion_matrix.png"))
    assert cm.ndim == 3 and cm.shape[0] > 300 and cm.shape[1] > 300
    overlays = sorted((out / "example").glob("reconstruction_*.png"))
    assert len(overlays) == 4  # all the chosen ones, not the first few
    busy = {Path(r["file_name"]).stem for r in recon["reconstructions"] if r.get("defects") or r.get("prediction")}
    assert {p.stem.removeprefix("reconstruction_") for p in overlays} <= busy or len(busy) < 4
    for p in overlays:
        img = cv2.imread(str(p))
        assert img.shape[1] >= 3 * 160 and img.shape[0] > 128 and img.std() > 10
    grids = sorted((out / "example").glob("*cordant_*.png"))
    names = {p.name for p in grids}
    want = {
        "concordant_background_original.png",
        "discordant_background_original.png",
        "discordant_scratch_original.png",
    }
    assert want <= names
    assert all(re.fullmatch(r"(con|dis)cordant_(background|blob|scratch|stain)_original\.png", n) for n in names)
    for p in grids:
        img = cv2.imread(str(p))
        assert img.shape[0] >= 36 + 128 and img.shape[1] >= 420  # title + at least one tile row
        assert img.shape[0] <= 36 + 3 * 168  # at most 3 rows of tiles
    html = page.read_text()
    for text in (
        "demo &lt;val&gt;",
        "accuracy",
        "balanced accuracy",
        "defects detected",
        "region precision",
        "major_voting",
        "precision",
        "recall",
        "F1",
        "By class",
        "By size",
        "Pixel scores",
        "IoU",
        "Dice",
        f"{metrics['accuracy']:.3f}",
        "<table",
    ):
        assert text in html, text
    for name in metrics["per_class"]:
        assert f"<td>{name}</td>" in html
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == 1 + len(overlays) + len(grids)
    assert base64.b64decode(uris[0]) == (out / "test_confusion_matrix.png").read_bytes()
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html).lower()  # base64 may spell anything
    assert "http" not in rest and "<script" not in rest and "<link" not in rest and "url(" not in rest
    assert len(re.findall(r'(?:src|href)="', rest)) == len(uris)


def test_report_is_deterministic(evaluation, tmp_path: Path) -> None:
    src, data, classes, scores = evaluation
    a, b = _fresh(src, tmp_path / "a"), _fresh(src, tmp_path / "b")
    write_report(a, data, classes, scores)
    first = _generated(a)
    write_report(a, data, classes, scores)
    write_report(b, data, classes, scores)
    assert _generated(a) == first == _generated(b)
    assert str(tmp_path) not in first["report.html"].decode()
    write_report(a, data, classes, scores, seed=1)  # another choice of examples
    assert _generated(a)["report.html"] != first["report.html"]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(evaluation, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} missing: CI must install it (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} not installed")
    src, data, classes, scores = evaluation
    out = _fresh(src, tmp_path / "v")
    page = write_report(out, data, classes, scores)
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,2000",
        f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert shot.is_file(), (proc.returncode, proc.stderr[-2000:])
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (2000, 1400)
    assert img.std() > 20
    assert np.mean(img.min(axis=2) < 240) > 0.01  # more than 1 % non-white pixels
    assert np.mean(img[:, 1000:].min(axis=2) < 240) > 0.005  # wide figures reach the right-hand side


def test_report_without_labels_masks_or_patches(tmp_path: Path) -> None:
    data, classes, files = _dataset(tmp_path, n_images=3, seed=2, missing_mask_fraction=1.0)  # all in val/None
    ids = [p.relative_to(data).as_posix() for p in files]
    assert ids and all(i.startswith("val/None/") for i in ids)
    nc = max(classes.values()) + 1
    pred = np.arange(len(ids)) % nc
    proba = np.eye(nc, dtype=np.float32)[pred]
    out = tmp_path / "nolabels"
    scores = _write_eval(out, data, "val", ids, np.full(len(ids), -1), pred, proba, classes)
    html = write_report(out, data, classes, scores).read_text()
    assert not (out / "test_confusion_matrix.png").exists() and not (out / "confusion_matrix.csv").exists()
    assert not list((out / "example").glob("*cordant_*.png"))
    assert len(list((out / "example").glob("reconstruction_*.png"))) == 3
    assert "No labelled patch" in html and html.count("data:image/png;base64,") == 3

    empty = tmp_path / "empty"  # test split of that dataset holds no image
    scores = _write_eval(
        empty, data, "test", [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, nc), np.float32), classes
    )
    html = write_report(empty, data, classes, scores).read_text()
    assert "No labelled patch" in html and "data:image" not in html
    bare = tmp_path / "bare"  # nothing at all
    bare.mkdir()
    assert "No reconstruction results" in write_report(bare, data, classes, SplitScores()).read_text()
