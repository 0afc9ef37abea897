"""The in-process Predictor and the one-file model (issue 15, parts 1 and 2), on a real bundle: ImageNet
MobileNetV2 features, a fitted classifier, the one-file ONNX graph run by ONNX Runtime."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage.bundle import FULL_MODEL_FILE, BundleError, open_bundle
from tasks.imageio import UnsupportedPixelsError
from tests._bundles import demo_bundle

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


def test_default_runtime_is_the_one_file_model_and_matches_the_two_part_path(predictor, bundle, images) -> None:
    from tasks import Predictor

    two = Predictor.load(bundle, runtime="two-part")
    assert predictor.runtime == "full-onnx" and two.runtime == "two-part"
    assert type(two.model.extractor.model).__name__ == "RecursiveScriptModule"  # model.pt run by torch
    worst = 0.0
    for path in images:
        a, b = predictor.predict(path, probabilities=True), two.predict(path, probabilities=True)
        np.testing.assert_array_equal(a.class_map, b.class_map)
        worst = max(worst, float(np.abs(a.patch_probabilities - b.patch_probabilities).max()))
        assert float(np.abs(a.probabilities - b.probabilities).max()) <= 1e-4
        assert [p["label"] for p in a.polygons] == [p["label"] for p in b.polygons]
    assert worst <= 1e-4, worst
    stain = predictor.classes["stain"]  # skipped in training: 0 in both paths
    assert predictor.predict(images[0]).patch_probabilities[:, stain].max() == 0.0


def test_one_file_model_runs_alone_on_raw_uint8_patches(bundle, predictor, images) -> None:
    import onnxruntime as ort

    meta = json.loads((bundle / "model.json").read_text())
    entry = meta["full_model"]
    assert entry["file"] == FULL_MODEL_FILE and entry["input"]["shape"] == [-1, 64, 64, 3]
    assert FULL_MODEL_FILE in json.loads((bundle / "_manifest.json").read_text())["files"]
    session = ort.InferenceSession(str(bundle / FULL_MODEL_FILE), providers=["CPUExecutionProvider"])
    img = cv2.imread(str(images[0]))
    patches = np.stack([img[:64, :64], img[:64, 64:128], img[32:96, :64]])  # BGR uint8 NHWC at the input size
    got = session.run(["probabilities"], {"images": patches})[0]
    want = predictor.model.probabilities(list(patches))
    np.testing.assert_array_equal(got, want)
    assert got.shape == (3, 4) and np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


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


def test_tampered_or_deleted_one_file_model_is_refused(bundle, tmp_path: Path) -> None:
    import shutil

    from tasks import Predictor

    b = tmp_path / "deployment_model"
    shutil.copytree(bundle, b)
    data = bytearray((b / FULL_MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / FULL_MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{FULL_MODEL_FILE} was modified after export"):
        Predictor.load(b)
    (b / FULL_MODEL_FILE).unlink()
    with pytest.raises(BundleError, match=f"{FULL_MODEL_FILE} was deleted after export"):
        open_bundle(b)


def test_pipeline_classifier_converts_with_absent_classes_zero(bundle, predictor, images) -> None:
    import onnxruntime as ort
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tasks.evaluation.inferer import BundleModel, full_probabilities, split_image
    from tasks.model.onefile import backbone_graph, full_model

    two = BundleModel.load(predictor.bundle)
    patches = [
        p for path in images for p in split_image(cv2.imread(str(path)), predictor.bundle.grid_spec.grid(96, 128))
    ]
    feats = two.features(patches)
    labels = np.array([0, 2])[np.arange(len(feats)) % 2]  # classes 1 and 3 absent
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(feats, labels)
    meta = predictor.bundle.meta
    model = full_model(backbone_graph(bundle, "mobilenet_v2", (64, 64)), pipe, meta)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"images": np.stack(patches)})[0]
    want = full_probabilities(pipe.predict_proba(feats), pipe.classes_, 4)
    assert float(np.abs(got - want).max()) <= 1e-4
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    assert not got[:, [1, 3]].any()


def test_classifier_without_onnx_form_falls_back_with_one_warning(tmp_path: Path, caplog) -> None:
    from tasks import Predictor

    with caplog.at_level(logging.WARNING, logger="patchflow"):
        b = demo_bundle(
            tmp_path,
            classifier="sklearn.semi_supervised.LabelPropagation",
            model={"params": {"kernel": "knn", "n_neighbors": 3}},
        )
    warned = [r for r in caplog.records if FULL_MODEL_FILE in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    msg = warned[0].getMessage()
    assert "LabelPropagation" in msg and "two parts" in msg and "\n" not in msg
    assert not (b / FULL_MODEL_FILE).exists()
    assert json.loads((b / "model.json").read_text())["full_model"] is None
    p = Predictor.load(b)
    assert p.runtime == "two-part"
    r = p.predict(next((tmp_path / "raw" / "images").glob("*.png")))
    assert r.class_map.shape == (96, 128)
    with pytest.raises(BundleError, match="runtime full-onnx is not available"):
        Predictor.load(b, runtime="full-onnx")
