"""Retraining flow (scheduled): dataset -> train -> new model version -> promote to latest if not worse.

``python -m flows.retrain --config FILE [dotted.key=value ...]``

Only images added or changed since the last run cost work (every stage is content-keyed); a run on
unchanged inputs adds no version. What was done is published as a markdown artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from storage.fingerprint import combine, params_digest
from tasks.cli import parse_cli, run_cli
from tasks.config import StrictModel, ensure_storage_root, validate_config
from tasks.dataset.config import DataSection, DatasetFlowConfig, GenerationSection
from tasks.features.stage import dataset_key
from tasks.runner import RunnerSection
from tasks.promotion import PromotionSection, latest_evaluation_config, newest_inputs_key, register_and_promote
from tasks.model.config import DatamoduleSection, TrainFlowConfig

from flows.dataset import dataset_flow
from flows.evaluate import evaluate_flow
from flows.train import train_flow


class RetrainDatamodule(DatamoduleSection):
    """Training data selection; ``data_path`` is set from ``dataset.output_folder``."""

    data_path: str = Field("", description="Set by the flow from dataset.output_folder")


class RetrainTrainConfig(TrainFlowConfig):
    """The train flow's sections, without a data path to fill in."""

    datamodule: RetrainDatamodule = Field(default_factory=RetrainDatamodule)


class RetrainFlowConfig(StrictModel):
    """Configuration of the retraining flow."""

    data: DataSection
    dataset: GenerationSection
    train: RetrainTrainConfig = Field(default_factory=RetrainTrainConfig)
    promotion: PromotionSection = Field(default_factory=PromotionSection)
    storage_root: str | None = Field(None, description="Results/cache/features root shared by the stages")
    runner: RunnerSection = Field(default_factory=RunnerSection,
                                  description="Where dataset and feature shards run (replaces train.runner)")


@task(name="register-model-version", cache_policy=NO_CACHE)
def register_task(bundle: str, folder: str, metrics: dict[str, Any], inputs_key: str, promotion: PromotionSection, run_dir: str,
                  latest_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the new bundle as a version and promote it by policy."""
    return register_and_promote(Path(bundle), Path(folder), metrics, inputs_key, promotion, run_dir, latest_metrics)


@flow(name="patchflow-retrain")
def retrain_flow(config: RetrainFlowConfig) -> dict[str, Any]:
    """Rebuild the dataset from the data folder, retrain, version the bundle and promote it if not worse."""
    cfg = validate_config(RetrainFlowConfig, config)
    ensure_storage_root(cfg.storage_root)  # before any stage: one clear line for a file-shaped or read-only root
    data_path = dataset_flow(DatasetFlowConfig(data=cfg.data, dataset=cfg.dataset, storage_root=cfg.storage_root, runner=cfg.runner))
    train_cfg = TrainFlowConfig.model_validate(
        cfg.train.model_dump(mode="json") | {"storage_root": cfg.storage_root, "runner": cfg.runner.model_dump(mode="json")}
        | {"datamodule": cfg.train.datamodule.model_dump(mode="json") | {"data_path": data_path}}
    )
    result = train_flow(train_cfg)
    training = train_cfg.model_dump(mode="json", exclude={"core": {"runs_folder"}, "force": True, "storage_root": True,
                                                          "runner": True, "task": {"shard_patches"}})
    training["datamodule"].pop("data_path")
    inputs_key = combine(dataset_key(data_path), params_digest(training))
    folder = Path(cfg.promotion.models_folder) / train_cfg.core.name
    latest_metrics = None
    ecfg = latest_evaluation_config(folder, cfg.promotion, train_cfg, cfg.storage_root)
    if ecfg is not None and newest_inputs_key(folder) != inputs_key:  # a new version: judge both on the same split
        state = evaluate_flow(ecfg, return_state=True)
        latest_metrics = state.result()["metrics"] if state.is_completed() else None  # else: the recorded value
    outcome = register_task(result["bundle"], str(folder), result["metrics"], inputs_key, cfg.promotion, result["run_dir"],
                            latest_metrics)
    create_markdown_artifact(
        key="retrain-outcome",
        markdown=(
            f"# Retraining: {outcome['action']}\n\n- new version: `{outcome['version']}`\n- latest: `{outcome['latest']}`\n"
            f"- {outcome['metric']}: {outcome.get('value')} (previous {outcome.get('previous_value')})\n"
            f"- why: {outcome['reason']}\n- models: `{folder.resolve()}`\n- run: `{result['run_dir']}`\n"
        ),
        description="what the retraining run did",
    )
    return {"outcome": outcome, **result}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse_cli(RetrainFlowConfig, argv, description=__doc__)
    res = retrain_flow(cfg)
    o = res["outcome"]
    print(f"{o['action']}: version {o['version']}, latest {o['latest']} ({o['reason']})")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
