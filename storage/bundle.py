"""Deployment bundle (``deployment_model/``): location, metadata, content digest.

Files: ``model.json`` (the reference's keys plus ``grid_policy``, ``precision``, ``runtime``,
``backbone``, ``weights_digest``, ``patchflow_version``), ``classifier.joblib`` and one or more
backbone exports: ``model.pt`` (TorchScript), ``model.onnx``, ``model.pth`` + ``model_config.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.fingerprint import combine, file_digest
from storage.layout import DatasetFormatError

BUNDLE_FILES = ("model.json", "classifier.joblib", "model.pt", "model.onnx", "model.pth", "model_config.yaml")
REQUIRED_KEYS = ("input_size", "classes", "mean", "std")
SUPPORTED_MAJOR = "patchflow-0"


class BundleError(DatasetFormatError):
    """The deployment bundle is missing, incomplete or from an incompatible version."""


def resolve_bundle(model_path: str | Path) -> Path:
    """Bundle folder from the folder itself or any file in it (``model.pt``, ``model.onnx``, ``.pth``, ``model.json``...)."""
    p = Path(model_path).expanduser()
    root = p if p.is_dir() else p.parent
    if not p.exists():
        raise BundleError(f"model_path {p} does not exist; point it at a deployment_model/ folder or a file in it")
    if not (root / "model.json").is_file() or not (root / "classifier.joblib").is_file():
        raise BundleError(
            f"{root} is not a deployment bundle: it needs model.json and classifier.joblib next to the backbone export"
        )
    return root


def read_meta(root: Path) -> dict[str, Any]:
    """``model.json`` checked for the keys inference needs and for a compatible patchflow version."""
    path = Path(root) / "model.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON ({exc}); re-export the model") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{path} lacks {missing}; re-export the model with the train flow")
    version = meta.get("patchflow_version")
    if version is not None and not str(version).startswith(SUPPORTED_MAJOR):
        raise BundleError(f"{path} was written by {version}; this patchflow reads {SUPPORTED_MAJOR}.x bundles: retrain or upgrade")
    return meta


def class_to_idx(meta: dict[str, Any]) -> dict[str, int]:
    """Class map of a bundle (``classes`` stores index -> name)."""
    return {name: int(idx) for idx, name in meta["classes"].items()}


def input_size(meta: dict[str, Any]) -> tuple[int, int]:
    """(height, width) the backbone expects."""
    size = meta["input_size"][0] if isinstance(meta["input_size"][0], list) else meta["input_size"]
    return int(size[-2]), int(size[-1])


def geometry(meta: dict[str, Any]) -> dict[str, Any]:
    """Grid parameters of the bundle: ``patch_size`` [h, w] or ``patch_number`` [v, h], and ``overlap``."""
    if meta.get("patch_height") and meta.get("patch_width"):
        return {"patch_size": [meta["patch_height"], meta["patch_width"]], "patch_number": None, "overlap": meta.get("overlap") or 0.0}
    if meta.get("vertical_patches") and meta.get("horizontal_patches"):
        return {"patch_size": None, "patch_number": [meta["vertical_patches"], meta["horizontal_patches"]], "overlap": meta.get("overlap") or 0.0}
    raise BundleError("model.json holds no patch geometry (patch_height/width or vertical/horizontal_patches)")


def backbone_file(root: Path, meta: dict[str, Any]) -> Path:
    """The export that reproduces the training features: ONNX when they were computed with ONNX Runtime."""
    order = ("model.onnx", "model.pt", "model.pth") if meta.get("runtime") == "onnxruntime" else ("model.pt", "model.onnx", "model.pth")
    for name in order:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise BundleError(f"{root} holds no backbone export (model.pt, model.onnx or model.pth); re-export the model with the train flow")


def bundle_digest(root: Path) -> str:
    """Content digest of the bundle's files."""
    parts = [f"{name}:{file_digest(Path(root) / name)}" for name in BUNDLE_FILES if (Path(root) / name).is_file()]
    return combine(*parts)
