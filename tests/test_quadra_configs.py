"""Quadra-style experiments composed with Hydra (tasks/compose.py) and mapped onto the flows' configs
(tasks/experiment.py): the reference tutorial's two experiment files, kept verbatim in tests/quadra_configs/, and the
errors for what patchflow cannot honour."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.cli import parse_cli
from tasks.config import ConfigError
from tasks.evaluation.config import EvaluateFlowConfig
from tasks.model.config import TrainFlowConfig

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "quadra_configs"
TRAIN = "experiment=custom_experiment/sklearn_classification_patch"
TEST = "experiment=custom_experiment/sklearn_classification_patch_test"
TRAIN_FILE = CONFIGS / "experiment" / "custom_experiment" / "sklearn_classification_patch.yaml"
DEMO_CLASSES = "datamodule.class_to_idx={background: 0, blob: 1, scratch: 2, stain: 3}"


def train(*over: str, data: str = "datamodule.data_path=/data/patches") -> TrainFlowConfig:
    return parse_cli(TrainFlowConfig, ["--config-dir", str(CONFIGS), TRAIN, data, "task.device=cpu", *over], "")


def evaluate(*over: str) -> EvaluateFlowConfig:
    argv = ["--config-dir", str(CONFIGS), TEST, "datamodule.data_path=/data/p", "task.model_path=/m/model.pt", *over]
    return parse_cli(EvaluateFlowConfig, argv, "")


def refused(fn, *over: str, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn(*over)
    return str(info.value)


def test_tutorial_training_experiment_means_what_it_means_in_quadra() -> None:
    cfg = train(DEMO_CLASSES)
    dm = cfg.datamodule
    assert (dm.data_path, dm.batch_size, dm.num_workers, dm.seed) == ("/data/patches", 256, 8, 42)
    assert dm.class_to_idx == {"background": 0, "blob": 1, "scratch": 2, "stain": 3}
    assert dm.class_to_skip_training == ["background"] and dm.train_filename == "dataset.txt"
    assert (cfg.backbone.name, cfg.backbone.weights, cfg.backbone.freeze) == ("resnet18", "imagenet", True)
    assert (cfg.transforms.input_height, cfg.transforms.input_width) == (224, 224)
    assert cfg.trainer.iteration_over_training == 20
    assert cfg.model.spec == {
        "_target_": "sklearn.linear_model.LogisticRegression",
        "max_iter": 10000,
        "random_state": 42,
        "n_jobs": 10,
    }
    t = cfg.task
    assert (t.device, t.output_folder, t.report, t.example) == ("cpu", "classification_patch_experiment", True, True)
    assert t.reconstruction_method == "major_voting" and t.automatic_batch_size.disable is True
    assert t.automatic_batch_size.starting_batch_size == 1024
    assert cfg.export.types == ["torchscript"] and cfg.export.joblib_classifier is True
    assert (cfg.core.name, cfg.core.tag, cfg.core.seed, cfg.core.runs_folder) == (
        "experiment-name",
        "run",
        42,
        "logs/runs",
    )
    assert cfg.recipe == "quadra"
    assert train("task.device=cuda:2").task.device == "cuda:2"  # as written; resolving it is the device code's job


def test_tutorial_test_experiment_takes_the_model_from_the_bundle() -> None:
    cfg = evaluate(DEMO_CLASSES)  # class_to_idx comes from model.json, as in Quadra's test task
    assert (cfg.datamodule.data_path, cfg.datamodule.batch_size, cfg.datamodule.num_workers) == ("/data/p", 256, 8)
    assert cfg.datamodule.split == "test" and cfg.task.model_path == "/m/model.pt"
    o = cfg.task.output
    assert (o.folder, o.report, o.example, o.reconstruction_method) == (
        "classification_patch_test",
        True,
        True,
        "major_voting",
    )
    assert (cfg.core.name, cfg.core.tag) == ("experiment-test-name", "run") and cfg.task.trust_pickle is False
    assert evaluate("task.trust_pickle=true").task.trust_pickle is True
    argv = ["--config-dir", str(CONFIGS), TEST, "datamodule.data_path=/d"]
    with pytest.raises(ConfigError, match=r"missing required key 'task.model_path'"):
        parse_cli(EvaluateFlowConfig, argv, "")


def test_config_file_with_defaults_and_local_configs_folder(tmp_path: Path, monkeypatch) -> None:
    want = train().model_dump()
    by_file = parse_cli(
        TrainFlowConfig, ["--config", str(TRAIN_FILE), "datamodule.data_path=/data/patches", "task.device=cpu"], ""
    )
    assert by_file.model_dump() == want
    shutil.copytree(CONFIGS, tmp_path / "configs")  # ./configs/experiment is found without --config-dir
    monkeypatch.chdir(tmp_path)
    local = parse_cli(TrainFlowConfig, [TRAIN, "datamodule.data_path=/data/patches", "task.device=cpu"], "")
    assert local.model_dump() == want


def test_plain_files_are_read_as_before(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("datamodule: {data_path: /d}\ntask: {output: {folder: out, example: false}}\n")
    cfg = parse_cli(TrainFlowConfig, ["--config", str(plain), "backbone.name=resnet18"], "")
    assert (cfg.recipe, cfg.backbone.name, cfg.task.output_folder, cfg.task.example) == (
        "patchflow",
        "resnet18",
        "out",
        False,
    )
    assert cfg.core.runs_folder == "runs"


@pytest.mark.parametrize(
    ("option", "name"),
    [
        ("resnet18", "resnet18"),
        ("resnet50", "resnet50"),
        ("mobilenetv2", "mobilenet_v2"),
        ("mobilenet_v2", "mobilenet_v2"),
        ("efficientnet_b0", "efficientnet_b0"),
        ("dino_vitb8", "dino_vitb8"),
    ],
)
def test_backbone_group(option: str, name: str) -> None:
    cfg = train(f"backbone={option}", "backbone.model.pretrained=false")
    assert (cfg.backbone.name, cfg.backbone.weights) == (name, None)  # pretrained: false = random init


def test_overrides_groups_additions_and_removals() -> None:
    cfg = train("model=patchflow", "recipe=patchflow", "trainer.iteration_over_training=3", "storage_root=/s")
    assert cfg.model.spec is not None and cfg.model.spec["_target_"] == "sklearn.pipeline.Pipeline"
    assert (cfg.recipe, cfg.trainer.iteration_over_training, cfg.storage_root) == ("patchflow", 3, "/s")
    assert train("+task.runtime=torch", "task.shard_patches=1024").task.runtime == "torch"
    assert train("~datamodule.class_to_skip_training").datamodule.class_to_skip_training is None
    assert train("transforms.input_height=96").transforms.input_height == 96  # the pipelines follow (interpolation)
    assert train("backbone.weights=/w/r18.pth").backbone.weights == "/w/r18.pth"


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ("backbone.model.freeze=false", r"^backbone.model.freeze: patchflow's backbones are frozen"),
        ("transforms=default", r"^transforms.train_transform: patchflow preprocesses every split as Quadra's"),
        ("+task.half_precision=true", r"^task.half_precision: .* set task.precision: bf16"),
        ("+logger.mlflow.experiment_name=x", r"^logger: patchflow records runs in Prefect"),
        ("+backbone.model.model_name=resnet18.tv_in1k", r"^backbone.model.model_name: patchflow builds its own"),
        ("+backbone.metadata.checkpoint=/c.pt", r"^backbone.metadata.checkpoint: a pickled model is never loaded"),
        ("+task.output.rows=3", r"unknown key 'task.output.rows'; task.output takes folder, report"),
        ("task.output.folder=../x", r"'task.output_folder': .*no absolute path, no '..'"),
        ("+datamodule.enable_hashing=true", r"unknown key 'datamodule.enable_hashing'"),
        ("experiment=custom_experiment/nope", r"Could not find 'experiment/custom_experiment/nope'.*--config-dir"),
        ("backbone.model.pretrained=maybe", r"^backbone.model.pretrained: give true or false"),
        ("hydra.run.dir=/x", r"^override hydra.run.dir: patchflow runs no Hydra app .*core.runs_folder"),
    ],
)
def test_what_patchflow_cannot_honour_is_one_line_naming_the_key(over: str, match: str) -> None:
    msg = refused(train, over, match=match)
    assert "Traceback" not in msg and "\n  " not in msg.split("\n", 1)[-1][:0]


def test_flow_and_experiment_must_match() -> None:
    argv = ["--config-dir", str(CONFIGS), TEST, "datamodule.data_path=/d", "task.model_path=/m"]
    with pytest.raises(ConfigError, match=r"^task._target_: .*PatchSklearnTestClassification'; run it with python -m "):
        parse_cli(TrainFlowConfig, argv, "")
    with pytest.raises(ConfigError, match=r"run it with python -m flows.train"):
        parse_cli(EvaluateFlowConfig, ["--config-dir", str(CONFIGS), TRAIN, "datamodule.data_path=/d"], "")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("core:\n  name: a\n  name: b\n", r"key 'core.name' is given twice \(lines 5 and 6\)"),
        ("core:\n  name: !!python/object/apply:os.system [echo]\n", r"only plain values.*remove the tag"),
        ("hydra:\n  run:\n    dir: elsewhere\n", r"hydra: patchflow runs no Hydra app"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, "
         f"*{p}, *{p}, *{p}]\n" for p, c in zip("abcdef", "bcdefg")), r"aliases expand the document"),
    ],
)  # fmt: skip
def test_user_experiment_files_follow_the_safe_yaml_rules(tmp_path: Path, text: str, match: str) -> None:
    exp = tmp_path / "experiment" / "mine.yaml"
    exp.parent.mkdir()
    exp.write_text("# @package _global_\ndefaults:\n  - base/classification/sklearn_classification_patch\n" + text)
    with pytest.raises(ConfigError, match=match):
        parse_cli(TrainFlowConfig, ["--config-dir", str(tmp_path), "experiment=mine", "datamodule.data_path=/d"], "")
    with pytest.raises(ConfigError, match=match):
        parse_cli(TrainFlowConfig, ["--config", str(exp), "datamodule.data_path=/d"], "")


def test_nested_model_target_from_an_experiment(tmp_path: Path) -> None:
    exp = tmp_path / "experiment" / "pipe.yaml"
    exp.parent.mkdir()
    exp.write_text(
        "# @package _global_\ndefaults:\n  - base/classification/sklearn_classification_patch\n"
        "  - override /model: null\n  - _self_\n"  # as in Quadra: the experiment's model replaces the group's
        "model:\n  _target_: sklearn.pipeline.Pipeline\n  steps:\n"
        "    - [scaler, {_target_: sklearn.preprocessing.StandardScaler}]\n"
        "    - [clf, {_target_: sklearn.linear_model.LogisticRegression, C: 0.5, random_state: '${core.seed}'}]\n"
    )
    cfg = parse_cli(TrainFlowConfig, ["--config-dir", str(tmp_path), "experiment=pipe", "datamodule.data_path=/d"], "")
    assert cfg.model.spec is not None and cfg.model.spec["steps"][1][1] == {
        "_target_": "sklearn.linear_model.LogisticRegression",
        "C": 0.5,
        "random_state": 42,
    }
    assert cfg.backbone.name == "dino_vitb8"  # the base experiment's backbone
    bad = tmp_path / "experiment" / "bad.yaml"
    bad.write_text(exp.read_text().split("\nmodel:")[0] + "\nmodel:\n  _target_: sklearn.svm.LinearSVC\n")
    with pytest.raises(ConfigError, match=r"LinearSVC has no predict_proba"):
        parse_cli(TrainFlowConfig, ["--config-dir", str(tmp_path), "experiment=bad", "datamodule.data_path=/d"], "")
