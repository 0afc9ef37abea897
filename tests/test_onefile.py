"""The one-file model (issue 15, part 2) on a real bundle whose classifier is the default recipe's Pipeline
(StandardScaler + LogisticRegression, class_weight balanced), with average+max pooled multiscale features and a
``model.pth`` export only: the graph is rebuilt from ``model.pth`` + ``model_config.yaml`` and must give the
training path's probabilities; a classifier skl2onnx cannot convert leaves the two-part path, with one warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage.bundle import FULL_MODEL_FILE, BundleError, open_bundle
from tests._bundles import demo_bundle, training_probabilities


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the default recipe's classifier (model section left unset)
    root = tmp_path_factory.mktemp("onefile")
    return demo_bundle(root, classifier=None, backbone={"pooling": "avg+max"}, export={"types": ["pytorch"]})


@pytest.fixture(scope="module")
def images(bundle: Path) -> list[Path]:
    return sorted((bundle.parent / "raw" / "images").glob("*.png"))


def test_pipeline_bundle_one_file_model_gives_the_training_probabilities(bundle: Path, images) -> None:
    from tasks import Predictor
    from tasks.evaluation.inferer import split_image

    meta = json.loads((bundle / "model.json").read_text())
    assert (meta["feature_layers"], meta["pooling"], meta["feature_dim"]) == (
        ["stride8", "stride16", "final"],
        "avg+max",
        2 * (32 + 96 + 1280),  # every layer average- and max-pooled
    )
    assert meta["full_model"]["file"] == FULL_MODEL_FILE and not (bundle / "model.onnx").exists()
    full, two = Predictor.load(bundle), Predictor.load(bundle, runtime="two-part")
    assert type(full.model).__name__ == "FullModel"
    steps = [type(step).__name__ for _, step in two.model.classifier.steps]  # the default recipe
    assert steps == ["StandardScaler", "LogisticRegression"], steps
    assert two.model.classifier.steps[-1][1].class_weight == "balanced"
    worst = {"two-part": 0.0, "training": 0.0}
    for path in images:
        a, b = full.predict(path), two.predict(path)
        np.testing.assert_array_equal(a.class_map, b.class_map)
        img = cv2.imread(str(path))
        feats, trained = training_probabilities(bundle, split_image(img, full.bundle.grid_spec.grid(*img.shape[:2])))
        assert feats.shape[1] == meta["feature_dim"]
        np.testing.assert_array_equal(a.patch_probabilities.argmax(axis=1), trained.argmax(axis=1))
        for key, other in (("two-part", b.patch_probabilities), ("training", trained)):
            worst[key] = max(worst[key], float(np.abs(a.patch_probabilities - other).max()))
    assert max(worst.values()) <= 1e-4, worst


def test_one_file_model_runs_alone_on_raw_uint8_patches(bundle: Path, images) -> None:
    import onnxruntime as ort

    meta = json.loads((bundle / "model.json").read_text())
    assert meta["full_model"]["input"]["shape"] == [-1, 64, 64, 3]
    assert FULL_MODEL_FILE in json.loads((bundle / "_manifest.json").read_text())["files"]
    session = ort.InferenceSession(str(bundle / FULL_MODEL_FILE), providers=["CPUExecutionProvider"])
    img = cv2.imread(str(images[0]))
    patches = np.stack([img[:64, :64], img[:64, 64:128], img[32:96, :64]])  # BGR uint8 NHWC at the input size
    got = session.run(["probabilities"], {"images": patches})[0]
    _, want = training_probabilities(bundle, list(patches))
    assert got.shape == (3, 4) and np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert float(np.abs(got - want).max()) <= 1e-4
    assert not got[:, open_bundle(bundle).classes["stain"]].any()  # skipped in training: 0


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


def test_pipeline_classifier_converts_with_absent_classes_zero(bundle, images) -> None:
    import onnxruntime as ort
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tasks.evaluation.inferer import BundleModel, full_probabilities, split_image
    from tasks.model.onefile import backbone_graph, full_model

    opened = open_bundle(bundle)
    two = BundleModel.load(opened)
    patches = [p for path in images for p in split_image(cv2.imread(str(path)), opened.grid_spec.grid(96, 128))]
    feats = two.features(patches)
    labels = np.array([0, 2])[np.arange(len(feats)) % 2]  # classes 1 and 3 absent
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(feats, labels)
    model = full_model(backbone_graph(bundle, "mobilenet_v2", (64, 64)), pipe, opened.meta)  # from model.pth
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
