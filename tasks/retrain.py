"""Scheduled retraining: its configuration and the steps between the dataset, train and evaluate flows.

The retrain flow rebuilds the dataset, trains on it (:func:`train_config`), keys the new model by its
inputs (:func:`inputs_key`: dataset fingerprint + training configuration), re-scores the promoted model on
the same val split when there is a new version to judge (:func:`comparison_config`), then registers and
promotes by policy (``tasks/promotion.py``) and publishes the outcome (:func:`publish_outcome`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from storage.fingerprint import combine, params_digest
from tasks.config import StrictModel
from tasks.dataset.config import DataSection, GenerationSection
from tasks.evaluation.config import EvaluateFlowConfig
from tasks.features.stage import dataset_key
from tasks.model.config import DatamoduleSection, TrainFlowConfig
from tasks.promotion import PromotionSection, latest_evaluation_config, newest_inputs_key, register_and_promote
from tasks.runner import RunnerSection


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
    runner: RunnerSection = Field(
        default_factory=RunnerSection, description="Where dataset and feature shards run (replaces train.runner)"
    )


def train_config(cfg: RetrainFlowConfig, data_path: str) -> TrainFlowConfig:
    """The train flow's configuration: ``cfg.train`` on the dataset at ``data_path``, shared root and runner."""
    return TrainFlowConfig.model_validate(
        cfg.train.model_dump(mode="json")
        | {"storage_root": cfg.storage_root, "runner": cfg.runner.model_dump(mode="json")}
        | {"datamodule": cfg.train.datamodule.model_dump(mode="json") | {"data_path": data_path}}
    )


def inputs_key(train_cfg: TrainFlowConfig, data_path: str) -> str:
    """What a model version is made from: the dataset's fingerprint and every training setting changing the model."""
    training = train_cfg.model_dump(
        mode="json",
        exclude={
            "core": {"runs_folder"},
            "force": True,
            "storage_root": True,
            "runner": True,
            "task": {"shard_patches"},
        },
    )
    training["datamodule"].pop("data_path")
    return combine(dataset_key(data_path), params_digest(training))


def models_folder(cfg: RetrainFlowConfig, train_cfg: TrainFlowConfig) -> Path:
    """Where this model's versions live: ``<promotion.models_folder>/<core.name>``."""
    return Path(cfg.promotion.models_folder) / train_cfg.core.name


def comparison_config(cfg: RetrainFlowConfig, train_cfg: TrainFlowConfig, key: str) -> EvaluateFlowConfig | None:
    """The evaluation that re-scores the promoted model on this run's val split, when a new version is to be judged
    against it (None: nothing promoted, a policy that does not compare, other classes, or unchanged inputs)."""
    folder = models_folder(cfg, train_cfg)
    ecfg = latest_evaluation_config(folder, cfg.promotion, train_cfg, cfg.storage_root)
    return ecfg if ecfg is not None and newest_inputs_key(folder) != key else None


#: register the new bundle as a version and promote it by policy (``tasks/promotion.py``), as a Prefect task
register_task = task(name="register-model-version", cache_policy=NO_CACHE)(register_and_promote)


def publish_outcome(outcome: dict[str, Any], folder: Path, run_dir: str) -> None:
    """The ``retrain-outcome`` markdown artifact: what the run did and why."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="retrain-outcome",
        markdown=(
            f"# Retraining: {outcome['action']}\n\n- new version: `{outcome['version']}`\n"
            f"- latest: `{outcome['latest']}`\n"
            f"- {outcome['metric']}: {outcome.get('value')} (previous {outcome.get('previous_value')})\n"
            f"- why: {outcome['reason']}\n- models: `{Path(folder).resolve()}`\n- run: `{run_dir}`\n"
        ),
        description="what the retraining run did",
    )
