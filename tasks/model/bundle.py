"""Export stage logic: ``model.json``, the backbone exports and the deployment bundle (``deployment_model/``).

The backbone export depends only on the backbone, its weights, the input size and the formats, so changing
the classifier re-exports nothing; the bundle copies it beside the classifier and ``model.json`` and gets
a manifest that every load checks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from storage import layout
from storage.bundle import FULL_MODEL_FILE
from storage.classifier import JOBLIB_FILE, SKOPS_FILE, write_joblib
from storage.fingerprint import CODE_VERSION
from storage.geometry import GRID_POLICY
from storage.manifest import MANIFEST_FILE, STAT_CACHE, building
from storage.writes import naming_write_errors, serialise_to
from tasks.features.layers import feature_width
from tasks.features.params import backbone_digest, class_map, feature_layers, feature_options, feature_runtime
from tasks.imageio import dataset_decoding, sixteen_bit_json
from tasks.model.config import TrainFlowConfig
from tasks.model.fit import load_fitted
from tasks.model.onefile import export_full_model


def model_json(
    cfg: TrainFlowConfig, weights_digest: str | None = None, search: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``model.json``: the reference's keys plus patchflow's geometry policy and provenance (and, when a classifier
    search chose the setting, ``search``: the setting and its cross-validation score)."""
    info = layout.read_info(Path(cfg.datamodule.data_path))
    classes = class_map(cfg)
    pn, ps = info.get("patch_number"), info.get("patch_size")
    meta = {
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
        # the backbone exports return these layers pooled (absent in older bundles: "final", "avg")
        "feature_layers": list(feature_layers(cfg)),
        "pooling": cfg.backbone.pooling,
        "feature_dim": feature_width(cfg.backbone.name, feature_layers(cfg), cfg.backbone.pooling),
        "weights_digest": weights_digest or backbone_digest(cfg),
        "patchflow_version": CODE_VERSION,
        # how 16-bit images became 8-bit in the dataset: predict decodes its images the same way
        "sixteen_bit": sixteen_bit_json(dataset_decoding(Path(cfg.datamodule.data_path)).sixteen_bit),
    }
    return meta | {"search": search} if search else meta


def export_types(cfg: TrainFlowConfig) -> list[str]:
    """Formats to export: the configured ones, plus ONNX when features were computed with ONNX Runtime."""
    types = set(cfg.export.types)
    if feature_runtime(cfg) == "onnxruntime":
        types.add("onnx")
    return sorted(types)


def export_backbone(cfg: TrainFlowConfig, out: Path) -> Path:
    """Export the frozen backbone in every configured format into ``out`` (atomically).

    It depends only on the backbone, its weights, its feature layers and the input size, never on the classifier.
    """
    from tasks.features.export import export_onnx, export_torchscript  # torch: only when something is exported
    from tasks.features.extractor import build_backbone, inner_backbone

    size = (cfg.transforms.input_height, cfg.transforms.input_width)
    model = build_backbone(cfg.backbone.name, cfg.backbone.weights, feature_layers(cfg), cfg.backbone.pooling)
    types = export_types(cfg)
    with building(out) as tmp:
        if "torchscript" in types:
            export_torchscript(model, tmp / "model.pt", size)
        if "onnx" in types:
            export_onnx(model, tmp / "model.onnx", size)
        if "pytorch" in types:
            import torch

            # the architecture's own weights (as the reference saves them); model_config.yaml says which layers
            serialise_to(tmp / "model.pth", lambda fh: torch.save(inner_backbone(model).state_dict(), fh))
            with naming_write_errors(tmp / "model_config.yaml"):
                (tmp / "model_config.yaml").write_text(_model_config(cfg))
    return out


def _model_config(cfg: TrainFlowConfig) -> str:
    """``model_config.yaml`` beside ``model.pth``: the architecture, and the feature layers when not the default."""
    lines = [f"name: {cfg.backbone.name}", "weights: null"]
    options = feature_options(cfg)
    if options:
        lines += [f"{k}: {json.dumps(options[k])}" for k in ("feature_layers", "pooling")]
    return "\n".join(lines) + "\n"


def export_bundle(
    cfg: TrainFlowConfig,
    classifier_path: Path,
    out: Path,
    weights_digest: str | None = None,
    backbone_dir: Path | None = None,
    search: dict[str, Any] | None = None,
) -> Path:
    """Write ``deployment_model/`` (backbone export, classifier.skops, the one-file model ``model_full.onnx``,
    model.json; classifier.joblib too when ``export.joblib_classifier``) atomically, with a manifest that every
    load checks. A classifier without an ONNX form gives a bundle without ``model_full.onnx`` (one warning).

    ``backbone_dir``: an :func:`export_backbone` folder to copy from instead of exporting again; ``search``: the
    classifier search's choice, recorded in ``model.json``.
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
        est = load_fitted(cfg, classifier_path)
        if cfg.export.joblib_classifier:  # Quadra's test task reads it
            write_joblib(est, tmp / JOBLIB_FILE)
        meta = model_json(cfg, weights_digest, search)
        meta["full_model"] = export_full_model(tmp, est, meta, tmp / FULL_MODEL_FILE)  # from the copied export
        with naming_write_errors(tmp / "model.json"):
            (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
