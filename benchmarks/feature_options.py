"""Benchmark: training-sample and feature options on ../shared/data/mtd-dev; writes JSON.

For {``trainer.grid_patches`` off, on} x {``backbone.feature_layers`` final, multiscale}, one fresh training run each
(its own storage root, so every store is computed): val macro-F1, balanced accuracy, defects covered >= 0.5 (the
validation's detection rate at ``coverage_threshold`` 0.5), the wall of the feature stores (training passes, train
grid, val) and of the whole run. The classifier is the config default; val only (the test split is never read).

Usage: python -m benchmarks.feature_options [--passes 20] [--backbone mobilenet_v2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.dataset_generation import DEFAULT_DATA, build_dataset
from benchmarks.train import _warm_api

_STORE_LINE = re.compile(r"(\w+) features: (\d+) patches in ([\d.]+) s")


def store_walls(log: str) -> dict[str, float]:
    """Seconds spent building each kind of feature store (``train``: every pass together), from a run's log."""
    walls: dict[str, float] = {}
    for kind, _rows, wall in _STORE_LINE.findall(log):
        walls[kind] = round(walls.get(kind, 0.0) + float(wall), 1)
    return walls


def scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """Macro-F1 over the classes, balanced accuracy and defects covered from a run's validation metrics."""
    per_class = metrics.get("per_class") or {}
    defects = (metrics.get("reconstruction") or {}).get("all_defects") or {}
    return {
        "macro_f1": round(sum(c["f1"] for c in per_class.values()) / max(1, len(per_class)), 4),
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "defects_covered_0_5": None if defects.get("detection_rate") is None else round(defects["detection_rate"], 4),
        "defects": defects.get("defects"),
    }


def run(base: dict[str, Any], root: Path, grid: bool, layers: str) -> dict[str, Any]:
    """One fresh training run with these options; its scores and walls."""
    from flows.train import train_flow
    from tasks.model.config import TrainFlowConfig

    cfg = json.loads(json.dumps(base))
    cfg["trainer"]["grid_patches"] = grid
    cfg["backbone"]["feature_layers"] = layers
    cfg["storage_root"] = str(root / f"store-{layers}-{grid}")
    t = time.perf_counter()
    res = train_flow(TrainFlowConfig.model_validate(cfg))
    wall = time.perf_counter() - t
    walls = store_walls((Path(res["run_dir"]) / "main.log").read_text())
    training = walls.get("train", 0.0) + walls.get("grid", 0.0)
    out = {"grid_patches": grid, "feature_layers": layers, **scores(res["metrics"])}
    return {**out, "store_wall_s": walls, "training_features_wall_s": round(training, 1), "run_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_options.json"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        build_dataset(args.data, tmp / "ds", val_size=0.3, test_size=0.1)
        base = {
            "datamodule": {"data_path": str(tmp / "ds"), "batch_size": 32},
            "backbone": {"name": args.backbone, "weights": "imagenet"},
            "trainer": {"iteration_over_training": args.passes},
            "task": {"coverage_threshold": 0.5, "report": False},
            "core": {"runs_folder": str(tmp / "runs")},
        }
        _warm_api()
        for grid in (False, True):
            for layers in ("final", "multiscale"):
                runs.append(run(base, tmp, grid, layers))
                print(json.dumps(runs[-1]), flush=True)
    ref = next(r for r in runs if not r["grid_patches"] and r["feature_layers"] == "final")
    for r in runs:
        ratio = r["training_features_wall_s"] / ref["training_features_wall_s"]
        r["training_features_wall_vs_reference"] = round(ratio, 3)
        r["run_wall_vs_reference"] = round(r["run_wall_s"] / ref["run_wall_s"], 3)
    result = {"benchmark": "feature_options", "backbone": args.backbone, "passes": args.passes, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
