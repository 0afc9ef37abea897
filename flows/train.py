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
from storage.settings import results_dir, storage_root
from tasks.caching import content_policy
from tasks.config import parse_cli, run_cli, validate_config
from tasks.features_task import (
    backbone_digest,
    dataset_key,
    split_features_task,
    split_key,
    store_path,
    train_pass_key,
    train_pass_task,
)
from tasks.model_task import export_backbone_task, export_task, fit_task, model_json, validate_task
from tasks.run_folder import attach_log, detach_log, make_run_dir, write_data_record
from tasks.train_config import TrainFlowConfig


def _cached(task_fn, root: Path, refresh: bool):
    return task_fn.with_options(cache_policy=content_policy(root), result_storage=results_dir(root), refresh_cache=refresh)


@flow(name="patchflow-train")
def train_flow(config: TrainFlowConfig) -> dict[str, Any]:
    """Train a patch classifier on a patch dataset; returns the run folder, bundle and val metrics."""
    cfg = validate_config(TrainFlowConfig, config)
    root = storage_root(cfg.storage_root)
    run = make_run_dir(cfg)
    log = attach_log(run)
    try:
        write_data_record(cfg, run)
        dkey, wdig = dataset_key(cfg.datamodule.data_path), backbone_digest(cfg)
        stores = []
        for p in range(cfg.trainer.iteration_over_training):
            key = train_pass_key(cfg, dkey, wdig, p)
            out = store_path(root, key)
            stale = "features" in cfg.force or not fstore.is_complete(out)
            stores.append(_cached(train_pass_task, root, stale)(cfg, p, key, str(out), wdig))
        vkey = split_key(cfg, dkey, wdig, "val")
        vout = store_path(root, vkey)
        val_store = _cached(split_features_task, root, "val_features" in cfg.force or not fstore.is_complete(vout))(
            cfg, "val", vkey, str(vout), wdig
        )
        fkey = combine("fit", *sorted(Path(s).name for s in stores), params_digest(cfg.model.model_dump(mode="json")), str(cfg.core.seed))
        fout = root / "models" / f"{fkey[:32]}.joblib"
        clf = _cached(fit_task, root, "fit" in cfg.force or not fout.is_file())(cfg, stores, fkey, str(fout))
        size = [cfg.transforms.input_height, cfg.transforms.input_width]
        bkey = combine("backbone-export", wdig, params_digest({"name": cfg.backbone.name, "size": size, "types": cfg.export.types}))
        bout = root / "backbones" / bkey[:32]
        backbone = _cached(export_backbone_task, root, "export" in cfg.force or not bout.is_dir())(cfg, bkey, str(bout))
        ekey = combine("export", fkey, bkey, params_digest(model_json(cfg, wdig)))
        eout = root / "bundles" / ekey[:32] / "deployment_model"
        bundle = _cached(export_task, root, "export" in cfg.force or not (eout / "model.json").is_file())(
            cfg, clf, backbone, ekey, str(eout), wdig
        )
        skip = sorted(cfg.datamodule.class_to_skip_training or [])
        vkey2 = combine("validate", fkey, Path(val_store).name, params_digest(skip))
        vdir = root / "validation" / vkey2[:32]
        metrics = _cached(validate_task, root, "validate" in cfg.force or not (vdir / "metrics.json").is_file())(
            cfg, clf, val_store, vkey2, str(vdir)
        )
        shutil.copytree(bundle, run / "deployment_model")
        shutil.copytree(vdir, run / "validation")
        return {"run_dir": str(run), "bundle": str(run / "deployment_model"), "metrics": metrics}
    finally:
        detach_log(log)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse_cli(TrainFlowConfig, argv, description=__doc__)
    result = train_flow(cfg)
    print(f"run folder: {result['run_dir']}")
    m = result["metrics"]
    if "accuracy" in m:
        print(f"val accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} on {m['n_evaluated']} patches")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
