"""Training flow: pass features -> fit -> export -> validate, each stage cached by content.

``python -m flows.train --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from prefect import flow

from storage import features as fstore
from storage.fingerprint import combine, params_digest
from storage.manifest import file_matches, matches_manifest
from tasks.artifacts import Progress, publish_task
from tasks.stage import cached_stage
from tasks.cli import parse_cli, run_cli
from tasks.config import ensure_storage_root, validate_config
from tasks.evaluation.scoring import METRICS_VERSION, headline
from tasks.features.params import backbone_digest
from tasks.features.stage import (
    dataset_key,
    feature_shard_task,
    prepare_features_task,
    split_features_task,
    split_key,
    store_path,
    train_pass_key,
    train_pass_task,
)
from storage.shards import prune_stale_partials
from tasks.model.stage import export_backbone_task, export_task, export_types, fit_task, model_json, validate_task
from tasks.runner import check_runner, dask_runner, run_all
from tasks.run_folder import attach_log, detach_log, make_run_dir, write_data_record
from tasks.model.config import TrainFlowConfig


@flow(name="patchflow-train")
def train_flow(config: TrainFlowConfig) -> dict[str, Any]:
    """Train a patch classifier on a patch dataset; returns the run folder, bundle and val metrics."""
    cfg = validate_config(TrainFlowConfig, config)
    root = ensure_storage_root(cfg.storage_root)
    check_runner(cfg.runner)
    force = set(cfg.force)
    run = make_run_dir(cfg)
    log = attach_log(run)
    try:
        write_data_record(cfg, run)
        for sub in ("features", "backbones", "bundles", "validation"):  # leftovers of killed runs
            prune_stale_partials(root / sub, patterns=("*.partial", "*/*.partial"))
        dkey, wdig = dataset_key(cfg.datamodule.data_path), backbone_digest(cfg)
        n_pass = cfg.trainer.iteration_over_training
        progress = Progress(n_pass + 5, f"{cfg.core.name}: {n_pass} feature passes, val features, fit, export, validation")
        keys = [(p, train_pass_key(cfg, dkey, wdig, p), "features" in force) for p in range(n_pass)]
        keys.append(("val", split_key(cfg, dkey, wdig, "val"), "val_features" in force))
        jobs = [(w, k, str(store_path(root, k)), f) for w, k, f in keys]  # (pass index or split, key, store, forced)
        sharded = cfg.runner.kind == "dask"
        if sharded:  # prepare and fill every shard on the cluster; the cached tasks below only finalize
            todo = [(w, k, out, f) for w, k, out, f in jobs if f or not fstore.is_verified(Path(out))]
            if todo:
                with dask_runner(cfg.runner) as tr:
                    common = {"cfg": cfg, "weights_digest": wdig, "root": str(root)}
                    counts = run_all(tr, [(prepare_features_task, {**common, "what": w, "key": k, "out": out, "force": f})
                                          for w, k, out, f in todo])
                    shard_progress = Progress(sum(counts), f"{cfg.core.name}: {sum(counts)} feature shards on Dask")
                    run_all(tr, [(feature_shard_task, {**common, "what": w, "key": k, "out": out, "index": i})
                                 for (w, k, out, _), n in zip(todo, counts) for i in range(n)], on_done=shard_progress.step)
        stores = []
        for w, key, out, f in jobs:
            stage = train_pass_task if w != "val" else split_features_task
            done = fstore.is_verified(Path(out))
            stores.append(cached_stage(stage, root, f, done)(cfg, w, key, out, wdig, f and not sharded, str(root)))
            progress.step()
        val_store = stores.pop()

        fkey = combine("fit", *sorted(Path(s).name for s in stores), params_digest(cfg.model.model_dump(mode="json")), str(cfg.core.seed))
        fout = root / "models" / f"{fkey[:32]}.skops"
        f = "fit" in force
        clf = cached_stage(fit_task, root, f, file_matches(fout))(cfg, stores, fkey, str(fout), f)
        progress.step()

        size = [cfg.transforms.input_height, cfg.transforms.input_width]
        bkey = combine("backbone-export", wdig, params_digest({"name": cfg.backbone.name, "size": size, "types": export_types(cfg)}))
        bout = root / "backbones" / bkey[:32]
        f = "export" in force
        backbone = cached_stage(export_backbone_task, root, f, matches_manifest(bout))(cfg, bkey, str(bout), f)
        ekey = combine("export", fkey, bkey, params_digest(model_json(cfg, wdig)),
                       f"joblib={cfg.export.joblib_classifier}")
        eout = root / "bundles" / ekey[:32] / "deployment_model"
        bundle = cached_stage(export_task, root, f, matches_manifest(eout))(cfg, clf, backbone, ekey, str(eout), wdig, f)
        progress.step(2)

        skip = sorted(cfg.datamodule.class_to_skip_training or [])
        recon = {"method": cfg.task.reconstruction_method, "coverage": cfg.task.coverage_threshold, "report": cfg.task.report,
                 "soft_thresholds": cfg.task.soft_thresholds}
        vkey2 = combine("validate", METRICS_VERSION, fkey, Path(val_store).name, params_digest({"skip": skip, "reconstruction": recon}))
        vdir = root / "validation" / vkey2[:32]
        f = "validate" in force
        metrics = cached_stage(validate_task, root, f, matches_manifest(vdir))(cfg, clf, val_store, vkey2, str(vdir), f)

        progress.step()
        shutil.copytree(bundle, run / "deployment_model")
        shutil.copytree(vdir, run / "validation")
        publish_task(f"{cfg.core.name} validation", metrics, str(run / "validation"), str(run / "deployment_model"))
        return {"run_dir": str(run), "bundle": str(run / "deployment_model"), "metrics": metrics}
    finally:
        detach_log(log)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse_cli(TrainFlowConfig, argv, description=__doc__)
    result = train_flow(cfg)
    print(f"run folder: {result['run_dir']}")
    print("\n".join(headline(result["metrics"], "val")))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
