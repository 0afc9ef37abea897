"""A composed Quadra-style experiment mapped onto the flows' configs, with Quadra's meaning for every key.

:func:`to_flow_data` turns the plain data :func:`tasks.compose.compose_config` returns into the mapping that
``TrainFlowConfig`` (training experiment) or ``EvaluateFlowConfig`` (test experiment) validates:

- ``task._target_`` names the task (Quadra's ``PatchSklearnClassification`` / ``...TestClassification``): the other
  flow's experiment is refused naming the right command;
- ``backbone.model.pretrained`` -> ``backbone.weights`` (``imagenet`` or ``null`` = random init);
  ``backbone.model.freeze`` must be true; ``backbone.metadata`` is descriptive (as in Quadra);
- ``transforms`` and ``datamodule.{train,val,test}_transform`` must be the pipeline patchflow applies (Quadra's
  ``default_resize``: Resize(input_height, input_width, cubic) + Normalize(mean, std)); what remains is
  ``transforms.{input_height, input_width, mean, std}``;
- the test experiment takes the class map, preprocessing and backbone from the bundle, as Quadra's test task does
  (``datamodule.class_to_idx``, ``backbone``, ``transforms``, ``model``, ``trainer``, ``export`` are not used).

A key patchflow cannot honour is a :class:`~tasks.config.ConfigError` naming it; everything else is left to the
pydantic models (unknown keys are named there).
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.config import ConfigError, short_repr

logger = logging.getLogger("patchflow.experiment")

TRAIN_TASK = "quadra.tasks.PatchSklearnClassification"
TEST_TASK = "quadra.tasks.PatchSklearnTestClassification"
_TASKS = {
    "TrainFlowConfig": (TRAIN_TASK, "python -m flows.train"),
    "EvaluateFlowConfig": (TEST_TASK, "python -m flows.evaluate"),
}
_TARGETS = {
    "datamodule": "quadra.datamodules.PatchSklearnClassificationDataModule",
    "trainer": "quadra.trainers.classification.SklearnClassificationTrainer",
}
#: Quadra sections patchflow has no counterpart for: what to do instead
UNSUPPORTED = {
    "logger": "patchflow records runs in Prefect (UI, artifacts) and main.log, not MLflow/CSV loggers",
    "callbacks": "patchflow trains no Lightning model",
    "hparams_search": "use search.enabled (classifier search by grouped cross-validation)",
    "inference": "patchflow picks ONNX Runtime / TorchScript settings itself (task.runtime)",
}
_METADATA = ("input_size", "output_dim", "patch_size", "nb_heads")
_SPLITS = ("train_transform", "val_transform", "test_transform")
#: datamodule keys of the test experiment that Quadra's test task does not use (class_to_idx comes from model.json)
_TEST_UNUSED = ("train_filename", "seed", "balance_classes", "class_to_skip_training", "class_to_idx")


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"{key}: {why}")


def _check_target(data: dict[str, Any], section: str, want: str) -> None:
    sec = data.get(section)
    if isinstance(sec, dict) and "_target_" in sec:
        got = sec.pop("_target_")
        if got != want:
            raise _fail(f"{section}._target_", f"{short_repr(got)} is not {want}, the one patchflow runs; remove it")


def _task(data: dict[str, Any], flow: str) -> None:
    want = _TASKS[flow][0]
    task = data.get("task")
    if not isinstance(task, dict):
        return
    got = task.pop("_target_", want)
    if got != want:
        other = next((c for t, c in _TASKS.values() if t == got), None)
        fix = f"run it with {other}" if other else f"patchflow runs {want} here"
        raise _fail("task._target_", f"this experiment runs {short_repr(got)}; {fix}")
    half = task.pop("half_precision", False)
    if half:
        raise _fail("task.half_precision", "patchflow computes in fp32 or bf16: set task.precision: bf16 instead")


def _backbone(data: dict[str, Any]) -> None:
    b = data.get("backbone")
    if not isinstance(b, dict):
        return
    model = b.pop("model", None) or {}
    for key in ("_target_", "model_name", "repo_or_dir"):
        if key in model:
            raise _fail(
                f"backbone.model.{key}",
                "patchflow builds its own backbones: pick one with backbone=NAME (resnet18, resnet50, mobilenetv2, "
                "efficientnet_b0, dino_vitb8) and set backbone.model.pretrained",
            )
    if model.pop("freeze", True) is not True:
        raise _fail(
            "backbone.model.freeze",
            "patchflow's backbones are frozen feature extractors (the sklearn tasks never train them): set it to true",
        )
    if model.pop("hyperspherical", False):
        raise _fail("backbone.model.hyperspherical", "L2-normalised features are not supported: set it to false")
    if "pretrained" in model:
        pretrained = model.pop("pretrained")
        if pretrained is True:
            b.setdefault("weights", "imagenet")
        elif pretrained is False:
            if b.get("weights") not in (None, "imagenet"):
                raise _fail("backbone.model.pretrained", "false (random init) contradicts backbone.weights: drop one")
            b["weights"] = None
        else:
            raise _fail("backbone.model.pretrained", f"give true or false (got {short_repr(pretrained)})")
    if model:
        raise _fail(f"backbone.model.{next(iter(model))}", "unknown key; backbone.model takes pretrained and freeze")
    meta = b.pop("metadata", None) or {}
    if "checkpoint" in meta:
        raise _fail(
            "backbone.metadata.checkpoint",
            "a pickled model is never loaded: give its state dict as backbone.weights: FILE.pth",
        )
    extra = sorted(set(meta) - set(_METADATA))
    if extra:
        raise _fail(f"backbone.metadata.{extra[0]}", f"unknown key; backbone.metadata holds {', '.join(_METADATA)}")


def standard_pipeline(t: dict[str, Any]) -> dict[str, Any]:
    """Quadra's ``default_resize`` pipeline for ``transforms`` ``t`` (``always_apply`` flags left out)."""
    normalize = {
        "_target_": "albumentations.Compose",
        "transforms": [
            {"_target_": "albumentations.Normalize", "mean": t.get("mean"), "std": t.get("std")},
            {"_target_": "albumentations.pytorch.ToTensorV2"},
        ],
    }
    resize = {
        "_target_": "albumentations.Resize",
        "height": t.get("input_height"),
        "width": t.get("input_width"),
        "interpolation": 2,
    }
    return {"_target_": "albumentations.Compose", "transforms": [resize, normalize]}


def _plain(node: Any) -> Any:
    """A pipeline without ``always_apply`` flags, numbers as floats (for comparison)."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items() if k != "always_apply"}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else node


def _transforms(data: dict[str, Any]) -> None:
    t = data.get("transforms")
    if not isinstance(t, dict):
        return
    want = _plain(standard_pipeline(t))
    dm = data.get("datamodule")
    sections: list[tuple[str, dict[str, Any]]] = [("transforms", t)] + (
        [("datamodule", dm)] if isinstance(dm, dict) else []
    )
    for section, sec in sections:
        for split in _SPLITS:
            if split in sec and sec[split] is not None and _plain(sec[split]) != want:
                raise _fail(
                    f"{section}.{split}",
                    "patchflow preprocesses every split as Quadra's default_resize does (Resize(input_height, "
                    "input_width, cubic) + Normalize(mean, std)); use transforms=default_resize and set "
                    "transforms.input_height/input_width/mean/std",
                )
            sec.pop(split, None)
    for key in ("normalize", "resize_center_crop", "standard_transform", "name"):
        t.pop(key, None)


def _unsupported(data: dict[str, Any]) -> None:
    for key, why in UNSUPPORTED.items():
        if data.get(key):
            raise _fail(key, f"{why}; remove it")
        data.pop(key, None)


def _to_evaluate(data: dict[str, Any]) -> dict[str, Any]:
    """The test experiment: model, preprocessing and classes come from the bundle (as in Quadra's test task)."""
    dm = data.get("datamodule")
    if isinstance(dm, dict):
        for key in _TEST_UNUSED:
            if dm.pop(key, None) is not None and key == "class_to_idx":
                logger.info("datamodule.class_to_idx: the bundle's model.json classes are used, as in Quadra")
    for key in ("backbone", "model", "trainer", "export", "transforms", "recipe", "search"):
        data.pop(key, None)
    return data


def to_flow_data(flow: str, composed: dict[str, Any]) -> dict[str, Any]:
    """``composed`` (a Quadra-style experiment's plain data) as the mapping the flow's config model validates;
    ``flow``: ``TrainFlowConfig`` or ``EvaluateFlowConfig``."""
    if flow not in _TASKS:
        raise ConfigError(f"experiments compose configs for flows.train and flows.evaluate, not {flow}")
    data = dict(composed)
    _unsupported(data)
    _task(data, flow)
    for section, target in _TARGETS.items():
        _check_target(data, section, target)
    _transforms(data)
    if flow == "EvaluateFlowConfig":
        return _to_evaluate(data)
    _backbone(data)
    return data
