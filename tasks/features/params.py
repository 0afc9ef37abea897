"""What a feature store depends on, read from the training config: the class map, the runtime that computes
features, the digest of the backbone weights and the store parameters that enter its content key.

Plain functions (no Prefect, no torch): the keys of ``tasks/features/stage.py``, the store jobs of
``tasks/features/store.py`` and the model stage all read them from here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage import layout
from storage.fingerprint import CODE_VERSION
from tasks.config import ConfigError
from tasks.features.layers import is_plain, resolve_layers
from tasks.features.weights import resolve_weights, weights_digest

if TYPE_CHECKING:
    from tasks.model.config import TrainFlowConfig


def class_map(cfg: TrainFlowConfig) -> dict[str, int]:
    """``class_to_idx`` from the config, else from our dataset's sidecar."""
    if cfg.datamodule.class_to_idx:
        return dict(cfg.datamodule.class_to_idx)
    side = layout.read_sidecar(Path(cfg.datamodule.data_path))
    if side and side.get("class_to_idx"):
        return dict(side["class_to_idx"])
    raise ValueError(
        f"datamodule.class_to_idx is needed: {cfg.datamodule.data_path} has no patchflow.json (a Quadra dataset?)"
    )


def backbone_digest(cfg: TrainFlowConfig) -> str:
    """Digest of the backbone weights actually used (resolved offline)."""
    return weights_digest(resolve_weights(cfg.backbone.name, cfg.backbone.weights), cfg.backbone.name)


def feature_runtime(cfg: TrainFlowConfig) -> str:
    """The runtime that computes features: ``torch`` or ``onnxruntime`` (``auto`` resolved for this machine)."""
    task = cfg.task
    plain_cpu = task.device == "cpu" and task.precision == "fp32"
    if task.runtime == "auto":
        return "onnxruntime" if plain_cpu and importlib.util.find_spec("onnxruntime") else "torch"
    if task.runtime == "onnxruntime" and not plain_cpu:
        raise ConfigError("task.runtime=onnxruntime runs on device cpu at precision fp32 only; use task.runtime=torch")
    return task.runtime


def feature_layers(cfg: TrainFlowConfig) -> tuple[str, ...]:
    """The backbone layers that make the feature vector (``backbone.feature_layers`` resolved)."""
    return resolve_layers(cfg.backbone.name, cfg.backbone.feature_layers)


def feature_options(cfg: TrainFlowConfig) -> dict[str, Any]:
    """``{"feature_layers": [...], "pooling": ...}``, or ``{}`` for the reference's vector (``final``, ``avg``), so the
    keys of stores and exports made before these options existed stay valid."""
    layers = feature_layers(cfg)
    if is_plain(layers, cfg.backbone.pooling):
        return {}
    return {"feature_layers": list(layers), "pooling": cfg.backbone.pooling}


def feature_params(cfg: TrainFlowConfig, wdigest: str) -> dict[str, Any]:
    """How features are computed (code version, backbone, weights digest, feature layers and pooling, transform,
    precision, runtime): part of every store's content key and of its attributes."""
    return {
        "code": CODE_VERSION,
        "backbone": cfg.backbone.name,
        "weights": wdigest,
        **feature_options(cfg),
        "transforms": cfg.transforms.model_dump(mode="json"),
        "precision": cfg.task.precision,
        "runtime": feature_runtime(cfg),
    }
