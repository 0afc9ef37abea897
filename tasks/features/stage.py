"""Feature stage: the content keys of feature stores and the ``@task`` entry points that build them.

Each training pass (one patch per ``dataset.txt`` line, drawn from (seed, pass index)), the train images' grid
patches (``trainer.grid_patches``) and each split is one store, keyed by content: dataset fingerprint + backbone
weights digest + feature layers + transform + sampling parameters (+ pass index; the grid: grid and labelling
rule). Raising ``iteration_over_training`` computes only new passes; changing the classifier computes none. The
stores are built by ``tasks/features/store.py``; :func:`train_features` runs every store of a training run (on a
Dask cluster first when configured).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import features as fstore
from storage import layout
from storage.fingerprint import combine, params_digest, tree_digest
from storage.geometry import GridSpec
from tasks.features.params import class_map, feature_params
from tasks.features.store import StoreJob, grid_job, split_job, train_pass_job
from tasks.model.config import TrainFlowConfig
from tasks.runner import dask_runner, run_all
from tasks.stage import build_once, run_stage

if TYPE_CHECKING:
    from tasks.artifacts import Progress


def dataset_key(data_path: str | Path) -> str:
    """Content fingerprint of a patch dataset: ours from its sidecar, Quadra's by hashing its files."""
    side = layout.read_sidecar(Path(data_path))
    if side and side.get("complete") and side.get("fingerprint"):
        return str(side["fingerprint"])
    return tree_digest(data_path)


def train_pass_key(cfg: TrainFlowConfig, dkey: str, wdigest: str, pass_index: int) -> str:
    """Key of one training pass's features."""
    dm = cfg.datamodule
    sampling = {
        "train_filename": dm.train_filename,
        "include": dm.include_filter,
        "exclude": dm.exclude_filter,
        "skip": dm.class_to_skip_training,
        "balance": dm.balance_classes,
        "seed": dm.seed,
        "classes": class_map(cfg),
        "pass": pass_index,
    }
    return combine("train-pass", dkey, params_digest(feature_params(cfg, wdigest)), params_digest(sampling))


def grid_key(cfg: TrainFlowConfig, dkey: str, wdigest: str) -> str:
    """Key of the train images' grid patch features: which train images (list and filters), the grid and the
    labelling rule (class maps, thresholds, skipped classes)."""
    from tasks.features.grid import grid_thresholds, mask_classes

    dm = cfg.datamodule
    spec = GridSpec.from_info(layout.read_info(Path(dm.data_path)))
    grid = {
        "train_filename": dm.train_filename,
        "include": dm.include_filter,
        "exclude": dm.exclude_filter,
        "skip": dm.class_to_skip_training,
        "classes": class_map(cfg),
        "mask_classes": mask_classes(cfg),
        "grid": [spec.patch_number, spec.patch_size, spec.overlap, spec.policy],
        "thresholds": grid_thresholds(cfg),
    }
    return combine("train-grid", dkey, params_digest(feature_params(cfg, wdigest)), params_digest(grid))


def split_key(cfg: TrainFlowConfig, dkey: str, wdigest: str, split: str) -> str:
    """Key of one split's features (filters included; skipped classes are applied later)."""
    dm = cfg.datamodule
    sel = {"split": split, "include": dm.include_filter, "exclude": dm.exclude_filter, "classes": class_map(cfg)}
    return combine("split", dkey, params_digest(feature_params(cfg, wdigest)), params_digest(sel))


def store_path(root: Path, key: str) -> Path:
    """Where the features of ``key`` live."""
    return root / "features" / f"{key[:32]}.zarr"


# ------------------------------------------------------------------------------------- Prefect tasks


GRID = "grid"  # the store of the train images' grid patches (a split name otherwise)


def _store_job(cfg: TrainFlowConfig, what: str | int, out: str, wdigest: str, key: str, root: str | None) -> StoreJob:
    r = Path(root) if root else None
    if isinstance(what, int):
        return train_pass_job(cfg, what, Path(out), wdigest, key, r)
    if what == GRID:
        return grid_job(cfg, Path(out), wdigest, key, r)
    return split_job(cfg, what, Path(out), wdigest, key, r)


@task(name="prepare-features", cache_policy=NO_CACHE)
def prepare_features_task(
    cfg: TrainFlowConfig, what: str | int, key: str, out: str, weights_digest: str, root: str, force: bool = False
) -> int:
    """Prepare the store of a pass (int), a split or the train grid (str) for sharded filling; returns its number of
    shards (0: done)."""
    return _store_job(cfg, what, out, weights_digest, key, root).prepare(force)


@task(name="feature-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def feature_shard_task(
    cfg: TrainFlowConfig, what: str | int, key: str, out: str, weights_digest: str, root: str, index: int
) -> dict[str, Any]:
    """Fill one shard of a prepared store (skipped when already done and verified); retried alone on failure."""
    return _store_job(cfg, what, out, weights_digest, key, root).fill(index)


def _finish_store(
    cfg: TrainFlowConfig, what: str | int, key: str, out: str, wdigest: str, force: bool, root: str | None
) -> str:
    def build() -> dict[str, Any]:
        return _store_job(cfg, what, out, wdigest, key, root).build(force)

    return build_once(out, force, fstore.is_verified, build)


@task(name="train-pass-features", persist_result=True)
def train_pass_task(
    cfg: TrainFlowConfig,
    pass_index: int,
    key: str,
    out: str,
    weights_digest: str,
    force: bool = False,
    root: str | None = None,
) -> str:
    """Features of one training pass, finished here (cached on ``key``; resumes a partial store; reuses a concurrent
    run's)."""
    return _finish_store(cfg, pass_index, key, out, weights_digest, force, root)


@task(name="split-features", persist_result=True)
def split_features_task(
    cfg: TrainFlowConfig,
    split: str,
    key: str,
    out: str,
    weights_digest: str,
    force: bool = False,
    root: str | None = None,
) -> str:
    """Features of a val/test split, finished here (cached on ``key``; resumes a partial store; reuses a concurrent
    run's)."""
    return _finish_store(cfg, split, key, out, weights_digest, force, root)


#: the train images' grid patch features: the task of a split (``split`` is :data:`GRID`) under its own name
grid_features_task = split_features_task.with_options(name="grid-features")

#: one feature store to build: (pass index or split name, content key, store path, forced)
Job = tuple[int | str, str, str, bool]


def feature_jobs(cfg: TrainFlowConfig, root: Path, weights_digest: str) -> list[Job]:
    """Every store of a training run: the passes ``0..iteration_over_training-1``, the train grid (with
    ``trainer.grid_patches``), then ``"val"``."""
    dkey, force = dataset_key(cfg.datamodule.data_path), set(cfg.force)
    keys: list[tuple[int | str, str, bool]] = [
        (p, train_pass_key(cfg, dkey, weights_digest, p), "features" in force)
        for p in range(cfg.trainer.iteration_over_training)
    ]
    if cfg.trainer.grid_patches:
        keys.append((GRID, grid_key(cfg, dkey, weights_digest), "features" in force))
    keys.append(("val", split_key(cfg, dkey, weights_digest, "val"), "val_features" in force))
    return [(what, key, str(store_path(root, key)), forced) for what, key, forced in keys]


def fill_on_dask(cfg: TrainFlowConfig, root: Path, weights_digest: str, jobs: list[Job]) -> None:
    """Prepare and fill every shard of the stores still to build on the Dask cluster of ``cfg.runner``."""
    todo = [job for job in jobs if job[3] or not fstore.is_verified(Path(job[2]))]
    if not todo:
        return
    with dask_runner(cfg.runner) as tr:
        common = {"cfg": cfg, "weights_digest": weights_digest, "root": str(root)}
        counts = run_all(
            tr,
            [(prepare_features_task, {**common, "what": w, "key": k, "out": out, "force": f}) for w, k, out, f in todo],
        )
        from tasks.artifacts import Progress

        progress = Progress(sum(counts), f"{cfg.core.name}: {sum(counts)} feature shards on Dask")
        run_all(
            tr,
            [
                (feature_shard_task, {**common, "what": w, "key": k, "out": out, "index": i})
                for (w, k, out, _), n in zip(todo, counts)
                for i in range(n)
            ],
            on_done=progress.step,
        )


def train_features(cfg: TrainFlowConfig, root: Path, weights_digest: str, progress: Progress) -> tuple[list[str], str]:
    """Build (or reuse) every feature store of a training run; ``(training stores: the passes and the train grid,
    val store)``."""
    jobs = feature_jobs(cfg, root, weights_digest)
    sharded = cfg.runner.kind == "dask"
    if sharded:
        fill_on_dask(cfg, root, weights_digest, jobs)
    stores = []
    for what, key, out, forced in jobs:
        stage = train_pass_task if isinstance(what, int) else split_features_task
        stage = grid_features_task if what == GRID else stage
        stores.append(
            run_stage(
                stage,
                root,
                out,
                fstore.is_verified,
                forced,
                cfg,
                what,
                key,
                out,
                weights_digest,
                forced and not sharded,
                str(root),
            )
        )
        progress.step()
    return stores[:-1], stores[-1]
