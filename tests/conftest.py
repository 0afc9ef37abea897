"""Test isolation: a private PREFECT_HOME and storage root, set before anything imports prefect."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HOME = tempfile.mkdtemp(prefix="patchflow-test-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PATCHFLOW_STORAGE_ROOT": str(Path(_HOME) / "patchflow-store"),
    }
)

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd-dev"


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary-database) Prefect API for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def mtd_dev() -> Path:
    """The shared real magnetic-tile dataset (skips if absent)."""
    if not (SHARED_DATA / "images").is_dir():
        pytest.skip(f"{SHARED_DATA} not available")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_patch_dataset(tmp_path_factory) -> Path:
    """A small patch dataset (14 synthetic demo images, 64x64 patches, val 0.3), built once and only read."""
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    d = make_demo_dataset(root / "raw", n_images=14, size=(128, 160), seed=3)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask")
    out = root / "patches"
    generate_patch_dataset(
        assoc, d["class_to_idx"], val_size=0.3, test_size=0.0, patch_size=[64, 64], output_folder=str(out)
    )
    return out


def task_runs(flow_state) -> list:
    """The task runs of a finished flow run, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )


def task_states(flow_state) -> dict[str, str]:
    """``{task name (without run suffix): state name}`` of the task runs of a finished flow run."""
    runs = task_runs(flow_state)
    out: dict[str, str] = {}
    for run in runs:
        out[run.name.rsplit("-", 1)[0]] = run.state.name if run.state else "?"
    return out


#: whole files of slow tests: a real Prefect server, Dask clusters, kills and signals, concurrent flow runs, full
#: training/evaluation/retraining flows
SLOW_FILES = {
    "test_prefect_server_e2e.py",
    "test_dask.py",
    "test_signals.py",
    "test_concurrency.py",
    "test_crash_resume.py",
    "test_train_flow.py",
    "test_evaluate_flow.py",
    "test_retrain_flow.py",
    "test_dataset_flow.py",
}


def pytest_collection_modifyitems(config, items) -> None:
    """``slow``: the files above, every test that runs flows on the Prefect test harness (``prefect_harness``:
    ~10 s to start, ~1 s per flow run), and tests that start CLI subprocesses (each starts Prefect's temporary
    server) or Chromium, marked where they are. ``pytest -m "not slow"`` is the inner loop while editing."""
    for item in items:
        if Path(str(item.fspath)).name in SLOW_FILES or "prefect_harness" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
