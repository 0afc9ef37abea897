"""End-to-end training flow on the synthetic demo data with real ImageNet MobileNetV2 weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import task_states

REPO = Path(__file__).resolve().parents[1]


def _cfg(data: Path, tmp: Path, **over) -> dict:
    cfg = {
        "datamodule": {"data_path": str(data), "batch_size": 32},
        "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
        "transforms": {"input_height": 96, "input_width": 96},
        "trainer": {"iteration_over_training": 2},
        "core": {"runs_folder": str(tmp / "runs")},
        "storage_root": str(tmp / "store"),
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def test_train_flow_stages_are_cached_by_content(demo_patch_dataset: Path, tmp_path: Path, prefect_harness) -> None:
    from flows.train import train_flow

    cfg = _cfg(demo_patch_dataset, tmp_path)
    state = train_flow(cfg, return_state=True)
    assert state.is_completed()
    res = state.result()
    run = Path(res["run_dir"])
    for name in (
        "config_resolved.yaml",
        "config_tree.txt",
        "main.log",
        "data/train_list.csv",
        "data/val_list.csv",
        "deployment_model/model.pt",
        "deployment_model/classifier.skops",
        "deployment_model/model.json",
        "reconstruction_results.json",
        "classification_patch_experiment/metrics.json",
        "classification_patch_experiment/test_results.csv",
        "classification_patch_experiment/report.html",
        "classification_patch_experiment/test_confusion_matrix.png",
    ):
        assert (run / name).is_file(), name
    mj = json.loads((run / "deployment_model/model.json").read_text())
    for key in (
        "input_size",
        "classes",
        "mean",
        "std",
        "horizontal_patches",
        "vertical_patches",
        "patch_height",
        "patch_width",
        "overlap",
        "reconstruction_method",
        "class_to_skip",
        "grid_policy",
        "precision",
    ):
        assert key in mj
    assert mj["patch_height"] == 64 and mj["input_size"] == [[3, 96, 96]]
    assert 0.0 <= res["metrics"]["accuracy"] <= 1.0 and "confusion_matrix" in res["metrics"]
    recon = json.loads((run / "reconstruction_results.json").read_text())
    assert recon["patch_reconstruction_method"] == "major_voting" and recon["reconstructions_type"] == "polygon"
    assert len(recon["reconstructions"]) == len(json.loads((demo_patch_dataset / "info.json").read_text())["val_files"])
    assert "all_defects" in res["metrics"]["reconstruction"]
    first = task_states(state)
    assert len(first) == 8 and set(first.values()) == {
        "Completed"
    }  # 2 passes, train grid, val, fit, export x2, validate
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    kinds = {a.type for a in arts}
    assert kinds == {"table", "markdown", "progress"}, kinds
    keys = {a.key for a in arts}
    assert {"demo-validation-report", "demo-validation-bundle"} <= {
        k.replace("sklearn-classification-patch", "demo") for k in keys if k
    }, keys
    assert next(a for a in arts if a.type == "progress").data == 100.0
    md = next(a for a in arts if a.type == "markdown" and a.key.endswith("summary")).data
    assert "Confusion matrix" in md and "accuracy" in md

    # a new process with the same storage root computes no feature task
    cfg_file = tmp_path / "train.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.train", "--config", str(cfg_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    feature_lines = [line for line in log.splitlines() if "features-" in line and "Finished in state" in line]
    assert len(feature_lines) == 4 and all("Cached" in line for line in feature_lines), feature_lines

    # changing only the classifier reruns fit/export/validate, not features
    state = train_flow(
        _cfg(demo_patch_dataset, tmp_path, model={"params": {"max_iter": 10000, "C": 0.3}}), return_state=True
    )
    st = task_states(state)
    assert st["train-pass-features"] == "Cached" and st["split-features"] == "Cached"
    assert st["grid-features"] == "Cached"
    assert st["fit-classifier"] == "Completed" and st["validate-patches"] == "Completed"
    assert st["export-bundle"] == "Completed" and st["export-backbone"] == "Cached"  # no re-trace

    # changing a grid labelling threshold recomputes the grid store only (then the fit and what follows)
    state = train_flow(
        _cfg(
            demo_patch_dataset,
            tmp_path,
            model={"params": {"max_iter": 10000, "C": 0.3}},
            trainer={"area_threshold": 0.3},
        ),
        return_state=True,
    )
    st = task_states(state)
    assert st["grid-features"] == "Completed" and st["fit-classifier"] == "Completed"
    assert st["train-pass-features"] == "Cached" and st["split-features"] == "Cached"

    # changing only the reconstruction method reruns validation, no features and no fit
    state = train_flow(
        _cfg(
            demo_patch_dataset,
            tmp_path,
            model={"params": {"max_iter": 10000, "C": 0.3}},
            task={"reconstruction_method": "soft"},
        ),
        return_state=True,
    )
    st = task_states(state)
    assert st["validate-patches"] == "Completed" and st["fit-classifier"] == "Cached"
    assert st["train-pass-features"] == "Cached" and st["split-features"] == "Cached"
    assert state.result()["metrics"]["reconstruction"]["patch_reconstruction_method"] == "soft"

    # more passes compute only the new ones
    state = train_flow(_cfg(demo_patch_dataset, tmp_path, trainer={"iteration_over_training": 3}), return_state=True)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    passes = sorted(r.state.name for r in runs if r.name.startswith("train-pass-features"))
    assert passes == ["Cached", "Cached", "Completed"]


def test_exported_backbone_reproduces_training_features(demo_patch_dataset: Path, tmp_path: Path) -> None:
    """Export parity: the TorchScript, ONNX and .pth backbones and a bundle's BundleModel give the stored val
    features (multiscale by default) on the same patches."""
    import cv2
    import torch

    from storage import features as fstore
    from storage.bundle import open_bundle
    from tasks.evaluation.inferer import BundleModel
    from tasks.features.export import OnnxBackbone, load_export
    from tasks.features.extractor import preprocess
    from tasks.features.store import extract_split, extract_train_pass
    from tasks.model.bundle import export_bundle
    from tasks.model.config import TrainFlowConfig
    from tasks.model.fit import fit_classifier

    cfg = TrainFlowConfig.model_validate(
        _cfg(demo_patch_dataset, tmp_path, export={"types": ["torchscript", "pytorch"]})
    )
    extract_train_pass(cfg, 0, tmp_path / "p0.zarr")
    extract_split(cfg, "val", tmp_path / "val.zarr")
    fit_classifier(cfg, [str(tmp_path / "p0.zarr")], tmp_path / "clf.skops")
    bundle = export_bundle(cfg, tmp_path / "clf.skops", tmp_path / "deployment_model")
    X, _y, ids, _ = fstore.load_features(tmp_path / "val.zarr")
    ts = torch.jit.load(str(bundle / "model.pt"))
    patches = [cv2.imread(str(demo_patch_dataset / p)) for p in ids[:8]]
    batch = preprocess(patches, (96, 96))
    with torch.inference_mode():
        feats = ts(batch).numpy()
    np.testing.assert_allclose(feats, X[:8], atol=1e-4, rtol=1e-4)
    # features were computed with ONNX Runtime (auto on CPU): the bundle's model.onnx reproduces them exactly
    mj = json.loads((bundle / "model.json").read_text())
    assert mj["runtime"] == "onnxruntime"
    onnx_feats = OnnxBackbone(bundle / "model.onnx")(batch).numpy()
    np.testing.assert_allclose(onnx_feats, X[:8], atol=1e-5, rtol=1e-5)
    # model.json says which features; the .pth export rebuilds them from model_config.yaml; BundleModel uses them
    assert (mj["feature_layers"], mj["pooling"], mj["feature_dim"]) == (["stride8", "stride16", "final"], "avg", 1408)
    assert X.shape[1] == 1408
    with torch.inference_mode():
        pth_feats = load_export(bundle / "model.pth", "mobilenet_v2")(batch).numpy()
    np.testing.assert_allclose(pth_feats, X[:8], atol=1e-4, rtol=1e-4)
    model = BundleModel.load(open_bundle(bundle))
    np.testing.assert_allclose(model.features(patches), X[:8], atol=1e-5, rtol=1e-5)
    # the torch runtime computes the same features (its own store: the runtime is part of the key)
    cfg_torch = TrainFlowConfig.model_validate(_cfg(demo_patch_dataset, tmp_path, task={"runtime": "torch"}))
    extract_split(cfg_torch, "val", tmp_path / "val_torch.zarr")
    Xt = fstore.load_features(tmp_path / "val_torch.zarr")[0]
    np.testing.assert_allclose(Xt, X, atol=1e-4, rtol=1e-4)


def test_feature_runtime_resolution(tmp_path: Path) -> None:
    from tasks.config import ConfigError
    from tasks.features.params import feature_runtime
    from tasks.model.config import TrainFlowConfig

    def cfg(**task):
        return TrainFlowConfig.model_validate({"datamodule": {"data_path": str(tmp_path)}, "task": task})

    assert feature_runtime(cfg()) == "onnxruntime"
    assert feature_runtime(cfg(precision="bf16")) == "torch"
    assert feature_runtime(cfg(runtime="torch")) == "torch"
    with pytest.raises(ConfigError, match="onnxruntime"):
        feature_runtime(cfg(runtime="onnxruntime", precision="bf16"))


def test_bad_backbone_config_errors(demo_patch_dataset: Path, tmp_path: Path) -> None:
    from tasks.config import ConfigError, validate_config
    from tasks.features.store import extract_train_pass
    from tasks.features.weights import BackboneError
    from tasks.model.config import TrainFlowConfig

    with pytest.raises(ConfigError, match="backbone.name"):
        validate_config(TrainFlowConfig, _cfg(demo_patch_dataset, tmp_path, backbone={"name": "resnet181"}))
    cfg = TrainFlowConfig.model_validate(
        _cfg(demo_patch_dataset, tmp_path, backbone={"weights": str(tmp_path / "nope.pth")})
    )
    with pytest.raises(BackboneError, match="nope.pth"):
        extract_train_pass(cfg, 0, tmp_path / "x.zarr")
