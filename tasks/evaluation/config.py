"""Configuration of the evaluation flow (the reference's test experiment): dataset split, bundle, outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt

from tasks.config import StrictModel
from tasks.model.config import CoreSection


class EvalDatamodule(StrictModel):
    """Which patch dataset split to evaluate on."""

    data_path: str = Field(description="Patch dataset folder (ours or Quadra's)")
    split: Literal["test", "val"] = "test"
    include_filter: list[str] | None = None
    exclude_filter: list[str] | None = None
    batch_size: StrictInt = Field(32, ge=1)
    num_workers: StrictInt = Field(1, ge=0, description="Threads decoding patch files (0 or 1: none)")


class EvalOutput(StrictModel):
    """What to produce."""

    folder: str = "classification_patch_test"
    report: bool = True
    example: bool = True
    reconstruction_method: Literal["major_voting", "priority", "soft"] | None = Field(
        None, description="Default: the bundle's reconstruction_method"
    )
    coverage_threshold: float = Field(0.3, gt=0, le=1)
    soft_thresholds: dict[str, float] | None = Field(
        None, description="soft method only: class name -> minimum mean probability"
    )
    n_overlays: StrictInt = Field(6, ge=0)


class EvalTask(StrictModel):
    """The model and where it runs."""

    model_path: str = Field(
        description="deployment_model/ folder or any file in it (model.pt, model.onnx, model.pth, model.json)"
    )
    device: str = "cpu"
    output: EvalOutput = Field(default_factory=EvalOutput)
    trust_pickle: bool = Field(
        False,
        description="Load a bundle without a manifest (hand-made, Quadra's) or with a pickled "
        "classifier.joblib; a pickle runs any code it holds: only for bundles whose source "
        "you trust",
    )


class EvaluateFlowConfig(StrictModel):
    """Configuration of the evaluation flow (the reference's test experiment)."""

    datamodule: EvalDatamodule
    task: EvalTask
    core: CoreSection = Field(default_factory=lambda: CoreSection(name="sklearn-classification-patch-test"))
    storage_root: str | None = None
    force: list[Literal["features", "evaluate"]] = Field(default_factory=list)
