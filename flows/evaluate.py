"""Evaluation flow: a deployment bundle on a patch dataset's test split (the reference's test experiment).

``python -m flows.evaluate --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from prefect import flow

from storage import bundle as bdl
from storage import features as fstore
from storage.settings import results_dir, storage_root
from tasks.artifacts import publish_task
from tasks.caching import content_policy
from tasks.config import parse_cli, run_cli, validate_config
from tasks.evaluate_task import EvaluateFlowConfig, bundle_features_task, bundle_split_key, evaluate_task, evaluation_key
from tasks.features_task import store_path
from tasks.run_folder import attach_log, detach_log, make_run_dir


def _stage(task_fn, root: Path, force: bool, done: bool):
    return task_fn.with_options(
        cache_policy=content_policy(root), result_storage=results_dir(root), refresh_cache=force or not done
    )


@flow(name="patchflow-evaluate")
def evaluate_flow(config: EvaluateFlowConfig) -> dict[str, Any]:
    """Evaluate a bundle; returns the run folder, the output folder and the metrics."""
    cfg = validate_config(EvaluateFlowConfig, config)
    root = storage_root(cfg.storage_root)
    bundle_root = bdl.resolve_bundle(cfg.task.model_path)
    meta = bdl.read_meta(bundle_root)
    run = make_run_dir(cfg)
    log = attach_log(run)
    try:
        fkey = bundle_split_key(cfg, bundle_root, meta)
        fout = store_path(root, fkey)
        f = "features" in cfg.force
        store = _stage(bundle_features_task, root, f, fstore.is_complete(fout))(cfg, fkey, str(fout), f)
        ekey = evaluation_key(cfg, fkey, bundle_root, meta)
        eout = root / "evaluations" / ekey[:32]
        f = "evaluate" in cfg.force
        metrics = _stage(evaluate_task, root, f, (eout / "metrics.json").is_file())(cfg, store, ekey, str(eout), f)
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
    m = result["metrics"]
    if "accuracy" in m:
        print(f"test accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} on {m['n_evaluated']} patches")
    rec = m.get("reconstruction", {}).get("all_defects", {})
    if rec.get("defects"):
        print(f"defects detected {rec['detected']}/{rec['defects']}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
