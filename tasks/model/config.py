"""Configuration of the training flow: the reference experiment's sections and meanings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictInt, model_validator

from tasks.config import StrictModel
from tasks.features.layers import resolve_layers
from tasks.features.weights import SUPPORTED_BACKBONES
from tasks.runner import RunnerSection

BackboneName = Literal["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "dino_vitb8"]
assert set(BackboneName.__args__) == set(SUPPORTED_BACKBONES)  # type: ignore[attr-defined]


class DatamoduleSection(StrictModel):
    """Which patch dataset and which of its samples."""

    data_path: str = Field(description="Patch dataset folder (ours or Quadra's)")
    train_filename: str = "dataset.txt"
    include_filter: list[str] | None = Field(None, description="Keep only samples whose name contains one of these")
    exclude_filter: list[str] | None = Field(None, description="Drop samples whose name contains one of these")
    class_to_idx: dict[str, StrictInt] | None = Field(
        None, description="Class map; default: the dataset's own (patchflow.json)"
    )
    seed: StrictInt = 42
    batch_size: StrictInt = Field(32, ge=1)
    num_workers: StrictInt = Field(
        1, ge=0, description="Kept for config compatibility; decoding is done once per image"
    )
    balance_classes: bool = False
    class_to_skip_training: list[str] | None = Field(
        None, description="Class names left out of training (-1 in validation)"
    )


class BackboneSection(StrictModel):
    """Frozen pretrained feature extractor."""

    name: BackboneName = Field("mobilenet_v2", description="Backbone architecture")
    weights: str | None = Field(
        "imagenet", description="'imagenet' (offline: file, hub cache or package), a file path, or null"
    )
    freeze: bool = True
    feature_layers: Literal["final", "multiscale"] | list[str] = Field(
        "multiscale",
        description="Which outputs make the feature vector: 'final' (the reference's pooled last layer), "
        "'multiscale' (CNNs: stride-8 and stride-16 maps + final; dino_vitb8: mean patch token + CLS) or a list of "
        "layer names (README: Backbones)",
    )
    pooling: Literal["avg", "avg+max"] = Field(
        "avg", description="How each feature map is pooled: global average, or average and max concatenated"
    )

    @model_validator(mode="after")
    def _layers_exist(self) -> BackboneSection:
        resolve_layers(self.name, self.feature_layers)  # an unknown layer name is refused when the config is read
        return self


class TransformsSection(StrictModel):
    """Patch preprocessing (the same for every split)."""

    input_height: StrictInt = Field(224, ge=16)
    input_width: StrictInt = Field(224, ge=16)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class TrainerSection(StrictModel):
    """Which training samples: random passes over the training list, plus the train images' grid patches."""

    iteration_over_training: StrictInt = Field(20, ge=1, le=1000)
    grid_patches: bool = Field(
        True,
        description="Also train on the grid patches of the train images, cut and labelled as the val/test patches "
        "(#DISCARD# ones left out); false: the reference's random passes only",
    )
    area_threshold: float | None = Field(
        None, ge=0, le=1, description="Grid patch labelling; default: the dataset's (patchflow.json), else 0.45"
    )
    area_defect_threshold: float | None = Field(
        None, ge=0, le=1, description="Grid patch labelling; default: the dataset's (patchflow.json), else 0.2"
    )


class ModelSection(StrictModel):
    """Any scikit-learn classifier by import path and keyword arguments."""

    classifier: str = Field(
        "sklearn.linear_model.LogisticRegression", description="Import path of the classifier class"
    )
    params: dict[str, Any] = Field(default_factory=lambda: {"max_iter": 10000})
    trusted_types: list[str] = Field(
        default_factory=list,
        description="Types outside skops's trusted defaults that the fitted classifier may hold and the train flow "
        "may load back (e.g. sklearn.neural_network._stochastic_optimizers.AdamOptimizer); loading a type "
        "runs its code. The configured classifier class and scikit-learn's tree storage are always "
        "accepted",
    )


class AutoBatchSection(StrictModel):
    """Halve the batch on out-of-memory (never on other errors)."""

    starting_batch_size: StrictInt = Field(1024, ge=1)
    disable: bool = True


class TaskSection(StrictModel):
    """Where and how to compute."""

    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    automatic_batch_size: AutoBatchSection = Field(default_factory=AutoBatchSection)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast (fast on AMX CPUs and recent GPUs)")
    shard_patches: StrictInt = Field(
        4096,
        ge=1,
        description="Patches per feature shard (rounded up to whole 1024-row chunks): the unit of parallel work and "
        "of resume",
    )
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="Feature runtime; auto = ONNX Runtime on CPU at fp32 when installed (faster on CPUs), else torch",
    )
    reconstruction_method: Literal["major_voting", "priority", "soft"] = Field(
        "major_voting", description="How patch predictions become pixel maps (soft = mean class probabilities)"
    )
    coverage_threshold: float = Field(
        0.3, gt=0, le=1, description="Share of a defect's pixels that must be predicted for it to count as detected"
    )
    soft_thresholds: dict[str, float] | None = Field(
        None, description="soft method only: class name -> minimum mean probability for a pixel to take that class"
    )
    report: bool = Field(
        True, description="Write validation/report.html with figures (confusion matrix, overlays, example grids)"
    )


class ExportSection(StrictModel):
    """Deployment bundle formats."""

    types: list[Literal["torchscript", "onnx", "pytorch"]] = Field(default_factory=lambda: ["torchscript"])
    joblib_classifier: bool = Field(
        False,
        description="Also write classifier.joblib (a pickle) for Quadra's test task; patchflow reads "
        "classifier.skops, and loads a joblib classifier only with trust_pickle (a pickle runs any "
        "code it holds)",
    )


class CoreSection(StrictModel):
    """Run naming and the global seed."""

    name: str = "sklearn-classification-patch"
    tag: str = "run"
    seed: StrictInt = 42
    runs_folder: str = Field("runs", description="Run folders go to <runs_folder>/<name>/<timestamp>")


STAGES = ("features", "val_features", "fit", "export", "validate")


class TrainFlowConfig(StrictModel):
    """Configuration of the training flow."""

    datamodule: DatamoduleSection
    backbone: BackboneSection = Field(default_factory=BackboneSection)
    transforms: TransformsSection = Field(default_factory=TransformsSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection = Field(default_factory=TaskSection)
    export: ExportSection = Field(default_factory=ExportSection)
    core: CoreSection = Field(default_factory=CoreSection)
    runner: RunnerSection = Field(
        default_factory=RunnerSection, description="Where feature shards run (thread or a Dask cluster)"
    )
    storage_root: str | None = Field(
        None, description="Results/cache/features root (default $PATCHFLOW_STORAGE_ROOT or ./.patchflow)"
    )
    force: list[Literal["features", "val_features", "fit", "export", "validate"]] = Field(
        default_factory=list, description="Stages to recompute even when cached"
    )

    @model_validator(mode="after")
    def _vit_input_size(self) -> TrainFlowConfig:
        t = self.transforms
        if self.backbone.name == "dino_vitb8" and (t.input_height % 8 or t.input_width % 8):
            raise ValueError(
                f"backbone dino_vitb8 needs transforms.input_height/input_width that are multiples of 8 "
                f"(its patch size), got {t.input_height}x{t.input_width}"
            )
        return self
