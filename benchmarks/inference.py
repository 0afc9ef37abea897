"""Benchmark: the in-process Predictor and the inference service against the bare backbone forward, on mtd-dev.

Trains a MobileNetV2 (ImageNet) bundle with the flows on a private storage root ([2, 2] patches, 2 passes),
then on the test split's raw images measures, on this machine's CPU:
- Predictor latency per image (decoded image in memory -> class map, polygons, summary) against the bare
  backbone forward of the same 4 patches (already resized and normalised; the bundle's ``model.onnx`` run by ONNX
  Runtime, the features' runtime; the torch module's forward is recorded too);
- batch throughput (``predict_batch`` over all images) against the bare forward of all their patches;
- Predictor load time (in process, and a fresh process: import + load + first image);
- the service (``deployments.inference_server`` as a subprocess on 127.0.0.1): p50/p99 latency and throughput
  with 1 and 8 concurrent clients, 500 requests each (bounded by count and time), errors counted.
Usage: python -m benchmarks.inference [--out benchmarks/results/inference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.dataset_generation import DEFAULT_DATA, build_dataset

REPO = Path(__file__).resolve().parents[1]
REPS = 5


def train_bundle(data: Path, tmp: Path) -> tuple[Path, list[Path]]:
    """The benchmark bundle (flows.train, 2 passes, private storage root) and the test split's raw images."""
    from flows.train import train_flow
    from tasks.model.config import TrainFlowConfig

    build_dataset(data, tmp / "ds", val_size=0.3, test_size=0.2)
    cfg = {
        "datamodule": {"data_path": str(tmp / "ds")},
        "trainer": {"iteration_over_training": 2},
        "core": {"runs_folder": str(tmp / "runs")},
        "storage_root": str(tmp / "store"),
    }
    res = train_flow(TrainFlowConfig.model_validate(cfg))
    info = json.loads((tmp / "ds" / "info.json").read_text())
    raw = tmp / "raw"
    raw.mkdir()
    for f in info["test_files"]:
        shutil.copy2(tmp / "ds" / f["image_path"], raw)
    return Path(res["bundle"]), sorted(raw.iterdir())


def fastest(
    candidates: dict[str, Callable[[int], Any]], n: int, reps: int, clock: Callable[[], float]
) -> dict[str, float]:
    """For each candidate, the sum over items ``0..n-1`` of its fastest of ``reps`` runs by ``clock``; the
    candidates alternate item by item, so they share whatever load the machine has (one warm-up run each)."""
    for fn in candidates.values():
        fn(0)
    fast = {k: [float("inf")] * n for k in candidates}
    for _ in range(reps):
        for i in range(n):
            for k, fn in candidates.items():
                t = clock()
                fn(i)
                fast[k][i] = min(fast[k][i], clock() - t)
    return {k: sum(v) for k, v in fast.items()}


def bare_forwards(bundle: Path, threads: int | None) -> dict[str, Callable[[np.ndarray], Any]]:
    """The bare backbone forwards of preprocessed (N, 3, H, W) batches: ONNX Runtime (``model.onnx``, the session
    options of the Predictor's) and the torch module."""
    import onnxruntime as ort
    import torch

    from tasks.features.extractor import build_backbone

    so = ort.SessionOptions()
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    meta = json.loads((bundle / "model.json").read_text())  # the same feature layers and pooling as the bundle's
    module = build_backbone(
        meta["backbone"], "imagenet", meta.get("feature_layers", "final"), meta.get("pooling", "avg")
    )

    def torch_forward(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    return {"onnxruntime": lambda x: session.run(None, {"images": x}), "torch": torch_forward}


def inputs(bundle: Path, images: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The decoded images, and each image's patches preprocessed as the bare forward takes them."""
    from storage.bundle import open_bundle
    from tasks.evaluation.inferer import split_image
    from tasks.features.extractor import preprocess
    from tasks.imageio import read_image

    b = open_bundle(bundle)
    arrays = [read_image(f) for f in images]
    spec, size, mean, std = b.grid_spec, b.input_size, b.meta["mean"], b.meta["std"]
    batches = [
        preprocess(split_image(a, spec.grid(*a.shape[:2])), size, mean, std).contiguous().numpy() for a in arrays
    ]
    return arrays, batches


def measure(bundle: Path, images: list[Path], threads: int | None, clock: Callable[[], float]) -> dict[str, Any]:
    """Per-image latency and batch throughput of the Predictor (both runtimes) and of the bare forwards."""
    from tasks import Predictor

    p, two = Predictor.load(bundle, threads=threads), Predictor.load(bundle, runtime="two-part")
    arrays, batches = inputs(bundle, images)
    bare, n = bare_forwards(bundle, threads), len(images)
    per_image = fastest(
        {
            "onnxruntime": lambda i: bare["onnxruntime"](batches[i]),
            "predictor": lambda i: p.predict(arrays[i]),
            "predictor_from_file": lambda i: p.predict(images[i]),
            "predictor_two_part": lambda i: two.predict(arrays[i]),
        },
        n,
        REPS,
        clock,
    )
    per_image |= fastest({"torch": lambda i: bare["torch"](batches[i])}, n, 2, clock)  # apart: its threads spin
    everything = np.concatenate(batches)
    chunks = [everything[i : i + p.batch_size] for i in range(0, len(everything), p.batch_size)]
    batch = fastest(
        {
            "onnxruntime": lambda _: [bare["onnxruntime"](c) for c in chunks],
            "predictor": lambda _: p.predict_batch(arrays),
            "predictor_two_part": lambda _: two.predict_batch(arrays),
        },
        1,
        3,
        clock,
    )
    batch |= fastest({"torch": lambda _: [bare["torch"](c) for c in chunks]}, 1, 2, clock)
    pairs = [(k, b) for k in ("predictor", "predictor_two_part") for b in bare]
    return {
        "latency_per_image_ms": {k: round(1000 * v / n, 2) for k, v in per_image.items()},
        "overhead_over_bare_forward": {f"{k}_vs_{b}": round(per_image[k] / per_image[b] - 1, 3) for k, b in pairs},
        "batch_images_per_s": {k: round(n / v, 1) for k, v in batch.items()},
        "batch_throughput_ratio": {f"{k}_vs_{b}": round(batch[b] / batch[k], 3) for k, b in pairs},
    }


def predictor_figures(bundle: Path, images: list[Path]) -> dict[str, Any]:
    """Load time; latency and throughput by the wall clock (default threads), then by the CPU time of one thread
    (every runtime on one thread, OpenCV's threads off: what other processes on the machine cannot distort)."""
    import cv2
    import torch

    from tasks import Predictor

    t = time.perf_counter()
    p = Predictor.load(bundle)
    load_s = time.perf_counter() - t
    wall = measure(bundle, images, None, time.perf_counter)
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    cpu = measure(bundle, images, 1, time.thread_time)
    return {
        "images": len(images),
        "runtime": p.runtime,
        "load_s": round(load_s, 3),
        "wall_clock_default_threads": wall,
        "cpu_time_one_thread": cpu,
    }


def cold_start(bundle: Path, image: Path) -> dict[str, float]:
    """A fresh process: ``from tasks import Predictor``, ``Predictor.load``, the first prediction (seconds)."""
    code = (
        "import json, time; t0 = time.perf_counter(); from tasks import Predictor; t1 = time.perf_counter(); "
        f"p = Predictor.load({str(bundle)!r}); t2 = time.perf_counter(); p.predict({str(image)!r}); "
        "t3 = time.perf_counter(); "
        "print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1, 'first_image_s': t3 - t2}))"
    )
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_test(url: str, bodies: list[bytes], clients: int, requests: int, limit_s: float) -> dict[str, Any]:
    """``requests`` POST /predict from ``clients`` threads (keep-alive), stopped after ``limit_s`` at the latest."""
    import threading

    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + limit_s

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = c.post("/predict", content=bodies[i % len(bodies)])
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:100]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "requests_per_s": round(len(latencies) / wall, 1),
    }


def service_figures(bundle: Path, images: list[Path], requests: int = 500, limit_s: float = 300) -> dict[str, Any]:
    """The real server as a subprocess on a free loopback port; load tests at 1 and 8 concurrent clients."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "deployments.inference_server", "--model", str(bundle), "--port", str(port)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None or time.perf_counter() - t > 120:
                    raise RuntimeError("the inference server did not start") from None
                time.sleep(0.1)
        ready_s = time.perf_counter() - t
        bodies = [f.read_bytes() for f in images]
        runs = [load_test(url, bodies, c, requests, limit_s) for c in (1, 8)]
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"ready_s": round(ready_s, 2), "runs": runs, "batches": health["batches"], "images": health["images"]}


def describe(bundle: Path) -> str:
    """Backbone, feature layers, pooling, patch grid and classifier of the benchmark bundle, in one line."""
    from storage.bundle import open_bundle

    b = open_bundle(bundle)
    m, est = b.meta, b.load_classifier()
    steps = [type(s).__name__ for _, s in est.steps] if hasattr(est, "steps") else [type(est).__name__]
    return (
        f"{m['backbone']} ImageNet, feature_layers {m.get('feature_layers', ['final'])} "
        f"pooled {m.get('pooling', 'avg')} ({m.get('feature_dim')} features), "
        f"mtd-dev [2, 2] patches at {b.input_size[0]} px, 2 passes, classifier {' + '.join(steps)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--bundle", type=Path, help="an existing bundle trained as above (skips the training)")
    ap.add_argument("--images", type=Path, help="with --bundle: its test images")
    ap.add_argument("--keep", type=Path, help="an empty folder to train in and keep (not a temporary one)")
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:  # the trained bundle and its test images stay there (rerun with --bundle/--images)
            tmp = str(args.keep)
        if args.bundle:
            bundle, images = args.bundle, sorted(args.images.iterdir())
        else:
            bundle, images = train_bundle(args.data, Path(tmp))
        about = describe(bundle)
        pred = predictor_figures(bundle, images)
        cold = cold_start(bundle, images[0])
        service = service_figures(bundle, images, args.requests)
    overhead = pred["cpu_time_one_thread"]["overhead_over_bare_forward"]["predictor_vs_onnxruntime"]
    ratio = pred["cpu_time_one_thread"]["batch_throughput_ratio"]["predictor_vs_onnxruntime"]
    result = {
        "benchmark": "inference",
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_start": load_before,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "bundle": about,
        "predictor": pred,
        "cold_process": cold,
        "service": service,
        "targets (CPU time of one thread against model.onnx's bare forward)": {
            "latency_overhead_le_0.30": overhead <= 0.30,
            "batch_throughput_ratio_ge_0.9": ratio >= 0.9,
            "load_lt_1s": pred["load_s"] < 1.0,
            "service_0_errors": all(r["errors"] == 0 and r["requests"] == args.requests for r in service["runs"]),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
