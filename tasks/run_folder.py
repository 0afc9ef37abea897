"""Run folders: ``<runs_folder>/<name>/<timestamp>/`` with the resolved config, its tree, the log and data/."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pydantic import BaseModel

from tasks.config import config_tree, dump_yaml
from tasks.features.params import class_map
from tasks.features.listing import list_split, read_train_list
from tasks.model.config import TrainFlowConfig


def make_run_dir(cfg: BaseModel) -> Path:
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
