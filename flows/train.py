"""Training flow: pass features -> (classifier search) -> fit -> export -> validate, each stage cached by content.

``python -m flows.train --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow

from tasks.artifacts import Progress
from tasks.cli import cli_main, run_cli
from tasks.config import ensure_storage_root, validate_config
from tasks.evaluation.scoring import headline
from tasks.evaluation.stage import validate_stage
from tasks.features.params import backbone_digest
from tasks.features.stage import train_features
from tasks.model.config import TrainFlowConfig
from tasks.model.stage import export_stage, fit_stage, search_stage
from tasks.run_folder import finish_train_run, prune_partials, run_folder, write_data_record
from tasks.runner import check_runner


@flow(name="patchflow-train")
def train_flow(config: TrainFlowConfig) -> dict[str, Any]:
    """Train a patch classifier on a patch dataset; returns the run folder, bundle and val metrics."""
    cfg = validate_config(TrainFlowConfig, config)
    root = ensure_storage_root(cfg.storage_root)
    check_runner(cfg.runner)
    with run_folder(cfg) as run:
        write_data_record(cfg, run)
        prune_partials(root)  # leftovers of killed runs
        weights = backbone_digest(cfg)
        n_pass, grid = cfg.trainer.iteration_over_training, int(cfg.trainer.grid_patches)
        n_search = int(cfg.search.enabled)
        progress = Progress(
            n_pass + grid + 5 + n_search,
            f"{cfg.core.name}: {n_pass} feature passes{', train grid' * grid}, val features, "
            f"{'search, ' * n_search}fit, export, validation",
        )
        stores, val_store = train_features(cfg, root, weights, progress)
        choice = search_stage(cfg, root, stores)  # None unless search.enabled
        progress.step(n_search)
        classifier, fit_key = fit_stage(cfg, root, stores, choice)
        progress.step()
        bundle = export_stage(cfg, root, classifier, fit_key, weights, choice)
        progress.step(2)
        metrics, validation = validate_stage(cfg, root, classifier, fit_key, val_store)
        progress.step()
        return finish_train_run(cfg, run, bundle, validation, metrics)


def report(result: dict[str, Any]) -> None:
    """What the command line prints after a run."""
    print(f"run folder: {result['run_dir']}")
    print("\n".join(headline(result["metrics"], "val")))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cli_main(TrainFlowConfig, train_flow, report, argv, __doc__)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
