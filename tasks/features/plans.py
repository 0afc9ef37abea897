"""What a feature store holds and how its patches are read: the row plan of a training pass (patches drawn from
seed and pass index), of the train images' grid patches or of a val/test split (its patch files), and
:func:`plan_batches`, which decodes the patches of a range of rows with the dataset's 16-bit rule.

Plain functions (no Prefect, no torch); ``tasks/features/store.py`` builds stores from them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.layout import read_info
from tasks.features.listing import balance_entries, read_train_list
from tasks.features.params import class_map
from tasks.features.sampler import PassSamples, draw_pass, iter_pass_patches, order_by_image
from tasks.features.shards import Batches, PlanFn
from tasks.imageio import (
    LEGACY_SIXTEEN_BIT,
    Decoding,
    ImageTooLargeError,
    InputDataError,
    dataset_decoding,
    make_decoding,
    read_image,
    sixteen_bit_json,
)

if TYPE_CHECKING:
    from tasks.model.config import TrainFlowConfig


def _patch_batches(data_path: Path, rels: list[str], batch_size: int, decoding: Decoding, workers: int = 1) -> Batches:
    """Batches of decoded patch files; ``workers`` > 1 decodes them on that many threads (same order)."""

    def read(rel: str) -> np.ndarray:
        try:
            return read_image(data_path / rel, decoding)
        except ImageTooLargeError:
            raise
        except InputDataError:
            raise ValueError(f"{data_path / rel}: unreadable patch image; regenerate the dataset") from None

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="patchflow-decode") as pool:
        for s in range(0, len(rels), batch_size):
            chunk = rels[s : s + batch_size]
            patches = list(pool.map(read, chunk)) if workers > 1 else [read(rel) for rel in chunk]
            yield np.arange(s, s + len(patches)), patches


def decode_attrs(data_path: Path) -> dict[str, Any]:
    """Store attributes that say how the dataset's images are decoded (its 16-bit rule)."""
    return {"sixteen_bit": sixteen_bit_json(dataset_decoding(data_path).sixteen_bit)}


def plan_batches(
    plan: dict[str, np.ndarray], attrs: dict[str, Any], start: int, end: int, batch_size: int, workers: int = 1
) -> Batches:
    """Batches of rows ``[start, end)`` of a store's plan: (row indices relative to ``start``, BGR patches);
    ``workers``: threads decoding a split's patch files (``datamodule.num_workers``)."""
    # stores prepared before the rule was recorded were filled with the legacy rule: keep it for their last shards
    dec = make_decoding(sixteen_bit=attrs.get("sixteen_bit", LEGACY_SIXTEEN_BIT))
    if str(plan["kind"]) in ("train", "grid"):
        sl = slice(start, end)
        sub = PassSamples(
            plan["entry_index"][sl],
            plan["image_path"][sl],
            plan["label"][sl],
            plan["box"][sl],
            plan["center"][sl],
            plan["image_size"][sl] if "image_size" in plan else None,
        )
        yield from iter_pass_patches(sub, batch_size, dec)
    else:
        yield from _patch_batches(Path(attrs["data_path"]), plan["rel"][start:end].tolist(), batch_size, dec, workers)


def pass_plan(cfg: TrainFlowConfig, pass_index: int) -> PlanFn:
    def make() -> tuple:
        dm = cfg.datamodule
        data_path = Path(dm.data_path)
        listing = data_path / "train" / dm.train_filename
        if not listing.is_file():
            have = sorted(p.name for p in (data_path / "train").glob("*.txt"))
            raise ValueError(f"{listing} not found; check datamodule.train_filename (the dataset has {have})")
        entries = read_train_list(
            data_path, dm.train_filename, dm.include_filter, dm.exclude_filter, dm.class_to_skip_training
        )
        if not entries:
            raise ValueError(f"no training samples in {listing} after filters and skipped classes")
        if dm.balance_classes:
            entries = balance_entries(entries, dm.seed)
        smp = order_by_image(
            draw_pass(data_path, entries, class_map(cfg), dm.seed, pass_index, info=read_info(data_path))
        )
        ids = [f"{entries[i].h5_name}#{i}" for i in smp.entry_index.tolist()]
        return _samples_plan("train", smp), smp.label, ids, smp.box

    return make


def _samples_plan(kind: str, smp: PassSamples) -> dict[str, np.ndarray]:
    """The row plan of crops from whole images (a training pass or the train grid): each image decoded once."""
    plan = {
        "kind": np.array(kind),
        "entry_index": smp.entry_index,
        "image_path": np.asarray(smp.image_path, dtype=str),
        "label": smp.label,
        "box": smp.box,
        "center": smp.center,
    }
    if smp.image_size is not None:
        plan["image_size"] = smp.image_size
    return plan


def grid_plan(cfg: TrainFlowConfig) -> PlanFn:
    """The plan of the train images' grid patches (``tasks/features/grid.py``), labelled as val/test patches."""

    def make() -> tuple:
        from tasks.features.grid import grid_samples

        smp, ids = grid_samples(cfg)
        return _samples_plan("grid", smp), smp.label, ids, smp.box

    return make


def items_plan(items: list[tuple[str, int]]) -> PlanFn:
    def make() -> tuple:
        labels = np.array([lab for _, lab in items], dtype=np.int16)
        rels = [rel for rel, _ in items]
        plan = {"kind": np.array("split"), "rel": np.asarray(rels, dtype=str), "label": labels}
        return plan, labels, rels, np.full((len(items), 4), -1, dtype=np.int64)

    return make
