"""Evaluation stages: a split's features under a bundle's backbone, and ONE scoring stage (a classifier on stored
features -> patch metrics, reconstruction, report) that the train flow runs on the val split with its fitted
classifier and the evaluate flow runs with a bundle's. Content keys and ``@task`` entry points live here; the
logic in :mod:`~tasks.evaluation.scoring`, :mod:`~tasks.evaluation.report` and :mod:`~tasks.evaluation.inferer`.

With a bundle, the class map, skipped classes, preprocessing and the default reconstruction method come from
the bundle (the reference never loaded class_to_skip: B4). The flow opens (verifies) the bundle once and passes
its folder and content digest; the tasks re-open it with :func:`storage.bundle.reopen_bundle`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from storage.bundle import Bundle, reopen_bundle
from storage.classifier import load_classifier_file
from storage.features import is_verified
from storage.fingerprint import combine, params_digest
from storage.layout import read_info
from storage.manifest import building, matches_manifest
from tasks.evaluation.config import EvaluateFlowConfig
from tasks.evaluation.inferer import BundleModel
from tasks.evaluation.report import write_report
from tasks.evaluation.scoring import METRICS_VERSION, score_split
from tasks.features.listing import split_items
from tasks.features.params import class_map
from tasks.features.stage import dataset_key, store_path
from tasks.features.store import extract_items
from tasks.model.config import TrainFlowConfig
from tasks.model.fit import TRAIN_FIX, trusted_types
from tasks.stage import build_once, run_stage


@dataclass(frozen=True)
class FittedClassifier:
    """The fit stage's classifier file, loaded with the types the train config trusts (never unpickled)."""

    path: str
    trusted_types: tuple[str, ...]

    def load(self) -> Any:
        """The fitted classifier."""
        return load_classifier_file(Path(self.path), set(self.trusted_types), TRAIN_FIX)


@dataclass(frozen=True)
class BundleClassifier:
    """A bundle's classifier; the bundle was verified by the flow and is re-opened by its content digest."""

    root: str
    digest: str
    trust_pickle: bool = False

    def load(self) -> Any:
        """The bundle's classifier (a pickled one only with ``trust_pickle``)."""
        return reopen_bundle(self.root, self.digest, self.trust_pickle).load_classifier()


@dataclass(frozen=True)
class ScoringJob:
    """One scoring run: which stored split, which classifier, how to reconstruct and what to report."""

    store: str
    data_path: str
    split: str
    classes: dict[str, int]
    class_to_skip: list[str] | None
    classifier: FittedClassifier | BundleClassifier
    method: str = "major_voting"
    coverage_threshold: float = 0.3
    soft_thresholds: dict[str, float] | None = None
    report: bool = True
    title: str = "patchflow evaluation"
    n_overlays: int = 6
    examples: bool = True


def score(job: ScoringJob, out: Path) -> dict[str, Any]:
    """Classify, score and reconstruct the split into ``out`` (metrics.json, test_results.csv,
    reconstruction_results.json, maps/) and write its report there; returns the metrics."""
    scores = score_split(
        job.classifier.load(),
        Path(job.store),
        Path(job.data_path),
        job.split,
        job.classes,
        job.class_to_skip,
        job.method,
        job.coverage_threshold,
        out,
        job.soft_thresholds,
    )
    if job.report:
        write_report(
            out,
            Path(job.data_path),
            job.classes,
            scores,
            title=job.title,
            n_overlays=job.n_overlays,
            examples=job.examples,
        )
    return scores.metrics


def validation_job(cfg: TrainFlowConfig, classifier: str, store: str) -> ScoringJob:
    """The train flow's validation: the val split with the fitted classifier and the train config's options."""
    t = cfg.task
    return ScoringJob(
        store,
        cfg.datamodule.data_path,
        "val",
        class_map(cfg),
        cfg.datamodule.class_to_skip_training,
        FittedClassifier(classifier, tuple(sorted(trusted_types(cfg)))),
        t.reconstruction_method,
        t.coverage_threshold,
        t.soft_thresholds,
        t.report,
        f"patchflow validation: {cfg.core.name}",
        examples=t.example,
    )


def validation_key(cfg: TrainFlowConfig, fit_key: str, val_store: str) -> str:
    """Key of the validation: classifier (fit key), val features, skipped classes and reconstruction options."""
    skip = sorted(cfg.datamodule.class_to_skip_training or [])
    t = cfg.task
    recon = {
        "method": t.reconstruction_method,
        "coverage": t.coverage_threshold,
        "report": t.report,
        "soft_thresholds": t.soft_thresholds,
        **({} if t.example else {"example": False}),  # keys of runs with examples stay those of earlier versions
    }
    return combine(
        "validate",
        METRICS_VERSION,
        fit_key,
        Path(val_store).name,
        params_digest({"skip": skip, "reconstruction": recon}),
    )


def evaluation_job(cfg: EvaluateFlowConfig, bundle: Bundle, store: str) -> ScoringJob:
    """The evaluate flow's scoring: the configured split with the bundle's classifier, classes and skips."""
    o = cfg.task.output
    method = o.reconstruction_method or bundle.meta.get("reconstruction_method") or "major_voting"
    return ScoringJob(
        store,
        cfg.datamodule.data_path,
        cfg.datamodule.split,
        bundle.classes,
        bundle.meta.get("class_to_skip"),
        BundleClassifier(str(bundle.root), bundle.digest, cfg.task.trust_pickle),
        method,
        o.coverage_threshold,
        o.soft_thresholds,
        o.report,
        f"patchflow evaluation: {cfg.core.name}",
        o.n_overlays,
        o.example,
    )


def evaluation_key(cfg: EvaluateFlowConfig, features_key: str, bundle: Bundle) -> str:
    """Key of the scoring/report stage: features, classifier bytes, skipped classes and output options."""
    o = cfg.task.output
    meta = bundle.meta
    return combine(
        "evaluate",
        METRICS_VERSION,
        features_key,
        bundle.file_digest(bundle.classifier_file),
        params_digest(
            {
                "skip": meta.get("class_to_skip"),
                "method": o.reconstruction_method or meta.get("reconstruction_method"),
                "output": o.model_dump(mode="json", exclude={"folder"}),
                "classes": meta["classes"],
            }
        ),
    )


def bundle_split_key(cfg: EvaluateFlowConfig, bundle: Bundle) -> str:
    """Key of a split's features under a bundle's backbone (backbone file bytes, preprocessing, selection)."""
    dm, meta = cfg.datamodule, bundle.meta
    sel = {
        "split": dm.split,
        "include": dm.include_filter,
        "exclude": dm.exclude_filter,
        "classes": bundle.classes,
        "size": bundle.input_size,
        "mean": meta["mean"],
        "std": meta["std"],
        "device": cfg.task.device,
    }
    return combine(
        "bundle-split", dataset_key(dm.data_path), bundle.file_digest(bundle.backbone_file), params_digest(sel)
    )


def extract_with_bundle(cfg: EvaluateFlowConfig, bundle: Bundle, out: Path, force: bool = False) -> dict[str, Any]:
    """Store the split's features computed by the bundle's backbone (the classifier is checked to fit it first)."""
    dm = cfg.datamodule
    data_path = Path(dm.data_path)
    read_info(data_path)  # a clear error naming info.json when data_path is not a patch dataset
    items = split_items(data_path, dm.split, bundle.classes, dm.include_filter, dm.exclude_filter)
    model = BundleModel.load(bundle, cfg.task.device)
    attrs = {"kind": dm.split, "bundle_backbone": bundle.backbone_file.name}
    return extract_items(
        model.extractor,
        bundle.input_size,
        bundle.meta["mean"],
        bundle.meta["std"],
        data_path,
        items,
        dm.batch_size,
        out,
        attrs,
        force=force,
        workers=dm.num_workers,
    )


def finish_evaluation_run(cfg: EvaluateFlowConfig, run: Path, scored: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Copy the scoring stage's folder into the run folder (``<run>/<output.folder>``, plus the reconstruction
    results at the run's top level, as the reference writes them), publish the artifacts; the flow's result."""
    from tasks.artifacts import publish_task

    out = run / cfg.task.output.folder
    shutil.copytree(scored, out)
    shutil.copy2(out / "reconstruction_results.json", run / "reconstruction_results.json")
    publish_task(f"{cfg.core.name} {cfg.datamodule.split}", metrics, str(out))
    return {"run_dir": str(run), "output": str(out), "metrics": metrics}


def bundle_features_stage(cfg: EvaluateFlowConfig, root: Path, bundle: Bundle) -> tuple[str, str]:
    """Run the cached feature extraction of the split under the bundle's backbone; ``(store, features key)``."""
    key, force = bundle_split_key(cfg, bundle), "features" in cfg.force
    out = str(store_path(root, key))
    return run_stage(
        bundle_features_task, root, out, is_verified, force, cfg, str(bundle.root), bundle.digest, key, out, force
    ), key


def evaluate_stage(
    cfg: EvaluateFlowConfig, root: Path, bundle: Bundle, features_key: str, store: str
) -> tuple[dict[str, Any], str]:
    """Run the cached scoring of the split with the bundle's classifier; ``(metrics, output folder)``."""
    key, force = evaluation_key(cfg, features_key, bundle), "evaluate" in cfg.force
    out = str(root / "evaluations" / key[:32])
    return run_stage(
        score_task, root, out, matches_manifest, force, evaluation_job(cfg, bundle, store), key, out, force
    ), out


def validate_stage(
    cfg: TrainFlowConfig, root: Path, classifier: str, fit_key: str, val_store: str
) -> tuple[dict[str, Any], str]:
    """Run the cached validation of ``classifier`` on the val store; ``(metrics, validation folder)``."""
    key, force = validation_key(cfg, fit_key, val_store), "validate" in cfg.force
    out = str(root / "validation" / key[:32])
    return run_stage(
        validate_task, root, out, matches_manifest, force, validation_job(cfg, classifier, val_store), key, out, force
    ), out


@task(name="bundle-split-features", persist_result=True)
def bundle_features_task(
    cfg: EvaluateFlowConfig, bundle_root: str, bundle_digest: str, key: str, out: str, force: bool = False
) -> str:
    """Split features under the bundle's backbone (cached on ``key``)."""
    return build_once(
        out,
        force,
        is_verified,
        lambda: extract_with_bundle(
            cfg, reopen_bundle(bundle_root, bundle_digest, cfg.task.trust_pickle), Path(out), force
        ),
    )


@task(name="evaluate-split", persist_result=True)
def score_task(job: ScoringJob, key: str, out: str, force: bool = False) -> dict[str, Any]:
    """Metrics, reconstruction and report of a stored split (cached on ``key``)."""
    if not force and matches_manifest(Path(out)):
        return json.loads((Path(out) / "metrics.json").read_text())
    with building(Path(out)) as tmp:
        return score(job, tmp)


#: the train flow's validation: the same stage under the task name its cache records were written with
validate_task = score_task.with_options(name="validate-patches")
