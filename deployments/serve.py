"""Serve patchflow's three deployments from one process (no work pool, no worker).

``python -m deployments.serve`` (or ``python deployments/serve.py``), with ``PREFECT_API_URL`` pointing at
a running ``prefect server start`` (schedules need a persistent server). Serves
``patchflow-retrain/retrain-weekly`` (weekly cron), ``patchflow-evaluate/evaluate`` and
``patchflow-predict/predict``; trigger them from the UI or with ``prefect deployment run``. Stop with Ctrl-C
(serve pauses the schedules on shutdown).

Names, schedules, tags, descriptions and default parameters are read from ``deployments/prefect.yaml`` (one
source of truth with the worker route); each ``config`` is validated by its flow's pydantic model and passed
as ``model_dump(mode="json")``. Relative paths in it are relative to the repo root, so the process works
there (it changes into the repo root before serving).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = Path(__file__).resolve().with_name("prefect.yaml")

if str(REPO_ROOT) not in sys.path:  # `python deployments/serve.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import storage.settings  # noqa: E402,F401  (telemetry-off defaults before prefect is imported)


def _flows() -> dict[str, tuple[Any, type]]:
    """Entrypoint -> (flow, its config model)."""
    from flows.evaluate import evaluate_flow
    from flows.predict import PredictFlowConfig, predict_flow
    from flows.retrain import RetrainFlowConfig, retrain_flow
    from tasks.evaluation.config import EvaluateFlowConfig

    return {
        "flows/retrain.py:retrain_flow": (retrain_flow, RetrainFlowConfig),
        "flows/evaluate.py:evaluate_flow": (evaluate_flow, EvaluateFlowConfig),
        "flows/predict.py:predict_flow": (predict_flow, PredictFlowConfig),
    }


def deployment_specs(prefect_yaml: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments of ``prefect.yaml`` as keyword arguments of ``flow.to_deployment`` (plus ``flow``)."""
    from prefect.schedules import Cron

    from tasks.config import load_yaml, validate_config

    flows = _flows()
    specs = []
    for dep in load_yaml(prefect_yaml)["deployments"]:  # bounded aliases, duplicate keys refused
        flow, model = flows[dep["entrypoint"]]
        config = validate_config(
            model, dep.get("parameters", {}).get("config", {}), source=f"{prefect_yaml}, deployment {dep.get('name')!r}"
        )
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
            for s in dep.get("schedules") or []
            if "cron" in s
        ]
        specs.append(
            {
                "flow": flow,
                "name": dep["name"],
                "description": dep.get("description"),
                "tags": list(dep.get("tags") or []),
                "schedules": schedules,
                "parameters": {"config": config.model_dump(mode="json")},
                "enforce_parameter_schema": bool(dep.get("enforce_parameter_schema", True)),
            }
        )
    return specs


def build_deployments(prefect_yaml: Path = PREFECT_YAML) -> list[Any]:
    """``RunnerDeployment`` objects for ``prefect.serve``."""
    return [spec.pop("flow").to_deployment(**spec) for spec in deployment_specs(prefect_yaml)]


def worker_deployments(names: Sequence[str]) -> list[tuple[str, Any]]:
    """``(name, id)`` of the given ``flow/deployment`` names that exist on the server bound to a work pool.

    Serving over such a deployment (made by ``prefect deploy``) leaves it without code location or pull
    steps and its runs crash ("Downloading flow code from storage at None"): use one route per server.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                dep = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if dep.work_pool_name:
                found.append((name, dep.id))
    return found


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(
        prog="python -m deployments.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--limit", type=int, default=1, help="How many flow runs may execute at the same time (default 1)")
    ap.add_argument(
        "--replace",
        action="store_true",
        help="Delete same-named work-pool deployments (from `prefect deploy`) before serving",
    )
    args = ap.parse_args(argv)
    os.chdir(REPO_ROOT)
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "PREFECT_API_URL is not set: schedules only run against a persistent server "
            "(prefect server start; export PREFECT_API_URL=http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
    deployments = build_deployments()
    if os.environ.get("PREFECT_API_URL"):
        clash = worker_deployments([f"{d.flow_name}/{d.name}" for d in deployments])
        if clash and not args.replace:
            names = " ".join(f"'{n}'" for n, _ in clash)
            sys.exit(
                f"these deployments already exist on a work pool (prefect deploy): {names}\n"
                f"serve would break them; delete them (prefect deployment delete NAME), or rerun with --replace"
            )
        if clash:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                for name, dep_id in clash:
                    client.delete_deployment(dep_id)
                    print(f"deleted work-pool deployment {name}", file=sys.stderr)
    from prefect import serve

    serve(*deployments, limit=args.limit)


if __name__ == "__main__":
    main()
