"""Model stages: content keys and ``@task`` entry points of the fit, the backbone export and the bundle export
(the logic is in ``fit.py`` and ``bundle.py``); :func:`fit_stage` and :func:`export_stage` run them cached.
The validation is the scoring stage of ``tasks/evaluation/stage.py`` (:func:`~tasks.evaluation.stage.validate_stage`).

Keys: fit = the training stores' keys + classifier config + seed; backbone export = weights digest + name +
input size + formats; bundle = fit key + backbone key + ``model.json`` + the joblib opt-in + the one-file model's
version. So changing the classifier re-exports no backbone, and an unchanged stage is never recomputed.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from storage.fingerprint import combine, params_digest
from storage.manifest import file_matches, matches_manifest, write_file_digest
from tasks.features.params import feature_options
from tasks.model.bundle import export_backbone, export_bundle, export_types, model_json
from tasks.model.config import TrainFlowConfig
from tasks.model.fit import fit_classifier
from tasks.model.onefile import FULL_MODEL_VERSION
from tasks.stage import build_once, run_stage


def fit_key(cfg: TrainFlowConfig, stores: list[str]) -> str:
    """Key of the fit: the training stores (named by their keys), the classifier config and the seed."""
    return combine(
        "fit",
        *sorted(Path(s).name for s in stores),
        params_digest(cfg.model.model_dump(mode="json")),
        str(cfg.core.seed),
    )


def backbone_key(cfg: TrainFlowConfig, weights_digest: str) -> str:
    """Key of the backbone export: weights, architecture, feature layers, input size and formats (never the
    classifier)."""
    size = [cfg.transforms.input_height, cfg.transforms.input_width]
    params = {"name": cfg.backbone.name, "size": size, "types": export_types(cfg), **feature_options(cfg)}
    return combine("backbone-export", weights_digest, params_digest(params))


def bundle_key(cfg: TrainFlowConfig, fkey: str, bkey: str, weights_digest: str) -> str:
    """Key of the deployment bundle: classifier, backbone export, ``model.json``, the joblib opt-in and the
    one-file model's layout version."""
    return combine(
        "export",
        fkey,
        bkey,
        params_digest(model_json(cfg, weights_digest)),
        f"joblib={cfg.export.joblib_classifier}",
        f"full_model={FULL_MODEL_VERSION}",
    )


@task(name="fit-classifier", persist_result=True)
def fit_task(cfg: TrainFlowConfig, stores: list[str], key: str, out: str, force: bool = False) -> str:
    """Fit the classifier (cached on ``key``; reused if a concurrent run wrote it)."""

    def build() -> None:
        fit_classifier(cfg, stores, Path(out))
        write_file_digest(Path(out))

    return build_once(out, force, file_matches, build)


@task(name="export-backbone", persist_result=True)
def export_backbone_task(cfg: TrainFlowConfig, key: str, out: str, force: bool = False) -> str:
    """Export the backbone (cached on ``key``: weights, input size, formats)."""
    return build_once(out, force, matches_manifest, lambda: export_backbone(cfg, Path(out)))


@task(name="export-bundle", persist_result=True)
def export_task(
    cfg: TrainFlowConfig, classifier: str, backbone: str, key: str, out: str, weights_digest: str, force: bool = False
) -> str:
    """Assemble the deployment bundle from the exported backbone and the classifier (cached on ``key``)."""
    return build_once(
        out,
        force,
        matches_manifest,
        lambda: export_bundle(cfg, Path(classifier), Path(out), weights_digest, Path(backbone)),
    )


def fit_stage(cfg: TrainFlowConfig, root: Path, stores: list[str]) -> tuple[str, str]:
    """Run the cached fit on the training ``stores``; ``(classifier file, fit key)``."""
    key, force = fit_key(cfg, stores), "fit" in cfg.force
    out = root / "models" / f"{key[:32]}.skops"
    return run_stage(fit_task, root, out, file_matches, force, cfg, stores, key, str(out), force), key


def export_stage(cfg: TrainFlowConfig, root: Path, classifier: str, fkey: str, weights_digest: str) -> str:
    """Run the cached backbone export and bundle assembly; the bundle folder (``deployment_model``)."""
    force = "export" in cfg.force
    bkey = backbone_key(cfg, weights_digest)
    bout = root / "backbones" / bkey[:32]
    backbone = run_stage(export_backbone_task, root, bout, matches_manifest, force, cfg, bkey, str(bout), force)
    ekey = bundle_key(cfg, fkey, bkey, weights_digest)
    eout = root / "bundles" / ekey[:32] / "deployment_model"
    return run_stage(
        export_task,
        root,
        eout,
        matches_manifest,
        force,
        cfg,
        classifier,
        backbone,
        ekey,
        str(eout),
        weights_digest,
        force,
    )
