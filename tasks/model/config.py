"""Configuration of the training flow: the reference experiment's sections and meanings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tasks.config import StrictModel
from tasks.device import Device, check_precision
from tasks.features.layers import resolve_layers
from tasks.features.weights import SUPPORTED_BACKBONES
from tasks.model.recipes import DEFAULT_GRID, apply_recipe, check_model
from tasks.model.spec import describe, shorthand_spec
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
    num_workers: StrictInt = Field(1, ge=0, description="Threads decoding val/test patch files (0 or 1: none)")
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
    freeze: bool = Field(True, description="Only true: backbones are frozen feature extractors")
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

    @field_validator("freeze")
    @classmethod
    def _frozen(cls, v: bool) -> bool:
        if v is not True:
            raise ValueError("patchflow's backbones are frozen feature extractors (never trained): set it to true")
        return v


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


def _spec_schema(schema: dict[str, Any]) -> None:
    """JSON schema of ``model``: the shorthand's keys, or a ``_target_`` spec with its own arguments."""
    schema["additionalProperties"] = True
    schema["properties"].pop("spec", None)
    schema["properties"]["_target_"] = {"type": "string", "description": "Import path of the estimator (Hydra)"}


class ModelSection(StrictModel):
    """The scikit-learn estimator: a Hydra ``_target_`` spec (any estimator or ``Pipeline``, parts as nested
    specs), or the shorthand ``classifier`` + ``params``. It must have ``fit`` and ``predict_proba``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_spec_schema)

    classifier: str = Field(
        "sklearn.linear_model.LogisticRegression", description="Shorthand: import path of the classifier class"
    )
    params: dict[str, Any] = Field(
        default_factory=lambda: {"max_iter": 10000}, description="Shorthand: keyword arguments of the classifier"
    )
    spec: dict[str, Any] | None = Field(
        None,
        description="The _target_ form, written at the top of model (model: {_target_: sklearn.pipeline.Pipeline, "
        "steps: [[scaler, {_target_: ...}], [clf, {_target_: ...}]]}); built with hydra.utils.instantiate",
    )
    trusted_types: list[str] = Field(
        default_factory=list,
        description="Types outside skops's trusted defaults that the fitted classifier may hold and the train flow "
        "may load back (e.g. sklearn.neural_network._stochastic_optimizers.AdamOptimizer); loading a type "
        "runs its code. The classes the model spec names and scikit-learn's tree storage are always "
        "accepted",
    )

    @model_validator(mode="before")
    @classmethod
    def _target_form(cls, data: Any) -> Any:
        """``{_target_: ..., args..., trusted_types: [...]}`` -> ``{spec: {...}, trusted_types: [...]}``."""
        if not (isinstance(data, dict) and "_target_" in data):
            return data
        spec = {k: v for k, v in data.items() if k != "trusted_types"}
        both = sorted({"classifier", "params", "spec"} & set(spec))
        if both:
            raise PydanticCustomError(
                "model_form", "give either _target_ or classifier/params, not both (found _target_ and {both})",
                {"both": both},
            )  # fmt: skip
        return {"spec": spec} | ({"trusted_types": data["trusted_types"]} if "trusted_types" in data else {})

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumped as written: the ``_target_`` form, or the shorthand."""
        out = handler(self)
        spec = out.pop("spec", None)
        if spec is None:
            return out
        return {**spec, **({"trusted_types": out["trusted_types"]} if "trusted_types" in out else {})}  # exclude_*

    def target_spec(self) -> dict[str, Any]:
        """The model as a ``_target_`` spec (the shorthand converted)."""
        return dict(self.spec) if self.spec is not None else shorthand_spec(self.classifier, self.params)

    def label(self) -> str:
        """The model in one short line, for messages."""
        return self.classifier if self.spec is None else describe(self.spec)


class SearchSection(StrictModel):
    """Classifier search on the cached training features: every setting of ``grid`` scored by cross-validation
    grouped by source image, the best refitted on all rows."""

    #: off by default: on mtd-dev the fixed default (C=1, balanced) ties the best setting of grouped CV, and the
    #: search's pick moves between C=0.3, 1 and 3 with the fold count (README: Classifier search)
    enabled: bool = False
    grid: dict[str, list[Any]] = Field(
        default_factory=lambda: dict(DEFAULT_GRID),
        description="Parameter path (scikit-learn set_params name, e.g. clf__C, or a pipeline step name) -> values "
        "to try (a value may be a _target_ spec or passthrough); the default fits the default pipeline",
    )
    folds: StrictInt = Field(
        3,
        ge=2,
        le=50,
        description="GroupKFold folds (no image in two folds); 3 keeps 12 settings near 30 s on mtd-dev (2 cores)",
    )
    metric: Literal["macro_f1", "balanced_accuracy"] = "macro_f1"
    n_jobs: StrictInt = Field(2, ge=1, description="Parallel fits (processes); does not change the result")


class AutoBatchSection(StrictModel):
    """Halve the batch on out-of-memory (never on other errors)."""

    starting_batch_size: StrictInt = Field(1024, ge=1)
    disable: bool = True


#: Quadra's task.output keys -> TaskSection fields
_OUTPUT_KEYS = {
    "folder": "output_folder",
    "report": "report",
    "example": "example",
    "reconstruction_method": "reconstruction_method",
}


class TaskSection(StrictModel):
    """Where and how to compute."""

    device: Device = Field(
        "cpu", description="cpu, cuda or cuda:N (the GPU's index, e.g. cuda:2); never a CPU fallback"
    )
    automatic_batch_size: AutoBatchSection = Field(default_factory=AutoBatchSection)
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp16/bf16 = autocast (fp16: GPU only; bf16: fast on AMX CPUs and recent GPUs)"
    )
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
        True,
        description="Write <output_folder>/report.html with figures (confusion matrix, overlays, example grids)",
    )
    example: bool = Field(True, description="Example grids of concordant/discordant val patches in the report")
    output_folder: str = Field(
        "classification_patch_experiment", description="Run sub-folder of the validation report (Quadra's name)"
    )

    @field_validator("output_folder")
    @classmethod
    def _folder(cls, v: str) -> str:
        parts = v.replace("\\", "/").split("/")
        if not v.strip() or v.startswith("/") or ".." in parts:
            raise ValueError("give a folder name inside the run folder (no absolute path, no '..')")
        return v

    @model_validator(mode="before")
    @classmethod
    def _output(cls, data: Any) -> Any:
        """Quadra's ``task.output: {folder, report, example, reconstruction_method}`` -> this section's keys."""
        if not (isinstance(data, dict) and "output" in data):
            return data
        out, output = dict(data), data["output"]
        if not isinstance(output, dict):
            raise PydanticCustomError("output", "task.output must be a mapping of folder/report/example/"
                                      "reconstruction_method")  # fmt: skip
        for key, value in output.items():
            flat = _OUTPUT_KEYS.get(key)
            if flat is None:
                raise PydanticCustomError(
                    "output", "unknown key 'task.output.{key}'; task.output takes {known}",
                    {"key": str(key)[:100], "known": ", ".join(_OUTPUT_KEYS)},
                )  # fmt: skip
            if flat in data and data[flat] != value:
                raise PydanticCustomError(
                    "output", "task.output.{key} and task.{flat} differ: give one", {"key": key, "flat": flat}
                )
            out[flat] = value
        del out["output"]
        return out


class ExportSection(StrictModel):
    """Deployment bundle formats."""

    types: list[Literal["torchscript", "onnx", "pytorch"]] = Field(default_factory=lambda: ["torchscript"])  # type: ignore[arg-type]
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


STAGES = ("features", "val_features", "search", "fit", "export", "validate")


class TrainFlowConfig(StrictModel):
    """Configuration of the training flow."""

    recipe: Literal["patchflow", "quadra"] = Field(
        "patchflow",
        description="Defaults of every setting left unset: patchflow (train-split grid patches, multi-scale "
        "features, scaler + class-balanced logistic regression) or quadra (the reference's recipe: random crops "
        "only, final features, plain LogisticRegression(max_iter=10000))",
    )
    datamodule: DatamoduleSection
    backbone: BackboneSection = Field(default_factory=BackboneSection)
    transforms: TransformsSection = Field(default_factory=TransformsSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    model: ModelSection = Field(default_factory=ModelSection)
    search: SearchSection = Field(default_factory=SearchSection)
    task: TaskSection = Field(default_factory=TaskSection)
    export: ExportSection = Field(default_factory=ExportSection)
    core: CoreSection = Field(default_factory=CoreSection)
    runner: RunnerSection = Field(
        default_factory=RunnerSection, description="Where feature shards run (thread or a Dask cluster)"
    )
    storage_root: str | None = Field(
        None, description="Results/cache/features root (default $PATCHFLOW_STORAGE_ROOT or ./.patchflow)"
    )
    force: list[Literal["features", "val_features", "search", "fit", "export", "validate"]] = Field(
        default_factory=list, description="Stages to recompute even when cached"
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        """Fill every setting the user left unset from the recipe's preset (explicit keys win)."""
        return apply_recipe(cls, data)

    @model_validator(mode="after")
    def _model_builds(self) -> TrainFlowConfig:
        """The model spec builds into an estimator with fit and predict_proba, and the search grid fits it."""
        default = self.search.enabled and "grid" not in self.search.model_fields_set  # addressed to the user's model
        grid = check_model(
            self.model.target_spec(), self.core.seed, self.search.grid if self.search.enabled else None, default
        )
        if default and grid is not None:
            self.search.grid = grid
        return self

    @model_validator(mode="after")
    def _vit_input_size(self) -> TrainFlowConfig:
        t = self.transforms
        if self.backbone.name == "dino_vitb8" and (t.input_height % 8 or t.input_width % 8):
            raise ValueError(
                f"backbone dino_vitb8 needs transforms.input_height/input_width that are multiples of 8 "
                f"(its patch size), got {t.input_height}x{t.input_width}"
            )
        check_precision(self.task.precision, self.task.device)  # fp16 on the CPU is refused
        return self
