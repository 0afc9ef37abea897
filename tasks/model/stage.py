"""Model stages: content keys and ``@task`` entry points of the classifier search, the fit, the backbone export
and the bundle export (the logic is in ``search.py``, ``fit.py`` and ``bundle.py``); :func:`search_stage`,
:func:`fit_stage` and :func:`export_stage` run them cached. The validation is the scoring stage of
``tasks/evaluation/stage.py`` (:func:`~tasks.evaluation.stage.validate_stage`).

Keys: search = the fit key's inputs + the grid, folds and metric; fit = the training stores' keys + model config +
the source digests of the user's own modules it uses + seed (+ the search's chosen setting); backbone export =
weights digest + name + input size + formats; bundle = fit key + backbone key + ``model.json`` + the joblib
opt-in + the one-file model's version. So changing the classifier computes no features and re-exports no
backbone, editing the user's classifier class refits, and an unchanged stage is never recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.fingerprint import combine, params_digest
from storage.layout import write_json
from storage.manifest import file_matches, matches_manifest, write_file_digest
from tasks.features.params import feature_options
from tasks.model.bundle import export_backbone, export_bundle, export_types, model_json
from tasks.model.config import TrainFlowConfig
from tasks.model.fit import fit_classifier, make_classifier
from tasks.model.onefile import FULL_MODEL_VERSION
from tasks.model.search import run_search, search_choice
from tasks.model.spec import user_module_digests
from tasks.stage import build_once, run_stage

#: bump when the search's record or its fold rule changes
SEARCH_VERSION = "search-1"


def fit_key(cfg: TrainFlowConfig, stores: list[str], choice: dict[str, Any] | None = None) -> str:
    """Key of the fit: the training stores (named by their keys), the model config, the source digests of the
    user's own modules the model uses, the seed and the search's chosen setting (when a search chose it)."""
    setting = choice["setting"] if choice else None
    user = user_module_digests(make_classifier(cfg, setting), cfg.model.target_spec())
    parts = [params_digest(user)] if user else []
    if choice:
        parts.append(params_digest({"search_setting": setting}))
    return combine(
        "fit",
        *sorted(Path(s).name for s in stores),
        params_digest(cfg.model.model_dump(mode="json")),
        str(cfg.core.seed),
        *parts,
    )


def search_key(cfg: TrainFlowConfig, stores: list[str]) -> str:
    """Key of the classifier search: the fit key's inputs (stores, model, user modules, seed) and the grid, folds,
    metric (not ``n_jobs``: it does not change the result)."""
    s = cfg.search
    return combine(
        "search",
        SEARCH_VERSION,
        fit_key(cfg, stores),
        params_digest({"grid": s.grid, "folds": s.folds, "metric": s.metric}),
    )


@task(name="search-classifier", persist_result=True)
def search_task(cfg: TrainFlowConfig, stores: list[str], key: str, out: str, force: bool = False) -> str:
    """Score the search grid by grouped cross-validation (cached on ``key``); the record's JSON file."""

    def build() -> None:
        record = run_search(cfg, stores)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), record)
        write_file_digest(Path(out))

    return build_once(out, force, file_matches, build)


@task(name="publish-search", cache_policy=NO_CACHE)
def publish_search_task(title: str, record: dict[str, Any]) -> None:
    """The search table (setting, mean and std of the metric over folds, fit seconds) as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    from tasks.artifacts import artifact_key

    rows = [
        {"setting": r["label"], f"{record['metric']} mean": r["mean"], "std": r["std"], "fit s": r["fit_s"]}
        for r in record["table"]
    ]
    best = record["table"][record["best"]]["label"]
    create_table_artifact(
        table=rows,
        key=artifact_key(f"{title}-search"),
        description=f"{title}: classifier search, {record['folds']}-fold CV grouped by image on {record['rows']} "
        f"rows of {record['images']} images; chosen: {best}",
    )


def backbone_key(cfg: TrainFlowConfig, weights_digest: str) -> str:
    """Key of the backbone export: weights, architecture, feature layers, input size and formats (never the
    classifier)."""
    size = [cfg.transforms.input_height, cfg.transforms.input_width]
    params = {"name": cfg.backbone.name, "size": size, "types": export_types(cfg), **feature_options(cfg)}
    return combine("backbone-export", weights_digest, params_digest(params))


def bundle_key(
    cfg: TrainFlowConfig, fkey: str, bkey: str, weights_digest: str, search: dict[str, Any] | None = None
) -> str:
    """Key of the deployment bundle: classifier, backbone export, ``model.json``, the joblib opt-in and the
    one-file model's layout version."""
    meta = model_json(cfg, weights_digest, search)
    return combine(
        "export",
        fkey,
        bkey,
        params_digest(meta),
        f"joblib={cfg.export.joblib_classifier}",
        f"full_model={FULL_MODEL_VERSION}",
    )


@task(name="fit-classifier", persist_result=True)
def fit_task(
    cfg: TrainFlowConfig,
    stores: list[str],
    key: str,
    out: str,
    force: bool = False,
    setting: dict[str, Any] | None = None,
) -> str:
    """Fit the classifier, with the search's ``setting`` if any (cached on ``key``; reused if a concurrent run
    wrote it)."""

    def build() -> None:
        fit_classifier(cfg, stores, Path(out), setting)
        write_file_digest(Path(out))

    return build_once(out, force, file_matches, build)


@task(name="export-backbone", persist_result=True)
def export_backbone_task(cfg: TrainFlowConfig, key: str, out: str, force: bool = False) -> str:
    """Export the backbone (cached on ``key``: weights, input size, formats)."""
    return build_once(out, force, matches_manifest, lambda: export_backbone(cfg, Path(out)))


@task(name="export-bundle", persist_result=True)
def export_task(
    cfg: TrainFlowConfig,
    classifier: str,
    backbone: str,
    key: str,
    out: str,
    weights_digest: str,
    force: bool = False,
    search: dict[str, Any] | None = None,
) -> str:
    """Assemble the deployment bundle from the exported backbone and the classifier (cached on ``key``)."""
    return build_once(
        out,
        force,
        matches_manifest,
        lambda: export_bundle(cfg, Path(classifier), Path(out), weights_digest, Path(backbone), search),
    )


def search_stage(cfg: TrainFlowConfig, root: Path, stores: list[str]) -> dict[str, Any] | None:
    """Run the cached classifier search on the training ``stores`` and publish its table; the chosen setting with
    its CV score (:func:`~tasks.model.search.search_choice`), or ``None`` when ``search.enabled`` is off."""
    if not cfg.search.enabled:
        return None
    key, force = search_key(cfg, stores), "search" in cfg.force
    out = root / "searches" / f"{key[:32]}.json"
    path = run_stage(search_task, root, out, file_matches, force, cfg, stores, key, str(out), force)
    record = json.loads(Path(path).read_text())
    publish_search_task(cfg.core.name, record)
    return search_choice(record)


def fit_stage(
    cfg: TrainFlowConfig, root: Path, stores: list[str], choice: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Run the cached fit on the training ``stores`` (with the search's ``choice``, if any); ``(classifier file,
    fit key)``."""
    key, force = fit_key(cfg, stores, choice), "fit" in cfg.force
    out = root / "models" / f"{key[:32]}.skops"
    setting = choice["setting"] if choice else None
    return run_stage(fit_task, root, out, file_matches, force, cfg, stores, key, str(out), force, setting), key


def export_stage(
    cfg: TrainFlowConfig,
    root: Path,
    classifier: str,
    fkey: str,
    weights_digest: str,
    search: dict[str, Any] | None = None,
) -> str:
    """Run the cached backbone export and bundle assembly (``search``: the classifier search's choice, recorded in
    ``model.json``); the bundle folder (``deployment_model``)."""
    force = "export" in cfg.force
    bkey = backbone_key(cfg, weights_digest)
    bout = root / "backbones" / bkey[:32]
    backbone = run_stage(export_backbone_task, root, bout, matches_manifest, force, cfg, bkey, str(bout), force)
    ekey = bundle_key(cfg, fkey, bkey, weights_digest, search)
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
        search,
    )
