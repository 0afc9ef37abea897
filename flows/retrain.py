"""Retraining flow (scheduled): dataset -> train -> new model version -> promote to latest if not worse.

``python -m flows.retrain --config FILE [dotted.key=value ...]``

Only images added or changed since the last run cost work (every stage is content-keyed); a run on
unchanged inputs adds no version. What was done is published as a markdown artifact.
"""

from __future__ import annotations

from functools import partial

from tasks.cli import early_start, parse_cli
from tasks.retrain_config import RetrainFlowConfig

early_start(__name__, partial(parse_cli, RetrainFlowConfig, description=__doc__))  # --help and errors before Prefect

import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow

from flows.dataset import dataset_flow
from flows.evaluate import evaluate_flow
from flows.train import train_flow
from tasks.cli import cli_main, run_cli
from tasks.config import ensure_storage_root, validate_config
from tasks.dataset.config import DatasetFlowConfig
from tasks.retrain import (
    comparison_config,
    inputs_key,
    models_folder,
    publish_outcome,
    register_task,
    train_config,
)

__all__ = ["RetrainFlowConfig", "retrain_flow"]


@flow(name="patchflow-retrain")
def retrain_flow(config: RetrainFlowConfig) -> dict[str, Any]:
    """Rebuild the dataset from the data folder, retrain, version the bundle and promote it if not worse."""
    cfg = validate_config(RetrainFlowConfig, config)
    ensure_storage_root(cfg.storage_root)  # before any stage: one clear line for a file-shaped or read-only root
    data_path = dataset_flow(
        DatasetFlowConfig(data=cfg.data, dataset=cfg.dataset, storage_root=cfg.storage_root, runner=cfg.runner)
    )
    train_cfg = train_config(cfg, data_path)
    result = train_flow(train_cfg)
    key, folder = inputs_key(train_cfg, data_path), models_folder(cfg, train_cfg)
    latest_metrics = None
    ecfg = comparison_config(cfg, train_cfg, key)
    if ecfg is not None:  # a new version: judge the promoted model on the same val split
        state = evaluate_flow(ecfg, return_state=True)
        latest_metrics = state.result()["metrics"] if state.is_completed() else None  # else: the recorded value
    outcome = register_task(
        result["bundle"], str(folder), result["metrics"], key, cfg.promotion, result["run_dir"], latest_metrics
    )
    publish_outcome(outcome, folder, result["run_dir"])
    return {"outcome": outcome, **result}


def report(result: dict[str, Any]) -> None:
    """What the command line prints after a run."""
    o = result["outcome"]
    print(f"{o['action']}: version {o['version']}, latest {o['latest']} ({o['reason']})")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cli_main(RetrainFlowConfig, retrain_flow, report, argv, __doc__)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
