"""Building feature stores: :class:`StoreJob` prepares, fills and finalizes one store (a training pass, the train
images' grid patches or a val/test split, planned by ``tasks/features/plans.py``) through the sharded protocol of
``tasks/features/shards.py``, in one process or shard by shard anywhere, under the stage's locks.

Plain logic (no Prefect): ``tasks/features/stage.py`` wraps it in tasks; evaluation and predict use
:func:`extract_items` and :func:`feature_dim_of`. Backbones are built once per process (:func:`_extractor`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage import features as fstore
from tasks.features import shards
from tasks.features.listing import split_items
from tasks.features.params import backbone_digest, class_map, feature_layers, feature_params, feature_runtime
from tasks.features.plans import decode_attrs, grid_plan, items_plan, pass_plan, plan_batches
from tasks.locks import stage_lock

if TYPE_CHECKING:
    from tasks.features.extractor import FeatureExtractor
    from tasks.model.config import TrainFlowConfig

logger = logging.getLogger("patchflow.features")

CHUNK_ROWS = shards.CHUNK_ROWS

_EXTRACTORS: dict[tuple, FeatureExtractor] = {}


def _extractor(cfg: TrainFlowConfig, onnx_cache: Path, wdigest: str | None = None) -> FeatureExtractor:
    """The feature extractor of ``cfg`` (one kept per process: shards of a run reuse it)."""
    from tasks.features.export import onnx_backbone
    from tasks.features.extractor import FeatureExtractor, build_backbone

    size = (cfg.transforms.input_height, cfg.transforms.input_width)
    auto = cfg.task.automatic_batch_size
    batch = cfg.datamodule.batch_size if auto.disable else auto.starting_batch_size
    runtime = feature_runtime(cfg)
    layers, pooling = feature_layers(cfg), cfg.backbone.pooling
    ident = (
        runtime,
        cfg.backbone.name,
        wdigest or str(cfg.backbone.weights),
        layers,
        pooling,
        size,
        cfg.task.device,
        cfg.task.precision,
        batch,
        auto.disable,
        str(onnx_cache),
    )
    if ident not in _EXTRACTORS:
        _EXTRACTORS.clear()
        model: Any
        if runtime == "onnxruntime":
            model = onnx_backbone(cfg.backbone.name, cfg.backbone.weights, size, onnx_cache, wdigest, layers, pooling)
        else:
            model = build_backbone(cfg.backbone.name, cfg.backbone.weights, layers, pooling)
        _EXTRACTORS[ident] = FeatureExtractor(
            model, cfg.task.device, cfg.task.precision, batch, automatic_batch_size=not auto.disable
        )
    return _EXTRACTORS[ident]


LockFn = Callable[[str], AbstractContextManager[Any]]


def _no_lock(name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


class StoreJob:
    """Everything needed to build one feature store: what to extract (plan) and how (extractor, transform)."""

    def __init__(
        self,
        out: Path,
        key: str,
        make_plan: shards.PlanFn,
        attrs: dict[str, Any],
        dim: int,
        get_extractor: Callable[[], FeatureExtractor],
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        rows_per_shard: int,
        lock: LockFn = _no_lock,
        chunk_rows: int = CHUNK_ROWS,
        workers: int = 1,
    ) -> None:
        self.out, self.key, self.make_plan, self.attrs, self.dim = Path(out), key, make_plan, attrs, dim
        self.get_extractor, self.size, self.mean, self.std = get_extractor, size, mean, std
        self.batch_size, self.rows_per_shard, self.lock, self.chunk_rows = batch_size, rows_per_shard, lock, chunk_rows
        self.workers = workers  # threads decoding patch files (never part of a key: outputs do not change)

    def prepare(self, force: bool = False) -> int:
        """Prepare the partial store (reused when already prepared); number of shards, 0 if the store is done."""
        with self.lock(self.key + ":prepare"):
            if not force and fstore.is_verified(self.out):
                return 0
            if force:
                shutil.rmtree(self.out, ignore_errors=True)
            return shards.prepare(
                self.out, self.key, self.make_plan, self.dim, self.attrs, self.rows_per_shard, force, self.chunk_rows
            )

    def fill(self, index: int) -> dict[str, Any]:
        """Compute shard ``index`` unless it is done (or the whole store is)."""
        with self.lock(f"{self.key}:shard:{index}"):
            if fstore.is_verified(self.out):
                return {"index": index, "skipped": True, "rows": 0, "extract_s": 0.0}
            extract = partial(self.get_extractor().extract, size=self.size, mean=self.mean, std=self.std)
            batches = partial(plan_batches, workers=self.workers)
            return shards.fill_shard(self.out, index, extract, batches, self.batch_size)

    def finalize(self) -> None:
        """Move the completed store into place (no-op if it is already there)."""
        with self.lock(self.key + ":finalize"):
            if not fstore.is_verified(self.out):
                shards.finalize(self.out)

    def build(self, force: bool = False) -> dict[str, Any]:
        """Prepare, fill what is missing and finalize, in this process; returns timing figures."""
        t0 = time.perf_counter()
        count = self.prepare(force)
        setup = 0.0
        if count:  # the backbone is built once per process (ONNX export once per weights): timed apart from the pass
            t = time.perf_counter()
            self.get_extractor()
            setup = time.perf_counter() - t
            if setup > 0.5:
                logger.info("backbone ready in %.1f s (built once per process, exported once per weights)", setup)
        stats = [self.fill(i) for i in range(count)]
        self.finalize()
        wall = time.perf_counter() - t0 - setup
        rows = int(fstore.store_attrs(self.out)["n_rows"])
        reused = sum(s["skipped"] for s in stats)
        if count:
            logger.info(
                "%s features: %d patches in %.1f s (%.1f patches/s; %d of %d shards reused)",
                self.attrs.get("kind"),
                rows,
                wall,
                rows / max(wall, 1e-9),
                reused,
                count,
            )
        return {
            "rows": rows,
            "wall_s": wall,
            "setup_s": setup,
            "extract_s": sum(s["extract_s"] for s in stats),
            "shards": count,
            "shards_reused": reused,
        }


def _job(
    cfg: TrainFlowConfig,
    out: Path,
    key: str | None,
    make_plan: shards.PlanFn,
    extra: dict[str, Any],
    wdigest: str | None,
    root: Path | None,
) -> StoreJob:
    from tasks.features.extractor import feature_dim

    wdigest = wdigest or backbone_digest(cfg)
    t = cfg.transforms
    lock: LockFn = (lambda name: stage_lock(root, name)) if root is not None else _no_lock
    chunk = min(CHUNK_ROWS, cfg.task.shard_patches)  # small shards get small chunks: writes stay whole-chunk
    return StoreJob(
        out,
        key or out.name,
        make_plan,
        {**feature_params(cfg, wdigest), **extra},
        feature_dim(cfg.backbone.name, feature_layers(cfg), cfg.backbone.pooling),
        lambda: _extractor(cfg, out.parent / "onnx", wdigest),
        (t.input_height, t.input_width),
        t.mean,
        t.std,
        cfg.datamodule.batch_size,
        shards.shard_rows(cfg.task.shard_patches, chunk),
        lock,
        chunk,
        cfg.datamodule.num_workers,
    )


def train_pass_job(
    cfg: TrainFlowConfig,
    pass_index: int,
    out: Path,
    weights_digest: str | None = None,
    key: str | None = None,
    root: Path | None = None,
) -> StoreJob:
    """The store job of training pass ``pass_index`` (one patch per ``dataset.txt`` line, drawn from seed and pass)."""
    extra = {"kind": "train", "pass_index": pass_index, **decode_attrs(Path(cfg.datamodule.data_path))}
    return _job(cfg, Path(out), key, pass_plan(cfg, pass_index), extra, weights_digest, root)


def grid_job(
    cfg: TrainFlowConfig,
    out: Path,
    weights_digest: str | None = None,
    key: str | None = None,
    root: Path | None = None,
) -> StoreJob:
    """The store job of the train images' grid patches, labelled as val/test patches (``trainer.grid_patches``)."""
    from tasks.features.grid import grid_thresholds

    at, adt = grid_thresholds(cfg)
    extra = {
        "kind": "grid",
        "area_threshold": at,
        "area_defect_threshold": adt,
        **decode_attrs(Path(cfg.datamodule.data_path)),
    }
    return _job(cfg, Path(out), key, grid_plan(cfg), extra, weights_digest, root)


def split_job(
    cfg: TrainFlowConfig,
    split: str,
    out: Path,
    weights_digest: str | None = None,
    key: str | None = None,
    root: Path | None = None,
) -> StoreJob:
    """The store job of every patch of ``split`` (val/test)."""
    data_path = Path(cfg.datamodule.data_path).resolve()
    items = split_items(data_path, split, class_map(cfg), cfg.datamodule.include_filter, cfg.datamodule.exclude_filter)
    extra = {"kind": split, "data_path": str(data_path), **decode_attrs(data_path)}
    return _job(cfg, Path(out), key, items_plan(items), extra, weights_digest, root)


def extract_train_pass(
    cfg: TrainFlowConfig, pass_index: int, out: Path, weights_digest: str | None = None
) -> dict[str, Any]:
    """Draw pass ``pass_index`` and store its features at ``out``; returns timing figures."""
    return train_pass_job(cfg, pass_index, out, weights_digest).build()


def extract_split(cfg: TrainFlowConfig, split: str, out: Path, weights_digest: str | None = None) -> dict[str, Any]:
    """Store the features of every patch of ``split`` (val/test) at ``out``."""
    return split_job(cfg, split, out, weights_digest).build()


def extract_items(
    extractor: FeatureExtractor,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    data_path: Path,
    items: list[tuple[str, int]],
    batch_size: int,
    out: Path,
    attrs: dict[str, Any],
    rows_per_shard: int = 4096,
    force: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Store the features of listed patch files at ``out`` (labels and relative paths as sample ids); ``workers``:
    threads decoding them."""
    job = StoreJob(
        out,
        Path(out).name,
        items_plan(items),
        {**attrs, "data_path": str(Path(data_path).resolve()), **decode_attrs(Path(data_path))},
        feature_dim_of(extractor, size),
        lambda: extractor,
        size,
        mean,
        std,
        batch_size,
        shards.shard_rows(rows_per_shard),
        workers=workers,
    )
    return job.build(force)


def feature_dim_of(extractor: FeatureExtractor, size: tuple[int, int]) -> int:
    """Feature length of ``extractor`` (one forward of a blank patch)."""
    blank = [np.zeros((*size, 3), dtype=np.uint8)]
    return int(extractor.extract(blank, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).shape[1])
