"""End to end, Quadra users' way: the reference tutorial's two experiment files (tests/quadra_configs/, verbatim; only
data_path, class_to_idx and device changed by overrides) train and test on the demo data, with a random-init
ResNet-18 in process and with ImageNet MobileNetV2 from the command line; the outputs are where the tutorial lists
them. Bundles interchange both ways: a Quadra deployment_model/ (hand-written from its documented layout) is
evaluated and predicted with under the trust flag, and Quadra's test task, reading a patchflow bundle, predicts what
patchflow's evaluation predicts."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._quadra import QUADRA_MODEL_JSON_KEYS, quadra_test_task, write_quadra_bundle

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "quadra_configs"
TRAIN = "experiment=custom_experiment/sklearn_classification_patch"
TEST = "experiment=custom_experiment/sklearn_classification_patch_test"
CLASSES = {"background": 0, "blob": 1, "scratch": 2, "stain": 3}
DEMO_CLASSES = "datamodule.class_to_idx={background: 0, blob: 1, scratch: 2, stain: 3}"
RUN_ROOT = {
    "classification_patch_experiment",
    "config_resolved.yaml",
    "config_tree.txt",
    "data",
    "deployment_model",
    "main.log",
    "reconstruction_results.json",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root, patch dataset with val and test splits and mask-less test images, raw images folder)."""
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("quadra")
    d = make_demo_dataset(root / "raw", n_images=14, size=(128, 160), seed=5, missing_mask_fraction=0.15)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask", warning_on_missing_mask=False)
    data = root / "patches"
    generate_patch_dataset(assoc, CLASSES, val_size=0.3, test_size=0.3, patch_size=[64, 64], output_folder=str(data))
    return root, data, Path(d["images"])


def _results(out: Path) -> dict[str, tuple[int, float]]:
    rows = csv.DictReader((out / "test_results.csv").open())
    return {r["sample"]: (int(r["pred_label"]), float(r["probability"])) for r in rows}


def _same_predictions(ours: dict[str, tuple[int, float]], quadra: dict[str, tuple[int, float, int]]) -> None:
    assert sorted(ours) == sorted(quadra) and ours
    assert all(ours[k][0] == quadra[k][0] for k in ours if quadra[k][1] > 0.51)  # not on near ties
    np.testing.assert_allclose([ours[k][1] for k in ours], [quadra[k][1] for k in ours], atol=1e-3)


def _check_train_run(run: Path) -> None:
    assert {p.name for p in run.iterdir()} >= RUN_ROOT, sorted(p.name for p in run.iterdir())
    out = run / "classification_patch_experiment"
    for name in ("test_results.csv", "test_confusion_matrix.png", "report.html", "metrics.json"):
        assert (out / name).is_file(), name
    assert list((out / "example").glob("concordant_*_original.png"))
    assert list((out / "example").glob("reconstruction_*.png"))
    recon = json.loads((run / "reconstruction_results.json").read_text())
    assert recon["patch_reconstruction_method"] == "major_voting" and recon["reconstructions_type"] == "polygon"
    bundle = run / "deployment_model"
    for name in ("model.pt", "model.json", "classifier.joblib", "classifier.skops"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "model.json").read_text())
    assert set(QUADRA_MODEL_JSON_KEYS) <= set(meta)
    assert meta["classes"] == {"0": "background", "1": "blob", "2": "scratch", "3": "stain"}
    assert meta["class_to_skip"] == ["background"] and meta["input_size"] == [[3, 224, 224]]


def test_tutorial_resnet18_random_init_trains_and_tests(demo, tmp_path: Path, monkeypatch, prefect_harness) -> None:
    from flows.evaluate import evaluate_flow
    from flows.train import train_flow
    from tasks.cli import parse_cli
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.model.config import TrainFlowConfig

    _, data, _ = demo
    monkeypatch.chdir(tmp_path)  # runs go to ./logs/runs/<core.name>/<timestamp>, as Quadra's Hydra run dirs
    common = [f"datamodule.data_path={data}", "task.device=cpu"]
    argv = ["--config-dir", str(CONFIGS), TRAIN, *common, DEMO_CLASSES, "backbone.model.pretrained=false"]
    cfg = parse_cli(TrainFlowConfig, argv, "")
    assert cfg.backbone.weights is None and cfg.backbone.name == "resnet18"
    res = train_flow(cfg)
    run = Path(res["run_dir"])
    assert run.parent == (tmp_path / "logs" / "runs" / "experiment-name").resolve()
    _check_train_run(run)
    assert "tag: run" in (run / "config_resolved.yaml").read_text()

    model_path = run / "deployment_model" / "model.pt"
    test_cfg = parse_cli(
        EvaluateFlowConfig, ["--config-dir", str(CONFIGS), TEST, *common, f"task.model_path={model_path}"], ""
    )
    res = evaluate_flow(test_cfg)
    test_run = Path(res["run_dir"])
    out = test_run / "classification_patch_test"
    assert Path(res["output"]) == out and (test_run / "reconstruction_results.json").is_file()
    assert (out / "test_results.csv").is_file() and (out / "report.html").is_file()
    # Quadra's test task, reading the patchflow bundle (model.json, model.pt, classifier.joblib), predicts the same
    _same_predictions(_results(out), quadra_test_task(model_path, data))


def _cli(module: str, args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--config-dir", str(CONFIGS), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("run folder: "))


def test_tutorial_mobilenetv2_imagenet_from_the_command_line(demo, tmp_path: Path) -> None:
    _, data, _ = demo
    common = [f"datamodule.data_path={data}", "task.device=cpu"]
    run = Path(_cli("flows.train", [TRAIN, *common, DEMO_CLASSES, "backbone=mobilenetv2"], tmp_path))
    _check_train_run(run)
    resolved = (run / "config_resolved.yaml").read_text()
    assert "name: mobilenet_v2\n  weights: imagenet" in resolved
    model_path = run / "deployment_model" / "model.pt"
    test_run = Path(_cli("flows.evaluate", [TEST, *common, f"task.model_path={model_path}"], tmp_path))
    assert (test_run / "classification_patch_test" / "test_results.csv").is_file()
    _same_predictions(_results(test_run / "classification_patch_test"), quadra_test_task(model_path, data))


def test_quadra_bundle_is_evaluated_and_predicted_with_under_the_trust_flag(
    demo, tmp_path: Path, monkeypatch, prefect_harness
) -> None:
    from flows.evaluate import evaluate_flow
    from storage.bundle import BundleError, open_bundle
    from tasks.cli import parse_cli
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.predict.stage import predict_images

    _, data, images = demo
    bundle = write_quadra_bundle(tmp_path / "deployment_model", data, CLASSES)
    assert sorted(p.name for p in bundle.iterdir()) == ["classifier.joblib", "model.json", "model.pt"]
    with pytest.raises(BundleError, match=r"no _manifest.json \(made by hand or by Quadra\).*task.trust_pickle"):
        open_bundle(bundle / "model.pt")
    opened = open_bundle(bundle / "model.pt", trust_pickle=True)  # what the Predictor and the flows call
    assert opened.classes == CLASSES and opened.input_size == (64, 64) and opened.grid_spec.patch_size == (64, 64)

    monkeypatch.chdir(tmp_path)
    argv = ["--config-dir", str(CONFIGS), TEST, f"datamodule.data_path={data}", "task.device=cpu"]
    argv.append(f"task.model_path={bundle / 'model.pt'}")
    with pytest.raises(BundleError, match=r"no _manifest.json"):
        evaluate_flow(parse_cli(EvaluateFlowConfig, argv, ""))
    res = evaluate_flow(parse_cli(EvaluateFlowConfig, [*argv, "task.trust_pickle=true"], ""))
    out = Path(res["output"])
    assert out.name == "classification_patch_test" and (out / "test_confusion_matrix.png").is_file()
    _same_predictions(_results(out), quadra_test_task(bundle / "model.pt", data))

    with pytest.raises(BundleError, match=r"no _manifest.json"):
        predict_images(bundle, images, tmp_path / "pred0", batch_size=8)
    pred = predict_images(bundle, images, tmp_path / "pred", batch_size=8, trust_pickle=True)
    assert len(pred["images"]) == len(list(images.glob("*.png"))) > 0
