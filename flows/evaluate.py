"""Evaluation flow: a deployment bundle on a patch dataset's test split (the reference's test experiment).

``python -m flows.evaluate --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

from functools import partial

from tasks.cli import early_start, parse_cli
from tasks.evaluation.config import EvaluateFlowConfig

early_start(__name__, partial(parse_cli, EvaluateFlowConfig, description=__doc__))  # --help and errors before Prefect

import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow

from storage.bundle import open_bundle
from tasks.cli import cli_main, run_cli
from tasks.config import ensure_storage_root, validate_config
from tasks.evaluation.scoring import headline
from tasks.evaluation.stage import bundle_features_stage, evaluate_stage, finish_evaluation_run
from tasks.run_folder import run_folder


@flow(name="patchflow-evaluate")
def evaluate_flow(config: EvaluateFlowConfig) -> dict[str, Any]:
    """Evaluate a bundle; returns the run folder, the output folder and the metrics."""
    cfg = validate_config(EvaluateFlowConfig, config)
    root = ensure_storage_root(cfg.storage_root)
    bundle = open_bundle(cfg.task.model_path, cfg.task.trust_pickle)  # every file checked, once per run
    with run_folder(cfg) as run:
        store, features_key = bundle_features_stage(cfg, root, bundle)
        metrics, scored = evaluate_stage(cfg, root, bundle, features_key, store)
        return finish_evaluation_run(cfg, run, scored, metrics)


def report(result: dict[str, Any]) -> None:
    """What the command line prints after a run."""
    print(f"run folder: {result['run_dir']}")
    print("\n".join(headline(result["metrics"], "test")))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cli_main(EvaluateFlowConfig, evaluate_flow, report, argv, __doc__)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
