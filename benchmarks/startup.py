"""Benchmark: start-up figures of the command lines (issue 15 part 4), wall clock of real subprocesses, best of N.

- ``python -m flows.<name> --help`` for every flow module;
- ``python -c "import <module>"`` for ``tasks`` and every flow module (and whether torch/Prefect came with it);
- a fully cached ``flows.train`` rerun on the demo data (``deployments/demo_train.yaml``), on the temporary API
  server (no ``PREFECT_API_URL``) and with ``PREFECT_API_URL`` pointing at a running ``prefect server start``;
- a one-image ``flows.predict`` (a new output folder each time: computed, not served from the cache), temporary
  API server included.

The setup (``python -m flows.demo``: synthetic images, patch dataset, training) runs once in a temporary folder
with its own PREFECT_HOME and storage root. The machine's load average is recorded beside the numbers: on a shared
machine take the best of several repetitions. Writes JSON.
Usage: python -m benchmarks.startup [--reps 3] [--out benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _run(args: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> float:
    """Wall seconds of one subprocess (it must succeed)."""
    t = time.perf_counter()
    res = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return wall


def _best(fn: Any, reps: int) -> dict[str, Any]:
    walls = [round(fn(i), 3) for i in range(reps)]
    return {"best_s": min(walls), "all_s": walls}


def _flows() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(REPO / "flows")]))


def _imports(module: str, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    code = (
        f"import json, sys; import {module}; print(json.dumps([m for m in ('prefect', 'torch') if m in sys.modules]))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return {"imports": json.loads(res.stdout)}


def _server(home: Path, env: dict[str, str], port: int = 4297) -> tuple[subprocess.Popen[bytes], str]:
    """A running ``prefect server start`` (own PREFECT_HOME); waits until it answers."""
    senv = {**env, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    senv.pop("PREFECT_API_URL", None)
    cmd = [
        str(Path(sys.executable).with_name("prefect")),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=senv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("prefect server start did not answer within 120 s")


def main() -> None:
    """Run the benchmark and write its JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/startup.json")
    args = ap.parse_args()
    py = sys.executable
    result: dict[str, Any] = {"reps": args.reps, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp / "home")}
        env["PATCHFLOW_STORAGE_ROOT"] = str(tmp / "store")
        env.pop("PREFECT_API_URL", None)
        result["help"] = {
            name: _best(lambda _i, n=name: _run([py, "-m", f"flows.{n}", "--help"], tmp, env), args.reps)
            for name in _flows()
        }
        result["import"] = {
            mod: {
                **_best(lambda _i, m=mod: _run([py, "-c", f"import {m}"], tmp, env), args.reps),
                **_imports(mod, tmp, env),
            }
            for mod in ["tasks", *(f"flows.{n}" for n in _flows())]
        }
        t = time.perf_counter()
        _run([py, "-m", "flows.demo", "--data", "demo_data"], tmp, env, timeout=1800)  # setup: dataset + training
        result["setup_demo_s"] = round(time.perf_counter() - t, 1)
        train = [py, "-m", "flows.train", "--config", str(REPO / "deployments/demo_train.yaml")]
        train.append(f"datamodule.data_path={tmp / 'runs/demo/patch_dataset'}")
        result["cached_train_ephemeral"] = _best(lambda _i: _run(train, tmp, env), args.reps)
        bundle = sorted((tmp / "runs/demo").glob("*/deployment_model"))[0]
        one = tmp / "one_image"
        one.mkdir()
        first = sorted((tmp / "demo_data/images").iterdir())[0]
        shutil.copy2(first, one / first.name)
        predict = [py, "-m", "flows.predict", "--model", str(bundle), "--images", str(one), "--out"]
        result["predict_one_image_ephemeral"] = _best(
            lambda i: _run([*predict, str(tmp / f"pred{i}")], tmp, env), args.reps
        )
        proc, url = _server(tmp / "server_home", env)
        try:
            senv = {**env, "PREFECT_API_URL": url}
            _run(train, tmp, senv)  # the server's first flow run registers the flow
            result["cached_train_running_server"] = _best(lambda _i: _run(train, tmp, senv), args.reps)
            result["predict_one_image_running_server"] = _best(
                lambda i: _run([*predict, str(tmp / f"preds{i}")], tmp, senv), args.reps
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result["load_after"] = os.getloadavg()
    result["note"] = (
        "wall clock of whole subprocesses, best of reps; "
        "flows.demo data (synthetic images, mobilenet_v2 ImageNet, 5 passes)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
