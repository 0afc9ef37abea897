"""Predict flow: raw images of any size -> class maps, polygons and overlays with a deployment bundle.

``python -m flows.predict --model runs/<name>/<ts>/deployment_model --images DIR --out DIR [--method soft]``

The output folder must lie outside the images folder. The task is reused from the cache only when
``predictions.json`` is this run's and every output file it lists still has its recorded size and sha256.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from tasks.cli import early_start
from tasks.config import validate_config
from tasks.device import check_config_devices
from tasks.predict.config import PredictFlowConfig
from tasks.predict.outputs import check_output_folder


def parse(argv: Sequence[str] | None) -> PredictFlowConfig:
    """The command line -> validated config; the output folder is checked before Prefect (and an API server) starts."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=["major_voting", "priority", "soft"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--storage-root")
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--max-image-pixels", type=int, help="refuse larger images (default $PATCHFLOW_MAX_IMAGE_PIXELS or 200000000)"
    )
    ap.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a bundle without _manifest.json or with a pickled classifier.joblib: a pickle runs "
        "any code it holds, so only for bundles whose source you trust",
    )
    a = ap.parse_args(argv)
    cfg = validate_config(
        PredictFlowConfig,
        {
            "model": a.model,
            "images": a.images,
            "out": a.out,
            "method": a.method,
            "batch_size": a.batch_size,
            "device": a.device,
            "storage_root": a.storage_root,
            "force": a.force,
            "max_image_pixels": a.max_image_pixels,
            "trust_pickle": a.trust_pickle,
        },
    )
    check_output_folder(cfg.images, cfg.out)  # one line before a flow run (and an API server) starts
    check_config_devices(cfg, {"device": "--device"})
    return cfg


# --help and errors before Prefect; the bundle's classifier (skops, before torch: it scans sys.modules) and backbone
# imports run while the temporary API server boots
early_start(__name__, parse, preload=("skops.io", "torch", "tasks.features.export"))

from prefect import flow

from storage.bundle import open_bundle
from tasks.cli import run_cli
from tasks.config import ensure_storage_root
from tasks.stage import run_stage


@flow(name="patchflow-predict")
def predict_flow(config: PredictFlowConfig) -> dict[str, Any]:
    """Predict every image of a folder; returns the per-image summary."""
    from tasks.predict.stage import predict_task, prediction_key, predictions_verified  # torch: not for a CLI error

    cfg = validate_config(PredictFlowConfig, config)
    root = ensure_storage_root(cfg.storage_root)
    out = check_output_folder(cfg.images, cfg.out)  # refused before anything is written or deleted
    bundle = open_bundle(cfg.model, cfg.trust_pickle)  # before any cache lookup: an edited bundle is never served
    key = prediction_key(bundle, cfg.images, out, cfg.method)
    return run_stage(
        predict_task,
        root,
        out,
        predictions_verified(key),
        cfg.force,
        cfg,
        str(bundle.root),
        bundle.digest,
        key,
        str(out),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    res = predict_flow(parse(argv))
    for item in res["images"]:
        print(f"{item['image']}: {item['defect_regions']} defect regions {item['classes']}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
