"""A real deployment bundle for the Predictor and service tests, built with the train stages' own functions (no
Prefect): demo images, 64 px patches, ImageNet MobileNetV2 at 64 px, one feature pass, the configured classifier.
And the training path's probabilities (the torch backbone module as the feature stage builds it) to compare with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def demo_bundle(
    root: Path, classifier: str | None = "sklearn.linear_model.LogisticRegression", **sections: Any
) -> Path:
    """Train and export a bundle under ``root`` (``root/deployment_model``); ``root/raw/images`` holds its images.

    The class ``stain`` is skipped in training, so the classifier knows 3 of the 4 classes of ``model.json``.
    ``classifier`` None: the default recipe's model (StandardScaler + class-balanced LogisticRegression)."""
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset
    from tasks.features.params import backbone_digest
    from tasks.features.store import extract_train_pass
    from tasks.model.bundle import export_bundle
    from tasks.model.config import TrainFlowConfig
    from tasks.model.fit import fit_classifier

    d = make_demo_dataset(root / "raw", n_images=6, size=(96, 128), seed=3)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask")
    data = root / "patches"
    generate_patch_dataset(
        assoc, d["class_to_idx"], val_size=0.3, test_size=0.0, patch_size=[64, 64], output_folder=str(data)
    )
    cfg = {
        "datamodule": {"data_path": str(data), "class_to_skip_training": ["stain"]},
        "transforms": {"input_height": 64, "input_width": 64},
        "trainer": {"iteration_over_training": 1},
        "export": {"types": ["torchscript", "pytorch"]},
        "backbone": {"weights": "imagenet"},
        **({"model": {"classifier": classifier}} if classifier else {}),
        "task": {"runtime": "torch"},
        "core": {"runs_folder": str(root / "runs")},
        "storage_root": str(root / "store"),
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    config = TrainFlowConfig.model_validate(cfg)
    wdig = backbone_digest(config)
    extract_train_pass(config, 0, root / "pass0.zarr", wdig)
    fit_classifier(config, [str(root / "pass0.zarr")], root / "classifier.skops")
    return export_bundle(config, root / "classifier.skops", root / "deployment_model", wdig)


def training_probabilities(bundle: Path, patches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(features, (N, C) probabilities) of raw BGR patches by the training path: the torch backbone module built
    from ``model.json``'s backbone, feature layers and pooling (as the feature stage builds it), then the bundle's
    classifier."""
    from storage.bundle import open_bundle
    from tasks.evaluation.inferer import full_probabilities
    from tasks.features.extractor import FeatureExtractor, build_backbone

    b = open_bundle(bundle)
    module = build_backbone(b.meta["backbone"], "imagenet", b.meta["feature_layers"], b.meta["pooling"])
    feats = FeatureExtractor(module, "cpu").extract(patches, b.input_size, b.meta["mean"], b.meta["std"])
    est = b.load_classifier()
    return feats, full_probabilities(est.predict_proba(feats), est.classes_, max(b.classes.values()) + 1)
