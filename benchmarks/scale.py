"""Benchmark: dataset generation and feature extraction through Prefect on a local Dask cluster with 1 and 2
workers (and the default in-process runner), on ../shared/data/mtd-dev, plus the measured per-shard
overhead of Prefect + Dask; writes JSON.

Starts its own Prefect server on a free loopback port (process runners need one) and stops it at the end.
Usage: python -m benchmarks.scale [--data DIR] [--passes 4] [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd-dev"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A `prefect server start` on loopback; returns the process and its API URL."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_PORT": str(port),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    exe = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(exe), "server", "start", "--host", "127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("prefect server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--noop-shards", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="patchflow-scale-"))
    server, url = start_server(work / "prefect-home")
    os.environ.update({"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": url})
    try:
        results = run(args, work)
        from prefect.logging.handlers import APILogHandler

        APILogHandler.flush()  # send the last run logs before the server goes
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _span(state, prefixes: tuple[str, ...]) -> float:
    """Seconds from the first start to the last end of the flow run's task runs whose name starts with a prefix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    runs = [r for r in runs if r.name.startswith(prefixes) and r.start_time and r.end_time]
    return (max(r.end_time for r in runs) - min(r.start_time for r in runs)).total_seconds()


def run(args: argparse.Namespace, work: Path) -> dict:
    from prefect import flow, task

    from flows.dataset import dataset_flow
    from flows.train import train_flow
    from tasks.runner import RunnerSection, dask_runner, run_all

    data = args.data
    class_to_idx = json.loads((data / "class_to_idx.json").read_text())
    n_images = len([p for p in (data / "images").iterdir() if p.is_file()])
    runners = {
        "thread": {"kind": "thread"},
        "dask_1": {"kind": "dask", "n_workers": 1},
        "dask_2": {"kind": "dask", "n_workers": 2},
    }
    out: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "data": str(data),
        "images": n_images,
        "dataset": {},
        "features": {},
    }
    for name, runner in runners.items():
        cfg = {
            "data": {
                "images": str(data / "images"),
                "masks": str(data / "masks"),
                "mask_extension": "_mask",
                "class_to_idx": class_to_idx,
            },
            "dataset": {
                "output_folder": str(work / f"ds_{name}"),
                "patch_number": [2, 2],
                "val_size": 0.3,
                "test_size": 0.1,
                "shard_images": 64,
            },
            "runner": runner,
            "storage_root": str(work / f"root_{name}"),
        }
        t0 = time.perf_counter()
        state = dataset_flow(cfg, return_state=True)
        wall = time.perf_counter() - t0
        span = _span(
            state, ("plan-patch-dataset", "scan-images", "assign-splits", "write-patches", "generate-patch-dataset")
        )
        out["dataset"][name] = {
            "generation_wall_s": round(span, 2),
            "flow_wall_s": round(wall, 2),
            "images_per_s": round(n_images / span, 1),
            "shards": -(-n_images // 64),
        }
    data_path = work / "ds_thread"
    for name, runner in runners.items():
        cfg = {
            "datamodule": {"data_path": str(data_path), "batch_size": 32},
            "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
            "trainer": {"iteration_over_training": args.passes},
            "task": {"report": False, "shard_patches": 1024},
            "core": {"runs_folder": str(work / "runs")},
            "runner": runner,
            "storage_root": str(work / f"train_{name}"),
        }
        t0 = time.perf_counter()
        state = train_flow(cfg, return_state=True)
        wall = time.perf_counter() - t0
        span = _span(state, ("prepare-features", "feature-shard", "train-pass-features", "split-features"))
        out["features"][name] = {
            "feature_stage_wall_s": round(span, 2),
            "train_flow_wall_s": round(wall, 2),
            "passes": args.passes,
        }

    @task(name="noop-shard")
    def noop(i: int) -> int:
        return i

    @flow(name="patchflow-shard-overhead")
    def overhead(n: int) -> dict:
        with dask_runner(RunnerSection(kind="dask", n_workers=2)) as tr:
            run_all(tr, [(noop, {"i": i}) for i in range(4)])  # warm the workers
            t0 = time.perf_counter()
            run_all(tr, [(noop, {"i": i}) for i in range(n)])
            return {
                "shards": n,
                "wall_s": round(time.perf_counter() - t0, 2),
                "per_shard_ms": round(1000 * (time.perf_counter() - t0) / n, 1),
            }

    out["per_shard_overhead_dask_2"] = overhead(args.noop_shards)
    out["note"] = (
        "dask_N: Prefect DaskTaskRunner with a local cluster of N single-threaded worker processes, started per "
        "flow run (included in flow_wall_s / train_flow_wall_s, not in the stage spans); thread: the default "
        "in-process runner (ONNX Runtime uses every core). Stage spans: first task start to last task end. "
        "On a 2-core machine Dask can only redistribute the same cores: it pays off across machines."
    )
    return out


if __name__ == "__main__":
    main()
