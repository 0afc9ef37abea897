"""Train-split h5 sampling files: Quadra's dataset names and dtypes, read back by plain h5py, deterministic bytes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from storage.h5files import SamplingRegion, encode_region, read_region

REGION = SamplingRegion(
    "original/images/défaut_1.png",
    (32, 40),
    np.arange(24).reshape(4, 3, 2),
    np.array([0.1, 0.2, 0.3, 0.4]),
    "original/masks/défaut_1.png",
    2,
)


def test_quadra_names_and_dtypes_read_by_plain_h5py(tmp_path: Path) -> None:
    (tmp_path / "a.h5").write_bytes(encode_region(REGION))
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert sorted(f) == ["img_path", "labelled_index", "mask_path", "patch_size", "triangles", "triangles_weights"]
        assert (
            f["img_path"][()].decode() == REGION.img_path
            and h5py.check_string_dtype(f["img_path"].dtype).encoding == "utf-8"
        )
        assert f["patch_size"].dtype == np.int64 and f["patch_size"][()].tolist() == [32, 40]
        assert f["triangles"].dtype == np.int32 and np.array_equal(f["triangles"][()], REGION.triangles)
        assert f["triangles_weights"].dtype == np.float64 and f["labelled_index"][()] == 2
    back = read_region(tmp_path / "a.h5")
    assert back.mask_path == REGION.mask_path and np.allclose(back.weights, REGION.weights)


def test_whole_image_region_has_empty_triangles(tmp_path: Path) -> None:
    (tmp_path / "g.h5").write_bytes(encode_region(SamplingRegion("i.png", (8, 8), np.zeros((0, 3, 2)), np.zeros(0))))
    with h5py.File(tmp_path / "g.h5", "r") as f:
        assert f["triangles"].shape == (0,) and "mask_path" not in f and "labelled_index" not in f
    assert read_region(tmp_path / "g.h5").triangles.shape == (0, 3, 2)


@pytest.mark.slow
def test_bytes_are_deterministic_across_time_and_processes() -> None:
    """No creation timestamps anywhere (a root-group timestamp once made rebuilt datasets differ)."""
    first = encode_region(REGION)
    time.sleep(1.1)
    assert encode_region(REGION) == first
    code = (
        "import sys, numpy as np; from storage.h5files import SamplingRegion, encode_region; "
        "r = SamplingRegion('original/images/défaut_1.png', (32, 40), np.arange(24).reshape(4, 3, 2), "
        "np.array([0.1, 0.2, 0.3, 0.4]), 'original/masks/défaut_1.png', 2); sys.stdout.buffer.write(encode_region(r))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, cwd=Path(__file__).parents[1]
    ).stdout
    assert other == first
