"""End to end against a REAL Prefect server: `prefect server start`, the deployments of
`deployments/prefect.yaml` on a `process` work pool, a retrain run triggered with parameters, executed by
`prefect worker start --run-once`, checked through the API (state, artifacts, schedule) and in the UI
(headless Chromium screenshot of the flow-run page).

Every process started here carries a tag in its environment and is stopped (process group, then any
tagged leftover) when the module's fixture ends. The test process itself never keeps PREFECT_API_URL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
CHROMIUM = Path("/usr/bin/chromium")
TAG_VAR = "PATCHFLOW_E2E_TAG"
RETRAIN = "patchflow-retrain/retrain-weekly"
CRON = "0 3 * * 1"


def _prefect_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged_pids(tag: str) -> list[int]:
    """Processes (Linux) whose environment carries this test's tag: everything it started, orphans included."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # started with start_new_session=True: its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Processes:
    """Every process the test starts, and how to stop them all."""

    env: dict[str, str]
    tag: str
    started: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                env=self.env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def run(self, args: list[str], log: Path, cwd: Path, timeout: float) -> tuple[int, str]:
        """Run to completion (the whole process group is killed on timeout); returns (rc, output)."""
        proc = self.popen(args, log, cwd)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            rc = -9
        return rc, log.read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # stragglers of the group (services, uvicorn)
            if proc.poll() is None:
                proc.wait(timeout=10)
        leftovers = _tagged_pids(self.tag)  # e.g. a flow-run process in its own session
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
            leftovers = _tagged_pids(self.tag)
            if not leftovers:
                break


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


@contextmanager
def prefect_api(url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``url``; PREFECT_API_URL is restored (or removed) afterwards."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


@dataclass
class E2E:
    api_url: str
    ui_url: str
    tmp: Path
    flow_run_id: str
    flow_run_name: str
    worker_output: str
    procs: Processes


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    """Server up, pool created, deployments applied, one retrain run executed by a run-once worker."""
    from tasks.demo_data import make_demo_dataset

    tmp = tmp_path_factory.mktemp("prefect-e2e")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # conftest's or a user's settings
    env.update(
        {
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_API_PORT": str(port),  # `--port` alone leaves the UI calling :4200
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "PATCHFLOW_STORAGE_ROOT": str(tmp / "store"),
            "COLUMNS": "240",  # keep CLI output (flow run name and id) on one line
            TAG_VAR: tag,
        }
    )
    procs = Processes(env=env, tag=tag)
    prefect = _prefect_cmd()
    try:
        server = procs.popen(
            [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
            tmp / "server.log",
            tmp,
        )
        demo = make_demo_dataset(tmp / "incoming", n_images=10, size=(128, 160))
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up on {port}:\n{_tail((tmp / 'server.log').read_text())}")
            time.sleep(0.5)

        rc, out = procs.run(
            [*prefect, "work-pool", "create", "patchflow", "--type", "process"], tmp / "pool.log", tmp, 60
        )
        assert rc == 0, _tail(out)
        rc, out = procs.run(
            [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            tmp / "deploy.log",
            REPO,
            180,
        )  # entrypoints resolve against the repo root
        assert rc == 0, _tail(out)
        assert out.count("successfully created") == 3, _tail(out)

        config = {
            "data": {
                "images": demo["images"],
                "masks": demo["masks"],
                "mask_extension": "_mask",
                "class_to_idx": demo["class_to_idx"],
            },
            "dataset": {"output_folder": str(tmp / "patches"), "patch_size": [64, 64], "val_size": 0.3},
            "train": {
                "trainer": {"iteration_over_training": 2},
                "transforms": {"input_height": 64, "input_width": 64},
                "core": {"name": "tiles", "runs_folder": str(tmp / "runs")},
            },
            "promotion": {"models_folder": str(tmp / "models")},
            "storage_root": str(tmp / "store"),
        }
        rc, out = procs.run(
            [*prefect, "deployment", "run", RETRAIN, "--params", json.dumps({"config": config})],
            tmp / "trigger.log",
            tmp,
            60,
        )
        assert rc == 0, _tail(out)
        m_id, m_name = re.search(r"UUID: ([0-9a-f-]{36})", out), re.search(r"Created flow run '([^']+)'", out)
        assert m_id and m_name, _tail(out)

        rc, worker_out = procs.run(
            [*prefect, "worker", "start", "--pool", "patchflow", "--run-once"], tmp / "worker.log", tmp, 180
        )
        assert rc == 0, _tail(worker_out)
        yield E2E(api_url, f"http://127.0.0.1:{port}", tmp, m_id.group(1), m_name.group(1), worker_out, procs)
    finally:
        procs.stop_all()


def test_retrain_deployment_runs_on_a_worker(e2e: E2E) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.objects import StateType

    run_id = uuid.UUID(e2e.flow_run_id)
    api_url_before = os.environ.get("PREFECT_API_URL")
    with prefect_api(e2e.api_url), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state is not None and run.state.type == StateType.COMPLETED, (run.state, _tail(e2e.worker_output))
        assert run.parameters["config"]["train"]["trainer"]["iteration_over_training"] == 2  # the run-time override

        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
        )
        assert sorted(client.read_flow(s.flow_id).name for s in subflows) == ["patchflow-dataset", "patchflow-train"]
        assert all(s.state is not None and s.state.type == StateType.COMPLETED for s in subflows)
        ids = [run_id, *(s.id for s in subflows)]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        outcome = [a for a in artifacts if a.key == "retrain-outcome"]
        assert len(outcome) == 1 and outcome[0].type == "markdown" and outcome[0].flow_run_id == run_id
        assert "promoted" in str(outcome[0].data) and "v0001" in str(outcome[0].data)
        progress = [a for a in artifacts if a.type == "progress"]
        assert progress and float(progress[0].data) == 100.0, [(a.key, a.type, a.data) for a in artifacts]
        tables = [a for a in artifacts if a.type == "table" and (a.key or "").endswith("-metrics")]
        assert tables, [(a.key, a.type) for a in artifacts]
        assert "background" in str(tables[0].data)

        dep = client.read_deployment_by_name(RETRAIN)
        assert dep.id == run.deployment_id and dep.work_pool_name == "patchflow" and dep.enforce_parameter_schema
        assert [(s.schedule.cron, s.active) for s in dep.schedules] == [(CRON, True)]
        assert dep.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO.resolve())}}
        ]
        assert dep.parameters["config"]["data"]["images"] == "demo_data/images"  # repo-relative defaults
        for name in ("patchflow-evaluate/evaluate", "patchflow-predict/predict"):
            other = client.read_deployment_by_name(name)
            assert other.schedules == [] and other.work_pool_name == "patchflow" and other.enforce_parameter_schema
        with pytest.raises(Exception, match="less than the minimum"):  # the schema is enforced server-side
            client.create_flow_run_from_deployment(
                dep.id,
                parameters={
                    "config": {**run.parameters["config"], "train": {"trainer": {"iteration_over_training": 0}}}
                },
            )

    assert os.environ.get("PREFECT_API_URL") == api_url_before  # nothing leaks to other tests
    latest = json.loads((e2e.tmp / "models" / "tiles" / "latest.json").read_text())
    assert latest["version"] == "v0001" and (e2e.tmp / "models" / "tiles" / "v0001" / "model.json").is_file()


def _chromium(e2e: E2E, url: str, out: Path, *extra: str) -> tuple[int, str]:
    args = [
        str(CHROMIUM),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={e2e.tmp / 'chromium-profile'}",
        "--window-size=1600,1000",
        "--virtual-time-budget=15000",
        *extra,
        url,
    ]
    return e2e.procs.run(args, out, e2e.tmp, 120)


def test_flow_run_page_renders_in_the_ui(e2e: E2E) -> None:
    if not CHROMIUM.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} missing: CI must install it (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} not installed")
    import cv2
    import numpy as np

    page = f"{e2e.ui_url}/runs/flow-run/{e2e.flow_run_id}"
    shot, missing = e2e.tmp / "flow_run.png", e2e.tmp / "missing_run.png"
    rc, log = _chromium(e2e, page, e2e.tmp / "chromium.log", f"--screenshot={shot}")
    assert shot.is_file(), (rc, _tail(log))
    # the same page for a run that does not exist: the UI shell / not-found page, no run
    _chromium(
        e2e, f"{e2e.ui_url}/runs/flow-run/{uuid.uuid4()}", e2e.tmp / "chromium-missing.log", f"--screenshot={missing}"
    )
    rc, dom = _chromium(e2e, page, e2e.tmp / "dom.html", "--dump-dom")

    img = cv2.imread(str(shot)).astype(np.int16)
    assert img.shape[:2] == (1000, 1600)
    assert img.std() > 12 and len(np.unique(img.reshape(-1, 3), axis=0)) > 500  # not blank

    def green(a: np.ndarray) -> np.ndarray:  # the "Completed" badge and the run's timeline bars
        b, g, r = a[..., 0], a[..., 1], a[..., 2]
        return (g > 120) & (g > r + 40) & (g > b + 20)

    def text(a: np.ndarray) -> np.ndarray:  # light text on the dark theme
        return a.min(axis=2) > 180

    assert green(img).mean() > 0.002 and green(img[:150]).sum() > 300, "no green Completed badge / run bars"
    assert text(img).mean() > 0.002, "hardly any text on the page"
    if missing.is_file():
        ref = cv2.imread(str(missing)).astype(np.int16)
        assert green(ref).mean() < green(img).mean() / 5 and text(ref).mean() < text(img).mean() / 3
        assert (np.abs(img - ref).max(axis=2) > 30).mean() > 0.02
    for needle in (e2e.flow_run_name, "Completed", "patchflow-retrain"):  # the rendered DOM shows this run
        assert needle in dom, (needle, _tail(dom, 2000))


def test_serve_builds_the_three_deployments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m deployments.serve` serves prefect.yaml's deployments with validated, JSON-dumped configs."""
    import yaml

    from deployments.serve import build_deployments

    monkeypatch.chdir(REPO)
    spec = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    deps = {d.name: d for d in build_deployments()}
    assert set(deps) == set(spec) == {"retrain-weekly", "evaluate", "predict"}
    for name, dep in deps.items():
        assert dep.entrypoint == spec[name]["entrypoint"] and dep.enforce_parameter_schema
        json.dumps(dep.parameters)  # JSON-serialisable
    assert [s.schedule.cron for s in deps["retrain-weekly"].schedules] == [CRON]
    assert deps["evaluate"].schedules == [] and deps["predict"].schedules == []
    retrain = deps["retrain-weekly"].parameters["config"]
    assert retrain["data"]["images"] == "demo_data/images" and retrain["dataset"]["patch_size"] == [64, 64]
    assert retrain["train"]["trainer"]["iteration_over_training"] == 5  # defaults filled in by the model
    assert retrain["train"]["model"]["_target_"] == "sklearn.pipeline.Pipeline"  # the recipe's default model
