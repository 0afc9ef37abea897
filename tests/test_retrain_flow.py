"""Scheduled-retraining semantics: versions only for new inputs, promotion only when not worse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.promotion import PromotionSection, read_latest, register_and_promote


def _bundle(tmp: Path, name: str) -> Path:
    b = tmp / name
    b.mkdir()
    (b / "model.json").write_text("{}")
    (b / "classifier.skops").write_bytes(name.encode())
    return b


def test_register_and_promote_policies(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "m"
    pol = PromotionSection(tolerance=0.01)
    first = register_and_promote(_bundle(tmp_path, "a"), folder, {"balanced_accuracy": 0.80}, "k1", pol, "r1")
    assert first["action"] == "promoted" and first["version"] == "v0001" and read_latest(folder)["version"] == "v0001"
    same = register_and_promote(_bundle(tmp_path, "b"), folder, {"balanced_accuracy": 0.99}, "k1", pol, "r2")
    assert same["action"] == "unchanged" and not (folder / "v0002").exists()
    slightly_worse = register_and_promote(_bundle(tmp_path, "c"), folder, {"balanced_accuracy": 0.795}, "k2", pol, "r3")
    assert slightly_worse["action"] == "promoted" and read_latest(folder)["version"] == "v0002"  # within tolerance
    worse = register_and_promote(_bundle(tmp_path, "d"), folder, {"balanced_accuracy": 0.70}, "k3", pol, "r4")
    assert (
        worse["action"] == "kept_previous" and worse["version"] == "v0003" and read_latest(folder)["version"] == "v0002"
    )
    assert (folder / "v0003" / "classifier.skops").read_bytes() == b"d"  # kept for inspection, not promoted
    assert (folder / "latest").resolve() == (folder / "v0002").resolve()
    never = register_and_promote(
        _bundle(tmp_path, "e"), folder, {"balanced_accuracy": 0.99}, "k4", PromotionSection(policy="never"), "r5"
    )
    assert never["action"] == "kept_previous" and read_latest(folder)["version"] == "v0002"
    det = register_and_promote(
        _bundle(tmp_path, "f"),
        folder,
        {"reconstruction": {"all_defects": {"detection_rate": 0.5}}},
        "k5",
        PromotionSection(metric="defect_detection_rate", policy="always"),
        "r6",
    )
    assert det["action"] == "promoted" and det["value"] == 0.5


def test_promotion_compares_on_the_same_split_when_given(tmp_path: Path) -> None:
    """The recorded value came from another val split: the promoted model re-scored on the new one decides."""
    folder = tmp_path / "models" / "m"
    pol = PromotionSection()
    register_and_promote(_bundle(tmp_path, "a"), folder, {"balanced_accuracy": 0.90}, "k1", pol, "r1")
    # the new split is harder: the new model scores 0.80 there, the promoted one only 0.75
    fair = register_and_promote(
        _bundle(tmp_path, "b"),
        folder,
        {"balanced_accuracy": 0.80},
        "k2",
        pol,
        "r2",
        latest_metrics={"balanced_accuracy": 0.75},
    )
    assert fair["action"] == "promoted" and fair["previous_value"] == 0.75 and "re-evaluated" in fair["reason"]
    rec = json.loads((folder / "v0002" / "version.json").read_text())["compared_with"]
    assert rec == {"version": "v0001", "metric_value": 0.75, "basis": "re-evaluated on this run's validation split"}
    # without it, the value recorded at registration is all there is (and the outcome says so)
    stale = register_and_promote(_bundle(tmp_path, "c"), folder, {"balanced_accuracy": 0.78}, "k3", pol, "r3")
    assert stale["action"] == "kept_previous" and stale["previous_value"] == 0.80 and "recorded when" in stale["reason"]


def test_retrain_flow_picks_up_new_images(tmp_path: Path, prefect_harness) -> None:
    from flows.retrain import retrain_flow
    from tasks.demo_data import make_demo_dataset
    from tests.conftest import task_states

    d = make_demo_dataset(tmp_path / "incoming", n_images=12, size=(128, 160), seed=7)
    cfg = {
        "data": {
            "images": d["images"],
            "masks": d["masks"],
            "mask_extension": "_mask",
            "class_to_idx": d["class_to_idx"],
        },
        "dataset": {"output_folder": str(tmp_path / "patches"), "patch_size": [64, 64], "val_size": 0.3},
        "train": {
            "trainer": {"iteration_over_training": 2},
            "transforms": {"input_height": 64, "input_width": 64},
            "core": {"name": "tiles", "runs_folder": str(tmp_path / "runs")},
        },
        "promotion": {"models_folder": str(tmp_path / "models")},
        "storage_root": str(tmp_path / "store"),
    }
    first = retrain_flow(cfg)["outcome"]
    assert first["action"] == "promoted" and first["version"] == "v0001"
    again = retrain_flow(cfg)["outcome"]
    assert again["action"] == "unchanged"
    # new images arrive in the data folder
    extra = make_demo_dataset(tmp_path / "more", n_images=4, size=(128, 160), seed=8)
    for p in Path(extra["images"]).iterdir():
        shutil.copy2(p, Path(d["images"]) / f"new_{p.name}")
    for p in Path(extra["masks"]).iterdir():
        shutil.copy2(p, Path(d["masks"]) / f"new_{p.name}")
    state = retrain_flow(cfg, return_state=True)
    third = state.result()["outcome"]
    assert third["version"] == "v0002" and third["action"] in ("promoted", "kept_previous")
    # the promoted v0001 was scored again on this run's val split, so both models are judged on the same patches
    assert "re-evaluated on this run's validation split" in third["reason"], third
    compared = json.loads((tmp_path / "models" / "tiles" / "v0002" / "version.json").read_text())["compared_with"]
    assert compared["version"] == "v0001" and compared["metric_value"] == third["previous_value"]
    latest = json.loads((tmp_path / "models" / "tiles" / "latest.json").read_text())
    assert latest["version"] == ("v0002" if third["action"] == "promoted" else "v0001")
    assert (tmp_path / "models" / "tiles" / "v0002" / "model.json").is_file()
    states = task_states(state)
    assert states["register-model-version"] == "Completed"
