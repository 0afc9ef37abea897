"""Benchmark: generate_patch_dataset on the whole of ../shared/data/mtd-dev; writes JSON.

Usage: python -m benchmarks.dataset_generation [--data DIR] [--workers 1 2]
       [--out benchmarks/results/dataset_generation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from tasks import generate_patch_dataset, get_image_mask_association

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd-dev"


def build_dataset(data: Path, out: Path, val_size: float = 0.3, test_size: float = 0.1, num_workers: int = 2) -> dict:
    """The benchmark dataset: ``data`` (images/, masks/, class_to_idx.json) as [2, 2] patches in ``out``."""
    class_to_idx = json.loads((data / "class_to_idx.json").read_text())
    assoc = get_image_mask_association(str(data / "images"), str(data / "masks"), mask_extension="_mask")
    return generate_patch_dataset(
        assoc,
        class_to_idx,
        val_size=val_size,
        test_size=test_size,
        patch_number=[2, 2],
        output_folder=str(out),
        num_workers=num_workers,
    )


def run_once(data: Path, workers: int, out_root: Path) -> dict:
    """Time one generation (association included) and return its figures."""
    class_to_idx = json.loads((data / "class_to_idx.json").read_text())
    # a new folder per run, old ones deleted only at the end: ext4 slows down creating files right after
    # thousands were deleted (it skips recently freed inodes), which a user writing a dataset never sees
    out = out_root / f"dataset_w{workers}_{len(list(out_root.iterdir()))}"
    t0 = time.perf_counter()
    cpu0 = os.times()
    assoc = get_image_mask_association(str(data / "images"), str(data / "masks"), mask_extension="_mask")
    info = generate_patch_dataset(
        assoc,
        class_to_idx,
        val_size=0.3,
        test_size=0.1,
        patch_number=[2, 2],
        output_folder=str(out),
        num_workers=workers,
    )
    wall = time.perf_counter() - t0
    n = len(assoc)
    return {
        "num_workers": workers,
        "images": n,
        "wall_s": round(wall, 3),
        "images_per_s": round(n / wall, 1),
        "main_process_cpu_s": round((cpu1 := os.times()).user + cpu1.system - cpu0.user - cpu0.system, 3),
        "workers_cpu_s": round(
            cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system, 3
        ),
        "splits": {s: len(info[f"{s}_files"]) for s in ("train", "val", "test")},
    }


def codec_floor(data: Path, dataset: Path) -> dict:
    """Seconds of the OpenCV work any writer of this format must do, on one core: decode every image
    and mask once, encode every val/test patch (in memory, no files). Throughput cannot beat it."""
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    images = sorted((data / "images").iterdir())
    masks = sorted((data / "masks").iterdir())
    patches = [
        cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for s in ("val", "test") for p in sorted((dataset / s).rglob("*.png"))
    ]
    blobs = [(np.fromfile(p, np.uint8), cv2.IMREAD_ANYCOLOR) for p in images] + [
        (np.fromfile(p, np.uint8), cv2.IMREAD_GRAYSCALE) for p in masks
    ]
    t = time.perf_counter()
    for buf, flag in blobs:
        cv2.imdecode(buf, flag)
    decode = time.perf_counter() - t
    t = time.perf_counter()
    for patch in patches:
        cv2.imencode(".png", patch)
    encode = time.perf_counter() - t
    total = decode + encode
    return {
        "decode_s": round(decode, 3),
        "encode_s": round(encode, 3),
        "patches": len(patches),
        "max_images_per_s_per_core": round(len(images) / total, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=sorted({1, 2, os.cpu_count() or 1}),
        help="num_workers values to time (default: 1, 2 and this machine's CPU count)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per worker count")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dataset_generation.json"))
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            best = min((run_once(args.data, w, Path(tmp)) for _ in range(args.repeats)), key=lambda r: r["wall_s"])
            runs.append(best)
            print(json.dumps(best))
        floor = codec_floor(args.data, next(p for p in Path(tmp).iterdir() if p.is_dir()))
    quadra_ref = (120, 160)  # images/s quoted for Quadra on this machine (issue 2)
    result = {
        "benchmark": "dataset_generation",
        "params": {"patch_number": [2, 2], "val_size": 0.3, "test_size": 0.1},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "runs": runs,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "codec_floor_one_core": floor,
        "quadra_images_per_s_reference": quadra_ref,
        "speedup_vs_quadra_range": [round(max(r["images_per_s"] for r in runs) / q, 2) for q in reversed(quadra_ref)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
