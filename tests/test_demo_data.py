"""Tests for tasks.demo_data: determinism, mask/image agreement, defect shapes, folder safety, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.demo_data import DEMO_CLASSES, MANIFEST, make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(res: dict) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    out = []
    for p in sorted(Path(res["images"]).glob("*.png")):
        m = Path(res["masks"]) / f"{p.stem}_mask.png"
        out.append(
            (
                p.stem,
                cv2.imread(str(p), cv2.IMREAD_UNCHANGED),
                cv2.imread(str(m), cv2.IMREAD_UNCHANGED) if m.exists() else None,
            )
        )
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    res = make_demo_dataset(tmp_path_factory.mktemp("demo") / "data")
    return res, _load(res)


def test_layout_and_return_value(demo: tuple[dict, list]) -> None:
    res, data = demo
    root = Path(res["images"]).parent
    assert res["n_images"] == 24 and len(data) == 24
    assert [d[0] for d in data] == [f"part_{i:03d}" for i in range(24)]
    assert json.loads((root / "class_to_idx.json").read_text()) == DEMO_CLASSES == res["class_to_idx"]
    for _, img, mask in data:
        assert img.shape == (192, 256, 3) and img.dtype == np.uint8
        assert mask.shape == (192, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}
    assert img.std() > 3  # textured, not flat
    assert len({int(img.mean()) for _, img, _ in data}) > 5  # brightness varies per image


def test_deterministic_and_rewrite(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_demo_dataset(a, n_images=8, seed=3)
    make_demo_dataset(b, n_images=8, seed=3)
    assert _files(a) == _files(b)
    make_demo_dataset(a, n_images=8, seed=3)  # rewriting its own dataset is allowed and identical
    assert _files(a) == _files(b)
    make_demo_dataset(b, n_images=8, seed=4)
    assert _files(a) != _files(b)
    make_demo_dataset(a, n_images=5, seed=3)  # smaller rerun leaves no stale files behind
    assert len(list((a / "images").iterdir())) == 5 and len(list((a / "masks").iterdir())) == 5


def test_good_fraction_and_class_presence(demo: tuple[dict, list], tmp_path: Path) -> None:
    res, data = demo
    good = [name for name, _, mask in data if not mask.any()]
    assert len(good) == round(0.35 * 24) and good == res["good_images"]
    counts = {name: sum(bool((m == idx).any()) for _, _, m in data) for name, idx in DEMO_CLASSES.items() if idx}
    assert counts == res["counts"] and min(counts.values()) >= 3
    for m in (m for _, _, m in data if m.any()):
        n_defects = sum(cv2.connectedComponents((m == c).astype(np.uint8))[0] - 1 for c in (1, 2, 3))
        assert 1 <= n_defects <= 3
    for seed in range(4):  # small datasets and two classes still hold every class >= 3 times
        r = make_demo_dataset(tmp_path / f"s{seed}", n_images=12, n_classes=2, seed=seed, good_fraction=0.5)
        masks = [m for _, _, m in _load(r)]
        assert r["class_to_idx"] == {"background": 0, "blob": 1, "scratch": 2}
        assert sum(not m.any() for m in masks) == 6
        assert set(np.unique(np.stack(masks)).tolist()) <= {0, 1, 2}
        assert min(r["counts"].values()) >= 3 and set(r["counts"]) == {"blob", "scratch"}


def test_mask_is_exactly_the_drawn_region(demo: tuple[dict, list]) -> None:
    _, data = demo
    inside: dict[int, list[float]] = {1: [], 2: [], 3: []}
    spill: list[float] = []
    k = lambda r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))  # noqa: E731
    for _, img, mask in data:
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
        free = cv2.dilate((mask > 0).astype(np.uint8), k(1)) == 0
        for c in (1, 2, 3):
            n, lab = cv2.connectedComponents((mask == c).astype(np.uint8))
            for j in range(1, n):
                comp = (lab == j).astype(np.uint8)
                near = (cv2.dilate(comp, k(2)) > 0) & free  # 2 px rim just outside the mask
                far = (cv2.dilate(comp, k(7)) > 0) & ~(cv2.dilate(comp, k(3)) > 0) & free
                inside[c].append(abs(gray[comp > 0].mean() - gray[far].mean()))
                spill.append(abs(gray[near].mean() - gray[far].mean()))
    for c, diffs in inside.items():  # each defect class is clearly visible
        assert len(diffs) >= 3 and np.median(diffs) > (12 if c == 3 else 20), (c, diffs)
        assert min(diffs) > 6, (c, diffs)
    assert np.median(spill) < 3 and max(spill) < 8  # nothing drawn outside the mask


def test_scratches_thin_and_long_blobs_with_holes(demo: tuple[dict, list]) -> None:
    _, data = demo
    widths, diags, holes = [], [], 0
    for _, _, mask in data:
        n, lab, stats, _ = cv2.connectedComponentsWithStats((mask == 2).astype(np.uint8), connectivity=8)
        for j in range(1, n):
            comp = np.pad((lab == j).astype(np.uint8), 1)
            widths.append(cv2.distanceTransform(comp, cv2.DIST_L2, 5).max())
            diags.append(np.hypot(stats[j, cv2.CC_STAT_WIDTH], stats[j, cv2.CC_STAT_HEIGHT]))
        if (mask == 1).any():
            _, hier = cv2.findContours((mask == 1).astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            holes += int((hier[0][:, 3] != -1).sum())
    assert len(widths) >= 3
    assert max(widths) <= 2.5  # 1-3 px lines: centre at most ~2 px from the edge (2.2 on diagonals)
    assert np.mean(np.array(diags) >= 60) >= 0.8
    assert holes >= 1


def test_missing_masks(tmp_path: Path) -> None:
    r = make_demo_dataset(tmp_path / "d", n_images=12, missing_mask_fraction=0.25)
    present = {p.name for p in Path(r["masks"]).iterdir()}
    assert len(present) == 9 and len(r["missing_masks"]) == 3
    assert not {f"{n}_mask.png" for n in r["missing_masks"]} & present
    make_demo_dataset(tmp_path / "d", n_images=12)  # rerun over its own dataset still allowed


def test_refuses_to_overwrite_user_files(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        make_demo_dataset(user, n_images=4)
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    demo = tmp_path / "demo"
    make_demo_dataset(demo, n_images=4)
    (demo / "images" / "my_photo.png").write_bytes(b"precious")
    before = _files(demo)
    with pytest.raises(ValueError, match="my_photo"):
        make_demo_dataset(demo, n_images=4)
    assert _files(demo) == before
    (demo / "images" / "my_photo.png").unlink()
    (demo / MANIFEST).unlink()  # without the manifest nothing there is known to be ours
    with pytest.raises(ValueError):
        make_demo_dataset(demo, n_images=4)
    (tmp_path / "empty").mkdir()
    make_demo_dataset(tmp_path / "empty", n_images=2)  # an existing empty folder is fine
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "empty" / "class_to_idx.json", n_images=2)  # a file, not a folder


@pytest.mark.parametrize(
    "kwargs", [{"n_classes": 4}, {"n_classes": 1}, {"n_images": 0}, {"size": (40, 40)}, {"good_fraction": 1.5}]
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "d", **kwargs)


def test_fast(tmp_path: Path) -> None:
    t = time.perf_counter()
    make_demo_dataset(tmp_path / "d")
    assert time.perf_counter() - t < 3.0  # ~0.4 s on a 2-core machine; lenient for loaded CI


@pytest.mark.slow
def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tasks.demo_data", str(out), "--n-images", "6", "--seed", "1", "--classes", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n_images"] == 6 and res["class_to_idx"] == {"background": 0, "blob": 1, "scratch": 2}
    assert _files(out) == _files(
        Path(make_demo_dataset(tmp_path / "api", n_images=6, seed=1, n_classes=2)["images"]).parent
    )
    (out / "images" / "x.txt").write_text("user")
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "refusing" in bad.stderr
