"""Evaluation flow: a trained bundle on a test split with mask-less images, classes and skips from the bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import task_states


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from flows.train import train_flow
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("evalflow")
    d = make_demo_dataset(root / "raw", n_images=14, size=(128, 160), seed=5, missing_mask_fraction=0.15)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask", warning_on_missing_mask=False)
    data = root / "patches"
    generate_patch_dataset(
        assoc, d["class_to_idx"], val_size=0.3, test_size=0.3, patch_size=[64, 64], output_folder=str(data)
    )
    cfg = {
        "datamodule": {"data_path": str(data), "class_to_skip_training": ["stain"]},
        "transforms": {"input_height": 64, "input_width": 64},
        "trainer": {"iteration_over_training": 2},
        "export": {"types": ["torchscript", "pytorch"]},
        "core": {"runs_folder": str(root / "runs")},
        "storage_root": str(root / "store"),
    }
    return root, data, Path(train_flow(cfg)["bundle"])


def test_evaluate_flow_with_bundle(trained, prefect_harness) -> None:
    from flows.evaluate import evaluate_flow

    root, data, bundle = trained
    assert json.loads((bundle / "model.json").read_text())["class_to_skip"] == ["stain"]
    cfg = {
        "datamodule": {"data_path": str(data)},
        "task": {"model_path": str(bundle / "model.pt"), "output": {"report": False}},
        "core": {"runs_folder": str(root / "runs")},
        "storage_root": str(root / "store"),
    }
    state = evaluate_flow(cfg, return_state=True)
    assert state.is_completed()
    res = state.result()
    out = Path(res["output"])
    for name in ("metrics.json", "test_results.csv", "reconstruction_results.json"):
        assert (out / name).is_file(), name
    assert (Path(res["run_dir"]) / "reconstruction_results.json").is_file()
    rows = list(csv.DictReader((out / "test_results.csv").open()))
    assert list(rows[0]) == ["", "sample", "real_label", "pred_label", "probability", "filename"]
    assert rows[0]["filename"] and rows[0]["filename"] in rows[0]["sample"]
    stain = json.loads((bundle / "model.json").read_text())["classes"]
    stain_idx = next(int(k) for k, v in stain.items() if v == "stain")
    none_rows = [r for r in rows if "/None/" in r["sample"]]
    stain_rows = [r for r in rows if "/stain/" in r["sample"]]
    assert none_rows and all(r["real_label"] == "-1" for r in none_rows)  # mask-less test images kept, unlabelled
    assert all(r["real_label"] == "-1" for r in stain_rows)  # skipped class from the bundle (B4)
    assert all(int(r["pred_label"]) != stain_idx for r in rows)  # never trained on it
    recon = json.loads((out / "reconstruction_results.json").read_text())
    info = json.loads((data / "info.json").read_text())
    assert len(recon["reconstructions"]) == len(info["test_files"])
    assert any(r["mask_path"] is None for r in recon["reconstructions"])
    st = task_states(state)
    assert st == {"bundle-split-features": "Completed", "evaluate-split": "Completed", "publish-artifacts": "Completed"}

    # predict on raw images (no dataset step) gives the same maps as the evaluation of the same images
    import shutil

    import cv2
    import numpy as np

    from flows.predict import predict_flow

    raw = root / "raw_test"
    raw.mkdir()
    for f in info["test_files"]:
        shutil.copy2(data / f["image_path"], raw)
    small = np.full((40, 50, 3), 128, np.uint8)  # smaller than the 64 px patch: padded, then cropped back
    cv2.imwrite(str(raw / "tiny.png"), small)
    pred_out = root / "pred"
    res_p = predict_flow(
        {
            "model": str(bundle),
            "images": str(raw),
            "out": str(pred_out),
            "method": "major_voting",
            "storage_root": str(root / "store"),
        }
    )
    assert len(res_p["images"]) == len(info["test_files"]) + 1
    for f in info["test_files"]:
        stem = Path(f["image_path"]).stem
        got = cv2.imread(str(pred_out / f"{stem}_classmap.png"), cv2.IMREAD_UNCHANGED)
        want = cv2.imread(str(out / "maps" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(got, want)
        assert (pred_out / f"{stem}_overlay.png").is_file() and (pred_out / f"{stem}_polygons.json").is_file()
    assert cv2.imread(str(pred_out / "tiny_classmap.png"), cv2.IMREAD_UNCHANGED).shape == (40, 50)

    # only the reconstruction method changes: features come from the cache
    cfg["task"]["output"]["reconstruction_method"] = "priority"
    state = evaluate_flow(cfg, return_state=True)
    assert task_states(state) == {
        "bundle-split-features": "Cached",
        "evaluate-split": "Completed",
        "publish-artifacts": "Completed",
    }
    assert state.result()["metrics"]["reconstruction"]["patch_reconstruction_method"] == "priority"


def test_every_bundle_export_gives_the_same_features(trained) -> None:
    import numpy as np
    import torch

    from tasks.features.export import load_export

    _, _, bundle = trained
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        outs = {
            name: load_export(bundle / name, "mobilenet_v2")(x).numpy()
            for name in ("model.pt", "model.pth", "model.onnx")
        }
    np.testing.assert_allclose(outs["model.pth"], outs["model.pt"], atol=1e-5)
    np.testing.assert_allclose(outs["model.onnx"], outs["model.pt"], atol=1e-4)


def test_evaluate_rejects_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    from storage.bundle import BundleError, resolve_bundle

    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"model.json and classifier.skops \(or Quadra's classifier.joblib\)"):
        resolve_bundle(tmp_path / "model.pt")
    with pytest.raises(BundleError, match="does not exist"):
        resolve_bundle(tmp_path / "nope")
