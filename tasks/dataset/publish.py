"""The last step of a patch dataset build: assemble ``dataset.txt``, ``info.json``, the sidecar and the manifest
from the finished shards' results, then move the build folder into place (the old dataset replaced as a whole)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from storage import layout
from storage.fingerprint import CODE_VERSION
from storage.geometry import GRID_POLICY
from storage.manifest import write_manifest
from tasks.dataset.images import Result, write_bytes
from tasks.dataset.state import DatasetPlan, finished_results, load_plan, shard_state
from tasks.imageio import sixteen_bit_json

logger = logging.getLogger("patchflow.dataset")

SPLITS = ("train", "val", "test")


def finish_patch_dataset(tmp: str | Path, plan: DatasetPlan | None = None) -> dict[str, Any]:
    """Assemble dataset.txt, info.json and the sidecar from finished shards, then publish the dataset (under the
    output folder's build lock); returns the ``info.json`` content. ``plan``: already loaded."""
    tmp = Path(tmp)
    plan = plan or load_plan(tmp)
    per_shard = finished_results(tmp, plan)
    info: dict[str, Any] = {**plan.params.info_geometry(), "train_files": [], "val_files": [], "test_files": []}
    lines: list[str] = []
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for idx, results in zip(plan.shards(ordered=True), per_shard):
        for i, res in zip(idx, results):
            split = plan.jobs[i].split
            info[f"{split}_files"].append({"image_path": res.image_entry, "mask_path": res.mask_entry})
            lines.extend(res.lines)
            for k, v in res.counts.items():
                counts[split][k] = counts[split].get(k, 0) + v
    write_bytes(tmp / "train" / plan.params.train_filename, "".join(f"{line}\n" for line in lines))
    layout.write_info(tmp, info)
    layout.write_json(tmp / layout.SIDECAR_FILE, _sidecar(plan, info, counts))
    shard_state(tmp).clear()
    write_manifest(tmp, known=_files(per_shard))
    out = Path(plan.out)
    with layout.build_lock(out):
        layout.publish(tmp, out)
    logger.info(
        "patch dataset in %s: %d train / %d val / %d test images, %d train lines",
        out,
        len(info["train_files"]),
        len(info["val_files"]),
        len(info["test_files"]),
        len(lines),
    )
    return info


def _sidecar(plan: DatasetPlan, info: dict[str, Any], counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """``patchflow.json``: how the dataset was built (written last: ``complete`` marks a finished dataset)."""
    p = plan.params
    return {
        "format": "patchflow-patch-dataset",
        "version": CODE_VERSION,
        "fingerprint": p.fingerprint,
        "grid_policy": GRID_POLICY,
        "class_to_idx": dict(p.class_to_idx),
        "train_filename": p.train_filename,
        "missing_mask": p.missing_mask,
        # how val/test patches were labelled: the train flow labels the train images' grid patches alike
        "area_threshold": p.area_threshold,
        "area_defect_threshold": p.area_defect_threshold,
        "sixteen_bit": sixteen_bit_json(p.sixteen_bit),  # how 16-bit images became 8-bit: later stages decode alike
        "seed": p.seed,
        "images": {s: len(info[f"{s}_files"]) for s in SPLITS},
        "counts": counts,
        "complete": True,
    }


def _files(per_shard: list[list[Result]]) -> dict[str, tuple[int, str]]:
    """Size and digest of every file the shards wrote (the manifest needs no second read)."""
    return {rel: v for results in per_shard for r in results for rel, v in r.files.items()}
