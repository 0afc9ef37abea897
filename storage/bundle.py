"""Deployment bundle (``deployment_model/``): location, verification, metadata, classifier, content digest.

Files: ``model.json`` (the reference's keys plus ``grid_policy``, ``precision``, ``runtime``,
``backbone``, ``weights_digest``, ``patchflow_version``), ``classifier.skops`` (plus Quadra's
``classifier.joblib`` when ``export.joblib_classifier`` is set), one or more backbone exports:
``model.pt`` (TorchScript), ``model.onnx``, ``model.pth`` + ``model_config.yaml``, the one-file model
``model_full.onnx`` (preprocessing + backbone + classifier; absent when the classifier has no ONNX form), and
``_manifest.json`` (size and sha256 of every file, written last by the export).

Before anything of a bundle is loaded, :func:`open_bundle` checks every file against the manifest
(full sha256): an edited, swapped, truncated, deleted or added file is refused, naming it. A bundle
without a manifest (made by hand, or Quadra's) and a pickled classifier are loaded only with the
trust flag (``task.trust_pickle`` / ``--trust-pickle``), because a pickle runs any code it holds.
The manifest catches changes made after the export, not a forger who rewrites the manifest too; what
such a bundle can never do without the trust flag is run code, since only skops's trusted types load.

:func:`open_bundle` returns a :class:`Bundle`: folder, ``model.json``, and each file's sha256 taken from the
manifest it has just verified, so the bundle's content digest (cache keys) costs no second read. A flow opens
the bundle once and passes ``(root, digest)`` to its tasks; :func:`reopen_bundle` gets the :class:`Bundle`
back there with the manifest's fast check (sizes and mtimes; a file whose mtime changed is re-hashed) instead
of hashing every file again, and refuses a bundle whose content digest is no longer the one the flow verified.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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
from storage.geometry import GridSpec
from storage.layout import DatasetFormatError
from storage.manifest import MANIFEST_FILE, manifest_mismatch

#: the one-file model (preprocessing + backbone + classifier in one ONNX graph; tasks/model/onefile.py)
FULL_MODEL_FILE = "model_full.onnx"
BUNDLE_FILES = (
    "model.json",
    SKOPS_FILE,
    JOBLIB_FILE,
    "model.pt",
    "model.onnx",
    "model.pth",
    "model_config.yaml",
    FULL_MODEL_FILE,
)
#: files added next to an exported bundle's own and never read for inference (promotion's version record)
NOT_EXPORTED = ("version.json",)
TRUST_FIX = (
    "If you trust where this bundle came from, set task.trust_pickle: true (evaluate) or pass --trust-pickle "
    "(predict); that lets its files run code"
)
REQUIRED_KEYS = ("input_size", "classes", "mean", "std")
SUPPORTED_MAJOR = "patchflow-0"


logger = logging.getLogger("patchflow.bundle")


class BundleError(DatasetFormatError):
    """The deployment bundle is missing, incomplete, altered, untrusted or from an incompatible version."""


def resolve_bundle(model_path: str | Path) -> Path:
    """Bundle folder from the folder itself or any file in it (``model.pt``, ``model.onnx``, ``.pth``,
    ``model.json``...)."""
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


def verify_bundle(root: Path, trust_pickle: bool = False, rehash: bool = True) -> None:
    """Check every file of the bundle against its ``_manifest.json`` (full sha256) before anything is loaded.

    A bundle without a manifest is accepted only with ``trust_pickle`` (nothing can be checked).
    ``rehash=False``: the manifest's fast check (a file whose size and mtime are unchanged is not re-read)."""
    root = Path(root)
    if not (root / MANIFEST_FILE).exists():
        if not trust_pickle:
            raise BundleError(
                f"bundle {root} has no {MANIFEST_FILE} (made by hand or by Quadra), so its files cannot "
                f"be checked against the export; re-export the model with the train flow. {TRUST_FIX}"
            )
        logger.warning("bundle %s has no %s: loading it unchecked because trust_pickle is set", root, MANIFEST_FILE)
        return
    found = manifest_mismatch(root, rehash=rehash, ignore=NOT_EXPORTED)
    if found is None:
        return
    kind, rel, detail = found
    fix = "re-export the model (or restore the file)"
    raise BundleError(
        {
            "unreadable": f"bundle {root}: {MANIFEST_FILE} is damaged; re-export the model",
            "deleted": f"bundle {root}: {rel} was deleted after export; {fix}",
            "added": f"bundle {root}: {rel} was added after export; remove it or re-export the model",
            "resized": f"bundle {root}: {rel} was modified after export ({detail}); {fix}",
            "modified": f"bundle {root}: {rel} was modified after export; {fix}",
        }[kind]
    )


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its folder, its checked ``model.json`` and the sha256 of each of its :data:`BUNDLE_FILES`."""

    root: Path
    meta: dict[str, Any]
    files: dict[str, str]
    trust_pickle: bool = False

    @property
    def digest(self) -> str:
        """Content digest of the bundle's files (part of the evaluate and predict cache keys)."""
        return combine(*(f"{name}:{self.files[name]}" for name in BUNDLE_FILES if name in self.files))

    @property
    def classes(self) -> dict[str, int]:
        """Class map (name -> index)."""
        return class_to_idx(self.meta)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the backbone expects."""
        return input_size(self.meta)

    @property
    def grid_spec(self) -> GridSpec:
        """The patch grid the model was trained on."""
        return grid_spec(self.meta)

    @property
    def backbone_file(self) -> Path:
        """The backbone export to run (see :func:`backbone_file`)."""
        return backbone_file(self.root, self.meta)

    @property
    def full_model_file(self) -> Path | None:
        """The one-file model (``model_full.onnx``), or None when the bundle has none."""
        return self.root / FULL_MODEL_FILE if FULL_MODEL_FILE in self.files else None

    @property
    def classifier_file(self) -> Path:
        """The classifier file (see :func:`classifier_file`)."""
        return classifier_file(self.root)

    def file_digest(self, path: Path) -> str:
        """sha256 of one of the bundle's files (from the verified manifest)."""
        return self.files[Path(path).name]

    def load_classifier(self) -> Any:
        """The fitted classifier, loaded so that it cannot run code unless the bundle was opened with trust_pickle."""
        return load_classifier(self.root, self.meta, self.trust_pickle)

    def check_width(self, est: Any, width: int) -> None:
        """Refuse a classifier that expects another feature length than the backbone gives."""
        check_width(self.root, est, width)


def _opened(root: Path, trust_pickle: bool) -> Bundle:
    """:class:`Bundle` of a verified folder; file digests from its manifest (hashed only when it has none)."""
    meta = read_meta(root)
    try:
        entries = json.loads((root / MANIFEST_FILE).read_text())["files"]
        files = {name: str(entries[name][1]) for name in BUNDLE_FILES if name in entries}
    except FileNotFoundError:
        files = {name: file_digest(root / name) for name in BUNDLE_FILES if (root / name).is_file()}
    return Bundle(root, meta, files, trust_pickle)


def open_bundle(model_path: str | Path, trust_pickle: bool = False) -> Bundle:
    """The bundle at ``model_path``, every file checked against the manifest first: :func:`resolve_bundle`,
    :func:`verify_bundle`, :func:`read_meta`."""
    root = resolve_bundle(model_path)
    verify_bundle(root, trust_pickle)
    return _opened(root, trust_pickle)


def reopen_bundle(root: str | Path, digest: str, trust_pickle: bool = False) -> Bundle:
    """A bundle that :func:`open_bundle` verified earlier in this run, checked cheaply (the manifest's fast check)
    and refused when its content digest is no longer ``digest``."""
    root = resolve_bundle(root)
    verify_bundle(root, trust_pickle, rehash=False)
    bundle = _opened(root, trust_pickle)
    if bundle.digest != digest:
        raise BundleError(f"bundle {root} changed while this run used it; rerun to check and load it again")
    return bundle


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
        raise BundleError(
            f"bundle {root}: the classifier predicts classes {sorted(map(str, est.classes_))} but "
            f"model.json lists {sorted(known)}; the classifier comes from another model: "
            "re-export the model"
        )
    return est


def check_width(root: Path, est: Any, width: int) -> None:
    """Refuse a classifier that expects another feature length than the backbone export gives."""
    problem = width_problem(est, width)
    if problem:
        raise BundleError(
            f"bundle classifier {problem} ({root}); the classifier and the backbone export come from "
            "different models: re-export the model"
        )


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
        raise BundleError(
            f"{path} was written by {version}; this patchflow reads {SUPPORTED_MAJOR}.x bundles: retrain or upgrade"
        )
    return meta


def class_to_idx(meta: dict[str, Any]) -> dict[str, int]:
    """Class map of a bundle (``classes`` stores index -> name)."""
    return {name: int(idx) for idx, name in meta["classes"].items()}


def input_size(meta: dict[str, Any]) -> tuple[int, int]:
    """(height, width) the backbone expects."""
    size = meta["input_size"][0] if isinstance(meta["input_size"][0], list) else meta["input_size"]
    return int(size[-2]), int(size[-1])


def grid_spec(meta: dict[str, Any]) -> GridSpec:
    """Patch grid of the bundle (``model.json``'s ``patch_height/width`` or ``vertical/horizontal_patches``)."""
    try:
        return GridSpec.from_model_json(meta)
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def backbone_file(root: Path, meta: dict[str, Any]) -> Path:
    """The export that reproduces the training features: ONNX when they were computed with ONNX Runtime."""
    onnx_first = meta.get("runtime") == "onnxruntime"
    order = ("model.onnx", "model.pt", "model.pth") if onnx_first else ("model.pt", "model.onnx", "model.pth")
    for name in order:
        if (Path(root) / name).is_file():
            return Path(root) / name
    raise BundleError(
        f"{root} holds no backbone export (model.pt, model.onnx or model.pth); re-export the model with the train flow"
    )
