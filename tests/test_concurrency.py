"""Two training runs started at once on one dataset and one storage root compute each stage once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_two_concurrent_train_runs_share_every_stage(tmp_path: Path) -> None:
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset

    d = make_demo_dataset(tmp_path / "raw", n_images=10, size=(128, 160), seed=4)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask")
    data = tmp_path / "patches"
    generate_patch_dataset(assoc, d["class_to_idx"], val_size=0.3, patch_size=[64, 64], output_folder=str(data))
    cfg = {
        "datamodule": {"data_path": str(data), "batch_size": 32},
        "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
        "transforms": {"input_height": 64, "input_width": 64},
        "trainer": {"iteration_over_training": 2},
        "core": {"runs_folder": str(tmp_path / "runs")},
        "storage_root": str(tmp_path / "shared-store"),  # shared by both runs: results, locks, features
    }
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    procs = []
    for _ in range(2):  # two independent processes, each with its own Prefect API (as two machines would)
        env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(dir=tmp_path), "PREFECT_LOGGING_LEVEL": "INFO"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "flows.train", "--config", str(cfg_file)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        logs.append(out)
    both = "\n".join(logs)
    # each feature store (2 passes + train grid + val) and the classifier were computed by exactly one of the runs
    assert both.count("train features:") == 2, both[-4000:]
    assert both.count("grid features:") == 1, both[-4000:]
    assert both.count("val features:") == 1, both[-4000:]
    assert both.count("fitted Pipeline") == 1  # the default recipe's classifier, both[-4000:]
    runs = sorted((tmp_path / "runs").glob("*/*/deployment_model"))
    assert len(runs) == 2
    for name in ("classifier.skops", "model.pt", "model.json", "_manifest.json"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    # nothing corrupted: every store is complete, matches its manifest and its recorded content digest
    from storage import features as fstore

    stores = sorted((tmp_path / "shared-store" / "features").glob("*.zarr"))
    assert len(stores) == 4 and not list((tmp_path / "shared-store" / "features").glob("*.partial"))
    for store in stores:
        assert fstore.is_verified(store)
        fstore.load_features(store, verify=True)
    assert not list((tmp_path / "shared-store" / "locks").glob("*.lock"))  # every lock released
