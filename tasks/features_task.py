"""Feature stage: frozen-backbone features of training passes and of val/test patches, stored in zarr.

Each training pass (one patch per ``dataset.txt`` line, drawn from (seed, pass index)) and each
split is one store, keyed by content: dataset fingerprint + backbone weights digest + transform +
sampling parameters (+ pass index). Raising ``iteration_over_training`` computes only new passes;
changing the classifier computes none.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from prefect import task

from storage import features as fstore
from storage import layout
from storage.fingerprint import CODE_VERSION, combine, params_digest, tree_digest
from tasks.backbones import FeatureExtractor, build_backbone, onnx_backbone, resolve_weights, weights_digest
from tasks.config import ConfigError
from tasks.sampling import balance_entries, draw_pass, iter_pass_patches, list_split, load_info, order_by_image, read_train_list
from tasks.train_config import TrainFlowConfig

logger = logging.getLogger("patchflow.features")

CHUNK_ROWS = 1024


def dataset_key(data_path: str | Path) -> str:
    """Content fingerprint of a patch dataset: ours from its sidecar, Quadra's by hashing its files."""
    side = layout.read_sidecar(Path(data_path))
    if side and side.get("complete") and side.get("fingerprint"):
        return str(side["fingerprint"])
    return tree_digest(data_path)


def class_map(cfg: TrainFlowConfig) -> dict[str, int]:
    """``class_to_idx`` from the config, else from our dataset's sidecar."""
    if cfg.datamodule.class_to_idx:
        return dict(cfg.datamodule.class_to_idx)
    side = layout.read_sidecar(Path(cfg.datamodule.data_path))
    if side and side.get("class_to_idx"):
        return dict(side["class_to_idx"])
    raise ValueError(
        f"datamodule.class_to_idx is needed: {cfg.datamodule.data_path} has no patchflow.json (a Quadra dataset?)"
    )


def backbone_digest(cfg: TrainFlowConfig) -> str:
    """Digest of the backbone weights actually used (resolved offline)."""
    return weights_digest(resolve_weights(cfg.backbone.name, cfg.backbone.weights), cfg.backbone.name)


def feature_runtime(cfg: TrainFlowConfig) -> str:
    """The runtime that computes features: ``torch`` or ``onnxruntime`` (``auto`` resolved for this machine)."""
    task = cfg.task
    plain_cpu = task.device == "cpu" and task.precision == "fp32"
    if task.runtime == "auto":
        return "onnxruntime" if plain_cpu and importlib.util.find_spec("onnxruntime") else "torch"
    if task.runtime == "onnxruntime" and not plain_cpu:
        raise ConfigError("task.runtime=onnxruntime runs on device cpu at precision fp32 only; use task.runtime=torch")
    return task.runtime


def _feature_params(cfg: TrainFlowConfig, wdigest: str) -> dict[str, Any]:
    return {
        "code": CODE_VERSION,
        "backbone": cfg.backbone.name,
        "weights": wdigest,
        "transforms": cfg.transforms.model_dump(mode="json"),
        "precision": cfg.task.precision,
        "runtime": feature_runtime(cfg),
    }


def train_pass_key(cfg: TrainFlowConfig, dkey: str, wdigest: str, pass_index: int) -> str:
    """Key of one training pass's features."""
    dm = cfg.datamodule
    sampling = {
        "train_filename": dm.train_filename, "include": dm.include_filter, "exclude": dm.exclude_filter,
        "skip": dm.class_to_skip_training, "balance": dm.balance_classes, "seed": dm.seed,
        "classes": class_map(cfg), "pass": pass_index,
    }
    return combine("train-pass", dkey, params_digest(_feature_params(cfg, wdigest)), params_digest(sampling))


def split_key(cfg: TrainFlowConfig, dkey: str, wdigest: str, split: str) -> str:
    """Key of one split's features (filters included; skipped classes are applied later)."""
    dm = cfg.datamodule
    sel = {"split": split, "include": dm.include_filter, "exclude": dm.exclude_filter, "classes": class_map(cfg)}
    return combine("split", dkey, params_digest(_feature_params(cfg, wdigest)), params_digest(sel))


def store_path(root: Path, key: str) -> Path:
    """Where the features of ``key`` live."""
    return root / "features" / f"{key[:32]}.zarr"


def _extractor(cfg: TrainFlowConfig, onnx_cache: Path, wdigest: str | None = None) -> FeatureExtractor:
    size = (cfg.transforms.input_height, cfg.transforms.input_width)
    if feature_runtime(cfg) == "onnxruntime":
        model = onnx_backbone(cfg.backbone.name, cfg.backbone.weights, size, onnx_cache, wdigest)
    else:
        model = build_backbone(cfg.backbone.name, cfg.backbone.weights)
    auto = cfg.task.automatic_batch_size
    batch = cfg.datamodule.batch_size if auto.disable else auto.starting_batch_size
    return FeatureExtractor(model, cfg.task.device, cfg.task.precision, batch, automatic_batch_size=not auto.disable)


class _ChunkWriter:
    """Buffers rows and writes whole chunks (chunk-aligned zarr writes)."""

    def __init__(self, path: Path, n_rows: int, attrs: dict[str, Any]) -> None:
        self.path, self.n_rows, self.attrs = path, n_rows, attrs
        self.created = False
        self.start = 0
        self._reset()

    def _reset(self) -> None:
        self.feats: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.ids: list[str] = []
        self.boxes: list[np.ndarray] = []
        self.count = 0

    def add(self, feats: np.ndarray, labels: np.ndarray, ids: list[str], boxes: np.ndarray) -> None:
        if not self.created:  # the feature width is known from the first batch
            fstore.create_store(self.path, self.n_rows, feats.shape[1], self.attrs, chunk_rows=CHUNK_ROWS)
            self.created = True
        self.feats.append(feats); self.labels.append(labels); self.ids.extend(ids); self.boxes.append(boxes)
        self.count += len(feats)
        while self.count >= CHUNK_ROWS or (self.count and self.start + self.count >= self.n_rows):
            self._flush(min(CHUNK_ROWS, self.count))

    def _flush(self, n: int) -> None:
        f, l, b = np.concatenate(self.feats), np.concatenate(self.labels), np.concatenate(self.boxes)
        ids = self.ids
        fstore.write_rows(self.path, self.start, f[:n], l[:n], ids[:n], b[:n])
        fstore.mark_chunks_done(self.path, [self.start // CHUNK_ROWS])
        self.start += n
        rest = self.count - n
        self._reset()
        if rest:
            self.feats, self.labels, self.ids, self.boxes, self.count = [f[n:]], [l[n:]], ids[n:], [b[n:]], rest


def extract_train_pass(
    cfg: TrainFlowConfig, pass_index: int, out: Path, weights_digest: str | None = None
) -> dict[str, Any]:
    """Draw pass ``pass_index`` and store its features at ``out``; returns timing figures.

    ``weights_digest`` (from :func:`backbone_digest`) avoids hashing the weights file again.
    """
    dm = cfg.datamodule
    data_path = Path(dm.data_path)
    classes = class_map(cfg)
    entries = read_train_list(data_path, dm.train_filename, dm.include_filter, dm.exclude_filter, dm.class_to_skip_training)
    if not entries:
        raise ValueError(f"no training samples in {data_path / 'train' / dm.train_filename} after filters and skipped classes")
    if dm.balance_classes:
        entries = balance_entries(entries, dm.seed)
    samples = order_by_image(draw_pass(data_path, entries, classes, dm.seed, pass_index, info=load_info(data_path)))
    ids = [f"{entries[i].h5_name}#{i}" for i in samples.entry_index.tolist()]
    return _extract(cfg, out, len(samples), iter_pass_patches(samples, cfg.datamodule.batch_size),
                    samples.label, ids, samples.box, {"kind": "train", "pass_index": pass_index}, weights_digest)


def split_items(data_path: Path, split: str, class_to_idx: dict[str, int], include_filter, exclude_filter) -> list[tuple[str, int]]:
    """Patches of a val/test split as (path relative to the dataset, label); test keeps unlabelled (None, -1) ones."""
    items = list_split(data_path, split, class_to_idx, include_filter, exclude_filter, include_none=split != "val")
    if not items:
        raise ValueError(f"no {split} patches in {data_path / split}; generate the dataset with a non-zero {split}_size")
    return items


def _patch_batches(data_path: Path, items: list[tuple[str, int]], batch_size: int):
    for s in range(0, len(items), batch_size):
        patches = []
        for rel, _ in items[s : s + batch_size]:
            img = cv2.imread(str(data_path / rel), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"{data_path / rel}: unreadable patch image; regenerate the dataset")
            patches.append(img)
        yield np.arange(s, s + len(patches)), patches


def extract_items(
    extractor: FeatureExtractor, size: tuple[int, int], mean, std, data_path: Path, items: list[tuple[str, int]],
    batch_size: int, out: Path, attrs: dict[str, Any],
) -> dict[str, Any]:
    """Store the features of listed patch files at ``out`` (labels and relative paths as sample ids)."""
    labels = np.array([lab for _, lab in items], dtype=np.int16)
    boxes = np.full((len(items), 4), -1, dtype=np.int64)
    return write_store(extractor, size, mean, std, out, len(items), _patch_batches(data_path, items, batch_size),
                       labels, [rel for rel, _ in items], boxes, attrs)


def extract_split(cfg: TrainFlowConfig, split: str, out: Path, weights_digest: str | None = None) -> dict[str, Any]:
    """Store the features of every patch of ``split`` (val/test) at ``out``."""
    dm = cfg.datamodule
    data_path = Path(dm.data_path)
    items = split_items(data_path, split, class_map(cfg), dm.include_filter, dm.exclude_filter)
    labels = np.array([lab for _, lab in items], dtype=np.int16)
    boxes = np.full((len(items), 4), -1, dtype=np.int64)
    return _extract(cfg, out, len(items), _patch_batches(data_path, items, dm.batch_size), labels,
                    [rel for rel, _ in items], boxes, {"kind": split}, weights_digest)


def _extract(
    cfg: TrainFlowConfig, out: Path, n: int, batches, labels, ids, boxes, extra: dict[str, Any], wdigest: str | None
) -> dict[str, Any]:
    wdigest = wdigest or backbone_digest(cfg)
    t = cfg.transforms
    return write_store(_extractor(cfg, out.parent / "onnx", wdigest), (t.input_height, t.input_width), t.mean, t.std,
                       out, n, batches, labels, ids, boxes, {**_feature_params(cfg, wdigest), **extra})


def write_store(
    extractor: FeatureExtractor, size: tuple[int, int], mean, std, out: Path, n: int, batches, labels, ids, boxes,
    attrs: dict[str, Any],
) -> dict[str, Any]:
    """Run ``extractor`` over ``batches`` of (row indices, patches) and write a complete zarr store at ``out``."""
    tmp = out.with_name(out.name + f".{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    writer = _ChunkWriter(tmp, n, attrs)
    t_fwd = 0.0
    t0 = time.perf_counter()
    for rows, patches in batches:
        t = time.perf_counter()
        feats = extractor.extract(patches, size, mean, std)
        t_fwd += time.perf_counter() - t
        writer.add(feats.astype(np.float32), np.asarray(labels)[rows], [ids[i] for i in rows], np.asarray(boxes)[rows])
    fstore.mark_complete(tmp, fstore.store_digest(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    wall = time.perf_counter() - t0
    logger.info("%s features: %d patches in %.1f s (%.1f patches/s)", attrs.get("kind"), n, wall, n / max(wall, 1e-9))
    return {"rows": n, "wall_s": wall, "extract_s": t_fwd}


@task(name="train-pass-features", persist_result=True)
def train_pass_task(
    cfg: TrainFlowConfig, pass_index: int, key: str, out: str, weights_digest: str, force: bool = False
) -> str:
    """Features of one training pass (cached on ``key``; a store completed meanwhile by a concurrent run is reused)."""
    if force or not fstore.is_complete(Path(out)):
        extract_train_pass(cfg, pass_index, Path(out), weights_digest)
    return out


@task(name="split-features", persist_result=True)
def split_features_task(
    cfg: TrainFlowConfig, split: str, key: str, out: str, weights_digest: str, force: bool = False
) -> str:
    """Features of a val/test split (cached on ``key``; reused if a concurrent run completed it)."""
    if force or not fstore.is_complete(Path(out)):
        extract_split(cfg, split, Path(out), weights_digest)
    return out
