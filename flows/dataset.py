"""Dataset flow: association -> content key -> patch dataset generation (shards on Dask when asked), cached by content.

``python -m flows.dataset --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tasks.cli import early_start, parse_cli
from tasks.dataset.config import DatasetFlowConfig
from tasks.dataset.output import check_dataset_paths


def parse(argv: Sequence[str] | None) -> tuple[DatasetFlowConfig, str | None]:
    """The command line -> (validated config, its ``--config`` file); the paths are checked before Prefect starts."""
    cfg = parse_cli(DatasetFlowConfig, argv, description=__doc__)
    config_file = _config_file(argv)
    check_dataset_paths(cfg, config_file)
    return cfg, config_file


def _config_file(argv: Sequence[str] | None) -> str | None:
    """The ``--config`` path of a command line (parse_cli has validated it already)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    return ap.parse_known_args(argv)[0].config


early_start(__name__, parse)  # --help and errors before Prefect

from prefect import flow

from storage import layout
from tasks.cli import run_cli
from tasks.config import ensure_storage_root, validate_config
from tasks.dataset.stage import (
    associate_task,
    build_shards_on_dask,
    dataset_is_current,
    fingerprint_task,
    generate_task,
)
from tasks.runner import check_runner
from tasks.stage import cached_stage


@flow(name="patchflow-dataset")
def dataset_flow(config: DatasetFlowConfig, config_file: str | None = None) -> str:
    """Build (or reuse) the patch dataset described by ``config``; returns its folder. ``config_file``: the file the
    CLI read ``config`` from (refused inside the output folder, like every other input)."""
    config = validate_config(DatasetFlowConfig, config)
    out = check_dataset_paths(config, config_file)  # before anything is written (the storage root included)
    root = ensure_storage_root(config.storage_root)
    check_runner(config.runner)
    class_to_idx = config.data.resolved_class_to_idx()
    with layout.build_lock(out):  # one build of a folder at a time, for the whole build (Dask shards included)
        association = associate_task(config.data)
        key = fingerprint_task(association, class_to_idx, config.dataset)
        done = dataset_is_current(out, key)
        if config.runner.kind == "dask" and (config.force or not done):  # shards on the cluster, the task publishes
            build_shards_on_dask(config.runner, association, class_to_idx, config.dataset, key, root)
        generate = cached_stage(generate_task, root, config.force, done)
        return generate(association, class_to_idx, config.dataset, key, config.force)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (the paths are checked before Prefect starts)."""
    cfg, config_file = parse(argv)
    print(dataset_flow(cfg, config_file=config_file))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
