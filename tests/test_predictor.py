"""The in-process Predictor and the one-file model (issue 15, parts 1 and 2), on a real bundle: ImageNet
MobileNetV2 features, a fitted classifier, the one-file ONNX graph run by ONNX Runtime."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.imageio import UnsupportedPixelsError
from tests._bundles import demo_bundle, training_probabilities

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_bundle(tmp_path_factory.mktemp("predictor"))


@pytest.fixture(scope="module")
def images(bundle: Path) -> list[Path]:
    return sorted((bundle.parent / "raw" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def predictor(bundle: Path):
    from tasks import Predictor

    return Predictor.load(bundle)


def test_default_runtime_is_the_one_file_model_and_matches_two_part_and_training(predictor, bundle, images) -> None:
    from tasks import Predictor
    from tasks.evaluation.inferer import split_image

    meta = predictor.bundle.meta  # the default feature vector: multiscale, average-pooled
    assert (meta["feature_layers"], meta["pooling"], meta["feature_dim"]) == (
        ["stride8", "stride16", "final"],
        "avg",
        1408,
    )
    two = Predictor.load(bundle, runtime="two-part")
    assert predictor.runtime == "full-onnx" and two.runtime == "two-part"
    assert type(two.model.extractor.model).__name__ == "RecursiveScriptModule"  # model.pt run by torch
    worst = {"two-part": 0.0, "training": 0.0}
    for path in images:
        a, b = predictor.predict(path, probabilities=True), two.predict(path, probabilities=True)
        np.testing.assert_array_equal(a.class_map, b.class_map)
        worst["two-part"] = max(worst["two-part"], float(np.abs(a.patch_probabilities - b.patch_probabilities).max()))
        assert float(np.abs(a.probabilities - b.probabilities).max()) <= 1e-4
        assert [p["label"] for p in a.polygons] == [p["label"] for p in b.polygons]
        img = cv2.imread(str(path))
        feats, trained = training_probabilities(
            bundle, split_image(img, predictor.bundle.grid_spec.grid(*img.shape[:2]))
        )
        assert feats.shape[1] == meta["feature_dim"]
        worst["training"] = max(worst["training"], float(np.abs(a.patch_probabilities - trained).max()))
        np.testing.assert_array_equal(a.patch_probabilities.argmax(axis=1), trained.argmax(axis=1))
    assert max(worst.values()) <= 1e-4, worst
    stain = predictor.classes["stain"]  # skipped in training: 0 in both paths
    assert predictor.predict(images[0]).patch_probabilities[:, stain].max() == 0.0


def test_ring_of_defect_patches_is_one_polygon_with_a_hole_and_eight_supporting_patches(predictor, images) -> None:
    from tasks.evaluation.inferer import split_image

    good, defect = None, None  # real patches the model calls good / a defect class
    for path in images:
        img = cv2.imread(str(path))
        proba = predictor.predict(img).patch_probabilities
        for patch, p in zip(split_image(img, predictor.bundle.grid_spec.grid(*img.shape[:2])), proba):
            if p.argmax() == 0 and good is None:
                good = patch
            if p.argmax() > 0 and defect is None:
                defect = (patch, int(p.argmax()), float(p.max()))
    assert good is not None and defect is not None
    patch, cls, prob = defect
    image = np.vstack([np.hstack(row) for row in ([patch] * 3, [patch, good, patch], [patch] * 3)])  # 3x3 patches
    assert predictor.bundle.grid_spec.grid(192, 192).num_patches == 9
    r = predictor.predict(image)
    name = next(n for n, i in predictor.classes.items() if i == cls)
    (ring,) = r.polygons
    assert ring["label"] == name and ring["area"] == 192 * 192 - 64 * 64
    assert ring["supporting_patches"] == 8
    assert ring["mean_probability"] == pytest.approx(prob, abs=1e-5) == ring["max_probability"]
    assert {pt["x"] for pt in ring["points"]} == {0, 192}
    (hole,) = ring["holes"]
    assert {pt["x"] for pt in hole} == {64, 128} and {pt["y"] for pt in hole} == {64, 128}
    c = r.summary["classes"][name]
    assert (c["regions"], c["pixels"]) == (1, 192 * 192 - 64 * 64)
    assert r.summary["classes"][next(n for n, i in predictor.classes.items() if i == 0)]["pixels"] == 64 * 64
    assert r.summary["defect_regions"] == 1 and r.summary["defect_classes"] == [name]


def test_image_inputs_path_bgr_gray_16bit_and_bgra(predictor, images, tmp_path: Path) -> None:
    ref = predictor.predict(images[0])
    bgr = cv2.imread(str(images[0]))
    for same in (bgr, images[0].read_bytes(), str(images[0]), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)):
        r = predictor.predict(same)
        np.testing.assert_array_equal(r.class_map, ref.class_map)
        np.testing.assert_array_equal(r.patch_probabilities, ref.patch_probabilities)
    wide = bgr.astype(np.uint16) << 8  # 16-bit by the bundle's rule ("auto": 16 bits here -> >> 8)
    assert json.loads((predictor.bundle.root / "model.json").read_text())["sixteen_bit"] == "auto"
    np.testing.assert_array_equal(predictor.predict(wide).patch_probabilities, ref.patch_probabilities)
    buf = io.BytesIO()
    np.save(buf, wide)  # a raw frame's .npy bytes (the service takes them too)
    np.testing.assert_array_equal(predictor.predict(buf.getvalue()).patch_probabilities, ref.patch_probabilities)
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    np.testing.assert_array_equal(predictor.predict(tmp_path / "wide.png").class_map, ref.class_map)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    from_gray = predictor.predict(gray)
    np.testing.assert_array_equal(
        from_gray.patch_probabilities, predictor.predict(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)).patch_probabilities
    )
    assert from_gray.class_map.shape == gray.shape
    with pytest.raises(UnsupportedPixelsError, match="channels"):
        predictor.predict(np.zeros((40, 40, 2), np.uint8))
    with pytest.raises(UnsupportedPixelsError, match="float32 pixels are not supported"):
        predictor.predict(np.zeros((40, 40, 3), np.float32))


def test_batch_equals_singles(predictor, images) -> None:
    bgr = cv2.imread(str(images[1]))
    batch = [images[0], bgr[:70, :90], images[2], np.ascontiguousarray(bgr[::-1])]  # two sizes, several grids
    together = predictor.predict_batch(batch)
    assert len(together) == len(batch)
    for item, got in zip(batch, together):
        alone = predictor.predict(item)
        np.testing.assert_array_equal(got.class_map, alone.class_map)
        np.testing.assert_allclose(got.patch_probabilities, alone.patch_probabilities, atol=1e-6)
        assert got.summary["classes"].keys() == alone.summary["classes"].keys()
        assert [p["points"] for p in got.polygons] == [p["points"] for p in alone.polygons]
    assert together[1].class_map.shape == (70, 90)


def test_probabilities_option_and_summary(predictor, images) -> None:
    plain = predictor.predict(images[0])
    assert plain.probabilities is None
    r = predictor.predict(images[0], probabilities=True)
    h, w = r.class_map.shape
    assert r.probabilities.shape == (4, h, w) and r.probabilities.dtype.kind == "f"
    np.testing.assert_allclose(r.probabilities.sum(axis=0), 1.0, atol=1e-5)
    s = r.summary
    assert (s["height"], s["width"], s["patches"]) == (h, w, len(r.patch_probabilities))
    assert sum(c["pixels"] for c in s["classes"].values()) == h * w
    assert sum(c["regions"] for c in s["classes"].values()) == s["defect_regions"] == len(r.polygons)
    for name, c in s["classes"].items():
        assert c["index"] == predictor.classes[name]
        assert c["pixels"] == int((r.class_map == c["index"]).sum())
        assert c["max_probability"] == pytest.approx(float(r.patch_probabilities[:, c["index"]].max()), abs=1e-6)
    assert s["defect_pixels"] == int((r.class_map > 0).sum())
    for poly in r.polygons:
        assert {"label", "points", "holes", "area", "mean_probability", "max_probability", "supporting_patches"} <= set(
            poly
        )
    json.dumps(r.to_json())  # plain JSON types


def test_default_load_imports_no_torch_sklearn_skops_or_prefect(bundle, images) -> None:
    code = (
        "import sys; from tasks import Predictor; "
        f"p = Predictor.load({str(bundle)!r}); r = p.predict({str(images[0])!r}); "
        "print(p.runtime, sorted(m for m in ('torch', 'torchvision', 'sklearn', 'skops', 'prefect', 'joblib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "full-onnx []"


def test_device_is_checked_before_loading_never_a_cpu_fallback(bundle) -> None:
    """A CUDA device this machine lacks is one line naming ``device``; a misspelt device too; cpu loads."""
    import torch

    from tasks import Predictor
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match=r"device='gpu' is not a device"):
        Predictor.load(bundle, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda:3: no CUDA device is available on this machine"):
            Predictor.load(bundle, device="cuda:3")
    assert Predictor.load(bundle, device="cpu").runtime == "full-onnx"
