"""Dataset stage: its content key, its Prefect task entry points and the Dask branch of the dataset flow.

The key (:func:`dataset_fingerprint`) covers the image and mask bytes, their names, the class map and every
parameter that changes the output; :func:`dataset_is_current` says whether a folder holds exactly that
dataset, unchanged since. The cached task (:func:`generate_task`) builds in-process (resuming finished
shards); with a Dask runner, :func:`build_shards_on_dask` first runs the shards as tasks on the cluster.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import layout
from storage.fingerprint import CODE_VERSION, combine, files_digest, params_digest
from storage.manifest import matches_manifest
from tasks.dataset.association import get_image_mask_association
from tasks.dataset.config import DataSection, GenerationSection
from tasks.dataset.generate import build_patch_dataset, plan_build
from tasks.dataset.output import output_folder_path
from tasks.dataset.shards import assign_splits, process_shard, scan_shard, shard_counts
from tasks.locks import stage_lock
from tasks.runner import RunnerSection, dask_runner, run_all
from tasks.stage import build_once

logger = logging.getLogger("patchflow.dataset")


def dataset_fingerprint(association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection) -> str:
    """Content key of a dataset: image and mask bytes, their names, class map and every parameter that changes
    output."""
    params = gen.model_dump(
        mode="json", exclude={"num_workers", "clear_output_folder", "output_folder", "shard_images", "max_image_pixels"}
    )
    names = [(a["base_name"], a["path"] is not None, a["mask"] is not None) for a in association]
    contents = files_digest([a["path"] for a in association] + [a["mask"] for a in association])
    return combine(CODE_VERSION, params_digest({"params": params, "classes": class_to_idx, "names": names}), contents)


def dataset_is_current(output_folder: str | Path, key: str) -> bool:
    """The folder holds a complete dataset built from exactly these inputs, unchanged since (manifest)."""
    out = output_folder_path(output_folder)
    return layout.is_complete(out, key) and matches_manifest(out)


@task(name="associate-images-masks", cache_policy=NO_CACHE)
def associate_task(data: DataSection) -> list[dict[str, Any]]:
    """List images with their masks (always re-listed: new images must be seen)."""
    return get_image_mask_association(data.images, data.masks, data.mask_extension, data.warning_on_missing_mask)


@task(name="fingerprint-dataset-inputs", cache_policy=NO_CACHE)
def fingerprint_task(association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection) -> str:
    """Content key of the dataset inputs."""
    return dataset_fingerprint(association, class_to_idx, gen)


@task(name="generate-patch-dataset", persist_result=True)
def generate_task(
    association: list[dict[str, Any]],
    class_to_idx: dict[str, int],
    gen: GenerationSection,
    key: str,
    force: bool = False,
) -> str:
    """Build the patch dataset; returns its folder (cached on ``key``; reused if a concurrent run built it)."""
    return build_once(
        output_folder_path(gen.output_folder),
        force,
        lambda out: dataset_is_current(out, key),
        lambda: build_patch_dataset([dict(a) for a in association], gen.build_params(class_to_idx, key)),
    )


@task(name="plan-patch-dataset", cache_policy=NO_CACHE)
def plan_dataset_task(
    association: list[dict[str, Any]], class_to_idx: dict[str, int], gen: GenerationSection, key: str
) -> str:
    """Validate inputs and prepare (or resume) the build folder for sharded generation; returns it."""
    return str(plan_build([dict(a) for a in association], gen.build_params(class_to_idx, key)))


@task(name="scan-images", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def scan_shard_task(tmp: str, shard: int) -> list[tuple]:
    """Sizes and mask values of one shard of images (validated)."""
    return scan_shard(tmp, shard)


@task(name="assign-splits", cache_policy=NO_CACHE)
def assign_splits_task(tmp: str, scans: list[tuple]) -> int:
    """Seeded split of every image; returns the number of process shards."""
    return assign_splits(tmp, scans)


@task(name="write-patches", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def process_shard_task(tmp: str, shard: int, output_folder: str, key: str, root: str) -> int:
    """Write one shard's originals, h5 files and patches (skipped when done, or when a concurrent run of the same
    inputs already published the dataset); retried alone on failure."""
    with stage_lock(Path(root), f"{key}:dataset-shard:{shard}"):
        if dataset_is_current(output_folder, key):
            return 0
        return process_shard(tmp, shard)


def build_shards_on_dask(
    runner: RunnerSection,
    association: list[dict[str, Any]],
    class_to_idx: dict[str, int],
    gen: GenerationSection,
    key: str,
    root: Path,
) -> None:
    """Plan the build, then run its scan shards, the split and its process shards as tasks on the Dask cluster
    (call it from the flow, holding the output folder's build lock); :func:`generate_task` then publishes."""
    out = str(output_folder_path(gen.output_folder))
    with dask_runner(runner) as tr:
        tmp = plan_dataset_task(association, class_to_idx, gen, key)
        n_scan, n_process = shard_counts(tmp)
        if n_process is None:
            scans = run_all(tr, [(scan_shard_task, {"tmp": tmp, "shard": i}) for i in range(n_scan)])
            n_process = assign_splits_task(tmp, [r for shard in scans for r in shard])
        run_all(
            tr,
            [
                (process_shard_task, {"tmp": tmp, "shard": i, "output_folder": out, "key": key, "root": str(root)})
                for i in range(n_process)
            ],
        )
