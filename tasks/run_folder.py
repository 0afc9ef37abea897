"""Run folders: ``<runs_folder>/<name>/<timestamp>/`` with the resolved config, its tree, the log and data/.

:func:`run_folder` opens one for a flow (``main.log`` attached while it runs); :func:`finish_train_run` copies
the training stages' outputs into it and publishes the run's artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.config import config_tree, dump_yaml
from tasks.features.listing import list_split, read_train_list
from tasks.features.params import class_map
from tasks.model.config import TrainFlowConfig


def make_run_dir(cfg: Any) -> Path:
    """Create a fresh run folder and write config_resolved.yaml and config_tree.txt."""
    base = Path(cfg.core.runs_folder) / cfg.core.name
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run = base / stamp
    i = 1
    while run.exists():
        run = base / f"{stamp}_{i}"
        i += 1
    run.mkdir(parents=True)
    (run / "config_resolved.yaml").write_text(dump_yaml(cfg))
    (run / "config_tree.txt").write_text(config_tree(cfg))
    return run.resolve()


def attach_log(run: Path) -> logging.Handler:
    """Send patchflow's log records to ``<run>/main.log``; returns the handler to detach later."""
    handler = logging.FileHandler(run / "main.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("patchflow")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def detach_log(handler: logging.Handler) -> None:
    """Stop writing to main.log."""
    logging.getLogger("patchflow").removeHandler(handler)
    handler.close()


def write_data_record(cfg: TrainFlowConfig, run: Path) -> None:
    """``data/``: the exact train lines (after filters/skips) and val patches used, for reproducibility."""
    dm = cfg.datamodule
    data = Path(dm.data_path)
    out = run / "data"
    out.mkdir(exist_ok=True)
    entries = read_train_list(data, dm.train_filename, dm.include_filter, dm.exclude_filter, dm.class_to_skip_training)
    (out / "train_list.csv").write_text("h5,class\n" + "".join(f"{e.h5_name},{e.class_name}\n" for e in entries))
    val = list_split(data, "val", class_map(cfg), dm.include_filter, dm.exclude_filter, include_none=False)
    (out / "val_list.csv").write_text("sample,label\n" + "".join(f"{p},{lab}\n" for p, lab in val))
    for name in ("info.json", "patchflow.json"):
        if (data / name).is_file():
            shutil.copy2(data / name, out / name)


def prune_partials(root: Path) -> None:
    """Remove partial outputs of killed runs (feature stores, exports, bundles, validation) untouched for 7 days."""
    from storage.shards import prune_stale_partials

    for sub in ("features", "backbones", "bundles", "validation"):
        prune_stale_partials(root / sub, patterns=("*.partial", "*/*.partial"))


@contextlib.contextmanager
def run_folder(cfg: BaseModel) -> Iterator[Path]:
    """A fresh run folder for ``cfg`` with patchflow's log records going to its ``main.log`` while the block runs;
    the task runs started in the block carry ``core.tag`` as a Prefect tag (Quadra's run tag)."""
    from prefect import tags

    run = make_run_dir(cfg)
    handler = attach_log(run)
    tag = cfg.core.tag  # type: ignore[attr-defined]
    try:
        with tags(*([tag] if tag else [])):
            yield run
    finally:
        detach_log(handler)


def finish_train_run(
    cfg: TrainFlowConfig, run: Path, bundle: str, validation: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Copy the bundle and the validation folder into the run folder (``<run>/<task.output_folder>``, plus the
    reconstruction results at the run's top level, as the reference writes them), publish the artifacts; the flow's
    result."""
    from tasks.artifacts import publish_task

    out = run / cfg.task.output_folder
    shutil.copytree(bundle, run / "deployment_model")
    shutil.copytree(validation, out)
    shutil.copy2(out / "reconstruction_results.json", run / "reconstruction_results.json")
    publish_task(f"{cfg.core.name} validation", metrics, str(out), str(run / "deployment_model"))
    return {"run_dir": str(run), "bundle": str(run / "deployment_model"), "output": str(out), "metrics": metrics}
