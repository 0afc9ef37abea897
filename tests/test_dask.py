"""Scale-out on Dask through Prefect: a real Prefect server on loopback (the test harness) and a 2-worker
local Dask cluster give byte-identical datasets and identical features and predictions to the
single-process run; a failing shard is retried alone; a process runner on the ephemeral API is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import skops.io

from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest
from tests.conftest import task_runs

FLAKY_ENV = "PATCHFLOW_TEST_FLAKY_FLAG"
DASK = {"kind": "dask", "n_workers": 2, "threads_per_worker": 1}


def flaky_identity(mask: np.ndarray) -> np.ndarray:
    """mask_preprocessing that fails exactly once over all processes (whoever creates the flag file first)."""
    flag = os.environ.get(FLAKY_ENV)
    if flag:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return mask
        raise RuntimeError("injected shard failure")
    return mask


KILL_ENV = "PATCHFLOW_TEST_KILL_AT"


def killing_identity(mask: np.ndarray) -> np.ndarray:
    """mask_preprocessing whose N-th call over all processes SIGKILLs its own process (a worker dying mid-shard)."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        counter, at = spec.rsplit(":", 1)
        with open(counter, "ab") as f:
            f.write(b".")
            n = f.tell()
        if n == int(at):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    return mask


def _dataset_cfg(raw: Path, out: Path, root: Path, runner: dict) -> dict:
    return {
        "data": {"images": str(raw / "images"), "masks": str(raw / "masks"), "class_to_idx": CLASS_TO_IDX},
        "dataset": {
            "output_folder": str(out),
            "patch_size": [32, 32],
            "val_size": 0.3,
            "test_size": 0.2,
            "shard_images": 5,
            "mask_preprocessing": "tests.test_dask:flaky_identity",
        },
        "runner": runner,
        "storage_root": str(root),
    }


def _train_cfg(data: Path, tmp: Path, root: Path, runner: dict) -> dict:
    return {
        "datamodule": {"data_path": str(data), "batch_size": 16},
        "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
        "transforms": {"input_height": 64, "input_width": 64},
        "trainer": {"iteration_over_training": 2},
        "task": {"shard_patches": 16, "report": False},
        "core": {"runs_folder": str(tmp / "runs")},
        "runner": runner,
        "storage_root": str(root),
    }


def test_dask_runs_match_single_process(tmp_path: Path, prefect_harness, monkeypatch) -> None:
    from flows.dataset import dataset_flow
    from flows.train import train_flow
    from storage import features as fstore

    raw = tmp_path / "raw"
    make_dataset(raw, n=22, h=64, w=80, seed=5)
    monkeypatch.setenv(FLAKY_ENV, str(tmp_path / "failed-once"))

    # dataset: Dask first (one scan shard fails once and is retried), then one process
    state = dataset_flow(_dataset_cfg(raw, tmp_path / "ds_dask", tmp_path / "root_dask", DASK), return_state=True)
    assert state.is_completed()
    assert (tmp_path / "failed-once").exists()
    runs = task_runs(state)
    scans = [r for r in runs if r.name.startswith("scan-images")]
    writes = [r for r in runs if r.name.startswith("write-patches")]
    assert len(scans) == 5 and len(writes) == 5  # 22 images in shards of 5
    assert sorted(r.run_count for r in scans) == [1, 1, 1, 1, 2]  # only the failed shard ran again
    assert all(r.state.is_completed() for r in scans + writes)
    state = dataset_flow(
        _dataset_cfg(raw, tmp_path / "ds_one", tmp_path / "root_one", {"kind": "thread"}), return_state=True
    )
    assert state.is_completed()
    assert tree_digest(tmp_path / "ds_dask") == tree_digest(tmp_path / "ds_one")

    # training: feature shards on Dask vs in the flow's process
    data = tmp_path / "ds_one"
    state = train_flow(_train_cfg(data, tmp_path, tmp_path / "t_dask", DASK), return_state=True)
    r_dask = state.result()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    shard_bars = [a for a in arts if a.type == "progress" and "feature shards on Dask" in (a.description or "")]
    assert len(shard_bars) == 1 and shard_bars[0].data == 100.0  # advanced shard by shard to the end
    r_one = train_flow(_train_cfg(data, tmp_path, tmp_path / "t_one", {"kind": "thread"}))
    stores_dask = sorted((tmp_path / "t_dask" / "features").glob("*.zarr"))
    stores_one = sorted((tmp_path / "t_one" / "features").glob("*.zarr"))
    assert [p.name for p in stores_dask] == [p.name for p in stores_one] and len(stores_one) == 4
    assert sorted(fstore.store_attrs(p)["kind"] for p in stores_one) == ["grid", "train", "train", "val"]
    n_shards = 0
    for a, b in zip(stores_dask, stores_one):
        assert fstore.is_verified(a) and fstore.is_verified(b)
        assert fstore.store_attrs(a)["content_digest"] == fstore.store_attrs(b)["content_digest"]
        n_shards += len(list((a / "_shards").glob("shard-*.json")))
    assert n_shards > 4  # several shards per store really ran
    val = next(p for p in stores_one if fstore.store_attrs(p)["kind"] == "val")
    X = fstore.load_features(val)[0]
    clf_dask = skops.io.load(Path(r_dask["bundle"]) / "classifier.skops")
    clf_one = skops.io.load(Path(r_one["bundle"]) / "classifier.skops")
    np.testing.assert_array_equal(clf_dask.predict_proba(X), clf_one.predict_proba(X))
    assert r_dask["metrics"] == r_one["metrics"]


def test_dask_runner_needs_a_real_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.config import ConfigError
    from tasks.runner import RunnerSection, check_runner

    with temporary_settings(updates={PREFECT_API_URL: None}):
        check_runner(RunnerSection())  # thread: fine anywhere
        with pytest.raises(ConfigError, match="PREFECT_API_URL"):
            check_runner(RunnerSection(kind="dask"))


def test_existing_dask_cluster_by_address(tmp_path: Path, prefect_harness) -> None:
    """`runner.address`: a scheduler and 2 workers started outside patchflow (no PREFECT_* env) build the same
    dataset."""
    import socket
    import subprocess
    import sys
    import time

    from flows.dataset import dataset_flow

    raw = tmp_path / "raw"
    make_dataset(raw, n=12, h=64, w=80, seed=9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    dask = [str(Path(sys.executable).with_name("dask"))]
    procs = [
        subprocess.Popen(
            dask + ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        time.sleep(2)
        procs.append(
            subprocess.Popen(
                dask + ["worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        cfg = _dataset_cfg(
            raw, tmp_path / "ds_cluster", tmp_path / "root_c", {"kind": "dask", "address": f"tcp://127.0.0.1:{port}"}
        )
        cfg["dataset"].pop("mask_preprocessing")
        state = dataset_flow(cfg, return_state=True)
        assert state.is_completed()
        assert len([r for r in task_runs(state) if r.name.startswith("write-patches")]) == 3
        cfg = _dataset_cfg(raw, tmp_path / "ds_one", tmp_path / "root_o", {"kind": "thread"})
        cfg["dataset"].pop("mask_preprocessing")
        dataset_flow(cfg)
        assert tree_digest(tmp_path / "ds_cluster") == tree_digest(tmp_path / "ds_one")
    finally:
        for p in procs:
            os.killpg(p.pid, 15)
        for p in procs:
            p.wait(timeout=30)


def test_worker_killed_mid_shard_is_recovered(tmp_path: Path, prefect_harness, monkeypatch) -> None:
    """A Dask worker SIGKILLed while writing a shard (holding its shard lock): the shard is rerun elsewhere, the lock
    of the dead process reclaimed, and the dataset is byte-identical to the single-process one."""
    from flows.dataset import dataset_flow

    raw = tmp_path / "raw"
    make_dataset(raw, n=22, h=64, w=80, seed=5, n_empty=0)
    counter = tmp_path / "calls"
    monkeypatch.setenv(KILL_ENV, f"{counter}:30")  # 22 scan calls, then the 8th call of the write phase dies
    cfg = _dataset_cfg(raw, tmp_path / "ds_dask", tmp_path / "root_dask", DASK)
    cfg["dataset"]["mask_preprocessing"] = "tests.test_dask:killing_identity"
    state = dataset_flow(cfg, return_state=True)
    assert state.is_completed()
    assert counter.stat().st_size > 30  # the kill happened, and the work went on after it
    monkeypatch.delenv(KILL_ENV)
    cfg = _dataset_cfg(raw, tmp_path / "ds_one", tmp_path / "root_one", {"kind": "thread"})
    cfg["dataset"]["mask_preprocessing"] = "tests.test_dask:killing_identity"
    dataset_flow(cfg)
    assert tree_digest(tmp_path / "ds_dask") == tree_digest(tmp_path / "ds_one")
    assert not list((tmp_path / "root_dask" / "locks").glob("*.lock"))
