"""Dataset flow: association -> patch dataset generation, cached by content.

``python -m flows.dataset --config FILE [dotted.key=value ...]``
"""

from __future__ import annotations

import sys
from typing import Sequence

from prefect import flow
from pydantic import Field

from storage.settings import storage_root
from tasks.caching import cached_stage
from tasks.config import StrictModel, parse_cli, run_cli, validate_config
from tasks.dataset_task import (
    DataSection,
    GenerationSection,
    associate_task,
    dataset_is_current,
    fingerprint_task,
    generate_task,
)


class DatasetFlowConfig(StrictModel):
    """Configuration of the dataset flow."""

    data: DataSection
    dataset: GenerationSection
    storage_root: str | None = Field(None, description="Results/cache/locks root (default $PATCHFLOW_STORAGE_ROOT or ./.patchflow)")
    force: bool = Field(False, description="Rebuild the dataset even if an identical one exists")


@flow(name="patchflow-dataset")
def dataset_flow(config: DatasetFlowConfig) -> str:
    """Build (or reuse) the patch dataset described by ``config``; returns its folder."""
    config = validate_config(DatasetFlowConfig, config)
    root = storage_root(config.storage_root)
    class_to_idx = config.data.resolved_class_to_idx()
    association = associate_task(config.data)
    key = fingerprint_task(association, class_to_idx, config.dataset)
    done = dataset_is_current(config.dataset.output_folder, key)
    return cached_stage(generate_task, root, config.force, done)(association, class_to_idx, config.dataset, key, config.force)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    cfg = parse_cli(DatasetFlowConfig, argv, description=__doc__)
    print(dataset_flow(cfg))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
