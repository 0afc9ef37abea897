"""Benchmark: training flow on ../shared/data/mtd-dev; writes JSON.

Measures the feature stage's patches/s against the bare backbone forward on the same batches,
the first-run wall, the rerun wall after a classifier change, and peak RSS.

Usage: python -m benchmarks.train [--backbone resnet18|mobilenet_v2] [--passes 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.dataset_generation import DEFAULT_DATA, build_dataset


def bare_forward_rate(cfg, n_batches: int = 12) -> float:
    """Patches/s of preprocess + forward alone on the first batches of pass 0 (no sampling, no I/O)."""
    from pathlib import Path as P

    from storage.layout import read_info
    from tasks.features.listing import read_train_list
    from tasks.features.params import class_map
    from tasks.features.sampler import draw_pass, iter_pass_patches, order_by_image
    from tasks.features.store import _extractor

    dm = cfg.datamodule
    entries = read_train_list(P(dm.data_path), dm.train_filename)
    s = order_by_image(draw_pass(P(dm.data_path), entries, class_map(cfg), dm.seed, 0, info=read_info(P(dm.data_path))))
    batches = [p for _, p in zip(range(n_batches), (b for _, b in iter_pass_patches(s, dm.batch_size)))]
    import tempfile as _t

    ex = _extractor(cfg, Path(_t.mkdtemp()) / "onnx")
    size = (cfg.transforms.input_height, cfg.transforms.input_width)
    ex.extract(batches[0], size)  # warm-up
    rates = []
    for _ in range(3):  # this VM's speed drifts: the median of three rounds
        t = time.perf_counter()
        n = 0
        for b in batches:
            ex.extract(b, size)
            n += len(b)
        rates.append(n / (time.perf_counter() - t))
    return sorted(rates)[1]


def bare_fit_seconds(cfg, store_root: Path) -> float:
    """Seconds of the classifier's own ``fit`` on the stored training features (no Prefect, no I/O):
    the part of a rerun after a classifier change that belongs to the classifier, not to patchflow."""
    from storage import features as fstore
    from tasks.model.fit import make_classifier

    stores = sorted(
        (p for p in (store_root / "features").glob("*.zarr") if fstore.store_attrs(p).get("kind") == "train"),
        key=lambda p: fstore.store_attrs(p)["pass_index"],
    )
    X, y = fstore.concat_stores(stores[: cfg.trainer.iteration_over_training])
    keep = y >= 0
    t = time.perf_counter()
    make_classifier(cfg).fit(X[keep], y[keep])
    return time.perf_counter() - t


def _warm_api() -> None:
    from prefect import flow

    @flow(name="patchflow-benchmark-warm-up")
    def warm() -> None:
        return None

    warm()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    args = ap.parse_args()

    from flows.train import train_flow
    from tasks.model.config import TrainFlowConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_dataset(args.data, tmp / "ds", val_size=0.3, test_size=0.1)
        base = {
            "datamodule": {"data_path": str(tmp / "ds"), "batch_size": 32},
            "backbone": {"name": args.backbone, "weights": args.weights},
            "trainer": {"iteration_over_training": args.passes},
            "task": {"precision": args.precision, "runtime": args.runtime},
            "core": {"runs_folder": str(tmp / "runs")},
            "storage_root": str(tmp / "store"),
        }
        cfg = TrainFlowConfig.model_validate(base)
        bare = bare_forward_rate(cfg)
        t = time.perf_counter()
        _warm_api()  # Prefect's ephemeral API starts with the first flow run of a process: infrastructure, timed apart
        api_start = time.perf_counter() - t
        t = time.perf_counter()
        res = train_flow(cfg)
        first = time.perf_counter() - t
        log = (Path(res["run_dir"]) / "main.log").read_text()
        rates = [float(line.rsplit("(", 1)[1].split()[0]) for line in log.splitlines() if "train features:" in line]
        setup = [
            float(line.split("backbone ready in ", 1)[1].split()[0])
            for line in log.splitlines()
            if "backbone ready in" in line
        ]
        base["model"] = {"params": {"max_iter": 10000, "C": 0.5}}
        t = time.perf_counter()
        train_flow(TrainFlowConfig.model_validate(base))
        rerun = time.perf_counter() - t
        fit = bare_fit_seconds(TrainFlowConfig.model_validate(base), tmp / "store")
    result = {
        "benchmark": "train",
        "backbone": args.backbone,
        "precision": args.precision,
        "passes": args.passes,
        "runtime": args.runtime,
        "bare_forward_patches_per_s": round(bare, 1),
        "feature_stage_patches_per_s": [round(r, 1) for r in rates],
        "feature_stage_vs_bare": round((sum(rates) / len(rates)) / bare, 3) if rates else None,
        "backbone_setup_s": round(
            sum(setup), 1
        ),  # once per process (ONNX export once per weights), not in the pass rates
        "prefect_api_startup_s": round(api_start, 1),
        "first_run_wall_s": round(first, 1),
        "rerun_after_classifier_change_wall_s": round(rerun, 1),
        "rerun_share_of_first": round(rerun / first, 3),
        "rerun_bare_classifier_fit_s": round(fit, 1),
        "rerun_share_of_first_excluding_classifier_fit": round(max(0.0, rerun - fit) / first, 3),
        "val_metrics": {k: res["metrics"].get(k) for k in ("accuracy", "balanced_accuracy", "n_evaluated")},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
