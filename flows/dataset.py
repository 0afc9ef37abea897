"""Dataset flow: association -> patch dataset generation, cached by content.

``python -m flows.dataset --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from prefect import flow
from pydantic import Field

from storage import layout
from storage.settings import storage_root
from tasks.stage import cached_stage
from tasks.cli import parse_cli, run_cli
from tasks.config import StrictModel, ensure_storage_root, validate_config
from tasks.dataset.generate import shard_counts
from tasks.dataset.stage import (
    DataSection,
    GenerationSection,
    assign_splits_task,
    associate_task,
    dataset_is_current,
    fingerprint_task,
    generate_task,
    plan_dataset_task,
    process_shard_task,
    scan_shard_task,
)
from tasks.dataset.output import check_flow_paths, output_folder_path
from tasks.runner import RunnerSection, check_runner, dask_runner, run_all


class DatasetFlowConfig(StrictModel):
    """Configuration of the dataset flow."""

    data: DataSection
    dataset: GenerationSection
    storage_root: str | None = Field(None, description="Results/cache/locks root (default $PATCHFLOW_STORAGE_ROOT or ./.patchflow)")
    force: bool = Field(False, description="Rebuild the dataset even if an identical one exists")
    runner: RunnerSection = Field(default_factory=RunnerSection, description="Where image shards run (thread or a Dask cluster)")


@flow(name="patchflow-dataset")
def dataset_flow(config: DatasetFlowConfig, config_file: str | None = None) -> str:
    """Build (or reuse) the patch dataset described by ``config``; returns its folder. ``config_file``: the file the
    CLI read ``config`` from (refused inside the output folder, like every other input)."""
    config = validate_config(DatasetFlowConfig, config)
    out = check_paths(config, config_file)  # before anything is written (the storage root included)
    root = ensure_storage_root(config.storage_root)
    check_runner(config.runner)
    class_to_idx = config.data.resolved_class_to_idx()
    with layout.build_lock(out):  # one build of a folder at a time, for the whole build (Dask shards included)
        association = associate_task(config.data)
        key = fingerprint_task(association, class_to_idx, config.dataset)
        done = dataset_is_current(str(out), key)
        if config.runner.kind == "dask" and (config.force or not done):  # shards on the cluster; the cached task finishes
            with dask_runner(config.runner) as tr:
                tmp = plan_dataset_task(association, class_to_idx, config.dataset, key)
                n_scan, n_process = shard_counts(tmp)
                if n_process is None:
                    scans = run_all(tr, [(scan_shard_task, {"tmp": tmp, "shard": i}) for i in range(n_scan)])
                    n_process = assign_splits_task(tmp, [r for shard in scans for r in shard])
                run_all(tr, [(process_shard_task, {"tmp": tmp, "shard": i, "output_folder": str(out),
                                                   "key": key, "root": str(root)}) for i in range(n_process)])
        return cached_stage(generate_task, root, config.force, done)(association, class_to_idx, config.dataset, key,
                                                                     config.force)


def check_paths(config: DatasetFlowConfig, config_file: str | None = None) -> Path:
    """The output folder (``~`` expanded, symlinks followed) once it is checked to hold none of the inputs (images and
    masks folders, class map file, config file, storage root) and to lie inside neither the images nor the masks
    folder; nothing is written or deleted before."""
    out = output_folder_path(config.dataset.output_folder)
    check_flow_paths(out, config.data.images, config.data.masks,
                     {"data.class_to_idx_file": config.data.class_to_idx_file, "the config file": config_file},
                     storage_root(config.storage_root))
    layout.check_output_folder(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (the paths are checked before Prefect starts)."""
    cfg = parse_cli(DatasetFlowConfig, argv, description=__doc__)
    config_file = _config_file(argv)
    check_paths(cfg, config_file)
    print(dataset_flow(cfg, config_file=config_file))


def _config_file(argv: Sequence[str] | None) -> str | None:
    """The ``--config`` path of a command line (parse_cli has validated it already)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    return ap.parse_known_args(argv)[0].config


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
