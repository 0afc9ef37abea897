"""End-to-end dataset flow on a few real magnetic-tile images: caching by content, not paths or mtimes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import pytest

from storage import layout
from tests.conftest import task_states

IMAGES = ["exp0_num_461", "exp1_num_109232", "exp3_num_4764", "exp1_num_116270", "exp1_num_118871", "exp1_num_126795"]


@pytest.fixture()
def small_mtd(tmp_path: Path, mtd_dev: Path) -> Path:
    """Six real images (some with defects) copied into a private folder."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in IMAGES:
        shutil.copy2(mtd_dev / "images" / f"{stem}.jpg", tmp_path / "images")
        shutil.copy2(mtd_dev / "masks" / f"{stem}_mask.png", tmp_path / "masks")
    shutil.copy2(mtd_dev / "class_to_idx.json", tmp_path)
    return tmp_path


def _config(root: Path) -> dict:
    return {
        "data": {
            "images": str(root / "images"),
            "masks": str(root / "masks"),
            "mask_extension": "_mask",
            "class_to_idx_file": str(root / "class_to_idx.json"),
        },
        "dataset": {"output_folder": str(root / "patches"), "patch_number": [2, 2], "val_size": 0.3, "test_size": 0.2},
        "storage_root": str(root / "store"),
    }


def test_dataset_flow_caches_by_content(small_mtd: Path, prefect_harness) -> None:
    from flows.dataset import dataset_flow

    cfg = _config(small_mtd)
    state = dataset_flow(cfg, return_state=True)
    assert state.is_completed()
    out = Path(state.result())
    assert task_states(state)["generate-patch-dataset"] == "Completed"
    side = layout.read_sidecar(out)
    assert side["complete"] and side["fingerprint"]
    assert set(json.loads((out / "info.json").read_text())) == set(layout.INFO_KEYS)
    inode = out.stat().st_ino

    # unchanged inputs: no work
    state = dataset_flow(cfg, return_state=True)
    assert task_states(state)["generate-patch-dataset"] == "Cached"
    assert out.stat().st_ino == inode

    # one pixel of one image changes, path and mtime restored: noticed
    img_path = small_mtd / "images" / f"{IMAGES[1]}.jpg"
    st = img_path.stat()
    img = cv2.imread(str(img_path))
    img[5:9, 5:9] = 255 - img[5:9, 5:9]
    img_path.write_bytes(_jpeg_bytes(img))
    os.utime(img_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    state = dataset_flow(cfg, return_state=True)
    assert task_states(state)["generate-patch-dataset"] == "Completed"
    assert layout.read_sidecar(out)["fingerprint"] != side["fingerprint"]

    # outputs deleted behind the cache's back: rebuilt, never served stale
    shutil.rmtree(out)
    state = dataset_flow(cfg, return_state=True)
    assert task_states(state)["generate-patch-dataset"] == "Completed"
    assert layout.is_complete(out)


def _jpeg_bytes(img) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def test_dataset_cli_rejects_unknown_key(small_mtd: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(small_mtd)))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.dataset", "--config", str(cfg_file), "dataset.patch_nmuber=[2,2]"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'dataset.patch_nmuber'" in proc.stderr and "patch_number" in proc.stderr
