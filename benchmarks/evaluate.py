"""Benchmark: evaluation (test split of a patch dataset) and prediction on raw images, on ../shared/data/mtd-dev.

Trains a small bundle first (mobilenet_v2 ImageNet, 2 passes), then times the evaluation stages and
predict per image, with the share of time spent outside the backbone forward. Writes JSON.
Usage: python -m benchmarks.evaluate [--out benchmarks/results/evaluate.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.dataset_generation import DEFAULT_DATA, build_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluate.json"))
    args = ap.parse_args()

    from flows.train import train_flow
    from storage.bundle import open_bundle
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.evaluation.stage import evaluation_job, extract_with_bundle, score
    from tasks.predict.stage import predict_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_dataset(args.data, tmp / "ds", val_size=0.3, test_size=0.2)
        res = train_flow(
            {
                "datamodule": {"data_path": str(tmp / "ds")},
                "trainer": {"iteration_over_training": 2},
                "core": {"runs_folder": str(tmp / "runs")},
                "storage_root": str(tmp / "store"),
            }
        )
        cfg = EvaluateFlowConfig.model_validate(
            {
                "datamodule": {"data_path": str(tmp / "ds")},
                "task": {"model_path": res["bundle"], "output": {"report": False}},
            }
        )
        t = time.perf_counter()
        bundle = open_bundle(res["bundle"])
        feat = extract_with_bundle(cfg, bundle, tmp / "test.zarr")
        t_feat = time.perf_counter() - t
        t = time.perf_counter()
        metrics = score(evaluation_job(cfg, bundle, str(tmp / "test.zarr")), tmp / "eval")
        t_eval = time.perf_counter() - t
        info = json.loads((tmp / "ds" / "info.json").read_text())
        raw = tmp / "raw"
        raw.mkdir()
        for f in info["test_files"]:
            shutil.copy2(tmp / "ds" / f["image_path"], raw)
        pred = predict_images(Path(res["bundle"]), raw, tmp / "pred")
    n_img = len(info["test_files"])
    eval_wall = t_feat + t_eval
    result = {
        "benchmark": "evaluate",
        "test_images": n_img,
        "test_patches": feat["rows"],
        "evaluation": {
            "wall_s": round(eval_wall, 2),
            "per_image_ms": round(1000 * eval_wall / n_img, 1),
            "feature_stage_s": round(t_feat, 2),
            "backbone_forward_s": round(feat["extract_s"], 2),
            "scoring_reconstruction_metrics_s": round(t_eval, 2),
            "share_outside_forward": round(1 - feat["extract_s"] / eval_wall, 3),
        },
        "predict": {
            "wall_s": round(pred["timing"]["wall_s"], 2),
            "per_image_ms": round(1000 * pred["timing"]["wall_s"] / n_img, 1),
            "backbone_forward_s": round(pred["timing"]["extract_s"], 2),
            "share_outside_forward": round(1 - pred["timing"]["extract_s"] / pred["timing"]["wall_s"], 3),
        },
        "test_metrics": {k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "n_evaluated")}
        | {"defects": metrics.get("reconstruction", {}).get("all_defects")},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
