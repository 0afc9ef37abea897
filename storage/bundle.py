"""Deployment bundle (``deployment_model/``): location, verification, metadata, classifier, content digest.

Files: ``model.json`` (the reference's keys plus ``grid_policy``, ``precision``, ``runtime``,
``backbone``, ``weights_digest``, ``patchflow_version``), ``classifier.skops`` (plus Quadra's
``classifier.joblib`` when ``export.joblib_classifier`` is set), one or more backbone exports:
``model.pt`` (TorchScript), ``model.onnx``, ``model.pth`` + ``model_config.yaml``, and ``_manifest.json``
(size and sha256 of every file, written last by the export).

Before anything of a bundle is loaded, :func:`open_bundle` checks every file against the manifest
(full sha256): an edited, swapped, truncated, deleted or added file is refused, naming it. A bundle
without a manifest (made by hand, or Quadra's) and a pickled classifier are loaded only with the
trust flag (``task.trust_pickle`` / ``--trust-pickle``), because a pickle runs any code it holds.
The manifest catches changes made after the export, not a forger who rewrites the manifest too; what
such a bundle can never do without the trust flag is run code, since only skops's trusted types load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from storage.classifier import (
    JOBLIB_FILE,
    SKOPS_FILE,
    ClassifierFileError,
    load_classifier_file,
    width_problem,
)
from storage.fingerprint import combine, file_digest
from storage.layout import DatasetFormatError
from storage.manifest import MANIFEST_FILE, manifest_mismatch

BUNDLE_FILES = ("model.json", SKOPS_FILE, JOBLIB_FILE, "model.pt", "model.onnx", "model.pth", "model_config.yaml")
#: files added next to an exported bundle's own and never read for inference (promotion's version record)
NOT_EXPORTED = ("version.json",)
TRUST_FIX = ("If you trust where this bundle came from, set task.trust_pickle: true (evaluate) or pass --trust-pickle "
             "(predict); that lets its files run code")
REQUIRED_KEYS = ("input_size", "classes", "mean", "std")
SUPPORTED_MAJOR = "patchflow-0"


logger = logging.getLogger("patchflow.bundle")


class BundleError(DatasetFormatError):
    """The deployment bundle is missing, incomplete, altered, untrusted or from an incompatible version."""


def resolve_bundle(model_path: str | Path) -> Path:
    """Bundle folder from the folder itself or any file in it (``model.pt``, ``model.onnx``, ``.pth``, ``model.json``...)."""
    p = Path(model_path).expanduser()
    root = p if p.is_dir() else p.parent
    if not p.exists():
        raise BundleError(f"model_path {p} does not exist; point it at a deployment_model/ folder or a file in it")
    if not (root / "model.json").is_file() or not any((root / n).is_file() for n in (SKOPS_FILE, JOBLIB_FILE)):
        if (root / MANIFEST_FILE).is_file():
            verify_bundle(root)  # an exported bundle that lost a file: named by the manifest check
        raise BundleError(
            f"{root} is not a deployment bundle: it needs model.json and {SKOPS_FILE} (or Quadra's {JOBLIB_FILE}) "
            "next to the backbone export"
        )
    return root


def verify_bundle(root: Path, trust_pickle: bool = False) -> None:
    """Check every file of the bundle against its ``_manifest.json`` (full sha256) before anything is loaded.

    A bundle without a manifest is accepted only with ``trust_pickle`` (nothing can be checked)."""
    root = Path(root)
    if not (root / MANIFEST_FILE).exists():
        if not trust_pickle:
            raise BundleError(f"bundle {root} has no {MANIFEST_FILE} (made by hand or by Quadra), so its files cannot "
                              f"be checked against the export; re-export the model with the train flow. {TRUST_FIX}")
        logger.warning("bundle %s has no %s: loading it unchecked because trust_pickle is set", root, MANIFEST_FILE)
        return
    found = manifest_mismatch(root, rehash=True, ignore=NOT_EXPORTED)
    if found is None:
        return
    kind, rel, detail = found
    fix = "re-export the model (or restore the file)"
    raise BundleError({
        "unreadable": f"bundle {root}: {MANIFEST_FILE} is damaged; re-export the model",
        "deleted": f"bundle {root}: {rel} was deleted after export; {fix}",
        "added": f"bundle {root}: {rel} was added after export; remove it or re-export the model",
        "resized": f"bundle {root}: {rel} was modified after export ({detail}); {fix}",
        "modified": f"bundle {root}: {rel} was modified after export; {fix}",
    }[kind])


def open_bundle(model_path: str | Path, trust_pickle: bool = False) -> tuple[Path, dict[str, Any]]:
    """Bundle folder and its checked ``model.json``: :func:`resolve_bundle`, :func:`verify_bundle`,
    :func:`read_meta`."""
    root = resolve_bundle(model_path)
    verify_bundle(root, trust_pickle)
    return root, read_meta(root)


def classifier_file(root: Path) -> Path:
    """The bundle's classifier: ``classifier.skops`` when present, else Quadra's ``classifier.joblib``."""
    for name in (SKOPS_FILE, JOBLIB_FILE):
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise BundleError(f"{root} holds no {SKOPS_FILE} or {JOBLIB_FILE}; re-export the model with the train flow")


def load_classifier(root: Path, meta: dict[str, Any], trust_pickle: bool = False) -> Any:
    """The bundle's fitted classifier, loaded so that it cannot run code unless ``trust_pickle`` is set.

    Call :func:`open_bundle` first (it verifies the files). Its classes must be ``model.json``'s."""
    root = Path(root)
    try:
        est = load_classifier_file(classifier_file(root), "all" if trust_pickle else (), TRUST_FIX)
    except ClassifierFileError as exc:
        raise BundleError(f"bundle {root}: {exc}") from None
    known = {int(i) for i in meta["classes"]}
    try:
        predicted = {int(c) for c in est.classes_}
    except (TypeError, ValueError):
        predicted = {-1}
    if not predicted <= known:
        raise BundleError(f"bundle {root}: the classifier predicts classes {sorted(map(str, est.classes_))} but "
                          f"model.json lists {sorted(known)}; the classifier comes from another model: "
                          "re-export the model")
    return est


def check_width(root: Path, est: Any, width: int) -> None:
    """Refuse a classifier that expects another feature length than the backbone export gives."""
    problem = width_problem(est, width)
    if problem:
        raise BundleError(f"bundle classifier {problem} ({root}); the classifier and the backbone export come from "
                          "different models: re-export the model")


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
