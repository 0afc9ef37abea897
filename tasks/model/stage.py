"""Fit, validate and export stages: classifier on stored features, patch metrics, deployment bundle."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from storage import features as fstore
from storage import layout
from storage.classifier import (
    JOBLIB_FILE,
    SKOPS_FILE,
    load_classifier_file,
    reviewed_types,
    skops_bytes,
    untrusted_types,
    write_joblib,
    write_skops,
)
from storage.fingerprint import CODE_VERSION
from storage.geometry import GRID_POLICY
from storage.manifest import (
    MANIFEST_FILE,
    STAT_CACHE,
    building,
    file_matches,
    matches_manifest,
    write_file_digest,
)
from storage.writes import naming_write_errors, serialise_to
from tasks.features.export import export_onnx, export_torchscript
from tasks.features.extractor import build_backbone
from tasks.config import ConfigError, import_object
from tasks.evaluation.scoring import score_split
from tasks.features.params import backbone_digest, class_map, feature_runtime
from tasks.imageio import dataset_decoding, sixteen_bit_json
from tasks.evaluation.report import write_report
from tasks.model.config import TrainFlowConfig

logger = logging.getLogger("patchflow.model")


def make_classifier(cfg: TrainFlowConfig) -> Any:
    """Instantiate the configured scikit-learn classifier (seeded with core.seed when it takes a random_state)."""
    cls = import_object(cfg.model.classifier)
    params = dict(cfg.model.params)
    try:
        accepts = "random_state" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        params.setdefault("random_state", cfg.core.seed)
    est = cls(**params)
    if not (hasattr(est, "fit") and hasattr(est, "predict_proba")):
        raise ValueError(f"model.classifier {cfg.model.classifier} must provide fit and predict_proba")
    return est


TRAIN_FIX = ("If you trust them, list them in model.trusted_types (loading a type runs its code), "
             "or choose another model.classifier")


def trusted_types(cfg: TrainFlowConfig) -> set[str]:
    """Types the train flow accepts in its own classifier file beyond skops's defaults: the configured class
    (the config imports it anyway), ``model.trusted_types`` and scikit-learn's tree storage (holds no code)."""
    cls = import_object(cfg.model.classifier)
    return {f"{cls.__module__}.{cls.__qualname__}", *cfg.model.trusted_types} | reviewed_types()


def load_fitted(cfg: TrainFlowConfig, path: Path) -> Any:
    """The fit stage's classifier file, loaded with :func:`trusted_types` only (never unpickled)."""
    return load_classifier_file(Path(path), trusted_types(cfg), TRAIN_FIX)


def fit_classifier(cfg: TrainFlowConfig, stores: list[str], out: Path) -> dict[str, Any]:
    """Fit on the features of all training passes and save the classifier with skops (loading it cannot run code)."""
    X, y = fstore.concat_stores([Path(s) for s in stores])
    keep = y >= 0
    X, y = X[keep], y[keep]
    if len(np.unique(y)) < 2:
        raise ValueError("training features hold fewer than 2 classes; check class_to_skip_training and the dataset")
    est = make_classifier(cfg)
    est.fit(X, y)
    try:
        data = skops_bytes(est)
    except Exception as exc:  # noqa: BLE001 - skops stores scikit-learn compatible objects only
        raise ConfigError(f"model.classifier {cfg.model.classifier}: skops cannot store the fitted classifier "
                          f"({type(exc).__name__}: {str(exc)[:200]}); choose a scikit-learn compatible classifier"
                          ) from None
    refused = sorted(set(untrusted_types(data=data)) - trusted_types(cfg))
    if refused:
        raise ConfigError(f"model.classifier {cfg.model.classifier}: the fitted classifier holds types that skops "
                          f"does not trust by default: {refused}. {TRAIN_FIX}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_skops(est, out, data)
    logger.info("fitted %s on %d feature rows", type(est).__name__, len(y))
    return {"rows": int(len(y)), "classes": sorted(int(c) for c in np.unique(y))}


def validate(cfg: TrainFlowConfig, classifier_path: Path, store: Path, out_dir: Path) -> dict[str, Any]:
    """Patch metrics, reconstruction and report of the val split (metrics.json, test_results.csv, reconstruction_results.json, report.html)."""
    metrics = score_split(
        load_fitted(cfg, classifier_path), store, Path(cfg.datamodule.data_path), "val", class_map(cfg),
        cfg.datamodule.class_to_skip_training, cfg.task.reconstruction_method, cfg.task.coverage_threshold, out_dir,
        cfg.task.soft_thresholds,
    )
    if cfg.task.report:
        write_report(out_dir, Path(cfg.datamodule.data_path), class_map(cfg), title=f"patchflow validation: {cfg.core.name}")
    return metrics


def model_json(cfg: TrainFlowConfig, weights_digest: str | None = None) -> dict[str, Any]:
    """``model.json``: the reference's keys plus patchflow's geometry policy and provenance."""
    info = layout.read_info(Path(cfg.datamodule.data_path))
    classes = class_map(cfg)
    pn, ps = info.get("patch_number"), info.get("patch_size")
    return {
        "input_size": [[3, cfg.transforms.input_height, cfg.transforms.input_width]],
        "classes": {str(v): k for k, v in sorted(classes.items(), key=lambda kv: kv[1])},
        "mean": list(cfg.transforms.mean),
        "std": list(cfg.transforms.std),
        "horizontal_patches": pn[1] if pn else None,
        "vertical_patches": pn[0] if pn else None,
        "patch_height": ps[0] if ps else None,
        "patch_width": ps[1] if ps else None,
        "overlap": info.get("overlap", 0.0),
        "reconstruction_method": cfg.task.reconstruction_method,
        "class_to_skip": cfg.datamodule.class_to_skip_training,
        "annotated_good": info.get("annotated_good"),
        "grid_policy": GRID_POLICY,
        "precision": cfg.task.precision,
        "runtime": feature_runtime(cfg),
        "backbone": cfg.backbone.name,
        "weights_digest": weights_digest or backbone_digest(cfg),
        "patchflow_version": CODE_VERSION,
        # how 16-bit images became 8-bit in the dataset: predict decodes its images the same way
        "sixteen_bit": sixteen_bit_json(dataset_decoding(Path(cfg.datamodule.data_path)).sixteen_bit),
    }


def export_types(cfg: TrainFlowConfig) -> list[str]:
    """Formats to export: the configured ones, plus ONNX when features were computed with ONNX Runtime."""
    types = set(cfg.export.types)
    if feature_runtime(cfg) == "onnxruntime":
        types.add("onnx")
    return sorted(types)


def export_backbone(cfg: TrainFlowConfig, out: Path) -> Path:
    """Export the frozen backbone in every configured format into ``out`` (atomically).

    It depends only on the backbone, its weights and the input size, never on the classifier.
    """
    size = (cfg.transforms.input_height, cfg.transforms.input_width)
    model = build_backbone(cfg.backbone.name, cfg.backbone.weights)
    types = export_types(cfg)
    with building(out) as tmp:
        if "torchscript" in types:
            export_torchscript(model, tmp / "model.pt", size)
        if "onnx" in types:
            export_onnx(model, tmp / "model.onnx", size)
        if "pytorch" in types:
            import torch

            serialise_to(tmp / "model.pth", lambda fh: torch.save(model.state_dict(), fh))
            with naming_write_errors(tmp / "model_config.yaml"):
                (tmp / "model_config.yaml").write_text(f"name: {cfg.backbone.name}\nweights: null\n")
    return out


def export_bundle(
    cfg: TrainFlowConfig,
    classifier_path: Path,
    out: Path,
    weights_digest: str | None = None,
    backbone_dir: Path | None = None,
) -> Path:
    """Write ``deployment_model/`` (backbone export, classifier.skops, model.json; classifier.joblib too when
    ``export.joblib_classifier``) atomically, with a manifest that every load checks.

    ``backbone_dir``: an :func:`export_backbone` folder to copy from instead of exporting again.
    """
    with building(out) as tmp:
        if backbone_dir is None:
            backbone_dir = export_backbone(cfg, tmp / "backbone")
        for f in sorted(Path(backbone_dir).iterdir()):
            if f.name not in (MANIFEST_FILE, STAT_CACHE):  # the bundle gets a manifest of its own
                with naming_write_errors(tmp / f.name):
                    shutil.copy2(f, tmp / f.name)
        shutil.rmtree(tmp / "backbone", ignore_errors=True)
        with naming_write_errors(tmp / SKOPS_FILE):
            shutil.copy2(classifier_path, tmp / SKOPS_FILE)
        if cfg.export.joblib_classifier:  # Quadra's test task reads it
            write_joblib(load_fitted(cfg, classifier_path), tmp / JOBLIB_FILE)
        with naming_write_errors(tmp / "model.json"):
            (tmp / "model.json").write_text(json.dumps(model_json(cfg, weights_digest), indent=2) + "\n")
    return out


@task(name="fit-classifier", persist_result=True)
def fit_task(cfg: TrainFlowConfig, stores: list[str], key: str, out: str, force: bool = False) -> str:
    """Fit the classifier (cached on ``key``; reused if a concurrent run wrote it)."""
    if force or not file_matches(Path(out)):
        fit_classifier(cfg, stores, Path(out))
        write_file_digest(Path(out))
    return out


@task(name="export-backbone", persist_result=True)
def export_backbone_task(cfg: TrainFlowConfig, key: str, out: str, force: bool = False) -> str:
    """Export the backbone (cached on ``key``: weights, input size, formats)."""
    if force or not matches_manifest(Path(out)):
        export_backbone(cfg, Path(out))
    return out


@task(name="export-bundle", persist_result=True)
def export_task(
    cfg: TrainFlowConfig, classifier: str, backbone: str, key: str, out: str, weights_digest: str, force: bool = False
) -> str:
    """Assemble the deployment bundle from the exported backbone and the classifier (cached on ``key``)."""
    if force or not matches_manifest(Path(out)):
        export_bundle(cfg, Path(classifier), Path(out), weights_digest, Path(backbone))
    return out


@task(name="validate-patches", persist_result=True)
def validate_task(
    cfg: TrainFlowConfig, classifier: str, store: str, key: str, out: str, force: bool = False
) -> dict[str, Any]:
    """Patch-level validation metrics (cached on ``key``)."""
    metrics = Path(out) / "metrics.json"
    if not force and matches_manifest(Path(out)):
        return json.loads(metrics.read_text())
    with building(Path(out)) as tmp:
        return validate(cfg, Path(classifier), Path(store), tmp)
