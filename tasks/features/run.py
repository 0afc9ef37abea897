"""The feature stage inside the train flow: one store per training pass plus the val split, each cached by its
content key; on a Dask runner (``runner.kind=dask``) every shard is prepared and filled on the cluster first and
the cached tasks only finalize."""

from __future__ import annotations

from pathlib import Path

from storage import features as fstore
from tasks.artifacts import Progress
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
from tasks.model.config import TrainFlowConfig
from tasks.runner import dask_runner, run_all
from tasks.stage import run_stage

#: one feature store to build: (pass index or split name, content key, store path, forced)
Job = tuple[int | str, str, str, bool]


def feature_jobs(cfg: TrainFlowConfig, root: Path, weights_digest: str) -> list[Job]:
    """Every store of a training run: the passes ``0..iteration_over_training-1``, then ``"val"``."""
    dkey, force = dataset_key(cfg.datamodule.data_path), set(cfg.force)
    keys = [(p, train_pass_key(cfg, dkey, weights_digest, p), "features" in force)
            for p in range(cfg.trainer.iteration_over_training)]
    keys.append(("val", split_key(cfg, dkey, weights_digest, "val"), "val_features" in force))
    return [(what, key, str(store_path(root, key)), forced) for what, key, forced in keys]


def fill_on_dask(cfg: TrainFlowConfig, root: Path, weights_digest: str, jobs: list[Job]) -> None:
    """Prepare and fill every shard of the stores still to build on the Dask cluster of ``cfg.runner``."""
    todo = [job for job in jobs if job[3] or not fstore.is_verified(Path(job[2]))]
    if not todo:
        return
    with dask_runner(cfg.runner) as tr:
        common = {"cfg": cfg, "weights_digest": weights_digest, "root": str(root)}
        counts = run_all(tr, [(prepare_features_task, {**common, "what": w, "key": k, "out": out, "force": f})
                              for w, k, out, f in todo])
        progress = Progress(sum(counts), f"{cfg.core.name}: {sum(counts)} feature shards on Dask")
        run_all(tr, [(feature_shard_task, {**common, "what": w, "key": k, "out": out, "index": i})
                     for (w, k, out, _), n in zip(todo, counts) for i in range(n)], on_done=progress.step)


def train_features(cfg: TrainFlowConfig, root: Path, weights_digest: str, progress: Progress) -> tuple[list[str], str]:
    """Build (or reuse) every feature store of a training run; ``(training pass stores, val store)``."""
    jobs = feature_jobs(cfg, root, weights_digest)
    sharded = cfg.runner.kind == "dask"
    if sharded:
        fill_on_dask(cfg, root, weights_digest, jobs)
    stores = []
    for what, key, out, forced in jobs:
        stage = train_pass_task if what != "val" else split_features_task
        stores.append(run_stage(stage, root, out, fstore.is_verified, forced,
                                cfg, what, key, out, weights_digest, forced and not sharded, str(root)))
        progress.step()
    return stores[:-1], stores[-1]
