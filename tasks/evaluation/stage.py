"""Evaluation with a deployment bundle: test-split features from the bundle's backbone, then scoring,
reconstruction and the report. Class map, skipped classes, preprocessing and the default
reconstruction method all come from the bundle (the reference never loaded class_to_skip: B4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import Field, StrictInt

from storage import bundle as bdl
from storage import features as fstore
from storage.fingerprint import combine, file_digest, params_digest
from storage.layout import read_info
from storage.manifest import building, matches_manifest
from tasks.features.export import load_export
from tasks.features.extractor import FeatureExtractor
from tasks.config import StrictModel
from tasks.evaluation.scoring import METRICS_VERSION, score_split
from tasks.features.listing import split_items
from tasks.features.stage import dataset_key
from tasks.features.store import extract_items, feature_dim_of
from tasks.model.config import CoreSection


class EvalDatamodule(StrictModel):
    """Which patch dataset split to evaluate on."""

    data_path: str = Field(description="Patch dataset folder (ours or Quadra's)")
    split: Literal["test", "val"] = "test"
    include_filter: list[str] | None = None
    exclude_filter: list[str] | None = None
    batch_size: StrictInt = Field(32, ge=1)


class EvalOutput(StrictModel):
    """What to produce."""

    folder: str = "classification_patch_test"
    report: bool = True
    example: bool = True
    reconstruction_method: Literal["major_voting", "priority", "soft"] | None = Field(
        None, description="Default: the bundle's reconstruction_method"
    )
    coverage_threshold: float = Field(0.3, gt=0, le=1)
    soft_thresholds: dict[str, float] | None = Field(None, description="soft method only: class name -> minimum mean probability")
    n_overlays: StrictInt = Field(6, ge=0)


class EvalTask(StrictModel):
    """The model and where it runs."""

    model_path: str = Field(description="deployment_model/ folder or any file in it (model.pt, model.onnx, model.pth, model.json)")
    device: str = "cpu"
    output: EvalOutput = Field(default_factory=EvalOutput)
    trust_pickle: bool = Field(
        False, description="Load a bundle without a manifest (hand-made, Quadra's) or with a pickled "
                            "classifier.joblib; a pickle runs any code it holds: only for bundles whose source you trust",
    )


class EvaluateFlowConfig(StrictModel):
    """Configuration of the evaluation flow (the reference's test experiment)."""

    datamodule: EvalDatamodule
    task: EvalTask
    core: CoreSection = Field(default_factory=lambda: CoreSection(name="sklearn-classification-patch-test"))
    storage_root: str | None = None
    force: list[Literal["features", "evaluate"]] = Field(default_factory=list)


def bundle_split_key(cfg: EvaluateFlowConfig, root: Path, meta: dict[str, Any]) -> str:
    """Key of a split's features under a bundle's backbone (backbone file bytes, preprocessing, selection)."""
    dm = cfg.datamodule
    sel = {"split": dm.split, "include": dm.include_filter, "exclude": dm.exclude_filter, "classes": bdl.class_to_idx(meta),
           "size": bdl.input_size(meta), "mean": meta["mean"], "std": meta["std"], "device": cfg.task.device}
    return combine("bundle-split", dataset_key(dm.data_path), file_digest(bdl.backbone_file(root, meta)), params_digest(sel))


def extract_with_bundle(cfg: EvaluateFlowConfig, out: Path, force: bool = False) -> dict[str, Any]:
    """Store the split's features computed by the bundle's backbone (the classifier is checked to fit it first)."""
    root, meta = bdl.open_bundle(cfg.task.model_path, cfg.task.trust_pickle)
    dm = cfg.datamodule
    data_path = Path(dm.data_path)
    read_info(data_path)  # a clear error naming info.json when data_path is not a patch dataset
    items = split_items(data_path, dm.split, bdl.class_to_idx(meta), dm.include_filter, dm.exclude_filter)
    est = bdl.load_classifier(root, meta, cfg.task.trust_pickle)
    model = load_export(bdl.backbone_file(root, meta), meta.get("backbone"))
    extractor = FeatureExtractor(model, cfg.task.device if bdl.backbone_file(root, meta).suffix != ".onnx" else "cpu")
    bdl.check_width(root, est, feature_dim_of(extractor, bdl.input_size(meta)))  # before any patch is read
    attrs = {"kind": dm.split, "bundle_backbone": bdl.backbone_file(root, meta).name}
    return extract_items(extractor, bdl.input_size(meta), meta["mean"], meta["std"], data_path, items, dm.batch_size, out, attrs, force=force)


def evaluate_with_bundle(cfg: EvaluateFlowConfig, store: Path, out: Path) -> dict[str, Any]:
    """Score, reconstruct and (optionally) report a split with a bundle's classifier."""
    root, meta = bdl.open_bundle(cfg.task.model_path, cfg.task.trust_pickle)
    classes = bdl.class_to_idx(meta)
    o = cfg.task.output
    method = o.reconstruction_method or meta.get("reconstruction_method") or "major_voting"
    est = bdl.load_classifier(root, meta, cfg.task.trust_pickle)
    metrics = score_split(est, store, Path(cfg.datamodule.data_path), cfg.datamodule.split,
                          classes, meta.get("class_to_skip"), method, o.coverage_threshold, out, o.soft_thresholds)
    if o.report:
        from tasks.evaluation.report import write_report

        write_report(out, Path(cfg.datamodule.data_path), classes, title=f"patchflow evaluation: {cfg.core.name}",
                     n_overlays=o.n_overlays, examples=o.example)
    return metrics


def evaluation_key(cfg: EvaluateFlowConfig, features_key: str, root: Path, meta: dict[str, Any]) -> str:
    """Key of the scoring/report stage: features, classifier bytes, skipped classes and output options."""
    o = cfg.task.output
    return combine("evaluate", METRICS_VERSION, features_key, file_digest(bdl.classifier_file(root)),
                   params_digest({"skip": meta.get("class_to_skip"), "method": o.reconstruction_method or meta.get("reconstruction_method"),
                                  "output": o.model_dump(mode="json", exclude={"folder"}), "classes": meta["classes"]}))


@task(name="bundle-split-features", persist_result=True)
def bundle_features_task(cfg: EvaluateFlowConfig, key: str, out: str, force: bool = False) -> str:
    """Split features under the bundle's backbone (cached on ``key``)."""
    if force or not fstore.is_verified(Path(out)):
        extract_with_bundle(cfg, Path(out), force)
    return out


@task(name="evaluate-split", persist_result=True)
def evaluate_task(cfg: EvaluateFlowConfig, store: str, key: str, out: str, force: bool = False) -> dict[str, Any]:
    """Metrics, reconstruction and report of the split (cached on ``key``)."""
    import json

    metrics = Path(out) / "metrics.json"
    if not force and matches_manifest(Path(out)):
        return json.loads(metrics.read_text())
    with building(Path(out)) as tmp:
        return evaluate_with_bundle(cfg, Path(store), tmp)
