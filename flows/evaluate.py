"""Evaluation flow: a deployment bundle on a patch dataset's test split (the reference's test experiment).

``python -m flows.evaluate --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, Sequence

from prefect import flow

from storage import bundle as bdl
from storage import features as fstore
from storage.manifest import matches_manifest
from tasks.artifacts import publish_task
from tasks.stage import cached_stage
from tasks.cli import parse_cli, run_cli
from tasks.config import ensure_storage_root, validate_config
from tasks.evaluation.stage import EvaluateFlowConfig, bundle_features_task, bundle_split_key, evaluate_task, evaluation_key
from tasks.evaluation.scoring import headline
from tasks.features.stage import store_path
from tasks.run_folder import attach_log, detach_log, make_run_dir


@flow(name="patchflow-evaluate")
def evaluate_flow(config: EvaluateFlowConfig) -> dict[str, Any]:
    """Evaluate a bundle; returns the run folder, the output folder and the metrics."""
    cfg = validate_config(EvaluateFlowConfig, config)
    root = ensure_storage_root(cfg.storage_root)
    bundle_root, meta = bdl.open_bundle(cfg.task.model_path, cfg.task.trust_pickle)  # every file checked first
    run = make_run_dir(cfg)
    log = attach_log(run)
    try:
        fkey = bundle_split_key(cfg, bundle_root, meta)
        fout = store_path(root, fkey)
        f = "features" in cfg.force
        store = cached_stage(bundle_features_task, root, f, fstore.is_verified(fout))(cfg, fkey, str(fout), f)
        ekey = evaluation_key(cfg, fkey, bundle_root, meta)
        eout = root / "evaluations" / ekey[:32]
        f = "evaluate" in cfg.force
        metrics = cached_stage(evaluate_task, root, f, matches_manifest(eout))(cfg, store, ekey, str(eout), f)
        out = run / cfg.task.output.folder
        shutil.copytree(eout, out)
        shutil.copy2(out / "reconstruction_results.json", run / "reconstruction_results.json")
        publish_task(f"{cfg.core.name} {cfg.datamodule.split}", metrics, str(out))
        return {"run_dir": str(run), "output": str(out), "metrics": metrics}
    finally:
        detach_log(log)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse_cli(EvaluateFlowConfig, argv, description=__doc__)
    result = evaluate_flow(cfg)
    print(f"run folder: {result['run_dir']}")
    print("\n".join(headline(result["metrics"], "test")))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
