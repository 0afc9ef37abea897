"""Demo: synthetic data -> patch dataset -> trained patch classifier, in one process (one Prefect API start).

``python -m flows.demo [--data demo_data] [dotted.key=value ...]`` (overrides apply to the train config)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flows.dataset import dataset_flow
from flows.train import TrainFlowConfig, train_flow
from tasks.cli import run_cli
from tasks.config import load_config
from tasks.dataset.config import DatasetFlowConfig
from tasks.demo_data import make_demo_dataset
from tasks.evaluation.scoring import headline

HERE = Path(__file__).resolve().parents[1] / "deployments"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo pipeline."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="demo_data", help="where the synthetic images and masks go")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if not (Path(args.data) / "class_to_idx.json").is_file():
        make_demo_dataset(args.data)
    ds_cfg = load_config(DatasetFlowConfig, HERE / "demo_dataset.yaml")
    data_path = dataset_flow(ds_cfg)
    train_cfg = load_config(
        TrainFlowConfig, HERE / "demo_train.yaml", [f"datamodule.data_path={data_path}", *args.overrides]
    )
    result = train_flow(train_cfg)
    print(f"patch dataset: {data_path}")
    print(f"run folder:    {result['run_dir']}")
    print(f"bundle:        {result['bundle']}")
    report = Path(result["output"]) / "report.html"
    if report.is_file():
        print(f"report:        {report}")
    print("\n".join(headline(result["metrics"], "val")))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
