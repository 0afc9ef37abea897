"""Configuration of the retraining flow (plain pydantic, no Prefect: ``python -m flows.retrain`` checks it before
Prefect is imported)."""

from __future__ import annotations

from pydantic import Field

from tasks.config import StrictModel
from tasks.dataset.config import DataSection, GenerationSection
from tasks.model.config import DatamoduleSection, TrainFlowConfig
from tasks.promotion import PromotionSection
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
